// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The back-end's side of the vhost-user socket: framing (a 12-byte header
//! — request, flags, size — then the payload; files with the header) and the
//! numbers of the requests this back-end answers (QEMU's
//! docs/interop/vhost-user.rst). rust-vmm's `vhost` back-end handler
//! refuses `VHOST_USER_IOTLB_MSG`, which QEMU sends to every back-end with
//! `VIRTIO_F_ACCESS_PLATFORM`, hence this small reader of its own.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

pub const GET_FEATURES: u32 = 1;
pub const SET_FEATURES: u32 = 2;
pub const SET_OWNER: u32 = 3;
pub const RESET_OWNER: u32 = 4;
pub const SET_MEM_TABLE: u32 = 5;
pub const SET_VRING_NUM: u32 = 8;
pub const SET_VRING_ADDR: u32 = 9;
pub const SET_VRING_BASE: u32 = 10;
pub const GET_VRING_BASE: u32 = 11;
pub const SET_VRING_KICK: u32 = 12;
pub const SET_VRING_CALL: u32 = 13;
pub const SET_VRING_ERR: u32 = 14;
pub const GET_PROTOCOL_FEATURES: u32 = 15;
pub const SET_PROTOCOL_FEATURES: u32 = 16;
pub const SET_VRING_ENABLE: u32 = 18;
pub const SET_BACKEND_REQ_FD: u32 = 21;
pub const IOTLB_MSG: u32 = 22;

/// Header flags: version 1, reply, the front-end wants a reply.
const VERSION: u32 = 0x1;
const F_REPLY: u32 = 0x4;
pub const F_NEED_REPLY: u32 = 0x8;

/// Protocol features (bit numbers).
pub const PROTOCOL_F_REPLY_ACK: u64 = 1 << 3;
pub const PROTOCOL_F_BACKEND_REQ: u64 = 1 << 5;

/// Payloads are small; anything larger is refused.
const MAX_PAYLOAD: u32 = 4096;
/// Files one message may carry (a memory table: 8 regions).
const MAX_FILES: usize = 8;

/// A message from the front-end.
#[derive(Debug)]
pub struct Message {
    pub request: u32,
    pub flags: u32,
    pub payload: Vec<u8>,
    pub files: Vec<File>,
}

impl Message {
    /// Little-endian u64 at `at` of the payload (0 if short).
    pub fn u64_at(&self, at: usize) -> u64 {
        self.payload
            .get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_le_bytes)
    }

    pub fn u32_at(&self, at: usize) -> u32 {
        self.payload
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u32::from_le_bytes)
    }

    pub fn need_reply(&self) -> bool {
        self.flags & F_NEED_REPLY != 0
    }
}

/// Why the connection ends.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("the front-end closed the connection")]
    Closed,
    #[error("a {0}-byte payload")]
    TooLarge(u32),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Read one message (blocking).
pub fn recv(stream: &mut UnixStream) -> Result<Message, ConnError> {
    let mut hdr = [0u8; 12];
    let mut iov = [libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: hdr.len(),
    }];
    let mut fds: [RawFd; MAX_FILES] = [-1; MAX_FILES];
    // SAFETY: the iovec covers `hdr`, a live buffer any bytes may be
    // written to.
    let (n, nfds) = unsafe { stream.recv_with_fds(&mut iov, &mut fds) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let files: Vec<File> = fds[..nfds]
        .iter()
        // SAFETY: recvmsg installed each fd in this process for us alone.
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Err(ConnError::Closed);
    }
    if n < hdr.len() {
        stream.read_exact(&mut hdr[n..])?;
    }
    let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
    let (request, flags, size) = (word(0), word(4), word(8));
    if size > MAX_PAYLOAD {
        return Err(ConnError::TooLarge(size));
    }
    let mut payload = vec![0u8; size as usize];
    stream.read_exact(&mut payload)?;
    Ok(Message {
        request,
        flags,
        payload,
        files,
    })
}

/// Send the reply to `request` with `payload`.
pub fn reply(stream: &mut UnixStream, request: u32, payload: &[u8]) -> io::Result<()> {
    let mut b = Vec::with_capacity(12 + payload.len());
    b.extend_from_slice(&request.to_le_bytes());
    b.extend_from_slice(&(VERSION | F_REPLY).to_le_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    b.extend_from_slice(payload);
    stream.write_all(&b)
}
