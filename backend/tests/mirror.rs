// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon with its translation mirror, and a stand-in for QEMU's side of
//! docs/mirror-protocol.md written from the document (not from the daemon's
//! code): the shared translation table, the full-state dump, strict
//! invalidation for endpoints with notifiers, faults on the event queue, and
//! system reset.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use test_frontend::daemon::{DaemonProcess, Scratch};
use test_frontend::{Request, Status, TestVm, VmOptions};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-iommu");
const HELLO: u16 = 1;
const EVENTS: u16 = 2;
const ACK: u16 = 3;
const FAULT: u16 = 4;
const SYSTEM_RESET: u16 = 5;
const COMPLETION_FD: u16 = 7;
const OP_ATTACH: u8 = 1;
const OP_MAP: u8 = 3;
const OP_UNMAP: u8 = 4;
const OP_GLOBAL_BYPASS: u8 = 5;
const OP_RESET: u8 = 6;

/// The daemon with its translation mirror, both sockets in a scratch
/// directory of its own; killed when dropped, the directory removed with it
/// (or kept if the test failed).
fn start(name: &str) -> DaemonProcess {
    let dir = Scratch::new(&format!("mirror-{name}"));
    DaemonProcess::builder(BIN, dir.join("viommu.sock"))
        .mirror(dir.join("viommu.mirror"))
        .args(["--endpoints", "8,16"])
        .rust_log("warn")
        .spawn()
        .owning(dir)
}

/// The daemon's mirror socket.
fn mirror(d: &DaemonProcess) -> &Path {
    d.mirror().expect("started with a mirror socket")
}

/// One decoded 40-byte record: (op, flags, endpoint, domain, start, end, phys).
type Rec = (u8, u16, u32, u32, u64, u64, u64);

/// A shared mapping of a file QEMU received (§11).
struct Shm {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Shm {
    fn map(fd: &OwnedFd, len: usize, writable: bool) -> Self {
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        // SAFETY: a new shared mapping of `len` bytes of a file at least that
        // long (checked by the caller); unmapped on drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        Self { ptr, len }
    }

    fn u64_at(&self, i: u64) -> u64 {
        assert!(
            (i as usize + 1) * 8 <= self.len,
            "entry {i} outside the table"
        );
        // SAFETY: inside the mapping (checked above); read atomically since
        // the daemon writes it concurrently.
        unsafe { (*self.ptr.cast::<AtomicU64>().add(i as usize)).load(Ordering::Acquire) }
    }

    fn set_u8(&self, i: usize, v: u8) {
        assert!(i < self.len);
        // SAFETY: inside the (writable) mapping; atomic as the daemon reads it.
        unsafe { (*self.ptr.cast::<AtomicU8>().add(i)).store(v, Ordering::SeqCst) }
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// QEMU's end of the mirror, minimal.
struct FakeQemu {
    s: UnixStream,
    table: Shm,
    levels: u32,
    flags: Shm,
}

impl FakeQemu {
    /// A QEMU of mirror protocol 2.1: a 24-byte HELLO, no instance.
    fn connect(path: &Path) -> Self {
        Self::connect_with(path, None)
    }

    /// A QEMU of mirror protocol 2.2, process `instance` (§4).
    fn connect_as(path: &Path, instance: u64) -> Self {
        Self::connect_with(path, Some(instance))
    }

    fn connect_with(path: &Path, instance: Option<u64>) -> Self {
        let mut q = Self::open(path);
        let mut hello = [0u8; 48];
        hello[0..4].copy_from_slice(&0x4d49_5556u32.to_le_bytes());
        hello[4..6].copy_from_slice(&2u16.to_le_bytes());
        match instance {
            None => q.send(HELLO, 0, 0, &hello[..24]),
            Some(i) => {
                hello[6..8].copy_from_slice(&2u16.to_le_bytes());
                hello[40..48].copy_from_slice(&i.to_le_bytes());
                q.send(HELLO, 0, 0, &hello);
            }
        }
        q
    }

    /// Connect and take the daemon's HELLO, sending none yet.
    fn open(path: &Path) -> Self {
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // The daemon's HELLO (16 + 64 bytes) comes with two files.
        let mut buf = [0u8; 80];
        let mut fds = [-1; 2];
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: the iovec points at `buf`, which outlives the call.
        let (n, nfds) = unsafe { s.recv_with_fds(&mut iov, &mut fds) }.unwrap();
        assert_eq!((n, nfds), (80, 2), "HELLO and its two files");
        // SAFETY: both descriptors were just received and are ours.
        let fds = fds.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
        assert_eq!(u16::from_le_bytes([buf[0], buf[1]]), HELLO);
        let p = &buf[16..];
        assert_eq!(&p[0..4], &0x4d49_5556u32.to_le_bytes());
        assert_eq!(u16::from_le_bytes([p[4], p[5]]), 2, "major 2");
        // 2.4: the MSI window its PROBE reports, x86's by default.
        assert_eq!(p[8] & 4, 4, "features: MSI_WINDOW");
        assert_eq!(&p[48..56], &0xfee0_0000u64.to_le_bytes());
        assert_eq!(&p[56..64], &0xfeef_ffffu64.to_le_bytes());
        let pages = u32::from_le_bytes(p[24..28].try_into().unwrap()) as usize;
        let levels = u32::from(p[28]);
        let flags_len = u32::from_le_bytes(p[32..36].try_into().unwrap()) as usize;
        let table = Shm::map(&fds[0], pages * 4096, false);
        let flags = Shm::map(&fds[1], flags_len, true);
        // The table is read-only for QEMU: a writable mapping is refused.
        // SAFETY: a throwaway mapping attempt.
        let w = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_WRITE,
                libc::MAP_SHARED,
                fds[0].as_raw_fd(),
                0,
            )
        };
        assert_eq!(
            w,
            libc::MAP_FAILED,
            "the table must be sealed against writes"
        );
        Self {
            s,
            table,
            levels,
            flags,
        }
    }

