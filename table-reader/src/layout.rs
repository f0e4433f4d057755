// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The layouts a reader shares with the daemon: the table's entries
//! (docs/mirror-protocol.md §11) and the reader page (§16.2).

/// Table entry bits (§11).
pub const PTE_PRESENT: u64 = 1 << 0;
pub const PTE_TABLE: u64 = 1 << 1;
pub const PTE_READ: u64 = 1 << 2;
pub const PTE_WRITE: u64 = 1 << 3;
pub const PTE_START: u64 = 1 << 4;
/// Bits 12–63: a page index (table entry) or an address (leaf).
pub const PTE_ADDR: u64 = !0xfff;

/// The table's page: 4 KiB of 512 little-endian 64-bit entries.
pub const PAGE_SHIFT: u32 = 12;
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
pub const ENTRIES: usize = 512;
/// Bits of input address per level.
pub const LEVEL_BITS: u32 = 9;
/// Levels a tree may have (§4, HELLO `table_levels`).
pub const MAX_LEVELS: u32 = 6;
/// The highest level a leaf may sit at: 1 GiB blocks (§11).
pub const MAX_LEAF_LEVEL: u32 = 2;

/// The reader page (§16.2): one 4 KiB file per reader, the daemon's words
/// first, the reader's slots after, each slot on a cache line of its own.
pub const READER_PAGE_LEN: usize = 4096;
/// Word 0: [`PAGE_MAGIC`].
pub const W_MAGIC: usize = 0;
/// Word 1: the table's pages (bits 0–31) and levels (bits 32–39).
pub const W_GEOMETRY: usize = 1;
/// Word 2: the endpoint this reader serves.
pub const W_ENDPOINT: usize = 2;
/// Word 3: the endpoint's state, an [`EndpointState`], stored by the daemon
/// with release ordering.
pub const W_STATE: usize = 3;
/// Word 4: how many times the daemon changed word 3 (for logs and tests).
pub const W_CHANGES: usize = 4;
/// Word of slot 0; slot `i` is word `W_SLOT0 + i * SLOT_STRIDE`.
pub const W_SLOT0: usize = 256;
pub const SLOT_STRIDE: usize = 8;
/// Slots per reader: one per back-end thread that translates.
pub const SLOTS: usize = 32;
/// "VUIR", reader page version 1.
pub const PAGE_MAGIC: u64 = 0x5249_5556 | (1 << 32);

// The slots fit the page, each on a 64-byte line of its own, after the
// daemon's words.
const _: () = assert!(slot_word(SLOTS - 1) * 8 + 8 <= READER_PAGE_LEN);
const _: () = assert!(SLOT_STRIDE * 8 == 64 && W_CHANGES < W_SLOT0);

/// The word index of slot `i`.
pub const fn slot_word(i: usize) -> usize {
    W_SLOT0 + i * SLOT_STRIDE
}

/// What an endpoint's DMA goes through (§16.2, word 3 bits 0–1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Not attached and no global bypass, or a state word the reader does
    /// not understand: nothing translates.
    Blocked,
    /// Untranslated: IOVA = guest-physical address.
    Bypass,
    /// Through the tree whose root is this page of the table.
    Translated { root: u32 },
}

/// Word 3 of the reader page, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointState {
    pub mode: Mode,
    /// The daemon stopped waiting for this reader: it must translate
    /// nothing more.
    pub revoked: bool,
}

const MODE_MASK: u64 = 0b11;
const MODE_BLOCKED: u64 = 0;
const MODE_BYPASS: u64 = 1;
const MODE_TRANSLATED: u64 = 2;
const REVOKED: u64 = 1 << 2;

impl EndpointState {
    /// The word the daemon stores.
    pub fn encode(self) -> u64 {
        let mode = match self.mode {
            Mode::Blocked => MODE_BLOCKED,
            Mode::Bypass => MODE_BYPASS,
            Mode::Translated { root } => MODE_TRANSLATED | u64::from(root) << 32,
        };
        mode | if self.revoked { REVOKED } else { 0 }
    }

    /// The state a word says. Unknown modes, and a translated mode with
    /// root 0, read as blocked: fail safe.
    pub fn decode(w: u64) -> Self {
        let mode = match w & MODE_MASK {
            MODE_BYPASS => Mode::Bypass,
            MODE_TRANSLATED if w >> 32 != 0 => Mode::Translated {
                root: (w >> 32) as u32,
            },
            _ => Mode::Blocked,
        };
        Self {
            mode,
            revoked: w & REVOKED != 0,
        }
    }
}

/// The levels a tree needs to cover input addresses up to `input_last`.
pub fn levels_for(input_last: u64) -> u32 {
    let bits = 64 - input_last.leading_zeros();
    bits.saturating_sub(PAGE_SHIFT).div_ceil(LEVEL_BITS).max(1)
}

/// The lowest input-address bit a level-`level` index takes.
pub const fn shift(level: u32) -> u32 {
    PAGE_SHIFT + LEVEL_BITS * level
}

/// The last input address a tree of `levels` levels covers.
pub fn coverage_last(levels: u32) -> u64 {
    let s = shift(levels);
    if s >= 64 {
        u64::MAX
    } else {
        (1u64 << s) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_unknown_words_are_blocked() {
        for mode in [
            Mode::Blocked,
            Mode::Bypass,
            Mode::Translated { root: 1 },
            Mode::Translated { root: u32::MAX },
        ] {
            for revoked in [false, true] {
                let s = EndpointState { mode, revoked };
                assert_eq!(EndpointState::decode(s.encode()), s);
            }
        }
        assert_eq!(EndpointState::decode(3).mode, Mode::Blocked);
        assert_eq!(EndpointState::decode(2).mode, Mode::Blocked, "root 0");
    }
}
