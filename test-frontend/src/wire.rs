// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! virtio-iommu wire formats, written here from the virtio specification
//! (v1.2+, section "IOMMU device") on purpose, independently of the
//! `virtio-iommu` crate: the test front-end double-checks the device's
//! layouts rather than sharing them. Everything is little-endian.

/// Request types.
pub mod req_type {
    /// VIRTIO_IOMMU_T_ATTACH
    pub const ATTACH: u8 = 1;
    /// VIRTIO_IOMMU_T_DETACH
    pub const DETACH: u8 = 2;
    /// VIRTIO_IOMMU_T_MAP
    pub const MAP: u8 = 3;
    /// VIRTIO_IOMMU_T_UNMAP
    pub const UNMAP: u8 = 4;
    /// VIRTIO_IOMMU_T_PROBE
    pub const PROBE: u8 = 5;
}

/// Device feature bits (virtio-iommu specific, bits 0..=6).
pub mod feature {
    /// VIRTIO_IOMMU_F_INPUT_RANGE
    pub const INPUT_RANGE: u64 = 1 << 0;
    /// VIRTIO_IOMMU_F_DOMAIN_RANGE
    pub const DOMAIN_RANGE: u64 = 1 << 1;
    /// VIRTIO_IOMMU_F_MAP_UNMAP
    pub const MAP_UNMAP: u64 = 1 << 2;
    /// VIRTIO_IOMMU_F_BYPASS (legacy, not negotiated by default)
    pub const BYPASS: u64 = 1 << 3;
    /// VIRTIO_IOMMU_F_PROBE
    pub const PROBE: u64 = 1 << 4;
    /// VIRTIO_IOMMU_F_MMIO
    pub const MMIO: u64 = 1 << 5;
    /// VIRTIO_IOMMU_F_BYPASS_CONFIG
    pub const BYPASS_CONFIG: u64 = 1 << 6;
    /// What the front-end asks for by default: bits 0..=6 except BYPASS.
    pub const DEFAULT_WANTED: u64 =
        INPUT_RANGE | DOMAIN_RANGE | MAP_UNMAP | PROBE | MMIO | BYPASS_CONFIG;
    /// VIRTIO_RING_F_EVENT_IDX
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// VIRTIO_F_VERSION_1
    pub const VERSION_1: u64 = 1 << 32;
    /// VHOST_USER_F_PROTOCOL_FEATURES
    pub const PROTOCOL_FEATURES: u64 = 1 << 30;
}

/// ATTACH flags.
pub const ATTACH_F_BYPASS: u32 = 1;
/// MAP flags.
pub const MAP_F_READ: u32 = 1;
/// MAP flags.
pub const MAP_F_WRITE: u32 = 2;
/// MAP flags.
pub const MAP_F_MMIO: u32 = 4;

/// Size of the request tail (`u8 status, u8[3] reserved`).
pub const TAIL_LEN: usize = 4;
/// Largest device-readable request part (PROBE).
pub const MAX_REQ_LEN: usize = 72;
/// Size of the config space.
pub const CONFIG_LEN: usize = 40;
/// Offset of `bypass` in the config space.
pub const CONFIG_BYPASS_OFFSET: u32 = 36;
/// Size of one fault record on the event queue.
pub const FAULT_LEN: usize = 24;

/// Request status (`tail.status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// VIRTIO_IOMMU_S_OK
    Ok,
    /// VIRTIO_IOMMU_S_IOERR
    IoErr,
    /// VIRTIO_IOMMU_S_UNSUPP
    Unsupp,
    /// VIRTIO_IOMMU_S_DEVERR
    DevErr,
    /// VIRTIO_IOMMU_S_INVAL
    Inval,
    /// VIRTIO_IOMMU_S_RANGE
    Range,
    /// VIRTIO_IOMMU_S_NOENT
    NoEnt,
    /// VIRTIO_IOMMU_S_FAULT
    Fault,
    /// VIRTIO_IOMMU_S_NOMEM
    NoMem,
    /// Anything else the device wrote.
    Other(u8),
}

