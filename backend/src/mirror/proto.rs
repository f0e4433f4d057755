// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Wire format of the translation mirror (docs/mirror-protocol.md, version 2.5).
//!
//! Pure encoding and decoding: no sockets here. Every integer is
//! little-endian; every message is a 16-byte [`Header`] and a payload.

use virtio_iommu::{Map, Unmap};

/// Size of the message header (§3).
pub const HEADER_LEN: usize = 16;
/// Largest header + payload (§3).
pub const MAX_MESSAGE_LEN: usize = 65536;
/// Largest payload (§3).
pub const MAX_PAYLOAD_LEN: usize = MAX_MESSAGE_LEN - HEADER_LEN;
/// Size of one EVENTS record (§5).
pub const RECORD_LEN: usize = 40;
/// Most records one EVENTS message carries (§3).
pub const MAX_RECORDS: usize = MAX_PAYLOAD_LEN / RECORD_LEN;
/// Size of QEMU's HELLO payload before 2.2, the least accepted, and of the
/// FAULT payload (§4).
pub const HELLO_LEN: usize = 24;
/// Size of QEMU's HELLO payload from 2.2 on: with its `instance` (§4).
pub const QEMU_HELLO_LEN: usize = 48;
/// Size of either side's HELLO payload from 2.4 on: with the MSI window
/// at [`MSI_WINDOW_AT`] (§4).
pub const HELLO_LEN_2_4: usize = 64;
/// Where QEMU's HELLO carries its `instance` (2.2, §4).
const INSTANCE_AT: usize = 40;
/// Where both HELLOs carry the MSI window, `msi_start` then `msi_last`
/// (2.4, §4).
pub const MSI_WINDOW_AT: usize = 48;
/// Size of the daemon's HELLO payload: QEMU's, with the shared memory's
/// geometry where QEMU has reserved bytes, and the MSI window (§4, §11).
pub const DAEMON_HELLO_LEN: usize = HELLO_LEN_2_4;
pub const FAULT_LEN: usize = 24;
/// Size of the VFIO_DEVICE payload (§4).
pub const VFIO_DEVICE_LEN: usize = 16;

/// `magic` of HELLO: the bytes `V U I M`.
pub const MAGIC: u32 = 0x4d49_5556;
pub const MAJOR: u16 = 2;
pub const MINOR: u16 = 6;

/// HELLO `features` bit (daemon, 2.1): the daemon owns the DMA translation
/// of the iommufd-backed VFIO devices QEMU forwards with VFIO_DEVICE (§14).
pub const FEATURE_VFIO_DEVICES: u64 = 1 << 0;
/// HELLO `features` bit (daemon, 2.3): the daemon signals the eventfd QEMU
/// gives with COMPLETION_FD after every update of the request queue's used
/// ring (§15).
pub const FEATURE_COMPLETION_FD: u64 = 1 << 1;
/// HELLO `features` bit (both sides, 2.4): the HELLO carries an MSI window
/// at [`MSI_WINDOW_AT`]: QEMU's is the machine's doorbell its translate()
/// lets through untranslated, the daemon's the RESV_MEM MSI region its
/// PROBE reports. They must be the same.
pub const FEATURE_MSI_WINDOW: u64 = 1 << 2;

/// FAULT `flags` bits QEMU may set: READ, WRITE (§4).
pub const FAULT_FLAGS: u32 = 0b11;
/// FAULT `reason` values QEMU may send: DOMAIN, MAPPING (§4).
pub const FAULT_REASONS: [u8; 2] = [1, 2];

/// VFIO_DEVICE `op` values (§14).
pub const VFIO_DEVICE_ADD: u32 = 1;
pub const VFIO_DEVICE_REMOVE: u32 = 2;

/// EVENTS flag: QEMU's copy is complete with this batch (§4).
pub const EVENTS_F_SYNC: u16 = 1;

/// Message types (§4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum MsgType {
    Hello = 1,
    Events = 2,
    Ack = 3,
    Fault = 4,
    SystemReset = 5,
    VfioDevice = 6,
    CompletionFd = 7,
}

impl MsgType {
    fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::Hello,
            2 => Self::Events,
            3 => Self::Ack,
            4 => Self::Fault,
            5 => Self::SystemReset,
            6 => Self::VfioDevice,
            7 => Self::CompletionFd,
            _ => return None,
        })
    }
}