    /// What QEMU's translate() finds for `iova` in the tree at `root`
    /// (§11): (guest-physical address, READ, WRITE).
    fn translate(&self, root: u32, iova: u64) -> Option<(u64, bool, bool)> {
        let mut page = u64::from(root);
        for level in (0..self.levels).rev() {
            let shift = 12 + 9 * level;
            let e = self.table.u64_at(page * 512 + ((iova >> shift) & 511));
            if e & 1 == 0 {
                return None;
            }
            if e & 2 != 0 {
                page = e >> 12;
                continue;
            }
            let mask = (1u64 << shift) - 1;
            return Some(((e & !0xfff & !mask) | (iova & mask), e & 4 != 0, e & 8 != 0));
        }
        None
    }

    /// Say that endpoint `ep` has IOMMU notifiers (or no longer has).
    fn set_notified(&self, ep: u32, on: bool) {
        self.flags.set_u8(ep as usize, u8::from(on));
    }

    /// Say which notifications endpoint `ep`'s notifiers need (2.5):
    /// bit 0 MAP, bit 1 UNMAP.
    fn set_notifier_kinds(&self, ep: u32, kinds: u8) {
        self.flags.set_u8(ep as usize, kinds);
    }

    fn send(&mut self, t: u16, flags: u16, seq: u64, payload: &[u8]) {
        send(&mut self.s, t, flags, seq, payload);
    }

    /// The next EVENTS batch: (seq, sync, records).
    fn events(&mut self) -> (u64, bool, Vec<Rec>) {
        events(&mut self.s)
    }

    fn ack(&mut self, seq: u64) {
        self.send(ACK, 0, seq, &[]);
    }

    /// Acknowledge every batch from now on, on a thread; the batches arrive
    /// on the returned channel. `self` keeps the write side.
    fn auto_ack(&mut self) -> mpsc::Receiver<(u64, bool, Vec<Rec>)> {
        let mut s = self.s.try_clone().unwrap();
        s.set_read_timeout(None).unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || loop {
            // The daemon closes the connection when the test ends.
            let Ok(batch) =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| events(&mut s)))
            else {
                return;
            };
            send(&mut s, ACK, 0, batch.0, &[]);
            if tx.send(batch).is_err() {
                return;
            }
        });
        rx
    }
}

fn send(s: &mut UnixStream, t: u16, flags: u16, seq: u64, payload: &[u8]) {
    let mut h = [0u8; 16];
    h[0..2].copy_from_slice(&t.to_le_bytes());
    h[2..4].copy_from_slice(&flags.to_le_bytes());
    h[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    s.write_all(&h).unwrap();
    s.write_all(payload).unwrap();
}

/// (type, flags, seq, payload)
fn recv(s: &mut UnixStream) -> (u16, u16, u64, Vec<u8>) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    let t = u16::from_le_bytes([h[0], h[1]]);
    let flags = u16::from_le_bytes([h[2], h[3]]);
    let size = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
    let seq = u64::from_le_bytes(h[8..16].try_into().unwrap());
    let mut payload = vec![0; size];
    s.read_exact(&mut payload).unwrap();
    (t, flags, seq, payload)
}

/// The next EVENTS batch: (seq, sync, records).
fn events(s: &mut UnixStream) -> (u64, bool, Vec<Rec>) {
    let (t, flags, seq, payload) = recv(s);
    assert_eq!(t, EVENTS);
    let recs = payload
        .chunks(40)
        .map(|r| {
            let u32_at = |o: usize| u32::from_le_bytes(r[o..o + 4].try_into().unwrap());
            let u64_at = |o: usize| u64::from_le_bytes(r[o..o + 8].try_into().unwrap());
            (
                r[0],
                u16::from_le_bytes([r[2], r[3]]),
                u32_at(4),
                u32_at(8),
                u64_at(16),
                u64_at(24),
                u64_at(32),
            )
        })
        .collect();
    (seq, flags & 1 != 0, recs)
}

/// The root of `domain`'s tree, from its ATTACH record.
fn root_of(recs: &[Rec], domain: u32) -> u32 {
    let r = recs
        .iter()
        .find(|r| r.0 == OP_ATTACH && r.3 == domain)
        .expect("an ATTACH of the domain");
    assert_ne!(r.6, 0, "a translated domain has a tree");
    r.6 as u32
}

#[test]
fn the_shared_table_translates_maps_and_unmaps_at_once_without_messages() {
    let d = start("table");
    let mut vm = d.connect(VmOptions::default()).unwrap();
    let buf = vm.ram().alloc(0x2000, 0x1000).unwrap();
    assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
    assert_eq!(vm.map(1, 0x1000, 0x2fff, buf, 3).unwrap(), Status::Ok);

    let mut q = FakeQemu::connect(mirror(&d));
    let (seq, sync, recs) = q.events();
    assert_eq!(seq, 1);
    assert!(sync, "the dump ends with SYNC");
    assert!(recs.iter().any(|r| r.0 == OP_GLOBAL_BYPASS));
    assert!(
        !recs.iter().any(|r| r.0 == OP_MAP),
        "mappings are in the table"
    );
    let root = root_of(&recs, 1);
    q.ack(seq);
    assert_eq!(q.translate(root, 0x1000), Some((buf, true, true)));
    assert_eq!(q.translate(root, 0x2fff), Some((buf + 0x1fff, true, true)));
    assert_eq!(q.translate(root, 0x3000), None);

    // No endpoint has notifiers: MAP and UNMAP complete with no message,
    // and the table has changed when they do.
    assert_eq!(vm.map(1, 0x10_0000, 0x10_0fff, buf, 1).unwrap(), Status::Ok);
    assert_eq!(
        q.translate(root, 0x10_0800),
        Some((buf + 0x800, true, false))
    );
    assert_eq!(vm.unmap(1, 0x1000, 0x2fff).unwrap(), Status::Ok);
    assert_eq!(q.translate(root, 0x1000), None);
    q.s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut b = [0u8; 1];
    assert!(q.s.read(&mut b).is_err(), "no message for MAP/UNMAP");
}

