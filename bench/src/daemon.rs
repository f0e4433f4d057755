// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon under test, started and stopped by the bench.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The daemon's executable name (the `vhost-user-iommu` package's binary).
pub const DAEMON_BIN: &str = "vhost-user-iommu";
/// How long the daemon may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long it may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the daemon could not be started.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// No daemon executable where it was looked for.
    #[error(
        "no daemon at {0}: build it with `cargo build --release -p vhost-user-iommu` \
         (it is looked for next to this program), or pass --daemon PATH or --socket PATH"
    )]
    NotFound(PathBuf),
    /// This program's own path is unknown, so its neighbour is too.
    #[error("cannot find this program's directory ({0}); pass --daemon PATH")]
    NoExeDir(io::Error),
    /// The process could not be started.
    #[error("cannot start {path}: {source}")]
    Spawn {
        /// The executable.
        path: PathBuf,
        /// What exec said.
        source: io::Error,
    },
    /// It exited before listening.
    #[error("the daemon exited before listening ({0}); its stderr says why")]
    Exited(ExitStatus),
    /// It did not listen in time.
    #[error("the daemon did not create {0} within {START_TIMEOUT:?}")]
    NoSocket(PathBuf),
    /// Waiting for it failed.
    #[error("waiting for the daemon: {0}")]
    Wait(io::Error),
}

/// `explicit`, or the daemon next to this program's executable (where cargo
/// puts every binary of the workspace).
pub fn locate(explicit: Option<&Path>) -> Result<PathBuf, DaemonError> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => {
            let exe = std::env::current_exe().map_err(DaemonError::NoExeDir)?;
            exe.with_file_name(DAEMON_BIN)
        }
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(DaemonError::NotFound(path))
    }
}

/// A daemon process listening on a socket of its own (and on a mirror
/// socket, if asked); stopped (SIGTERM, then SIGKILL) and its sockets
/// removed when dropped.
#[derive(Debug)]
pub struct DaemonProcess {
    child: Child,
    socket: PathBuf,
    mirror: Option<PathBuf>,
}

impl DaemonProcess {
    /// Start `binary` on `socket` with the extra daemon flags `args`, and
    /// wait until it listens. With `mirror` it also gets
    /// `--mirror-socket mirror` (for a QEMU stand-in, docs/mirror-protocol.md)
    /// and is waited for there too; without a QEMU connected it publishes
    /// nothing and waits for no acknowledgement. Its stderr is this
    /// program's.
    pub fn spawn(
        binary: &Path,
        socket: &Path,
        mirror: Option<&Path>,
        args: &[String],
    ) -> Result<Self, DaemonError> {
        let _ = std::fs::remove_file(socket);
        let mut cmd = Command::new(binary);
        cmd.arg("--socket-path").arg(socket);
        if let Some(m) = mirror {
            let _ = std::fs::remove_file(m);
            cmd.arg("--mirror-socket").arg(m);
        }
        let child = cmd
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|source| DaemonError::Spawn {
                path: binary.to_path_buf(),
                source,
            })?;
        let mut daemon = DaemonProcess {
            child,
            socket: socket.to_path_buf(),
            mirror: mirror.map(Path::to_path_buf),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        for path in std::iter::once(socket).chain(mirror) {
            while !path.exists() {
                if let Some(status) = daemon.child.try_wait().map_err(DaemonError::Wait)? {
                    return Err(DaemonError::Exited(status));
                }
                if Instant::now() > deadline {
                    return Err(DaemonError::NoSocket(path.to_path_buf()));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Ok(daemon)
    }

    /// The mirror socket it listens on, if it was given one.
    pub fn mirror(&self) -> Option<&Path> {
        self.mirror.as_deref()
    }

    /// Its process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The socket it listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn terminate(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) takes plain integers; `pid` is our child, not
            // reaped yet (try_wait found it running), so it names no other
            // process.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
        let _ = std::fs::remove_file(&self.socket);
        if let Some(m) = &self.mirror {
            let _ = std::fs::remove_file(m);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_daemon_names_the_path_and_the_build_command() {
        let err = locate(Some(Path::new("/nonexistent/vhost-user-iommu"))).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/vhost-user-iommu"), "{msg}");
        assert!(
            msg.contains("cargo build --release -p vhost-user-iommu"),
            "{msg}"
        );
    }

    #[test]
    fn a_daemon_that_exits_at_once_is_reported() {
        let socket = std::env::temp_dir().join(format!("vui-bench-t-{}.sock", std::process::id()));
        let err = DaemonProcess::spawn(Path::new("/bin/false"), &socket, None, &[]).unwrap_err();
        assert!(
            matches!(err, DaemonError::Exited(s) if !s.success()),
            "{err}"
        );
    }
}
