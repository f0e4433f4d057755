// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The state journal's records (docs/state-journal.md): every change the
//! device makes, each request's completion, and the negotiated features, so
//! that a daemon restarted under a running guest can become the device the
//! guest last saw.
//!
//! Records are 40 bytes, in the layout of the migration state's entries
//! (docs/device-state.md) with more kinds. [`Replay`] folds a sequence of
//! them into a [`DeviceState`] for [`crate::Device::restore_state`], and
//! keeps the last completions, so that a request the old daemon carried out
//! but could not complete is answered, not carried out twice. Pure encoding,
//! decoding and folding: the file is the daemon's.

use std::collections::{BTreeMap, VecDeque};

use crate::change::Change;
use crate::entry::{decode_change, encode_change, kind, le_u64, put_u64, ENTRY_LEN};
use crate::map_unmap::Map;
use crate::state::DeviceState;
use crate::wire::req_type;

/// Size of one record.
pub const RECORD_LEN: usize = ENTRY_LEN;

/// Completions a [`Replay`] keeps: a request queue holds at most this many
/// requests, so no more can be waiting for their used element.
pub const RECENT_DONE: usize = 1024;

/// One journal record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A change of the translation state, as the device reported it.
    Change(Change),
    /// The request at position `pos` of the request queue's available ring
    /// was carried out, with this status byte; its changes are the records
    /// before this one. `digest` is [`digest`] of its bytes: a request
    /// that comes again at `pos` is the same one only if they match.
    Done { pos: u16, status: u8, digest: u64 },
    /// The driver acknowledged these device features.
    Features(u64),
}

impl Entry {
    /// The record's bytes (crate::entry's layout).
    pub fn encode(&self) -> [u8; RECORD_LEN] {
        match *self {
            Entry::Change(c) => encode_change(&c),
            Entry::Done {
                pos,
                status,
                digest,
            } => {
                let mut e = [0u8; RECORD_LEN];
                e[0] = kind::DONE;
                e[1] = status;
                e[2..4].copy_from_slice(&pos.to_le_bytes());
                put_u64(&mut e, 8, digest);
                e
            }
            Entry::Features(f) => {
                let mut e = [0u8; RECORD_LEN];
                e[0] = kind::FEATURES;
                put_u64(&mut e, 16, f);
                e
            }
        }
    }

    /// The record `e` holds; `None` for an unknown kind (reserved fields
    /// are ignored).
    pub fn decode(e: &[u8; RECORD_LEN]) -> Option<Self> {
        if let Some(c) = decode_change(e) {
            return Some(Entry::Change(c));
        }
        Some(match e[0] {
            kind::DONE => Entry::Done {
                pos: u16::from_le_bytes([e[2], e[3]]),
                status: e[1],
                digest: le_u64(&e[8..16]),
            },
            kind::FEATURES => Entry::Features(le_u64(&e[16..24])),
            _ => return None,
        })
    }
}

/// The status byte to journal for a request, if it is one that can change
/// the state (ATTACH, DETACH, MAP, UNMAP: their reply is the 4-byte tail
/// alone, virtio 1.2 §5.13.6); `None` for PROBE, unknown types and a reply
/// with no room for the tail, which change nothing and are simply carried
/// out again.
pub fn changing_status(request: &[u8], reply: &[u8]) -> Option<u8> {
    let kind = *request.first()?;
    let changing = matches!(
        kind,
        req_type::ATTACH | req_type::DETACH | req_type::MAP | req_type::UNMAP
    );
    (changing && reply.len() >= TAIL_LEN).then(|| reply[reply.len() - TAIL_LEN])
}

