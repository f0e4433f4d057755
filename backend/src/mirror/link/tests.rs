// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The mirror link end to end, against a fake QEMU on a socket pair.

use super::*;
use crate::mirror::completion::test_page::KickPage;
use crate::mirror::proto::{MsgType, EVENTS_F_SYNC, HELLO_LEN, MAGIC, RECORD_LEN};
use std::io::Read;
use std::os::fd::FromRawFd;
use virtio_iommu::Unmap;

/// Hooks that report a fixed state and record what QEMU told them.
#[derive(Default)]
struct Recorder {
    state: Mutex<Vec<Record>>,
    faults: Mutex<Vec<proto::Fault>>,
    resets: Mutex<Vec<u32>>,
    /// (endpoint, devid, inode of the iommufd file, of the device file)
    vfio: Mutex<Vec<(u32, u32, u64, u64)>>,
    vfio_removed: Mutex<Vec<u32>>,
    vfio_gone: std::sync::atomic::AtomicUsize,
    /// The instances QEMU's HELLOs carried.
    instances: Mutex<Vec<u64>>,
    /// A recovered state (QEMU instance 5's) waits for its QEMU's HELLO.
    recovery: AtomicBool,
    /// What happened to the peers, in order.
    peers: Mutex<Vec<PeerEvent>>,
}

