// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One MAP and one UNMAP, the same value from the parsed request through
//! the device, the change stream, the state and journal entries, to the
//! daemon's translation table and QEMU's mirror record. Conversions happen
//! only at the byte edges (`request::parse`, `entry`, the mirror's codec).

/// A MAP (virtio 1.3 §5.13.6.5): `[virt_start, virt_end]` of `domain` to
/// guest-physical `phys_start`, with `VIRTIO_IOMMU_MAP_F_*` `flags`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Map {
    pub domain: u32,
    pub virt_start: u64,
    /// Inclusive.
    pub virt_end: u64,
    pub phys_start: u64,
    pub flags: u32,
}

/// An UNMAP (virtio 1.3 §5.13.6.6): every mapping of `domain` inside
/// `[virt_start, virt_end]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Unmap {
    pub domain: u32,
    pub virt_start: u64,
    /// Inclusive.
    pub virt_end: u64,
}

impl Map {
    /// The UNMAP that removes exactly this mapping.
    pub fn undo(&self) -> Unmap {
        Unmap {
            domain: self.domain,
            virt_start: self.virt_start,
            virt_end: self.virt_end,
        }
    }
}

impl Unmap {
    /// Everything `domain` maps (a domain going away, §5.13.6.4).
    pub fn all(domain: u32) -> Self {
        Self {
            domain,
            virt_start: 0,
            virt_end: u64::MAX,
        }
    }

    /// Whether `[start, end]` lies inside the range.
    pub fn covers(&self, start: u64, end: u64) -> bool {
        start >= self.virt_start && end <= self.virt_end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_maps_undo_covers_it_and_nothing_past_it() {
        let m = Map {
            domain: 3,
            virt_start: 0x1000,
            virt_end: 0x1fff,
            phys_start: 0x8000,
            flags: 3,
        };
        let u = m.undo();
        assert_eq!((u.domain, u.virt_start, u.virt_end), (3, 0x1000, 0x1fff));
        assert!(u.covers(0x1000, 0x1fff));
        assert!(!u.covers(0x1000, 0x2000));
        assert!(Unmap::all(3).covers(0, u64::MAX));
    }
}
