// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The two files of a reader, mapped, and the sections a back-end thread
//! translates in (docs/mirror-protocol.md §16.2–§16.3).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::epoch::SlotGuard;
use crate::layout::{
    slot_word, EndpointState, Mode, MAX_LEVELS, PAGE_MAGIC, PAGE_SIZE, READER_PAGE_LEN, SLOTS,
    W_CHANGES, W_ENDPOINT, W_GEOMETRY, W_MAGIC, W_STATE,
};
use crate::walk::{translate, WalkError};
use crate::Error;

/// A shared mapping of a whole file, seen only through atomics.
#[derive(Debug)]
struct Mapping {
    ptr: NonNull<AtomicU64>,
    words: usize,
}

impl Mapping {
    /// Map all `len` bytes of `file` (a non-zero multiple of 8), shared,
    /// read-only or read-write.
    fn new(what: &'static str, file: &File, len: usize, write: bool) -> Result<Self, Error> {
        let prot = libc::PROT_READ | if write { libc::PROT_WRITE } else { 0 };
        // SAFETY: a new mapping of `len` bytes of an open file; the kernel
        // picks the address, so no existing memory is affected. The daemon
        // seals both files against shrinking (§16.1), so the mapping stays
        // backed; a file from elsewhere that shrank would fault on access,
        // which is why `Reader::new` checks the size first and the protocol
        // requires the seal.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::Map {
                what,
                errno: std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
            });
        }
        let ptr = NonNull::new(p.cast::<AtomicU64>()).ok_or(Error::Map { what, errno: 0 })?;
        Ok(Self {
            ptr,
            words: len / 8,
        })
    }

    fn words(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is `words * 8` bytes, page aligned (so aligned
        // for AtomicU64), lives as long as `self`, and is only ever accessed
        // through atomics here; another process writing it concurrently is
        // what atomics are for. A read-only mapping is only loaded from
        // (the table: `Reader` never stores to it).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.words) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made; the slices handed
        // out borrow `self`, so none outlives it.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.words * 8);
        }
    }
}

// SAFETY: the mappings are only accessed through atomics, which are Sync;
// the pointers stay valid until drop.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

/// A reader of the shared table for one endpoint: the table mapped
/// read-only, the reader page read-write.
#[derive(Debug)]
pub struct Reader {
    table: Mapping,
    page: Mapping,
    levels: u32,
    endpoint: u32,
}

/// A stretch of guest-physical memory an IOVA range starts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub gpa: u64,
    /// At most the length asked for; less where the range leaves its leaf
    /// (translate the rest with the next IOVA).
    pub len: u64,
}

/// An open section on one slot (§16.3): translations made through it may be
/// used until it is dropped, and no longer. The endpoint's state is the one
/// read at the start.
#[derive(Debug)]
pub struct Section<'a> {
    reader: &'a Reader,
    _guard: SlotGuard<'a>,
    state: EndpointState,
}

impl Reader {
    /// Map the daemon's two files (§16.1): `table` (read-only) and the
    /// reader page `page` (read-write), checking their sizes and the page's
    /// magic and geometry.
    pub fn new(table: &File, page: &File) -> Result<Self, Error> {
        let size = |f: &File| f.metadata().map(|m| m.len()).unwrap_or(0);
        let page_len = size(page);
        if page_len != READER_PAGE_LEN as u64 {
            return Err(Error::FileSize {
                what: "reader page",
                got: page_len,
                want: "4096",
            });
        }
        let table_len = size(table);
        if table_len < 2 * PAGE_SIZE || table_len % PAGE_SIZE != 0 || table_len > isize::MAX as u64
        {
            return Err(Error::FileSize {
                what: "table",
                got: table_len,
                want: "a multiple of 4096, at least 8192",
            });
        }
        let page = Mapping::new("reader page", page, READER_PAGE_LEN, true)?;
        let w = page.words();
        let magic = w[W_MAGIC].load(Ordering::Acquire);
        if magic != PAGE_MAGIC {
            return Err(Error::BadPage(magic));
        }
        let geometry = w[W_GEOMETRY].load(Ordering::Acquire);
        let (pages, levels) = (geometry & 0xffff_ffff, (geometry >> 32) & 0xff);
        if pages < 2 || pages * PAGE_SIZE > table_len || levels == 0 || levels > MAX_LEVELS.into() {
            return Err(Error::BadGeometry { pages, levels });
        }
        let endpoint = w[W_ENDPOINT].load(Ordering::Acquire) as u32;
        // Only the pages the daemon names are walked.
        let table = Mapping::new("table", table, (pages * PAGE_SIZE) as usize, false)?;
        Ok(Self {
            table,
            page,
            levels: levels as u32,
            endpoint,
        })
    }

    /// The endpoint the daemon serves this reader for.
    pub fn endpoint(&self) -> u32 {
        self.endpoint
    }

    /// The endpoint's state now (outside a section: for logs only).
    pub fn state(&self) -> EndpointState {
        EndpointState::decode(self.page.words()[W_STATE].load(Ordering::Acquire))
    }

    /// How many times the daemon changed the endpoint's state.
    pub fn changes(&self) -> u64 {
        self.page.words()[W_CHANGES].load(Ordering::Acquire)
    }

