// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Back-ends that read the shared translation table themselves
//! (docs/mirror-protocol.md §16): their registry, their reader pages, and
//! the daemon's half of the reader handshake.
//!
//! A reader is another process, trusted with nothing: the daemon reads only
//! its slots, never waits for it longer than [`Readers::grace`], and a
//! reader that is late is **revoked** — its page says so, its socket is
//! closed, and it is never waited for again — so the guest's UNMAP
//! completes all the same. (A back-end maps all of guest RAM: the table
//! limits which addresses a cooperating back-end uses, it cannot stop a
//! hostile one. What the bound guarantees is that no reader can stall the
//! guest.)

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use table_reader::layout::{
    slot_word, EndpointState, Mode, PAGE_MAGIC, READER_PAGE_LEN, SLOTS, W_CHANGES, W_ENDPOINT,
    W_GEOMETRY, W_MAGIC, W_STATE,
};
use table_reader::GraceOutcome;

use super::shm::SharedMem;

/// Readers the daemon serves at once.
pub const MAX_READERS: usize = 16;
/// How long an UNMAP waits for a reader's section by default
/// (`--table-reader-grace-ms`).
pub const DEFAULT_GRACE: Duration = Duration::from_millis(200);

/// One registered reader.
#[derive(Debug)]
pub struct ReaderEntry {
    pub id: u64,
    pub endpoint: u32,
    /// The reader vouched that it is the endpoint's vhost back-end and uses
    /// no IOTLB of QEMU's (§16.4).
    pub owns_iotlb: bool,
    page: SharedMem,
    /// The reader's socket: shut down when it is revoked.
    conn: Mutex<Option<UnixStream>>,
}

impl ReaderEntry {
    /// A reader of `endpoint`, with a fresh reader page telling it the
    /// table's geometry and `state`.
    pub fn new(
        id: u64,
        endpoint: u32,
        owns_iotlb: bool,
        table_pages: u32,
        levels: u32,
        state: EndpointState,
    ) -> std::io::Result<Self> {
        let page = SharedMem::new(c"vhost-user-iommu-reader", READER_PAGE_LEN)?;
        let w = page.as_u64s();
        w[W_GEOMETRY].store(
            u64::from(table_pages) | u64::from(levels) << 32,
            Ordering::Relaxed,
        );
        w[W_ENDPOINT].store(u64::from(endpoint), Ordering::Relaxed);
        w[W_STATE].store(state.encode(), Ordering::Relaxed);
        w[W_MAGIC].store(PAGE_MAGIC, Ordering::Release);
        Ok(Self {
            id,
            endpoint,
            owns_iotlb,
            page,
            conn: Mutex::new(None),
        })
    }

    /// The reader page's file, to send.
    pub fn page(&self) -> &SharedMem {
        &self.page
    }

    /// Keep the reader's socket, to close on revocation.
    pub fn set_conn(&self, conn: UnixStream) {
        *lock(&self.conn) = Some(conn);
    }

    fn slots(&self) -> impl Iterator<Item = &AtomicU64> {
        let w = self.page.as_u64s();
        (0..SLOTS).map(move |i| &w[slot_word(i)])
    }

    fn state_word(&self) -> &AtomicU64 {
        &self.page.as_u64s()[W_STATE]
    }

    /// Publish `state` (release: after the table stores it depends on).
    fn set_state(&self, state: EndpointState) {
        let w = self.state_word();
        let new = state.encode();
        if w.load(Ordering::Relaxed) != new {
            w.store(new, Ordering::Release);
            self.page.as_u64s()[W_CHANGES].fetch_add(1, Ordering::Release);
        }
    }

