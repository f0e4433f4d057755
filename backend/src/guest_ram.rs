// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest RAM as the device model sees it: guest physical ranges turned into
//! the daemon's own addresses of that memory.
//!
//! The front-end shares guest RAM with `VHOST_USER_SET_MEM_TABLE`; the daemon
//! maps each region. A virtio-iommu MAP names guest physical memory
//! (`phys_start`), and what an IOAS maps is process memory, so every MAP is
//! translated here, once, and refused unless the whole range lies inside one
//! region.
//!
//! Before a table is used, [`check_table`] makes sure touching it cannot
//! kill the daemon: a page of a shared file mapping past the end of the file
//! raises SIGBUS in whoever touches it, so every region must lie inside its
//! file, and the file must be unable to shrink later (`F_SEAL_SHRINK`).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Guest memory as the daemon maps it: with a dirty log for migration
/// ([`crate::dirty_log`]).
pub type GuestMem = GuestMemoryMmap<crate::dirty_log::DirtyLog>;

/// Which memory files the daemon accepts from a front-end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MemoryFiles {
    /// Only files sealed against shrinking (QEMU's `memory-backend-memfd`,
    /// whose `seal` is on by default): nothing the front-end does to its
    /// memory afterwards can make the daemon's mapping fault.
    #[default]
    SealedOnly,
    /// Also files that can shrink (`memory-backend-file` on hugetlbfs or
    /// `/dev/shm`, which cannot be sealed): their size is checked when the
    /// table arrives, but a front-end that shrinks one later kills the
    /// daemon with SIGBUS. For trusted front-ends only.
    AllowUnsealed,
}

/// Why a front-end's memory table is refused. Each names the region (its
/// index in the table and its guest-physical range).
#[derive(Debug, thiserror::Error)]
pub enum MemTableError {
    #[error("region {index} (guest {gpa:#x}, {len:#x} bytes) has no file behind it")]
    NoFile { index: usize, gpa: u64, len: u64 },
    #[error("region {index} (guest {gpa:#x}): cannot inspect its file: {source}")]
    Stat {
        index: usize,
        gpa: u64,
        source: io::Error,
    },
    #[error(
        "region {index} (guest {gpa:#x}): its file is not a regular file \
         (a memfd, or a file on tmpfs or hugetlbfs), so its size cannot be checked"
    )]
    NotRegular { index: usize, gpa: u64 },
    #[error("region {index} (guest {gpa:#x}) is empty")]
    Empty { index: usize, gpa: u64 },
    #[error(
        "region {index} (guest {gpa:#x}, {len:#x} bytes at file offset {offset:#x}) reaches \
         past the end of its file ({file_size:#x} bytes): touching it would kill the daemon \
         with SIGBUS"
    )]
    PastEnd {
        index: usize,
        gpa: u64,
        len: u64,
        offset: u64,
        file_size: u64,
    },
    #[error(
        "region {index} (guest {gpa:#x}): its memory file is not sealed against shrinking \
         (F_SEAL_SHRINK), so the front-end could cut it short under the daemon and kill it \
         with SIGBUS; give QEMU its RAM as -object memory-backend-memfd,share=on (seal=on, \
         the default), or start the daemon with --allow-unsealed-memory if the front-end \
         is trusted"
    )]
    Unsealed { index: usize, gpa: u64 },
}

/// What [`check_region`] found out about an acceptable region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionFile {
    /// The file cannot shrink: the region stays valid whatever the
    /// front-end does.
    Sealed,
    /// The file can shrink (accepted under [`MemoryFiles::AllowUnsealed`]).
    Unsealed,
}

/// Check one region of a memory table: `len` bytes at `offset` of `file`,
/// mapped at guest physical `gpa`, entry `index` of the table.
pub fn check_region(
    index: usize,
    gpa: u64,
    file: &File,
    offset: u64,
    len: u64,
    accept: MemoryFiles,
) -> Result<RegionFile, MemTableError> {
    let meta = file
        .metadata()
        .map_err(|source| MemTableError::Stat { index, gpa, source })?;
    if !meta.file_type().is_file() {
        return Err(MemTableError::NotRegular { index, gpa });
    }
    if len == 0 {
        return Err(MemTableError::Empty { index, gpa });
    }
    let file_size = meta.len();
    if offset.checked_add(len).is_none_or(|end| end > file_size) {
        return Err(MemTableError::PastEnd {
            index,
            gpa,
            len,
            offset,
            file_size,
        });
    }
    if shrink_sealed(file) {
        return Ok(RegionFile::Sealed);
    }
    match accept {
        MemoryFiles::SealedOnly => Err(MemTableError::Unsealed { index, gpa }),
        MemoryFiles::AllowUnsealed => Ok(RegionFile::Unsealed),
    }
}