impl Recorder {
    /// The peer events so far, once there are `n` (within 5 s).
    fn peers(&self, n: usize) -> Vec<PeerEvent> {
        let t0 = Instant::now();
        loop {
            let p = self.peers.lock().unwrap().clone();
            if p.len() >= n || t0.elapsed() > Duration::from_secs(5) {
                return p;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn inode(fd: &OwnedFd) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::File::from(fd.try_clone().unwrap())
        .metadata()
        .unwrap()
        .ino()
}

impl MirrorHooks for Recorder {
    fn snapshot(&self, send: &mut dyn FnMut(&[Record])) {
        let state = self.state.lock().unwrap();
        send(&state);
    }
    fn fault(&self, fault: proto::Fault) {
        self.faults.lock().unwrap().push(fault);
    }
    fn hello_would_reset(&self, instance: u64) -> bool {
        self.recovery.load(Ordering::SeqCst) && instance != 5
    }
    fn qemu_hello(&self, instance: u64) {
        self.instances.lock().unwrap().push(instance);
    }
    fn system_reset(&self, id: u32, send: &mut dyn FnMut(&[Record])) {
        self.resets.lock().unwrap().push(id);
        send(&[
            Record::Reset {
                system: true,
                reset_id: id,
            },
            Record::GlobalBypass(false),
        ]);
    }
    fn vfio_device_added(
        &self,
        endpoint: u32,
        devid: u32,
        iommufd: OwnedFd,
        device: OwnedFd,
    ) -> Result<(), String> {
        let entry = (endpoint, devid, inode(&iommufd), inode(&device));
        self.vfio.lock().unwrap().push(entry);
        Ok(())
    }
    fn vfio_device_removed(&self, endpoint: u32) {
        self.vfio_removed.lock().unwrap().push(endpoint);
    }
    fn vfio_devices_gone(&self) {
        self.vfio_gone.fetch_add(1, Ordering::SeqCst);
    }
    fn peer(&self, event: PeerEvent) {
        self.peers.lock().unwrap().push(event);
    }
}

/// The QEMU side of the socket, as a test drives it.
struct FakeQemu(UnixStream);

impl FakeQemu {
    fn connect(path: &Path) -> Self {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        FakeQemu(s)
    }
    fn try_send(&mut self, t: u16, seq: u64, payload: &[u8]) -> io::Result<()> {
        let mut h = [0u8; HEADER_LEN];
        Header {
            msg_type: t,
            flags: 0,
            size: payload.len() as u32,
            seq,
        }
        .encode(&mut h);
        self.0.write_all(&h)?;
        self.0.write_all(payload)
    }
    fn send(&mut self, t: u16, seq: u64, payload: &[u8]) {
        self.try_send(t, seq, payload).unwrap();
    }
    fn try_hello(&mut self) -> io::Result<()> {
        let mut p = [0u8; HELLO_LEN];
        p[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        p[4..6].copy_from_slice(&proto::MAJOR.to_le_bytes());
        self.try_send(MsgType::Hello as u16, 0, &p)
    }
    /// A 2.1 HELLO (no instance).
    fn hello(&mut self) {
        self.try_hello().unwrap();
    }
    /// A 2.2 HELLO of QEMU process `instance`.
    fn hello_as(&mut self, instance: u64) {
        let mut p = [0u8; proto::QEMU_HELLO_LEN];
        p[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        p[4..6].copy_from_slice(&proto::MAJOR.to_le_bytes());
        p[6..8].copy_from_slice(&proto::MINOR.to_le_bytes());
        p[40..48].copy_from_slice(&instance.to_le_bytes());
        self.send(MsgType::Hello as u16, 0, &p);
    }
    /// A VFIO_DEVICE message, with `files` attached to its first byte.
    fn vfio_device(&mut self, endpoint: u32, devid: u32, op: u32, files: &[&OwnedFd]) {
        let mut m = [0u8; HEADER_LEN + proto::VFIO_DEVICE_LEN];
        let mut h = [0u8; HEADER_LEN];
        Header {
            msg_type: MsgType::VfioDevice as u16,
            flags: 0,
            size: proto::VFIO_DEVICE_LEN as u32,
            seq: 0,
        }
        .encode(&mut h);
        m[..HEADER_LEN].copy_from_slice(&h);
        m[16..20].copy_from_slice(&endpoint.to_le_bytes());
        m[20..24].copy_from_slice(&devid.to_le_bytes());
        m[24..28].copy_from_slice(&op.to_le_bytes());
        let fds: Vec<_> = files.iter().map(|f| f.as_raw_fd()).collect();
        assert_eq!(self.0.send_with_fds(&[&m[..]], &fds).unwrap(), m.len());
    }
    fn ack(&mut self, seq: u64) {
        self.send(MsgType::Ack as u16, seq, &[]);
    }
    /// The daemon's HELLO: its header, its payload and the files it
    /// carried.
    fn recv_hello(&mut self) -> (Header, Vec<u8>, Vec<OwnedFd>) {
        let mut buf = [0u8; HEADER_LEN + proto::DAEMON_HELLO_LEN];
        let mut files = [0; 4];
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: the iovec points at `buf`, which outlives the call.
        let (n, nfds) = unsafe { self.0.recv_with_fds(&mut iov, &mut files) }.unwrap();
        assert_eq!(n, buf.len(), "a short HELLO");
        let files = files[..nfds]
            .iter()
            // SAFETY: descriptors just received, ours to own.
            .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .collect();
        let h = Header::decode(buf[..HEADER_LEN].try_into().unwrap());
        (h, buf[HEADER_LEN..].to_vec(), files)
    }
    /// Next message: header and payload; `None` on EOF.
    fn recv(&mut self) -> Option<(Header, Vec<u8>)> {
        let mut h = [0u8; HEADER_LEN];
        self.0.read_exact(&mut h).ok()?;
        let h = Header::decode(&h);
        let mut p = vec![0u8; h.size as usize];
        self.0.read_exact(&mut p).ok()?;
        Some((h, p))
    }
}

fn socket_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vui-mirror-{}-{name}.sock", std::process::id()))
}

fn start(name: &str, state: Vec<Record>) -> (MirrorServer, Arc<Recorder>, PathBuf) {
    start_offering(name, state, false)
}

fn start_offering(
    name: &str,
    state: Vec<Record>,
    vfio_devices: bool,
) -> (MirrorServer, Arc<Recorder>, PathBuf) {
    start_announcing(name, state, Hello::new(true, vfio_devices))
}

fn start_with_hello(name: &str, hello: Hello) -> (MirrorServer, Arc<Recorder>, PathBuf) {
    start_announcing(name, vec![], hello)
}

fn start_announcing(
    name: &str,
    state: Vec<Record>,
    hello: Hello,
) -> (MirrorServer, Arc<Recorder>, PathBuf) {
    let path = socket_path(name);
    let rec = Arc::new(Recorder {
        state: Mutex::new(state),
        ..Default::default()
    });
    let memory = Arc::new(MirrorMemory::new(64, 0xffff_ffff).unwrap());
    let server = MirrorServer::start_with(&path, hello, rec.clone(), memory).unwrap();
    (server, rec, path)
}

/// Two files to forward, told apart by inode.
fn two_files() -> (OwnedFd, OwnedFd) {
    let file = || -> OwnedFd {
        crate::mirror::SharedMem::new(c"vui-test", 4096)
            .unwrap()
            .file()
            .try_clone()
            .unwrap()
            .into()
    };
    (file(), file())
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed() < Duration::from_secs(5), "{what}: timed out");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn forwarded_vfio_devices_reach_the_hooks_with_their_files_and_go_with_the_connection() {
    let (server, rec, path) = start_offering("vfio", vec![], true);
    let h = server.handle();
    let mut q = FakeQemu::connect(&path);
    q.hello();
    let (hello, p) = q.recv().unwrap();
    assert_eq!(hello.msg_type, MsgType::Hello as u16);
    let features = u64::from_le_bytes(p[8..16].try_into().unwrap());
    assert_eq!(
        features,
        proto::FEATURE_VFIO_DEVICES | proto::FEATURE_COMPLETION_FD
    );
    let (_dump, _) = q.recv().unwrap();
    q.ack(1);
    wait_connected(&h);

    let (iommufd, device) = two_files();
    q.vfio_device(0x18, 7, proto::VFIO_DEVICE_ADD, &[&iommufd, &device]);
    q.vfio_device(0x18, 0, proto::VFIO_DEVICE_REMOVE, &[]);
    wait_for("removal", || !rec.vfio_removed.lock().unwrap().is_empty());
    assert_eq!(
        *rec.vfio.lock().unwrap(),
        vec![(0x18, 7, inode(&iommufd), inode(&device))]
    );
    assert_eq!(rec.vfio_gone.load(Ordering::SeqCst), 0);
    drop(q);
    wait_for("gone", || rec.vfio_gone.load(Ordering::SeqCst) == 1);
}

#[test]
fn files_without_an_add_and_an_add_without_files_or_offer_are_protocol_errors() {
    let (iommufd, device) = two_files();
    // Files on an ACK.
    let (server, _rec, path) = start_offering("vfio-stray", vec![], true);
    let h = server.handle();
    let mut q = connect_synced(&path, &h);
    let mut ack = [0u8; HEADER_LEN];
    Header {
        msg_type: MsgType::Ack as u16,
        flags: 0,
        size: 0,
        seq: 2,
    }
    .encode(&mut ack);
    q.0.send_with_fds(&[&ack[..]], &[iommufd.as_raw_fd()])
        .unwrap();
    assert!(q.recv().is_none(), "closed");
    // An ADD with one file.
    let (server, rec, path) = start_offering("vfio-short", vec![], true);
    let h = server.handle();
    let mut q = connect_synced(&path, &h);
    q.vfio_device(1, 1, proto::VFIO_DEVICE_ADD, &[&device]);
    assert!(q.recv().is_none(), "closed");
    assert!(rec.vfio.lock().unwrap().is_empty());
    // An ADD to a daemon that did not offer it.
    let (server, rec, path) = start_offering("vfio-unoffered", vec![], false);
    let h = server.handle();
    let mut q = connect_synced(&path, &h);
    q.vfio_device(1, 1, proto::VFIO_DEVICE_ADD, &[&iommufd, &device]);
    assert!(q.recv().is_none(), "closed");
    assert!(rec.vfio.lock().unwrap().is_empty());
    assert_eq!(rec.vfio_gone.load(Ordering::SeqCst), 0, "nothing offered");
}

/// A COMPLETION_FD message, with `files` attached to its first byte.
fn completion_fd(q: &mut FakeQemu, files: &[&OwnedFd]) {
    let mut h = [0u8; HEADER_LEN];
    Header {
        msg_type: MsgType::CompletionFd as u16,
        flags: 0,
        size: 0,
        seq: 0,
    }
    .encode(&mut h);
    let fds: Vec<_> = files.iter().map(|f| f.as_raw_fd()).collect();
    q.0.send_with_fds(&[&h[..]], &fds).unwrap();
}

fn eventfd() -> (vmm_sys_util::eventfd::EventFd, OwnedFd) {
    let ev = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    // SAFETY: a fresh duplicate, owned by the OwnedFd alone.
    let file = unsafe { OwnedFd::from_raw_fd(libc::dup(ev.as_raw_fd())) };
    (ev, file)
}

#[test]
fn qemus_completion_files_are_used_while_its_connection_lasts() {
    let (server, _rec, path) = start("completion", vec![]);
    let h = server.handle();
    assert!(!h.signal_completions(), "no QEMU, no signal");
    let mut q = connect_synced(&path, &h);
    let (ev, file) = eventfd();
    let page = KickPage::new();
    page.set(Some(1), true);
    completion_fd(&mut q, &[&file, &page.file()]);
    wait_for("armed", || h.signal_completions());
    assert_eq!(h.vcpu_cpu(), Some(1));
    assert!(ev.read().unwrap() >= 1);
    h.signal_completions();
    assert_eq!(ev.read().unwrap(), 1);
    drop(q);
    wait_for("disarmed", || !h.signal_completions());
    assert_eq!(h.vcpu_cpu(), None);
    // The next QEMU's own files take over.
    let mut q = connect_synced(&path, &h);
    let (ev2, file2) = eventfd();
    let page2 = KickPage::new();
    page2.set(Some(0), true);
    completion_fd(&mut q, &[&file2, &page2.file()]);
    wait_for("armed again", || h.signal_completions());
    assert_eq!(h.vcpu_cpu(), Some(0));
    assert!(ev2.read().unwrap() >= 1);
}

#[test]
fn a_completion_fd_without_its_files_or_offer_closes_and_a_wrong_file_is_ignored() {
    let page = KickPage::new();
    // One file of two.
    let (server, _rec, path) = start("completion-nofile", vec![]);
    let h = server.handle();
    let mut q = connect_synced(&path, &h);
    completion_fd(&mut q, &[&page.file()]);
    assert!(q.recv().is_none(), "closed");
    assert!(!h.signal_completions());
    // Not offered.
    let (server, _rec, path) = start_with_hello(
        "completion-unoffered",
        Hello {
            completion_fd: false,
            ..Hello::new(true, false)
        },
    );
    let h = server.handle();
    let mut q = connect_synced(&path, &h);
    let (_ev, file) = eventfd();
    completion_fd(&mut q, &[&file, &page.file()]);
    assert!(q.recv().is_none(), "closed");
    assert!(!h.signal_completions());
    // A file that is no pipe: refused, the connection stays.
    let (server, rec, path) = start("completion-file", vec![]);
    let h = server.handle();
    let mut q = connect_synced(&path, &h);
    let null: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
    page.set(Some(0), true);
    completion_fd(&mut q, &[&null, &page.file()]);
    q.send(MsgType::Fault as u16, 0, &{
        let mut f = [0u8; proto::FAULT_LEN];
        f[16] = 1;
        f
    });
    wait_for("the fault after it", || {
        !rec.faults.lock().unwrap().is_empty()
    });
    assert!(!h.signal_completions());
    assert!(h.is_connected());
}

#[test]
fn only_the_front_ends_process_is_served_now_or_once_it_is_known() {
    let (server, _rec, path) = start("front-end", vec![]);
    let h = server.handle();
    let me = std::process::id();
    // The front-end is another process (pid 1): we are refused.
    h.set_front_end(Some(1));
    let mut q = FakeQemu::connect(&path);
    assert!(q.recv().is_none(), "refused");
    assert!(!h.is_connected());
    // The front-end is us: served.
    h.set_front_end(Some(me));
    let mut q = connect_synced(&path, &h);
    // A front-end of another process comes: our connection goes.
    h.set_front_end(Some(1));
    assert!(q.recv().is_none(), "closed");
    wait_for("closed", || !h.is_connected());
    // No front-end: anyone may connect (QEMU's mirror may come first).
    h.set_front_end(None);
    let _q = connect_synced(&path, &h);
}

#[test]
fn a_hello_that_would_reset_a_recovered_state_counts_only_from_the_front_ends_process() {
    let (server, rec, path) = start("recovery-front-end", vec![]);
    let h = server.handle();
    rec.recovery.store(true, Ordering::SeqCst);
    // The recovered state's own QEMU (instance 5) is let in at once.
    let mut q = FakeQemu::connect(&path);
    q.recv_hello();
    q.hello_as(5);
    let (dump, _) = q.recv().expect("the dump, at once");
    assert_eq!(dump.msg_type, MsgType::Events as u16);
    drop(q);
    wait_for("closed", || !h.is_connected());
    rec.instances.lock().unwrap().clear();
    // No front-end yet: the HELLO waits for one, deciding nothing.
    let mut q = FakeQemu::connect(&path);
    q.recv_hello();
    q.hello_as(7);
    std::thread::sleep(Duration::from_millis(100));
    assert!(rec.instances.lock().unwrap().is_empty(), "undecided");
    // The front-end is another process: this peer's HELLO is not its.
    h.set_front_end(Some(1));
    assert!(q.recv().is_none(), "closed");
    assert!(rec.instances.lock().unwrap().is_empty());
    // The front-end is this process: its HELLO decides.
    h.set_front_end(None);
    let mut q = FakeQemu::connect(&path);
    q.recv_hello();
    q.hello_as(7);
    h.set_front_end(Some(std::process::id()));
    let (dump, _) = q.recv().expect("the dump, once the front-end is known");
    assert_eq!(dump.msg_type, MsgType::Events as u16);
    assert_eq!(*rec.instances.lock().unwrap(), vec![7]);
}

#[test]
fn a_dump_not_acknowledged_in_time_closes_the_connection() {
    let (server, _rec, path) = start("dump-ack", vec![]);
    let h = server.handle();
    h.set_dump_ack_deadline(Duration::from_millis(100));
    let mut q = FakeQemu::connect(&path);
    q.recv_hello();
    q.hello();
    let (dump, _) = q.recv().unwrap();
    assert_eq!(dump.msg_type, MsgType::Events as u16);
    // No ACK.
    assert!(q.recv().is_none(), "closed");
    wait_for("closed", || !h.is_connected());
    // One that acknowledges stays.
    let q = connect_synced(&path, &h);
    std::thread::sleep(Duration::from_millis(300));
    assert!(h.is_connected());
    drop(q);
}

#[test]
fn a_peer_that_sends_no_hello_in_time_is_closed_and_the_next_served() {
    let (server, _rec, path) = start("hello-deadline", vec![]);
    let h = server.handle();
    h.set_hello_deadline(Duration::from_millis(100));
    let mut silent = FakeQemu::connect(&path);
    let (hello, _, _) = silent.recv_hello();
    assert_eq!(hello.msg_type, MsgType::Hello as u16);
    let t0 = Instant::now();
    assert!(silent.recv().is_none(), "closed");
    assert!(t0.elapsed() < Duration::from_secs(4), "by the deadline");
    wait_for("closed", || !h.is_connected());
    let _q = connect_synced(&path, &h);
}

fn wait_connected(h: &MirrorHandle) {
    let t0 = Instant::now();
    while !h.is_connected() {
        assert!(t0.elapsed() < Duration::from_secs(5), "never connected");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Connect, exchange HELLOs, read and ack the dump (seq 1).
fn connect_synced(path: &Path, h: &MirrorHandle) -> FakeQemu {
    let mut q = FakeQemu::connect(path);
    q.hello();
    let (hello, _) = q.recv().unwrap();
    assert_eq!(hello.msg_type, MsgType::Hello as u16);
    let (dump, _) = q.recv().unwrap();
    assert_eq!(dump.seq, 1);
    q.ack(1);
    wait_connected(h);
    q
}

/// [`MirrorHandle::wait_synced`] on a thread; its outcome comes on the
/// channel.
fn spawn_wait_synced(
    h: &MirrorHandle,
) -> (
    std::thread::JoinHandle<()>,
    std::sync::mpsc::Receiver<WaitOutcome>,
) {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = h.clone();
    (
        std::thread::spawn(move || tx.send(h.wait_synced()).unwrap()),
        rx,
    )
}

/// §6 rule 4: once a QEMU has connected, a closed link means a frozen
/// copy in QEMU, so requests wait until a new connection has acked its
/// dump; before any QEMU, and after the front-end left, they do not.
#[test]
fn requests_wait_for_a_synced_qemu_once_one_holds_a_copy() {
    let (server, _rec, path) = start("synced", vec![]);
    let h = server.handle();
    assert_eq!(h.wait_synced(), WaitOutcome::Acked, "no QEMU ever: no wait");
    // A peer that never acknowledged its dump holds no copy QEMU would
    // keep: its leaving holds nothing up.
    let mut q = FakeQemu::connect(&path);
    q.hello();
    let _hello = q.recv().unwrap();
    let _dump = q.recv().unwrap();
    drop(q);
    while h.is_connected() {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(h.wait_synced(), WaitOutcome::Acked, "never synced: no wait");
    let q = connect_synced(&path, &h);
    assert_eq!(h.wait_synced(), WaitOutcome::Acked, "synced: no wait");
    drop(q);
    while h.is_connected() {
        std::thread::sleep(Duration::from_millis(5));
    }
    // The link is gone: a waiter stays until the next QEMU acks its dump.
    let (waiter, rx) = spawn_wait_synced(&h);
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "it waits"
    );
    let mut q = FakeQemu::connect(&path);
    q.hello();
    let _hello = q.recv().unwrap();
    let (dump, _) = q.recv().unwrap();
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "until the ACK"
    );
    q.ack(dump.seq);
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)),
        Ok(WaitOutcome::Acked)
    );
    waiter.join().unwrap();
    // A waiter is released when the vring stops.
    drop(q);
    while h.is_connected() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let (waiter, rx) = spawn_wait_synced(&h);
    // (Released again until it answers: it may not be waiting yet.)
    let outcome = loop {
        h.release_waiters();
        if let Ok(o) = rx.recv_timeout(Duration::from_millis(100)) {
            break o;
        }
    };
    assert_eq!(outcome, WaitOutcome::Released);
    waiter.join().unwrap();
    // The front-end left: its QEMU and any copy with it.
    h.expect_peer(false);
    assert_eq!(h.wait_synced(), WaitOutcome::Acked);
}

#[test]
fn changes_before_qemus_hello_go_into_its_dump_not_ahead_of_it() {
    let state = vec![Record::Reset {
        system: false,
        reset_id: 0,
    }];
    let (server, _rec, path) = start("early", state);
    let h = server.handle();
    let mut q = FakeQemu::connect(&path);
    let _ = q.recv_hello();
    while !h.is_connected() {
        std::thread::sleep(Duration::from_millis(5));
    }
    // A daemon restoring its state file under a QEMU that connected
    // first: a SYNC batch now would say a copy is whole that is not.
    let attach = Record::Attach {
        endpoint: 8,
        domain: 1,
        bypass: true,
        root: 0,
    };
    assert_eq!(h.publish_sync(&[attach]), None);
    assert_eq!(h.publish(&[attach]), None);
    q.hello();
    let (hdr, p) = q.recv().unwrap();
    assert_eq!((hdr.seq, hdr.flags), (1, EVENTS_F_SYNC), "the dump first");
    assert_eq!(p.len(), RECORD_LEN, "the dump alone: {p:?}");
    assert!(h.publish(&[attach]).is_some(), "after the dump, changes go");
}

#[test]
fn connect_sends_hello_then_after_qemus_hello_the_full_state_as_one_sync_batch() {
    let state = vec![
        Record::Reset {
            system: false,
            reset_id: 0,
        },
        Record::Attach {
            endpoint: 8,
            domain: 1,
            bypass: false,
            root: 5,
        },
    ];
    let (_server, rec, path) = start("dump", state.clone());
    let mut q = FakeQemu::connect(&path);
    // The HELLO arrives with the table and the notifier flags.
    let (h, p, files) = q.recv_hello();
    assert_eq!(files.len(), 2);
    assert_eq!(h.msg_type, MsgType::Hello as u16);
    assert_eq!(p[16], 1, "boot_bypass from start()");
    assert_eq!(
        u32::from_le_bytes(p[24..28].try_into().unwrap()),
        64,
        "table pages"
    );
    assert_eq!(p[28], 3, "levels for a 32-bit input range");
    assert_eq!(
        u32::from_le_bytes(p[32..36].try_into().unwrap()) as usize,
        crate::mirror::NOTIFIER_FLAGS_LEN
    );
    for fd in files {
        assert!(std::fs::File::from(fd).metadata().unwrap().len() > 0);
    }
    // The dump waits for QEMU's HELLO (§6 step 2).
    q.0.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert!(q.recv().is_none(), "a dump before QEMU's HELLO");
    q.0.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    q.hello_as(0xfeed_f00d);
    let (h, p) = q.recv().unwrap();
    assert_eq!(*rec.instances.lock().unwrap(), [0xfeed_f00d]);
    assert_eq!(h.msg_type, MsgType::Events as u16);
    assert_eq!((h.seq, h.flags), (1, EVENTS_F_SYNC));
    assert_eq!(p.len(), 2 * RECORD_LEN);
    assert_eq!(p[..RECORD_LEN], state[0].encode());
    assert_eq!(p[RECORD_LEN..], state[1].encode());
}

#[test]
fn publish_without_qemu_needs_no_wait() {
    let (server, _rec, _path) = start("noqemu", vec![]);
    assert_eq!(server.handle().publish(&[Record::GlobalBypass(true)]), None);
    assert_eq!(
        MirrorHandle::disconnected().publish(&[Record::GlobalBypass(true)]),
        None
    );
}

#[test]
fn wait_returns_acked_only_after_qemu_acks_that_batch() {
    let (server, _rec, path) = start("ack", vec![]);
    let h = server.handle();
    let mut q = connect_synced(&path, &h);
    let t = h.publish(&[Record::Unmap(Unmap {
        domain: 1,
        virt_start: 0,
        virt_end: 0xfff,
    })]);
    let t = t.expect("connected: a ticket");
    let (ev, p) = q.recv().unwrap();
    assert_eq!((ev.seq, ev.flags, p.len()), (2, 0, RECORD_LEN));
    let waiter = {
        let h = h.clone();
        std::thread::spawn(move || h.wait(t, Duration::from_secs(5)))
    };
    std::thread::sleep(Duration::from_millis(50));
    assert!(!waiter.is_finished(), "completed before the ACK");
    q.ack(2);
    assert_eq!(waiter.join().unwrap(), WaitOutcome::Acked);
}

#[test]
fn a_closed_connection_ends_the_wait() {
    let (server, _rec, path) = start("close", vec![]);
    let h = server.handle();
    let q = connect_synced(&path, &h);
    let t = h.publish(&[Record::GlobalBypass(false)]).unwrap();
    drop(q);
    assert_eq!(h.wait(t, Duration::from_secs(5)), WaitOutcome::Disconnected);
    assert!(!h.is_connected());
}

#[test]
fn a_missing_ack_times_out_and_closes_the_connection() {
    let (server, _rec, path) = start("timeout", vec![]);
    let h = server.handle();
    let mut q = connect_synced(&path, &h);
    let t = h.publish(&[Record::GlobalBypass(false)]).unwrap();
    assert_eq!(h.wait(t, Duration::from_millis(50)), WaitOutcome::TimedOut);
    // QEMU sees the batch, then EOF: it drops its copy (fail safe).
    assert!(q.recv().is_some());
    assert!(q.recv().is_none());
}

#[test]
fn release_waiters_ends_a_wait_without_an_ack() {
    let (server, _rec, path) = start("release", vec![]);
    let h = server.handle();
    let _q = connect_synced(&path, &h);
    let t = h.publish(&[Record::GlobalBypass(false)]).unwrap();
    let waiter = {
        let h = h.clone();
        std::thread::spawn(move || h.wait(t, Duration::from_secs(5)))
    };
    std::thread::sleep(Duration::from_millis(20));
    h.release_waiters();
    assert_eq!(waiter.join().unwrap(), WaitOutcome::Released);
}

#[test]
fn faults_reach_the_hooks() {
    let (server, rec, path) = start("fault", vec![]);
    let h = server.handle();
    let mut q = connect_synced(&path, &h);
    let mut p = [0u8; 24];
    p[0..4].copy_from_slice(&0x18u32.to_le_bytes());
    p[4..8].copy_from_slice(&2u32.to_le_bytes());
    p[8..16].copy_from_slice(&0x5000u64.to_le_bytes());
    p[16] = 2;
    q.send(MsgType::Fault as u16, 0, &p);
    // An ACK after it proves the fault was processed (in order).
    let t = h.publish(&[Record::GlobalBypass(false)]).unwrap();
    q.recv().unwrap();
    q.ack(2);
    assert_eq!(h.wait(t, Duration::from_secs(5)), WaitOutcome::Acked);
    assert_eq!(
        *rec.faults.lock().unwrap(),
        vec![proto::Fault {
            endpoint: 0x18,
            flags: 2,
            address: 0x5000,
            reason: 2
        }]
    );
}

#[test]
fn system_reset_is_answered_with_a_sync_reset_batch() {
    let (server, rec, path) = start("sysreset", vec![]);
    let h = server.handle();
    let mut q = connect_synced(&path, &h);
    q.send(MsgType::SystemReset as u16, 3, &[]);
    let (ev, p) = q.recv().unwrap();
    assert_eq!((ev.seq, ev.flags), (2, EVENTS_F_SYNC));
    assert_eq!(
        p[..RECORD_LEN],
        Record::Reset {
            system: true,
            reset_id: 3
        }
        .encode()
    );
    assert_eq!(*rec.resets.lock().unwrap(), vec![3]);
}

#[test]
fn a_second_peer_is_refused_while_qemu_is_connected_and_served_once_it_left() {
    let (server, rec, path) = start("second", vec![]);
    let h = server.handle();
    let mut q = connect_synced(&path, &h);
    let mut intruder = FakeQemu::connect(&path);
    // Its HELLO may find the socket already shut by the refusal.
    let _ = intruder.try_hello();
    assert!(intruder.recv().is_none(), "refused without a HELLO");
    // Both from this process (SO_PEERCRED).
    let pid = Some(std::process::id());
    let peers = rec.peers(2);
    assert_eq!(
        peers[..2],
        [
            PeerEvent::Connected { connection: 1, pid },
            PeerEvent::Refused {
                pid,
                why: Refusal::Busy(1)
            }
        ]
    );
    // The first one is still served.
    let t = h.publish(&[Record::GlobalBypass(false)]).unwrap();
    let (batch, _) = q.recv().unwrap();
    q.ack(batch.seq);
    assert_eq!(h.wait(t, Duration::from_secs(5)), WaitOutcome::Acked);
    // Once it has gone, the next QEMU gets in, even before the daemon
    // has read the close.
    drop(q);
    let _next = connect_synced(&path, &h);
    let gone = PeerEvent::Gone {
        connection: 1,
        how: Ended::Closed,
    };
    let t0 = Instant::now();
    while !rec.peers.lock().unwrap().contains(&gone) {
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", rec.peers(0));
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn the_server_stops_even_when_its_socket_file_is_gone() {
    let (server, _rec, path) = start("unlinked", vec![]);
    let _q = connect_synced(&path, &server.handle());
    std::fs::remove_file(&path).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(server);
        tx.send(()).unwrap();
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("the stop waited for an accept nobody could wake");
}

#[test]
fn a_message_before_hello_is_a_protocol_error_that_closes() {
    let (server, _rec, path) = start("nohello", vec![]);
    let mut q = FakeQemu::connect(&path);
    q.ack(1);
    // Whatever of our HELLO and dump got out before the close, then EOF.
    let mut messages = 0;
    while q.recv().is_some() {
        messages += 1;
        assert!(messages <= 2, "the daemon keeps the connection open");
    }
    assert!(!server.handle().is_connected());
}

#[test]
fn a_peer_that_stops_reading_is_closed() {
    let (server, rec, path) = start("no-reader", vec![]);
    let h = server.handle();
    h.set_write_deadline(Duration::from_millis(200));
    let _q = connect_synced(&path, &h);
    // QEMU reads nothing more; batches pile up past the socket's buffer.
    let records = vec![Record::GlobalBypass(true); MAX_RECORDS];
    let t0 = Instant::now();
    while h.is_connected() {
        h.publish(&records);
        assert!(t0.elapsed() < Duration::from_secs(10), "never closed");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The daemon's doing, not QEMU's.
    assert_eq!(
        rec.peers(2).last(),
        Some(&PeerEvent::Gone {
            connection: 1,
            how: Ended::Dropped
        })
    );
}

#[test]
fn an_ack_for_an_unsent_batch_is_a_protocol_error() {
    let (server, rec, path) = start("badack", vec![]);
    let h = server.handle();
    let mut q = connect_synced(&path, &h);
    q.ack(5);
    assert!(q.recv().is_none());
    assert!(!h.is_connected());
    assert_eq!(
        rec.peers(2).last(),
        Some(&PeerEvent::Gone {
            connection: 1,
            how: Ended::Error
        })
    );
}

#[test]
fn a_large_publish_is_split_into_full_batches() {
    let (server, _rec, path) = start("split", vec![]);
    let h = server.handle();
    let mut q = connect_synced(&path, &h);
    let records = vec![Record::GlobalBypass(true); MAX_RECORDS + 1];
    let t = h.publish(&records).unwrap();
    let (a, pa) = q.recv().unwrap();
    let (b, pb) = q.recv().unwrap();
    assert_eq!((a.seq, pa.len()), (2, MAX_RECORDS * RECORD_LEN));
    assert_eq!((b.seq, pb.len()), (3, RECORD_LEN));
    q.ack(2);
    q.ack(3);
    assert_eq!(h.wait(t, Duration::from_secs(5)), WaitOutcome::Acked);
}
