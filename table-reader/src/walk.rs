// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The table walk (docs/mirror-protocol.md §11, "The shared translation
//! table"): what QEMU's `translate()` does, for a back-end.
//!
//! The daemon writes every entry with one release store and fills a new
//! table page before it stores the entry pointing at it; the walk reads each
//! entry with one acquire load, so it sees, per page, the translation before
//! or after a change. The walk trusts nothing it reads: every page index is
//! checked against the table, a leaf is accepted only at levels 0–2, and the
//! walk takes at most `levels` steps — a table with any content gives an
//! answer or a [`WalkError`], never an access outside the slice, never a loop.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::layout::{
    coverage_last, shift, ENTRIES, LEVEL_BITS, MAX_LEAF_LEVEL, MAX_LEVELS, PAGE_SHIFT, PTE_ADDR,
    PTE_PRESENT, PTE_READ, PTE_TABLE, PTE_WRITE,
};

/// One translation: the leaf that holds an IOVA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// The guest-physical address the IOVA translates to.
    pub gpa: u64,
    /// Bytes from the IOVA to the end of its leaf (4 KiB page, 2 MiB or
    /// 1 GiB block): the walk says nothing of the address after those.
    pub len: u64,
    pub read: bool,
    pub write: bool,
}

/// Why a walk found no translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    #[error("IOVA {iova:#x} is not mapped")]
    NotMapped { iova: u64 },
    #[error("IOVA {iova:#x} is beyond what a tree of {levels} levels covers")]
    OutOfRange { iova: u64, levels: u32 },
    #[error("the table is corrupt at level {level} (entry {entry:#x}): {why}")]
    Corrupt {
        level: u32,
        entry: u64,
        why: &'static str,
    },
    #[error("a tree of {0} levels: the table's geometry is wrong")]
    BadLevels(u32),
}

/// The translation of `iova` in the tree whose root is page `root` of
/// `table` (a whole number of 4 KiB pages of entries; trailing words of a
/// partial page are never read), `levels` levels deep.
///
/// Page 0 is never a table (§11): a root or a next-level index of 0, or one
/// at or past the table's end, is [`WalkError::Corrupt`].
pub fn translate(
    table: &[AtomicU64],
    levels: u32,
    root: u32,
    iova: u64,
) -> Result<Leaf, WalkError> {
    if levels == 0 || levels > MAX_LEVELS {
        return Err(WalkError::BadLevels(levels));
    }
    if iova > coverage_last(levels) {
        return Err(WalkError::OutOfRange { iova, levels });
    }
    let pages = (table.len() / ENTRIES) as u64;
    let mut page = u64::from(root);
    let mut entry_above = u64::from(root) << PAGE_SHIFT;
    // One step per level, from the root (level `levels - 1`) down: the loop
    // is the bound.
    for level in (0..levels).rev() {
        if page == 0 || page >= pages {
            return Err(WalkError::Corrupt {
                level,
                entry: entry_above,
                why: "page index outside the table",
            });
        }
        let index = ((iova >> shift(level)) as usize) & (ENTRIES - 1);
        // In bounds: page < pages = len / ENTRIES, index < ENTRIES.
        let e = table[page as usize * ENTRIES + index].load(Ordering::Acquire);
        if e & PTE_PRESENT == 0 {
            return Err(WalkError::NotMapped { iova });
        }
        if e & PTE_TABLE != 0 {
            if level == 0 {
                return Err(WalkError::Corrupt {
                    level,
                    entry: e,
                    why: "a table entry at level 0",
                });
            }
            page = e >> PAGE_SHIFT;
            entry_above = e;
            continue;
        }
        if level > MAX_LEAF_LEVEL {
            return Err(WalkError::Corrupt {
                level,
                entry: e,
                why: "a leaf above level 2",
            });
        }
        let mask = (1u64 << shift(level)) - 1;
        return Ok(Leaf {
            gpa: (e & PTE_ADDR & !mask) | (iova & mask),
            len: mask - (iova & mask) + 1,
            read: e & PTE_READ != 0,
            write: e & PTE_WRITE != 0,
        });
    }
    // Unreachable for levels ≥ 1 (level 0 returns), kept as an answer.
    Err(WalkError::NotMapped { iova })
}

