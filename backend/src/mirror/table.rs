// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The shared translation table (docs/mirror-protocol.md §11): the daemon's
//! mappings as IOMMU-style radix page tables in memory QEMU maps read-only,
//! so that QEMU's `translate()` finds a MAP as soon as the daemon wrote it
//! and misses an UNMAP as soon as the daemon cleared it — no message, no
//! wake-up, no round trip on the request path.
//!
//! The format is that of a hardware IOMMU's second-stage tables, reduced to
//! what a software walker needs:
//!
//! - the table is an array of 4 KiB pages of 512 little-endian 64-bit
//!   entries; page 0 is never a table (index 0 means "no table");
//! - one tree per translated domain, `levels` deep (enough levels of 9 bits
//!   above the 12-bit page offset to cover the device's input range); the
//!   root's page index travels in the domain's ATTACH record;
//! - an entry is [`PTE_PRESENT`] plus either [`PTE_TABLE`] and the next
//!   level's page index in bits 12–63, or a leaf: the guest-physical address
//!   of a 4 KiB page (level 0) or of a 2 MiB / 1 GiB block (levels 1 and 2)
//!   in bits 12–63, with [`PTE_READ`] / [`PTE_WRITE`], and [`PTE_START`] on
//!   the leaf where a guest mapping begins (so a walker can give back the
//!   guest's mappings exactly, as QEMU's IOMMU notifiers want them).
//!
//! Publication rules (the readers are another process, lock-free):
//! every entry is written with one release store; a new table page is
//! filled before the entry pointing at it is stored; a block that must be
//! split is replaced by a full next-level table in one store. A reader thus
//! sees, per page, either the translation before or after a change — as
//! with a hardware IOMMU's page walker. Pages a destroyed domain used are
//! not reused until QEMU has acknowledged a batch sent after the domain's
//! DETACH ([`TranslationTable::release_limbo`]): until then QEMU may still
//! walk them, and must find the old translation, not another domain's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_iommu::wire::map_flags;
use virtio_iommu::{Map, Unmap};

use super::shm::SharedMem;

/// Entry bits (docs/mirror-protocol.md §11).
pub const PTE_PRESENT: u64 = 1 << 0;
pub const PTE_TABLE: u64 = 1 << 1;
pub const PTE_READ: u64 = 1 << 2;
pub const PTE_WRITE: u64 = 1 << 3;
pub const PTE_START: u64 = 1 << 4;
const PTE_ADDR: u64 = !0xfff;

/// The table's page size, and its shift: also the smallest mapping granule
/// the shared table can express.
pub const PAGE_SHIFT: u32 = 12;
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// Entries per table page.
pub const ENTRIES: usize = 512;
const LEVEL_BITS: u32 = 9;
/// Largest leaf level: 1 GiB blocks.
const MAX_BLOCK_LEVEL: u32 = 2;

/// The levels a tree needs to cover input addresses up to `input_last`.
pub fn levels_for(input_last: u64) -> u32 {
    let bits = 64 - input_last.leading_zeros();
    bits.saturating_sub(PAGE_SHIFT).div_ceil(LEVEL_BITS).max(1)
}

fn shift(level: u32) -> u32 {
    PAGE_SHIFT + LEVEL_BITS * level
}

/// The last input address a tree of `levels` levels covers.
fn coverage_last(levels: u32) -> u64 {
    let s = shift(levels);
    if s >= 64 {
        u64::MAX
    } else {
        (1u64 << s) - 1
    }
}

fn index(level: u32, iova: u64) -> usize {
    ((iova >> shift(level)) as usize) & (ENTRIES - 1)
}

/// Where the table's words live: shared memory in the daemon, plain memory
/// in tests.
pub trait TableStore: Send {
    fn words(&self) -> &[AtomicU64];
}

impl TableStore for Arc<SharedMem> {
    fn words(&self) -> &[AtomicU64] {
        self.as_u64s()
    }
}

impl TableStore for Box<[AtomicU64]> {
    fn words(&self) -> &[AtomicU64] {
        self
    }
}

