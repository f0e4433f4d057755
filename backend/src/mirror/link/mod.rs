// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon's end of the mirror connection (docs/mirror-protocol.md §6–§8).
//!
//! One listener thread accepts QEMU; each connection has a reader thread
//! (HELLO, ACK, FAULT, SYSTEM_RESET) and a writer thread that drains an
//! outgoing buffer. [`MirrorHandle::publish`] only appends to that buffer, so
//! it never blocks on QEMU (§8 rule 4 is kept by construction); a caller that
//! must complete a guest UNMAP/DETACH only once QEMU dropped the translation
//! waits with [`MirrorHandle::wait`], holding no lock the vhost-user thread
//! needs (§8 rule 2).

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::completion::CompletionSignal;
use super::proto::{
    self, FromQemu, Header, ProtoError, Record, FEATURE_COMPLETION_FD, FEATURE_VFIO_DEVICES,
    HEADER_LEN, MAX_RECORDS,
};
use super::MirrorMemory;

/// What the daemon does when QEMU talks (called on the reader thread).
pub trait MirrorHooks: Send + Sync + 'static {
    /// A new connection: call `send` with the full current state (§6 step 2)
    /// while holding the lock under which the state changes, so that no
    /// change is both in the dump and published after it.
    fn snapshot(&self, send: &mut dyn FnMut(&[Record]));
    /// An emulated device's DMA faulted (§10).
    fn fault(&self, fault: proto::Fault);
    /// QEMU reset the machine (§9): reset the translation state and call
    /// `send` with `RESET(system, id)` + `GLOBAL_BYPASS`, under the state lock.
    fn system_reset(&self, id: u32, send: &mut dyn FnMut(&[Record]));
    /// QEMU forwarded an iommufd-backed VFIO device (§14): its endpoint,
    /// the device ID QEMU's bind returned, QEMU's iommufd file and the
    /// device's file. Only called when the daemon offered
    /// [`FEATURE_VFIO_DEVICES`]. An error is logged; the device stays
    /// blocked.
    fn vfio_device_added(
        &self,
        _endpoint: u32,
        _devid: u32,
        _iommufd: OwnedFd,
        _device: OwnedFd,
    ) -> Result<(), String> {
        Err("this daemon does not take VFIO devices".into())
    }
    /// QEMU took back the device of `endpoint` (hot-unplug).
    fn vfio_device_removed(&self, _endpoint: u32) {}
    /// QEMU's HELLO arrived with its `instance` (2.2; 0 from an older
    /// QEMU), before the dump of this connection is made (§6 rule 4: a
    /// state recovered for another QEMU must not reach this one).
    fn qemu_hello(&self, _instance: u64) {}
    /// A HELLO naming `instance` would reset a recovered state (§6 rule
    /// 4): it then counts only from the front-end's process (§6 rule 7),
    /// so the link waits for the front-end first.
    fn hello_would_reset(&self, _instance: u64) -> bool {
        false
    }
    /// The connection that forwarded devices ended: they go with it (§14).
    fn vfio_devices_gone(&self) {}
}

/// A batch to wait for: acknowledged when QEMU's highest ACK reaches `seq`
/// on connection `conn`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    conn: u64,
    seq: u64,
}

/// How a wait ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitOutcome {
    /// QEMU applied the batch and its notifiers returned.
    Acked,
    /// The connection closed: QEMU dropped its whole copy (§6 step 4).
    Disconnected,
    /// [`MirrorHandle::release_waiters`] was called (the vring is stopping).
    Released,
    /// No ACK in time: the connection was closed, so QEMU fails safe.
    TimedOut,
}

#[derive(Debug, Default)]
struct Conn {
    id: u64,
    stream: Option<UnixStream>,
    out: Vec<u8>,
    next_seq: u64,
    acked: u64,
    closed: bool,
    /// The sequence number of the connect dump's SYNC batch (0 until sent).
    dump_seq: u64,
    /// The peer's process (`SO_PEERCRED`).
    peer: Option<u32>,
}