/// What QEMU gives with COMPLETION_FD (§15): the pipe it sleeps on, and
/// its kick page, a sealed memory file mapped here read-write.
struct KickWait {
    pipe: std::fs::File,
    page: Shm,
}

impl KickWait {
    /// Make the pipe and the page, and send the daemon their files.
    fn give(q: &mut FakeQemu) -> Self {
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two descriptors, owned below.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK) };
        assert_eq!(rc, 0);
        // SAFETY: fresh descriptors, each owned once.
        let (r, w) = unsafe {
            (
                std::fs::File::from_raw_fd(fds[0]),
                OwnedFd::from_raw_fd(fds[1]),
            )
        };
        // SAFETY: memfd_create with a literal name; the result is owned below.
        let page = unsafe { libc::memfd_create(c"kick".as_ptr(), libc::MFD_ALLOW_SEALING) };
        // SAFETY: a fresh descriptor, owned once.
        let page = unsafe { OwnedFd::from_raw_fd(page) };
        let f = std::fs::File::from(page.try_clone().unwrap());
        f.set_len(4096).unwrap();
        // SAFETY: adds seals to our own memfd.
        let sealed = unsafe {
            libc::fcntl(
                page.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
            )
        };
        assert_eq!(sealed, 0);
        let mut h = [0u8; 16];
        h[0..2].copy_from_slice(&COMPLETION_FD.to_le_bytes());
        q.s.send_with_fds(&[&h[..]], &[w.as_raw_fd(), page.as_raw_fd()])
            .unwrap();
        Self {
            pipe: r,
            page: Shm::map(&page, 4096, true),
        }
    }

    /// A vCPU sleeps on its kick (or no longer does), having kicked from `cpu`.
    fn set(&self, cpu: u8, waiting: bool) {
        self.page.set_u8(0, cpu + 1);
        self.page.set_u8(4, u8::from(waiting));
    }

    /// Signals in the pipe now.
    fn signals(&mut self) -> usize {
        let mut buf = [0u8; 512];
        self.pipe.read(&mut buf).map_or(0, |n| n / 8)
    }
}

#[test]
fn a_vcpu_asleep_on_its_kick_is_told_when_the_used_ring_moves_and_only_then() {
    let d = start("kick-wait");
    let mut vm = d.connect(VmOptions::default()).unwrap();
    let mut q = FakeQemu::connect(mirror(&d));
    let (seq, _, _) = q.events();
    q.ack(seq);
    let _batches = q.auto_ack();
    let mut k = KickWait::give(&mut q);
    // Nobody waits: the daemon writes nothing.
    assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
    assert_eq!(k.signals(), 0);
    // A vCPU waits: each completed batch writes the pipe.
    k.set(0, true);
    let buf = vm.ram().alloc(0x1000, 0x1000).unwrap();
    assert_eq!(vm.map(1, 0x1000, 0x1fff, buf, 3).unwrap(), Status::Ok);
    // The pipe is written just after the used index: allow for the gap.
    let t0 = Instant::now();
    while k.signals() == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "the waiting vCPU is told"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    k.set(0, false);
    assert_eq!(vm.unmap(1, 0x1000, 0x1fff).unwrap(), Status::Ok);
    assert_eq!(k.signals(), 0);
}

/// Run by the test below in a child process (`--ignored --exact`): connect
/// to the mirror socket it names and say how many bytes the daemon sent.
#[test]
#[ignore = "a child process's part of the test below"]
fn mirror_peer_in_another_process() {
    let path = std::env::var("VUI_MIRROR_PEER_SOCKET").expect("run by its parent test");
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 64];
    let n = s.read(&mut b).unwrap_or(0);
    println!("VUI-PEER-GOT {n}");
}

#[test]
fn only_the_front_ends_process_is_served_on_the_mirror_socket() {
    let d = start("stranger");
    let _vm = d.connect(VmOptions::default()).unwrap();
    // The daemon learns the front-end's process right after the accept.
    std::thread::sleep(Duration::from_millis(200));
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "mirror_peer_in_another_process",
            "--nocapture",
        ])
        .env("VUI_MIRROR_PEER_SOCKET", mirror(&d))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("VUI-PEER-GOT 0"),
        "another process gets no HELLO: {text}"
    );
    // The front-end's own process is served.
    let mut q = FakeQemu::connect(mirror(&d));
    let (seq, sync, _) = q.events();
    assert!(sync);
    q.ack(seq);
}

/// A 2.4 QEMU's HELLO naming the MSI window its machine lets through.
fn hello_with_msi_window(start: u64, last: u64) -> [u8; 64] {
    let mut hello = [0u8; 64];
    hello[0..4].copy_from_slice(&0x4d49_5556u32.to_le_bytes());
    hello[4..6].copy_from_slice(&2u16.to_le_bytes());
    hello[6..8].copy_from_slice(&4u16.to_le_bytes());
    hello[8] = 4; // MSI_WINDOW
    hello[40..48].copy_from_slice(&7u64.to_le_bytes());
    hello[48..56].copy_from_slice(&start.to_le_bytes());
    hello[56..64].copy_from_slice(&last.to_le_bytes());
    hello
}