/// A zeroed in-memory store of `pages` pages (for tests and benchmarks).
pub fn memory_store(pages: u32) -> Box<[AtomicU64]> {
    (0..pages as usize * ENTRIES)
        .map(|_| AtomicU64::new(0))
        .collect()
}

/// One translation found by a walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// Guest-physical address `iova` translates to.
    pub phys: u64,
    /// The leaf's size minus one (4 KiB, 2 MiB or 1 GiB pages).
    pub mask: u64,
    pub read: bool,
    pub write: bool,
}

/// A reader's walk (what QEMU's `translate()` does): the translation of
/// `iova` in the tree at `root`, if any. Bounded by `levels`; every page
/// index is checked against the store, so a corrupt table cannot send the
/// walk out of it.
pub fn translate(words: &[AtomicU64], levels: u32, root: u32, iova: u64) -> Option<Leaf> {
    if root == 0 || iova > coverage_last(levels) {
        return None;
    }
    let mut table = root as usize;
    for level in (0..levels).rev() {
        let e = words
            .get(table * ENTRIES + index(level, iova))?
            .load(Ordering::Acquire);
        if e & PTE_PRESENT == 0 {
            return None;
        }
        if e & PTE_TABLE != 0 {
            if level == 0 {
                return None;
            }
            table = (e >> PAGE_SHIFT) as usize;
            continue;
        }
        let mask = (1u64 << shift(level)) - 1;
        return Some(Leaf {
            phys: (e & PTE_ADDR & !mask) | (iova & mask),
            mask,
            read: e & PTE_READ != 0,
            write: e & PTE_WRITE != 0,
        });
    }
    None
}

/// A guest mapping as a walk gives it back: `[virt_start, virt_end]` →
/// `phys_start`, with the table's permission bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalkedMapping {
    pub virt_start: u64,
    pub virt_end: u64,
    pub phys_start: u64,
    pub read: bool,
    pub write: bool,
}

/// Every mapping of the tree at `root`, in address order: consecutive
/// leaves are joined until the next [`PTE_START`] (what QEMU does to replay
/// mappings to a new IOMMU notifier).
pub fn walk(words: &[AtomicU64], levels: u32, root: u32) -> Vec<WalkedMapping> {
    fn visit(
        words: &[AtomicU64],
        table: usize,
        level: u32,
        base: u64,
        out: &mut Vec<WalkedMapping>,
    ) {
        for i in 0..ENTRIES {
            let Some(w) = words.get(table * ENTRIES + i) else {
                return;
            };
            let e = w.load(Ordering::Acquire);
            if e & PTE_PRESENT == 0 {
                continue;
            }
            let Some(start) = base.checked_add((i as u64) << shift(level).min(63)) else {
                return;
            };
            if e & PTE_TABLE != 0 {
                if level > 0 {
                    visit(words, (e >> PAGE_SHIFT) as usize, level - 1, start, out);
                }
                continue;
            }
            let size_m1 = (1u64 << shift(level)) - 1;
            let (read, write) = (e & PTE_READ != 0, e & PTE_WRITE != 0);
            let phys = e & PTE_ADDR;
            if let Some(last) = out.last_mut() {
                let joins = e & PTE_START == 0
                    && last.virt_end.wrapping_add(1) == start
                    && last
                        .phys_start
                        .wrapping_add(last.virt_end - last.virt_start + 1)
                        == phys
                    && (last.read, last.write) == (read, write);
                if joins {
                    last.virt_end = start + size_m1;
                    continue;
                }
            }
            out.push(WalkedMapping {
                virt_start: start,
                virt_end: start + size_m1,
                phys_start: phys,
                read,
                write,
            });
        }
    }
    let mut out = Vec::new();
    if root != 0 && levels > 0 {
        visit(words, root as usize, levels - 1, 0, &mut out);
    }
    out
}

/// A domain as the table knows it.
#[derive(Debug, Default)]
struct TableDomain {
    /// Root page index; 0 for a bypass domain (nothing to translate).
    root: u32,
    /// Attached endpoints (a domain lives while it has any: the device
    /// model destroys it with its last endpoint).
    endpoints: Vec<u32>,
}