impl From<u8> for Status {
    fn from(v: u8) -> Self {
        match v {
            0 => Status::Ok,
            1 => Status::IoErr,
            2 => Status::Unsupp,
            3 => Status::DevErr,
            4 => Status::Inval,
            5 => Status::Range,
            6 => Status::NoEnt,
            7 => Status::Fault,
            8 => Status::NoMem,
            v => Status::Other(v),
        }
    }
}

impl From<Status> for u8 {
    fn from(s: Status) -> u8 {
        match s {
            Status::Ok => 0,
            Status::IoErr => 1,
            Status::Unsupp => 2,
            Status::DevErr => 3,
            Status::Inval => 4,
            Status::Range => 5,
            Status::NoEnt => 6,
            Status::Fault => 7,
            Status::NoMem => 8,
            Status::Other(v) => v,
        }
    }
}

impl Status {
    /// True for `Status::Ok`.
    pub fn is_ok(self) -> bool {
        self == Status::Ok
    }
}

/// One virtio-iommu request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// ATTACH endpoint to domain.
    Attach {
        /// Domain ID.
        domain: u32,
        /// Endpoint ID.
        endpoint: u32,
        /// `ATTACH_F_*`.
        flags: u32,
    },
    /// DETACH endpoint from domain.
    Detach {
        /// Domain ID.
        domain: u32,
        /// Endpoint ID.
        endpoint: u32,
    },
    /// MAP `[virt_start, virt_end]` (inclusive) to `phys_start`.
    Map {
        /// Domain ID.
        domain: u32,
        /// First IOVA.
        virt_start: u64,
        /// Last IOVA (inclusive).
        virt_end: u64,
        /// First GPA.
        phys_start: u64,
        /// `MAP_F_*`.
        flags: u32,
    },
    /// UNMAP `[virt_start, virt_end]` (inclusive).
    Unmap {
        /// Domain ID.
        domain: u32,
        /// First IOVA.
        virt_start: u64,
        /// Last IOVA (inclusive).
        virt_end: u64,
    },
    /// PROBE an endpoint's properties.
    Probe {
        /// Endpoint ID.
        endpoint: u32,
    },
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

impl Request {
    /// The request type byte.
    pub fn type_byte(&self) -> u8 {
        match self {
            Request::Attach { .. } => req_type::ATTACH,
            Request::Detach { .. } => req_type::DETACH,
            Request::Map { .. } => req_type::MAP,
            Request::Unmap { .. } => req_type::UNMAP,
            Request::Probe { .. } => req_type::PROBE,
        }
    }

    /// Length of the device-readable part.
    pub fn readable_len(&self) -> usize {
        match self {
            Request::Attach { .. } | Request::Detach { .. } => 20,
            Request::Map { .. } => 36,
            Request::Unmap { .. } => 28,
            Request::Probe { .. } => 72,
        }
    }

    /// Length of the device-writable part (`probe_size` only matters for PROBE).
    pub fn writable_len(&self, probe_size: u32) -> usize {
        match self {
            Request::Probe { .. } => probe_size as usize + TAIL_LEN,
            _ => TAIL_LEN,
        }
    }

