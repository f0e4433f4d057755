// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Target `mirror`: QEMU's side of the mirror protocol
//! (docs/mirror-protocol.md) played by a hostile peer: arbitrary headers
//! and payloads, every message type (and unknown ones) with fields at
//! their edges, lies about sizes, files (SCM_RIGHTS) where none belong,
//! notifier flags set in the shared flags file, ACKs out of order, the
//! peer closing while the daemon waits for it. Sometimes a front-end sends
//! requests meanwhile, so that the daemon publishes to the hostile peer.
//!
//! The daemon must log, close the connection, never die and never hang:
//! after every few inputs and at the end a well-behaved front-end is served
//! and a well-behaved QEMU stand-in gets its HELLO and two files.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use test_frontend::{TestVm, VmOptions};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::daemon::{locate, Daemon, SERVE_EVERY};
use crate::{Gen, Options, Target, Verdict};

const HELLO: u16 = 1;
const ACK: u16 = 3;
const MAGIC: u32 = 0x4d49_5556;

fn header(t: u16, flags: u16, size: u32, seq: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..2].copy_from_slice(&t.to_le_bytes());
    h[2..4].copy_from_slice(&flags.to_le_bytes());
    h[4..8].copy_from_slice(&size.to_le_bytes());
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h
}

fn qemu_hello(g: &mut Gen, honest: bool) -> Vec<u8> {
    let mut p = vec![0u8; 24];
    let magic = if honest || g.chance(3, 4) {
        MAGIC
    } else {
        g.u32()
    };
    let major: u16 = if honest || g.chance(3, 4) {
        2
    } else {
        g.u8().into()
    };
    p[0..4].copy_from_slice(&magic.to_le_bytes());
    p[4..6].copy_from_slice(&major.to_le_bytes());
    p[6..8].copy_from_slice(&(g.below(4) as u16).to_le_bytes());
    if !honest && g.chance(1, 4) {
        g.fill(&mut p[8..]);
    }
    if !honest && g.chance(1, 6) {
        p.truncate(g.below(24) as usize);
    }
    p
}

/// The daemon's HELLO and its files, if it comes.
fn receive_hello(s: &UnixStream) -> Option<(Vec<u8>, Vec<OwnedFd>)> {
    let mut buf = [0u8; 80];
    let mut fds = [-1 as RawFd; 4];
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: the iovec points at `buf`, which outlives the call.
    let (n, nfds) = unsafe { s.recv_with_fds(&mut iov, &mut fds) }.ok()?;
    // SAFETY: the first `nfds` descriptors were just received and are ours.
    let owned = fds[..nfds]
        .iter()
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    Some((buf[..n].to_vec(), owned))
}

fn some_file(g: &mut Gen) -> Option<OwnedFd> {
    match g.below(3) {
        0 => File::open("/dev/null").ok().map(OwnedFd::from),
        1 => {
            // SAFETY: eventfd(2); checked, then owned.
            let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
            // SAFETY: a new descriptor nobody else owns.
            (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
        }
        _ => {
            // SAFETY: memfd_create with a C string literal; checked, then owned.
            let fd = unsafe { libc::memfd_create(c"vui-fuzz-mirror".as_ptr(), 0) };
            // SAFETY: a new descriptor nobody else owns.
            let f = (fd >= 0).then(|| unsafe { File::from_raw_fd(fd) })?;
            let _ = f.set_len(g.pick(&[0, 4096, 65536]));
            Some(OwnedFd::from(f))
        }
    }
}

/// Set some bytes of the notifier-flags file (§11), so that the daemon
/// waits for this peer's ACKs.
fn set_notifier_flags(g: &mut Gen, flags_fd: &OwnedFd, len: usize) {
    if len == 0 || len > 1 << 20 {
        return;
    }
    // SAFETY: a new shared mapping of `len` bytes of the flags file (as
    // long as the daemon's HELLO said); unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            flags_fd.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return;
    }
    for _ in 0..g.range(1, 4) {
        let i = if g.bool() {
            8
        } else {
            g.below(len as u64) as usize
        };
        // SAFETY: `i < len`, inside the mapping.
        unsafe { *p.cast::<u8>().add(i) = g.u8() };
    }
    // SAFETY: the mapping made above.
    unsafe { libc::munmap(p, len) };
}

/// A peer that reads what the daemon publishes and ACKs it, honestly or
/// not, until `deadline`; then closes.
fn answer_until(s: UnixStream, mut g: Gen, deadline: Instant) {
    let honest = g.bool();
    answer(s, g, honest, || Instant::now() < deadline);
}

