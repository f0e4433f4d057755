// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The state journal (`--state-file`, docs/state-journal.md): a memory
//! mapped file the daemon appends every change of the device to, so that a
//! daemon restarted under a running guest comes back as the device the
//! guest last saw.
//!
//! The file is written through a shared mapping, so what the daemon stored
//! survives its death (a `SIGKILL` included) without a system call on the
//! request path: a request costs a few 40-byte copies and one release store
//! of the committed length. The records' format and their folding into a
//! state are `virtio_iommu::journal`'s.
//!
//! Layout: a 4 KiB header page, then two halves. One half is *active*: its
//! records, up to its committed length, are the journal. When the active
//! half is full, or the device was reset, the daemon writes a snapshot of
//! the device (its features, `bypass`, attachments and mappings) and the
//! last completions into the other half, commits it, and makes it active
//! with one store: a daemon killed at any point leaves one whole journal.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use iopt::Iommufd;

use crate::mirror::SharedMem;
use virtio_iommu::journal::{Answered, Completion, Entry, Replay, RECENT_DONE, RECORD_LEN};
use virtio_iommu::{Change, ChangeSink, Device, DeviceState};

/// `magic`: the bytes `V U I J`.
const MAGIC: u32 = 0x4a49_5556;
const VERSION: u32 = 1;
const HEADER_LEN: usize = 4096;
/// Each half's own header: its committed length.
const HALF_HEADER_LEN: usize = 64;
/// The size of a half: room for about 420 000 records.
pub const DEFAULT_HALF_LEN: usize = 16 << 20;
/// No half is active: nothing to recover.
const NONE_ACTIVE: u32 = u32::MAX;

// Header page offsets.
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 4;
const OFF_HALF_LEN: usize = 8;
const OFF_ACTIVE: usize = 16;
/// The `instance` of the QEMU whose device the journal holds (mirror
/// protocol 2.2 HELLO); 0: not known (no QEMU with one connected yet).
const OFF_INSTANCE: usize = 24;

/// Why the state file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot open the state file {path}: {source}")]
    Open { path: String, source: io::Error },
    #[error("the state file {0} is in use by another daemon")]
    InUse(String),
    #[error("cannot size or map the state file: {0}")]
    Map(io::Error),
}

/// What a previous daemon left in the state file.
#[derive(Debug)]
pub struct Recovered {
    /// The device it was.
    pub state: DeviceState,
    /// The QEMU whose device it was (its mirror HELLO `instance`); 0 if not
    /// known. Another QEMU must not get it (docs/state-journal.md).
    pub instance: u64,
    /// The requests it carried out whose completion the driver may not
    /// have seen.
    pub answered: Answered,
    /// Records read.
    pub records: u64,
}

/// Why a state file's content was not recovered.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unrecoverable {
    #[error("not a state file (magic {0:#x})")]
    BadMagic(u32),
    #[error("version {0} (this daemon reads version {VERSION})")]
    BadVersion(u32),
    #[error("made with halves of {0} bytes, this daemon uses {1}")]
    BadSize(u64, usize),
    #[error("active half {0}")]
    BadActive(u32),
    #[error("committed length {0} does not fit its half")]
    BadLength(u64),
    #[error("record {0} is damaged (kind {1})")]
    BadRecord(u64, u8),
}

/// The journal, open and mapped.
pub struct Journal {
    /// The file, mapped; reached only through atomics (`word`).
    mem: SharedMem,
    half_len: usize,
    active: u32,
    /// Bytes of records written in the active half (committed or not).
    end: usize,
    /// A record did not fit: the active half is rewritten at the next
    /// commit.
    full: bool,
    /// The device was reset: the journal starts over at the next commit.
    reset: bool,
    /// Even a snapshot did not fit: nothing is recorded until a reset (a
    /// restarted daemon then recovers nothing rather than something old).
    broken: bool,
    /// The features the journal holds.
    features: u64,
    /// The last completions, a ring (oldest at `done_head` once full).
    done: Box<[Completion; RECENT_DONE]>,
    done_head: usize,
    done_len: usize,
}

impl Journal {
    /// Open (or create, mode 0600) the state file at `path`, lock it for
    /// this daemon, and read what a previous daemon left in it. The
    /// journal is not written until [`Self::start`].
    pub fn open(
        path: &Path,
    ) -> Result<(Self, Result<Option<Recovered>, Unrecoverable>), JournalError> {
        Self::open_with(path, DEFAULT_HALF_LEN)
    }

