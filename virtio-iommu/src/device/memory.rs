// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest RAM as the device sees it, and moves of the front-end's memory
//! table: an IOAS area holds this process's address of guest pages, so a
//! new table means new areas, in every domain's IOAS and in the identity
//! IOAS.

use iopt::{DeviceId, IoasId, Iommufd, IovaRange, MapRequest, Prot};

use super::{prot_of, Device};
use crate::wire::map_flags;

/// One region of guest RAM: `len` bytes at guest physical address `gpa`,
/// mapped at `user_va` in this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    pub gpa: u64,
    pub len: u64,
    pub user_va: u64,
}

/// Guest RAM as the device sees it. Every guest physical address a request
/// carries is validated here, once.
pub trait GuestRam {
    /// The process address of `[gpa, gpa + len)`, if the whole range lies
    /// inside one region of guest RAM.
    fn user_addr(&self, gpa: u64, len: u64) -> Option<u64>;

    /// Call `f` for every region.
    fn for_each_region(&self, f: &mut dyn FnMut(RamRegion));
}

/// No guest RAM: before the front-end's memory table, and after it left.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoRam;

impl GuestRam for NoRam {
    fn user_addr(&self, _gpa: u64, _len: u64) -> Option<u64> {
        None
    }

    fn for_each_region(&self, _f: &mut dyn FnMut(RamRegion)) {}
}

impl<F: Iommufd> Device<F> {
    /// The front-end's guest memory table changed, or went away ([`NoRam`]).
    ///
    /// IOAS areas hold this process's addresses of guest pages, and a kernel
    /// IOAS pins those pages: left alone, a device would keep reaching the
    /// old memory. So every area is unmapped first; then each mapping is
    /// mapped again at the new address of its guest pages (one whose pages
    /// are no longer guest RAM stays recorded, out of the IOAS, and faults),
    /// and the identity IOAS is rebuilt to map all of guest RAM 1:1, minus
    /// what the endpoints' devices reserve. Domains and mappings as the
    /// driver sees them do not change, so nothing is mirrored.
    pub fn set_memory(&mut self, ram: &impl GuestRam) {
        let Self {
            domains, iommufd, ..
        } = self;
        for (id, d) in domains.iter_mut() {
            let Some(ioas) = d.ioas else { continue };
            if d.mappings().any(|m| m.in_ioas) {
                if let Err(e) = iommufd.unmap(ioas, 0, u64::MAX) {
                    log::warn!("domain {id}: unmapping its IOAS: {e}");
                }
            }
            let mut lost = 0u64;
            for m in d.mappings_mut() {
                m.in_ioas = false;
                if m.map.flags & (map_flags::READ | map_flags::WRITE) == 0 {
                    continue;
                }
                let length = m.map.virt_end - m.map.virt_start + 1;
                let Some(user_va) = ram.user_addr(m.map.phys_start, length) else {
                    lost += u64::from(m.map.flags & map_flags::MMIO == 0);
                    continue;
                };
                let req = MapRequest {
                    iova: Some(m.map.virt_start),
                    user_va,
                    length,
                    prot: prot_of(m.map.flags),
                };
                match iommufd.map(ioas, req) {
                    Ok(_) => m.in_ioas = true,
                    Err(e) => {
                        log::warn!("domain {id}: remapping {:#x}: {e}", m.map.virt_start);
                        lost += 1;
                    }
                }
            }
            if lost > 0 {
                log::warn!("domain {id}: {lost} mappings point outside the new guest RAM");
            }
        }
        if let Some(identity) = self.identity {
            self.rebuild_identity(identity, ram);
        }
    }

