// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The table socket's two messages (docs/mirror-protocol.md §16.1), both
//! 16 bytes, little-endian. The reader sends a [`Request`]; the daemon
//! answers ([`encode_answer`]) and, when it is [`Status::Ok`], sends two files on
//! it (`SCM_RIGHTS`): the table, then the reader page.

/// "VUIT".
pub const MAGIC: u32 = 0x5449_5556;
/// The table socket's protocol version.
pub const VERSION: u16 = 1;
/// Bytes of a request and of an answer.
pub const LEN: usize = 16;

/// Request flag: the reader is the vhost-user back-end of the endpoint and
/// translates only through the table, so QEMU's UNMAP-only (vhost IOTLB)
/// notifiers of that endpoint need no UNMAP records (§16.4).
pub const F_OWNS_IOTLB: u16 = 1 << 0;

/// A reader's request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// The endpoint (PCI requester ID, `bus << 8 | devfn`) the reader
    /// serves.
    pub endpoint: u32,
    pub flags: u16,
}

/// The daemon's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Two files follow: the table, the reader page.
    Ok,
    /// Wrong magic, version or size.
    BadRequest,
    /// The daemon serves its cap of readers.
    Full,
    /// The daemon has no shared table (no `--mirror-socket`).
    NoTable,
    /// A status this crate does not know.
    Other(u16),
}

impl Status {
    fn code(self) -> u16 {
        match self {
            Status::Ok => 0,
            Status::BadRequest => 1,
            Status::Full => 2,
            Status::NoTable => 3,
            Status::Other(c) => c,
        }
    }

    fn from_code(c: u16) -> Self {
        match c {
            0 => Status::Ok,
            1 => Status::BadRequest,
            2 => Status::Full,
            3 => Status::NoTable,
            c => Status::Other(c),
        }
    }
}

/// A message that is not one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("{0} bytes, not 16")]
    Size(usize),
    #[error("magic {0:#x}, not \"VUIT\"")]
    Magic(u32),
    #[error("version {0}, not 1")]
    Version(u16),
}

fn header(bytes: &[u8]) -> Result<[u8; LEN], WireError> {
    let b: [u8; LEN] = bytes.try_into().map_err(|_| WireError::Size(bytes.len()))?;
    let magic = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    if magic != MAGIC {
        return Err(WireError::Magic(magic));
    }
    let version = u16::from_le_bytes([b[4], b[5]]);
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    Ok(b)
}

fn put_header(b: &mut [u8; LEN]) {
    b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    b[4..6].copy_from_slice(&VERSION.to_le_bytes());
}

impl Request {
    /// offset 0 magic, 4 version, 6 flags, 8 endpoint, 12 reserved.
    pub fn encode(&self) -> [u8; LEN] {
        let mut b = [0; LEN];
        put_header(&mut b);
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.endpoint.to_le_bytes());
        b
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let b = header(bytes)?;
        Ok(Self {
            flags: u16::from_le_bytes([b[6], b[7]]),
            endpoint: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
        })
    }
}

/// offset 0 magic, 4 version, 6 status, 8 slots in the reader page, 12
/// reserved.
pub fn encode_answer(status: Status, slots: u32) -> [u8; LEN] {
    let mut b = [0; LEN];
    put_header(&mut b);
    b[6..8].copy_from_slice(&status.code().to_le_bytes());
    b[8..12].copy_from_slice(&slots.to_le_bytes());
    b
}

/// The status and slot count of an answer.
pub fn decode_answer(bytes: &[u8]) -> Result<(Status, u32), WireError> {
    let b = header(bytes)?;
    Ok((
        Status::from_code(u16::from_le_bytes([b[6], b[7]])),
        u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_strangers_are_refused() {
        let r = Request {
            endpoint: 0x20,
            flags: F_OWNS_IOTLB,
        };
        assert_eq!(Request::decode(&r.encode()), Ok(r));
        assert_eq!(
            decode_answer(&encode_answer(Status::Full, 32)),
            Ok((Status::Full, 32))
        );
        assert_eq!(
            decode_answer(&encode_answer(Status::Other(9), 0)),
            Ok((Status::Other(9), 0))
        );
        let mut b = r.encode();
        b[0] ^= 1;
        assert!(matches!(Request::decode(&b), Err(WireError::Magic(_))));
        let mut b = r.encode();
        b[4] = 2;
        assert_eq!(Request::decode(&b), Err(WireError::Version(2)));
        assert_eq!(Request::decode(&b[..15]), Err(WireError::Size(15)));
    }
}
