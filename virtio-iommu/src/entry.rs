// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The 40-byte entry: one layout, one codec, for the migration state's
//! entries (docs/device-state.md) and the state journal's records
//! (docs/state-journal.md), which add kinds of their own.
//!
//! | bytes | field |
//! |-------|-------|
//! | 0     | kind |
//! | 1     | ATTACH: `bypass`; BYPASS: on; DONE: status |
//! | 2–3   | DONE: ring position |
//! | 4–7   | endpoint |
//! | 8–11  | domain (DONE: digest, bytes 8–15) |
//! | 12–15 | MAP flags |
//! | 16–23 | virt_start (FEATURES: the features) |
//! | 24–31 | virt_end |
//! | 32–39 | phys_start |

use crate::change::Change;
use crate::map_unmap::{Map, Unmap};

/// Size of one entry.
pub const ENTRY_LEN: usize = 40;

/// One entry's bytes.
pub(crate) type Bytes = [u8; ENTRY_LEN];

/// The kinds of entry. ATTACH and MAP are the migration state's; the
/// journal has them all.
pub(crate) mod kind {
    pub const ATTACH: u8 = 1;
    pub const MAP: u8 = 2;
    pub const DETACH: u8 = 3;
    pub const UNMAP: u8 = 4;
    pub const BYPASS: u8 = 5;
    pub const RESET: u8 = 6;
    pub const DONE: u8 = 7;
    pub const FEATURES: u8 = 8;
}

const ATTACH_F_BYPASS: u8 = 1;

/// A change as an entry.
pub(crate) fn encode_change(c: &Change) -> Bytes {
    let mut e = [0u8; ENTRY_LEN];
    match *c {
        Change::Attach {
            endpoint,
            domain,
            bypass,
        } => {
            e[0] = kind::ATTACH;
            e[1] = if bypass { ATTACH_F_BYPASS } else { 0 };
            put_u32(&mut e, 4, endpoint);
            put_u32(&mut e, 8, domain);
        }
        Change::Detach { endpoint, domain } => {
            e[0] = kind::DETACH;
            put_u32(&mut e, 4, endpoint);
            put_u32(&mut e, 8, domain);
        }
        Change::Map(m) => {
            e[0] = kind::MAP;
            put_u32(&mut e, 8, m.domain);
            put_u32(&mut e, 12, m.flags);
            put_u64(&mut e, 16, m.virt_start);
            put_u64(&mut e, 24, m.virt_end);
            put_u64(&mut e, 32, m.phys_start);
        }
        Change::Unmap(u) => {
            e[0] = kind::UNMAP;
            put_u32(&mut e, 8, u.domain);
            put_u64(&mut e, 16, u.virt_start);
            put_u64(&mut e, 24, u.virt_end);
        }
        Change::GlobalBypass(on) => {
            e[0] = kind::BYPASS;
            e[1] = u8::from(on);
        }
        Change::Reset => e[0] = kind::RESET,
    }
    e
}

/// The change an entry holds; `None` for the kinds that are not changes
/// (reserved fields are ignored).
pub(crate) fn decode_change(e: &Bytes) -> Option<Change> {
    Some(match e[0] {
        kind::ATTACH => Change::Attach {
            endpoint: le_u32(&e[4..8]),
            domain: le_u32(&e[8..12]),
            bypass: e[1] & ATTACH_F_BYPASS != 0,
        },
        kind::DETACH => Change::Detach {
            endpoint: le_u32(&e[4..8]),
            domain: le_u32(&e[8..12]),
        },
        kind::MAP => Change::Map(Map {
            domain: le_u32(&e[8..12]),
            flags: le_u32(&e[12..16]),
            virt_start: le_u64(&e[16..24]),
            virt_end: le_u64(&e[24..32]),
            phys_start: le_u64(&e[32..40]),
        }),
        kind::UNMAP => Change::Unmap(Unmap {
            domain: le_u32(&e[8..12]),
            virt_start: le_u64(&e[16..24]),
            virt_end: le_u64(&e[24..32]),
        }),
        kind::BYPASS => Change::GlobalBypass(e[1] & 1 != 0),
        kind::RESET => Change::Reset,
        _ => return None,
    })
}

pub(crate) fn put_u32(e: &mut Bytes, at: usize, v: u32) {
    e[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_u64(e: &mut Bytes, at: usize, v: u64) {
    e[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

pub(crate) fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

pub(crate) fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_change_round_trips_and_lands_where_the_table_says() {
        let map = Change::Map(Map {
            domain: 2,
            virt_start: 0x1000,
            virt_end: 0x1fff,
            phys_start: 0x8000,
            flags: 3,
        });
        let e = encode_change(&map);
        assert_eq!(e[0], kind::MAP);
        assert_eq!(le_u32(&e[8..12]), 2);
        assert_eq!(le_u32(&e[12..16]), 3);
        assert_eq!(le_u64(&e[32..40]), 0x8000);
        for c in [
            Change::Attach {
                endpoint: 8,
                domain: 2,
                bypass: true,
            },
            Change::Detach {
                endpoint: 8,
                domain: 2,
            },
            map,
            Change::Unmap(Unmap::all(2)),
            Change::GlobalBypass(true),
            Change::GlobalBypass(false),
            Change::Reset,
        ] {
            assert_eq!(decode_change(&encode_change(&c)), Some(c), "{c:?}");
        }
        for k in [0, kind::DONE, kind::FEATURES, 9, 0xff] {
            let mut e = [0u8; ENTRY_LEN];
            e[0] = k;
            assert_eq!(decode_change(&e), None, "kind {k}");
        }
    }
}