/// A request's digest (64-bit FNV-1a of its bytes), to recognise it when
/// it comes again after a restart.
pub fn digest(request: &[u8]) -> u64 {
    request.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Write a request's tail with `status` (reserved bytes zero); the used
/// length: 4, or 0 if `reply` has no room for it.
pub fn write_status(reply: &mut [u8], status: u8) -> usize {
    match reply.get_mut(..TAIL_LEN) {
        Some(tail) => {
            tail.copy_from_slice(&[status, 0, 0, 0]);
            TAIL_LEN
        }
        None => 0,
    }
}

const TAIL_LEN: usize = std::mem::size_of::<crate::wire::ReqTail>();

/// A domain as the records describe it.
#[derive(Clone, Debug, Default)]
struct DomainView {
    bypass: bool,
    endpoints: u32,
    /// First IOVA → the MAP.
    mappings: BTreeMap<u64, Map>,
}

/// The device state a sequence of records leads to, folded with the rules
/// the device follows (src/device/attach.rs, src/device/map.rs): a domain
/// exists from the ATTACH that creates it until its last endpoint leaves; an
/// endpoint attached elsewhere is moved; UNMAP removes the mappings inside
/// its range; a reset forgets every domain, attachment and acknowledged
/// feature.
#[derive(Clone, Debug, Default)]
pub struct Replay {
    features: u64,
    bypass: bool,
    attached: BTreeMap<u32, u32>,
    domains: BTreeMap<u32, DomainView>,
    done: VecDeque<Completion>,
    records: u64,
}

impl Replay {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records applied so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    pub fn apply(&mut self, r: &Entry) {
        self.records += 1;
        match *r {
            Entry::Features(f) => self.features = f,
            Entry::Done {
                pos,
                status,
                digest,
            } => {
                if self.done.len() == RECENT_DONE {
                    self.done.pop_front();
                }
                self.done.push_back(Completion {
                    pos,
                    status,
                    digest,
                });
            }
            Entry::Change(c) => self.change(c),
        }
    }

    fn change(&mut self, c: Change) {
        match c {
            Change::Reset => {
                self.attached.clear();
                self.domains.clear();
                self.features = 0;
            }
            Change::GlobalBypass(on) => self.bypass = on,
            Change::Attach {
                endpoint,
                domain,
                bypass,
            } => {
                if let Some(old) = self.attached.get(&endpoint).copied() {
                    self.leave(endpoint, old);
                }
                let d = self.domains.entry(domain).or_insert_with(|| DomainView {
                    bypass,
                    ..DomainView::default()
                });
                d.endpoints += 1;
                self.attached.insert(endpoint, domain);
            }
            Change::Detach { endpoint, domain } => {
                if self.attached.get(&endpoint) == Some(&domain) {
                    self.leave(endpoint, domain);
                }
            }
            Change::Map(m) => {
                if let Some(d) = self.domains.get_mut(&m.domain) {
                    d.mappings.insert(m.virt_start, m);
                }
            }
            Change::Unmap(u) => {
                if let Some(d) = self.domains.get_mut(&u.domain) {
                    d.mappings
                        .retain(|_, m| !u.covers(m.virt_start, m.virt_end));
                }
            }
        }
    }

    /// `endpoint` leaves `domain`, which goes with its last endpoint.
    fn leave(&mut self, endpoint: u32, domain: u32) {
        self.attached.remove(&endpoint);
        if let Some(d) = self.domains.get_mut(&domain) {
            d.endpoints = d.endpoints.saturating_sub(1);
            if d.endpoints == 0 {
                self.domains.remove(&domain);
            }
        }
    }

    /// The state the records lead to: attachments, then mappings.
    pub fn state(&self) -> DeviceState {
        let mut entries: Vec<Change> = self
            .attached
            .iter()
            .map(|(&endpoint, &domain)| Change::Attach {
                endpoint,
                domain,
                bypass: self.domains.get(&domain).is_some_and(|d| d.bypass),
            })
            .collect();
        for d in self.domains.values() {
            entries.extend(d.mappings.values().map(|&m| Change::Map(m)));
        }
        DeviceState {
            acked_features: self.features,
            bypass: self.bypass,
            entries,
        }
    }

    /// The last completions, oldest first (at most [`RECENT_DONE`]).
    pub fn recent_done(&self) -> impl Iterator<Item = Completion> + '_ {
        self.done.iter().copied()
    }
}