#[test]
fn a_qemu_whose_machine_lets_another_msi_window_through_is_refused() {
    let d = start("msi-window");
    let _vm = d.connect(VmOptions::default()).unwrap();
    // arm64 virt's GICv3 ITS doorbell, to a daemon reporting x86's.
    let mut q = FakeQemu::open(mirror(&d));
    q.send(
        HELLO,
        0,
        0,
        &hello_with_msi_window(0x0809_0000, 0x0809_ffff),
    );
    let mut buf = [0u8; 64];
    let closed = loop {
        match q.s.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => continue,
            Err(_) => break false,
        }
    };
    assert!(closed, "a wrong MSI window closes the connection");
    drop(q);
    // The same window as the daemon's is served.
    let mut q = FakeQemu::open(mirror(&d));
    q.send(
        HELLO,
        0,
        0,
        &hello_with_msi_window(0xfee0_0000, 0xfeef_ffff),
    );
    let (seq, sync, _) = q.events();
    assert!(sync);
    q.ack(seq);
}

#[test]
fn with_notifiers_an_unmap_completes_only_after_qemus_ack() {
    let d = start("notifiers");
    let mut vm = d.connect(VmOptions::default()).unwrap();
    let buf = vm.ram().alloc(0x2000, 0x1000).unwrap();
    let mut q = FakeQemu::connect(mirror(&d));
    let (seq, _, _) = q.events();
    q.ack(seq);
    // Endpoint 8 (say, a VFIO device of QEMU's) has notifiers.
    q.set_notified(8, true);
    let guest = std::thread::spawn(move || {
        assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
        assert_eq!(vm.map(1, 0x1000, 0x2fff, buf, 3).unwrap(), Status::Ok);
        vm
    });
    let (seq, _, recs) = q.events();
    let root = root_of(&recs, 1);
    q.ack(seq);
    let (seq, _, recs) = q.events();
    assert_eq!(recs, vec![(OP_MAP, 3, 0, 1, 0x1000, 0x2fff, buf)]);
    q.ack(seq);
    let mut vm = guest.join().unwrap();

    // Strict invalidation: the UNMAP completes only after QEMU's ACK.
    let (tx, rx) = mpsc::channel();
    let guest = std::thread::spawn(move || {
        let s = vm.unmap(1, 0x1000, 0x2fff).unwrap();
        tx.send(Instant::now()).unwrap();
        (vm, s)
    });
    let (seq, _, recs) = q.events();
    assert_eq!(recs, vec![(OP_UNMAP, 0, 0, 1, 0x1000, 0x2fff, 0)]);
    assert_eq!(q.translate(root, 0x1000), None, "the table goes first");
    std::thread::sleep(Duration::from_millis(200));
    assert!(rx.try_recv().is_err(), "UNMAP completed before the ACK");
    let acked_at = Instant::now();
    q.ack(seq);
    let done_at = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(done_at >= acked_at);
    let (_vm, status) = guest.join().unwrap();
    assert_eq!(status, Status::Ok);
}

#[test]
fn an_unmap_only_notifier_makes_maps_complete_without_a_record_and_unmaps_wait() {
    let d = start("unmap-only");
    let mut vm = d.connect(VmOptions::default()).unwrap();
    let buf = vm.ram().alloc(0x2000, 0x1000).unwrap();
    let mut q = FakeQemu::connect(mirror(&d));
    let (seq, _, _) = q.events();
    q.ack(seq);
    // Endpoint 8 (say, a vhost device: its IOTLB needs UNMAP only).
    q.set_notifier_kinds(8, 2);
    let guest = std::thread::spawn(move || {
        assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
        vm
    });
    let (seq, _, recs) = q.events();
    let root = root_of(&recs, 1);
    q.ack(seq);
    let mut vm = guest.join().unwrap();

    // The MAP completes with nothing sent and nothing acknowledged.
    assert_eq!(vm.map(1, 0x1000, 0x2fff, buf, 3).unwrap(), Status::Ok);
    assert_eq!(q.translate(root, 0x1000), Some((buf, true, true)));
    q.s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut b = [0u8; 1];
    assert!(q.s.read(&mut b).is_err(), "no record for the MAP");
    q.s.set_read_timeout(None).unwrap();

    // The UNMAP is a record, and completes only after its ACK.
    let (tx, rx) = mpsc::channel();
    let guest = std::thread::spawn(move || {
        let s = vm.unmap(1, 0x1000, 0x2fff).unwrap();
        tx.send(Instant::now()).unwrap();
        (vm, s)
    });
    let (seq, _, recs) = q.events();
    assert_eq!(recs, vec![(OP_UNMAP, 0, 0, 1, 0x1000, 0x2fff, 0)]);
    std::thread::sleep(Duration::from_millis(200));
    assert!(rx.try_recv().is_err(), "UNMAP completed before the ACK");
    let acked_at = Instant::now();
    q.ack(seq);
    let done_at = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(done_at >= acked_at);
    let (mut vm, status) = guest.join().unwrap();
    assert_eq!(status, Status::Ok);

    // A VFIO endpoint joining the domain (MAP | UNMAP): MAPs are records again.
    q.set_notifier_kinds(16, 3);
    let guest = std::thread::spawn(move || {
        assert_eq!(vm.attach(1, 16, 0).unwrap(), Status::Ok);
        assert_eq!(vm.map(1, 0x1000, 0x1fff, buf, 1).unwrap(), Status::Ok);
        vm
    });
    let (seq, _, _) = q.events();
    q.ack(seq);
    let (seq, _, recs) = q.events();
    assert_eq!(recs, vec![(OP_MAP, 1, 0, 1, 0x1000, 0x1fff, buf)]);
    q.ack(seq);
    guest.join().unwrap();
}

