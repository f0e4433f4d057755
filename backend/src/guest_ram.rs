//! Guest RAM as the device model sees it: guest physical ranges turned into
//! the daemon's own addresses of that memory.
//!
//! The front-end shares guest RAM with `VHOST_USER_SET_MEM_TABLE`; the daemon
//! maps each region. A virtio-iommu MAP names guest physical memory
//! (`phys_start`), and what an IOAS maps is process memory, so every MAP is
//! translated here, once, and refused unless the whole range lies inside one
//! region.

use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// A snapshot of the guest memory table.
#[derive(Debug)]
pub struct GuestRamView<'a> {
    mem: &'a GuestMemoryMmap,
}

impl<'a> GuestRamView<'a> {
    /// View the regions of `mem`.
    pub fn new(mem: &'a GuestMemoryMmap) -> Self {
        Self { mem }
    }
}

impl virtio_iommu::GuestRam for GuestRamView<'_> {
    fn user_addr(&self, gpa: u64, len: u64) -> Option<u64> {
        if len == 0 {
            return None;
        }
        let last = gpa.checked_add(len - 1)?;
        let region = self.mem.find_region(GuestAddress(gpa))?;
        let start = region.start_addr().raw_value();
        let region_last = start.checked_add(region.len() - 1)?;
        if last > region_last {
            return None;
        }
        let offset = gpa - start;
        // The region's mapping in this process; `offset` is inside it.
        let base = region.as_ptr() as u64;
        Some(base + offset)
    }

    fn for_each_region(&self, f: &mut dyn FnMut(virtio_iommu::RamRegion)) {
        for region in self.mem.iter() {
            f(virtio_iommu::RamRegion {
                gpa: region.start_addr().raw_value(),
                len: region.len(),
                user_va: region.as_ptr() as u64,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_iommu::GuestRam;

    fn two_regions() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x1_0000_0000), 0x10_0000),
        ])
        .unwrap()
    }

    #[test]
    fn a_range_inside_a_region_translates_to_its_mapping() {
        let mem = two_regions();
        let view = GuestRamView::new(&mem);
        let region = mem.find_region(GuestAddress(0x1_0000_0000)).unwrap();
        assert_eq!(
            view.user_addr(0x1_0000_1000, 0x1000),
            Some(region.as_ptr() as u64 + 0x1000)
        );
    }

    #[test]
    fn ranges_outside_or_across_regions_are_refused() {
        let mem = two_regions();
        let view = GuestRamView::new(&mem);
        assert_eq!(view.user_addr(0x10_0000, 0x1000), None);
        assert_eq!(view.user_addr(0xf_f000, 0x2000), None);
        assert_eq!(view.user_addr(0, 0), None);
        assert_eq!(view.user_addr(u64::MAX, 2), None);
    }
}