impl Conn {
    /// QEMU has applied the dump: its copy is the daemon's state.
    fn synced(&self) -> bool {
        !self.closed && self.dump_seq > 0 && self.acked >= self.dump_seq
    }
}

#[derive(Debug, Default)]
struct Link {
    conn: Option<Conn>,
    next_conn_id: u64,
    release_epoch: u64,
    stop: bool,
    /// A QEMU may hold a frozen copy of the state (§6 rule 4): one synced
    /// since the front-end came, or the daemon recovered the state of a
    /// QEMU that kept running ([`MirrorHandle::expect_peer`]).
    expect_peer: bool,
    /// The vhost-user front-end's process, while one is connected: the only
    /// process whose mirror connection is served (§6 rule 7).
    front_end: Option<u32>,
    /// A front-end is connected, but its process could not be found: any
    /// process is served, as without one.
    front_end_unknown: bool,
    /// How long a new connection has to send its HELLO (§6 rule 7);
    /// [`HELLO_DEADLINE`] if unset.
    hello_deadline: Option<Duration>,
    /// How long a write may wait for the peer to read; [`WRITE_DEADLINE`]
    /// if unset.
    write_deadline: Option<Duration>,
    /// How long QEMU has to acknowledge its dump; [`DUMP_ACK_DEADLINE`] if
    /// unset.
    dump_ack_deadline: Option<Duration>,
}

/// How long QEMU has to acknowledge its dump (§12).
pub const DUMP_ACK_DEADLINE: Duration = Duration::from_secs(10);

/// How long a HELLO that must decide a recovered state's owner waits for
/// the front-end to connect (QEMU reconnects its vhost-user socket with
/// `reconnect-ms`).
pub const FRONT_END_WAIT: Duration = Duration::from_secs(30);

/// How long a write to the peer may wait for it to read: a peer that stops
/// reading is closed, not left holding the socket (§12).
pub const WRITE_DEADLINE: Duration = Duration::from_secs(10);