#[test]
fn a_fault_from_qemu_reaches_the_guest_on_the_event_queue() {
    let d = start("fault");
    let mut vm = d.connect(VmOptions::default()).unwrap();
    let mut q = FakeQemu::connect(mirror(&d));
    let batches = q.auto_ack();
    batches.recv_timeout(Duration::from_secs(5)).unwrap();
    // The daemon learns the event queue at its first notification: one
    // request is enough.
    assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);

    let mut fault = [0u8; 24];
    fault[0..4].copy_from_slice(&8u32.to_le_bytes());
    fault[4..8].copy_from_slice(&2u32.to_le_bytes());
    fault[8..16].copy_from_slice(&0xdead_0000u64.to_le_bytes());
    fault[16] = 2;
    q.send(FAULT, 0, 0, &fault);
    let f = vm
        .next_fault(Duration::from_secs(5))
        .unwrap()
        .expect("a fault event");
    assert_eq!(f.endpoint, 8);
    assert_eq!(f.reason, 2);
    assert_eq!(f.address, 0xdead_0000);
    assert_eq!(f.flags, 2 | 0x100, "WRITE | ADDRESS");
}

/// With `--control-socket`: the mirror's peer in `status`, QEMU's faults
/// in `faults` and as events; with `--log-level trace`, a line per record
/// sent and per message received.
#[test]
fn the_control_socket_shows_the_mirror_peer_and_its_faults_and_trace_shows_its_records() {
    use vhost_user_iommu::control::client::Client;
    use vhost_user_iommu::control::protocol;
    let dir = Scratch::new("mirror-control");
    let control = dir.join("control.sock");
    let log = dir.join("daemon.log");
    let d = DaemonProcess::builder(BIN, dir.join("viommu.sock"))
        .mirror(dir.join("viommu.mirror"))
        .args([
            "--endpoints",
            "8",
            "--log-level",
            "trace",
            "--control-socket",
        ])
        .arg(&control)
        .rust_log("")
        .log_file(&log)
        .spawn()
        .owning(dir);
    let mut c = Client::connect(&control, Duration::from_secs(5)).unwrap();
    let st: protocol::Status = c.call("status", serde_json::Value::Null).unwrap();
    assert!(st.mirror.configured && !st.mirror.connected);
    let mut vm = d.connect(VmOptions::default()).unwrap();
    let mut q = FakeQemu::connect(mirror(&d));
    let batches = q.auto_ack();
    batches.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
    let st: protocol::Status = c.call("status", serde_json::Value::Null).unwrap();
    assert!(st.mirror.connected && st.mirror.synced, "{:?}", st.mirror);
    if let Some(pid) = st.mirror.pid {
        assert_eq!(pid, std::process::id());
    }
    let mut events = Client::connect(&control, Duration::from_secs(5)).unwrap();
    events
        .call::<protocol::Subscription>("subscribe", serde_json::json!({"events": ["fault"]}))
        .unwrap();
    q.send(FAULT, 0, 0, &fault_msg(0xdead_0000));
    vm.next_fault(Duration::from_secs(5))
        .unwrap()
        .expect("a fault event");
    let e = events.next_event(Duration::from_secs(5)).unwrap().unwrap();
    assert_eq!(
        e["data"],
        serde_json::json!({"endpoint": 8, "address": 0xdead_0000u64, "reason": "mapping", "flags": 2})
    );
    let f: protocol::Faults = c.call("faults", serde_json::Value::Null).unwrap();
    assert_eq!(f.total, 1);
    assert_eq!(
        (f.faults[0].endpoint, f.faults[0].address),
        (8, 0xdead_0000)
    );
    drop(vm);
    let text = d.wait_log("front-end disconnected", Duration::from_secs(5));
    for needle in [
        "mirror_record seq=",
        "attach endpoint=0x8 domain=1 bypass=false root=",
        "mirror_recv connection=",
        "Fault(Fault {",
        "virtio_iommu_attach domain=1 endpoint=0x8",
    ] {
        assert!(text.contains(needle), "{needle}:\n{text}");
    }
}

