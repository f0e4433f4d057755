// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The io_pagetable: areas, allowed and reserved IOVA ranges, and the IOVA
//! allocator of one IOAS.
//!
//! This is the data structure of Linux `drivers/iommu/iommufd/io_pagetable.c`
//! and nothing else: it knows no object IDs and no uAPI structs (that is
//! [`crate::model`]). Every rule below names the kernel function whose
//! behaviour it reproduces; `unsigned long` is 64 bits, as on x86_64, so the
//! kernel's `ULONG_MAX` is `u64::MAX` here.

use std::collections::BTreeMap;

use crate::pinning::{pinned_pages, Backing};
use crate::{DeviceId, IoptError, IovaRange, Prot, Result, Thp, PAGE_SIZE};

/// A mapped area: `[iova, last]` translates to `user_va + (iova' - iova)`.
///
/// `struct iopt_area`. `writable_pages` is the writability of the memory the
/// area was made from (`iopt_pages::writable`): a `COPY` may only ask for
/// WRITE on memory first mapped writeable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Area {
    pub iova: u64,
    pub last: u64,
    pub user_va: u64,
    pub prot: Prot,
    pub writable_pages: bool,
}

impl Area {
    /// The area's length in bytes (areas never cover the whole 2^64 space:
    /// their length is below `ULONG_MAX`).
    pub fn length(&self) -> u64 {
        self.last - self.iova + 1
    }

    /// The user address `iova` translates to (`iova` must be inside).
    pub fn user_va_of(&self, iova: u64) -> u64 {
        debug_assert!(self.iova <= iova && iova <= self.last);
        self.user_va + (iova - self.iova)
    }

    fn range(&self) -> IovaRange {
        IovaRange {
            start: self.iova,
            last: self.last,
        }
    }
}

/// A piece of user memory to place in an IOAS: the kernel's
/// `struct iopt_pages_list` element (a slice of one `iopt_pages`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub user_va: u64,
    pub length: u64,
    /// Whether that memory was mapped writeable where it came from.
    pub writable_pages: bool,
}

/// A reserved IOVA range and the device that reserved it
/// (`struct iopt_reserved`; the kernel's owner pointer is the device or its
/// domain).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reserved {
    pub range: IovaRange,
    pub owner: DeviceId,
}

/// The areas, allowed and reserved IOVA ranges of one IOAS
/// (`struct io_pagetable`).
#[derive(Clone, Debug)]
pub struct IoPagetable {
    /// Areas keyed by first IOVA; they never overlap.
    areas: BTreeMap<u64, Area>,
    /// `allowed_itree`: sorted, disjoint. Empty means "anywhere".
    allowed: Vec<IovaRange>,
    /// `reserved_itree`: may overlap (several devices reserve the same MSI
    /// window).
    reserved: Vec<Reserved>,
    /// `iova_alignment`: the largest minimum page size of the attached
    /// domains, 1 with none.
    iova_alignment: u64,
    /// Whether the kernel has transparent huge pages: caps the allocator's
    /// alignment.
    thp: Thp,
}

impl Default for IoPagetable {
    fn default() -> Self {
        Self::new()
    }
}

/// `ALIGN(x, a)` where it does not overflow.
fn align_up(x: u64, a: u64) -> Option<u64> {
    Some(x.checked_add(a - 1)? & !(a - 1))
}

/// `last = iova + length - 1` with the kernel's `check_add_overflow`; a zero
/// length wraps in C (`length - 1` is `ULONG_MAX`) and so overflows here too.
fn last_of(iova: u64, length: u64) -> Result<u64> {
    iova.checked_add(length.wrapping_sub(1))
        .ok_or(IoptError::Overflow)
}

/// The holes left in `[lo, hi]` by `used` (sorted by start, may overlap):
/// the kernel's `interval_tree_span_iter` restricted to its holes.
fn holes(used: &[IovaRange], lo: u64, hi: u64, mut f: impl FnMut(IovaRange) -> bool) {
    let mut next = Some(lo);
    for u in used {
        let Some(cur) = next else { return };
        if u.last < cur {
            continue;
        }
        if u.start > hi {
            break;
        }
        if u.start > cur
            && !f(IovaRange {
                start: cur,
                last: u.start - 1,
            })
        {
            return;
        }
        next = u.last.checked_add(1);
    }
    if let Some(cur) = next {
        if cur <= hi {
            f(IovaRange {
                start: cur,
                last: hi,
            });
        }
    }
}