/// A protocol error (§12): the connection is closed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("unknown message type {0}")]
    UnknownType(u16),
    #[error("message type {0:?} is not sent by QEMU")]
    WrongDirection(MsgType),
    #[error("payload of {size} bytes exceeds the limit of {MAX_PAYLOAD_LEN}")]
    TooLarge { size: u32 },
    #[error("{what} payload of {size} bytes is shorter than {min}")]
    TooShort {
        what: &'static str,
        size: usize,
        min: usize,
    },
    #[error("bad HELLO magic {0:#x}")]
    BadMagic(u32),
    #[error("unsupported major version {0}")]
    BadMajor(u16),
    #[error("message before the peer's HELLO")]
    NoHello,
    #[error("no HELLO in time")]
    NoHelloInTime,
    #[error("no ACK of the dump in time")]
    NoDumpAckInTime,
    #[error("a HELLO for a recovered state from another process than the front-end's")]
    NotTheFrontEnd,
    #[error("second HELLO")]
    SecondHello,
    #[error("ACK for batch {got}, expected {expected}")]
    AckOutOfOrder { got: u64, expected: u64 },
    #[error("ACK for batch {got}, but the last batch sent is {sent}")]
    AckUnsent { got: u64, sent: u64 },
    #[error("SYSTEM_RESET with id 0")]
    ResetIdZero,
    #[error("SYSTEM_RESET id {0} does not fit in 32 bits")]
    ResetIdTooLarge(u64),
    #[error("FAULT with undefined flags {0:#x}")]
    BadFaultFlags(u32),
    #[error("FAULT with undefined reason {0}")]
    BadFaultReason(u8),
    #[error("VFIO_DEVICE with unknown op {0}")]
    BadVfioOp(u32),
    #[error("VFIO_DEVICE, but this daemon did not offer VFIO_DEVICES in its HELLO")]
    VfioNotOffered,
    #[error("VFIO_DEVICE ADD without its two files")]
    MissingFiles,
    #[error("COMPLETION_FD, but this daemon did not offer it in its HELLO")]
    CompletionFdNotOffered,
    #[error("COMPLETION_FD without its two files")]
    MissingCompletionFile,
    #[error("{0} files received with no VFIO_DEVICE ADD or COMPLETION_FD to carry them")]
    StrayFiles(usize),
    #[error(
        "MSI window mismatch: QEMU's machine lets its MSI doorbell {q_start:#x}-{q_last:#x} \
         through untranslated, but this daemon's PROBE reports {d_start:#x}-{d_last:#x}: \
         the guest's MSIs would fault; start the daemon with --msi-window {q_start:#x}-{q_last:#x}"
    )]
    MsiWindowMismatch {
        q_start: u64,
        q_last: u64,
        d_start: u64,
        d_last: u64,
    },
    #[error(
        "MSI window mismatch: QEMU's machine set no MSI doorbell (no reserved-regions), \
         but this daemon's PROBE reports {d_start:#x}-{d_last:#x}"
    )]
    NoQemuMsiWindow { d_start: u64, d_last: u64 },
}

/// The MSI window a QEMU's HELLO names (2.4, §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QemuMsiWindow {
    /// A QEMU before 2.4 says nothing of it (it let x86's through).
    Unknown,
    /// Its machine set none: nothing passes untranslated.
    None,
    /// The inclusive window its translate() lets through.
    Window(u64, u64),
}

impl QemuMsiWindow {
    /// Whether a daemon whose PROBE reports `daemon` serves this QEMU
    /// right: the same window, or a QEMU that does not say.
    pub fn check(self, daemon: (u64, u64)) -> Result<(), ProtoError> {
        let (d_start, d_last) = daemon;
        match self {
            Self::Unknown => Ok(()),
            Self::Window(s, l) if (s, l) == daemon => Ok(()),
            Self::Window(q_start, q_last) => Err(ProtoError::MsiWindowMismatch {
                q_start,
                q_last,
                d_start,
                d_last,
            }),
            Self::None => Err(ProtoError::NoQemuMsiWindow { d_start, d_last }),
        }
    }
}

/// The message header (§3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub msg_type: u16,
    pub flags: u16,
    pub size: u32,
    pub seq: u64,
}