/// The control socket's events of the mirror: its peers connecting, being
/// refused (another QEMU while one is connected, a process other than the
/// front-end's) and leaving; QEMU's faults written for the guest or
/// dropped (no buffer, then a reset); QEMU's system reset.
#[test]
fn the_control_socket_tells_mirror_peers_faults_to_the_guest_and_system_resets() {
    use serde_json::{json, Value};
    use vhost_user_iommu::control::client::Client;
    use vhost_user_iommu::control::protocol;
    let dir = Scratch::new("mirror-events");
    let control = dir.join("control.sock");
    let d = DaemonProcess::builder(BIN, dir.join("viommu.sock"))
        .mirror(dir.join("viommu.mirror"))
        .args(["--endpoints", "8", "--control-socket"])
        .arg(&control)
        .rust_log("warn")
        .spawn()
        .owning(dir);
    let mut c = Client::connect(&control, Duration::from_secs(5)).unwrap();
    let kinds = [
        "mirror_connected",
        "mirror_refused",
        "mirror_disconnected",
        "fault_reported",
        "fault_dropped",
        "reset",
    ];
    c.call::<protocol::Subscription>("subscribe", json!({ "events": kinds }))
        .unwrap();
    let mut next = || -> Value {
        c.next_event(Duration::from_secs(5))
            .unwrap()
            .expect("an event")
    };
    let me = std::process::id();
    let opts = VmOptions {
        event_buffers: 1,
        ..VmOptions::default()
    };
    let mut vm = d.connect(opts).unwrap();
    assert_eq!(next()["data"]["kind"], "front_end");
    let mut q = FakeQemu::connect(mirror(&d));
    let batches = q.auto_ack();
    batches.recv_timeout(Duration::from_secs(5)).unwrap();
    let e = next();
    assert_eq!(e["event"], "mirror_connected");
    assert_eq!(e["data"]["connection"], 1);
    if !e["data"]["pid"].is_null() {
        assert_eq!(e["data"]["pid"], me);
    }

    // A second QEMU while one is connected; a process that is not the
    // front-end's.
    let _second = UnixStream::connect(mirror(&d)).unwrap();
    let e = next();
    assert_eq!(
        (&e["event"], &e["data"]["reason"]),
        (&json!("mirror_refused"), &json!("busy"))
    );
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "mirror_peer_in_another_process"])
        .env("VUI_MIRROR_PEER_SOCKET", mirror(&d))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let e = next();
    assert_eq!(
        (&e["event"], &e["data"]["reason"]),
        (&json!("mirror_refused"), &json!("not_front_end"))
    );
    assert_ne!(e["data"]["pid"], me);

    // The first fault takes the guest's one event buffer; of the 65 that
    // wait for another, the oldest is dropped.
    assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
    for page in 0..66u64 {
        q.send(FAULT, 0, 0, &fault_msg(page << 12));
    }
    let e = next();
    assert_eq!(e["event"], "fault_reported");
    assert_eq!(
        e["data"],
        json!({"endpoint": 8, "address": 0, "reason": "mapping", "flags": 2})
    );
    let e = next();
    assert_eq!(e["event"], "fault_dropped");
    assert_eq!(
        e["data"],
        json!({"endpoint": 8, "address": 0x1000, "reason": "mapping", "flags": 2, "why": "no_buffer"})
    );
    // QEMU resets the machine: the 64 waiting go with it.
    q.send(SYSTEM_RESET, 0, 7, &[]);
    let e = next();
    assert_eq!(
        (&e["event"], &e["data"]),
        (
            &json!("reset"),
            &json!({"kind": "system", "domains": 1, "mappings": 0, "attached": 1})
        )
    );
    for page in 2..66u64 {
        let e = next();
        assert_eq!(e["event"], "fault_dropped");
        assert_eq!(
            (&e["data"]["address"], &e["data"]["why"]),
            (&json!(page << 12), &json!("reset"))
        );
    }
    assert_eq!(
        vm.next_fault(Duration::from_secs(5))
            .unwrap()
            .unwrap()
            .address,
        0
    );
    assert!(vm.next_fault(Duration::from_millis(300)).unwrap().is_none());

    // QEMU closes its end.
    q.s.shutdown(std::net::Shutdown::Both).unwrap();
    let e = next();
    assert_eq!(
        (&e["event"], &e["data"]),
        (
            &json!("mirror_disconnected"),
            &json!({"connection": 1, "how": "closed"})
        )
    );
}

/// A FAULT message for endpoint 8: a write to `address`, no mapping.
fn fault_msg(address: u64) -> [u8; 24] {
    let mut fault = [0u8; 24];
    fault[0..4].copy_from_slice(&8u32.to_le_bytes());
    fault[4..8].copy_from_slice(&2u32.to_le_bytes());
    fault[8..16].copy_from_slice(&address.to_le_bytes());
    fault[16] = 2;
    fault
}

#[test]
fn faults_wait_for_an_event_buffer_and_beyond_64_the_oldest_are_dropped() {
    let d = start("fault-queue");
    let opts = VmOptions {
        event_buffers: 1,
        ..VmOptions::default()
    };
    let mut vm = d.connect(opts).unwrap();
    let mut q = FakeQemu::connect(mirror(&d));
    let batches = q.auto_ack();
    batches.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
    for address in 0..70u64 {
        q.send(FAULT, 0, 0, &fault_msg(address << 12));
    }
    // Let the daemon read them all before the driver gives a new buffer.
    std::thread::sleep(Duration::from_millis(500));
    let mut seen = Vec::new();
    while let Some(f) = vm.next_fault(Duration::from_secs(2)).unwrap() {
        seen.push(f.address >> 12);
    }
    // The first took the only buffer; of the 69 that waited, the newest 64.
    let expected: Vec<u64> = std::iter::once(0).chain(6..70).collect();
    assert_eq!(seen, expected);
}

#[test]
fn a_fault_with_an_undefined_reason_closes_the_mirror_and_reaches_no_guest() {
    let d = start("fault-bad");
    let mut vm = d.connect(VmOptions::default()).unwrap();
    let mut q = FakeQemu::connect(mirror(&d));
    let (seq, _, _) = q.events();
    q.ack(seq);
    let guest = std::thread::spawn(move || {
        assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
        vm
    });
    let (seq, _, _) = q.events();
    q.ack(seq);
    let mut vm = guest.join().unwrap();
    let mut bad = fault_msg(0x1000);
    bad[16] = 9;
    q.send(FAULT, 0, 0, &bad);
    let mut buf = [0u8; 64];
    let closed = loop {
        match q.s.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => continue,
            Err(_) => break false,
        }
    };
    assert!(closed, "a protocol error closes the connection");
    assert!(vm.next_fault(Duration::from_millis(300)).unwrap().is_none());
}

/// A daemon whose QEMU acknowledged its dump and then stopped
/// acknowledging, and a guest whose ATTACH is parked waiting for the ACK.
fn parked_attach(name: &str) -> (DaemonProcess, FakeQemu, TestVm) {
    let d = start(name);
    let mut q = FakeQemu::connect(mirror(&d));
    let (seq, _, _) = q.events();
    q.ack(seq);
    let opts = VmOptions {
        timeout: Duration::from_millis(300),
        ..VmOptions::default()
    };
    let mut vm = d.connect(opts).unwrap();
    assert!(vm.attach(1, 8, 0).is_err(), "completed without the ACK");
    while !q.events().2.iter().any(|r| r.0 == OP_ATTACH) {}
    (d, q, vm)
}