/// Pin the pages of one segment (`pfn_reader_user_pin`): `FOLL_WRITE` when
/// the memory was mapped writeable; a page that cannot be pinned → `EFAULT`.
fn pin_segment(backing: &dyn Backing, s: &Segment) -> Result<()> {
    match pinned_pages(s.user_va, s.length) {
        Some((start, len)) if backing.pinnable(start, len, s.writable_pages) => Ok(()),
        _ => Err(IoptError::Fault),
    }
}

/// `__alloc_iova_check_range`: align the start of `span` (keeping
/// `page_offset`) and see whether `length` bytes still fit before its end.
fn fit(span: IovaRange, length: u64, alignment: u64, page_offset: u64) -> Option<u64> {
    if span.last - span.start < length - 1 {
        return None;
    }
    let start = align_up(span.start, alignment)? | page_offset;
    (start <= span.last && span.last - start >= length - 1).then_some(start)
}

impl IoPagetable {
    /// An empty IOAS (`iopt_init_table`): no areas, nothing reserved,
    /// anything allowed, alignment 1; on a kernel with transparent huge
    /// pages.
    pub fn new() -> Self {
        Self::with_thp(Thp::Enabled)
    }

    /// An empty IOAS of a kernel built with or without transparent huge
    /// pages.
    pub fn with_thp(thp: Thp) -> Self {
        Self {
            areas: BTreeMap::new(),
            allowed: Vec::new(),
            reserved: Vec::new(),
            iova_alignment: 1,
            thp,
        }
    }

    /// Whether this IOAS's kernel has transparent huge pages.
    pub fn thp(&self) -> Thp {
        self.thp
    }

    /// The minimum alignment of a mapping's IOVA and length
    /// (`out_iova_alignment` of `IOMMU_IOAS_IOVA_RANGES`).
    pub fn iova_alignment(&self) -> u64 {
        self.iova_alignment
    }

