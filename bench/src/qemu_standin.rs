// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A stand-in for QEMU's end of the translation mirror
//! (docs/mirror-protocol.md, version 2), as much of it as the QEMU leg
//! needs: the HELLOs, the shared memory (the table mapped read-only, the
//! notifier flags read-write), and a thread that reads EVENTS, keeps the
//! domains' tree roots from ATTACH records, and acknowledges each batch at
//! once. It sends nothing else (no FAULT, no SYSTEM_RESET).
//!
//! What QEMU's emulated devices then do — walk the table on their next DMA —
//! is [`QemuStandIn::root`] plus [`QemuStandIn::walk`].

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost_user_iommu::mirror::proto::{
    Header, MsgType, DAEMON_HELLO_LEN, EVENTS_F_SYNC, HEADER_LEN, HELLO_LEN, MAGIC, MAJOR,
    MAX_PAYLOAD_LEN, MINOR, RECORD_LEN,
};
use vhost_user_iommu::mirror::table::{self, Leaf, PAGE_SIZE};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::mapped_file::MappedFile;

/// How long the daemon may take to send its HELLO and its state dump.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest `table_levels` (§4).
const MAX_LEVELS: u32 = 6;

/// Record ops (§5).
const OP_ATTACH: u8 = 1;
const OP_DETACH: u8 = 2;
const OP_MAP: u8 = 3;
const OP_UNMAP: u8 = 4;
const OP_GLOBAL_BYPASS: u8 = 5;
const OP_RESET: u8 = 6;
/// ATTACH flag: a bypass domain.
const ATTACH_F_BYPASS: u16 = 1;

/// Why the stand-in could not connect.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// Nothing listens there.
    #[error("cannot connect to the mirror socket {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// What connect(2) said.
        source: io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("mirror socket: {0}")]
    Io(#[from] io::Error),
    /// The daemon's HELLO is not what §4 describes.
    #[error("the daemon's HELLO: {0}")]
    Hello(&'static str),
    /// A shared file could not be mapped.
    #[error("cannot map the shared {what}: {source}")]
    Map {
        /// `translation table` or `notifier flags`.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
    /// The reader thread stopped on a protocol error before the dump ended.
    #[error(transparent)]
    Failed(#[from] StandInFailure),
    /// The state dump did not end (no SYNC batch) in time.
    #[error("no SYNC batch from the daemon within {0:?}")]
    NoSync(Duration),
    /// A notifier flag outside the flags file.
    #[error("endpoint {endpoint:#x} has no byte in the {len}-byte notifier-flags file")]
    Endpoint {
        /// The endpoint.
        endpoint: u32,
        /// The file's size.
        len: usize,
    },
}

/// Why the reader thread stopped early: a protocol error of the daemon's
/// (§12), or the socket failing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StandInFailure {
    /// A message type the daemon does not send after its HELLO.
    #[error("mirror protocol error: message type {0} from the daemon")]
    UnexpectedType(u16),
    /// An EVENTS payload that is too large or not whole records.
    #[error("mirror protocol error: EVENTS of {0} bytes")]
    BadSize(u32),
    /// EVENTS `seq` did not grow by one.
    #[error("mirror protocol error: EVENTS seq {got}, expected {expected}")]
    SeqGap {
        /// Received.
        got: u64,
        /// Previous + 1.
        expected: u64,
    },
    /// A record op §5 does not define.
    #[error("mirror protocol error: record op {0}")]
    UnknownOp(u8),
    /// An ATTACH whose root is outside the table.
    #[error(
        "mirror protocol error: ATTACH of domain {domain} with root {root:#x} outside the table"
    )]
    BadRoot {
        /// The domain.
        domain: u32,
        /// The root page it gave.
        root: u64,
    },
    /// A MAP or UNMAP with `virt_end < virt_start`.
    #[error("mirror protocol error: record op {op} with an empty range")]
    BadRange {
        /// MAP or UNMAP.
        op: u8,
    },
    /// The socket failed.
    #[error("mirror socket: {0}")]
    Io(String),
}