#[test]
fn a_front_end_leaving_while_its_request_waits_for_an_ack_does_not_hold_up_the_next() {
    let (d, q, vm) = parked_attach("leave-waiting");
    let left = Instant::now();
    drop(vm);
    // The next front-end is served at once, not after the 10 s ACK timeout.
    let vm = d.connect(VmOptions::default()).unwrap();
    let waited = left.elapsed();
    assert!(waited < Duration::from_secs(5), "waited {waited:?}");
    drop(vm);
    drop(q);
}

#[test]
fn get_vring_base_is_answered_once_a_parked_request_is_in_the_used_ring() {
    use vhost::VhostBackend;
    let (_d, _q, mut vm) = parked_attach("vring-base");
    assert_eq!(vm.request_queue().used_idx().unwrap(), 0);
    // The front-end stops the queue: the answer comes after the request is
    // used, so the base QEMU saves and the used ring agree.
    let base = vm.frontend().get_vring_base(0).unwrap();
    assert_eq!(base, 1);
    assert_eq!(vm.request_queue().used_idx().unwrap(), 1);
}

#[test]
fn a_system_reset_clears_the_state_and_is_answered_with_a_sync_reset() {
    let d = start("reset");
    let mut vm = d.connect(VmOptions::default()).unwrap();
    let mut q = FakeQemu::connect(mirror(&d));
    let batches = q.auto_ack();
    batches.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
    let (_, _, recs) = batches.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(recs[0].0, OP_ATTACH);

    q.send(SYSTEM_RESET, 0, 7, &[]);
    let (_, sync, recs) = batches.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(sync);
    assert_eq!(recs[0].0, OP_RESET);
    assert_eq!(recs[0].1, 1, "flags = SYSTEM");
    assert_eq!(recs.last().unwrap().0, OP_GLOBAL_BYPASS);
    // Domain 1 is gone.
    let buf = vm.ram().alloc(0x1000, 0x1000).unwrap();
    assert_eq!(vm.map(1, 0x1000, 0x1fff, buf, 1).unwrap(), Status::NoEnt);
    // The features are the vhost-user transport's and stay (§9 rule 2): a
    // SYSTEM_RESET that arrives after the rebooted driver set them must
    // not turn its PROBEs into UNSUPP.
    assert_eq!(vm.probe(8).unwrap().0, Status::Ok);
}

#[test]
fn when_the_front_end_leaves_its_translations_go_at_once() {
    let d = start("leave");
    let mut vm = d.connect(VmOptions::default()).unwrap();
    let mut q = FakeQemu::connect(mirror(&d));
    let batches = q.auto_ack();
    batches.recv_timeout(Duration::from_secs(5)).unwrap();
    let buf = vm.ram().alloc(0x1000, 0x1000).unwrap();
    assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
    assert_eq!(vm.map(1, 0x1000, 0x1fff, buf, 3).unwrap(), Status::Ok);
    while let Ok((_, _, recs)) = batches.recv_timeout(Duration::from_millis(500)) {
        assert!(!recs.iter().any(|r| r.0 == OP_RESET));
    }

    // The guest memory those mappings point into is gone with the front-end:
    // the daemon resets now, without waiting for a next front-end.
    drop(vm);
    let (_, _, recs) = batches
        .recv_timeout(Duration::from_secs(5))
        .expect("a reset batch after the disconnect");
    assert_eq!(recs[0].0, OP_RESET, "{recs:?}");
}

/// Daemon number `n` on the state file in `dir`, with its mirror; its log
/// in `daemon-<n>.log` there.
fn start_with_state(dir: &Scratch, n: u32) -> DaemonProcess {
    DaemonProcess::builder(BIN, dir.join("viommu.sock"))
        .mirror(dir.join("viommu.mirror"))
        .arg("--state-file")
        .arg(dir.join("state"))
        .args(["--endpoints", "8"])
        .rust_log("info")
        .log_file(dir.join(format!("daemon-{n}.log")))
        .spawn()
}

/// Batches QEMU acknowledged, as [`FakeQemu::auto_ack`] delivers them.
type Batches = mpsc::Receiver<(u64, bool, Vec<Rec>)>;

/// QEMU process `instance` connects to `d`'s mirror and acknowledges
/// every batch; the records of the dump (the first batch flagged SYNC: a
/// reset the HELLO caused may come before it).
fn qemu_as(d: &DaemonProcess, instance: u64) -> (FakeQemu, Batches, Vec<Rec>) {
    let mut q = FakeQemu::connect_as(mirror(d), instance);
    let batches = q.auto_ack();
    loop {
        let (_, sync, recs) = batches
            .recv_timeout(Duration::from_secs(5))
            .expect("the dump");
        if sync {
            return (q, batches, recs);
        }
    }
}

const QEMU_A: u64 = 0x0a0a_0a0a_0a0a_0a0a;
const QEMU_B: u64 = 0x0b0b_0b0b_0b0b_0b0b;

/// Daemon 1 under QEMU A: domain 1 with endpoint 8 and one mapping, then
/// SIGKILL. The guest RAM buffer mapped.
fn state_of_qemu_a(dir: &Scratch) -> (TestVm, u64) {
    let d = start_with_state(dir, 1);
    let mut vm = d.connect(VmOptions::default()).unwrap();
    let (_q, _batches, _) = qemu_as(&d, QEMU_A);
    let buf = vm.ram().alloc(0x1000, 0x1000).unwrap();
    assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
    assert_eq!(vm.map(1, 0x1000, 0x1fff, buf, 3).unwrap(), Status::Ok);
    d.end(libc::SIGKILL);
    (vm, buf)
}