/// Counters of the table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TableStats {
    /// Pages holding tables (all domains), and pages waiting in limbo.
    pub pages_in_use: u32,
    pub pages_in_limbo: u32,
    /// Table pages that could not be allocated (the store is full): the
    /// mapping is missing from QEMU's view and its DMA faults (fail safe).
    pub alloc_failures: u64,
}

/// The writer's side of the shared translation table. Single writer (the
/// daemon, under its device lock); readers anywhere.
#[derive(Debug)]
pub struct TranslationTable<S: TableStore> {
    store: S,
    pages: u32,
    levels: u32,
    /// Pages never used yet start here (they are still zero).
    next_fresh: u32,
    /// Returned pages, zeroed, ready for reuse.
    free: Vec<u32>,
    /// Pages of destroyed domains QEMU may still be walking.
    limbo: Vec<u32>,
    domains: HashMap<u32, TableDomain>,
    stats: TableStats,
}

impl<S: TableStore> TranslationTable<S> {
    /// An empty table in `store`, with trees of `levels` levels.
    pub fn new(store: S, levels: u32) -> Self {
        let pages = (store.words().len() / ENTRIES).min(u32::MAX as usize) as u32;
        Self {
            store,
            pages,
            levels,
            next_fresh: 1,
            free: Vec::new(),
            limbo: Vec::new(),
            domains: HashMap::new(),
            stats: TableStats::default(),
        }
    }

    pub fn levels(&self) -> u32 {
        self.levels
    }

    pub fn pages(&self) -> u32 {
        self.pages
    }

    pub fn stats(&self) -> TableStats {
        TableStats {
            pages_in_limbo: self.limbo.len() as u32,
            ..self.stats
        }
    }

    pub fn words(&self) -> &[AtomicU64] {
        self.store.words()
    }

    /// The root page of `domain`'s tree (0: unknown, or a bypass domain).
    pub fn root(&self, domain: u32) -> u32 {
        self.domains.get(&domain).map_or(0, |d| d.root)
    }

    /// The endpoints attached to `domain`.
    pub fn endpoints(&self, domain: u32) -> &[u32] {
        self.domains
            .get(&domain)
            .map_or(&[][..], |d| d.endpoints.as_slice())
    }

    /// `endpoint` joined `domain` (created with an empty tree if new, none
    /// if `bypass`). Returns the domain's root.
    pub fn attach(&mut self, endpoint: u32, domain: u32, bypass: bool) -> u32 {
        if !self.domains.contains_key(&domain) {
            let root = if bypass { 0 } else { self.alloc().unwrap_or(0) };
            self.domains.insert(
                domain,
                TableDomain {
                    root,
                    endpoints: Vec::new(),
                },
            );
        }
        let d = self.domains.get_mut(&domain).expect("inserted above");
        if !d.endpoints.contains(&endpoint) {
            d.endpoints.push(endpoint);
        }
        d.root
    }

    /// `endpoint` left `domain`; with its last endpoint the domain and its
    /// tree go (into limbo).
    pub fn detach(&mut self, endpoint: u32, domain: u32) {
        let Some(d) = self.domains.get_mut(&domain) else {
            return;
        };
        d.endpoints.retain(|&e| e != endpoint);
        if d.endpoints.is_empty() {
            let root = d.root;
            self.domains.remove(&domain);
            if root != 0 {
                self.retire_tree(root, self.levels - 1);
            }
        }
    }

    /// Every domain goes (device or system reset).
    pub fn reset(&mut self) {
        let roots: Vec<u32> = self.domains.drain().map(|(_, d)| d.root).collect();
        for root in roots.into_iter().filter(|&r| r != 0) {
            self.retire_tree(root, self.levels - 1);
        }
    }

    /// Pages in limbo become reusable: QEMU acknowledged a batch sent after
    /// they were retired, or no QEMU is connected.
    pub fn release_limbo(&mut self) {
        while let Some(page) = self.limbo.pop() {
            let base = page as usize * ENTRIES;
            for w in &self.store.words()[base..base + ENTRIES] {
                w.store(0, Ordering::Relaxed);
            }
            self.free.push(page);
        }
    }

