// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! MAP and UNMAP: the mappings of a domain, as the driver sees them and as
//! areas of the domain's IOAS.

use iopt::{IoasId, Iommufd, MapRequest};

use super::{prot_of, status_of, Device, GuestRam};
use crate::change::{Change, ChangeSink};
use crate::domain::Mapping;
use crate::map_unmap::{Map, Unmap};
use crate::wire::{feature, map_flags, Status};

/// What MAP does when the guest memory of a mapping is not (yet) known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum MissingRam {
    /// A request: INVAL (unless MMIO).
    Refuse,
    /// A restored state: record it; [`Device::set_memory`] maps it later.
    Defer,
}

impl<F: Iommufd> Device<F> {
    /// MAP (virtio 1.2 §5.13.6.5) of `m` (whether it is an IOAS area is
    /// decided here):
    /// - unknown domain → NOENT; a bypass domain → INVAL;
    /// - unknown flags, or MMIO without the MMIO feature → INVAL;
    /// - `virt_start > virt_end` → INVAL; a physical range past 2^64 → RANGE;
    /// - `virt_start`, `virt_end + 1` or `phys_start` not aligned to the
    ///   page granule → RANGE; outside `input_range` → RANGE;
    /// - overlapping an existing mapping, or the MSI window (reserved,
    ///   §5.13.6.7: RESV_MEM MSI), → INVAL, nothing changes;
    /// - guest memory not entirely inside guest RAM → INVAL (the spec leaves
    ///   this to the device; a mapping of nothing would fault later) unless
    ///   the mapping is MMIO;
    /// - the IOAS refusing the area (e.g. the MSI window is reserved in it)
    ///   → the status of its error; nothing is recorded then.
    pub(super) fn map(
        &mut self,
        m: Map,
        ram: &impl GuestRam,
        missing: MissingRam,
        sink: &mut impl ChangeSink,
    ) -> Status {
        let (ioas, length) = match self.check_map(&m) {
            Ok(checked) => checked,
            Err(status) => return status,
        };
        let prot = prot_of(m.flags);
        let in_ioas = prot.read || prot.write;
        if in_ioas {
            let user_va = match ram.user_addr(m.phys_start, length) {
                Some(va) => va,
                None if m.flags & map_flags::MMIO != 0 || missing == MissingRam::Defer => {
                    return self.record_map(m, false, sink)
                }
                None => return Status::Inval,
            };
            let req = MapRequest {
                iova: Some(m.virt_start),
                user_va,
                length,
                prot,
            };
            if let Err(e) = self.iommufd.map(ioas, req) {
                return status_of(&e);
            }
        }
        self.record_map(m, in_ioas, sink)
    }

    /// The rules of [`Self::map`] that come before guest RAM and the IOAS,
    /// in their order: the domain's IOAS and the mapping's length, or the
    /// status.
    fn check_map(&self, m: &Map) -> Result<(IoasId, u64), Status> {
        let &Map {
            domain,
            virt_start,
            virt_end,
            phys_start,
            flags,
        } = m;
        let granule = 1u64 << self.cfg.page_size_mask.trailing_zeros();
        let mmio_ok = self.acked(feature::MMIO);
        let Some(d) = self.domains.get(&domain) else {
            return Err(Status::NoEnt);
        };
        let Some(ioas) = d.ioas else {
            return Err(Status::Inval);
        };
        if flags & !map_flags::MASK != 0 || (flags & map_flags::MMIO != 0 && !mmio_ok) {
            return Err(Status::Inval);
        }
        if virt_start > virt_end {
            return Err(Status::Inval);
        }
        let end_plus_one = virt_end.wrapping_add(1);
        if !virt_start.is_multiple_of(granule)
            || !end_plus_one.is_multiple_of(granule)
            || !phys_start.is_multiple_of(granule)
        {
            return Err(Status::Range);
        }
        let (lo, hi) = self.cfg.input_range;
        if virt_start < lo || virt_end > hi {
            return Err(Status::Range);
        }
        let Some(length) = (virt_end - virt_start).checked_add(1) else {
            return Err(Status::Range);
        };
        // A physical range past 2^64 exists nowhere (an MMIO mapping is not
        // checked against RAM, so it would get through otherwise).
        if phys_start.checked_add(length - 1).is_none() {
            return Err(Status::Range);
        }
        if d.overlaps(virt_start, virt_end) {
            return Err(Status::Inval);
        }
        // The MSI window PROBE reports is reserved whatever the flags: a
        // mapping the IOAS never sees (no access flag, or MMIO outside RAM)
        // must not claim it either.
        let (msi_start, msi_end) = self.cfg.msi_window;
        if virt_start <= msi_end && virt_end >= msi_start {
            return Err(Status::Inval);
        }
        Ok((ioas, length))
    }