    /// Map guest RAM 1:1 (IOVA = guest physical address) in the identity
    /// IOAS, clipped to the IOVA ranges every endpoint's device can use.
    pub(super) fn rebuild_identity(&mut self, identity: IoasId, ram: &impl GuestRam) {
        // Unmapping an empty IOAS fails with ENOENT: nothing to do then.
        let _ = self.iommufd.unmap(identity, 0, u64::MAX);
        let mut usable = vec![IovaRange {
            start: 0,
            last: u64::MAX,
        }];
        let devs: Vec<DeviceId> = self.endpoints.values().map(|e| e.dev).collect();
        for dev in devs {
            match self.iommufd.device_iova_ranges(dev) {
                Ok(r) => usable = intersect(&usable, &r),
                Err(e) => log::warn!("device {dev:?}: its usable IOVA ranges: {e}"),
            }
        }
        let mut regions = Vec::new();
        ram.for_each_region(&mut |r| regions.push(r));
        for r in regions.iter().filter(|r| r.len > 0) {
            let ram_range = [IovaRange {
                start: r.gpa,
                last: r.gpa.saturating_add(r.len - 1),
            }];
            for part in intersect(&ram_range, &usable) {
                let req = MapRequest {
                    iova: Some(part.start),
                    user_va: r.user_va + (part.start - r.gpa),
                    length: part.last - part.start + 1,
                    prot: Prot::RW,
                };
                if let Err(e) = self.iommufd.map(identity, req) {
                    log::warn!(
                        "identity IOAS: mapping guest RAM {:#x}-{:#x}: {e}",
                        part.start,
                        part.last
                    );
                }
            }
        }
    }
}

/// The parts of `a` that are also in `b` (both sorted, disjoint).
fn intersect(a: &[IovaRange], b: &[IovaRange]) -> Vec<IovaRange> {
    let mut out = Vec::new();
    for x in a {
        for y in b {
            let start = x.start.max(y.start);
            let last = x.last.min(y.last);
            if start <= last {
                out.push(IovaRange { start, last });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::test_support::{
        device, identity_device, run, MOVED_BASE, MOVED_RAM, RAM, RAM_AT_0, RW, USER_BASE,
    };
    use crate::wire::Status;
    use crate::Translation;
    use iopt::DeviceId;

    #[test]
    fn the_identity_ioas_leaves_out_what_the_devices_reserve() {
        let mut d = identity_device(true);
        d.set_memory(&MOVED_RAM);
        let identity = d.iommufd().attached_to(DeviceId(8)).unwrap();
        let areas: Vec<(u64, u64)> = d
            .iommufd()
            .iopt(identity)
            .unwrap()
            .areas()
            .map(|a| (a.iova, a.last))
            .collect();
        assert_eq!(
            areas,
            [
                (0, RAM - 1),
                (0xfec0_0000, 0xfedf_ffff),
                (0xfef0_0000, 0xfeff_ffff)
            ],
            "the MSI window 0xfee00000-0xfeefffff is not mapped"
        );
    }

    #[test]
    fn a_new_memory_table_moves_every_area_to_the_new_addresses() {
        let mut d = device();
        let mut r = run(&mut d);
        r.attach(1, 8, 0);
        assert_eq!(r.map(1, 0x10_0000, 0x10_3fff, 0x2000, RW), Status::Ok);
        assert_eq!(
            r.map(1, 0x20_0000, 0x20_0fff, 0x1_0000_0000, RW | map_flags::MMIO),
            Status::Ok
        );
        d.set_memory(&MOVED_RAM);
        let ioas = d.domain(1).unwrap().ioas.unwrap();
        let area = *d.iommufd().iopt(ioas).unwrap().area_at(0x10_0000).unwrap();
        assert_eq!(area.user_va, MOVED_BASE + 0x2000);
        assert_eq!(d.iommufd().iopt(ioas).unwrap().areas().count(), 1);

        // The memory goes away: no area is left pointing into it, but the
        // driver's mappings stand (and come back with memory).
        d.set_memory(&NoRam);
        assert_eq!(d.iommufd().iopt(ioas).unwrap().areas().count(), 0);
        assert_eq!(d.domain(1).unwrap().mapping_count(), 2);
        assert!(matches!(
            d.translate(8, 0x10_0000, true),
            Translation::Mapped { .. }
        ));
        d.set_memory(&RAM_AT_0);
        let area = *d.iommufd().iopt(ioas).unwrap().area_at(0x10_0000).unwrap();
        assert_eq!(area.user_va, USER_BASE + 0x2000);
    }
}
