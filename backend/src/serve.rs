// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The serve loop: one front-end at a time, a fresh device state for each,
//! until SIGINT or SIGTERM.
//!
//! QEMU's "Backend program conventions" (docs/interop/vhost-user.rst): the
//! daemon listens on `--socket-path` or on an inherited `--fd`, does not
//! daemonize, and a front-end that disconnects can come back (QEMU's
//! `reconnect-ms`). A signal ends the wait for a front-end at once and ends a
//! live connection by shutting its socket down.
//!
//! Nothing a connection needs outlives it (src/exit_event.rs), and a
//! connection that cannot be set up — out of open files, threads or memory
//! — is an error in the log and a closed socket for that front-end, never
//! the end of the daemon nor a handshake left hanging.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VhostUserDaemon, VringEpollHandler};
use vm_memory::GuestMemoryAtomic;

use crate::guest_ram::GuestMem;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::listen::{Access, SocketFile};
use crate::vhu_iommu::IommuBackend;

/// Where the vhost-user socket comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketSource {
    /// Bind and listen at this path (an existing socket file is replaced).
    Path(PathBuf),
    /// A listening socket inherited from the launcher.
    Fd(RawFd),
}

/// The first descriptor systemd passes (sd_listen_fds(3)).
const SD_LISTEN_FDS_START: RawFd = 3;

impl SocketSource {
    /// The socket systemd's socket activation passed this process, if any
    /// (sd_listen_fds(3)): `LISTEN_PID` is this process and `LISTEN_FDS`
    /// is 1. The variables are removed either way, as `sd_listen_fds`
    /// does with `unset_environment`.
    pub fn from_systemd() -> Result<Option<Self>, ServeError> {
        let pid = std::env::var("LISTEN_PID").ok();
        let fds = std::env::var("LISTEN_FDS").ok();
        for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            std::env::remove_var(v);
        }
        let (Some(pid), Some(fds)) = (pid, fds) else {
            return Ok(None);
        };
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return Ok(None);
        }
        match fds.parse::<u32>() {
            Ok(1) => Ok(Some(SocketSource::Fd(SD_LISTEN_FDS_START))),
            _ => Err(ServeError::ListenFds(fds)),
        }
    }
}

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {path}: {source}")]
    Listen { path: PathBuf, source: io::Error },
    #[error("--fd {fd} is not a listening Unix socket: {source}")]
    BadFd { fd: RawFd, source: io::Error },
    #[error("LISTEN_FDS={0}: socket activation must pass exactly one socket")]
    ListenFds(String),
    #[error("cannot set up signal handling: {0}")]
    Signals(io::Error),
    #[error("cannot set up the accept loop: {0}")]
    Poll(io::Error),
}

/// Open files one connection may need, checked for before it is taken:
/// its exit event, epoll set and socket (8), the front-end's memory files
/// (up to 8 regions, old and new table both open during a SET_MEM_TABLE),
/// the kick, call and error eventfds of both queues, the back-end request
/// socket, and room to spare. A vhost-user message whose descriptors the
/// kernel had to drop at the limit leaves vhost's reader waiting for bytes
/// that never come — a silent stall — so a connection is only taken with
/// room for all of it.
pub const CONNECTION_FILES: u64 = 64;

/// Why one front-end could not be served (the daemon goes on listening).
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error(
        "too many open files: {open} open under a limit of {limit} (RLIMIT_NOFILE), and a \
         connection may need {CONNECTION_FILES} more; raise the limit (ulimit -n)"
    )]
    NoRoom { open: u64, limit: u64 },
    #[error("cannot make the exit event of its vring worker: {0}")]
    ExitEvent(io::Error),
    #[error("{0}")]
    Setup(vhost_user_backend::Error),
    #[error("{0}")]
    Start(vhost_user_backend::Error),
}

impl ConnectionError {
    /// Whether the front-end's connection is still waiting to be accepted
    /// (the failure came before the accept).
    fn left_waiting(&self) -> bool {
        match self {
            Self::NoRoom { .. } | Self::ExitEvent(_) | Self::Setup(_) => true,
            Self::Start(e) => matches!(e, vhost_user_backend::Error::CreateBackendListener(_)),
        }
    }
}

/// The pause after a front-end could not be served, doubling with each
/// failure in a row up to [`MAX_RETRY_PAUSE`]: a limit that stays hit costs
/// a log line now and then, not a busy loop.
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(50);
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(2);

/// Asks the serve loop to stop: from a signal, or from a test.
#[derive(Clone)]
pub struct Stopper {
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    current: Arc<Mutex<Option<ShutdownHandle>>>,
}

impl std::fmt::Debug for Stopper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stopper")
            .field("stop", &self.stop)
            .finish_non_exhaustive()
    }
}

impl Stopper {
    fn new() -> io::Result<Self> {
        Ok(Self {
            stop: Arc::new(AtomicBool::new(false)),
            wake: Arc::new(EventFd::new(EFD_NONBLOCK)?),
            current: Arc::new(Mutex::new(None)),
        })
    }