    /// Encode the device-readable part into `buf` (zeroing reserved bytes);
    /// returns its length.
    pub fn encode(&self, buf: &mut [u8; MAX_REQ_LEN]) -> usize {
        let len = self.readable_len();
        buf[..len].fill(0);
        buf[0] = self.type_byte();
        match *self {
            Request::Attach {
                domain,
                endpoint,
                flags,
            } => {
                put32(buf, 4, domain);
                put32(buf, 8, endpoint);
                put32(buf, 12, flags);
            }
            Request::Detach { domain, endpoint } => {
                put32(buf, 4, domain);
                put32(buf, 8, endpoint);
            }
            Request::Map {
                domain,
                virt_start,
                virt_end,
                phys_start,
                flags,
            } => {
                put32(buf, 4, domain);
                put64(buf, 8, virt_start);
                put64(buf, 16, virt_end);
                put64(buf, 24, phys_start);
                put32(buf, 32, flags);
            }
            Request::Unmap {
                domain,
                virt_start,
                virt_end,
            } => {
                put32(buf, 4, domain);
                put64(buf, 8, virt_start);
                put64(buf, 16, virt_end);
            }
            Request::Probe { endpoint } => {
                put32(buf, 4, endpoint);
            }
        }
        len
    }
}

/// PROBE property types.
pub mod prop {
    /// VIRTIO_IOMMU_PROBE_T_NONE (end of list)
    pub const NONE: u16 = 0;
    /// VIRTIO_IOMMU_PROBE_T_RESV_MEM
    pub const RESV_MEM: u16 = 1;
    /// RESV_MEM subtype: reserved region (no mapping allowed).
    pub const RESV_MEM_T_RESERVED: u8 = 0;
    /// RESV_MEM subtype: MSI doorbell.
    pub const RESV_MEM_T_MSI: u8 = 1;
}

/// One RESV_MEM property of a PROBE reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResvMem {
    /// `prop::RESV_MEM_T_*`.
    pub subtype: u8,
    /// First address.
    pub start: u64,
    /// Last address (inclusive).
    pub end: u64,
}

/// A property the parser did not expect, or a malformed list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeParseError {
    /// A property header claims more bytes than the area holds.
    Truncated {
        /// Offset of the property header.
        offset: usize,
    },
    /// A RESV_MEM property with a length other than 20.
    BadResvMemLength {
        /// Offset of the property header.
        offset: usize,
        /// Its `length` field.
        length: u16,
    },
    /// A property type this front-end does not know.
    UnknownType {
        /// Offset of the property header.
        offset: usize,
        /// Its `type` field (without the reserved high bits).
        ty: u16,
    },
}

/// Parse the PROBE properties area (the writable bytes before the tail).
/// Each property is `{le16 type, le16 length}` followed by `length` bytes;
/// the list ends at a NONE header or at the end of the area.
pub fn parse_probe_props(area: &[u8]) -> Result<Vec<ResvMem>, ProbeParseError> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 4 <= area.len() {
        // The spec reserves the top 4 bits of `type`.
        let ty = u16::from_le_bytes([area[off], area[off + 1]]) & 0x0fff;
        let length = u16::from_le_bytes([area[off + 2], area[off + 3]]);
        if ty == prop::NONE {
            break;
        }
        let body = off + 4;
        let next = body + length as usize;
        if next > area.len() {
            return Err(ProbeParseError::Truncated { offset: off });
        }
        match ty {
            prop::RESV_MEM => {
                if length != 20 {
                    return Err(ProbeParseError::BadResvMemLength {
                        offset: off,
                        length,
                    });
                }
                let b = &area[body..next];
                out.push(ResvMem {
                    subtype: b[0],
                    start: u64::from_le_bytes(b[4..12].try_into().unwrap()),
                    end: u64::from_le_bytes(b[12..20].try_into().unwrap()),
                });
            }
            ty => return Err(ProbeParseError::UnknownType { offset: off, ty }),
        }
        off = next;
    }
    Ok(out)
}

/// Encode a RESV_MEM property (24 bytes) — for tests and fake devices.
pub fn encode_resv_mem(r: &ResvMem) -> [u8; 24] {
    let mut b = [0u8; 24];
    b[0..2].copy_from_slice(&prop::RESV_MEM.to_le_bytes());
    b[2..4].copy_from_slice(&20u16.to_le_bytes());
    b[4] = r.subtype;
    b[8..16].copy_from_slice(&r.start.to_le_bytes());
    b[16..24].copy_from_slice(&r.end.to_le_bytes());
    b
}

