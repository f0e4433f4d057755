// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Target `vhost-user`: arbitrary vhost-user message sequences, with
//! arbitrary files (sealed and unsealed memfds of any size, eventfds,
//! `/dev/null`, pipes), sent to a daemon process over its socket; rings
//! placed in memory full of arbitrary descriptors and kicked.
//!
//! Half the inputs start with a plausible handshake (features, owner, a
//! memory table, queue 0 set up and kicked) mutated here and there, so the
//! arbitrary part reaches the queue and the device; the rest are arbitrary
//! from the first byte. The daemon must never die, and a well-behaved
//! front-end (the test front-end: handshake, ATTACH, MAP, UNMAP, DETACH)
//! must be served after every few inputs and at the end; a front-end it
//! cannot serve within the test front-end's timeout is a hang.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::daemon::{locate, Daemon, SERVE_EVERY};
use crate::{Gen, Options, Target, Verdict};

/// Where the front-end claims its memory is in its own address space.
const FRONTEND_VA: u64 = 0x7f00_0000_0000;
const RAM_GPA: u64 = 0;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const NEED_REPLY: u32 = 0x8;

/// Message codes of the vhost-user protocol (and some past its end).
const CODES: [u32; 28] = [
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 21, 22, 24, 25, 31, 32, 36, 37,
    38, 42,
];

/// Files a message may carry.
enum Fd {
    Owned(OwnedFd),
    File(File),
}

impl Fd {
    fn raw(&self) -> RawFd {
        match self {
            Fd::Owned(o) => o.as_raw_fd(),
            Fd::File(f) => f.as_raw_fd(),
        }
    }
}