    /// Write the mapping `[virt_start, virt_end]` → `phys_start` into its
    /// domain's tree, with the largest blocks alignment allows. The model
    /// has checked it (aligned to the granule, inside the input range, no
    /// overlap); mappings with neither READ nor WRITE translate nothing and
    /// are not written.
    pub fn map(&mut self, m: &Map) {
        let &Map {
            domain,
            virt_start,
            virt_end,
            phys_start,
            flags,
        } = m;
        let (read, write) = (flags & map_flags::READ != 0, flags & map_flags::WRITE != 0);
        let root = self.root(domain);
        if root == 0 || !(read || write) || virt_end < virt_start {
            return;
        }
        if virt_end > coverage_last(self.levels) {
            return;
        }
        let perm = if read { PTE_READ } else { 0 } | if write { PTE_WRITE } else { 0 };
        let top = MAX_BLOCK_LEVEL.min(self.levels - 1);
        let (mut iova, mut pa, mut start) = (virt_start, phys_start, PTE_START);
        loop {
            let left = virt_end - iova;
            let mut level = top;
            while level > 0 {
                let m = (1u64 << shift(level)) - 1;
                if iova & m == 0 && pa & m == 0 && left >= m {
                    break;
                }
                level -= 1;
            }
            let m = (1u64 << shift(level)) - 1;
            let entry = (pa & PTE_ADDR) | perm | start | PTE_PRESENT;
            if !self.set_leaf(root, iova, level, entry) {
                self.stats.alloc_failures += 1;
                log::error!(
                    "shared translation table full: domain {domain} mapping \
                     {virt_start:#x}-{virt_end:#x} is incomplete in QEMU's view (its DMA faults)"
                );
                return;
            }
            start = 0;
            if left <= m {
                return;
            }
            iova += m + 1;
            pa = pa.wrapping_add(m + 1);
        }
    }

    /// Clear `[virt_start, virt_end]` in its domain's tree. Leaves wholly
    /// inside go; a block reaching outside is split first (the model never
    /// asks for that, but the table stays exact if it did).
    pub fn unmap(&mut self, u: &Unmap) {
        let &Unmap {
            domain,
            virt_start,
            virt_end,
        } = u;
        let root = self.root(domain);
        let last = coverage_last(self.levels);
        if root == 0 || virt_start > virt_end || virt_start > last {
            return;
        }
        self.clear(root, self.levels - 1, 0, virt_start, virt_end.min(last));
    }

    fn word(&self, table: u32, i: usize) -> &AtomicU64 {
        &self.store.words()[table as usize * ENTRIES + i]
    }

    fn alloc(&mut self) -> Option<u32> {
        let page = match self.free.pop() {
            Some(p) => p,
            None if self.next_fresh < self.pages => {
                self.next_fresh += 1;
                self.next_fresh - 1
            }
            None => return None,
        };
        self.stats.pages_in_use += 1;
        Some(page)
    }

    fn child(&self, e: u64) -> Option<u32> {
        let page = e >> PAGE_SHIFT;
        (page != 0 && page < u64::from(self.pages)).then_some(page as u32)
    }

    /// Store `entry` as the level-`level` leaf for `iova`, creating (or
    /// splitting into) the tables above it.
    fn set_leaf(&mut self, root: u32, iova: u64, level: u32, entry: u64) -> bool {
        let mut table = root;
        for l in (level + 1..self.levels).rev() {
            let i = index(l, iova);
            let e = self.word(table, i).load(Ordering::Relaxed);
            table = if e & PTE_PRESENT == 0 {
                let Some(page) = self.alloc() else {
                    return false;
                };
                self.word(table, i).store(
                    u64::from(page) << PAGE_SHIFT | PTE_TABLE | PTE_PRESENT,
                    Ordering::Release,
                );
                page
            } else if e & PTE_TABLE != 0 {
                match self.child(e) {
                    Some(c) => c,
                    None => return false,
                }
            } else {
                match self.split(table, i, l, e) {
                    Some(c) => c,
                    None => return false,
                }
            };
        }
        let slot = self.word(table, index(level, iova));
        let old = slot.load(Ordering::Relaxed);
        slot.store(entry, Ordering::Release);
        // A table where a block now goes held nothing live (mappings never
        // overlap); its pages are retired with it.
        if level > 0 && old & (PTE_PRESENT | PTE_TABLE) == PTE_PRESENT | PTE_TABLE {
            if let Some(c) = self.child(old) {
                self.retire_tree(c, level - 1);
            }
        }
        true
    }