/// Fault reasons.
pub mod fault_reason {
    /// VIRTIO_IOMMU_FAULT_R_UNKNOWN
    pub const UNKNOWN: u8 = 0;
    /// VIRTIO_IOMMU_FAULT_R_DOMAIN
    pub const DOMAIN: u8 = 1;
    /// VIRTIO_IOMMU_FAULT_R_MAPPING
    pub const MAPPING: u8 = 2;
}

/// Fault flags.
pub mod fault_flags {
    /// VIRTIO_IOMMU_FAULT_F_READ
    pub const READ: u32 = 1;
    /// VIRTIO_IOMMU_FAULT_F_WRITE
    pub const WRITE: u32 = 2;
    /// VIRTIO_IOMMU_FAULT_F_EXEC
    pub const EXEC: u32 = 4;
    /// VIRTIO_IOMMU_FAULT_F_ADDRESS (`address` is valid)
    pub const ADDRESS: u32 = 0x100;
}

/// One record from the event queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultEvent {
    /// `fault_reason::*`.
    pub reason: u8,
    /// `fault_flags::*`.
    pub flags: u32,
    /// Faulting endpoint.
    pub endpoint: u32,
    /// Faulting address (valid if `flags & ADDRESS`).
    pub address: u64,
}

impl FaultEvent {
    /// Decode a 24-byte fault record.
    pub fn decode(b: &[u8; FAULT_LEN]) -> Self {
        FaultEvent {
            reason: b[0],
            flags: u32::from_le_bytes(b[4..8].try_into().unwrap()),
            endpoint: u32::from_le_bytes(b[8..12].try_into().unwrap()),
            address: u64::from_le_bytes(b[16..24].try_into().unwrap()),
        }
    }

    /// Encode into a 24-byte record — for tests and fake devices.
    pub fn encode(&self) -> [u8; FAULT_LEN] {
        let mut b = [0u8; FAULT_LEN];
        b[0] = self.reason;
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.endpoint.to_le_bytes());
        b[16..24].copy_from_slice(&self.address.to_le_bytes());
        b
    }
}

/// The decoded config space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IommuConfig {
    /// Supported page sizes.
    pub page_size_mask: u64,
    /// Input (IOVA) range start.
    pub input_start: u64,
    /// Input (IOVA) range end (inclusive).
    pub input_end: u64,
    /// First domain ID.
    pub domain_start: u32,
    /// Last domain ID (inclusive).
    pub domain_end: u32,
    /// Size of the PROBE properties area.
    pub probe_size: u32,
    /// Global bypass (VIRTIO_IOMMU_F_BYPASS_CONFIG).
    pub bypass: u8,
}

impl IommuConfig {
    /// Decode the 40-byte config space.
    pub fn decode(b: &[u8; CONFIG_LEN]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        IommuConfig {
            page_size_mask: u64_at(0),
            input_start: u64_at(8),
            input_end: u64_at(16),
            domain_start: u32_at(24),
            domain_end: u32_at(28),
            probe_size: u32_at(32),
            bypass: b[36],
        }
    }