impl Header {
    pub fn encode(&self, out: &mut [u8; HEADER_LEN]) {
        out[0..2].copy_from_slice(&self.msg_type.to_le_bytes());
        out[2..4].copy_from_slice(&self.flags.to_le_bytes());
        out[4..8].copy_from_slice(&self.size.to_le_bytes());
        out[8..16].copy_from_slice(&self.seq.to_le_bytes());
    }

    pub fn decode(b: &[u8; HEADER_LEN]) -> Self {
        Self {
            msg_type: u16::from_le_bytes([b[0], b[1]]),
            flags: u16::from_le_bytes([b[2], b[3]]),
            size: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            seq: le_u64(&b[8..16]),
        }
    }

    /// The payload size, refused when over the limit (§3).
    pub fn payload_len(&self) -> Result<usize, ProtoError> {
        let size = self.size as usize;
        if size > MAX_PAYLOAD_LEN {
            return Err(ProtoError::TooLarge { size: self.size });
        }
        Ok(size)
    }
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// The shared memory a daemon HELLO describes (§4, §11); its two files
/// travel with the HELLO message (SCM_RIGHTS: the table, then the flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HelloShm {
    /// 4 KiB pages in the table file.
    pub table_pages: u32,
    /// Levels of every domain's tree.
    pub table_levels: u8,
    /// Bytes in the notifier-flags file.
    pub flags_len: u32,
}

/// The daemon's HELLO payload (§4): `boot_bypass` is the bypass value the
/// device takes on a system reset; `shm` the shared memory sent with it;
/// `msi_window` the one its PROBE reports (with [`FEATURE_MSI_WINDOW`] in
/// `features`; else sent as zeros).
pub fn encode_hello(
    boot_bypass: bool,
    features: u64,
    shm: HelloShm,
    msi_window: (u64, u64),
    out: &mut Vec<u8>,
) {
    push_header(out, MsgType::Hello, 0, DAEMON_HELLO_LEN, 0);
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&MAJOR.to_le_bytes());
    out.extend_from_slice(&MINOR.to_le_bytes());
    out.extend_from_slice(&features.to_le_bytes());
    out.push(u8::from(boot_bypass));
    out.extend_from_slice(&[0; 7]);
    out.extend_from_slice(&shm.table_pages.to_le_bytes());
    out.push(shm.table_levels);
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&shm.flags_len.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    // QEMU's `instance` slot: reserved here.
    out.extend_from_slice(&[0; 8]);
    let (start, last) = match features & FEATURE_MSI_WINDOW {
        0 => (0, 0),
        _ => msi_window,
    };
    out.extend_from_slice(&start.to_le_bytes());
    out.extend_from_slice(&last.to_le_bytes());
}

fn push_header(out: &mut Vec<u8>, t: MsgType, flags: u16, size: usize, seq: u64) {
    let mut h = [0u8; HEADER_LEN];
    Header {
        msg_type: t as u16,
        flags,
        // Callers keep payloads within MAX_PAYLOAD_LEN, which fits in u32.
        size: size as u32,
        seq,
    }
    .encode(&mut h);
    out.extend_from_slice(&h);
}

/// One state change (§5), as the daemon sends it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    /// `root`: the page index of the domain's tree in the shared table
    /// (0 for a bypass domain), §11.
    Attach {
        endpoint: u32,
        domain: u32,
        bypass: bool,
        root: u32,
    },
    Detach {
        endpoint: u32,
        domain: u32,
    },
    /// The record's `flags` are the MAP's (READ, WRITE, MMIO: 16 bits).
    Map(Map),
    Unmap(Unmap),
    GlobalBypass(bool),
    /// `system`: the answer to SYSTEM_RESET `reset_id` (§9).
    Reset {
        system: bool,
        reset_id: u32,
    },
}