    /// Open a section on `slot` (each translating thread has its own, below
    /// [`SLOTS`]). Fails if the slot is in a section already, or if the
    /// daemon revoked this reader.
    pub fn section(&self, slot: usize) -> Result<Section<'_>, Error> {
        if slot >= SLOTS {
            return Err(Error::NoSlot(slot));
        }
        let guard =
            SlotGuard::enter(&self.page.words()[slot_word(slot)]).ok_or(Error::SlotBusy(slot))?;
        // After the guard's fence: the state, and the entries walked with
        // it, are at least as new as the daemon's last synchronize saw.
        let state = self.state();
        if state.revoked {
            return Err(Error::Revoked);
        }
        Ok(Section {
            reader: self,
            _guard: guard,
            state,
        })
    }
}

impl Section<'_> {
    /// What the endpoint's DMA goes through in this section.
    pub fn mode(&self) -> Mode {
        self.state.mode
    }

    /// The guest-physical start of the IOVA range `[iova, iova + len)` for
    /// an access that writes guest memory (`write`) or reads it, and how
    /// much of the range it covers.
    pub fn translate(&self, iova: u64, len: u64, write: bool) -> Result<Segment, Error> {
        match self.state.mode {
            Mode::Blocked => Err(Error::Blocked),
            Mode::Bypass => Ok(Segment { gpa: iova, len }),
            Mode::Translated { root } => {
                let leaf = translate(self.reader.table.words(), self.reader.levels, root, iova)?;
                if !(if write { leaf.write } else { leaf.read }) {
                    return Err(Error::Walk(WalkError::NotMapped { iova }));
                }
                Ok(Segment {
                    gpa: leaf.gpa,
                    len: len.min(leaf.len),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{slot_word, PTE_PRESENT, PTE_READ, PTE_TABLE, PTE_WRITE};
    use std::io::Write;

    /// A file of `len` bytes with `words` at their indexes (a temp file
    /// stands in for the daemon's memfd).
    fn file(len: usize, words: &[(usize, u64)]) -> File {
        let mut bytes = vec![0u8; len];
        for &(i, w) in words {
            bytes[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        let mut f = tempfile();
        f.write_all(&bytes).unwrap();
        f
    }

    fn tempfile() -> File {
        let dir = std::env::temp_dir();
        let path = dir.join(format!(
            "table-reader-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    const E: usize = 512;

    #[test]
    fn a_reader_translates_through_its_endpoints_tree_in_a_section() {
        // 2 levels, root page 1 → page 2; IOVA 0x3000 → 0x9000 RW.
        let table = file(
            4 * 4096,
            &[
                (E, 2 << 12 | PTE_TABLE | PTE_PRESENT),
                (2 * E + 3, 0x9000 | PTE_READ | PTE_WRITE | PTE_PRESENT),
                (2 * E + 4, 0xa000 | PTE_READ | PTE_PRESENT),
            ],
        );
        let state = EndpointState {
            mode: Mode::Translated { root: 1 },
            revoked: false,
        };
        let page = file(
            4096,
            &[
                (W_MAGIC, PAGE_MAGIC),
                (W_GEOMETRY, 4 | 2 << 32),
                (W_ENDPOINT, 0x20),
                (W_STATE, state.encode()),
            ],
        );
        let r = Reader::new(&table, &page).unwrap();
        assert_eq!(r.endpoint(), 0x20);
        {
            let s = r.section(0).unwrap();
            assert!(matches!(r.section(0), Err(Error::SlotBusy(0))));
            assert_eq!(
                s.translate(0x3ff0, 0x100, true),
                Ok(Segment {
                    gpa: 0x9ff0,
                    len: 0x10
                })
            );
            assert!(s.translate(0x4000, 8, false).is_ok());
            assert!(s.translate(0x4000, 8, true).is_err(), "read-only");
            assert!(s.translate(0x5000, 8, false).is_err());
            assert_eq!(r.page.words()[slot_word(0)].load(Ordering::Relaxed) & 1, 1);
        }
        assert_eq!(r.page.words()[slot_word(0)].load(Ordering::Relaxed), 2);
        assert!(matches!(r.section(SLOTS), Err(Error::NoSlot(_))));
        // The daemon revokes the reader: no section opens any more.
        r.page.words()[W_STATE].store(
            EndpointState {
                revoked: true,
                ..state
            }
            .encode(),
            Ordering::Release,
        );
        assert!(matches!(r.section(1), Err(Error::Revoked)));
    }

    #[test]
    fn files_of_the_wrong_size_or_geometry_are_refused() {
        let good_page =
            |geometry: u64| file(4096, &[(W_MAGIC, PAGE_MAGIC), (W_GEOMETRY, geometry)]);
        let table = file(4 * 4096, &[]);
        assert!(Reader::new(&table, &good_page(4 | 3 << 32)).is_ok());
        for geometry in [5 | 3 << 32, 4, 4 | 7 << 32, 1 | 3 << 32] {
            assert!(
                matches!(
                    Reader::new(&table, &good_page(geometry)),
                    Err(Error::BadGeometry { .. })
                ),
                "{geometry:#x}"
            );
        }
        assert!(matches!(
            Reader::new(&table, &file(4096, &[(W_MAGIC, 1)])),
            Err(Error::BadPage(1))
        ));
        assert!(matches!(
            Reader::new(&table, &file(8192, &[])),
            Err(Error::FileSize { .. })
        ));
        assert!(matches!(
            Reader::new(&file(4097, &[]), &good_page(1)),
            Err(Error::FileSize { .. })
        ));
    }
}