    /// Encode into the 40-byte config space — for tests and fake devices.
    pub fn encode(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        b[0..8].copy_from_slice(&self.page_size_mask.to_le_bytes());
        b[8..16].copy_from_slice(&self.input_start.to_le_bytes());
        b[16..24].copy_from_slice(&self.input_end.to_le_bytes());
        b[24..28].copy_from_slice(&self.domain_start.to_le_bytes());
        b[28..32].copy_from_slice(&self.domain_end.to_le_bytes());
        b[32..36].copy_from_slice(&self.probe_size.to_le_bytes());
        b[36] = self.bypass;
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layouts() {
        let mut b = [0xffu8; MAX_REQ_LEN];
        let n = Request::Attach {
            domain: 0x0102_0304,
            endpoint: 8,
            flags: ATTACH_F_BYPASS,
        }
        .encode(&mut b);
        assert_eq!(n, 20);
        assert_eq!(
            &b[..20],
            &[1, 0, 0, 0, 4, 3, 2, 1, 8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]
        );

        let n = Request::Map {
            domain: 1,
            virt_start: 0x1000,
            virt_end: 0x1fff,
            phys_start: 0xabc000,
            flags: MAP_F_READ | MAP_F_WRITE,
        }
        .encode(&mut b);
        assert_eq!(n, 36);
        assert_eq!(b[0], 3);
        assert_eq!(&b[1..4], &[0, 0, 0]);
        assert_eq!(u64::from_le_bytes(b[8..16].try_into().unwrap()), 0x1000);
        assert_eq!(u64::from_le_bytes(b[16..24].try_into().unwrap()), 0x1fff);
        assert_eq!(u64::from_le_bytes(b[24..32].try_into().unwrap()), 0xabc000);
        assert_eq!(u32::from_le_bytes(b[32..36].try_into().unwrap()), 3);

        let n = Request::Unmap {
            domain: 2,
            virt_start: 5,
            virt_end: 6,
        }
        .encode(&mut b);
        assert_eq!(n, 28);
        assert_eq!(&b[24..28], &[0; 4]);

        let n = Request::Detach {
            domain: 2,
            endpoint: 3,
        }
        .encode(&mut b);
        assert_eq!(n, 20);
        assert_eq!(&b[12..20], &[0; 8]);

        let n = Request::Probe { endpoint: 9 }.encode(&mut b);
        assert_eq!(n, 72);
        assert_eq!(&b[..8], &[5, 0, 0, 0, 9, 0, 0, 0]);
        assert!(b[8..72].iter().all(|&x| x == 0));
    }

    #[test]
    fn probe_props_roundtrip() {
        let r1 = ResvMem {
            subtype: prop::RESV_MEM_T_MSI,
            start: 0xfee0_0000,
            end: 0xfeef_ffff,
        };
        let r2 = ResvMem {
            subtype: prop::RESV_MEM_T_RESERVED,
            start: 0,
            end: 0xfff,
        };
        let mut area = [0u8; 64];
        area[..24].copy_from_slice(&encode_resv_mem(&r1));
        area[24..48].copy_from_slice(&encode_resv_mem(&r2));
        assert_eq!(parse_probe_props(&area).unwrap(), vec![r1, r2]);
        // Exactly filling the area, no NONE terminator.
        assert_eq!(parse_probe_props(&area[..48]).unwrap(), vec![r1, r2]);
        // Truncated.
        assert_eq!(
            parse_probe_props(&area[..40]),
            Err(ProbeParseError::Truncated { offset: 24 })
        );
        area[24] = 7;
        assert_eq!(
            parse_probe_props(&area),
            Err(ProbeParseError::UnknownType { offset: 24, ty: 7 })
        );
    }

    #[test]
    fn config_and_fault_roundtrip() {
        let c = IommuConfig {
            page_size_mask: 0xffff_ffff_ffff_f000,
            input_start: 0,
            input_end: u64::MAX,
            domain_start: 1,
            domain_end: 0xffff,
            probe_size: 512,
            bypass: 1,
        };
        let b = c.encode();
        assert_eq!(b[36], 1);
        assert_eq!(u32::from_le_bytes(b[32..36].try_into().unwrap()), 512);
        assert_eq!(IommuConfig::decode(&b), c);
        let f = FaultEvent {
            reason: fault_reason::MAPPING,
            flags: fault_flags::READ | fault_flags::ADDRESS,
            endpoint: 8,
            address: 0xdead_b000,
        };
        assert_eq!(FaultEvent::decode(&f.encode()), f);
        for v in 0..=255u8 {
            assert_eq!(u8::from(Status::from(v)), v);
        }
    }
}