impl Record {
    /// The 40-byte record (§5).
    pub fn encode(&self) -> [u8; RECORD_LEN] {
        let (op, flags, endpoint, domain, reset_id, start, end, phys) = match *self {
            Record::Attach {
                endpoint,
                domain,
                bypass,
                root,
            } => (
                1u8,
                u16::from(bypass),
                endpoint,
                domain,
                0,
                0,
                0,
                u64::from(root),
            ),
            Record::Detach { endpoint, domain } => (2, 0, endpoint, domain, 0, 0, 0, 0),
            Record::Map(m) => (
                3,
                m.flags as u16,
                0,
                m.domain,
                0,
                m.virt_start,
                m.virt_end,
                m.phys_start,
            ),
            Record::Unmap(u) => (4, 0, 0, u.domain, 0, u.virt_start, u.virt_end, 0),
            Record::GlobalBypass(on) => (5, u16::from(on), 0, 0, 0, 0, 0, 0),
            Record::Reset { system, reset_id } => (6, u16::from(system), 0, 0, reset_id, 0, 0, 0),
        };
        let mut r = [0u8; RECORD_LEN];
        r[0] = op;
        r[2..4].copy_from_slice(&flags.to_le_bytes());
        r[4..8].copy_from_slice(&endpoint.to_le_bytes());
        r[8..12].copy_from_slice(&domain.to_le_bytes());
        r[12..16].copy_from_slice(&reset_id.to_le_bytes());
        r[16..24].copy_from_slice(&start.to_le_bytes());
        r[24..32].copy_from_slice(&end.to_le_bytes());
        r[32..40].copy_from_slice(&phys.to_le_bytes());
        r
    }
}

/// Append one EVENTS message carrying `records` (at most [`MAX_RECORDS`]).
pub fn encode_events(seq: u64, sync: bool, records: &[Record], out: &mut Vec<u8>) {
    debug_assert!(records.len() <= MAX_RECORDS);
    let flags = if sync { EVENTS_F_SYNC } else { 0 };
    push_header(out, MsgType::Events, flags, records.len() * RECORD_LEN, seq);
    for r in records {
        out.extend_from_slice(&r.encode());
    }
}

/// A DMA fault QEMU saw (§4 FAULT, §10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub endpoint: u32,
    /// bit 0 READ, bit 1 WRITE.
    pub flags: u32,
    pub address: u64,
    /// virtio-iommu fault reason: 1 DOMAIN, 2 MAPPING.
    pub reason: u8,
}

/// A VFIO_DEVICE message (§14): an iommufd-backed VFIO device behind the
/// vIOMMU appeared (ADD, with its iommufd file and device file) or went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VfioDeviceMsg {
    /// Its endpoint ID (requester ID).
    pub endpoint: u32,
    /// The device ID `VFIO_DEVICE_BIND_IOMMUFD` gave QEMU (ADD only).
    pub devid: u32,
    /// ADD (true) or REMOVE.
    pub add: bool,
}

/// A message from QEMU, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FromQemu {
    /// `instance`: the QEMU process's random identity, the same on every
    /// connection it makes (2.2, §4, §6 rule 4); 0 from an older QEMU.
    Hello {
        instance: u64,
        /// The MSI window its machine lets through (2.4).
        msi_window: QemuMsiWindow,
    },
    Ack(u64),
    Fault(Fault),
    SystemReset(u32),
    VfioDevice(VfioDeviceMsg),
    /// The pipe to write on used-ring updates and the kick page come with
    /// it (2.3, §15).
    CompletionFd,
}