/// A request carried out: where it was in the ring, its status byte, its
/// [`digest`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Completion {
    pub pos: u16,
    pub status: u8,
    pub digest: u64,
}

/// The requests a restarted daemon must answer from its journal rather than
/// carry out: those the old daemon carried out, in its state, but whose
/// used elements the driver never got (the front-end restarts the queue at
/// the used index, so they come again, in order).
#[derive(Clone, Debug, Default)]
pub struct Answered {
    /// Oldest first.
    done: Vec<Completion>,
}

impl Answered {
    pub fn new(done: impl IntoIterator<Item = Completion>) -> Self {
        Self {
            done: done.into_iter().collect(),
        }
    }

    /// The completions still to answer, oldest first.
    pub fn pending(&self) -> &[Completion] {
        &self.done
    }

    /// Whether there is anything left to answer.
    pub fn is_empty(&self) -> bool {
        self.done.is_empty()
    }

    /// The status the request at `pos` with `digest` already had, if the
    /// journal has it. Requests come in ring order: once one is past the
    /// last recorded completion, or is not the request recorded at its
    /// position (a front-end that started its rings afresh), nothing is
    /// left to answer and the list empties.
    pub fn take(&mut self, pos: u16, digest: u64) -> Option<u8> {
        let last = self.done.last()?.pos;
        // At or before `last` in ring order: within one queue's length.
        if (last.wrapping_sub(pos) as usize) < RECENT_DONE {
            if let Some(c) = self.done.iter().rev().find(|c| c.pos == pos) {
                if c.digest == digest {
                    return Some(c.status);
                }
                self.done.clear();
                return None;
            }
            // Not recorded (a PROBE, say): carried out again.
            return None;
        }
        self.done.clear();
        None
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::field_reassign_with_default)]
    use super::*;
    use crate::device::{ChangeSink, Device, DeviceConfig, GuestRam, RamRegion};
    use crate::map_unmap::Unmap;
    use crate::wire::{req_type, ReqAttach, ReqDetach, ReqMap, ReqUnmap};
    use iopt::model::{MockDevice, ModelIommufd};
    use iopt::DeviceId;
    use proptest::prelude::*;
    use vm_memory::ByteValued;

    /// 64 MiB of guest RAM at GPA 0.
    struct Ram;
    impl GuestRam for Ram {
        fn user_addr(&self, gpa: u64, len: u64) -> Option<u64> {
            let last = gpa.checked_add(len.checked_sub(1)?)?;
            (last < 64 << 20).then_some(0x7f00_0000_0000 + gpa)
        }
        fn for_each_region(&self, f: &mut dyn FnMut(RamRegion)) {
            f(RamRegion {
                gpa: 0,
                len: 64 << 20,
                user_va: 0x7f00_0000_0000,
            });
        }
    }

    fn device() -> Device<ModelIommufd> {
        let mut model = ModelIommufd::new();
        let eps = [8u32, 16, 24];
        for ep in eps {
            model.add_device(DeviceId(ep), MockDevice::x86()).unwrap();
        }
        let mut d = Device::new(
            DeviceConfig::default(),
            model,
            eps.map(|ep| (ep, DeviceId(ep))),
        )
        .unwrap();
        d.set_acked_features(u64::MAX);
        d
    }

    /// Records, as the daemon's journal writes them.
    #[derive(Default)]
    struct Log(Vec<Entry>);
    impl ChangeSink for Log {
        fn change(&mut self, c: Change) {
            self.0.push(Entry::Change(c));
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Attach(u32, u32, bool),
        Detach(u32, u32),
        Map(u32, u64, u64, u64),
        Unmap(u32, u64, u64),
        Bypass(bool),
        Reset,
    }

    fn op() -> impl Strategy<Value = Op> {
        let ep = prop_oneof![Just(8u32), Just(16), Just(24), Just(32)];
        let dom = 1u32..5;
        let page = 0u64..16;
        prop_oneof![
            (dom.clone(), ep.clone(), any::<bool>()).prop_map(|(d, e, b)| Op::Attach(d, e, b)),
            (dom.clone(), ep).prop_map(|(d, e)| Op::Detach(d, e)),
            (dom.clone(), page.clone(), 1u64..4, 0u64..1000)
                .prop_map(|(d, p, n, g)| Op::Map(d, p, n, g)),
            (dom, page, 1u64..8).prop_map(|(d, p, n)| Op::Unmap(d, p, n)),
            any::<bool>().prop_map(Op::Bypass),
            Just(Op::Reset),
        ]
    }

    fn request(op: &Op) -> Option<Vec<u8>> {
        const PAGE: u64 = 0x1000;
        Some(match *op {
            Op::Attach(domain, endpoint, bypass) => {
                let mut r = ReqAttach::default();
                r.head.req_type = req_type::ATTACH;
                r.domain = domain.into();
                r.endpoint = endpoint.into();
                r.flags = u32::from(bypass).into();
                r.as_slice().to_vec()
            }
            Op::Detach(domain, endpoint) => {
                let mut r = ReqDetach::default();
                r.head.req_type = req_type::DETACH;
                r.domain = domain.into();
                r.endpoint = endpoint.into();
                r.as_slice().to_vec()
            }
            Op::Map(domain, page, pages, gpa_page) => {
                let mut r = ReqMap::default();
                r.head.req_type = req_type::MAP;
                r.domain = domain.into();
                r.virt_start = (page * PAGE).into();
                r.virt_end = ((page + pages) * PAGE - 1).into();
                r.phys_start = (gpa_page * PAGE).into();
                r.flags = 3u32.into();
                r.as_slice().to_vec()
            }
            Op::Unmap(domain, page, pages) => {
                let mut r = ReqUnmap::default();
                r.head.req_type = req_type::UNMAP;
                r.domain = domain.into();
                r.virt_start = (page * PAGE).into();
                r.virt_end = ((page + pages) * PAGE - 1).into();
                r.as_slice().to_vec()
            }
            Op::Bypass(_) | Op::Reset => return None,
        })
    }

    #[test]
    fn every_record_round_trips_through_its_bytes() {
        let records = [
            Entry::Change(Change::Attach {
                endpoint: 8,
                domain: 3,
                bypass: true,
            }),
            Entry::Change(Change::Detach {
                endpoint: 8,
                domain: 3,
            }),
            Entry::Change(Change::Map(Map {
                domain: 3,
                virt_start: 0x1000,
                virt_end: 0x1fff,
                phys_start: 0x9000,
                flags: 1,
            })),
            Entry::Change(Change::Unmap(Unmap {
                domain: 3,
                virt_start: 0,
                virt_end: u64::MAX,
            })),
            Entry::Change(Change::GlobalBypass(true)),
            Entry::Change(Change::GlobalBypass(false)),
            Entry::Change(Change::Reset),
            Entry::Done {
                pos: 0xfffe,
                status: 4,
                digest: 0x0123_4567_89ab_cdef,
            },
            Entry::Features(0x1_0000_0033),
        ];
        for r in records {
            assert_eq!(Entry::decode(&r.encode()), Some(r), "{r:?}");
        }
        let mut unknown = [0u8; RECORD_LEN];
        unknown[0] = 99;
        assert_eq!(Entry::decode(&unknown), None);
        assert_eq!(
            Entry::decode(&[0; RECORD_LEN]),
            None,
            "zeroes are no record"
        );
    }

    #[test]
    fn only_requests_that_can_change_the_state_are_journalled() {
        let ok = [0u8, 0, 0, 0];
        assert_eq!(changing_status(&[req_type::MAP, 0], &ok), Some(0));
        assert_eq!(changing_status(&[req_type::DETACH], &[4, 0, 0, 0]), Some(4));
        assert_eq!(changing_status(&[req_type::PROBE], &ok), None);
        assert_eq!(changing_status(&[99], &ok), None);
        assert_eq!(changing_status(&[], &ok), None);
        assert_eq!(changing_status(&[req_type::MAP], &[]), None);
        let mut reply = [0xffu8; 8];
        assert_eq!(write_status(&mut reply, 6), 4);
        assert_eq!(reply[..5], [6, 0, 0, 0, 0xff]);
        assert_eq!(write_status(&mut reply[..3], 6), 0);
    }

    fn done(pos: u16, status: u8, digest: u64) -> Completion {
        Completion {
            pos,
            status,
            digest,
        }
    }

    #[test]
    fn answered_requests_are_the_same_ones_at_or_before_the_last_completion() {
        let mut a = Answered::new([done(0xfffe, 0, 1), done(0xffff, 4, 2), done(1, 0, 3)]);
        assert_eq!(a.take(0xffff, 2), Some(4));
        assert_eq!(
            a.take(0, 9),
            None,
            "position 0 was a PROBE: carried out again"
        );
        assert_eq!(a.take(1, 3), Some(0));
        assert!(!a.is_empty());
        // Past the last completion: nothing more, and the list is dropped.
        assert_eq!(a.take(2, 3), None);
        assert!(a.is_empty());
        // A queue restarted after every completion was used.
        let mut a = Answered::new([done(10, 0, 1)]);
        assert_eq!(a.take(11, 1), None);
        assert!(a.is_empty());
        // A front-end with fresh rings: another request at a recorded
        // position is carried out, and nothing more is answered.
        let mut a = Answered::new([done(0, 0, 1), done(1, 0, 2)]);
        assert_eq!(a.take(0, 7), None);
        assert!(a.is_empty());
        assert_eq!(a.take(1, 2), None);
        assert_ne!(digest(b"MAP a"), digest(b"MAP b"));
    }

    proptest! {
        /// Folding the journal of any request sequence gives exactly the
        /// state the device saves, and restoring it gives a device that
        /// saves the same state again.
        #[test]
        fn replaying_the_journal_gives_the_state_the_device_has(
            ops in prop::collection::vec(op(), 0..60)
        ) {
            let mut d = device();
            let mut log = Log::default();
            log.0.push(Entry::Features(d.acked_features()));
            log.0.push(Entry::Change(Change::GlobalBypass(d.config().bypass != 0)));
            for (pos, op) in ops.iter().enumerate() {
                match op {
                    Op::Bypass(on) => {
                        let _ = d.write_config(36, &[u8::from(*on)], &mut log);
                    }
                    Op::Reset => {
                        d.reset(&mut log);
                        d.set_acked_features(u64::MAX);
                        log.0.push(Entry::Features(d.acked_features()));
                    }
                    _ => {
                        let req = request(op).unwrap();
                        let mut reply = [0u8; 4];
                        prop_assert_eq!(d.handle_request(&req, &mut reply, &Ram, &mut log), 4);
                        log.0.push(Entry::Done { pos: pos as u16, status: reply[0], digest: digest(&req) });
                    }
                }
            }
            let mut replay = Replay::new();
            for r in &log.0 {
                // Through the bytes, as the file holds them.
                replay.apply(&Entry::decode(&r.encode()).unwrap());
            }
            let mut want = d.save_state();
            let mut got = replay.state();
            want.entries.sort_by_key(|c| format!("{c:?}"));
            got.entries.sort_by_key(|c| format!("{c:?}"));
            prop_assert_eq!(&got, &want);

            let mut fresh = device();
            prop_assert!(fresh.restore_state(&replay.state(), &Ram, &mut Log::default()).is_ok());
            let mut again = fresh.save_state();
            again.entries.sort_by_key(|c| format!("{c:?}"));
            prop_assert_eq!(again, want);
        }
    }
}
