//! The daemon with its translation mirror, and a stand-in for QEMU's side of
//! docs/mirror-protocol.md written from the document (not from the daemon's
//! code): the full-state dump, strict invalidation, faults on the event
//! queue, and system reset.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use test_frontend::{Status, TestVm, VmOptions};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-iommu");
const HELLO: u16 = 1;
const EVENTS: u16 = 2;
const ACK: u16 = 3;
const FAULT: u16 = 4;
const SYSTEM_RESET: u16 = 5;
const OP_ATTACH: u8 = 1;
const OP_MAP: u8 = 3;
const OP_UNMAP: u8 = 4;
const OP_GLOBAL_BYPASS: u8 = 5;
const OP_RESET: u8 = 6;

struct Daemon {
    child: Child,
    socket: PathBuf,
    mirror: PathBuf,
}

impl Daemon {
    fn start(name: &str) -> Self {
        let dir = std::env::temp_dir();
        let pid = std::process::id();
        let socket = dir.join(format!("vui-mirror-{pid}-{name}.sock"));
        let mirror = dir.join(format!("vui-mirror-{pid}-{name}.mirror"));
        let child = Command::new(BIN)
            .arg("--socket-path")
            .arg(&socket)
            .arg("--mirror-socket")
            .arg(&mirror)
            .args(["--endpoints", "8"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(socket.exists() && mirror.exists()) {
            assert!(Instant::now() < deadline, "the daemon did not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self {
            child,
            socket,
            mirror,
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(&self.mirror);
    }
}

/// One decoded 40-byte record: (op, flags, endpoint, domain, start, end, phys).
type Rec = (u8, u16, u32, u32, u64, u64, u64);

/// QEMU's end of the mirror, minimal.
struct FakeQemu {
    s: UnixStream,
}

impl FakeQemu {
    fn connect(path: &Path) -> Self {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut q = Self { s };
        let mut hello = [0u8; 24];
        hello[0..4].copy_from_slice(&0x4d49_5556u32.to_le_bytes());
        hello[4..6].copy_from_slice(&1u16.to_le_bytes());
        q.send(HELLO, 0, 0, &hello);
        let (t, _, _, payload) = q.recv();
        assert_eq!(t, HELLO);
        assert_eq!(&payload[0..4], &0x4d49_5556u32.to_le_bytes());
        q
    }

    fn send(&mut self, t: u16, flags: u16, seq: u64, payload: &[u8]) {
        let mut h = [0u8; 16];
        h[0..2].copy_from_slice(&t.to_le_bytes());
        h[2..4].copy_from_slice(&flags.to_le_bytes());
        h[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        h[8..16].copy_from_slice(&seq.to_le_bytes());
        self.s.write_all(&h).unwrap();
        self.s.write_all(payload).unwrap();
    }

    /// (type, flags, seq, payload)
    fn recv(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        let t = u16::from_le_bytes([h[0], h[1]]);
        let flags = u16::from_le_bytes([h[2], h[3]]);
        let size = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
        let seq = u64::from_le_bytes(h[8..16].try_into().unwrap());
        let mut payload = vec![0; size];
        self.s.read_exact(&mut payload).unwrap();
        (t, flags, seq, payload)
    }

    /// The next EVENTS batch: (seq, sync, records).
    fn events(&mut self) -> (u64, bool, Vec<Rec>) {
        let (t, flags, seq, payload) = self.recv();
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

    fn ack(&mut self, seq: u64) {
        self.send(ACK, 0, seq, &[]);
    }

    /// Acknowledge every batch from now on, on a thread; the batches arrive
    /// on the returned channel. `self` keeps the write side.
    fn auto_ack(&mut self) -> mpsc::Receiver<(u64, bool, Vec<Rec>)> {
        let mut reader = FakeQemu {
            s: self.s.try_clone().unwrap(),
        };
        reader.s.set_read_timeout(None).unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || loop {
            // The daemon closes the connection when the test ends.
            let Ok(batch) =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| reader.events()))
            else {
                return;
            };
            reader.ack(batch.0);
            if tx.send(batch).is_err() {
                return;
            }
        });
        rx
    }
}

#[test]
fn a_connecting_qemu_gets_the_full_state_then_every_change() {
    let d = Daemon::start("dump");
    let mut vm = TestVm::connect(&d.socket, VmOptions::default()).unwrap();
    let buf = vm.ram().alloc(0x2000, 0x1000).unwrap();
    assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
    assert_eq!(vm.map(1, 0x1000, 0x2fff, buf, 3).unwrap(), Status::Ok);

    let mut q = FakeQemu::connect(&d.mirror);
    let (seq, sync, recs) = q.events();
    assert_eq!(seq, 1);
    assert!(sync, "the dump ends with SYNC");
    assert!(recs.iter().any(|r| r.0 == OP_GLOBAL_BYPASS));
    assert!(recs.contains(&(OP_ATTACH, 0, 8, 1, 0, 0, 0)));
    assert!(recs.contains(&(OP_MAP, 3, 0, 1, 0x1000, 0x2fff, buf)));
    q.ack(seq);

    // Strict invalidation: the UNMAP completes only after QEMU's ACK.
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
    let (_vm, status) = guest.join().unwrap();
    assert_eq!(status, Status::Ok);
}

#[test]
fn a_fault_from_qemu_reaches_the_guest_on_the_event_queue() {
    let d = Daemon::start("fault");
    let mut vm = TestVm::connect(&d.socket, VmOptions::default()).unwrap();
    let mut q = FakeQemu::connect(&d.mirror);
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

#[test]
fn a_system_reset_clears_the_state_and_is_answered_with_a_sync_reset() {
    let d = Daemon::start("reset");
    let mut vm = TestVm::connect(&d.socket, VmOptions::default()).unwrap();
    let mut q = FakeQemu::connect(&d.mirror);
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
}

#[test]
fn when_the_front_end_leaves_its_translations_go_at_once() {
    let d = Daemon::start("leave");
    let mut vm = TestVm::connect(&d.socket, VmOptions::default()).unwrap();
    let mut q = FakeQemu::connect(&d.mirror);
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