/// Decode a message QEMU sent, given its header and payload.
pub fn decode_from_qemu(h: &Header, payload: &[u8]) -> Result<FromQemu, ProtoError> {
    let t = MsgType::from_u16(h.msg_type).ok_or(ProtoError::UnknownType(h.msg_type))?;
    match t {
        MsgType::Hello => {
            if payload.len() < HELLO_LEN {
                return Err(ProtoError::TooShort {
                    what: "HELLO",
                    size: payload.len(),
                    min: HELLO_LEN,
                });
            }
            let magic = le_u32(&payload[0..4]);
            if magic != MAGIC {
                return Err(ProtoError::BadMagic(magic));
            }
            let major = u16::from_le_bytes([payload[4], payload[5]]);
            if major != MAJOR {
                return Err(ProtoError::BadMajor(major));
            }
            let instance = payload
                .get(INSTANCE_AT..INSTANCE_AT + 8)
                .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
            let features = le_u64(&payload[8..16]);
            let msi_window = match payload.get(MSI_WINDOW_AT..MSI_WINDOW_AT + 16) {
                None => QemuMsiWindow::Unknown,
                Some(_) if features & FEATURE_MSI_WINDOW == 0 => QemuMsiWindow::None,
                Some(w) => QemuMsiWindow::Window(le_u64(&w[..8]), le_u64(&w[8..])),
            };
            Ok(FromQemu::Hello {
                instance,
                msi_window,
            })
        }
        MsgType::Ack => Ok(FromQemu::Ack(h.seq)),
        MsgType::Fault => {
            if payload.len() < FAULT_LEN {
                return Err(ProtoError::TooShort {
                    what: "FAULT",
                    size: payload.len(),
                    min: FAULT_LEN,
                });
            }
            // The guest's driver acts on these values: only those §4 defines
            // reach it.
            let flags = le_u32(&payload[4..8]);
            if flags & !FAULT_FLAGS != 0 {
                return Err(ProtoError::BadFaultFlags(flags));
            }
            let reason = payload[16];
            if !FAULT_REASONS.contains(&reason) {
                return Err(ProtoError::BadFaultReason(reason));
            }
            Ok(FromQemu::Fault(Fault {
                endpoint: le_u32(&payload[0..4]),
                flags,
                address: le_u64(&payload[8..16]),
                reason,
            }))
        }
        MsgType::SystemReset => {
            let id = u32::try_from(h.seq).map_err(|_| ProtoError::ResetIdTooLarge(h.seq))?;
            if id == 0 {
                return Err(ProtoError::ResetIdZero);
            }
            Ok(FromQemu::SystemReset(id))
        }
        MsgType::VfioDevice => {
            if payload.len() < VFIO_DEVICE_LEN {
                return Err(ProtoError::TooShort {
                    what: "VFIO_DEVICE",
                    size: payload.len(),
                    min: VFIO_DEVICE_LEN,
                });
            }
            let add = match le_u32(&payload[8..12]) {
                VFIO_DEVICE_ADD => true,
                VFIO_DEVICE_REMOVE => false,
                op => return Err(ProtoError::BadVfioOp(op)),
            };
            Ok(FromQemu::VfioDevice(VfioDeviceMsg {
                endpoint: le_u32(&payload[0..4]),
                devid: le_u32(&payload[4..8]),
                add,
            }))
        }
        MsgType::CompletionFd => Ok(FromQemu::CompletionFd),
        MsgType::Events => Err(ProtoError::WrongDirection(t)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        s.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect()
    }

    #[test]
    fn events_example_of_the_protocol_doc_encodes_byte_for_byte() {
        let mut out = Vec::new();
        encode_events(
            7,
            false,
            &[
                Record::Attach {
                    endpoint: 0x18,
                    domain: 1,
                    bypass: false,
                    root: 5,
                },
                Record::Map(Map {
                    domain: 1,
                    virt_start: 0x1000,
                    virt_end: 0x1fff,
                    phys_start: 0x200_0000,
                    flags: 3,
                }),
            ],
            &mut out,
        );
        let want = hex("02 00 00 00 50 00 00 00  07 00 00 00 00 00 00 00
             01 00 00 00 18 00 00 00  01 00 00 00 00 00 00 00
             00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00
             05 00 00 00 00 00 00 00
             03 00 03 00 00 00 00 00  01 00 00 00 00 00 00 00
             00 10 00 00 00 00 00 00  ff 1f 00 00 00 00 00 00
             00 00 00 02 00 00 00 00");
        assert_eq!(out, want);
    }

    #[test]
    fn hello_carries_magic_boot_bypass_the_shared_memory_geometry_and_the_msi_window() {
        let mut out = Vec::new();
        let shm = HelloShm {
            table_pages: 0x40000,
            table_levels: 3,
            flags_len: 0x10000,
        };
        encode_hello(
            true,
            FEATURE_MSI_WINDOW,
            shm,
            (0x0809_0000, 0x0809_ffff),
            &mut out,
        );
        assert_eq!(out.len(), HEADER_LEN + DAEMON_HELLO_LEN);
        assert_eq!(&out[16..20], b"VUIM");
        assert_eq!(&out[20..22], &[2, 0], "major 2");
        assert_eq!(&out[22..24], &[6, 0], "minor 6");
        assert_eq!(out[24], 4, "MSI_WINDOW");
        assert_eq!(out[32], 1);
        assert_eq!(&out[40..48], &[0, 0, 4, 0, 3, 0, 0, 0]);
        assert_eq!(&out[48..56], &[0, 0, 1, 0, 0, 0, 0, 0]);
        assert_eq!(&out[56..64], &[0; 8], "QEMU's instance slot");
        assert_eq!(&out[64..72], &0x0809_0000u64.to_le_bytes());
        assert_eq!(&out[72..80], &0x0809_ffffu64.to_le_bytes());
        let h = Header::decode(out[..16].try_into().unwrap());
        // The daemon's HELLO decodes as a QEMU's: no instance, the window.
        assert_eq!(
            decode_from_qemu(&h, &out[16..]),
            Ok(FromQemu::Hello {
                instance: 0,
                msi_window: QemuMsiWindow::Window(0x0809_0000, 0x0809_ffff),
            })
        );
        // Without the feature, the window is sent as zeros.
        out.clear();
        encode_hello(false, 0, shm, (0x0809_0000, 0x0809_ffff), &mut out);
        assert_eq!(&out[64..80], &[0; 16]);
    }

    fn qemu_hello(len: usize, features: u64) -> (Header, Vec<u8>) {
        let mut p = vec![0u8; HELLO_LEN_2_4];
        p[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        p[4..6].copy_from_slice(&MAJOR.to_le_bytes());
        p[6..8].copy_from_slice(&2u16.to_le_bytes());
        p[8..16].copy_from_slice(&features.to_le_bytes());
        p[40..48].copy_from_slice(&0x0123_4567_89ab_cdefu64.to_le_bytes());
        p[48..56].copy_from_slice(&0xfee0_0000u64.to_le_bytes());
        p[56..64].copy_from_slice(&0xfeef_ffffu64.to_le_bytes());
        p.truncate(len);
        let h = Header {
            msg_type: MsgType::Hello as u16,
            flags: 0,
            size: len as u32,
            seq: 0,
        };
        (h, p)
    }

    #[test]
    fn a_qemu_hello_carries_its_instance_from_2_2_on() {
        let (h, p) = qemu_hello(QEMU_HELLO_LEN, 0);
        assert_eq!(
            decode_from_qemu(&h, &p),
            Ok(FromQemu::Hello {
                instance: 0x0123_4567_89ab_cdef,
                msi_window: QemuMsiWindow::Unknown,
            })
        );
        // A 2.1 QEMU's 24 bytes, or a HELLO cut inside the field: unknown.
        for len in [HELLO_LEN, 44] {
            let (h, p) = qemu_hello(len, 0);
            assert_eq!(
                decode_from_qemu(&h, &p),
                Ok(FromQemu::Hello {
                    instance: 0,
                    msi_window: QemuMsiWindow::Unknown,
                }),
                "{len} bytes"
            );
        }
    }

    #[test]
    fn a_qemu_hello_carries_its_msi_window_from_2_4_on() {
        let (h, p) = qemu_hello(HELLO_LEN_2_4, FEATURE_MSI_WINDOW);
        let Ok(FromQemu::Hello { msi_window, .. }) = decode_from_qemu(&h, &p) else {
            panic!("not a HELLO");
        };
        assert_eq!(msi_window, QemuMsiWindow::Window(0xfee0_0000, 0xfeef_ffff));
        assert_eq!(msi_window.check((0xfee0_0000, 0xfeef_ffff)), Ok(()));
        let err = msi_window.check((0x0809_0000, 0x0809_ffff)).unwrap_err();
        assert!(
            err.to_string()
                .contains("start the daemon with --msi-window 0xfee00000-0xfeefffff"),
            "{err}"
        );
        // A 2.4 QEMU whose machine set no window: nothing passes, so a
        // daemon that reports one is wrong.
        let (h, p) = qemu_hello(HELLO_LEN_2_4, 0);
        let Ok(FromQemu::Hello { msi_window, .. }) = decode_from_qemu(&h, &p) else {
            panic!("not a HELLO");
        };
        assert_eq!(msi_window, QemuMsiWindow::None);
        assert!(msi_window.check((0xfee0_0000, 0xfeef_ffff)).is_err());
        // Before 2.4: taken at its word.
        assert_eq!(QemuMsiWindow::Unknown.check((1, 2)), Ok(()));
    }

    #[test]
    fn fault_example_of_the_protocol_doc_decodes() {
        let msg = hex("04 00 00 00 18 00 00 00  00 00 00 00 00 00 00 00
             18 00 00 00 02 00 00 00  00 50 00 00 00 00 00 00
             02 00 00 00 00 00 00 00");
        let h = Header::decode(msg[..16].try_into().unwrap());
        let got = decode_from_qemu(&h, &msg[16..16 + h.payload_len().unwrap()]);
        assert_eq!(
            got,
            Ok(FromQemu::Fault(Fault {
                endpoint: 0x18,
                flags: 2,
                address: 0x5000,
                reason: 2
            }))
        );
    }

    #[test]
    fn ack_example_decodes_to_its_seq() {
        let msg = hex("03 00 00 00 00 00 00 00 07 00 00 00 00 00 00 00");
        let h = Header::decode(msg[..16].try_into().unwrap());
        assert_eq!(decode_from_qemu(&h, &[]), Ok(FromQemu::Ack(7)));
    }

    #[test]
    fn protocol_errors_are_named() {
        let h = |t, size, seq| Header {
            msg_type: t,
            flags: 0,
            size,
            seq,
        };
        assert_eq!(
            decode_from_qemu(&h(9, 0, 0), &[]),
            Err(ProtoError::UnknownType(9))
        );
        assert_eq!(
            decode_from_qemu(&h(2, 0, 1), &[]),
            Err(ProtoError::WrongDirection(MsgType::Events))
        );
        assert_eq!(
            decode_from_qemu(&h(5, 0, 0), &[]),
            Err(ProtoError::ResetIdZero)
        );
        assert_eq!(
            decode_from_qemu(&h(5, 0, 1 << 32), &[]),
            Err(ProtoError::ResetIdTooLarge(1 << 32))
        );
        assert!(matches!(
            decode_from_qemu(&h(4, 8, 0), &[0; 8]),
            Err(ProtoError::TooShort { .. })
        ));
        let mut bad = [0u8; HELLO_LEN];
        bad[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        bad[4] = 1;
        assert_eq!(
            decode_from_qemu(&h(1, 24, 0), &bad),
            Err(ProtoError::BadMajor(1)),
            "a version 1 QEMU has no shared table"
        );
        assert_eq!(
            h(3, MAX_PAYLOAD_LEN as u32 + 1, 0).payload_len(),
            Err(ProtoError::TooLarge {
                size: MAX_PAYLOAD_LEN as u32 + 1
            })
        );
    }

    #[test]
    fn a_fault_with_an_undefined_reason_or_flag_is_a_protocol_error() {
        let h = Header {
            msg_type: MsgType::Fault as u16,
            flags: 0,
            size: 24,
            seq: 0,
        };
        let fault = |flags: u32, reason: u8| {
            let mut p = [0u8; FAULT_LEN];
            p[4..8].copy_from_slice(&flags.to_le_bytes());
            p[16] = reason;
            decode_from_qemu(&h, &p)
        };
        assert!(fault(1, 1).is_ok());
        assert!(fault(3, 2).is_ok());
        assert_eq!(fault(1, 0), Err(ProtoError::BadFaultReason(0)));
        assert_eq!(fault(1, 3), Err(ProtoError::BadFaultReason(3)));
        assert_eq!(fault(4, 1), Err(ProtoError::BadFaultFlags(4)));
    }

    #[test]
    fn vfio_device_decodes_add_and_remove_and_refuses_other_ops() {
        let h = |size| Header {
            msg_type: 6,
            flags: 0,
            size,
            seq: 0,
        };
        let add = hex("18 00 00 00 05 00 00 00 01 00 00 00 00 00 00 00");
        assert_eq!(
            decode_from_qemu(&h(16), &add),
            Ok(FromQemu::VfioDevice(VfioDeviceMsg {
                endpoint: 0x18,
                devid: 5,
                add: true
            }))
        );
        let remove = hex("18 00 00 00 00 00 00 00 02 00 00 00 00 00 00 00");
        assert!(matches!(
            decode_from_qemu(&h(16), &remove),
            Ok(FromQemu::VfioDevice(VfioDeviceMsg { add: false, .. }))
        ));
        let bad = hex("18 00 00 00 00 00 00 00 03 00 00 00 00 00 00 00");
        assert_eq!(
            decode_from_qemu(&h(16), &bad),
            Err(ProtoError::BadVfioOp(3))
        );
        assert!(matches!(
            decode_from_qemu(&h(12), &add[..12]),
            Err(ProtoError::TooShort { .. })
        ));
    }

    #[test]
    fn a_full_batch_fits_the_size_limit() {
        assert_eq!(MAX_RECORDS, 1638);
        let records = vec![Record::GlobalBypass(true); MAX_RECORDS];
        let mut out = Vec::new();
        encode_events(1, true, &records, &mut out);
        assert!(out.len() <= MAX_MESSAGE_LEN);
    }
}
