// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Dirty-page logging for migration (vhost-user `LOG_SHMFD` and
//! `SET_LOG_BASE`; QEMU refuses to migrate a vhost-user device whose
//! back-end cannot log). Every write the daemon makes to guest memory —
//! replies, used rings, fault events — marks its 4 KiB pages in the log QEMU
//! shares, once QEMU has handed one over.
//!
//! [`DirtyLog`] is the bitmap type of the daemon's guest memory. It is
//! lock-free on the request path: a write loads one pointer, and without a
//! log (no migration running) that is all it costs. (vhost-user-backend's own
//! `BitmapMmapRegion` takes an `RwLock` and clones an `Arc` per access.)

use std::io;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Arc, Mutex};

use vhost_user_backend::bitmap::{AtomicBitmapMmap, BitmapReplace, MemRegionBitmap, MmapLogReg};
use vm_memory::bitmap::{Bitmap, RefSlice, WithBitmapSlice};
use vm_memory::mmap::NewBitmap;
use vm_memory::{Address, GuestMemoryRegion};

/// The log page size of the vhost-user protocol.
const LOG_PAGE: usize = 0x1000;

/// One guest memory region's part of QEMU's log: bit `n` of the log is
/// guest page `n`.
#[derive(Debug)]
pub struct RegionLog {
    logmem: Arc<MmapLogReg>,
    /// The region's first page in the log.
    first_page: usize,
    /// Pages of the region.
    pages: usize,
}

impl MemRegionBitmap for RegionLog {
    fn new<R: GuestMemoryRegion>(region: &R, logmem: Arc<MmapLogReg>) -> io::Result<Self> {
        // vhost-user-backend's own log checks that the log covers the
        // region; its length is not public, so it answers for us.
        AtomicBitmapMmap::new(region, logmem.clone())?;
        let start = usize::try_from(region.start_addr().raw_value())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
        let len = usize::try_from(region.len())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
        Ok(Self {
            logmem,
            first_page: start / LOG_PAGE,
            pages: len / LOG_PAGE,
        })
    }
}

impl RegionLog {
    fn mark(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        let first = offset / LOG_PAGE;
        let last = offset.saturating_add(len - 1) / LOG_PAGE;
        for page in first..=last.min(self.pages.saturating_sub(1)) {
            // In bounds: `new` had the log checked to cover every page of
            // the region.
            let bit = self.first_page + page;
            self.logmem[bit / 8].fetch_or(1 << (bit % 8), Ordering::Relaxed);
        }
    }

    fn is_marked(&self, offset: usize) -> bool {
        let page = offset / LOG_PAGE;
        if page >= self.pages {
            return false;
        }
        let bit = self.first_page + page;
        self.logmem[bit / 8].load(Ordering::Relaxed) & (1 << (bit % 8)) != 0
    }
}

#[derive(Debug, Default)]
struct Slot {
    /// The log in use, or null. Points into `retired`'s boxes or to one
    /// leaked by `replace`; freed only when the slot goes.
    current: AtomicPtr<RegionLog>,
    /// Every log ever installed: readers may still hold an older one.
    retired: Mutex<Vec<*mut RegionLog>>,
}

// SAFETY: the raw pointers are owned boxes of `RegionLog`, which is Send and
// Sync (its log memory is accessed only through atomics); they are freed
// once, in `Drop`, when no reader can exist.
unsafe impl Send for Slot {}
// SAFETY: as above; `current` is an atomic and `retired` is behind a mutex.
unsafe impl Sync for Slot {}

impl Drop for Slot {
    fn drop(&mut self) {
        let retired = self.retired.get_mut().unwrap_or_else(|e| e.into_inner());
        for p in retired.drain(..) {
            // SAFETY: every pointer came from `Box::into_raw` in `replace`,
            // is in the list once, and nothing can read it any more.
            drop(unsafe { Box::from_raw(p) });
        }
    }
}

/// The dirty bitmap of one guest memory region (see the module doc).
#[derive(Clone, Debug, Default)]
pub struct DirtyLog {
    slot: Arc<Slot>,
}

impl DirtyLog {
    fn current(&self) -> Option<&RegionLog> {
        let p = self.slot.current.load(Ordering::Acquire);
        // SAFETY: a non-null pointer is a live box of `retired`, freed only
        // when the slot (which `self` keeps alive) is dropped.
        (!p.is_null()).then(|| unsafe { &*p })
    }
}

impl<'a> WithBitmapSlice<'a> for DirtyLog {
    type S = RefSlice<'a, Self>;
}

impl Bitmap for DirtyLog {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if let Some(log) = self.current() {
            log.mark(offset, len);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.current().is_some_and(|log| log.is_marked(offset))
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, Self> {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for DirtyLog {
    fn with_len(_len: usize) -> Self {
        Self::default()
    }
}

impl BitmapReplace for DirtyLog {
    type InnerBitmap = RegionLog;

    fn replace(&self, log: RegionLog) {
        let p = Box::into_raw(Box::new(log));
        let mut retired = self.slot.retired.lock().unwrap_or_else(|e| e.into_inner());
        retired.push(p);
        self.slot.current.store(p, Ordering::Release);
        drop(retired);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    // The log itself (an `MmapLogReg`) can only be made by vhost-user-backend
    // from SET_LOG_BASE: backend/tests/daemon.rs checks marking end to end.
    #[test]
    fn without_a_log_writes_mark_nothing() {
        let mem: GuestMemoryMmap<DirtyLog> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0x10_0000), 0x10_0000)]).unwrap();
        mem.write_slice(&[1; 16], GuestAddress(0x10_2000)).unwrap();
        let region = mem.iter().next().unwrap();
        assert!(!region.bitmap().dirty_at(0x2000));
    }
}