fn memfd(g: &mut Gen, len: u64, seal: bool) -> Option<File> {
    // SAFETY: a C string literal; the returned descriptor is checked and
    // owned by the File.
    let fd = unsafe { libc::memfd_create(c"vui-fuzz-ram".as_ptr(), libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a new descriptor nobody else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).ok()?;
    // Rings with arbitrary content, and some plausible descriptors.
    let mut ring = g.bytes(0x4000.min(len) as usize);
    if g.bool() && ring.len() >= 0x4000 {
        for i in 0..8usize {
            let d = DESC as usize + i * 16;
            let addr = 0x8000u64 + i as u64 * 0x100;
            ring[d..d + 8].copy_from_slice(&addr.to_le_bytes());
            ring[d + 8..d + 12].copy_from_slice(&(g.range(0, 0x100) as u32).to_le_bytes());
            let flags: u16 = if i % 2 == 0 { 1 } else { 2 };
            ring[d + 12..d + 14].copy_from_slice(&flags.to_le_bytes());
            ring[d + 14..d + 16].copy_from_slice(&(i as u16 + 1).to_le_bytes());
        }
        let a = AVAIL as usize;
        ring[a..a + 2].copy_from_slice(&0u16.to_le_bytes());
        ring[a + 2..a + 4].copy_from_slice(&(g.range(1, 8) as u16).to_le_bytes());
    }
    let _ = (&f).write_all(&ring);
    if seal {
        // SAFETY: fcntl on a descriptor the File owns.
        unsafe {
            libc::fcntl(
                f.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
            )
        };
    }
    Some(f)
}

fn eventfd() -> Option<OwnedFd> {
    // SAFETY: eventfd(2); the descriptor is checked and then owned.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    // SAFETY: a new descriptor nobody else owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

fn pipe_end() -> Option<OwnedFd> {
    let mut fds = [-1; 2];
    // SAFETY: pipe(2) writes two descriptors into `fds`.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: both are new descriptors nobody else owns.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(w);
    Some(r)
}

/// One connection's worth of messages.
struct Session {
    s: UnixStream,
    ram: Option<File>,
    ram_len: u64,
    kick: Option<OwnedFd>,
    closed: bool,
    sent: u64,
}

impl Session {
    fn some_fd(&mut self, g: &mut Gen) -> Option<Fd> {
        match g.below(6) {
            0 => {
                let len = g.pick(&[0, 0x1000, 0x10_000, 0x100_000]);
                let seal = g.chance(3, 4);
                memfd(g, len, seal).map(Fd::File)
            }
            1 => File::open("/dev/null").ok().map(Fd::File),
            2 => pipe_end().map(Fd::Owned),
            3 => self
                .ram
                .as_ref()
                .and_then(|f| f.try_clone().ok())
                .map(Fd::File),
            _ => eventfd().map(Fd::Owned),
        }
    }

    fn send(&mut self, code: u32, flags: u32, payload: &[u8], fds: &[Fd], size_lie: Option<u32>) {
        if self.closed {
            return;
        }
        let mut msg = Vec::with_capacity(12 + payload.len());
        msg.extend_from_slice(&code.to_le_bytes());
        msg.extend_from_slice(&flags.to_le_bytes());
        msg.extend_from_slice(&size_lie.unwrap_or(payload.len() as u32).to_le_bytes());
        msg.extend_from_slice(payload);
        let raw: Vec<RawFd> = fds.iter().map(Fd::raw).collect();
        let r = if raw.is_empty() {
            self.s.write_all(&msg).map(|_| msg.len())
        } else {
            self.s
                .send_with_fds(&[&msg[..]], &raw)
                .map_err(std::io::Error::from)
        };
        self.sent += 1;
        if r.is_err() {
            self.closed = true;
        }
        // Read whatever comes back (replies), without waiting long.
        let wants_reply =
            matches!(code, 1 | 11 | 15 | 17 | 24 | 31 | 36 | 42) || flags & NEED_REPLY != 0;
        if wants_reply {
            let mut buf = [0u8; 4096];
            match self.s.read(&mut buf) {
                Ok(0) => self.closed = true,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => self.closed = true,
            }
        }
    }

    fn u64_msg(&mut self, code: u32, v: u64) {
        self.send(code, 1, &v.to_le_bytes(), &[], None);
    }

    /// The plausible handshake, each step mutated now and then.
    fn handshake(&mut self, g: &mut Gen) {
        let feat = if g.chance(7, 8) {
            (1 << 32) | (1 << 30) | 0x7f
        } else {
            g.next_u64()
        };
        self.send(1, 1, &[], &[], None);
        self.u64_msg(2, feat);
        self.send(15, 1, &[], &[], None);
        let pf = if g.chance(7, 8) {
            0x1 | 0x8 | 0x200
        } else {
            g.next_u64()
        };
        self.u64_msg(16, pf);
        self.send(3, 1, &[], &[], None);
        // The memory table: the RAM file at GPA 0, sometimes lying about its
        // size or offset.
        if let Some(ram) = self.ram.as_ref().and_then(|f| f.try_clone().ok()) {
            let mut p = Vec::new();
            p.extend_from_slice(&1u32.to_le_bytes());
            p.extend_from_slice(&0u32.to_le_bytes());
            let size = if g.chance(3, 4) {
                self.ram_len
            } else {
                g.edgy_u64()
            };
            let off = if g.chance(3, 4) { 0 } else { g.edgy_u64() };
            for v in [RAM_GPA, size, FRONTEND_VA, off] {
                p.extend_from_slice(&v.to_le_bytes());
            }
            self.send(
                5,
                1 | (u32::from(g.bool()) * NEED_REPLY),
                &p,
                &[Fd::File(ram)],
                None,
            );
        }
        let q = if g.chance(7, 8) {
            0
        } else {
            g.range(0, 3) as u32
        };
        let num = if g.chance(7, 8) { 64 } else { g.edgy_u32() };
        self.vring_state(8, q, num);
        let mut p = Vec::new();
        p.extend_from_slice(&q.to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        for a in [DESC, USED, AVAIL, 0] {
            let v = if g.chance(9, 10) {
                FRONTEND_VA + a
            } else {
                g.edgy_u64()
            };
            p.extend_from_slice(&v.to_le_bytes());
        }
        self.send(9, 1, &p, &[], None);
        self.vring_state(10, q, 0);
        if let Some(call) = eventfd() {
            self.send(13, 1, &u64::from(q).to_le_bytes(), &[Fd::Owned(call)], None);
        }
        if let Some(kick) = eventfd() {
            let dup = kick.try_clone().ok();
            self.send(12, 1, &u64::from(q).to_le_bytes(), &[Fd::Owned(kick)], None);
            self.kick = dup;
        }
        self.vring_state(18, q, 1);
    }

    fn vring_state(&mut self, code: u32, index: u32, num: u32) {
        let mut p = Vec::new();
        p.extend_from_slice(&index.to_le_bytes());
        p.extend_from_slice(&num.to_le_bytes());
        self.send(code, 1, &p, &[], None);
    }

    fn kick(&mut self) {
        if let Some(k) = &self.kick {
            let one = 1u64.to_ne_bytes();
            // SAFETY: write(2) of 8 bytes from a live buffer to our eventfd.
            unsafe { libc::write(k.as_raw_fd(), one.as_ptr().cast(), 8) };
        }
    }

    /// One arbitrary message.
    fn arbitrary(&mut self, g: &mut Gen) {
        if g.chance(1, 12) {
            // Raw bytes, any length.
            let b = g.bytes_upto(300);
            if self.s.write_all(&b).is_err() {
                self.closed = true;
            }
            return;
        }
        let code = if g.chance(9, 10) {
            g.pick(&CODES)
        } else {
            g.edgy_u32()
        };
        let flags = match g.below(8) {
            0 => g.u32(),
            1 => 1 | NEED_REPLY,
            _ => 1,
        };
        let mut payload = match code {
            2 | 6 | 12 | 13 | 14 | 16 => {
                let v = match g.below(4) {
                    0 => g.below(4) | (u64::from(g.bool()) << 8),
                    _ => g.edgy_u64(),
                };
                v.to_le_bytes().to_vec()
            }
            8 | 10 | 11 | 18 => {
                let mut p = (g.below(4) as u32).to_le_bytes().to_vec();
                p.extend_from_slice(&g.edgy_u32().to_le_bytes());
                p
            }
            9 => {
                let mut p = (g.below(3) as u32).to_le_bytes().to_vec();
                p.extend_from_slice(&g.edgy_u32().to_le_bytes());
                for _ in 0..4 {
                    let v = if g.bool() {
                        FRONTEND_VA + g.below(0x10_0000)
                    } else {
                        g.edgy_u64()
                    };
                    p.extend_from_slice(&v.to_le_bytes());
                }
                p
            }
            5 | 37 | 38 => {
                let n = if code == 5 { g.below(10) as u32 } else { 1 };
                let mut p = Vec::new();
                if code == 5 {
                    p.extend_from_slice(&n.to_le_bytes());
                    p.extend_from_slice(&0u32.to_le_bytes());
                } else {
                    p.extend_from_slice(&0u64.to_le_bytes());
                }
                for _ in 0..n {
                    let gpa = if g.bool() {
                        g.below(16) << 16
                    } else {
                        g.edgy_u64()
                    };
                    let size = if g.bool() { self.ram_len } else { g.edgy_u64() };
                    let va = if g.bool() { FRONTEND_VA } else { g.edgy_u64() };
                    let off = if g.chance(3, 4) { 0 } else { g.edgy_u64() };
                    for v in [gpa, size, va, off] {
                        p.extend_from_slice(&v.to_le_bytes());
                    }
                }
                p
            }
            24 | 25 => {
                let size = if g.bool() {
                    g.below(48) as u32
                } else {
                    g.edgy_u32()
                };
                let mut p = (g.below(48) as u32).to_le_bytes().to_vec();
                p.extend_from_slice(&size.to_le_bytes());
                p.extend_from_slice(&g.edgy_u32().to_le_bytes());
                p.extend(g.bytes(size.min(256) as usize));
                p
            }
            _ => g.bytes_upto(64),
        };
        if g.chance(1, 10) && !payload.is_empty() {
            let i = g.below(payload.len() as u64) as usize;
            payload[i] ^= 1 << g.below(8);
        }
        let nfds = match code {
            5 => g.range(0, 9),
            6 | 12 | 13 | 14 | 21 | 32 | 37 | 42 => g.range(0, 2),
            _ => u64::from(g.chance(1, 10)),
        };
        let fds: Vec<Fd> = (0..nfds).filter_map(|_| self.some_fd(g)).collect();
        let lie = g.chance(1, 16).then(|| g.edgy_u32() % 0x2000);
        self.send(code, flags, &payload, &fds, lie);
    }
}

/// See the module doc.
#[derive(Debug)]
pub struct VhostUserTarget {
    daemon: Daemon,
    inputs: u64,
    messages: u64,
    closed_by_daemon: u64,
    served: u64,
}

impl VhostUserTarget {
    pub fn new(opts: &Options) -> Result<Self, String> {
        let bin = locate(opts.daemon.as_deref())?;
        Ok(Self {
            daemon: Daemon::start(&bin, "vu", false, &[])?,
            inputs: 0,
            messages: 0,
            closed_by_daemon: 0,
            served: 0,
        })
    }

    fn check_daemon(&mut self) -> Verdict {
        self.daemon.unharmed()?;
        let served = self.daemon.serves();
        self.daemon.judge(served)?;
        self.served += 1;
        Ok(())
    }
}

impl Target for VhostUserTarget {
    fn one(&mut self, g: &mut Gen) -> Verdict {
        self.inputs += 1;
        let s = crate::daemon::connect(&self.daemon.socket)?;
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        let ram_len = g.pick(&[0x10_000u64, 0x40_000, 0x100_000]);
        let seal = g.chance(7, 8);
        let ram = memfd(g, ram_len, seal);
        let mut sess = Session {
            s,
            ram,
            ram_len,
            kick: None,
            closed: false,
            sent: 0,
        };
        if g.bool() {
            sess.handshake(g);
            sess.kick();
        }
        for _ in 0..g.range(1, 24) {
            if sess.closed {
                break;
            }
            if g.chance(1, 6) {
                sess.kick();
            } else {
                sess.arbitrary(g);
            }
        }
        // Give the workers a moment with the kicked rings before leaving.
        if sess.kick.is_some() {
            std::thread::sleep(Duration::from_millis(2));
        }
        self.messages += sess.sent;
        self.closed_by_daemon += u64::from(sess.closed);
        drop(sess);
        self.daemon.living()?;
        if self.inputs.is_multiple_of(SERVE_EVERY) {
            self.check_daemon()?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Verdict {
        self.check_daemon()
    }

    fn daemon(&mut self) -> Option<&mut Daemon> {
        Some(&mut self.daemon)
    }

    fn notes(&self) -> Vec<String> {
        vec![format!(
            "{} messages over {} connections ({} closed by the daemon); a well-behaved front-end served {} times; daemon restarts after death: {}",
            self.messages, self.inputs, self.closed_by_daemon, self.served, self.daemon.deaths
        )]
    }
}