    /// Replace the level-`level` block `e` at `table[i]` by a full table of
    /// the next level translating the same way; returns the new table.
    fn split(&mut self, table: u32, i: usize, level: u32, e: u64) -> Option<u32> {
        let page = self.alloc()?;
        let sub = 1u64 << shift(level - 1);
        let bits = e & !PTE_ADDR & !PTE_START;
        for j in 0..ENTRIES {
            let start = if j == 0 { e & PTE_START } else { 0 };
            let pa = (e & PTE_ADDR).wrapping_add(j as u64 * sub);
            self.word(page, j)
                .store(pa | bits | start, Ordering::Relaxed);
        }
        self.word(table, i).store(
            u64::from(page) << PAGE_SHIFT | PTE_TABLE | PTE_PRESENT,
            Ordering::Release,
        );
        Some(page)
    }

    /// Clear `[start, end]` (inside this table's span, which begins at
    /// `base`) in the level-`level` table `table`.
    fn clear(&mut self, table: u32, level: u32, base: u64, start: u64, end: u64) {
        let s = shift(level);
        for i in index(level, start)..=index(level, end) {
            let e = self.word(table, i).load(Ordering::Relaxed);
            if e & PTE_PRESENT == 0 {
                continue;
            }
            let slot_base = base + ((i as u64) << s);
            let slot_last = slot_base + ((1u64 << s) - 1);
            let (lo, hi) = (start.max(slot_base), end.min(slot_last));
            if e & PTE_TABLE != 0 {
                if level > 0 {
                    if let Some(c) = self.child(e) {
                        self.clear(c, level - 1, slot_base, lo, hi);
                        continue;
                    }
                }
                self.word(table, i).store(0, Ordering::Release);
            } else if lo == slot_base && hi == slot_last {
                self.word(table, i).store(0, Ordering::Release);
            } else if level > 0 {
                if let Some(c) = self.split(table, i, level, e) {
                    self.clear(c, level - 1, slot_base, lo, hi);
                }
            }
        }
    }

