// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A domain: its IOAS and the mappings the driver made in it, as the
//! virtio-iommu driver sees them (IOVA → guest physical address).

use std::collections::BTreeMap;

use iopt::IoasId;

use crate::map_unmap::Map;

/// One MAP the device holds: the request as the driver made it (virtio 1.3
/// §5.13.6.5), and where it went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub map: Map,
    /// Whether the mapping is also an area of the domain's IOAS (mappings
    /// without READ or WRITE, e.g. MMIO-only, are not).
    pub in_ioas: bool,
}

/// A domain (virtio 1.2 §5.13.6.3): created by the first ATTACH, gone with
/// its last endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Domain {
    /// The IOAS behind it; `None` for a bypass (identity) domain.
    pub ioas: Option<IoasId>,
    /// Number of endpoints attached.
    pub endpoints: u32,
    mappings: BTreeMap<u64, Mapping>,
}

impl Domain {
    /// A translating domain over `ioas`.
    pub fn translated(ioas: IoasId) -> Self {
        Self {
            ioas: Some(ioas),
            endpoints: 0,
            mappings: BTreeMap::new(),
        }
    }

    /// A bypass domain (`VIRTIO_IOMMU_ATTACH_F_BYPASS`).
    pub fn bypass() -> Self {
        Self {
            ioas: None,
            endpoints: 0,
            mappings: BTreeMap::new(),
        }
    }

    /// Whether this is a bypass domain.
    pub fn is_bypass(&self) -> bool {
        self.ioas.is_none()
    }

    /// The mappings, in IOVA order.
    pub fn mappings(&self) -> impl Iterator<Item = &Mapping> + '_ {
        self.mappings.values()
    }

    /// The mappings, for updating what is not their key (`in_ioas`).
    pub(crate) fn mappings_mut(&mut self) -> impl Iterator<Item = &mut Mapping> + '_ {
        self.mappings.values_mut()
    }

    /// The mappings that end at or after `iova`, in IOVA order: the one
    /// holding `iova` first, if any (a page of them is copied out under the
    /// caller's lock: each step is one tree step).
    pub fn mappings_from(&self, iova: u64) -> impl Iterator<Item = &Mapping> + '_ {
        // A mapping starting at `iova` holds it; those starting before and
        // holding it are the one `lookup` finds: none is counted twice.
        let after = iova.checked_add(1).map(|next| self.mappings.range(next..));
        self.lookup(iova)
            .into_iter()
            .chain(after.into_iter().flatten().map(|(_, m)| m))
    }

    /// Number of mappings.
    pub fn mapping_count(&self) -> usize {
        self.mappings.len()
    }

    /// The mapping holding `iova`.
    pub fn lookup(&self, iova: u64) -> Option<&Mapping> {
        self.mappings
            .range(..=iova)
            .next_back()
            .map(|(_, m)| m)
            .filter(|m| m.map.virt_end >= iova)
    }

    /// Whether any mapping touches `[start, end]`.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        self.lookup(start).is_some() || self.mappings.range(start..=end).next().is_some()
    }

    /// Record a mapping (the caller checked it does not overlap).
    pub fn insert(&mut self, m: Mapping) {
        self.mappings.insert(m.map.virt_start, m);
    }

    /// Whether an UNMAP of `[start, end]` would split a mapping: one that
    /// straddles a boundary of the range (virtio 1.2 §5.13.6.6: the device
    /// fails the whole request with RANGE then). Allocates nothing.
    pub fn unmap_would_split(&self, start: u64, end: u64) -> bool {
        self.lookup(start).is_some_and(|m| m.map.virt_start < start)
            || self
                .mappings
                .range(start..=end)
                .next_back()
                .is_some_and(|(_, m)| m.map.virt_end > end)
    }

    /// Remove the first mapping that starts inside `[start, end]` (an UNMAP
    /// takes them one by one, after [`Domain::unmap_would_split`]).
    pub fn pop_in(&mut self, start: u64, end: u64) -> Option<Mapping> {
        let first = *self.mappings.range(start..=end).next()?.0;
        self.mappings.remove(&first)
    }

    /// Remove the mapping starting at `virt_start`.
    pub fn remove(&mut self, virt_start: u64) -> Option<Mapping> {
        self.mappings.remove(&virt_start)
    }

    /// Remove every mapping.
    pub fn clear(&mut self) {
        self.mappings.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(virt_start: u64, virt_end: u64) -> Mapping {
        Mapping {
            map: Map {
                domain: 1,
                virt_start,
                virt_end,
                phys_start: 0,
                flags: 1,
            },
            in_ioas: true,
        }
    }

    fn domain() -> Domain {
        let mut d = Domain::translated(IoasId(1));
        d.insert(m(0x1000, 0x1fff));
        d.insert(m(0x3000, 0x4fff));
        d
    }

    #[test]
    fn lookup_finds_the_mapping_holding_an_iova() {
        let d = domain();
        assert_eq!(d.lookup(0x4abc).map(|m| m.map.virt_start), Some(0x3000));
        assert!(d.lookup(0x2000).is_none());
        assert!(d.lookup(0x5000).is_none());
    }

    #[test]
    fn mappings_from_an_iova_start_with_the_one_holding_it() {
        let d = domain();
        let starts = |iova| {
            d.mappings_from(iova)
                .map(|m| m.map.virt_start)
                .collect::<Vec<_>>()
        };
        assert_eq!(starts(0), [0x1000, 0x3000]);
        assert_eq!(starts(0x1000), [0x1000, 0x3000]);
        assert_eq!(starts(0x1fff), [0x1000, 0x3000]);
        assert_eq!(starts(0x2000), [0x3000]);
        assert_eq!(starts(0x4fff), [0x3000]);
        assert_eq!(starts(0x5000), Vec::<u64>::new());
        assert_eq!(starts(u64::MAX), Vec::<u64>::new());
    }

    #[test]
    fn overlap_covers_partial_and_enclosing_ranges() {
        let d = domain();
        assert!(d.overlaps(0x0, 0x1000));
        assert!(d.overlaps(0x1fff, 0x2fff));
        assert!(d.overlaps(0x0, u64::MAX));
        assert!(!d.overlaps(0x2000, 0x2fff));
    }

    #[test]
    fn unmap_takes_whole_mappings_or_refuses_a_split() {
        let mut d = domain();
        assert_eq!(
            (
                d.unmap_would_split(0, u64::MAX),
                d.unmap_would_split(0x2000, 0x2fff)
            ),
            (false, false)
        );
        assert!(d.unmap_would_split(0x1800, 0x5000));
        assert!(d.unmap_would_split(0x0, 0x3fff));
        assert_eq!(d.pop_in(0x2000, 0x2fff), None);
        assert_eq!(
            d.pop_in(0, u64::MAX).map(|m| m.map.virt_start),
            Some(0x1000)
        );
        assert_eq!(
            d.pop_in(0, u64::MAX).map(|m| m.map.virt_start),
            Some(0x3000)
        );
        assert_eq!(d.pop_in(0, u64::MAX), None);
    }
}
