// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest memory as the front-end shares it (`SET_MEM_TABLE`), and DMA at
//! IOVAs: every access is translated through the shared table in the
//! calling thread's section (table-reader), then bounds checked against
//! the guest's RAM regions. The back-end maps all of guest RAM; the table
//! decides which of it the guest lets the device use.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU16, Ordering};

use table_reader::Section;

/// Why an access was refused.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    #[error("IOVA {iova:#x}: {source}")]
    Translate {
        iova: u64,
        #[source]
        source: table_reader::Error,
    },
    #[error("guest-physical {gpa:#x}+{len:#x} is not in guest RAM")]
    NotRam { gpa: u64, len: u64 },
    #[error("IOVA {0:#x} is misaligned for a ring index")]
    Misaligned(u64),
    #[error("the translation of IOVA {0:#x} ended before the access did")]
    Short(u64),
}

/// One region of guest RAM, mapped here.
#[derive(Debug)]
struct Region {
    gpa: u64,
    len: u64,
    /// Where `gpa` is in this process.
    host: *mut u8,
    map: *mut libc::c_void,
    map_len: usize,
}

/// The guest's RAM regions.
#[derive(Debug, Default)]
pub struct GuestMemory {
    regions: Vec<Region>,
}

// SAFETY: the raw pointers are private mappings owned by this value and
// unmapped only in drop; the memory is shared with the guest and only
// accessed through the copies and atomics below.
unsafe impl Send for GuestMemory {}

impl GuestMemory {
    /// Map `(gpa, len, mmap_offset, file)` regions of the front-end's
    /// memory table.
    pub fn map(regions: Vec<(u64, u64, u64, File)>) -> std::io::Result<Self> {
        let mut m = Self::default();
        for (gpa, len, offset, file) in regions {
            let map_len =
                usize::try_from(len.checked_add(offset).ok_or_else(bad)?).map_err(|_| bad())?;
            if len == 0 || gpa.checked_add(len).is_none() {
                return Err(bad());
            }
            // SAFETY: a new shared mapping of the front-end's memory file;
            // the kernel picks the address. The guest changes this memory
            // concurrently: it is only read and written through raw copies
            // and atomics, never through references.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    map_len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    file.as_raw_fd(),
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            m.regions.push(Region {
                gpa,
                len,
                // SAFETY: `offset < map_len`, inside the mapping.
                host: unsafe { p.cast::<u8>().add(offset as usize) },
                map: p,
                map_len,
            });
        }
        Ok(m)
    }

    /// Where `[gpa, gpa + len)` is in this process, if it lies in one
    /// region.
    fn host(&self, gpa: u64, len: u64) -> Result<*mut u8, DmaError> {
        self.regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa - r.gpa < r.len && len <= r.len - (gpa - r.gpa))
            .map(|r| {
                // SAFETY: `gpa - r.gpa < r.len`: inside the region's mapping.
                unsafe { r.host.add((gpa - r.gpa) as usize) }
            })
            .ok_or(DmaError::NotRam { gpa, len })
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        for r in &self.regions {
            // SAFETY: unmapping exactly the mappings `map` made; nothing
            // refers into them past `self`.
            unsafe {
                libc::munmap(r.map, r.map_len);
            }
        }
    }
}

fn bad() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, "bad memory region")
}

/// DMA at IOVAs, translated in one section.
#[derive(Debug)]
pub struct Dma<'a> {
    pub section: &'a Section<'a>,
    pub mem: &'a GuestMemory,
    /// Translations found (for the figures).
    pub walks: u64,
}

impl<'a> Dma<'a> {
    pub fn new(section: &'a Section<'a>, mem: &'a GuestMemory) -> Self {
        Self {
            section,
            mem,
            walks: 0,
        }
    }

    /// The host address of the first stretch of `[iova, iova + len)` and
    /// its length.
    fn stretch(&mut self, iova: u64, len: u64, write: bool) -> Result<(*mut u8, u64), DmaError> {
        let seg = self
            .section
            .translate(iova, len, write)
            .map_err(|source| DmaError::Translate { iova, source })?;
        self.walks += 1;
        Ok((self.mem.host(seg.gpa, seg.len)?, seg.len))
    }

    /// Copy guest memory at `iova` into `buf`.
    pub fn read(&mut self, mut iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let mut done = 0;
        while done < buf.len() {
            let (p, n) = self.stretch(iova, (buf.len() - done) as u64, false)?;
            // SAFETY: `p` is `n` bytes of mapped guest RAM (checked by
            // `host`), `buf[done..done + n]` is ours; they cannot overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(p, buf[done..].as_mut_ptr(), n as usize);
            }
            done += n as usize;
            iova = iova.wrapping_add(n);
        }
        Ok(())
    }

    /// Copy `data` into guest memory at `iova`.
    pub fn write(&mut self, mut iova: u64, data: &[u8]) -> Result<(), DmaError> {
        let mut done = 0;
        while done < data.len() {
            let (p, n) = self.stretch(iova, (data.len() - done) as u64, true)?;
            // SAFETY: as in `read`, the other way.
            unsafe {
                std::ptr::copy_nonoverlapping(data[done..].as_ptr(), p, n as usize);
            }
            done += n as usize;
            iova = iova.wrapping_add(n);
        }
        Ok(())
    }

    /// A small object at `iova` that must not straddle a translation
    /// (ring fields: naturally aligned, so it never does).
    fn field(&mut self, iova: u64, len: u64, write: bool) -> Result<*mut u8, DmaError> {
        let (p, n) = self.stretch(iova, len, write)?;
        if n < len {
            return Err(DmaError::Short(iova));
        }
        Ok(p)
    }

    pub fn read_obj<const N: usize>(&mut self, iova: u64) -> Result<[u8; N], DmaError> {
        let mut b = [0u8; N];
        self.read(iova, &mut b)?;
        Ok(b)
    }

    /// A ring index the guest updates (acquire).
    pub fn load_u16(&mut self, iova: u64) -> Result<u16, DmaError> {
        let p = self.field(iova, 2, false)?;
        if !(p as usize).is_multiple_of(2) {
            return Err(DmaError::Misaligned(iova));
        }
        // SAFETY: two mapped, aligned bytes of guest RAM, accessed only
        // atomically here.
        Ok(unsafe { &*p.cast::<AtomicU16>() }.load(Ordering::Acquire))
    }

    /// A ring index the guest reads (release).
    pub fn store_u16(&mut self, iova: u64, v: u16) -> Result<(), DmaError> {
        let p = self.field(iova, 2, true)?;
        if !(p as usize).is_multiple_of(2) {
            return Err(DmaError::Misaligned(iova));
        }
        // SAFETY: as in `load_u16`.
        unsafe { &*p.cast::<AtomicU16>() }.store(v, Ordering::Release);
        Ok(())
    }
}
