// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What one batch of device changes becomes on the mirror
//! (docs/mirror-protocol.md §5, §7, §11).
//!
//! Every change goes into the shared translation table at once; a change
//! becomes a record for QEMU only if QEMU needs to *act* on it:
//! attachments, bypass and resets always (QEMU switches address spaces and
//! fires notifiers), MAP and UNMAP only in domains where an endpoint has
//! IOMMU notifiers of that kind (VFIO: MAP and UNMAP; vhost: UNMAP only):
//! QEMU's `translate()` reads the table itself, so for everything else a MAP
//! or UNMAP is complete once written.

use std::sync::atomic::{fence, AtomicU8, Ordering};

use virtio_iommu::{Change, ChangeSink, Map, Unmap};

use super::proto::Record;
use super::table::{TableStore, TranslationTable};

/// The per-endpoint notifier flags QEMU writes (§11): byte `ep` is non-zero
/// while endpoint `ep`'s IOMMU memory region has notifiers.
pub const NOTIFIER_FLAGS_LEN: usize = 1 << 16;

/// Bit 0 of a notifier flag (2.5): the endpoint's notifiers need MAP
/// records. Bit 1 says they need UNMAP records, which any non-zero byte
/// gets: before 2.5 QEMU wrote 1 for every kind, so a byte of 1 still asks
/// for both.
pub const NOTIFY_MAP: u8 = 1 << 0;

/// Which records the notifier flag `byte` asks for: (MAP, UNMAP).
pub fn notified_kinds(byte: u8) -> (bool, bool) {
    (byte & NOTIFY_MAP != 0, byte != 0)
}

/// What a batch did that table readers must know (§16).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// A translation may have gone (UNMAP, DETACH, ATTACH, RESET, bypass
    /// turned off): readers' sections must end before the batch completes.
    pub removes: bool,
    /// An endpoint's domain or the global bypass changed: readers' states
    /// must be published again.
    pub moves: bool,
}

/// Collects the records of a batch of changes, applying each to the table.
#[derive(Debug)]
pub struct Batch<'a, S: TableStore> {
    table: Option<&'a mut TranslationTable<S>>,
    records: &'a mut Vec<Record>,
    effects: Effects,
}

impl<'a, S: TableStore> Batch<'a, S> {
    /// Start a batch; `records` is cleared (its capacity is reused).
    pub fn new(table: Option<&'a mut TranslationTable<S>>, records: &'a mut Vec<Record>) -> Self {
        records.clear();
        Self {
            table,
            records,
            effects: Effects::default(),
        }
    }

    /// What the batch's changes so far mean for table readers.
    pub fn effects(&self) -> Effects {
        self.effects
    }

    /// The records QEMU must apply, in order: MAP/UNMAP records of domains
    /// without notified endpoints are dropped here.
    ///
    /// Ordering (§11, "notifier flags"): the table writes of this batch
    /// happened before, QEMU sets a flag before it reads the table; with a
    /// full fence on both sides, either QEMU's read sees a change, or the
    /// daemon sees the flag and sends the change's record (or both; QEMU
    /// applies records idempotently).
    ///
    /// `owned(ep)`: a table reader owns endpoint `ep`'s IOTLB (§16.4): its
    /// UNMAP-only (vhost) notifier byte asks for nothing, the reader
    /// handshake makes its UNMAPs strict.
    pub fn finish(self, flags: Option<&[AtomicU8]>, owned: impl Fn(u32) -> bool) -> &'a [Record] {
        let Some(table) = self.table else {
            return self.records;
        };
        if self
            .records
            .iter()
            .any(|r| matches!(r, Record::Map(_) | Record::Unmap(_)))
        {
            fence(Ordering::SeqCst);
            // (MAP, UNMAP) wanted by any endpoint of `domain`.
            let notified = |domain: u32| {
                let Some(f) = flags else {
                    return (false, false);
                };
                table
                    .endpoints(domain)
                    .iter()
                    .fold((false, false), |acc, &ep| {
                        let mut b = f.get(ep as usize).map_or(0, |b| b.load(Ordering::Relaxed));
                        if b & NOTIFY_MAP == 0 && b != 0 && owned(ep) {
                            b = 0;
                        }
                        let (map, unmap) = notified_kinds(b);
                        (acc.0 | map, acc.1 | unmap)
                    })
            };
            self.records.retain(|r| match *r {
                Record::Map(Map { domain, .. }) => notified(domain).0,
                Record::Unmap(Unmap { domain, .. }) => notified(domain).1,
                _ => true,
            });
        }
        self.records
    }
}

impl<S: TableStore> ChangeSink for Batch<'_, S> {
    fn change(&mut self, c: Change) {
        let mut record = super::record_of(&c);
        let (removes, moves) = match c {
            Change::Map(_) => (false, false),
            Change::Unmap(_) => (true, false),
            Change::GlobalBypass(on) => (!on, true),
            Change::Attach { .. } | Change::Detach { .. } | Change::Reset => (true, true),
        };
        self.effects.removes |= removes;
        self.effects.moves |= moves;
        if let Some(t) = self.table.as_mut() {
            match c {
                Change::Attach {
                    endpoint,
                    domain,
                    bypass,
                } => set_root(&mut record, t.attach(endpoint, domain, bypass)),
                Change::Detach { endpoint, domain } => t.detach(endpoint, domain),
                Change::Map(m) => t.map(&m),
                Change::Unmap(u) => t.unmap(&u),
                Change::GlobalBypass(_) => {}
                Change::Reset => t.reset(),
            }
        }
        self.records.push(record);
    }
}

