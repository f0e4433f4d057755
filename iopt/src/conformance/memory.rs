// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The memory the cases map, and what a pin finds in it.
//!
//! The kernel pins what a case maps once a device is attached; the model
//! asks a [`Backing`]. [`SuiteMemory`] is that backing for the suite: every
//! address is pinnable but the pages a case protected in an [`Arena`] of
//! its own, so both sides see the same memory.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::{Backing, HPAGE_SIZE, PAGE_SIZE};

/// Real memory to map: page-aligned addresses at a 2 MiB-aligned base, so
/// cases control the alignment the IOVA allocator sees.
pub(super) struct Buffer {
    _mem: Vec<u8>,
    base: u64,
}

impl Buffer {
    pub(super) const LEN: u64 = 8 << 20;

    pub(super) fn new() -> Self {
        let mem = vec![0u8; (Self::LEN + HPAGE_SIZE) as usize];
        let addr = mem.as_ptr() as u64;
        let base = (addr + HPAGE_SIZE - 1) & !(HPAGE_SIZE - 1);
        Self { _mem: mem, base }
    }

    /// The user address `offset` bytes into the buffer.
    pub(super) fn at(&self, offset: u64) -> u64 {
        assert!(offset < Self::LEN);
        self.base + offset
    }
}

/// What a case leaves of some pages of an arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// `PROT_NONE`: no pin reaches them.
    None,
    /// `PROT_READ`: a pin for reading only (memory mapped without
    /// `IOMMU_IOAS_MAP_WRITEABLE`) reaches them.
    ReadOnly,
}

/// The suite's memory as a pin finds it, shared by the case and the
/// model's session.
#[derive(Debug, Default)]
pub struct SuiteMemory {
    /// `(start, length, access)` of the protected pages.
    protected: Mutex<Vec<(u64, u64, Access)>>,
}

impl SuiteMemory {
    fn protected(&self) -> MutexGuard<'_, Vec<(u64, u64, Access)>> {
        // A case that panicked holding the lock left a whole list behind.
        self.protected.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Backing for SuiteMemory {
    fn pinnable(&self, start: u64, length: u64, write: bool) -> bool {
        let end = start.saturating_add(length);
        !self
            .protected()
            .iter()
            .any(|&(s, l, a)| start < s + l && s < end && (a == Access::None || write))
    }
}

/// Anonymous memory mapped for one case, its tail protected; unmapped
/// (and forgotten by [`SuiteMemory`]) when dropped.
pub(super) struct Arena {
    addr: u64,
    len: u64,
    mem: Arc<SuiteMemory>,
}

impl Arena {
    /// `pages` pages, populated and writeable, the last `tail` of them left
    /// with `access`.
    pub(super) fn new(mem: &Arc<SuiteMemory>, pages: u64, tail: u64, access: Access) -> Self {
        assert!(tail <= pages && pages > 0);
        let len = pages * PAGE_SIZE;
        // SAFETY: a fresh private anonymous mapping at an address the
        // kernel chooses: it aliases nothing of this process.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED, "mmap of a case's arena");
        let arena = Self {
            addr: addr as u64,
            len,
            mem: mem.clone(),
        };
        if tail > 0 {
            let start = arena.addr + (pages - tail) * PAGE_SIZE;
            let prot = match access {
                Access::None => libc::PROT_NONE,
                Access::ReadOnly => libc::PROT_READ,
            };
            // SAFETY: the pages are this arena's own mapping, which no Rust
            // reference points into.
            let rc = unsafe { libc::mprotect(start as *mut _, (tail * PAGE_SIZE) as usize, prot) };
            assert_eq!(rc, 0, "mprotect of a case's arena");
            mem.protected().push((start, tail * PAGE_SIZE, access));
        }
        arena
    }

    /// The user address `offset` bytes into the arena.
    pub(super) fn at(&self, offset: u64) -> u64 {
        assert!(offset < self.len);
        self.addr + offset
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        let (addr, end) = (self.addr, self.addr + self.len);
        self.mem
            .protected()
            .retain(|&(s, _, _)| !(addr <= s && s < end));
        // SAFETY: the arena's own mapping, made in `new`; nothing refers to
        // it any more (the kernel's pins, if any, hold the pages themselves).
        unsafe { libc::munmap(addr as *mut _, self.len as usize) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protected_pages_refuse_pins_and_are_forgotten_with_their_arena() {
        let mem = Arc::new(SuiteMemory::default());
        let arena = Arena::new(&mem, 4, 1, Access::ReadOnly);
        let none = Arena::new(&mem, 2, 1, Access::None);
        let p = PAGE_SIZE;
        assert!(mem.pinnable(arena.at(0), 3 * p, true));
        assert!(mem.pinnable(arena.at(0), 4 * p, false));
        assert!(!mem.pinnable(arena.at(0), 4 * p, true));
        assert!(!mem.pinnable(none.at(p), p, false));
        drop(arena);
        drop(none);
        assert!(mem.protected().is_empty());
    }
}
