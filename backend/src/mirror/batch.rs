//! What one batch of device changes becomes on the mirror
//! (docs/mirror-protocol.md §5, §7, §11).
//!
//! Every change goes into the shared translation table at once; a change
//! becomes a record for QEMU only if QEMU needs to *act* on it:
//! attachments, bypass and resets always (QEMU switches address spaces and
//! fires notifiers), MAP and UNMAP only in domains where an endpoint has
//! IOMMU notifiers (VFIO, vhost): QEMU's `translate()` reads the table
//! itself, so for everything else a MAP or UNMAP is complete once written.

use std::sync::atomic::{fence, AtomicU8, Ordering};

use virtio_iommu::{Change, ChangeSink, Map, Unmap};

use super::proto::Record;
use super::table::{TableStore, TranslationTable};

/// The per-endpoint notifier flags QEMU writes (§11): byte `ep` is non-zero
/// while endpoint `ep`'s IOMMU memory region has notifiers.
pub const NOTIFIER_FLAGS_LEN: usize = 1 << 16;

/// Collects the records of a batch of changes, applying each to the table.
#[derive(Debug)]
pub struct Batch<'a, S: TableStore> {
    table: Option<&'a mut TranslationTable<S>>,
    records: &'a mut Vec<Record>,
}

impl<'a, S: TableStore> Batch<'a, S> {
    /// Start a batch; `records` is cleared (its capacity is reused).
    pub fn new(table: Option<&'a mut TranslationTable<S>>, records: &'a mut Vec<Record>) -> Self {
        records.clear();
        Self { table, records }
    }

    /// The records QEMU must apply, in order: MAP/UNMAP records of domains
    /// without notified endpoints are dropped here.
    ///
    /// Ordering (§11, "notifier flags"): the table writes of this batch
    /// happened before, QEMU sets a flag before it reads the table; with a
    /// full fence on both sides, either QEMU's read sees a change, or the
    /// daemon sees the flag and sends the change's record (or both; QEMU
    /// applies records idempotently).
    pub fn finish(self, flags: Option<&[AtomicU8]>) -> &'a [Record] {
        let Some(table) = self.table else {
            return self.records;
        };
        if self
            .records
            .iter()
            .any(|r| matches!(r, Record::Map(_) | Record::Unmap(_)))
        {
            fence(Ordering::SeqCst);
            let notified = |domain: u32| {
                flags.is_some_and(|f| {
                    table.endpoints(domain).iter().any(|&ep| {
                        f.get(ep as usize)
                            .is_some_and(|b| b.load(Ordering::Relaxed) != 0)
                    })
                })
            };
            self.records.retain(|r| match *r {
                Record::Map(Map { domain, .. }) | Record::Unmap(Unmap { domain, .. }) => {
                    notified(domain)
                }
                _ => true,
            });
        }
        self.records
    }
}

impl<S: TableStore> ChangeSink for Batch<'_, S> {
    fn change(&mut self, c: Change) {
        let mut record = super::record_of(&c);
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
