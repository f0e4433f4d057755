// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest RAM: one memfd, mapped as one or more guest-physical regions.
//!
//! The memfd is what SET_MEM_TABLE hands to the daemon, so every region is a
//! `GuestRegionMmap` with a `FileOffset` into the same file. Region `i` lives
//! at file offset `sum(size of regions 0..i)`, which makes the daemon honour
//! `mmap_offset` (a single-region test would never notice if it ignored it).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

/// One guest-physical region: where it starts and how large it is (bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionSpec {
    /// Guest-physical start address (page aligned).
    pub gpa: u64,
    /// Size in bytes (page aligned, non-zero).
    pub size: u64,
}

impl RegionSpec {
    /// A region of `size` bytes at `gpa`.
    pub const fn new(gpa: u64, size: u64) -> Self {
        RegionSpec { gpa, size }
    }
}

/// Default guest RAM: 16 MiB at GPA 0 (the memfd is sparse, so size is cheap).
pub const DEFAULT_RAM: RegionSpec = RegionSpec::new(0, 16 << 20);

/// Errors from guest RAM set-up and access.
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    /// memfd_create/ftruncate/sealing failed.
    #[error("memfd: {0}")]
    Memfd(#[source] io::Error),
    /// The region list was rejected by vm-memory (overlap, overflow, ...).
    #[error("bad region layout: {0}")]
    Layout(String),
    /// A guest-physical access fell outside the guest RAM.
    #[error("guest memory access at {gpa:#x} (+{len}): {msg}")]
    Access {
        /// Start of the failed access.
        gpa: u64,
        /// Length of the failed access.
        len: usize,
        /// vm-memory's description.
        msg: String,
    },
    /// The bump allocator has no room left for the request.
    #[error("out of guest memory allocating {len} bytes (align {align})")]
    OutOfMemory {
        /// Requested size.
        len: u64,
        /// Requested alignment.
        align: u64,
    },
}

/// memfd-backed guest memory plus a bump allocator.
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemoryMmap,
    regions: Vec<RegionSpec>,
    file: Arc<File>,
    /// Next free GPA of each region.
    cursors: Mutex<Vec<u64>>,
}

fn memfd(name: &std::ffi::CStr, size: u64) -> io::Result<File> {
    // SAFETY: `name` is a valid NUL-terminated string; memfd_create does not
    // retain the pointer. The returned value is checked before use.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create, is open and owned by
    // nobody else.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size)?;
    // Sealed against resizing, as QEMU's memory-backend-memfd does by
    // default: the daemon refuses memory a front-end could shrink.
    // SAFETY: fcntl with integer arguments on the descriptor `file` owns.
    let sealed = unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        )
    };
    if sealed != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

impl GuestRam {
    /// Guest RAM with the given regions (sorted by GPA, non-overlapping).
    pub fn new(regions: &[RegionSpec]) -> Result<Self, RamError> {
        if regions.is_empty() {
            return Err(RamError::Layout("no regions".into()));
        }
        let total: u64 = regions.iter().map(|r| r.size).sum();
        let file = Arc::new(memfd(c"test-frontend-ram", total).map_err(RamError::Memfd)?);
        let mut ranges = Vec::with_capacity(regions.len());
        let mut off = 0u64;
        for r in regions {
            let size = usize::try_from(r.size).map_err(|e| RamError::Layout(e.to_string()))?;
            ranges.push((
                GuestAddress(r.gpa),
                size,
                Some(FileOffset::from_arc(file.clone(), off)),
            ));
            off += r.size;
        }
        let mem = GuestMemoryMmap::from_ranges_with_files(ranges)
            .map_err(|e| RamError::Layout(e.to_string()))?;
        Ok(GuestRam {
            mem,
            regions: regions.to_vec(),
            file,
            // Keep GPA 0 unused so a zeroed descriptor never looks valid.
            cursors: Mutex::new(regions.iter().map(|r| r.gpa.max(0x1000)).collect()),
        })
    }

    /// The default layout ([`DEFAULT_RAM`]).
    pub fn new_default() -> Result<Self, RamError> {
        Self::new(&[DEFAULT_RAM])
    }

    /// The vm-memory view of the guest RAM.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The region layout.
    pub fn regions(&self) -> &[RegionSpec] {
        &self.regions
    }