    /// Stop serving: wake the accept wait, shut the live connection down.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.wake.write(1);
        if let Some(h) = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            h.shutdown();
        }
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// The vhost-user listener, bound once and kept across connections, so a
/// reconnecting front-end finds the same socket.
#[derive(Debug)]
pub struct Server {
    listener: UnixListener,
    /// The socket file it placed, if it was bound at a path.
    file: Option<SocketFile>,
    stopper: Stopper,
    /// One open file held in reserve: at the open-file limit it is given up
    /// for a moment to accept a waiting front-end and close its connection,
    /// so the front-end learns at once instead of waiting in the backlog.
    spare: Option<File>,
}

impl Server {
    /// Bind (or adopt) the listening socket.
    pub fn bind(source: &SocketSource) -> Result<Self, ServeError> {
        Self::bind_with(source, Access::default())
    }

    /// [`Self::bind`]; a socket bound at a path appears with `access`.
    pub fn bind_with(source: &SocketSource, access: Access) -> Result<Self, ServeError> {
        let (listener, file) = match source {
            SocketSource::Path(path) => {
                let (l, file) = crate::listen::listen_at(path, access).map_err(|source| {
                    ServeError::Listen {
                        path: path.clone(),
                        source,
                    }
                })?;
                (l, Some(file))
            }
            SocketSource::Fd(fd) => (adopt_listener(*fd)?, None),
        };
        Ok(Self {
            listener,
            file,
            stopper: Stopper::new().map_err(ServeError::Poll)?,
            spare: Some(File::open("/dev/null").map_err(ServeError::Poll)?),
        })
    }

