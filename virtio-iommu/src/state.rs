// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The device's migration state (vhost-user `SET_DEVICE_STATE_FD`): what a
//! fresh device needs to carry on where another one stopped.
//!
//! The format is documented in docs/device-state.md. It holds the driver's
//! view only — the `bypass` byte, the negotiated features, which endpoint
//! is in which domain, and every mapping by guest-physical address — never
//! a host address or an IOAS ID: the destination maps guest RAM where it
//! has it. Queue positions are the front-end's (QEMU saves them with the
//! virtio device). Pure encoding and decoding: no I/O here.

use crate::change::Change;
use crate::entry::{decode_change, encode_change, le_u32, le_u64};

/// `magic`: the bytes `V U I S`.
pub const MAGIC: u32 = 0x5349_5556;
/// The format version this code writes and reads.
pub const VERSION: u16 = 1;
/// Size of the header.
pub const HEADER_LEN: usize = 32;
pub use crate::entry::ENTRY_LEN;
/// The most entries a state may hold: 2^24 (0.6 GiB), far more than any
/// guest makes, so that a hostile stream cannot make the loader allocate
/// without bound.
pub const MAX_ENTRIES: u32 = 1 << 24;

/// The state, decoded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceState {
    /// The features the driver acknowledged.
    pub acked_features: u64,
    /// Config `bypass`.
    pub bypass: bool,
    /// Attachments, then mappings, as [`Change::Attach`] and [`Change::Map`].
    pub entries: Vec<Change>,
}

/// Why a state stream was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("{0} bytes is shorter than the {HEADER_LEN}-byte header")]
    Short(usize),
    #[error("bad magic {0:#x}")]
    BadMagic(u32),
    #[error("version {0} (this daemon reads version {VERSION})")]
    BadVersion(u16),
    #[error("bypass byte {0} (0 or 1)")]
    BadBypass(u8),
    #[error("{entries} entries announced, {bytes} bytes of entries present")]
    Length { entries: u32, bytes: usize },
    #[error("{0} entries is more than the limit of {MAX_ENTRIES}")]
    TooMany(u32),
    #[error("entry {index}: unknown kind {kind}")]
    BadKind { index: usize, kind: u8 },
}

impl DeviceState {
    /// The bytes of the state (docs/device-state.md). Changes other than
    /// ATTACH and MAP are not state and are skipped.
    pub fn encode(&self) -> Vec<u8> {
        let kept = self
            .entries
            .iter()
            .filter(|c| matches!(c, Change::Attach { .. } | Change::Map(_)));
        let n = kept.clone().count();
        let mut out = Vec::with_capacity(HEADER_LEN + n * ENTRY_LEN);
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&[0; 2]);
        out.extend_from_slice(&self.acked_features.to_le_bytes());
        out.push(u8::from(self.bypass));
        out.extend_from_slice(&[0; 3]);
        out.extend_from_slice(&(n as u32).to_le_bytes());
        out.extend_from_slice(&[0; 8]);
        for c in kept {
            out.extend_from_slice(&encode_change(c));
        }
        out
    }

    /// Decode a state. Only the layout is checked here; whether the
    /// attachments and mappings make sense is for the device to judge as it
    /// applies them (the stream is as untrusted as the guest).
    pub fn decode(b: &[u8]) -> Result<Self, StateError> {
        if b.len() < HEADER_LEN {
            return Err(StateError::Short(b.len()));
        }
        let magic = le_u32(&b[0..4]);
        if magic != MAGIC {
            return Err(StateError::BadMagic(magic));
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != VERSION {
            return Err(StateError::BadVersion(version));
        }
        let bypass = match b[16] {
            0 => false,
            1 => true,
            v => return Err(StateError::BadBypass(v)),
        };
        let entries = le_u32(&b[20..24]);
        if entries > MAX_ENTRIES {
            return Err(StateError::TooMany(entries));
        }
        let body = &b[HEADER_LEN..];
        if body.len() != entries as usize * ENTRY_LEN {
            return Err(StateError::Length {
                entries,
                bytes: body.len(),
            });
        }
        let mut out = Vec::with_capacity(entries as usize);
        for (index, e) in body.chunks_exact(ENTRY_LEN).enumerate() {
            let e = e.try_into().expect("chunks of ENTRY_LEN");
            // The state holds attachments and mappings only (the journal's
            // other kinds are not state).
            match decode_change(e) {
                Some(c @ (Change::Attach { .. } | Change::Map(_))) => out.push(c),
                _ => return Err(StateError::BadKind { index, kind: e[0] }),
            }
        }
        Ok(Self {
            acked_features: le_u64(&b[8..16]),
            bypass,
            entries: out,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::kind;
    use crate::map_unmap::Map;

    fn sample() -> DeviceState {
        DeviceState {
            acked_features: 0x1_0000_0077,
            bypass: true,
            entries: vec![
                Change::Attach {
                    endpoint: 8,
                    domain: 1,
                    bypass: false,
                },
                Change::Attach {
                    endpoint: 16,
                    domain: 2,
                    bypass: true,
                },
                Change::Map(Map {
                    domain: 1,
                    virt_start: 0x1000,
                    virt_end: 0x2fff,
                    phys_start: 0x8000,
                    flags: 3,
                }),
            ],
        }
    }

    #[test]
    fn a_state_round_trips_and_matches_the_documented_layout() {
        let s = sample();
        let b = s.encode();
        assert_eq!(b.len(), HEADER_LEN + 3 * ENTRY_LEN);
        assert_eq!(&b[0..4], b"VUIS");
        assert_eq!(b[4], 1, "version");
        assert_eq!(b[16], 1, "bypass");
        assert_eq!(b[20], 3, "entries");
        let map = &b[HEADER_LEN + 2 * ENTRY_LEN..];
        assert_eq!(map[0], kind::MAP);
        assert_eq!(&map[16..24], &0x1000u64.to_le_bytes());
        assert_eq!(DeviceState::decode(&b), Ok(s));
    }

    #[test]
    fn damaged_states_are_refused_by_name() {
        let b = sample().encode();
        assert_eq!(DeviceState::decode(&b[..10]), Err(StateError::Short(10)));
        let mut bad = b.clone();
        bad[0] ^= 1;
        assert!(matches!(
            DeviceState::decode(&bad),
            Err(StateError::BadMagic(_))
        ));
        let mut bad = b.clone();
        bad[4] = 2;
        assert_eq!(DeviceState::decode(&bad), Err(StateError::BadVersion(2)));
        let mut bad = b.clone();
        bad[16] = 7;
        assert_eq!(DeviceState::decode(&bad), Err(StateError::BadBypass(7)));
        assert!(matches!(
            DeviceState::decode(&b[..b.len() - 1]),
            Err(StateError::Length { entries: 3, .. })
        ));
        let mut bad = b.clone();
        bad[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            DeviceState::decode(&bad),
            Err(StateError::TooMany(u32::MAX))
        );
        let mut bad = b.clone();
        bad[HEADER_LEN] = 9;
        assert_eq!(
            DeviceState::decode(&bad),
            Err(StateError::BadKind { index: 0, kind: 9 })
        );
    }

    #[test]
    fn any_bytes_decode_or_fail_without_panicking() {
        let b = sample().encode();
        for cut in 0..b.len() {
            let _ = DeviceState::decode(&b[..cut]);
        }
        for i in 0..b.len() {
            let mut x = b.clone();
            x[i] = x[i].wrapping_add(0x5a);
            let _ = DeviceState::decode(&x);
        }
    }
}