#[test]
fn a_recovered_state_goes_back_to_its_own_qemu_only() {
    let dir = Scratch::new("mirror-owner");
    let (mut vm, buf) = state_of_qemu_a(&dir);

    // QEMU A reconnects: it gets the state back. (A HELLO that decides
    // whose a recovered state is counts once the front-end is known, §6
    // rule 7: the vhost-user connection first.)
    let d = start_with_state(&dir, 2);
    vm.reconnect(d.socket()).unwrap();
    let (_q, _batches, dump) = qemu_as(&d, QEMU_A);
    assert!(
        dump.iter()
            .any(|r| r.0 == OP_ATTACH && r.2 == 8 && r.3 == 1),
        "QEMU A's attachment is back: {dump:?}"
    );
    assert_eq!(vm.map(1, 0x2000, 0x2fff, buf, 3).unwrap(), Status::Ok);
    assert!(d
        .log_text()
        .contains("the QEMU of the recovered state is back"));
    d.end(libc::SIGKILL);

    // Another QEMU process (B), its guest booting: nothing of A's guest.
    let d = start_with_state(&dir, 3);
    let mut vm = d.connect(VmOptions::default()).unwrap();
    let (_q, _batches, dump) = qemu_as(&d, QEMU_B);
    assert!(
        !dump.iter().any(|r| r.0 == OP_ATTACH),
        "QEMU B got QEMU A's attachments: {dump:?}"
    );
    assert_eq!(vm.map(1, 0x3000, 0x3fff, buf, 3).unwrap(), Status::NoEnt);
    let log = d.log_text();
    assert!(log.contains("belongs to another QEMU"), "{log}");
    d.end(libc::SIGKILL);

    // The file is B's now: B is served its own state, not reset again.
    let d = start_with_state(&dir, 4);
    let _vm = d.connect(VmOptions::default()).unwrap();
    let (_q, _batches, _) = qemu_as(&d, QEMU_B);
    assert!(d
        .log_text()
        .contains("the QEMU of the recovered state is back"));
}

#[test]
fn no_request_is_carried_out_on_a_recovered_state_before_a_qemu_says_whose_it_is() {
    let dir = Scratch::new("mirror-unconfirmed");
    let (_old_vm, buf) = state_of_qemu_a(&dir);
    let d = start_with_state(&dir, 2);
    // The front-end reconnects first and asks for a MAP in domain 1, which
    // the recovered state has.
    let mut vm = d.connect(VmOptions::default()).unwrap();
    let posted = vm
        .submit(&[Request::Map {
            domain: 1,
            virt_start: 0x2000,
            virt_end: 0x2fff,
            phys_start: buf,
            flags: 3,
        }])
        .unwrap();
    assert_eq!(posted, 1);
    vm.request_queue().kick().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        vm.poll_completion().unwrap().is_none(),
        "completed before any QEMU said whose the state is"
    );
    // It is another QEMU's guest: the MAP is carried out on a reset device.
    let (_q, _batches, _) = qemu_as(&d, QEMU_B);
    let t = Instant::now();
    let c = loop {
        if let Some(c) = vm.poll_completion().unwrap() {
            break c;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "never completed");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(
        c.status,
        Status::NoEnt,
        "carried out on the old guest's state"
    );
}

#[test]
fn a_system_reset_reaches_the_state_file() {
    let dir = Scratch::new("mirror-reset-file");
    let d = start_with_state(&dir, 1);
    let mut vm = d.connect(VmOptions::default()).unwrap();
    let (mut q, batches, _) = qemu_as(&d, QEMU_A);
    assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
    batches.recv_timeout(Duration::from_secs(5)).unwrap();
    q.send(SYSTEM_RESET, 0, 3, &[]);
    let (_, _, recs) = batches.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(recs[0].0, OP_RESET);
    d.end(libc::SIGKILL);

    // The same QEMU (its guest rebooting) comes back to a reset device.
    let d = start_with_state(&dir, 2);
    vm.reconnect(d.socket()).unwrap();
    let (_q, _batches, dump) = qemu_as(&d, QEMU_A);
    assert!(
        !dump.iter().any(|r| r.0 == OP_ATTACH),
        "the state from before the system reset came back: {dump:?}"
    );
}

#[test]
fn a_mirror_peer_of_another_process_does_not_take_the_state_file_over() {
    let dir = Scratch::new("mirror-intruder");
    let d = start_with_state(&dir, 1);
    let mut vm = d.connect(VmOptions::default()).unwrap();
    let (q, _batches, _) = qemu_as(&d, QEMU_A);
    assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
    // QEMU A's link drops; another local process gets the socket for a
    // moment and names itself.
    q.s.shutdown(std::net::Shutdown::Both).unwrap();
    d.wait_log("QEMU closed the connection", Duration::from_secs(5));
    let (intruder, _b, _) = qemu_as(&d, QEMU_B);
    intruder.s.shutdown(std::net::Shutdown::Both).unwrap();
    let log = d.wait_log("the state file stays", Duration::from_secs(5));
    assert!(log.contains("the state file stays"), "{log}");
    // The daemon dies; QEMU A reconnects to the next one: its state.
    d.end(libc::SIGKILL);
    let d = start_with_state(&dir, 2);
    vm.reconnect(d.socket()).unwrap();
    let (_q, _batches, dump) = qemu_as(&d, QEMU_A);
    assert!(
        dump.iter()
            .any(|r| r.0 == OP_ATTACH && r.2 == 8 && r.3 == 1),
        "QEMU A lost its state to the intruder: {dump:?}\n{}",
        d.log_text()
    );
}