    /// Raise or lower the alignment (`iopt_check_iova_alignment`): every
    /// existing area's IOVA, length and page offset must already obey it,
    /// else `EADDRINUSE`.
    pub fn set_iova_alignment(&mut self, alignment: u64) -> Result<()> {
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(IoptError::Invalid("alignment is not a power of two"));
        }
        let mask = alignment - 1;
        let misaligned = self.areas.values().any(|a| {
            a.iova & mask != 0 || a.length() & mask != 0 || (a.user_va % PAGE_SIZE) & mask != 0
        });
        if misaligned {
            return Err(IoptError::AddressInUse);
        }
        self.iova_alignment = alignment;
        Ok(())
    }

    /// The areas, in IOVA order.
    pub fn areas(&self) -> impl Iterator<Item = &Area> + '_ {
        self.areas.values()
    }

    /// The area holding `iova`, if any.
    pub fn area_at(&self, iova: u64) -> Option<&Area> {
        self.areas
            .range(..=iova)
            .next_back()
            .map(|(_, a)| a)
            .filter(|a| a.last >= iova)
    }

    /// The first area (lowest IOVA) intersecting `range`
    /// (`iopt_area_iter_first`).
    fn first_area_in(&self, range: IovaRange) -> Option<&Area> {
        self.area_at(range.start).or_else(|| {
            self.areas
                .range(range.start..=range.last)
                .next()
                .map(|(_, a)| a)
        })
    }

    fn reserved_hits(&self, range: IovaRange) -> bool {
        self.reserved.iter().any(|r| r.range.overlaps(&range))
    }

    fn allowed_hits(&self, range: IovaRange) -> bool {
        self.allowed.iter().any(|a| a.overlaps(&range))
    }

    /// The allowed ranges, sorted.
    pub fn allowed(&self) -> &[IovaRange] {
        &self.allowed
    }

    /// The reserved ranges.
    pub fn reserved(&self) -> &[Reserved] {
        &self.reserved
    }

    fn sorted_reserved(&self) -> Vec<IovaRange> {
        let mut v: Vec<IovaRange> = self.reserved.iter().map(|r| r.range).collect();
        v.sort_unstable();
        v
    }

    /// The usable IOVA ranges: the holes between reserved ranges over the
    /// whole address space, in order (`iommufd_ioas_iova_ranges`). Allowed
    /// ranges do not narrow them.
    pub fn usable_ranges(&self, mut f: impl FnMut(IovaRange)) {
        holes(&self.sorted_reserved(), 0, u64::MAX, |h| {
            f(h);
            true
        });
    }

    /// Check that a caller-chosen IOVA range can be mapped
    /// (`iopt_check_iova`), in the kernel's order: IOVA misaligned → `EINVAL`,
    /// range wraps → `EOVERFLOW`, touches a reserved range → `EINVAL`,
    /// touches an area → `EEXIST`.
    pub fn check_iova(&self, iova: u64, length: u64) -> Result<IovaRange> {
        if iova & (self.iova_alignment - 1) != 0 {
            return Err(IoptError::Invalid("IOVA not aligned to the IOAS alignment"));
        }
        let range = IovaRange {
            start: iova,
            last: last_of(iova, length)?,
        };
        if self.reserved_hits(range) {
            return Err(IoptError::Invalid("IOVA range is reserved"));
        }
        if self.first_area_in(range).is_some() {
            return Err(IoptError::Exists);
        }
        Ok(range)
    }

    /// Choose an IOVA for `length` bytes of memory at user address `uptr`
    /// (`iopt_alloc_iova`):
    /// - the alignment is `roundup_pow_of_two(length)`, lowered to the
    ///   alignment `uptr` has (so huge pages stay mappable) and capped at
    ///   `HPAGE_SIZE` with transparent huge pages, at `PAGE_SIZE` without
    ///   ([`Thp::max_alloc_alignment`]); below the IOAS alignment → `EINVAL`;
    /// - the IOVA keeps `uptr`'s offset in its page;
    /// - first fit, lowest IOVA first, inside `[PAGE_SIZE, ULONG_MAX -
    ///   PAGE_SIZE]` (never IOVA 0) and inside the allowed ranges if any,
    ///   avoiding reserved ranges and areas; nothing fits → `ENOSPC`.
    pub fn alloc_iova(&self, uptr: u64, length: u64) -> Result<u64> {
        if length == 0 || length >= u64::MAX / 2 {
            return Err(IoptError::Overflow);
        }
        let page_offset = uptr % PAGE_SIZE;
        let mut alignment = length.next_power_of_two();
        if uptr != 0 {
            alignment = alignment.min(1 << uptr.trailing_zeros());
        }
        alignment = alignment.min(self.thp.max_alloc_alignment());
        if alignment < self.iova_alignment {
            return Err(IoptError::Invalid(
                "allocation alignment below the IOAS alignment",
            ));
        }

        let window = IovaRange {
            start: PAGE_SIZE,
            last: u64::MAX - PAGE_SIZE,
        };
        let whole = [window];
        let allowed: &[IovaRange] = if self.allowed.is_empty() {
            &whole
        } else {
            &self.allowed
        };
        let mut used: Vec<IovaRange> = self.sorted_reserved();
        used.extend(self.areas.values().map(Area::range));
        used.sort_unstable();

        for a in allowed {
            let (start, last) = (a.start.max(window.start), a.last.min(window.last));
            if start > last {
                continue;
            }
            let Some(aligned) = fit(IovaRange { start, last }, length, alignment, page_offset)
            else {
                continue;
            };
            let mut found = None;
            holes(&used, aligned, last, |h| {
                found = fit(h, length, alignment, page_offset);
                found.is_none()
            });
            if let Some(iova) = found {
                return Ok(iova);
            }
        }
        Err(IoptError::NoSpace)
    }

    /// Place `segments` back to back at `dst` (or at an allocated IOVA),
    /// all with `prot` (`iopt_map_pages`: `iopt_alloc_area_pages` +
    /// `iopt_insert_area`, then `iopt_fill_domains_pages`). Returns the first
    /// IOVA. Nothing changes on failure.
    ///
    /// Length not a multiple of the IOAS alignment → `EINVAL`; the IOVA is
    /// checked or allocated as above; WRITE on memory that was not mapped
    /// writeable → `EPERM`; a page offset the alignment forbids → `EINVAL`;
    /// then, when the IOAS has a domain (`pin` is its memory), a segment
    /// whose pages cannot be pinned → `EFAULT`.
    pub fn map_pages(
        &mut self,
        dst: Option<u64>,
        segments: &[Segment],
        prot: Prot,
        pin: Option<&dyn Backing>,
    ) -> Result<u64> {
        let mut length: u64 = 0;
        for s in segments {
            length = length.checked_add(s.length).ok_or(IoptError::Overflow)?;
        }
        if length & (self.iova_alignment - 1) != 0 || length == 0 {
            return Err(IoptError::Invalid(
                "length not aligned to the IOAS alignment",
            ));
        }
        let first = segments[0];
        let iova = match dst {
            Some(iova) => self.check_iova(iova, length)?.start,
            None => self.alloc_iova(first.user_va, length)?,
        };
        for s in segments {
            if prot.write && !s.writable_pages {
                return Err(IoptError::Permission);
            }
            if (s.user_va % PAGE_SIZE) & (self.iova_alignment - 1) != 0 {
                return Err(IoptError::Invalid(
                    "page offset not aligned to the IOAS alignment",
                ));
            }
        }
        if let Some(backing) = pin {
            segments.iter().try_for_each(|s| pin_segment(backing, s))?;
        }
        let mut at = iova;
        for s in segments {
            let area = Area {
                iova: at,
                last: at + (s.length - 1),
                user_va: s.user_va,
                prot,
                writable_pages: s.writable_pages,
            };
            self.areas.insert(at, area);
            at = area.last.wrapping_add(1);
        }
        Ok(iova)
    }

    /// The memory `[iova, iova + length)` maps, as segments, one per area it
    /// crosses (`iopt_get_pages`). Zero length → `EINVAL`, wrap →
    /// `EOVERFLOW`, any gap (not wholly covered by contiguous areas) →
    /// `ENOENT`.
    pub fn get_pages(&self, iova: u64, length: u64) -> Result<Vec<Segment>> {
        if length == 0 {
            return Err(IoptError::Invalid("zero length"));
        }
        let last = last_of(iova, length)?;
        let mut out = Vec::new();
        self.for_each_contig(iova, last, |area, cur, end| {
            out.push(Segment {
                user_va: area.user_va_of(cur),
                length: end - cur + 1,
                writable_pages: area.writable_pages,
            });
            Ok(())
        })?;
        Ok(out)
    }

    /// Walk `[iova, last]` through contiguous areas
    /// (`iopt_for_each_contig_area`), calling `f(area, from, to)` for the
    /// part of each area inside the range; a gap → `ENOENT`.
    fn for_each_contig(
        &self,
        iova: u64,
        last: u64,
        mut f: impl FnMut(&Area, u64, u64) -> Result<()>,
    ) -> Result<()> {
        let mut cur = iova;
        loop {
            let area = self
                .area_at(cur)
                .ok_or(IoptError::NotFound("IOVA range not fully mapped"))?;
            let end = area.last.min(last);
            f(area, cur, end)?;
            if end == last {
                return Ok(());
            }
            cur = end + 1;
        }
    }

    /// Unmap every area inside `[start, last]` (`iopt_unmap_iova_range`),
    /// lowest first. An area reaching outside the range stops the walk with
    /// `ENOENT`, *after* the areas before it were unmapped (the kernel does
    /// not roll back); nothing mapped in the range → `ENOENT`. Returns the
    /// bytes unmapped, also on error.
    pub fn unmap_range(&mut self, start: u64, last: u64) -> (u64, Result<()>) {
        let mut unmapped: u64 = 0;
        let range = IovaRange { start, last };
        while let Some(area) = self.first_area_in(range).copied() {
            if area.iova < start || area.last > last {
                return (
                    unmapped,
                    Err(IoptError::NotFound("unmap would split an area")),
                );
            }
            self.areas.remove(&area.iova);
            unmapped = unmapped.wrapping_add(area.length());
        }
        if unmapped == 0 {
            return (0, Err(IoptError::NotFound("nothing mapped in the range")));
        }
        (unmapped, Ok(()))
    }

    /// `iopt_unmap_iova`: zero length → `EINVAL`, wrap → `EOVERFLOW`, then
    /// [`IoPagetable::unmap_range`].
    pub fn unmap(&mut self, iova: u64, length: u64) -> (u64, Result<()>) {
        if length == 0 {
            return (0, Err(IoptError::Invalid("zero length")));
        }
        match last_of(iova, length) {
            Ok(last) => self.unmap_range(iova, last),
            Err(e) => (0, Err(e)),
        }
    }

    /// `iopt_unmap_all`: unmap everything; an empty IOAS is no error.
    pub fn unmap_all(&mut self) -> u64 {
        let n = self.areas.values().map(Area::length).sum();
        self.areas.clear();
        n
    }

    /// Replace the allowed ranges (`iommufd_ioas_allow_iovas` +
    /// `iopt_set_allow_iova`): a range with start > last, or two ranges that
    /// overlap → `EINVAL`; an allowed range touching a reserved one →
    /// `EADDRINUSE` and the old ranges stay.
    pub fn set_allowed(&mut self, ranges: &[IovaRange]) -> Result<()> {
        let mut sorted = ranges.to_vec();
        if sorted.iter().any(|r| r.start > r.last) {
            return Err(IoptError::Invalid("allowed range with start > last"));
        }
        sorted.sort_unstable();
        if sorted.windows(2).any(|w| w[0].overlaps(&w[1])) {
            return Err(IoptError::Invalid("allowed ranges overlap"));
        }
        if sorted.iter().any(|r| self.reserved_hits(*r)) {
            return Err(IoptError::AddressInUse);
        }
        self.allowed = sorted;
        Ok(())
    }

    /// Pin every area for a first domain (`iopt_fill_domain`): an area
    /// whose pages cannot be pinned → `EFAULT`. Changes nothing.
    pub fn fill_domain(&self, backing: &dyn Backing) -> Result<()> {
        self.areas.values().try_for_each(|a| {
            pin_segment(
                backing,
                &Segment {
                    user_va: a.user_va,
                    length: a.length(),
                    writable_pages: a.writable_pages,
                },
            )
        })
    }

    /// Reserve `range` for `owner` (`iopt_reserve_iova`): touching an area
    /// or an allowed range → `EADDRINUSE`.
    pub fn reserve(&mut self, range: IovaRange, owner: DeviceId) -> Result<()> {
        if self.first_area_in(range).is_some() || self.allowed_hits(range) {
            return Err(IoptError::AddressInUse);
        }
        self.reserved.push(Reserved { range, owner });
        Ok(())
    }

    /// Drop every reserved range `owner` holds (`iopt_remove_reserved_iova`).
    pub fn release_reserved(&mut self, owner: DeviceId) {
        self.reserved.retain(|r| r.owner != owner);
    }

    /// Walk `[iova, iova + len)` for a software access
    /// (`iommufd_access_rw`), calling `f(user_va, offset, chunk)` for each
    /// piece. Zero length → `EINVAL`, wrap → `EOVERFLOW`, a gap → `ENOENT`,
    /// a write through an area without WRITE → `EPERM`. Like the kernel,
    /// reads are not checked against READ. Unlike the kernel, which may
    /// have copied the first areas when it meets a bad one, the whole range
    /// is checked before `f` is called: a refused DMA touches nothing.
    pub fn access(
        &self,
        iova: u64,
        len: u64,
        write: bool,
        mut f: impl FnMut(u64, u64, u64) -> Result<()>,
    ) -> Result<()> {
        if len == 0 {
            return Err(IoptError::Invalid("zero length"));
        }
        let last = last_of(iova, len)?;
        self.for_each_contig(iova, last, |area, _, _| {
            if write && !area.prot.write {
                return Err(IoptError::Permission);
            }
            Ok(())
        })?;
        self.for_each_contig(iova, last, |area, cur, end| {
            f(area.user_va_of(cur), cur - iova, end - cur + 1)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HPAGE_SIZE;

    fn seg(user_va: u64, length: u64) -> [Segment; 1] {
        [Segment {
            user_va,
            length,
            writable_pages: true,
        }]
    }

    #[test]
    fn holes_of_nothing_is_the_whole_window() {
        let mut v = vec![];
        holes(&[], 5, 10, |h| {
            v.push(h);
            true
        });
        assert_eq!(v, vec![IovaRange { start: 5, last: 10 }]);
    }

    #[test]
    fn holes_skip_overlapping_used_ranges() {
        let used = [
            IovaRange { start: 0, last: 9 },
            IovaRange { start: 5, last: 19 },
            IovaRange {
                start: 30,
                last: u64::MAX,
            },
        ];
        let mut v = vec![];
        holes(&used, 0, u64::MAX, |h| {
            v.push(h);
            true
        });
        assert_eq!(
            v,
            vec![IovaRange {
                start: 20,
                last: 29
            }]
        );
    }

    #[test]
    fn alloc_keeps_the_page_offset_and_skips_iova_zero() {
        let iopt = IoPagetable::new();
        let iova = iopt.alloc_iova(0x7000_0123, 0x100).unwrap();
        assert_eq!(iova % PAGE_SIZE, 0x123);
        assert!(iova >= PAGE_SIZE);
    }

    #[test]
    fn alloc_aligns_to_the_user_address_up_to_a_huge_page() {
        let iopt = IoPagetable::new();
        // 4 MiB at a 4 MiB-aligned address: capped at 2 MiB.
        assert_eq!(iopt.alloc_iova(0x40_0000, 0x40_0000).unwrap(), HPAGE_SIZE);
        // 64 KiB at a 64 KiB-aligned address.
        assert_eq!(iopt.alloc_iova(0x1_0000, 0x1_0000).unwrap(), 0x1_0000);
    }

    #[test]
    fn alloc_is_first_fit_around_areas() {
        let mut iopt = IoPagetable::new();
        iopt.map_pages(Some(0x1000), &seg(0x1000, 0x1000), Prot::RW, None)
            .unwrap();
        let iova = iopt
            .map_pages(None, &seg(0x10_0000, 0x1000), Prot::RW, None)
            .unwrap();
        assert_eq!(iova, 0x2000);
    }

    #[test]
    fn unmap_of_a_straddled_range_keeps_earlier_unmaps() {
        let mut iopt = IoPagetable::new();
        iopt.map_pages(Some(0x1000), &seg(0, 0x1000), Prot::RW, None)
            .unwrap();
        iopt.map_pages(Some(0x2000), &seg(0, 0x2000), Prot::RW, None)
            .unwrap();
        let (n, r) = iopt.unmap(0x1000, 0x2000);
        assert_eq!(r.unwrap_err().errno(), crate::Errno::ENOENT);
        assert_eq!(n, 0x1000);
        assert!(iopt.area_at(0x1000).is_none());
        assert!(iopt.area_at(0x2000).is_some());
    }

    #[test]
    fn raising_the_alignment_over_a_misaligned_area_is_refused() {
        let mut iopt = IoPagetable::new();
        iopt.map_pages(Some(0x800), &seg(0x800, 0x800), Prot::RW, None)
            .unwrap();
        assert_eq!(
            iopt.set_iova_alignment(PAGE_SIZE),
            Err(IoptError::AddressInUse)
        );
        assert_eq!(iopt.iova_alignment(), 1);
    }

    #[test]
    fn without_thp_the_allocator_aligns_to_a_page_at_most() {
        let iopt = IoPagetable::with_thp(Thp::Disabled);
        let mut with = IoPagetable::new();
        let mut without = IoPagetable::with_thp(Thp::Disabled);
        // One page taken at 0x1000: 4 MiB at a 4 MiB-aligned address goes
        // right after it without THP, at 2 MiB with.
        for t in [&mut with, &mut without] {
            t.map_pages(Some(0x1000), &seg(0, 0x1000), Prot::RW, None)
                .unwrap();
        }
        assert_eq!(with.alloc_iova(0x40_0000, 0x40_0000).unwrap(), HPAGE_SIZE);
        assert_eq!(without.alloc_iova(0x40_0000, 0x40_0000).unwrap(), 0x2000);
        assert_eq!(iopt.alloc_iova(0x1_0000, 0x1_0000).unwrap(), PAGE_SIZE);
    }

    /// Memory whose pages from `hole` on cannot be pinned, and whose pages
    /// below `read_only` cannot be pinned for writing.
    #[derive(Debug)]
    struct Holey {
        hole: u64,
        read_only: u64,
    }

    impl Backing for Holey {
        fn pinnable(&self, start: u64, length: u64, write: bool) -> bool {
            start + length <= self.hole && !(write && start < self.read_only)
        }
    }

    #[test]
    fn with_a_domain_unpinnable_memory_is_efault_and_nothing_is_mapped() {
        let mem = Holey {
            hole: 0x10_0000,
            read_only: 0x1_0000,
        };
        let mut iopt = IoPagetable::new();
        // The tail's last page is in the hole; the pin takes whole pages.
        let r = iopt.map_pages(Some(0x1000), &seg(0xf_f000, 0x1001), Prot::RW, Some(&mem));
        assert_eq!(r, Err(IoptError::Fault));
        assert_eq!(iopt.areas().count(), 0);
        // Without a domain nothing is pinned.
        iopt.map_pages(Some(0x1000), &seg(0xf_f000, 0x2000), Prot::RW, None)
            .unwrap();
        assert_eq!(iopt.fill_domain(&mem), Err(IoptError::Fault));
        assert_eq!(iopt.unmap_all(), 0x2000);
        // Read-only memory pins for reading only.
        let ro = [Segment {
            user_va: 0,
            length: 0x1000,
            writable_pages: false,
        }];
        iopt.map_pages(Some(0x1000), &ro, Prot::READ, Some(&mem))
            .unwrap();
        assert_eq!(iopt.fill_domain(&mem), Ok(()));
        assert_eq!(
            iopt.map_pages(Some(0x2000), &seg(0, 0x1000), Prot::RW, Some(&mem)),
            Err(IoptError::Fault)
        );
    }
}