/// An ATTACH record carries its domain's root (§5).
fn set_root(record: &mut Record, root: u32) {
    if let Record::Attach { root: r, .. } = record {
        *r = root;
    }
}

/// The records of a full-state dump for a QEMU that just connected (§6):
/// the device's replay, ATTACH records carrying the table's roots; MAP
/// records only when there is no table (QEMU walks the table itself).
pub fn dump<S: TableStore>(
    table: Option<&TranslationTable<S>>,
    replay: &[Change],
    out: &mut Vec<Record>,
) {
    for c in replay {
        let mut r = super::record_of(c);
        match (c, table) {
            (Change::Map(_) | Change::Unmap(_), Some(_)) => continue,
            (Change::Attach { domain, .. }, Some(t)) => set_root(&mut r, t.root(*domain)),
            _ => {}
        }
        out.push(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::table::memory_store;

    /// The records a batch keeps of an ATTACH of endpoints 8 (notifier
    /// flag `a`) and 16 (`b`) to domain 1, then one MAP and one UNMAP.
    fn kept(a: u8, b: u8) -> Vec<Record> {
        kept_owned(a, b, u32::MAX)
    }

    /// The same, endpoint `owned` read by a table reader that owns its
    /// IOTLB.
    fn kept_owned(a: u8, b: u8, owned: u32) -> Vec<Record> {
        let mut table = TranslationTable::new(memory_store(64), 3);
        let flags: Vec<AtomicU8> = (0..32).map(|_| AtomicU8::new(0)).collect();
        flags[8].store(a, Ordering::Relaxed);
        flags[16].store(b, Ordering::Relaxed);
        let mut records = Vec::new();
        let mut batch = Batch::new(Some(&mut table), &mut records);
        for endpoint in [8, 16] {
            batch.change(Change::Attach {
                endpoint,
                domain: 1,
                bypass: false,
            });
        }
        let map = Map {
            domain: 1,
            virt_start: 0x1000,
            virt_end: 0x1fff,
            phys_start: 0x8000,
            flags: 3,
        };
        batch.change(Change::Map(map));
        batch.change(Change::Unmap(map.undo()));
        batch.finish(Some(&flags), |ep| ep == owned).to_vec()
    }

    fn ops(records: &[Record]) -> Vec<&'static str> {
        records
            .iter()
            .map(|r| match r {
                Record::Attach { .. } => "attach",
                Record::Map(_) => "map",
                Record::Unmap(_) => "unmap",
                _ => "other",
            })
            .collect()
    }

    #[test]
    fn records_go_to_the_kinds_of_notifiers_an_endpoint_has() {
        // No notifiers: the table is enough.
        assert_eq!(ops(&kept(0, 0)), ["attach", "attach"]);
        // vhost (UNMAP only, 2.5): the MAP costs no record, the UNMAP does.
        assert_eq!(ops(&kept(2, 0)), ["attach", "attach", "unmap"]);
        // VFIO (MAP | UNMAP), or a QEMU before 2.5 (1: every kind).
        for all in [3, 1] {
            assert_eq!(ops(&kept(all, 0)), ["attach", "attach", "map", "unmap"]);
        }
        // One endpoint of the domain needing MAP is enough.
        assert_eq!(ops(&kept(2, 3)), ["attach", "attach", "map", "unmap"]);
    }

    #[test]
    fn a_table_reader_owning_a_vhost_endpoint_takes_its_unmaps_off_the_mirror() {
        // Endpoint 8 is a vhost back-end reading the table: no UNMAP record.
        assert_eq!(ops(&kept_owned(2, 0, 8)), ["attach", "attach"]);
        // Another vhost endpoint of the domain still needs them.
        assert_eq!(ops(&kept_owned(2, 2, 8)), ["attach", "attach", "unmap"]);
        // VFIO's notifiers are QEMU's: a reader cannot waive them.
        assert_eq!(
            ops(&kept_owned(3, 0, 8)),
            ["attach", "attach", "map", "unmap"]
        );
    }

    #[test]
    fn effects_say_what_readers_must_wait_for() {
        let mut table = TranslationTable::new(memory_store(64), 3);
        let mut records = Vec::new();
        let mut batch = Batch::new(Some(&mut table), &mut records);
        batch.change(Change::GlobalBypass(true));
        assert_eq!(
            batch.effects(),
            Effects {
                removes: false,
                moves: true
            }
        );
        let mut batch = Batch::new(
            None::<&mut TranslationTable<Box<[std::sync::atomic::AtomicU64]>>>,
            &mut records,
        );
        batch.change(Change::Map(Map {
            domain: 1,
            virt_start: 0,
            virt_end: 0xfff,
            phys_start: 0,
            flags: 1,
        }));
        assert_eq!(batch.effects(), Effects::default());
        batch.change(Change::Unmap(Unmap {
            domain: 1,
            virt_start: 0,
            virt_end: 0xfff,
        }));
        assert!(batch.effects().removes && !batch.effects().moves);
    }

    #[test]
    fn a_byte_asks_for_unmap_whenever_it_is_set() {
        assert_eq!(notified_kinds(0), (false, false));
        assert_eq!(notified_kinds(1), (true, true));
        assert_eq!(notified_kinds(2), (false, true));
        assert_eq!(notified_kinds(3), (true, true));
    }
}