/// How long a new connection has to send its HELLO before it is closed: a
/// peer that never says who it is must not hold the socket (§6 rule 7).
pub const HELLO_DEADLINE: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<Link>,
    /// Requests may have to wait for a synced QEMU ([`MirrorHandle::wait_synced`]
    /// looks under the lock); false only while one is synced or none is
    /// expected. Set under the lock whenever that may have changed.
    gate: AtomicBool,
    /// Signalled on ACKs, closes, releases and new outgoing bytes.
    changed: Condvar,
    /// The connected QEMU's completion eventfd (§15).
    completion: CompletionSignal,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Link> {
        // A panic elsewhere must not take the mirror down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The publishing side, cloned into whoever changes the translation state.
#[derive(Clone, Debug, Default)]
pub struct MirrorHandle {
    shared: Arc<Shared>,
    memory: Option<Arc<MirrorMemory>>,
}

impl MirrorHandle {
    /// A handle with no mirror behind it: publishing is a no-op.
    pub fn disconnected() -> Self {
        Self::default()
    }

    /// Queue `records` to QEMU, in batches of at most [`MAX_RECORDS`].
    /// Returns the ticket of the last batch, or `None` when no QEMU is
    /// connected (then there is nothing to wait for, §7).
    pub fn publish(&self, records: &[Record]) -> Option<Ticket> {
        if records.is_empty() {
            return None;
        }
        let mut st = self.shared.lock();
        let ticket = enqueue(dumped(&mut st)?, records, false);
        drop(st);
        self.shared.changed.notify_all();
        ticket
    }

    /// [`Self::publish`], the last batch flagged SYNC: QEMU's copy is
    /// complete with it (§4) — after a migration load, QEMU waits for that
    /// before the devices loaded after the vIOMMU translate through it.
    pub fn publish_sync(&self, records: &[Record]) -> Option<Ticket> {
        let mut st = self.shared.lock();
        let ticket = enqueue(dumped(&mut st)?, records, true);
        drop(st);
        self.shared.changed.notify_all();
        ticket
    }

    /// Wait until the batch of `ticket` is acknowledged, the connection
    /// closes, waiters are released, or `timeout` passes (then the
    /// connection is closed: QEMU reconnects and gets the whole state again,
    /// and the requests wait for that, §6 rule 4).
    pub fn wait(&self, ticket: Ticket, timeout: Duration) -> WaitOutcome {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        let epoch = st.release_epoch;
        loop {
            match st.conn.as_ref() {
                Some(c) if c.id == ticket.conn && !c.closed => {
                    if c.acked >= ticket.seq {
                        return WaitOutcome::Acked;
                    }
                }
                _ => return WaitOutcome::Disconnected,
            }
            if st.release_epoch != epoch || st.stop {
                return WaitOutcome::Released;
            }
            let now = Instant::now();
            if now >= deadline {
                log::error!(
                    "mirror: no ACK for batch {} in {timeout:?}; closing the mirror connection",
                    ticket.seq
                );
                if let Some(c) = st.conn.as_mut() {
                    close(c, &self.shared.gate);
                }
                drop(st);
                self.shared.changed.notify_all();
                return WaitOutcome::TimedOut;
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Whether a QEMU may be holding a copy of the state that it keeps,
    /// frozen, while it has no connection (§6 rule 4, QEMU keeps only a
    /// synced copy): set when a connection acknowledges its dump, and by a
    /// daemon that recovered its state file under a running QEMU; cleared
    /// when the front-end leaves (its QEMU is gone). A new front-end
    /// expects one only if a synced QEMU is connected now.
    pub fn expect_peer(&self, expect: bool) {
        let mut st = self.shared.lock();
        st.expect_peer = expect;
        self.shared.gate.store(true, Ordering::Release);
        drop(st);
        self.shared.changed.notify_all();
    }

    /// A new front-end came: a copy held from before belongs to a QEMU that
    /// is gone, unless the QEMU connected now is synced (then it is this
    /// front-end's, connected first).
    pub fn new_front_end(&self) {
        let mut st = self.shared.lock();
        // A peer that has hung up (its reader may not have seen the EOF
        // yet) is not connected.
        if let Some(c) = st.conn.as_mut().filter(|c| !c.closed && peer_gone(c)) {
            close(c, &self.shared.gate);
        }
        st.expect_peer = st.conn.as_ref().is_some_and(Conn::synced);
        self.shared.gate.store(true, Ordering::Release);
    }

    /// Before requests complete: if a QEMU may be translating with a frozen
    /// copy and no connection has the current state, wait until a QEMU
    /// connects and acknowledges its dump (§6 rule 4: a request completed
    /// meanwhile — an UNMAP, a DETACH — would leave QEMU's copy stale). Ends
    /// at once without a mirror or a QEMU to wait for; with
    /// [`WaitOutcome::Released`] when the vring stops.
    pub fn wait_synced(&self) -> WaitOutcome {
        // The request path: one load, no lock, while QEMU is synced.
        if self.memory.is_none() || !self.shared.gate.load(Ordering::Acquire) {
            return WaitOutcome::Acked;
        }
        let mut st = self.shared.lock();
        let epoch = st.release_epoch;
        let mut waited = Duration::ZERO;
        loop {
            if !st.expect_peer || st.conn.as_ref().is_some_and(Conn::synced) {
                self.shared.gate.store(false, Ordering::Release);
                return WaitOutcome::Acked;
            }
            if st.release_epoch != epoch || st.stop {
                return WaitOutcome::Released;
            }
            if waited == Duration::from_secs(10) {
                log::warn!(
                    "mirror: requests wait for QEMU's mirror to reconnect (its copy of the \
                     state is frozen until then)"
                );
            }
            let step = Duration::from_secs(1);
            st = self
                .shared
                .changed
                .wait_timeout(st, step)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            waited += step;
        }
    }

    /// End every current wait with [`WaitOutcome::Released`] (§8 rule 2: at
    /// `GET_VRING_BASE` parked requests complete without their ACK).
    pub fn release_waiters(&self) {
        self.shared.lock().release_epoch += 1;
        self.shared.changed.notify_all();
    }

    /// The memory shared with QEMU (none for a handle without a mirror).
    pub fn memory(&self) -> Option<&Arc<MirrorMemory>> {
        self.memory.as_ref()
    }

    /// The notifier flags QEMU writes (§11), if there is a mirror.
    pub fn notifier_flags(&self) -> Option<&[AtomicU8]> {
        self.memory.as_ref().map(|m| m.flags.as_u8s())
    }

    /// Tell the connected QEMU that the request queue's used ring moved
    /// (§15), if a vCPU sleeps on its kick. Lock-free; `true` if told.
    pub fn signal_completions(&self) -> bool {
        self.shared.completion.signal()
    }

    /// Whether QEMU's vCPUs sleep on their kicks of the request queue (a
    /// QEMU gave its completion files, §15).
    pub fn vcpus_sleep(&self) -> bool {
        self.shared.completion.armed()
    }

    /// The CPU QEMU's vCPU last kicked the request queue from (§15).
    pub fn vcpu_cpu(&self) -> Option<usize> {
        self.shared.completion.vcpu_cpu()
    }

    /// The vhost-user front-end's process (`None`: none is connected).
    /// Only that process's mirror connection is served (§6 rule 7): one
    /// from another process is closed, now or when it connects.
    pub fn set_front_end(&self, pid: Option<u32>) {
        let mut st = self.shared.lock();
        st.front_end = pid;
        st.front_end_unknown = false;
        if let (Some(pid), Some(c)) = (pid, st.conn.as_mut()) {
            if !c.closed && c.peer != Some(pid) {
                log::warn!(
                    "mirror: connection {} is from process {}, not the front-end's QEMU \
                     (process {pid}): closing it",
                    c.id,
                    c.peer.map_or("?".into(), |p| p.to_string())
                );
                close(c, &self.shared.gate);
            }
        }
        drop(st);
        self.shared.changed.notify_all();
    }

    /// A front-end is connected whose process could not be found: any
    /// process is served (logged by the caller).
    pub fn set_front_end_unknown(&self) {
        let mut st = self.shared.lock();
        st.front_end = None;
        st.front_end_unknown = true;
        drop(st);
        self.shared.changed.notify_all();
    }

    /// How long new connections have to send their HELLO (tests; default
    /// `HELLO_DEADLINE`).
    pub fn set_hello_deadline(&self, deadline: Duration) {
        self.shared.lock().hello_deadline = Some(deadline);
    }

    /// How long QEMU has to acknowledge its dump (tests; default
    /// `DUMP_ACK_DEADLINE`).
    pub fn set_dump_ack_deadline(&self, deadline: Duration) {
        self.shared.lock().dump_ack_deadline = Some(deadline);
    }

    /// How long writes to new connections may wait for the peer to read
    /// (tests; default `WRITE_DEADLINE`).
    pub fn set_write_deadline(&self, deadline: Duration) {
        self.shared.lock().write_deadline = Some(deadline);
    }

    /// Whether a QEMU is connected.
    pub fn is_connected(&self) -> bool {
        self.shared.lock().conn.as_ref().is_some_and(|c| !c.closed)
    }

    /// Whether a QEMU is connected, its process, and whether it has
    /// acknowledged its dump (its copy is the daemon's state).
    pub fn peer(&self) -> (bool, Option<u32>, bool) {
        let st = self.shared.lock();
        match st.conn.as_ref().filter(|c| !c.closed) {
            Some(c) => (true, c.peer, c.synced()),
            None => (false, None, false),
        }
    }

    /// Whether no QEMU is connected and none ever was: then no QEMU can be
    /// holding a frozen copy of the state (§6 rule 4) whose walks could
    /// reach table pages of destroyed domains.
    pub fn never_connected(&self) -> bool {
        self.shared.lock().next_conn_id == 0
    }
}

/// The connection changes are published to: one whose dump is on its way.
/// Before that (QEMU's HELLO not read yet) a change goes nowhere: the dump,
/// made later under the same lock as the change, has it — and a batch
/// flagged SYNC ahead of the dump would tell QEMU a copy is whole that is
/// not (§6 step 2).
fn dumped(st: &mut Link) -> Option<&mut Conn> {
    st.conn.as_mut().filter(|c| c.dump_seq > 0)
}

fn enqueue(conn: &mut Conn, records: &[Record], sync_last: bool) -> Option<Ticket> {
    if conn.closed {
        return None;
    }
    let mut chunks = records.chunks(MAX_RECORDS).peekable();
    if chunks.peek().is_none() {
        // A SYNC batch is sent even with no records: it still ends a dump.
        if sync_last {
            conn.next_seq += 1;
            proto::encode_events(conn.next_seq, true, &[], &mut conn.out);
        }
    }
    while let Some(chunk) = chunks.next() {
        conn.next_seq += 1;
        let sync = sync_last && chunks.peek().is_none();
        proto::encode_events(conn.next_seq, sync, chunk, &mut conn.out);
        if log::max_level() >= log::LevelFilter::Trace {
            trace_records(conn.id, conn.next_seq, sync, chunk);
        }
    }
    Some(Ticket {
        conn: conn.id,
        seq: conn.next_seq,
    })
}

/// One trace line per record sent to QEMU (and one per batch), as QEMU's
/// trace events: only called with trace level on, nothing formatted
/// otherwise.
#[cold]
#[inline(never)]
fn trace_records(conn: u64, seq: u64, sync: bool, records: &[Record]) {
    log::trace!(
        "mirror_events connection={conn} seq={seq} records={} sync={sync}",
        records.len()
    );
    for r in records {
        match *r {
            Record::Attach {
                endpoint,
                domain,
                bypass,
                root,
            } => log::trace!(
                "mirror_record seq={seq} attach endpoint={endpoint:#x} domain={domain} \
                 bypass={bypass} root={root}"
            ),
            Record::Detach { endpoint, domain } => {
                log::trace!("mirror_record seq={seq} detach endpoint={endpoint:#x} domain={domain}")
            }
            Record::Map(m) => log::trace!(
                "mirror_record seq={seq} map domain={} virt_start={:#x} virt_end={:#x} \
                 phys_start={:#x} flags={:#x}",
                m.domain,
                m.virt_start,
                m.virt_end,
                m.phys_start,
                m.flags
            ),
            Record::Unmap(u) => log::trace!(
                "mirror_record seq={seq} unmap domain={} virt_start={:#x} virt_end={:#x}",
                u.domain,
                u.virt_start,
                u.virt_end
            ),
            Record::GlobalBypass(on) => {
                log::trace!("mirror_record seq={seq} global_bypass on={on}")
            }
            Record::Reset { system, reset_id } => {
                log::trace!("mirror_record seq={seq} reset system={system} reset_id={reset_id}")
            }
        }
    }
}

/// Whether the peer of `conn` has closed its end (or the socket failed),
/// without reading from it.
fn peer_gone(conn: &Conn) -> bool {
    let Some(stream) = conn.stream.as_ref() else {
        return true;
    };
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, a zero timeout; the fd is open while `conn`
    // holds the stream.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

fn close(conn: &mut Conn, gate: &AtomicBool) {
    gate.store(true, Ordering::Release);
    conn.closed = true;
    if let Some(s) = conn.stream.take() {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
}

/// What the daemon's HELLO announces (§4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hello {
    /// The `bypass` value the device takes on a system reset.
    pub boot_bypass: bool,
    /// The daemon takes the VFIO devices QEMU forwards (§14).
    pub vfio_devices: bool,
    /// The daemon signals QEMU's completion eventfd (§15).
    pub completion_fd: bool,
    /// The MSI window the daemon's PROBE reports (2.4, §4): announced, and
    /// a QEMU whose machine lets another through is refused. `None`:
    /// neither.
    pub msi_window: Option<(u64, u64)>,
}

impl Hello {
    /// What a daemon announces: VFIO devices only if it takes them.
    pub fn new(boot_bypass: bool, vfio_devices: bool) -> Self {
        Self {
            boot_bypass,
            vfio_devices,
            completion_fd: true,
            msi_window: None,
        }
    }

    /// Announce `window` as the one PROBE reports, and refuse a QEMU whose
    /// machine lets another through untranslated.
    pub fn with_msi_window(self, window: (u64, u64)) -> Self {
        Self {
            msi_window: Some(window),
            ..self
        }
    }

    fn features(self) -> u64 {
        let mut f = 0;
        if self.vfio_devices {
            f |= FEATURE_VFIO_DEVICES;
        }
        if self.completion_fd {
            f |= FEATURE_COMPLETION_FD;
        }
        if self.msi_window.is_some() {
            f |= proto::FEATURE_MSI_WINDOW;
        }
        f
    }
}

/// The listening mirror socket and its threads.
#[derive(Debug)]
pub struct MirrorServer {
    handle: MirrorHandle,
    path: PathBuf,
    listener_thread: Option<JoinHandle<()>>,
}

impl MirrorServer {
    /// Listen on `path` (an existing socket file there is replaced) and serve
    /// one QEMU at a time: a connection while one is up is refused. Each
    /// connection is handed `memory` with its HELLO.
    pub fn start(
        path: &Path,
        boot_bypass: bool,
        hooks: Arc<dyn MirrorHooks>,
        memory: Arc<MirrorMemory>,
    ) -> io::Result<Self> {
        let hello = Hello::new(boot_bypass, false);
        Self::start_with(path, hello, hooks, memory)
    }

    /// [`Self::start`], announcing `hello` (e.g. taking VFIO devices, §14).
    pub fn start_with(
        path: &Path,
        hello: Hello,
        hooks: Arc<dyn MirrorHooks>,
        memory: Arc<MirrorMemory>,
    ) -> io::Result<Self> {
        Self::start_with_access(path, Access::default(), hello, hooks, memory)
    }

    /// [`Self::start_with`], the socket appearing with `access`.
    pub fn start_with_access(
        path: &Path,
        access: Access,
        hello: Hello,
        hooks: Arc<dyn MirrorHooks>,
        memory: Arc<MirrorMemory>,
    ) -> io::Result<Self> {
        let listener = crate::listen::listen_at(path, access)?;
        let handle = MirrorHandle {
            shared: Arc::default(),
            memory: Some(memory.clone()),
        };
        let shared = handle.shared.clone();
        let listener_thread = std::thread::Builder::new()
            .name("mirror-accept".into())
            .spawn(move || accept_loop(listener, shared, hello, hooks, memory))?;
        Ok(Self {
            handle,
            path: path.to_owned(),
            listener_thread: Some(listener_thread),
        })
    }

    pub fn handle(&self) -> MirrorHandle {
        self.handle.clone()
    }
}

impl Drop for MirrorServer {
    fn drop(&mut self) {
        {
            let mut st = self.handle.shared.lock();
            st.stop = true;
            if let Some(c) = st.conn.as_mut() {
                close(c, &self.handle.shared.gate);
            }
        }
        self.handle.shared.changed.notify_all();
        // Wake the blocking accept() with a throwaway connection.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.listener_thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(
    listener: UnixListener,
    shared: Arc<Shared>,
    hello: Hello,
    hooks: Arc<dyn MirrorHooks>,
    memory: Arc<MirrorMemory>,
) {
    for stream in listener.incoming() {
        if shared.lock().stop {
            return;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                log::error!("mirror: accept failed: {e}");
                continue;
            }
        };
        if let Err(e) = serve(stream, &shared, hello, &hooks, &memory) {
            log::error!("mirror: cannot serve the connection: {e}");
        }
    }
}

fn serve(
    stream: UnixStream,
    shared: &Arc<Shared>,
    hello_info: Hello,
    hooks: &Arc<dyn MirrorHooks>,
    memory: &MirrorMemory,
) -> io::Result<()> {
    let reader = stream.try_clone()?;
    let writer = stream.try_clone()?;
    let peer = crate::peer::peer_pid(&stream);
    let (id, hello_deadline, write_deadline) = {
        let mut st = shared.lock();
        if let Some(why) = refusal(&mut st, &shared.gate, peer) {
            log::warn!(
                "mirror: refusing a connection from process {}: {why}",
                peer.map_or("?".into(), |p| p.to_string())
            );
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return Ok(());
        }
        // A new QEMU starts with no notifiers (§11): it sets the flags of
        // the endpoints that have some once it has mapped them, in a file
        // of its own: what an earlier peer still holds is no longer read.
        memory.flags.renew()?;
        send_hello(&stream, hello_info, memory)?;
        st.next_conn_id += 1;
        shared.gate.store(true, Ordering::Release);
        st.conn = Some(Conn {
            id: st.next_conn_id,
            stream: Some(stream),
            peer,
            ..Default::default()
        });
        (
            st.next_conn_id,
            st.hello_deadline.unwrap_or(HELLO_DEADLINE),
            st.write_deadline.unwrap_or(WRITE_DEADLINE),
        )
    };
    // Until its HELLO, a read that waits this long ends the connection.
    reader.set_read_timeout(Some(hello_deadline))?;
    writer.set_write_timeout(Some(write_deadline))?;
    log::info!(
        "mirror: QEMU connected (connection {id}, process {})",
        peer.map_or("?".into(), |p| p.to_string())
    );
    let sh = shared.clone();
    std::thread::Builder::new()
        .name("mirror-write".into())
        .spawn(move || write_loop(writer, sh, id))?;
    let sh = shared.clone();
    let hooks = hooks.clone();
    std::thread::Builder::new()
        .name("mirror-read".into())
        .spawn(move || read_until_closed(reader, &sh, id, hello_info, hooks.as_ref()))?;
    Ok(())
}

/// Why a connection from process `peer` is refused, if it is:
/// - only the front-end's QEMU (§6 rule 7): any other local process that
///   can reach the socket could otherwise complete strict invalidations
///   QEMU never saw, or decide a recovery;
/// - one QEMU at a time (§6): whoever else can reach the socket must not
///   knock the connected one off; its own reconnection comes after its old
///   connection closed. A peer that has just hung up (its reader may not
///   have seen the EOF yet) is no longer connected: its successor is
///   welcome.
fn refusal(st: &mut Link, gate: &AtomicBool, peer: Option<u32>) -> Option<String> {
    if let Some(front_end) = st.front_end.filter(|&f| peer != Some(f)) {
        return Some(format!("the front-end's QEMU is process {front_end}"));
    }
    if let Some(old) = st.conn.as_mut().filter(|c| !c.closed && peer_gone(c)) {
        close(old, gate);
    }
    st.conn
        .as_ref()
        .filter(|c| !c.closed)
        .map(|old| format!("QEMU (connection {}) is connected", old.id))
}

/// The daemon's HELLO (§4), first and alone: it carries the shared
/// memory's files. It is small, so on a fresh socket this never blocks.
fn send_hello(stream: &UnixStream, hello_info: Hello, memory: &MirrorMemory) -> io::Result<()> {
    let mut hello = Vec::with_capacity(HEADER_LEN + proto::DAEMON_HELLO_LEN);
    proto::encode_hello(
        hello_info.boot_bypass,
        hello_info.features(),
        memory.hello_shm(),
        hello_info.msi_window.unwrap_or_default(),
        &mut hello,
    );
    let fds = [
        memory.table.file().as_raw_fd(),
        memory.flags.file().as_raw_fd(),
    ];
    let sent = stream
        .send_with_fds(&[&hello[..]], &fds)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    if sent != hello.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short HELLO write",
        ));
    }
    Ok(())
}

/// The reader thread of connection `id`: its messages until it ends, then
/// what goes with it (its completion files, QEMU's VFIO devices).
fn read_until_closed(
    reader: UnixStream,
    shared: &Shared,
    id: u64,
    hello_info: Hello,
    hooks: &dyn MirrorHooks,
) {
    let inbound = Inbound {
        stream: reader,
        files: VecDeque::new(),
    };
    let outcome = read_loop(inbound, shared, id, hello_info, hooks);
    shared.completion.disarm();
    if hello_info.vfio_devices {
        hooks.vfio_devices_gone();
    }
    match outcome {
        Ok(()) => log::info!("mirror: QEMU closed the connection {id}"),
        // A peer that exits with data unread resets the connection: it went
        // away, nothing failed here (§12).
        Err(ReadError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset => {
            log::info!("mirror: QEMU reset the connection {id} (it exited)")
        }
        Err(e) => log::error!("mirror: connection {id}: {e}; closing it"),
    }
    if let Some(c) = shared.lock().conn.as_mut().filter(|c| c.id == id) {
        close(c, &shared.gate);
    }
    shared.changed.notify_all();
}

fn write_loop(mut stream: UnixStream, shared: Arc<Shared>, id: u64) {
    let mut buf = Vec::new();
    loop {
        {
            let mut st = shared.lock();
            loop {
                match st.conn.as_mut() {
                    Some(c) if c.id == id && !c.closed => {
                        if !c.out.is_empty() {
                            std::mem::swap(&mut buf, &mut c.out);
                            break;
                        }
                    }
                    _ => return,
                }
                st = shared.changed.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        }
        if let Err(e) = stream.write_all(&buf) {
            match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => log::error!(
                    "mirror: connection {id}: the peer has not read its socket in time: \
                     closing it"
                ),
                _ => log::error!("mirror: write to QEMU failed: {e}"),
            }
            if let Some(c) = shared.lock().conn.as_mut().filter(|c| c.id == id) {
                close(c, &shared.gate);
            }
            shared.changed.notify_all();
            return;
        }
        buf.clear();
    }
}

mod read;

use crate::listen::Access;

pub use read::ReadError;
use read::{read_loop, Inbound};

#[cfg(test)]
mod tests {
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
        let (server, _rec, path) = start("second", vec![]);
        let h = server.handle();
        let mut q = connect_synced(&path, &h);
        let mut intruder = FakeQemu::connect(&path);
        // Its HELLO may find the socket already shut by the refusal.
        let _ = intruder.try_hello();
        assert!(intruder.recv().is_none(), "refused without a HELLO");
        // The first one is still served.
        let t = h.publish(&[Record::GlobalBypass(false)]).unwrap();
        let (batch, _) = q.recv().unwrap();
        q.ack(batch.seq);
        assert_eq!(h.wait(t, Duration::from_secs(5)), WaitOutcome::Acked);
        // Once it has gone, the next QEMU gets in, even before the daemon
        // has read the close.
        drop(q);
        let _next = connect_synced(&path, &h);
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
        let (server, _rec, path) = start("no-reader", vec![]);
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
    }

    #[test]
    fn an_ack_for_an_unsent_batch_is_a_protocol_error() {
        let (server, _rec, path) = start("badack", vec![]);
        let h = server.handle();
        let mut q = connect_synced(&path, &h);
        q.ack(5);
        assert!(q.recv().is_none());
        assert!(!h.is_connected());
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
}
