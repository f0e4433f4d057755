// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Parsing the device-readable part of a request (virtio 1.2 §5.13.6).
//!
//! The guest is untrusted: every length is checked here, once, and the rest
//! of the device works on typed values.

use vm_memory::ByteValued;

use crate::map_unmap::{Map, Unmap};
use crate::wire::{req_type, ReqAttach, ReqDetach, ReqHead, ReqMap, ReqProbe, ReqUnmap, Status};

/// A request, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Attach {
        domain: u32,
        endpoint: u32,
        flags: u32,
        reserved_clear: bool,
    },
    /// Its reserved bytes are not kept: the device ignores them (virtio 1.3
    /// §5.13.6.4.2).
    Detach {
        domain: u32,
        endpoint: u32,
    },
    Map(Map),
    Unmap(Unmap),
    Probe {
        endpoint: u32,
    },
}

impl Request {
    /// The request type byte.
    pub fn type_byte(&self) -> u8 {
        match self {
            Request::Attach { .. } => req_type::ATTACH,
            Request::Detach { .. } => req_type::DETACH,
            Request::Map(_) => req_type::MAP,
            Request::Unmap(_) => req_type::UNMAP,
            Request::Probe { .. } => req_type::PROBE,
        }
    }
}

/// Read a `T` from the start of `bytes`, if they hold one.
fn read<T: ByteValued + Default>(bytes: &[u8]) -> Option<T> {
    let mut v = T::default();
    let n = v.as_slice().len();
    v.as_mut_slice().copy_from_slice(bytes.get(..n)?);
    Some(v)
}

/// Decode the device-readable bytes of one request.
///
/// - Fewer bytes than a head: `DEVERR` (the device cannot even tell what was
///   asked).
/// - An unknown type: `UNSUPP`, which the device answers by leaving the
///   buffer unwritten with used length 0 (virtio 1.3 §5.13.6.1: a request
///   `type` the device does not recognise).
/// - Fewer bytes than the request's structure: `IOERR`, the spec's status for
///   a malformed buffer. Extra bytes are ignored.
pub fn parse(bytes: &[u8]) -> Result<Request, Status> {
    let head: ReqHead = read(bytes).ok_or(Status::DevErr)?;
    let short = Status::IoErr;
    match head.req_type {
        req_type::ATTACH => {
            let r: ReqAttach = read(bytes).ok_or(short)?;
            Ok(Request::Attach {
                domain: r.domain.into(),
                endpoint: r.endpoint.into(),
                flags: r.flags.into(),
                reserved_clear: r.reserved == [0; 4],
            })
        }
        req_type::DETACH => {
            let r: ReqDetach = read(bytes).ok_or(short)?;
            Ok(Request::Detach {
                domain: r.domain.into(),
                endpoint: r.endpoint.into(),
            })
        }
        req_type::MAP => {
            let r: ReqMap = read(bytes).ok_or(short)?;
            Ok(Request::Map(Map {
                domain: r.domain.into(),
                virt_start: r.virt_start.into(),
                virt_end: r.virt_end.into(),
                phys_start: r.phys_start.into(),
                flags: r.flags.into(),
            }))
        }
        req_type::UNMAP => {
            let r: ReqUnmap = read(bytes).ok_or(short)?;
            Ok(Request::Unmap(Unmap {
                domain: r.domain.into(),
                virt_start: r.virt_start.into(),
                virt_end: r.virt_end.into(),
            }))
        }
        req_type::PROBE => {
            let r: ReqProbe = read(bytes).ok_or(short)?;
            Ok(Request::Probe {
                endpoint: r.endpoint.into(),
            })
        }
        _ => Err(Status::Unsupp),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::field_reassign_with_default)]
    use super::*;

    #[test]
    fn a_map_request_decodes_little_endian() {
        let mut r = ReqMap::default();
        r.head.req_type = req_type::MAP;
        r.domain = 7.into();
        r.virt_start = 0x1000.into();
        r.virt_end = 0x1fff.into();
        r.phys_start = 0x8000.into();
        r.flags = 3.into();
        assert_eq!(
            parse(r.as_slice()),
            Ok(Request::Map(Map {
                domain: 7,
                virt_start: 0x1000,
                virt_end: 0x1fff,
                phys_start: 0x8000,
                flags: 3
            }))
        );
    }

    #[test]
    fn short_and_unknown_requests_get_their_status() {
        assert_eq!(parse(&[]), Err(Status::DevErr));
        assert_eq!(parse(&[1, 0]), Err(Status::DevErr));
        assert_eq!(parse(&[1, 0, 0, 0, 1]), Err(Status::IoErr));
        assert_eq!(parse(&[9, 0, 0, 0]), Err(Status::Unsupp));
        assert_eq!(parse(&[0, 0, 0, 0]), Err(Status::Unsupp));
    }

    #[test]
    fn reserved_bytes_of_attach_are_reported() {
        let mut r = ReqAttach::default();
        r.head.req_type = req_type::ATTACH;
        r.reserved[2] = 1;
        assert!(matches!(
            parse(r.as_slice()),
            Ok(Request::Attach {
                reserved_clear: false,
                ..
            })
        ));
    }
}