/// QEMU's copy of the daemon's state, as far as translation needs it: which
/// endpoint is in which domain, and each domain's tree root.
#[derive(Debug, Default)]
struct Copy {
    /// endpoint → domain.
    endpoints: HashMap<u32, u32>,
    /// domain → root page (0: a bypass domain, or no tree).
    roots: HashMap<u32, u32>,
}

impl Copy {
    /// §5 ATTACH: an endpoint elsewhere is detached first; a new domain
    /// takes the record's root.
    fn attach(&mut self, endpoint: u32, domain: u32, root: u32) {
        if let Some(&old) = self.endpoints.get(&endpoint) {
            if old == domain {
                return;
            }
            self.detach(endpoint, old);
        }
        self.endpoints.insert(endpoint, domain);
        self.roots.entry(domain).or_insert(root);
    }

    /// §5 DETACH: the domain is forgotten with its last endpoint.
    fn detach(&mut self, endpoint: u32, domain: u32) {
        if self.endpoints.get(&endpoint) != Some(&domain) {
            return;
        }
        self.endpoints.remove(&endpoint);
        if !self.endpoints.values().any(|&d| d == domain) {
            self.roots.remove(&domain);
        }
    }

    fn reset(&mut self) {
        self.endpoints.clear();
        self.roots.clear();
    }
}