    /// Record a mapping that passed [`Self::map`], and report it.
    fn record_map(&mut self, map: Map, in_ioas: bool, sink: &mut impl ChangeSink) -> Status {
        if let Some(d) = self.domains.get_mut(&map.domain) {
            d.insert(Mapping { map, in_ioas });
        }
        sink.change(Change::Map(map));
        Status::Ok
    }

    /// UNMAP (virtio 1.2 §5.13.6.6): unknown domain → NOENT; a bypass domain
    /// or `virt_start > virt_end` → INVAL; a mapping reaching outside the
    /// range would be split → RANGE and nothing is removed (checked before
    /// anything changes); removing nothing is OK.
    pub(super) fn unmap(&mut self, u: Unmap, sink: &mut impl ChangeSink) -> Status {
        let Some(d) = self.domains.get_mut(&u.domain) else {
            return Status::NoEnt;
        };
        let Some(ioas) = d.ioas else {
            return Status::Inval;
        };
        if u.virt_start > u.virt_end {
            return Status::Inval;
        }
        if d.unmap_would_split(u.virt_start, u.virt_end) {
            return Status::Range;
        }
        let mut status = Status::Ok;
        while let Some(Mapping { map: m, in_ioas }) = d.pop_in(u.virt_start, u.virt_end) {
            if in_ioas {
                let len = m.virt_end - m.virt_start + 1;
                if let Err(e) = self.iommufd.unmap(ioas, m.virt_start, len) {
                    log::warn!(
                        "domain {}: IOAS unmap {:#x}+{len:#x}: {e}",
                        m.domain,
                        m.virt_start
                    );
                    status = Status::DevErr;
                }
            }
            sink.change(Change::Unmap(m.undo()));
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::test_support::{device, device_with, run, RAM, READ, RW, USER_BASE};
    use crate::{DeviceConfig, Translation};
    use iopt::model::{MockDevice, ModelIommufd};
    use iopt::{DeviceId, IovaRange, Prot};

    #[test]
    fn map_lands_in_the_ioas_at_the_guest_pages_user_address() {
        let mut d = device();
        let mut r = run(&mut d);
        r.attach(1, 8, 0);
        assert_eq!(r.map(1, 0x10_0000, 0x10_3fff, 0x2000, RW), Status::Ok);
        let ioas = d.domain(1).unwrap().ioas.unwrap();
        let area = *d.iommufd().iopt(ioas).unwrap().area_at(0x10_1000).unwrap();
        assert_eq!((area.iova, area.last), (0x10_0000, 0x10_3fff));
        assert_eq!(area.user_va, USER_BASE + 0x2000);
        assert_eq!(area.prot, Prot::RW);
    }

    #[test]
    fn map_rules_give_the_spec_statuses_and_change_nothing() {
        let mut d = device_with(DeviceConfig {
            input_range: (0, 0xffff_ffff),
            ..Default::default()
        });
        let mut r = run(&mut d);
        assert_eq!(r.map(1, 0x1000, 0x1fff, 0, READ), Status::NoEnt);
        r.attach(1, 8, 0);
        r.changes.clear();
        assert_eq!(r.map(1, 0x1000, 0x1fff, 0, 0x10), Status::Inval);
        assert_eq!(r.map(1, 0x2000, 0x1fff, 0, READ), Status::Inval);
        assert_eq!(r.map(1, 0x1800, 0x27ff, 0, READ), Status::Range);
        assert_eq!(r.map(1, 0x1000, 0x17ff, 0, READ), Status::Range);
        assert_eq!(r.map(1, 0x1000, 0x1fff, 0x800, READ), Status::Range);
        assert_eq!(
            r.map(1, 0x1_0000_0000, 0x1_0000_0fff, 0, READ),
            Status::Range
        );
        assert_eq!(r.map(1, 0x1000, 0x1fff, RAM, READ), Status::Inval);
        // The MSI window is reserved in the IOAS.
        assert_eq!(r.map(1, 0xfee0_0000, 0xfee0_0fff, 0, READ), Status::Inval);
        assert!(r.changes.is_empty());
        assert_eq!(r.map(1, 0x1000, 0x2fff, 0, READ), Status::Ok);
        assert_eq!(r.map(1, 0x2000, 0x3fff, 0, READ), Status::Inval);
        assert_eq!(r.map(1, 0x0, 0x1fff, 0, READ), Status::Inval);
        assert_eq!(d.stats().mappings, 1);
    }

    #[test]
    fn the_msi_window_cannot_be_mapped_whatever_the_flags() {
        let mut d = device();
        assert_eq!(run(&mut d).attach(1, 8, 0), Status::Ok);
        let mut r = run(&mut d);
        let (msi, _) = DeviceConfig::default().msi_window;
        // As READ/WRITE already are: a mapping that records nothing in the
        // IOAS (no access flag, or MMIO outside RAM) must not claim it either.
        assert_eq!(r.map(1, msi, msi + 0xfff, 0, 0), Status::Inval);
        assert_eq!(
            r.map(1, msi, msi + 0xfff, 0x1_0000_0000, map_flags::MMIO),
            Status::Inval
        );
        assert_eq!(
            r.map(1, msi - 0x1000, msi + 0xfff, 0, map_flags::MMIO),
            Status::Inval,
            "straddling"
        );
        assert!(r.changes.is_empty());
        assert_eq!(d.stats().mappings, 0);
        // Next to it is fine.
        let mut r = run(&mut d);
        assert_eq!(r.map(1, msi - 0x1000, msi - 1, 0, 0), Status::Ok);
    }

    #[test]
    fn the_last_page_of_a_full_64_bit_input_range_can_be_mapped_and_unmapped() {
        // A device that can address all of it (as emulated mode's are).
        let mut model = ModelIommufd::new();
        let full = MockDevice {
            aperture: IovaRange {
                start: 0,
                last: u64::MAX,
            },
            ..MockDevice::x86()
        };
        model.add_device(DeviceId(8), full).unwrap();
        let cfg = DeviceConfig {
            input_range: (0, u64::MAX),
            ..DeviceConfig::default()
        };
        let mut d = Device::new(cfg, model, [(8, DeviceId(8))]).unwrap();
        d.set_acked_features(u64::MAX);
        let mut r = run(&mut d);
        assert_eq!(r.attach(1, 8, 0), Status::Ok);
        let last = u64::MAX - 0xfff;
        assert_eq!(r.map(1, last, u64::MAX, 0x1000, READ), Status::Ok);
        assert!(matches!(
            d.translate(8, u64::MAX, false),
            Translation::Mapped { gpa: 0x1fff, .. }
        ));
        let mut r = run(&mut d);
        assert_eq!(r.unmap(1, last, u64::MAX), Status::Ok);
        assert_eq!(d.stats().mappings, 0);
    }

    #[test]
    fn mmio_mappings_need_the_feature_and_may_point_outside_ram() {
        let mut d = device();
        d.set_acked_features(d.features() & !(1 << feature::MMIO));
        let mut r = run(&mut d);
        r.attach(1, 8, 0);
        let f = map_flags::MMIO | RW;
        assert_eq!(r.map(1, 0x1000, 0x1fff, 0xfe00_0000, f), Status::Inval);
        r.d.set_acked_features(u64::MAX);
        assert_eq!(r.map(1, 0x1000, 0x1fff, 0xfe00_0000, f), Status::Ok);
        // A physical range that wraps past 2^64 is refused.
        assert_eq!(r.map(1, 0x4000, 0x5fff, u64::MAX - 0xfff, f), Status::Range);
    }

    #[test]
    fn unmap_removes_whole_mappings_and_refuses_splits_atomically() {
        let mut d = device();
        let mut r = run(&mut d);
        r.attach(1, 8, 0);
        r.map(1, 0x1000, 0x1fff, 0, READ);
        r.map(1, 0x2000, 0x3fff, 0, READ);
        r.changes.clear();
        assert_eq!(r.unmap(1, 0x1000, 0x2fff), Status::Range);
        assert!(r.changes.is_empty());
        assert_eq!(r.d.stats().mappings, 2);
        assert_eq!(r.unmap(1, 0x0, 0xffff), Status::Ok);
        assert_eq!(r.changes.len(), 2);
        assert_eq!(
            r.unmap(1, 0x0, 0xffff),
            Status::Ok,
            "unmapping nothing is OK"
        );
        assert_eq!(r.unmap(2, 0x0, 0xffff), Status::NoEnt);
        let ioas = d.domain(1).unwrap().ioas.unwrap();
        assert_eq!(d.iommufd().iopt(ioas).unwrap().areas().count(), 0);
    }
}