/// Whether `file` carries `F_SEAL_SHRINK`. Seals cannot be removed, so a
/// sealed file keeps its size for good. Files that support no seals at all
/// (`EINVAL`: not shmem or hugetlbfs) are not sealed.
pub(crate) fn shrink_sealed(file: &impl AsRawFd) -> bool {
    // SAFETY: F_GET_SEALS only reads the seals of an open descriptor that
    // `file` keeps alive; no memory is passed.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    seals >= 0 && seals & libc::F_SEAL_SHRINK != 0
}

/// Check every region of a memory table the front-end sent (see
/// [`check_region`]); on success, the regions whose files can shrink (only
/// under [`MemoryFiles::AllowUnsealed`]).
pub fn check_table(mem: &GuestMem, accept: MemoryFiles) -> Result<Vec<u64>, MemTableError> {
    let mut unsealed = Vec::new();
    for (index, region) in mem.iter().enumerate() {
        let gpa = region.start_addr().raw_value();
        let len = region.len();
        let Some(fo) = region.file_offset() else {
            return Err(MemTableError::NoFile { index, gpa, len });
        };
        if check_region(index, gpa, fo.file(), fo.start(), len, accept)? == RegionFile::Unsealed {
            unsealed.push(gpa);
        }
    }
    Ok(unsealed)
}

/// A snapshot of the guest memory table.
#[derive(Debug)]
pub struct GuestRamView<'a> {
    mem: &'a GuestMem,
}