/// Read what the daemon sends and acknowledge its batches (all of them if
/// `honest`, else some, some with a wrong sequence number) while `go`.
fn answer(mut s: UnixStream, mut g: Gen, honest: bool, go: impl Fn() -> bool) {
    let _ = s.set_read_timeout(Some(Duration::from_millis(20)));
    let mut h = [0u8; 16];
    while go() {
        match s.read_exact(&mut h) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => return,
        }
        let size = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
        let seq = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
        let mut payload = vec![0u8; size.min(1 << 16)];
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        if s.read_exact(&mut payload).is_err() {
            return;
        }
        let _ = s.set_read_timeout(Some(Duration::from_millis(20)));
        if u16::from_le_bytes([h[0], h[1]]) == 2 && (honest || g.chance(3, 4)) {
            let seq = if honest || g.chance(3, 4) {
                seq
            } else {
                g.edgy_u64()
            };
            if s.write_all(&header(ACK, 0, 0, seq)).is_err() {
                return;
            }
        }
    }
}

/// A well-behaved QEMU stand-in: connects (once the previous peer is gone:
/// one QEMU at a time), takes its HELLO, acknowledges every batch, until
/// `done`.
fn honest_qemu(path: &std::path::Path, mut g: Gen, done: &AtomicBool) {
    while !done.load(Ordering::Relaxed) {
        let Ok(s) = crate::daemon::connect(path) else {
            return;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if receive_hello(&s).is_some() {
            let payload = qemu_hello(&mut g, true);
            let mut hello = header(HELLO, 0, payload.len() as u32, 0).to_vec();
            hello.extend_from_slice(&payload);
            let mut s = s;
            if s.write_all(&hello).is_ok() {
                answer(s, g, true, || !done.load(Ordering::Relaxed));
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// See the module doc.
#[derive(Debug)]
pub struct MirrorTarget {
    daemon: Daemon,
    inputs: u64,
    messages: u64,
    hellos: u64,
    with_frontend: u64,
    served: u64,
}

impl MirrorTarget {
    pub fn new(opts: &Options) -> Result<Self, String> {
        let bin = locate(opts.daemon.as_deref())?;
        Ok(Self {
            daemon: Daemon::start(&bin, "mirror", true, &[])?,
            inputs: 0,
            messages: 0,
            hellos: 0,
            with_frontend: 0,
            served: 0,
        })
    }

    fn mirror_path(&self) -> std::path::PathBuf {
        self.daemon.mirror.clone().expect("started with a mirror")
    }

    /// A well-behaved QEMU stand-in gets its HELLO with two files.
    fn mirror_serves(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let s = crate::daemon::connect(&self.mirror_path())?;
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .map_err(|e| e.to_string())?;
            match receive_hello(&s) {
                Some((b, fds)) if b.len() == 80 && fds.len() == 2 => return Ok(()),
                other => {
                    // The previous peer may still be on its way out (one
                    // QEMU at a time): try again for a while.
                    if Instant::now() > deadline {
                        return Err(format!(
                            "a well-behaved QEMU got no HELLO with two files: {:?}",
                            other.map(|(b, f)| (b.len(), f.len()))
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    fn check_daemon(&mut self) -> Verdict {
        self.daemon.unharmed()?;
        let served = self.daemon.serves().and_then(|()| self.mirror_serves());
        self.daemon.judge(served)?;
        self.served += 1;
        Ok(())
    }
}

impl Target for MirrorTarget {
    fn one(&mut self, g: &mut Gen) -> Verdict {
        self.inputs += 1;
        let s = crate::daemon::connect(&self.mirror_path())?;
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        let mut s = s;
        let mut flags_file = None;
        if g.chance(3, 4) {
            if let Some((b, fds)) = receive_hello(&s) {
                self.hellos += 1;
                if b.len() == 80 && fds.len() == 2 {
                    let flags_len =
                        u32::from_le_bytes(b[48..52].try_into().expect("4 bytes")) as usize;
                    flags_file = fds.into_iter().nth(1).map(|f| (f, flags_len));
                }
            }
        }
        if g.chance(2, 3) {
            let honest = g.chance(2, 3);
            let p = qemu_hello(g, honest);
            let size = if g.chance(15, 16) {
                p.len() as u32
            } else {
                g.edgy_u32()
            };
            let mut m = header(HELLO, 0, size, 0).to_vec();
            m.extend_from_slice(&p);
            let _ = s.write_all(&m);
            self.messages += 1;
        }
        if let Some((f, len)) = &flags_file {
            if g.chance(1, 3) {
                set_notifier_flags(g, f, *len);
            }
        }
        let mut open = true;
        for _ in 0..g.range(0, 12) {
            if !open {
                break;
            }
            self.messages += 1;
            if g.chance(1, 10) {
                open = s.write_all(&g.bytes_upto(100)).is_ok();
                continue;
            }
            let t: u16 = if g.chance(9, 10) {
                g.range(1, 7) as u16
            } else {
                g.next_u64() as u16
            };
            let len = match t {
                1 | 4 => 24,
                6 => 16,
                _ => 0,
            };
            let len = if g.chance(1, 5) {
                g.below(64) as usize
            } else {
                len
            };
            let mut payload = g.bytes(len);
            if t == 4 && payload.len() >= 24 && g.chance(3, 4) {
                payload[4..8].copy_from_slice(&(g.below(4) as u32).to_le_bytes());
                payload[16] = g.range(0, 3) as u8;
                payload[0..4].copy_from_slice(&g.pick(&[8u32, 9, 10, u32::MAX]).to_le_bytes());
            }
            if t == 6 && payload.len() >= 16 && g.chance(3, 4) {
                payload[8..12].copy_from_slice(&(g.range(0, 3) as u32).to_le_bytes());
            }
            let size = if g.chance(15, 16) {
                payload.len() as u32
            } else {
                g.edgy_u32()
            };
            let seq = match g.below(4) {
                0 => g.edgy_u64(),
                1 => 0,
                _ => g.range(1, 4),
            };
            let flags = if g.chance(7, 8) {
                0
            } else {
                g.next_u64() as u16
            };
            let mut m = header(t, flags, size, seq).to_vec();
            m.extend_from_slice(&payload);
            let nfds = if t == 6 {
                g.range(0, 3)
            } else {
                u64::from(g.chance(1, 8))
            };
            let files: Vec<OwnedFd> = (0..nfds).filter_map(|_| some_file(g)).collect();
            let raw: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
            open = if raw.is_empty() {
                s.write_all(&m).is_ok()
            } else {
                s.send_with_fds(&[&m[..]], &raw).is_ok()
            };
        }
        // Sometimes a front-end makes the daemon publish to this peer
        // while it answers (or not) and then goes away.
        if open && g.chance(1, 4) {
            self.with_frontend += 1;
            let stay = Duration::from_millis(g.range(0, 300));
            let peer_gen = Gen::new(g.next_u64());
            let peer = std::thread::spawn(move || answer_until(s, peer_gen, Instant::now() + stay));
            let opts = VmOptions {
                timeout: Duration::from_secs(15),
                ..VmOptions::default()
            };
            let socket = self.daemon.socket.clone();
            let front_end = std::thread::spawn(move || {
                TestVm::connect(&socket, opts).and_then(|mut vm| {
                    vm.attach(1, 8, 0)?;
                    vm.map(1, 0x10_0000, 0x10_ffff, 0x2_0000, 3)?;
                    vm.unmap(1, 0x10_0000, 0x10_ffff)?;
                    Ok(())
                })
            });
            let _ = peer.join();
            // The peer has gone. If it had acknowledged its dump it was, as
            // far as the daemon can tell, a QEMU that keeps its copy frozen
            // until it connects again, and requests wait for that (mirror
            // protocol §6 rule 4): a well-behaved QEMU comes back.
            let done = Arc::new(AtomicBool::new(false));
            let back = {
                let path = self.mirror_path();
                let done = done.clone();
                let g = Gen::new(g.next_u64());
                std::thread::spawn(move || honest_qemu(&path, g, &done))
            };
            let result = front_end.join().unwrap_or_else(|_| {
                Err(test_frontend::Error::BadReply("front-end panicked".into()))
            });
            done.store(true, Ordering::Relaxed);
            let _ = back.join();
            if let Err(e) = result {
                return Err(match self.daemon.alive() {
                    Err(dead) => format!("panic: {dead}"),
                    Ok(()) => format!("hang: the front-end was not served while a hostile QEMU was on the mirror: {e}"),
                });
            }
        } else {
            drop(s);
        }
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
            "{} messages over {} connections ({} HELLOs received, {} with a front-end publishing meanwhile); well-behaved front-end + QEMU served {} times; daemon restarts after death: {}",
            self.messages, self.inputs, self.hellos, self.with_frontend, self.served, self.daemon.deaths
        )]
    }
}