    /// The memfd backing all regions.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// True if `[gpa, gpa + len)` is entirely inside one region.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        self.regions.iter().any(|r| {
            gpa >= r.gpa
                && gpa
                    .checked_add(len)
                    .is_some_and(|end| end <= r.gpa + r.size)
        })
    }

    /// The region descriptions for SET_MEM_TABLE (fds borrowed from `self`).
    pub fn vhost_regions(&self) -> Vec<VhostUserMemoryRegionInfo> {
        self.mem
            .iter()
            .map(|r| {
                VhostUserMemoryRegionInfo::from_guest_region(r)
                    .expect("every region is file-backed")
            })
            .collect()
    }

    /// Bump-allocate `len` bytes aligned to `align` (a power of two) from the
    /// lowest region that still has room. Never freed.
    pub fn alloc(&self, len: u64, align: u64) -> Result<u64, RamError> {
        let mut cursors = self.cursors.lock().unwrap();
        for (i, r) in self.regions.iter().enumerate() {
            if let Some(gpa) = bump(cursors[i], len, align, *r) {
                cursors[i] = gpa + len;
                return Ok(gpa);
            }
        }
        Err(RamError::OutOfMemory { len, align })
    }

    /// Bump-allocate in region `region` only (e.g. to put buffers in the
    /// second region of a multi-region layout).
    pub fn alloc_in(&self, region: usize, len: u64, align: u64) -> Result<u64, RamError> {
        let mut cursors = self.cursors.lock().unwrap();
        let r = *self
            .regions
            .get(region)
            .ok_or(RamError::OutOfMemory { len, align })?;
        let gpa =
            bump(cursors[region], len, align, r).ok_or(RamError::OutOfMemory { len, align })?;
        cursors[region] = gpa + len;
        Ok(gpa)
    }

    /// Write `data` at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), RamError> {
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .map_err(|e| access(gpa, data.len(), e))
    }

    /// Read `buf.len()` bytes at `gpa`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), RamError> {
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|e| access(gpa, buf.len(), e))
    }

    /// Fill `[gpa, gpa + len)` with `byte`.
    pub fn fill(&self, gpa: u64, len: usize, byte: u8) -> Result<(), RamError> {
        let chunk = [byte; 256];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len());
            self.write(gpa + done as u64, &chunk[..n])?;
            done += n;
        }
        Ok(())
    }

    /// Little-endian u16 store.
    pub fn write_u16(&self, gpa: u64, v: u16) -> Result<(), RamError> {
        self.write(gpa, &v.to_le_bytes())
    }

    /// Little-endian u32 store.
    pub fn write_u32(&self, gpa: u64, v: u32) -> Result<(), RamError> {
        self.write(gpa, &v.to_le_bytes())
    }

    /// Little-endian u64 store.
    pub fn write_u64(&self, gpa: u64, v: u64) -> Result<(), RamError> {
        self.write(gpa, &v.to_le_bytes())
    }

    /// Little-endian u16 load.
    pub fn read_u16(&self, gpa: u64) -> Result<u16, RamError> {
        let mut b = [0; 2];
        self.read(gpa, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Little-endian u32 load.
    pub fn read_u32(&self, gpa: u64) -> Result<u32, RamError> {
        let mut b = [0; 4];
        self.read(gpa, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Little-endian u64 load.
    pub fn read_u64(&self, gpa: u64) -> Result<u64, RamError> {
        let mut b = [0; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// u16 store with release ordering (ring indices shared with the daemon).
    pub fn store_u16_release(&self, gpa: u64, v: u16) -> Result<(), RamError> {
        self.mem
            .store(u16::to_le(v), GuestAddress(gpa), Ordering::Release)
            .map_err(|e| access(gpa, 2, e))
    }

    /// u16 load with acquire ordering (ring indices shared with the daemon).
    pub fn load_u16_acquire(&self, gpa: u64) -> Result<u16, RamError> {
        self.mem
            .load::<u16>(GuestAddress(gpa), Ordering::Acquire)
            .map(u16::from_le)
            .map_err(|e| access(gpa, 2, e))
    }

    /// The guest RAM regions as (gpa, size) pairs, as vm-memory sees them.
    pub fn layout(&self) -> Vec<(u64, u64)> {
        self.mem
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect()
    }
}

fn bump(cursor: u64, len: u64, align: u64, r: RegionSpec) -> Option<u64> {
    debug_assert!(align.is_power_of_two());
    let gpa = cursor.checked_add(align - 1)? & !(align - 1);
    let end = gpa.checked_add(len)?;
    (end <= r.gpa + r.size).then_some(gpa)
}

fn access(gpa: u64, len: usize, e: vm_memory::GuestMemoryError) -> RamError {
    RamError::Access {
        gpa,
        len,
        msg: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_region_layout_and_alloc() {
        let ram = GuestRam::new(&[
            RegionSpec::new(0, 1 << 20),
            RegionSpec::new(4 << 30, 1 << 20),
        ])
        .unwrap();
        assert_eq!(ram.layout(), vec![(0, 1 << 20), (4 << 30, 1 << 20)]);
        let info = ram.vhost_regions();
        assert_eq!(info.len(), 2);
        assert_eq!(info[0].mmap_offset, 0);
        assert_eq!(info[1].mmap_offset, 1 << 20);
        assert_eq!(info[1].guest_phys_addr, 4 << 30);
        assert_eq!(info[0].mmap_handle, info[1].mmap_handle);

        let a = ram.alloc(100, 4096).unwrap();
        assert_eq!(a, 0x1000);
        let b = ram.alloc(8, 64).unwrap();
        assert_eq!(b, 0x1080);
        // Too big for region 0's remainder: spills into region 1.
        let c = ram.alloc((1 << 20) - 0x1000, 4096).unwrap();
        assert_eq!(c, 4 << 30);
        let d = ram.alloc_in(1, 16, 16).unwrap();
        assert!(ram.contains(d, 16) && d >= c + (1 << 20) - 0x1000);
        assert!(ram.alloc(1 << 20, 1).is_err());

        // Both regions are backed by the one memfd at their offsets.
        ram.write_u64(4 << 30, 0x1122_3344_5566_7788).unwrap();
        ram.write(0x2000, b"hello").unwrap();
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 8];
        ram.file().read_exact_at(&mut buf, 1 << 20).unwrap();
        assert_eq!(u64::from_le_bytes(buf), 0x1122_3344_5566_7788);
        ram.file().read_exact_at(&mut buf[..5], 0x2000).unwrap();
        assert_eq!(&buf[..5], b"hello");
        assert_eq!(ram.read_u64(4 << 30).unwrap(), 0x1122_3344_5566_7788);

        assert!(!ram.contains((1 << 20) - 4, 8));
        assert!(ram.write(2 << 20, &[1]).is_err());
    }
}