const _: () = assert!(LEVEL_BITS as usize == ENTRIES.trailing_zeros() as usize);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{PAGE_SIZE, PTE_START};
    use proptest::prelude::*;

    pub(crate) fn table(pages: usize) -> Vec<AtomicU64> {
        (0..pages * ENTRIES).map(|_| AtomicU64::new(0)).collect()
    }

    fn set(t: &[AtomicU64], page: u64, index: usize, e: u64) {
        t[page as usize * ENTRIES + index].store(e, Ordering::Release);
    }

    fn next(page: u64) -> u64 {
        page << PAGE_SHIFT | PTE_TABLE | PTE_PRESENT
    }

    /// A 3-level tree at root 1: IOVA 0x1000 → 0x5000 (RW), and a 2 MiB
    /// read-only block at IOVA 0x4000_0000 → 0x8000_0000.
    fn sample() -> Vec<AtomicU64> {
        let t = table(6);
        set(&t, 1, 0, next(2));
        set(&t, 2, 0, next(3));
        set(
            &t,
            3,
            1,
            0x5000 | PTE_READ | PTE_WRITE | PTE_START | PTE_PRESENT,
        );
        // 0x4000_0000: level 2 index 1, level 1 index 0.
        set(&t, 1, 1, next(4));
        set(&t, 4, 0, 0x8000_0000 | PTE_READ | PTE_START | PTE_PRESENT);
        t
    }

    #[test]
    fn pages_and_blocks_translate_with_their_permissions() {
        let t = sample();
        let l = translate(&t, 3, 1, 0x1234).unwrap();
        assert_eq!(
            l,
            Leaf {
                gpa: 0x5234,
                len: 0xdcc,
                read: true,
                write: true
            }
        );
        let b = translate(&t, 3, 1, 0x4010_0000).unwrap();
        assert_eq!((b.gpa, b.len, b.write), (0x8010_0000, 0x10_0000, false));
        assert_eq!(
            translate(&t, 3, 1, 0x2000),
            Err(WalkError::NotMapped { iova: 0x2000 })
        );
        assert!(matches!(
            translate(&t, 3, 1, 1 << 39),
            Err(WalkError::OutOfRange { .. })
        ));
    }

    #[test]
    fn bad_roots_and_levels_are_refused() {
        let t = sample();
        for root in [0, 6, u32::MAX] {
            assert!(matches!(
                translate(&t, 3, root, 0x1000),
                Err(WalkError::Corrupt { .. })
            ));
        }
        assert_eq!(translate(&t, 0, 1, 0), Err(WalkError::BadLevels(0)));
        assert_eq!(translate(&t, 7, 1, 0), Err(WalkError::BadLevels(7)));
        // A partial trailing page is not a page.
        let short: Vec<AtomicU64> = (0..ENTRIES + 10).map(|_| AtomicU64::new(0)).collect();
        assert!(matches!(
            translate(&short, 1, 1, 0),
            Err(WalkError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_table_entry_pointing_at_itself_ends_after_levels_steps() {
        let t = table(4);
        for i in 0..ENTRIES {
            set(&t, 1, i, next(1));
        }
        for levels in 1..=MAX_LEVELS {
            let r = translate(&t, levels, 1, 0x1000);
            assert!(
                matches!(r, Err(WalkError::Corrupt { level: 0, .. })),
                "{r:?}"
            );
        }
    }

    #[test]
    fn a_leaf_above_level_two_is_corrupt() {
        let t = table(2);
        set(&t, 1, 0, PTE_PRESENT | PTE_READ);
        assert!(matches!(
            translate(&t, 4, 1, 0),
            Err(WalkError::Corrupt { level: 3, .. })
        ));
        assert_eq!(translate(&t, 3, 1, 0).unwrap().len, 1 << 30);
    }

    proptest! {
        /// Any table content, any root, levels and IOVA: an answer within
        /// the leaf's span, or an error; never a panic, an access outside
        /// the slice, or a loop.
        #[test]
        fn any_table_content_gives_an_answer_or_an_error(
            words in proptest::collection::vec(any::<u64>(), ENTRIES * 3),
            mix in proptest::collection::vec((0usize..ENTRIES * 3, 0u64..8, 0u64..6), 0..64),
            root in 0u32..5,
            levels in 0u32..8,
            iova in any::<u64>(),
        ) {
            let t: Vec<AtomicU64> = words.into_iter().map(AtomicU64::new).collect();
            // Many entries that point into (and out of) the table, so the
            // walk goes deep.
            for (i, page, bits) in mix {
                t[i].store(page << PAGE_SHIFT | bits | PTE_PRESENT, Ordering::Relaxed);
            }
            if let Ok(l) = translate(&t, levels, root, iova) {
                prop_assert!(l.len >= 1 && l.len <= 1 << 30);
                prop_assert_eq!(l.gpa & (PAGE_SIZE - 1), iova & (PAGE_SIZE - 1));
            }
        }
    }
}