impl<'a> GuestRamView<'a> {
    /// View the regions of `mem`.
    pub fn new(mem: &'a GuestMem) -> Self {
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

/// Guest RAM as a pin would find it ([`iopt::Backing`]): the daemon's
/// mappings of the front-end's memory regions, read-write. An immutable
/// snapshot, made when the memory table changes and handed to the model
/// ([`iopt::model::ModelIommufd::set_backing`]): a MAP asks it without a
/// lock.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RamBacking {
    /// `[start, end)` of each region's mapping, sorted.
    regions: Vec<(u64, u64)>,
}

impl RamBacking {
    /// The regions of `ram`.
    pub fn of(ram: &impl virtio_iommu::GuestRam) -> Self {
        let mut regions = Vec::new();
        ram.for_each_region(&mut |r| {
            if let Some(end) = r.user_va.checked_add(r.len) {
                regions.push((r.user_va, end));
            }
        });
        regions.sort_unstable();
        Self { regions }
    }
}

impl iopt::Backing for RamBacking {
    /// Backed if the range lies in the mappings, across regions that touch.
    fn pinnable(&self, start: u64, length: u64, _write: bool) -> bool {
        let Some(end) = start.checked_add(length) else {
            return false;
        };
        let first = self.regions.partition_point(|&(_, e)| e <= start);
        let mut reached = start;
        for &(s, e) in &self.regions[first..] {
            if s > reached {
                return false;
            }
            reached = reached.max(e);
            if reached >= end {
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_backing_covers_its_regions_and_regions_that_touch_only() {
        use iopt::Backing;
        let b = RamBacking {
            regions: vec![(0x1000, 0x3000), (0x3000, 0x4000), (0x8000, 0x9000)],
        };
        assert!(
            b.pinnable(0x1000, 0x3000, true),
            "across two touching regions"
        );
        assert!(b.pinnable(0x8000, 0x1000, true));
        assert!(!b.pinnable(0x3000, 0x2000, true), "into the hole");
        assert!(!b.pinnable(0x0, 0x2000, false), "before the first");
        assert!(!b.pinnable(0x8800, 0x1000, false), "past the last");
        assert!(!b.pinnable(u64::MAX - 0xfff, 0x2000, false));
        assert!(!RamBacking::default().pinnable(0x1000, 0x1000, false));
    }
    use virtio_iommu::GuestRam;

    fn two_regions() -> GuestMem {
        GuestMem::from_ranges(&[
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

    fn memfd(size: u64, seals: libc::c_int) -> File {
        use std::os::fd::{FromRawFd, OwnedFd};
        // SAFETY: a NUL-terminated name, not retained; the result is checked.
        let fd = unsafe { libc::memfd_create(c"ram".as_ptr(), libc::MFD_ALLOW_SEALING) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor owned by nobody else.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(size).unwrap();
        // SAFETY: fcntl with integer arguments on an open descriptor.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) }, 0);
        file
    }

    const SHRINK: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;

    #[test]
    fn a_region_inside_a_sealed_file_is_accepted() {
        let f = memfd(0x10000, SHRINK);
        let strict = MemoryFiles::SealedOnly;
        assert_eq!(
            check_region(0, 0, &f, 0, 0x10000, strict).unwrap(),
            RegionFile::Sealed
        );
        assert_eq!(
            check_region(0, 0, &f, 0xf000, 0x1000, strict).unwrap(),
            RegionFile::Sealed
        );
    }

    #[test]
    fn a_region_reaching_past_the_end_of_its_file_is_refused() {
        let f = memfd(0x10000, SHRINK);
        for accept in [MemoryFiles::SealedOnly, MemoryFiles::AllowUnsealed] {
            for (offset, len) in [
                (0, 0x10001),
                (0x1000, 0x10000),
                (0x10000, 0x1000),
                (u64::MAX, 2),
            ] {
                let e = check_region(3, 0x4000, &f, offset, len, accept).unwrap_err();
                assert!(matches!(e, MemTableError::PastEnd { index: 3, .. }), "{e}");
                assert!(e.to_string().contains("past the end of its file"));
            }
            let e = check_region(0, 0, &f, 0, 0, accept).unwrap_err();
            assert!(matches!(e, MemTableError::Empty { .. }), "{e}");
        }
    }

    #[test]
    fn a_file_that_can_shrink_is_refused_unless_allowed() {
        let f = memfd(0x10000, 0);
        let e = check_region(1, 0x1000, &f, 0, 0x10000, MemoryFiles::SealedOnly).unwrap_err();
        assert!(matches!(
            e,
            MemTableError::Unsealed {
                index: 1,
                gpa: 0x1000
            }
        ));
        let text = e.to_string();
        assert!(text.contains("F_SEAL_SHRINK") && text.contains("memory-backend-memfd"));
        assert_eq!(
            check_region(1, 0x1000, &f, 0, 0x10000, MemoryFiles::AllowUnsealed).unwrap(),
            RegionFile::Unsealed
        );
        // Sealed against growing only: it can still shrink.
        let g = memfd(0x10000, libc::F_SEAL_GROW);
        assert!(check_region(0, 0, &g, 0, 0x1000, MemoryFiles::SealedOnly).is_err());
    }

    #[test]
    fn a_file_that_is_not_a_regular_file_is_refused() {
        let dir = File::open("/").unwrap();
        let e = check_region(0, 0, &dir, 0, 0x1000, MemoryFiles::AllowUnsealed).unwrap_err();
        assert!(matches!(e, MemTableError::NotRegular { .. }), "{e}");
    }

    #[test]
    fn a_table_is_checked_region_by_region() {
        use std::sync::Arc;
        use vm_memory::FileOffset;
        let f = Arc::new(memfd(0x20000, SHRINK));
        let table = |second_len: usize| {
            GuestMem::from_ranges_with_files([
                (
                    GuestAddress(0),
                    0x10000,
                    Some(FileOffset::from_arc(f.clone(), 0)),
                ),
                (
                    GuestAddress(1 << 32),
                    second_len,
                    Some(FileOffset::from_arc(f.clone(), 0x10000)),
                ),
            ])
            .unwrap()
        };
        assert_eq!(
            check_table(&table(0x10000), MemoryFiles::SealedOnly).unwrap(),
            Vec::<u64>::new()
        );
        let e = check_table(&table(0x11000), MemoryFiles::SealedOnly).unwrap_err();
        assert!(
            matches!(
                e,
                MemTableError::PastEnd {
                    index: 1,
                    gpa: 0x1_0000_0000,
                    ..
                }
            ),
            "{e}"
        );
        let anon = two_regions();
        assert!(matches!(
            check_table(&anon, MemoryFiles::AllowUnsealed),
            Err(MemTableError::NoFile { index: 0, .. })
        ));
    }
}
