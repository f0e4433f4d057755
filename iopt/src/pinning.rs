// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Which user memory the kernel could pin: the model's view of the process
//! memory an IOAS's areas point into.
//!
//! The kernel pins the pages of an area (`pfn_reader_user_pin` in Linux 6.12
//! `pages.c`, with `pin_user_pages_fast`) when a domain needs them: for every
//! area when the first device attaches to the IOAS (`iopt_fill_domain`), and
//! for a new area at `IOMMU_IOAS_MAP`/`COPY` time once a device is attached
//! (`iopt_fill_domains_pages`). A page that is not mapped, or mapped without
//! the access the pin asks for, fails the pin with `EFAULT` and the whole
//! operation is undone. Without a device nothing is pinned, so nothing is
//! checked.

use std::fmt::Debug;

use crate::PAGE_SIZE;

/// The process memory the model's areas point into, as a pin would find it.
///
/// The daemon answers from guest RAM (it only ever maps guest pages it
/// holds); the conformance suite answers from the memory it mapped.
pub trait Backing: Debug + Send + Sync {
    /// Whether every page of `[start, start + length)` (page-aligned, not
    /// empty) could be pinned: mapped, readable, and writeable too when
    /// `write` (`FOLL_WRITE`, which the kernel asks for when the memory was
    /// first mapped `IOMMU_IOAS_MAP_WRITEABLE`).
    fn pinnable(&self, start: u64, length: u64, write: bool) -> bool;
}

/// Memory that is always there: what the model assumed before it had a
/// notion of backing, and the default.
#[derive(Clone, Copy, Debug, Default)]
pub struct AllBacked;

impl Backing for AllBacked {
    fn pinnable(&self, _start: u64, _length: u64, _write: bool) -> bool {
        true
    }
}

/// The pages a pin of `length` bytes at `user_va` takes: the kernel's
/// `iopt_pages` covers whole pages (`pages->uptr` is `user_va` rounded down,
/// `npages` rounds the end up). `None` when that wraps (the uAPI refused such
/// a range before it got here).
pub fn pinned_pages(user_va: u64, length: u64) -> Option<(u64, u64)> {
    let start = user_va & !(PAGE_SIZE - 1);
    let end = user_va.checked_add(length)?.checked_add(PAGE_SIZE - 1)? & !(PAGE_SIZE - 1);
    Some((start, end - start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_takes_whole_pages() {
        assert_eq!(pinned_pages(0x1001, 1), Some((0x1000, PAGE_SIZE)));
        assert_eq!(pinned_pages(0x1fff, 2), Some((0x1000, 2 * PAGE_SIZE)));
        assert_eq!(pinned_pages(0x2000, PAGE_SIZE), Some((0x2000, PAGE_SIZE)));
        assert_eq!(pinned_pages(u64::MAX - 1, 1), None);
    }
}
