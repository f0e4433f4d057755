// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The mirror link end to end, against a fake QEMU on a socket pair.

use super::*;
use crate::mirror::completion::test_page::KickPage;
use crate::mirror::proto::{MsgType, EVENTS_F_SYNC, HELLO_LEN, MAGIC, RECORD_LEN};
use std::io::Read;
use std::os::fd::FromRawFd;
use std::path::PathBuf;
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
mod admission;
mod batches;
mod files;