    /// A handle that stops [`Server::run`].
    pub fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }

    /// Stop on SIGINT and SIGTERM.
    pub fn stop_on_signals(&self) -> Result<(), ServeError> {
        let mut signals = Signals::new([SIGINT, SIGTERM]).map_err(ServeError::Signals)?;
        let stopper = self.stopper();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    log::info!("signal {sig}: shutting down");
                    stopper.stop();
                }
            })
            .map_err(ServeError::Signals)?;
        Ok(())
    }

    /// Serve front-ends one after the other until stopped. A front-end that
    /// cannot be served is logged and its connection closed; only failing
    /// to listen at all is an error.
    pub fn run(mut self, backend: &IommuBackend) -> Result<(), ServeError> {
        let epoll = Epoll::new().map_err(ServeError::Poll)?;
        for (fd, token) in [
            (self.listener.as_raw_fd(), 0u64),
            (self.stopper.wake.as_raw_fd(), 1),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(ServeError::Poll)?;
        }
        // vhost's listener type, sharing our socket: its accept() is only
        // called once epoll says a connection is waiting.
        let fd = self.listener.try_clone().map_err(ServeError::Poll)?;
        let mut listener = Listener::from(fd);
        let mut events = [EpollEvent::default(); 2];
        let mut failures = 0u32;
        log::info!("listening on {}", self.describe());
        while !self.stopper.stopped() {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ServeError::Poll(e)),
            };
            if self.stopper.stopped() {
                break;
            }
            if !events[..n].iter().any(|e| e.data() == 0) {
                continue;
            }
            match self.serve_one(backend, &mut listener) {
                Ok(()) => failures = 0,
                Err(e) => {
                    log::error!(
                        "cannot serve a front-end: {e}; closing its connection, still listening"
                    );
                    if e.left_waiting() {
                        self.refuse_waiting_front_end();
                    }
                    failures = failures.saturating_add(1);
                    self.pause(retry_pause(failures));
                }
            }
        }
        log::info!("stopped");
        Ok(())
    }

    /// One front-end, from its exit events to the release of everything it
    /// held.
    fn serve_one(
        &self,
        backend: &IommuBackend,
        listener: &mut Listener,
    ) -> Result<(), ConnectionError> {
        let (open, limit) = open_files();
        if open.saturating_add(CONNECTION_FILES) > limit {
            return Err(ConnectionError::NoRoom { open, limit });
        }
        backend
            .exit_events()
            .prepare(backend.queues_per_thread().len())
            .map_err(ConnectionError::ExitEvent)?;
        let mut workers = Vec::new();
        let result = self.connection(backend, listener, &mut workers);
        // The daemon is gone, and with it the worker threads (its handler
        // joins them) unless something still holds their epoll handlers.
        if workers.iter().all(|w| w.strong_count() == 0) {
            let closed = backend.exit_events().reclaim();
            log::debug!("closed {closed} exit event(s) the connection left open");
        } else {
            log::warn!("a vring worker outlived its connection; its exit event stays open");
        }
        result
    }

    fn connection(
        &self,
        backend: &IommuBackend,
        listener: &mut Listener,
        workers: &mut Vec<Weak<VringEpollHandler<IommuBackend>>>,
    ) -> Result<(), ConnectionError> {
        backend.new_connection();
        let mem = GuestMemoryAtomic::new(GuestMem::new());
        let mut daemon = VhostUserDaemon::new("vhost-user-iommu".into(), backend.clone(), mem)
            .map_err(ConnectionError::Setup)?;
        workers.extend(daemon.get_epoll_handlers().iter().map(Arc::downgrade));
        daemon.start(listener).map_err(ConnectionError::Start)?;
        // Its process is the only one whose mirror connection is served
        // (docs/mirror-protocol.md §6 rule 7).
        let front_end =
            crate::peer::local_path(&self.listener).and_then(
                |path| match crate::peer::connected_to(&path)[..] {
                    [pid] => Some(pid),
                    _ => None,
                },
            );
        match front_end {
            Some(pid) => {
                log::info!("front-end connected (process {pid})");
                backend.front_end_process(Some(pid));
            }
            None => {
                log::warn!(
                    "front-end connected, but its process is unknown: any process may connect \
                     to the mirror socket"
                );
                backend.front_end_process_unknown();
            }
        }
        *self
            .stopper
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = daemon.shutdown_handle();
        if self.stopper.stopped() {
            daemon.request_shutdown();
        }
        let result = daemon.wait();
        *self
            .stopper
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
        for handler in daemon.get_epoll_handlers() {
            handler.send_exit_event();
        }
        if self.stopper.stopped() {
            backend.stopping();
        }
        backend.front_end_process(None);
        backend.disconnected();
        // The workers end with the daemon (its handler joins them); a queue
        // event one of them handled meanwhile may have cached the vrings
        // again, and with them the front-end's eventfds and memory.
        drop(daemon);
        backend.release_vrings();
        match result {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => log::info!("front-end disconnected"),
            // A front-end that misbehaves or vanishes ends its connection,
            // not the daemon.
            Err(e) => log::warn!("front-end connection ended: {e}"),
        }
        let (model, queues) = backend.stats();
        log::info!("stats: {model}; {queues:?}");
        Ok(())
    }

    /// Accept the front-end waiting in the backlog and close its connection
    /// at once, so its handshake fails instead of waiting for nothing. At
    /// the open-file limit the reserve file makes room for the accept.
    fn refuse_waiting_front_end(&mut self) {
        // Non-blocking for this one look: nobody may be waiting after all.
        if self.listener.set_nonblocking(true).is_err() {
            return;
        }
        let mut accepted = self.listener.accept();
        if matches!(&accepted, Err(e) if out_of_files(e)) {
            self.spare = None;
            accepted = self.listener.accept();
            self.spare = File::open("/dev/null").ok();
        }
        if let Err(e) = self.listener.set_nonblocking(false) {
            log::error!("cannot make the listening socket blocking again: {e}");
        }
        match accepted {
            Ok((stream, _)) => drop(stream),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => log::error!("cannot close the waiting front-end's connection: {e}"),
        }
    }

    /// Sleep for `d`, or less if the server is stopped meanwhile.
    fn pause(&self, d: Duration) {
        let step = Duration::from_millis(20);
        let mut left = d;
        while !left.is_zero() && !self.stopper.stopped() {
            let s = left.min(step);
            std::thread::sleep(s);
            left -= s;
        }
    }

    fn describe(&self) -> String {
        match &self.file {
            Some(f) => f.path().display().to_string(),
            None => format!("inherited fd {}", self.listener.as_raw_fd()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(f) = &self.file {
            f.remove();
        }
    }
}

/// The pause after the `failures`-th failure in a row.
fn retry_pause(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_RETRY_PAUSE
        .saturating_mul(1 << doublings)
        .min(MAX_RETRY_PAUSE)
}

/// This process's open files and its soft limit on them. When even the
/// count cannot be taken (no file left to read /proc with), all the room is
/// taken.
fn open_files() -> (u64, u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the limits into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return (0, u64::MAX);
    }
    let limit = limit.rlim_cur;
    match std::fs::read_dir("/proc/self/fd") {
        // Less the directory's own descriptor.
        Ok(dir) => ((dir.count() as u64).saturating_sub(1), limit),
        Err(e) if out_of_files(&e) => (limit, limit),
        // No /proc: nothing to go by, no check.
        Err(_) => (0, limit),
    }
}

/// EMFILE (this process) or ENFILE (the system) is out of open files.
fn out_of_files(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Take over an inherited listening socket (`--fd N`).
fn adopt_listener(fd: RawFd) -> Result<UnixListener, ServeError> {
    let bad = |source| ServeError::BadFd { fd, source };
    // Check before taking ownership: fstat on a number that is not an open
    // file fails with EBADF and closes nothing.
    let path = format!("/proc/self/fd/{fd}");
    std::fs::metadata(&path).map_err(bad)?;
    // SAFETY: the launcher passed us this descriptor to own (QEMU's backend
    // program conventions); it is open (checked above) and nothing else in
    // this process uses it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let listener = UnixListener::from(owned);
    // A listening Unix socket has a local address; anything else fails here.
    listener.local_addr().map_err(bad)?;
    Ok(listener)
}