    fn revoke(&self) {
        let mut s = EndpointState::decode(self.state_word().load(Ordering::Relaxed));
        s.revoked = true;
        s.mode = Mode::Blocked;
        self.set_state(s);
        if let Some(c) = lock(&self.conn).take() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Counters of the readers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReaderStats {
    pub registered: u64,
    pub revoked: u64,
    /// Grace periods waited for (a batch that removed a translation, with
    /// readers registered).
    pub graces: u64,
    /// Of those, how many ended at the bound with a reader still in its
    /// section.
    pub graces_late: u64,
}

/// The registry: the readers, the grace bound, counters.
#[derive(Debug)]
pub struct Readers {
    list: Mutex<Vec<Arc<ReaderEntry>>>,
    count: AtomicUsize,
    grace_us: AtomicU64,
    next_id: AtomicU64,
    registered: AtomicU64,
    revoked: AtomicU64,
    graces: AtomicU64,
    graces_late: AtomicU64,
}

impl Default for Readers {
    fn default() -> Self {
        Self {
            list: Mutex::default(),
            count: AtomicUsize::new(0),
            grace_us: AtomicU64::new(DEFAULT_GRACE.as_micros() as u64),
            next_id: AtomicU64::new(1),
            registered: AtomicU64::new(0),
            revoked: AtomicU64::new(0),
            graces: AtomicU64::new(0),
            graces_late: AtomicU64::new(0),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why a reader was not registered.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("the daemon serves {MAX_READERS} table readers already")]
    Full,
}

impl Readers {
    /// No reader registered (one relaxed load: the request path's test).
    pub fn is_empty(&self) -> bool {
        self.count.load(Ordering::Relaxed) == 0
    }

    /// The longest a removal waits for a reader's section.
    pub fn grace(&self) -> Duration {
        Duration::from_micros(self.grace_us.load(Ordering::Relaxed))
    }

    pub fn set_grace(&self, grace: Duration) {
        self.grace_us
            .store(grace.as_micros() as u64, Ordering::Relaxed);
    }

    /// An identity for the next reader.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Register `entry`. The caller holds the device lock, so the state in
    /// its page is current and no batch runs until it is listed.
    pub fn add(&self, entry: Arc<ReaderEntry>) -> Result<(), RegisterError> {
        let mut l = lock(&self.list);
        if l.len() >= MAX_READERS {
            return Err(RegisterError::Full);
        }
        l.push(entry);
        self.count.store(l.len(), Ordering::Relaxed);
        self.registered.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The reader `id` has gone (its socket closed).
    pub fn remove(&self, id: u64) -> Option<Arc<ReaderEntry>> {
        let mut l = lock(&self.list);
        let i = l.iter().position(|e| e.id == id)?;
        let e = l.swap_remove(i);
        self.count.store(l.len(), Ordering::Relaxed);
        Some(e)
    }

    /// Whether a reader of `endpoint` owns its IOTLB (§16.4): QEMU's
    /// UNMAP-only notifiers of that endpoint need no records.
    pub fn owns_iotlb(&self, endpoint: u32) -> bool {
        lock(&self.list)
            .iter()
            .any(|e| e.endpoint == endpoint && e.owns_iotlb)
    }

    /// Publish each reader's endpoint state, as `state` says it is now
    /// (under the device lock, after the batch's table stores).
    pub fn update_states(&self, state: impl Fn(u32) -> EndpointState) {
        for e in lock(&self.list).iter() {
            let s = EndpointState {
                revoked: false,
                ..state(e.endpoint)
            };
            e.set_state(s);
        }
    }

    /// The daemon's half of the handshake (§16.3), after table stores that
    /// removed translations: wait until every reader section open now has
    /// ended, at most [`Self::grace`]; revoke the readers still in one.
    /// Returns how many were revoked.
    pub fn synchronize(&self) -> usize {
        let snapshot: Vec<Arc<ReaderEntry>> = lock(&self.list).clone();
        if snapshot.is_empty() {
            return 0;
        }
        self.graces.fetch_add(1, Ordering::Relaxed);
        let bound = self.grace();
        let outcome = table_reader::synchronize(snapshot.iter().flat_map(|e| e.slots()), bound);
        let GraceOutcome::Late(late) = outcome else {
            return 0;
        };
        self.graces_late.fetch_add(1, Ordering::Relaxed);
        let mut ids: Vec<u64> = late.iter().map(|&i| snapshot[i / SLOTS].id).collect();
        ids.dedup();
        for &id in &ids {
            if let Some(e) = self.remove(id) {
                e.revoke();
                self.revoked.fetch_add(1, Ordering::Relaxed);
                log::error!(
                    "table reader {id} (endpoint {:#x}) stayed in a section for more than \
                     {bound:?}: revoked (its page says so, its socket is closed); the guest's \
                     request completes without it",
                    e.endpoint
                );
            }
        }
        ids.len()
    }

    /// The readers' counters.
    pub fn stats(&self) -> ReaderStats {
        ReaderStats {
            registered: self.registered.load(Ordering::Relaxed),
            revoked: self.revoked.load(Ordering::Relaxed),
            graces: self.graces.load(Ordering::Relaxed),
            graces_late: self.graces_late.load(Ordering::Relaxed),
        }
    }

    /// Revoke every reader (the daemon is going).
    pub fn revoke_all(&self) {
        let all: Vec<Arc<ReaderEntry>> = std::mem::take(&mut *lock(&self.list));
        self.count.store(0, Ordering::Relaxed);
        for e in all {
            e.revoke();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn entry(r: &Readers, endpoint: u32, owns: bool) -> Arc<ReaderEntry> {
        let e = Arc::new(
            ReaderEntry::new(
                r.next_id(),
                endpoint,
                owns,
                64,
                3,
                EndpointState {
                    mode: Mode::Translated { root: 1 },
                    revoked: false,
                },
            )
            .unwrap(),
        );
        r.add(e.clone()).unwrap();
        e
    }

    #[test]
    fn a_page_says_its_geometry_endpoint_and_state() {
        let r = Readers::default();
        let e = entry(&r, 0x20, true);
        let w = e.page.as_u64s();
        assert_eq!(w[W_MAGIC].load(Ordering::Relaxed), PAGE_MAGIC);
        assert_eq!(w[W_GEOMETRY].load(Ordering::Relaxed), 64 | 3 << 32);
        assert_eq!(w[W_ENDPOINT].load(Ordering::Relaxed), 0x20);
        assert!(r.owns_iotlb(0x20) && !r.owns_iotlb(0x21));
        r.update_states(|_| EndpointState {
            mode: Mode::Bypass,
            revoked: true,
        });
        let s = EndpointState::decode(w[W_STATE].load(Ordering::Relaxed));
        assert_eq!(s.mode, Mode::Bypass);
        assert!(!s.revoked, "a state update never revokes");
        assert_eq!(w[W_CHANGES].load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_reader_stuck_in_a_section_is_revoked_at_the_bound_and_not_waited_for_again() {
        let r = Readers::default();
        r.set_grace(Duration::from_millis(20));
        let good = entry(&r, 0x20, false);
        let bad = entry(&r, 0x28, false);
        let (mine, theirs) = UnixStream::pair().unwrap();
        bad.set_conn(mine);
        // The hostile reader opens a section on slot 5 and never leaves.
        bad.page.as_u64s()[slot_word(5)].store(1, Ordering::Relaxed);
        // The good one is idle, or between sections.
        good.page.as_u64s()[slot_word(0)].store(4, Ordering::Relaxed);
        let t = Instant::now();
        assert_eq!(r.synchronize(), 1);
        assert!(t.elapsed() < Duration::from_secs(2));
        let s = EndpointState::decode(bad.state_word().load(Ordering::Relaxed));
        assert!(s.revoked && s.mode == Mode::Blocked);
        // Its socket is closed: the reader sees EOF.
        let mut b = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut &theirs, &mut b).unwrap(), 0);
        // Not waited for again.
        let t = Instant::now();
        assert_eq!(r.synchronize(), 0);
        assert!(t.elapsed() < Duration::from_millis(15));
        assert_eq!(r.stats().revoked, 1);
        assert!(!r.is_empty(), "the good reader stays");
        assert!(!EndpointState::decode(good.state_word().load(Ordering::Relaxed)).revoked);
    }

    #[test]
    fn the_registry_has_a_cap() {
        let r = Readers::default();
        for i in 0..MAX_READERS {
            entry(&r, i as u32, false);
        }
        let extra = Arc::new(
            ReaderEntry::new(
                99,
                1,
                false,
                64,
                3,
                EndpointState {
                    mode: Mode::Blocked,
                    revoked: false,
                },
            )
            .unwrap(),
        );
        assert!(matches!(r.add(extra), Err(RegisterError::Full)));
        assert!(r.remove(1).is_some());
        r.revoke_all();
        assert!(r.is_empty());
    }
}
