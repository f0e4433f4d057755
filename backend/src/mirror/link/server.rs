// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The listening socket: who is served (§6 rule 7), the daemon's HELLO (§4)
//! and a connection's reader and writer threads.

use super::*;

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
    /// The socket file, removed as the server stops if it is still there.
    file: crate::listen::SocketFile,
    /// The listening socket, to wake the accept at the stop.
    waker: UnixListener,
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
        let (listener, file) = crate::listen::listen_at(path, access)?;
        let handle = MirrorHandle {
            shared: Arc::default(),
            memory: Some(memory.clone()),
        };
        let shared = handle.shared.clone();
        let waker = listener.try_clone()?;
        let listener_thread = std::thread::Builder::new()
            .name("mirror-accept".into())
            .spawn(move || accept_loop(listener, shared, hello, hooks, memory))?;
        Ok(Self {
            handle,
            file,
            waker,
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
        // Wake the blocking accept(), even if the socket's path is gone.
        crate::listen::wake_accept(&self.waker);
        if let Some(t) = self.listener_thread.take() {
            let _ = t.join();
        }
        self.file.remove();
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
            drop(st);
            log::warn!(
                "mirror: refusing a connection from process {}: {why}",
                peer.map_or("?".into(), |p| p.to_string())
            );
            let _ = stream.shutdown(std::net::Shutdown::Both);
            hooks.peer(PeerEvent::Refused { pid: peer, why });
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
    hooks.peer(PeerEvent::Connected {
        connection: id,
        pid: peer,
    });
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
fn refusal(st: &mut Link, gate: &AtomicBool, peer: Option<u32>) -> Option<Refusal> {
    if let Some(front_end) = st.front_end.filter(|&f| peer != Some(f)) {
        return Some(Refusal::NotFrontEnd(front_end));
    }
    close_if_hung_up(st, gate);
    st.conn
        .as_ref()
        .filter(|c| !c.closed)
        .map(|old| Refusal::Busy(old.id))
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
    // Closed already, and not because QEMU had hung up: the daemon's doing
    // (a deadline, a stop).
    let dropped = {
        let st = shared.lock();
        let open = matches!(&st.conn, Some(c) if c.id == id && !c.closed);
        !open && st.hung_up != Some(id)
    };
    let how = match outcome {
        _ if dropped => Ended::Dropped,
        Ok(()) => Ended::Closed,
        Err(ReadError::Io(ref e)) if e.kind() == io::ErrorKind::ConnectionReset => Ended::Reset,
        Err(_) => Ended::Error,
    };
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
    hooks.peer(PeerEvent::Gone {
        connection: id,
        how,
    });
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