    fn open_with(
        path: &Path,
        half_len: usize,
    ) -> Result<(Self, Result<Option<Recovered>, Unrecoverable>), JournalError> {
        let shown = path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|source| JournalError::Open {
                path: shown.clone(),
                source,
            })?;
        // flock(2), LOCK_EX | LOCK_NB: held until the file is closed.
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(JournalError::InUse(shown)),
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(JournalError::Open {
                    path: shown,
                    source,
                })
            }
        }
        let len = HEADER_LEN + 2 * half_len;
        let was = file.metadata().map_err(JournalError::Map)?.len();
        file.set_len(len as u64).map_err(JournalError::Map)?;
        // The file is locked for this daemon and must be private to it: a
        // file truncated under the mapping would fault.
        let mem = SharedMem::map(file, len).map_err(JournalError::Map)?;
        let j = Self {
            mem,
            half_len,
            active: NONE_ACTIVE,
            end: 0,
            full: false,
            reset: false,
            broken: false,
            features: 0,
            done: Box::new([Completion::default(); RECENT_DONE]),
            done_head: 0,
            done_len: 0,
        };
        let recovered = match was {
            0 => Ok(None),
            _ => j.read(),
        };
        Ok((j, recovered))
    }

    /// The 64-bit word at byte `off` (a multiple of 8) of the file.
    fn word(&self, off: usize) -> &AtomicU64 {
        &self.mem.as_u64s()[off / 8]
    }

    /// The 32-bit header field at byte `off` (a multiple of 4): a half of
    /// its little-endian word.
    fn header_u32(&self, off: usize) -> u32 {
        let w = u64::from_le(self.word(off & !7).load(Ordering::Acquire));
        (w >> ((off & 4) * 8)) as u32
    }

    /// Store a 64-bit field, little-endian.
    fn store(&self, off: usize, v: u64, order: Ordering) {
        self.word(off).store(v.to_le(), order);
    }

    fn half(&self, h: u32) -> usize {
        HEADER_LEN + h as usize * self.half_len
    }

    fn capacity(&self) -> usize {
        (self.half_len - HALF_HEADER_LEN) / RECORD_LEN * RECORD_LEN
    }

    fn record_at(&self, h: u32, at: usize) -> [u8; RECORD_LEN] {
        let off = self.half(h) + HALF_HEADER_LEN + at;
        let mut r = [0u8; RECORD_LEN];
        for (i, chunk) in r.chunks_exact_mut(8).enumerate() {
            chunk.copy_from_slice(&self.word(off + 8 * i).load(Ordering::Relaxed).to_ne_bytes());
        }
        r
    }

    /// Store a record: five plain word stores (relaxed); the committed
    /// length's release store publishes them.
    fn write_at(&self, h: u32, at: usize, r: &[u8; RECORD_LEN]) {
        debug_assert!(at + RECORD_LEN <= self.capacity());
        let off = self.half(h) + HALF_HEADER_LEN + at;
        for (i, chunk) in r.chunks_exact(8).enumerate() {
            let w = u64::from_ne_bytes(chunk.try_into().expect("8 bytes"));
            self.word(off + 8 * i).store(w, Ordering::Relaxed);
        }
    }

    /// What the file holds, checked.
    fn read(&self) -> Result<Option<Recovered>, Unrecoverable> {
        let magic = self.header_u32(OFF_MAGIC);
        if magic != MAGIC {
            return Err(Unrecoverable::BadMagic(magic));
        }
        let version = self.header_u32(OFF_VERSION);
        if version != VERSION {
            return Err(Unrecoverable::BadVersion(version));
        }
        let half_len = u64::from_le(self.word(OFF_HALF_LEN).load(Ordering::Acquire));
        if half_len != self.half_len as u64 {
            return Err(Unrecoverable::BadSize(half_len, self.half_len));
        }
        let active = self.header_u32(OFF_ACTIVE);
        if active == NONE_ACTIVE {
            return Ok(None);
        }
        if active > 1 {
            return Err(Unrecoverable::BadActive(active));
        }
        let committed = u64::from_le(self.word(self.half(active)).load(Ordering::Acquire));
        if committed > self.capacity() as u64 || !committed.is_multiple_of(RECORD_LEN as u64) {
            return Err(Unrecoverable::BadLength(committed));
        }
        let mut replay = Replay::new();
        for (n, at) in (0..committed as usize).step_by(RECORD_LEN).enumerate() {
            let bytes = self.record_at(active, at);
            match Entry::decode(&bytes) {
                Some(r) => replay.apply(&r),
                None => return Err(Unrecoverable::BadRecord(n as u64, bytes[0])),
            }
        }
        Ok(Some(Recovered {
            state: replay.state(),
            instance: u64::from_le(self.word(OFF_INSTANCE).load(Ordering::Acquire)),
            answered: Answered::new(replay.recent_done()),
            records: replay.records(),
        }))
    }

    /// Start journalling `device` as it is now, carrying over `answered`
    /// (the completions a recovered journal held): the first snapshot.
    pub fn start<F: Iommufd>(&mut self, device: &Device<F>, answered: &Answered) {
        for &c in answered.pending() {
            self.remember(c);
        }
        // `magic` and `version` share the first word.
        self.store(
            OFF_MAGIC,
            u64::from(MAGIC) | u64::from(VERSION) << 32,
            Ordering::Relaxed,
        );
        self.store(OFF_HALF_LEN, self.half_len as u64, Ordering::Relaxed);
        self.rewrite(device);
    }

    fn remember(&mut self, c: Completion) {
        let at = (self.done_head + self.done_len) % RECENT_DONE;
        self.done[at] = c;
        if self.done_len == RECENT_DONE {
            self.done_head = (self.done_head + 1) % RECENT_DONE;
        } else {
            self.done_len += 1;
        }
    }

    /// Append one record to the active half (not committed yet).
    fn append(&mut self, r: &Entry) {
        if self.broken || self.full || self.active == NONE_ACTIVE {
            return;
        }
        if self.end + RECORD_LEN > self.capacity() {
            self.full = true;
            return;
        }
        if matches!(r, Entry::Change(Change::Reset)) {
            self.reset = true;
        }
        self.write_at(self.active, self.end, &r.encode());
        self.end += RECORD_LEN;
    }

    /// The device now belongs to the QEMU process `instance` (its mirror
    /// HELLO). One store, after whatever reset a change of QEMU needed was
    /// committed: a daemon killed in between leaves a reset device and the
    /// old instance, which the next QEMU resets again — never the old
    /// state under the new instance.
    pub fn set_instance(&mut self, instance: u64) {
        self.store(OFF_INSTANCE, instance, Ordering::Release);
    }

    /// The device was reset: the driver starts its rings afresh, so no
    /// request before the reset can come again, and the completions kept
    /// to answer them go (the snapshot the reset brings holds none).
    pub fn forget_completions(&mut self) {
        self.done_head = 0;
        self.done_len = 0;
    }

    /// A request was carried out: commit it with its changes.
    pub fn done<F: Iommufd>(&mut self, c: Completion, device: &Device<F>) {
        self.remember(c);
        self.append(&Entry::Done {
            pos: c.pos,
            status: c.status,
            digest: c.digest,
        });
        self.commit(device);
    }

    /// Commit what was appended (and the device's features, if they
    /// changed); rewrite the journal if its half is full or the device was
    /// reset.
    pub fn commit<F: Iommufd>(&mut self, device: &Device<F>) {
        if self.active == NONE_ACTIVE && !self.broken {
            return;
        }
        let features = device.acked_features();
        if features != self.features && !self.reset {
            self.append(&Entry::Features(features));
            self.features = features;
        }
        if self.full || self.reset || (self.broken && device_is_empty(device)) {
            self.rewrite(device);
            return;
        }
        if !self.broken {
            self.store(self.half(self.active), self.end as u64, Ordering::Release);
        }
    }

    /// Write a snapshot of `device` and the last completions into the
    /// inactive half, commit it, and make it the active one.
    fn rewrite<F: Iommufd>(&mut self, device: &Device<F>) {
        let target = match self.active {
            0 => 1,
            _ => 0,
        };
        self.active = target;
        self.end = 0;
        self.full = false;
        self.reset = false;
        self.broken = false;
        self.append(&Entry::Features(device.acked_features()));
        self.features = device.acked_features();
        device.replay(&mut Appender(self));
        for i in 0..self.done_len {
            let c = self.done[(self.done_head + i) % RECENT_DONE];
            self.append(&Entry::Done {
                pos: c.pos,
                status: c.status,
                digest: c.digest,
            });
        }
        if self.full {
            log::error!(
                "state file: the device's state does not fit in {} bytes: not journalled until \
                 the next reset (a restarted daemon would recover nothing)",
                self.half_len
            );
            self.broken = true;
            self.full = false;
            self.active = NONE_ACTIVE;
            self.store(OFF_ACTIVE, NONE_ACTIVE.into(), Ordering::Release);
            return;
        }
        self.store(self.half(target), self.end as u64, Ordering::Release);
        self.store(OFF_ACTIVE, target.into(), Ordering::Release);
    }

    /// Bytes of records in the active half.
    pub fn used(&self) -> usize {
        self.end
    }
}

/// A device with nothing to journal (a reset one): its snapshot always
/// fits.
fn device_is_empty<F: Iommufd>(device: &Device<F>) -> bool {
    device.save_state().entries.is_empty()
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("half_len", &self.half_len)
            .field("active", &self.active)
            .field("end", &self.end)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

/// Appends the changes of a snapshot.
struct Appender<'a>(&'a mut Journal);

impl ChangeSink for Appender<'_> {
    fn change(&mut self, c: Change) {
        self.0.append(&Entry::Change(c));
    }
}

impl ChangeSink for Journal {
    fn change(&mut self, c: Change) {
        self.append(&Entry::Change(c));
    }
}

/// A sink that passes every change to the mirror and to the journal, if
/// there is one.
#[allow(missing_debug_implementations)]
pub struct Journaled<'a, S> {
    pub sink: &'a mut S,
    pub journal: Option<&'a mut Journal>,
}

impl<S: ChangeSink> ChangeSink for Journaled<'_, S> {
    fn change(&mut self, c: Change) {
        if let Some(j) = self.journal.as_deref_mut() {
            j.change(c);
        }
        self.sink.change(c);
    }
}
