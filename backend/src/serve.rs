//! The serve loop: one front-end at a time, a fresh device state for each,
//! until SIGINT or SIGTERM.
//!
//! QEMU's "Backend program conventions" (docs/interop/vhost-user.rst): the
//! daemon listens on `--socket-path` or on an inherited `--fd`, does not
//! daemonize, and a front-end that disconnects can come back (QEMU's
//! `reconnect-ms`). A signal ends the wait for a front-end at once and ends a
//! live connection by shutting its socket down.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::vhu_iommu::IommuBackend;

/// Where the vhost-user socket comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketSource {
    /// Bind and listen at this path (an existing socket file is replaced).
    Path(PathBuf),
    /// A listening socket inherited from the launcher.
    Fd(RawFd),
}

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {path}: {source}")]
    Listen { path: PathBuf, source: io::Error },
    #[error("--fd {fd} is not a listening Unix socket: {source}")]
    BadFd { fd: RawFd, source: io::Error },
    #[error("cannot set up signal handling: {0}")]
    Signals(io::Error),
    #[error("cannot set up the accept loop: {0}")]
    Poll(io::Error),
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
}

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
    path: Option<PathBuf>,
    stopper: Stopper,
}

impl Server {
    /// Bind (or adopt) the listening socket.
    pub fn bind(source: &SocketSource) -> Result<Self, ServeError> {
        let (listener, path) = match source {
            SocketSource::Path(path) => {
                remove_stale_socket(path);
                let l = UnixListener::bind(path).map_err(|source| ServeError::Listen {
                    path: path.clone(),
                    source,
                })?;
                (l, Some(path.clone()))
            }
            SocketSource::Fd(fd) => (adopt_listener(*fd)?, None),
        };
        Ok(Self {
            listener,
            path,
            stopper: Stopper::new().map_err(ServeError::Poll)?,
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

    /// Serve front-ends one after the other until stopped.
    pub fn run(self, backend: &IommuBackend) -> Result<(), ServeError> {
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
            self.serve_one(backend, &mut listener)?;
        }
        log::info!("stopped");
        Ok(())
    }

    fn serve_one(&self, backend: &IommuBackend, listener: &mut Listener) -> Result<(), ServeError> {
        backend.new_connection();
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new("vhost-user-iommu".into(), backend.clone(), mem)
            .map_err(|e| ServeError::Daemon(e.to_string()))?;
        daemon
            .start(listener)
            .map_err(|e| ServeError::Daemon(e.to_string()))?;
        log::info!("front-end connected");
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
        backend.disconnected();
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

    fn describe(&self) -> String {
        match &self.path {
            Some(p) => p.display().to_string(),
            None => format!("inherited fd {}", self.listener.as_raw_fd()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Replace a socket file left by an earlier run; leave anything else for
/// `bind` to fail on with a clear error.
fn remove_stale_socket(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
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