    /// Put the tree at `table` (a level-`level` table) into limbo.
    fn retire_tree(&mut self, table: u32, level: u32) {
        if level > 0 {
            for i in 0..ENTRIES {
                let e = self.word(table, i).load(Ordering::Relaxed);
                if e & (PTE_PRESENT | PTE_TABLE) == PTE_PRESENT | PTE_TABLE {
                    if let Some(c) = self.child(e) {
                        self.retire_tree(c, level - 1);
                    }
                }
            }
        }
        self.stats.pages_in_use = self.stats.pages_in_use.saturating_sub(1);
        self.limbo.push(table);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn mapping(
        domain: u32,
        virt_start: u64,
        virt_end: u64,
        phys_start: u64,
        r: bool,
        w: bool,
    ) -> Map {
        let flags = if r { map_flags::READ } else { 0 } | if w { map_flags::WRITE } else { 0 };
        Map {
            domain,
            virt_start,
            virt_end,
            phys_start,
            flags,
        }
    }

    fn unmapping(domain: u32, virt_start: u64, virt_end: u64) -> Unmap {
        Unmap {
            domain,
            virt_start,
            virt_end,
        }
    }

    const L39: u32 = 3;

    fn table(pages: u32) -> TranslationTable<Box<[AtomicU64]>> {
        TranslationTable::new(memory_store(pages), L39)
    }

    fn tr(t: &TranslationTable<Box<[AtomicU64]>>, domain: u32, iova: u64) -> Option<Leaf> {
        translate(t.words(), t.levels(), t.root(domain), iova)
    }

    #[test]
    fn levels_cover_the_input_range() {
        assert_eq!(levels_for(0xfff), 1);
        assert_eq!(levels_for(0xffff_ffff), 3);
        assert_eq!(levels_for((1 << 39) - 1), 3);
        assert_eq!(levels_for((1 << 48) - 1), 4);
        assert_eq!(levels_for(u64::MAX), 6);
    }

    #[test]
    fn a_mapping_translates_with_its_permissions_until_unmapped() {
        let mut t = table(64);
        let root = t.attach(8, 1, false);
        assert_ne!(root, 0);
        t.map(&mapping(1, 0x10_0000, 0x10_2fff, 0x4000_0000, true, false));
        let l = tr(&t, 1, 0x10_1234).unwrap();
        assert_eq!(
            l,
            Leaf {
                phys: 0x4000_1234,
                mask: 0xfff,
                read: true,
                write: false
            }
        );
        assert_eq!(tr(&t, 1, 0x10_3000), None);
        assert_eq!(tr(&t, 1, 0xf_ffff), None);
        assert_eq!(tr(&t, 2, 0x10_1234), None, "another domain");
        t.unmap(&unmapping(1, 0x10_0000, 0x10_2fff));
        assert_eq!(tr(&t, 1, 0x10_1234), None);
    }

    #[test]
    fn aligned_mappings_use_blocks_and_walk_back_exactly() {
        let mut t = table(64);
        t.attach(8, 1, false);
        // 2 MiB + 4 KiB, 2 MiB aligned: one block and one page.
        t.map(&mapping(1, 0x20_0000, 0x40_0fff, 0x8020_0000, true, true));
        // An adjacent, physically contiguous mapping stays separate.
        t.map(&mapping(1, 0x40_1000, 0x40_1fff, 0x8040_1000, true, true));
        assert_eq!(tr(&t, 1, 0x3f_f000).unwrap().mask, (1 << 21) - 1);
        assert_eq!(tr(&t, 1, 0x3f_f000).unwrap().phys, 0x803f_f000);
        assert_eq!(
            walk(t.words(), t.levels(), t.root(1)),
            vec![
                WalkedMapping {
                    virt_start: 0x20_0000,
                    virt_end: 0x40_0fff,
                    phys_start: 0x8020_0000,
                    read: true,
                    write: true
                },
                WalkedMapping {
                    virt_start: 0x40_1000,
                    virt_end: 0x40_1fff,
                    phys_start: 0x8040_1000,
                    read: true,
                    write: true
                },
            ]
        );
    }

    #[test]
    fn clearing_part_of_a_block_splits_it() {
        let mut t = table(64);
        t.attach(8, 1, false);
        t.map(&mapping(1, 0x20_0000, 0x3f_ffff, 0x20_0000, true, true));
        t.unmap(&unmapping(1, 0x21_0000, 0x21_0fff));
        assert_eq!(tr(&t, 1, 0x21_0000), None);
        assert_eq!(tr(&t, 1, 0x21_1000).unwrap().phys, 0x21_1000);
        assert_eq!(tr(&t, 1, 0x20_0000).unwrap().phys, 0x20_0000);
        let w = walk(t.words(), t.levels(), t.root(1));
        assert_eq!((w[0].virt_start, w[0].virt_end), (0x20_0000, 0x20_ffff));
        assert_eq!((w[1].virt_start, w[1].virt_end), (0x21_1000, 0x3f_ffff));
    }

    #[test]
    fn a_destroyed_domains_pages_wait_in_limbo_untouched() {
        let mut t = table(8);
        t.attach(8, 1, false);
        t.attach(9, 1, false);
        t.map(&mapping(1, 0x1000, 0x1fff, 0x5000, true, true));
        let root = t.root(1);
        t.detach(8, 1);
        assert_eq!(t.root(1), root, "one endpoint left");
        t.detach(9, 1);
        assert_eq!(t.root(1), 0);
        assert_eq!(t.stats().pages_in_limbo, 3);
        // A reader still walking the old tree finds the old translation.
        assert_eq!(
            translate(t.words(), L39, root, 0x1000).unwrap().phys,
            0x5000
        );
        // New domains take fresh pages meanwhile.
        let r2 = t.attach(8, 2, false);
        assert_ne!(r2, root);
        t.release_limbo();
        assert_eq!(
            translate(t.words(), L39, root, 0x1000),
            None,
            "zeroed on release"
        );
        assert_eq!(t.stats().pages_in_limbo, 0);
    }

    #[test]
    fn a_full_store_loses_translations_not_the_process() {
        let mut t = table(4);
        t.attach(8, 1, false);
        t.map(&mapping(1, 0x1000, 0x1fff, 0x5000, true, true));
        t.map(&mapping(1, 1 << 32, (1 << 32) + 0xfff, 0x6000, true, true));
        assert_eq!(t.stats().alloc_failures, 1);
        assert_eq!(tr(&t, 1, 0x1000).unwrap().phys, 0x5000);
        assert_eq!(tr(&t, 1, 1 << 32), None);
        assert_eq!(t.attach(9, 2, false), 0, "no root: nothing translates");
    }

    #[test]
    fn reset_and_bypass_domains_have_no_tree() {
        let mut t = table(16);
        assert_eq!(t.attach(8, 1, true), 0);
        t.attach(9, 2, false);
        t.map(&mapping(2, 0, 0xfff, 0, true, true));
        t.reset();
        assert_eq!(t.root(2), 0);
        assert!(t.endpoints(2).is_empty());
    }

    #[test]
    fn the_whole_64_bit_range_works() {
        let mut t = TranslationTable::new(memory_store(32), levels_for(u64::MAX));
        t.attach(8, 1, false);
        t.map(&mapping(1, u64::MAX - 0xfff, u64::MAX, 0x1000, true, true));
        t.map(&mapping(1, 0, 0xfff, 0x2000, true, false));
        let l = translate(t.words(), t.levels(), t.root(1), u64::MAX).unwrap();
        assert_eq!(l.phys, 0x1fff);
        assert_eq!(walk(t.words(), t.levels(), t.root(1)).len(), 2);
        t.unmap(&unmapping(1, 0, u64::MAX));
        assert!(walk(t.words(), t.levels(), t.root(1)).is_empty());
    }

    #[derive(Clone, Debug)]
    enum Op {
        Map {
            page: u64,
            pages: u64,
            phys_page: u64,
            write: bool,
        },
        Unmap {
            page: u64,
            pages: u64,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        // Small page numbers over a 2^21-page window, 2 MiB-aligned often
        // enough to make blocks.
        let page = prop_oneof![0u64..2048, (0u64..4).prop_map(|b| b * 512)];
        prop_oneof![
            (
                page.clone(),
                prop_oneof![1u64..4, Just(512u64), 513u64..1100],
                0u64..4096,
                any::<bool>()
            )
                .prop_map(|(page, pages, phys_page, write)| Op::Map {
                    page,
                    pages,
                    phys_page: phys_page & !511 | (page & 511),
                    write
                }),
            (page, 1u64..1100).prop_map(|(page, pages)| Op::Unmap { page, pages }),
        ]
    }

    proptest! {
        /// The table translates every page exactly as a page-by-page
        /// reference of the same mappings does (mappings never overlap, as
        /// the device model guarantees; UNMAP takes whole mappings).
        #[test]
        fn translates_like_a_page_by_page_reference(ops in proptest::collection::vec(op(), 1..40)) {
            let mut t = table(256);
            t.attach(8, 1, false);
            // mapping start page -> (pages, phys page, write)
            let mut maps: std::collections::BTreeMap<u64, (u64, u64, bool)> = Default::default();
            for op in ops {
                match op {
                    Op::Map { page, pages, phys_page, write } => {
                        let end = page + pages - 1;
                        if maps.iter().any(|(&s, &(n, _, _))| s <= end && page < s + n) {
                            continue;
                        }
                        maps.insert(page, (pages, phys_page, write));
                        t.map(&mapping(1, page << 12, (end << 12) | 0xfff, phys_page << 12, true, write));
                    }
                    Op::Unmap { page, pages } => {
                        let end = page + pages - 1;
                        let gone: Vec<u64> = maps.iter()
                            .filter(|(&s, &(n, _, _))| page <= s && s + n - 1 <= end)
                            .map(|(&s, _)| s).collect();
                        for s in gone {
                            let (n, _, _) = maps.remove(&s).unwrap();
                            t.unmap(&unmapping(1, s << 12, ((s + n) << 12) - 1));
                        }
                    }
                }
            }
            for p in 0..3200u64 {
                let want = maps.range(..=p).next_back()
                    .filter(|(&s, &(n, _, _))| p < s + n)
                    .map(|(&s, &(_, phys, w))| ((phys + p - s) << 12, w));
                let got = tr(&t, 1, (p << 12) | 0x10).map(|l| (l.phys & !0xfff, l.write));
                prop_assert_eq!(got, want, "page {:#x}", p);
            }
            let walked = walk(t.words(), t.levels(), t.root(1));
            prop_assert_eq!(walked.len(), maps.len());
            for (w, (&s, &(n, phys, write))) in walked.iter().zip(maps.iter()) {
                prop_assert_eq!((w.virt_start, w.virt_end, w.phys_start, w.write),
                    (s << 12, ((s + n) << 12) - 1, phys << 12, write));
            }
        }
    }

    /// The daemon's writer and a back-end's reader (the table-reader crate)
    /// racing, with the reader handshake (docs/mirror-protocol.md §16.3):
    /// an IOVA is mapped to a new page each round, unmapped, and once the
    /// readers' sections have ended the old page is "reused" (poisoned). A
    /// reader that translated the IOVA inside a section must find its page
    /// unpoisoned until the section ends, and every translation it gets is
    /// one the writer made.
    #[test]
    fn readers_racing_the_writer_never_use_a_page_after_its_unmap_completed() {
        use std::sync::atomic::{AtomicBool, AtomicU64};
        const ROUNDS: u64 = 2_000;
        const PAGES: u64 = 8;
        let store: Arc<Box<[AtomicU64]>> = Arc::new(memory_store(64));
        struct Shared(Arc<Box<[AtomicU64]>>);
        impl TableStore for Shared {
            fn words(&self) -> &[AtomicU64] {
                &self.0
            }
        }
        let mut t = TranslationTable::new(Shared(store.clone()), L39);
        let root = t.attach(8, 1, false);
        // live[p]: 1 while guest page p may be the target of a live
        // translation; 0 once "reused".
        let live: Arc<Vec<AtomicU64>> = Arc::new((0..PAGES).map(|_| AtomicU64::new(0)).collect());
        let slots: Arc<Vec<AtomicU64>> = Arc::new((0..2).map(|_| AtomicU64::new(0)).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|r| {
                let (store, live, slots, stop) =
                    (store.clone(), live.clone(), slots.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut hits = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let _g = table_reader::SlotGuard::enter(&slots[r]).unwrap();
                        let Ok(l) = table_reader::translate(&store, L39, root, 0x7000) else {
                            continue;
                        };
                        let p = (l.gpa >> 12) - 0x100;
                        assert!(p < PAGES, "a translation the writer never made");
                        for _ in 0..32 {
                            assert_eq!(live[p as usize].load(Ordering::Acquire), 1, "page {p}");
                        }
                        hits += 1;
                    }
                    hits
                })
            })
            .collect();
        for round in 0..ROUNDS {
            let p = round % PAGES;
            live[p as usize].store(1, Ordering::Release);
            t.map(&mapping(1, 0x7000, 0x7fff, (0x100 + p) << 12, true, true));
            for _ in 0..200 {
                std::hint::spin_loop();
            }
            t.unmap(&unmapping(1, 0x7000, 0x7fff));
            assert_eq!(
                table_reader::synchronize(slots.iter(), std::time::Duration::from_secs(10)),
                table_reader::GraceOutcome::Quiet
            );
            live[p as usize].store(0, Ordering::Release);
        }
        stop.store(true, Ordering::Relaxed);
        let hits: u64 = readers.into_iter().map(|h| h.join().unwrap()).sum();
        eprintln!("{hits} translations used over {ROUNDS} rounds");
    }
}