/// What the connection and the reader thread share.
#[derive(Debug)]
struct Shared {
    table: MappedFile,
    table_pages: u32,
    levels: u32,
    flags: MappedFile,
    copy: Mutex<Copy>,
    /// A SYNC batch was applied and acknowledged.
    synced: Mutex<bool>,
    synced_cv: Condvar,
    /// Set before the stand-in closes the socket itself.
    closing: AtomicBool,
    failed: AtomicBool,
    failure: Mutex<Option<StandInFailure>>,
    /// EVENTS batches acknowledged.
    batches: AtomicU64,
    /// MAP and UNMAP records received (only for notified domains, §7).
    map_unmap_records: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The daemon's HELLO payload (§4), the fields the stand-in uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DaemonHello {
    table_pages: u32,
    table_levels: u32,
    flags_len: u32,
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Check a daemon HELLO: the header, then the payload's first
/// [`DAEMON_HELLO_LEN`] bytes.
fn parse_hello(
    header: &[u8; HEADER_LEN],
    payload: &[u8; DAEMON_HELLO_LEN],
) -> Result<DaemonHello, QemuError> {
    let h = Header::decode(header);
    if h.msg_type != MsgType::Hello as u16 {
        return Err(QemuError::Hello("the first message is not a HELLO"));
    }
    match h.payload_len() {
        Ok(n) if n >= DAEMON_HELLO_LEN => {}
        Ok(_) => return Err(QemuError::Hello("payload shorter than the daemon's HELLO")),
        Err(_) => return Err(QemuError::Hello("payload over the size limit")),
    }
    if le_u32(payload, 0) != MAGIC {
        return Err(QemuError::Hello("bad magic"));
    }
    if u16::from_le_bytes([payload[4], payload[5]]) != MAJOR {
        return Err(QemuError::Hello("not major version 2"));
    }
    let hello = DaemonHello {
        table_pages: le_u32(payload, 24),
        table_levels: u32::from(payload[28]),
        flags_len: le_u32(payload, 32),
    };
    if hello.table_pages < 2 {
        return Err(QemuError::Hello("fewer than 2 table pages"));
    }
    if !(1..=MAX_LEVELS).contains(&hello.table_levels) {
        return Err(QemuError::Hello("table levels outside 1-6"));
    }
    Ok(hello)
}

/// QEMU's HELLO (§4): 24 bytes, boot_bypass 0.
fn qemu_hello() -> [u8; HEADER_LEN + HELLO_LEN] {
    let mut m = [0u8; HEADER_LEN + HELLO_LEN];
    let mut h = [0u8; HEADER_LEN];
    Header {
        msg_type: MsgType::Hello as u16,
        flags: 0,
        size: HELLO_LEN as u32,
        seq: 0,
    }
    .encode(&mut h);
    m[..HEADER_LEN].copy_from_slice(&h);
    m[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&MAGIC.to_le_bytes());
    m[HEADER_LEN + 4..HEADER_LEN + 6].copy_from_slice(&MAJOR.to_le_bytes());
    m[HEADER_LEN + 6..HEADER_LEN + 8].copy_from_slice(&MINOR.to_le_bytes());
    m
}

/// Receive the daemon's HELLO and the two files that come with it (§4:
/// the table, then the notifier flags).
fn receive_hello(s: &mut UnixStream) -> Result<(DaemonHello, File, File), QemuError> {
    let mut buf = [0u8; HEADER_LEN + DAEMON_HELLO_LEN];
    let mut fds = [-1; 2];
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: the iovec describes `buf`, which outlives the call; the
    // descriptors received are written into `fds`.
    let (n, nfds) = unsafe { s.recv_with_fds(&mut iov, &mut fds) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let mut files = fds[..nfds.min(2)].iter().map(|&fd| {
        // SAFETY: each descriptor was just received and nothing else owns
        // it; the File closes it (also on the error paths below).
        unsafe { File::from_raw_fd(fd) }
    });
    let (table, flags) = (files.next(), files.next());
    if n == 0 {
        return Err(QemuError::Hello("the daemon closed the connection"));
    }
    s.read_exact(&mut buf[n..])?;
    let (Some(table), Some(flags)) = (table, flags) else {
        return Err(QemuError::Hello("it did not carry two files"));
    };
    let mut header = [0u8; HEADER_LEN];
    header.copy_from_slice(&buf[..HEADER_LEN]);
    let mut payload = [0u8; DAEMON_HELLO_LEN];
    payload.copy_from_slice(&buf[HEADER_LEN..]);
    let hello = parse_hello(&header, &payload)?;
    // Payload bytes past the 2.0 layout are ignored (§3).
    let extra = Header::decode(&header).size as usize - DAEMON_HELLO_LEN;
    io::copy(&mut (&mut *s).take(extra as u64), &mut io::sink())?;
    Ok((hello, table, flags))
}

/// QEMU's end of one mirror connection; closed when dropped.
#[derive(Debug)]
pub struct QemuStandIn {
    shared: Arc<Shared>,
    stream: UnixStream,
    thread: Option<JoinHandle<()>>,
}

impl QemuStandIn {
    /// Connect to the daemon's mirror socket at `path`, exchange HELLOs,
    /// map the shared memory, and start acknowledging; returns once the
    /// daemon's state dump has ended (its SYNC batch is acknowledged).
    pub fn connect(path: &Path) -> Result<Self, QemuError> {
        let mut stream = UnixStream::connect(path).map_err(|source| QemuError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        stream.set_read_timeout(Some(CONNECT_TIMEOUT))?;
        let (hello, table_file, flags_file) = receive_hello(&mut stream)?;
        let table_len = hello.table_pages as usize * PAGE_SIZE as usize;
        let table =
            MappedFile::map(&table_file, table_len, false).map_err(|source| QemuError::Map {
                what: "translation table",
                source,
            })?;
        let flags =
            MappedFile::map(&flags_file, hello.flags_len as usize, true).map_err(|source| {
                QemuError::Map {
                    what: "notifier flags",
                    source,
                }
            })?;
        // Each side sends its HELLO without waiting for the peer's (§6);
        // ours goes before any ACK.
        stream.write_all(&qemu_hello())?;
        stream.set_read_timeout(None)?;

        let shared = Arc::new(Shared {
            table,
            table_pages: hello.table_pages,
            levels: hello.table_levels,
            flags,
            copy: Mutex::default(),
            synced: Mutex::new(false),
            synced_cv: Condvar::new(),
            closing: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            batches: AtomicU64::new(0),
            map_unmap_records: AtomicU64::new(0),
        });
        let reader = stream.try_clone()?;
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("qemu-standin".into())
            .spawn(move || {
                if let Err(f) = serve(reader, &sh) {
                    if !sh.closing.load(Ordering::SeqCst) {
                        *lock(&sh.failure) = Some(f);
                        sh.failed.store(true, Ordering::SeqCst);
                    }
                }
                // Wake a connect() still waiting for the SYNC.
                sh.synced_cv.notify_all();
            })?;
        let standin = Self {
            shared,
            stream,
            thread: Some(thread),
        };
        standin.wait_synced()?;
        Ok(standin)
    }

    fn wait_synced(&self) -> Result<(), QemuError> {
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let mut synced = lock(&self.shared.synced);
        while !*synced {
            if let Some(f) = self.failure() {
                return Err(f.into());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(QemuError::NoSync(CONNECT_TIMEOUT));
            }
            synced = self
                .shared
                .synced_cv
                .wait_timeout(synced, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// Say that `endpoints` have IOMMU notifiers (a VFIO device behind the
    /// vIOMMU): from now on the daemon sends their domains' MAP/UNMAP as
    /// records and waits for the ACK (§11 "Notifier flags").
    pub fn set_notified(&self, endpoints: impl IntoIterator<Item = u32>) -> Result<(), QemuError> {
        let flags = self.shared.flags.bytes();
        for ep in endpoints {
            let byte = flags.get(ep as usize).ok_or(QemuError::Endpoint {
                endpoint: ep,
                len: flags.len(),
            })?;
            byte.store(1, Ordering::Relaxed);
        }
        // QEMU's side of the §11 ordering: flags set, full barrier, then it
        // reads the table.
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// The root of `domain`'s tree as the ATTACH records gave it (0 for a
    /// bypass domain); `None` if QEMU knows no such domain.
    pub fn root(&self, domain: u32) -> Option<u32> {
        lock(&self.shared.copy).roots.get(&domain).copied()
    }

    /// What QEMU's translate() finds for `iova` in the tree at `root` (§11).
    pub fn walk(&self, root: u32, iova: u64) -> Option<Leaf> {
        table::translate(self.shared.table.words(), self.shared.levels, root, iova)
    }

    /// Why the reader thread stopped, if it stopped on an error.
    pub fn failure(&self) -> Option<StandInFailure> {
        if !self.shared.failed.load(Ordering::Relaxed) {
            return None;
        }
        lock(&self.shared.failure).clone()
    }

    /// EVENTS batches acknowledged so far.
    pub fn batches(&self) -> u64 {
        self.shared.batches.load(Ordering::Relaxed)
    }

    /// MAP and UNMAP records received so far.
    pub fn map_unmap_records(&self) -> u64 {
        self.shared.map_unmap_records.load(Ordering::Relaxed)
    }
}

impl Drop for QemuStandIn {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn io_failure(e: &io::Error) -> StandInFailure {
    StandInFailure::Io(e.to_string())
}

/// The reader thread: apply and acknowledge every EVENTS batch, in order,
/// until the connection closes.
fn serve(mut s: UnixStream, shared: &Shared) -> Result<(), StandInFailure> {
    let mut payload = vec![0u8; MAX_PAYLOAD_LEN];
    let mut expected = 1u64;
    loop {
        let mut head = [0u8; HEADER_LEN];
        match s.read_exact(&mut head) {
            Ok(()) => {}
            // A close, also in the middle of a message (§12), is no error.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(io_failure(&e)),
        }
        let h = Header::decode(&head);
        if h.msg_type != MsgType::Events as u16 {
            return Err(StandInFailure::UnexpectedType(h.msg_type));
        }
        let size = h
            .payload_len()
            .ok()
            .filter(|n| n % RECORD_LEN == 0)
            .ok_or(StandInFailure::BadSize(h.size))?;
        match s.read_exact(&mut payload[..size]) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(io_failure(&e)),
        }
        if h.seq != expected {
            return Err(StandInFailure::SeqGap {
                got: h.seq,
                expected,
            });
        }
        expected += 1;
        apply(&payload[..size], shared)?;
        let mut ack = [0u8; HEADER_LEN];
        Header {
            msg_type: MsgType::Ack as u16,
            flags: 0,
            size: 0,
            seq: h.seq,
        }
        .encode(&mut ack);
        s.write_all(&ack).map_err(|e| io_failure(&e))?;
        shared.batches.fetch_add(1, Ordering::Relaxed);
        if h.flags & EVENTS_F_SYNC != 0 {
            *lock(&shared.synced) = true;
            shared.synced_cv.notify_all();
        }
    }
}

/// Apply one batch's records (§5) to the copy, atomically with respect to
/// the driver's table walks (one lock across the batch).
fn apply(records: &[u8], shared: &Shared) -> Result<(), StandInFailure> {
    let mut copy = lock(&shared.copy);
    for r in records.chunks_exact(RECORD_LEN) {
        let op = r[0];
        let flags = u16::from_le_bytes([r[2], r[3]]);
        let (endpoint, domain) = (le_u32(r, 4), le_u32(r, 8));
        let (virt_start, virt_end, phys) = (le_u64(r, 16), le_u64(r, 24), le_u64(r, 32));
        match op {
            OP_ATTACH => {
                let root = u32::try_from(phys)
                    .ok()
                    .filter(|&p| p < shared.table_pages)
                    .ok_or(StandInFailure::BadRoot { domain, root: phys })?;
                let root = if flags & ATTACH_F_BYPASS != 0 {
                    0
                } else {
                    root
                };
                copy.attach(endpoint, domain, root);
            }
            OP_DETACH => copy.detach(endpoint, domain),
            OP_MAP | OP_UNMAP => {
                if virt_end < virt_start {
                    return Err(StandInFailure::BadRange { op });
                }
                // The table already holds the change; a QEMU would tell its
                // notifiers here.
                shared.map_unmap_records.fetch_add(1, Ordering::Relaxed);
            }
            OP_GLOBAL_BYPASS => {}
            OP_RESET => copy.reset(),
            other => return Err(StandInFailure::UnknownOp(other)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_moves_endpoints_and_the_last_detach_forgets_the_domain() {
        let mut c = Copy::default();
        c.attach(8, 1, 5);
        c.attach(9, 1, 7);
        assert_eq!(
            c.roots.get(&1),
            Some(&5),
            "an existing domain keeps its root"
        );
        c.attach(8, 2, 6);
        assert_eq!(c.roots.get(&2), Some(&6));
        assert_eq!(c.roots.get(&1), Some(&5), "endpoint 9 is still in domain 1");
        c.detach(9, 2);
        assert_eq!(c.roots.get(&1), Some(&5), "9 is not in domain 2: no-op");
        c.detach(9, 1);
        assert_eq!(c.roots.get(&1), None);
        c.reset();
        assert!(c.roots.is_empty() && c.endpoints.is_empty());
    }

    fn daemon_hello(
        major: u16,
        pages: u32,
        levels: u8,
    ) -> ([u8; HEADER_LEN], [u8; DAEMON_HELLO_LEN]) {
        let mut h = [0u8; HEADER_LEN];
        Header {
            msg_type: 1,
            flags: 0,
            size: DAEMON_HELLO_LEN as u32,
            seq: 0,
        }
        .encode(&mut h);
        let mut p = [0u8; DAEMON_HELLO_LEN];
        p[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        p[4..6].copy_from_slice(&major.to_le_bytes());
        p[24..28].copy_from_slice(&pages.to_le_bytes());
        p[28] = levels;
        p[32..36].copy_from_slice(&0x10000u32.to_le_bytes());
        (h, p)
    }

    #[test]
    fn a_daemon_hello_gives_the_shared_memorys_geometry() {
        let (h, p) = daemon_hello(2, 0x40000, 4);
        assert_eq!(
            parse_hello(&h, &p).unwrap(),
            DaemonHello {
                table_pages: 0x40000,
                table_levels: 4,
                flags_len: 0x10000
            }
        );
    }

    #[test]
    fn a_bad_daemon_hello_is_refused_with_the_reason() {
        for ((h, p), why) in [
            (daemon_hello(1, 64, 3), "major"),
            (daemon_hello(2, 1, 3), "table pages"),
            (daemon_hello(2, 64, 7), "levels"),
        ] {
            let err = parse_hello(&h, &p).unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
        }
    }

    #[test]
    fn qemus_hello_is_24_bytes_of_magic_and_version() {
        let m = qemu_hello();
        assert_eq!(&m[..8], &[1, 0, 0, 0, 24, 0, 0, 0]);
        assert_eq!(&m[16..20], b"VUIM");
        assert_eq!(&m[20..22], &[2, 0]);
    }
}
