// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon binary as a child process of a test, and the scratch
//! directory its files live in: one way, shared by every test that starts
//! `vhost-user-iommu`, to start it, wait until it listens, signal it, and
//! make sure it neither outlives its test nor leaves files behind.
//!
//! The rules followed here:
//!
//! - **A test leaves nothing in the temporary directory.** Its sockets,
//!   daemon logs and state files go in a [`Scratch`] directory of its own,
//!   removed when the test ends — except when the test fails: then the
//!   directory is kept, and its path printed, so that the daemon's logs can
//!   be read.
//! - **A daemon never outlives its test.** A [`DaemonProcess`] is killed
//!   (SIGKILL, or SIGTERM first if asked) and reaped when dropped, however
//!   the test ends.
//! - **A daemon is used only once it listens.** [`DaemonBuilder::spawn`]
//!   returns once every socket it was given exists, and fails with the
//!   daemon's log if it exits or does not listen within 10 s.
//!
//! ```no_run
//! use test_frontend::daemon::{DaemonProcess, Scratch};
//! use test_frontend::{Status, VmOptions};
//!
//! let dir = Scratch::new("example");
//! let daemon = DaemonProcess::builder("target/debug/vhost-user-iommu", dir.join("viommu.sock"))
//!     .args(["--endpoints", "8"])
//!     .log_file(dir.join("daemon.log"))
//!     .spawn()
//!     .owning(dir);
//! let mut vm = daemon.connect(VmOptions::default()).unwrap();
//! assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
//! ```

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::{Result, TestVm, VmOptions};

/// SIGKILL, for [`DaemonProcess::signal`] and [`DaemonProcess::end`] in
/// crates that do not use libc themselves.
pub const SIGKILL: i32 = libc::SIGKILL;
/// SIGTERM, for [`DaemonProcess::signal`] and [`DaemonProcess::end`] in
/// crates that do not use libc themselves.
pub const SIGTERM: i32 = libc::SIGTERM;

/// How long a daemon may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a daemon stopped with SIGTERM on drop may take before SIGKILL.
const TERMINATE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the waits below look again.
const POLL: Duration = Duration::from_millis(5);

/// Scratch directories made by this process so far: the `<n>` of their
/// names, so that tests running in parallel never share one.
static NEXT_SCRATCH: AtomicU32 = AtomicU32::new(0);

/// A directory of one test's files (sockets, logs, state files) under
/// [`std::env::temp_dir`], named `vui-<name>-<pid>-<n>`: unique per process
/// (the pid) and per test within it (`n`, a process-wide counter).
///
/// Removed with everything in it when dropped — unless the thread is
/// panicking (a failing test) or [`Scratch::keep`] was called: then it is
/// kept and its path printed on stderr, for the daemon logs in it.
///
/// AF_UNIX socket paths must stay under 108 bytes: keep `name` short, and
/// the file names joined to it too.
#[derive(Debug)]
pub struct Scratch {
    path: PathBuf,
    keep: bool,
}

impl Scratch {
    /// A fresh, empty directory for the test `name` (a stale one of the
    /// same name, left by a process whose pid this one reuses, is removed
    /// first). Panics if it cannot be made.
    pub fn new(name: &str) -> Self {
        let n = NEXT_SCRATCH.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("vui-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| {
            panic!("cannot make the scratch directory {}: {e}", path.display())
        });
        Self { path, keep: false }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `file` in the directory.
    pub fn join(&self, file: impl AsRef<Path>) -> PathBuf {
        self.path.join(file)
    }

    /// Keep the directory when dropped, as for a failing test (e.g. a fuzz
    /// run that found something keeps its daemon's logs).
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.keep || std::thread::panicking() {
            eprintln!(
                "kept {} for a look at what failed (daemon logs, sockets, state files)",
                self.path.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// How to start a [`DaemonProcess`]: the binary, its socket(s), its flags,
/// its log level and where its log goes. Made by
/// [`DaemonProcess::builder`]; reusable (e.g. to start the same daemon
/// again after it died).
#[derive(Clone, Debug)]
pub struct DaemonBuilder {
    bin: PathBuf,
    socket: PathBuf,
    mirror: Option<PathBuf>,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    rust_log: String,
    log: Option<PathBuf>,
    terminate_on_drop: bool,
}

impl DaemonBuilder {
    /// Also give it `--mirror-socket path` (docs/mirror-protocol.md), and
    /// wait for that socket too.
    pub fn mirror(mut self, path: impl AsRef<Path>) -> Self {
        self.mirror = Some(path.as_ref().to_owned());
        self
    }

    /// One more command-line argument, after `--socket-path` and
    /// `--mirror-socket`.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// More command-line arguments, after `--socket-path` and
    /// `--mirror-socket`.
    pub fn args<I>(mut self, args: I) -> Self
    where
        I: IntoIterator,
        I::Item: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// One more environment variable for the daemon (e.g.
    /// `RUST_BACKTRACE`).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Its `RUST_LOG` (`warn` unless set).
    pub fn rust_log(mut self, level: &str) -> Self {
        self.rust_log = level.to_owned();
        self
    }

    /// Send its stderr (and stdout) to `path`, created afresh, which
    /// [`DaemonProcess::log_text`] then reads; without one they are this
    /// process's.
    pub fn log_file(mut self, path: impl AsRef<Path>) -> Self {
        self.log = Some(path.as_ref().to_owned());
        self
    }

    /// When dropped while running, stop it as a service manager would:
    /// SIGTERM, up to 2 s to exit, then SIGKILL. Without this (the default)
    /// it is killed with SIGKILL at once.
    pub fn terminate_on_drop(mut self, on: bool) -> Self {
        self.terminate_on_drop = on;
        self
    }

    /// Start the daemon and wait until it listens on its socket(s): stale
    /// socket files are removed first, stdin is null. `Err` (with its log)
    /// if it cannot be started, exits, or does not listen within 10 s; it
    /// is killed then.
    pub fn try_spawn(&self) -> std::result::Result<DaemonProcess, String> {
        for s in std::iter::once(&self.socket).chain(&self.mirror) {
            let _ = std::fs::remove_file(s);
        }
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--socket-path").arg(&self.socket);
        if let Some(m) = &self.mirror {
            cmd.arg("--mirror-socket").arg(m);
        }
        cmd.args(&self.args)
            .env("RUST_LOG", &self.rust_log)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        if let Some(log) = &self.log {
            let file = File::create(log)
                .map_err(|e| format!("cannot create the daemon log {}: {e}", log.display()))?;
            let out = file
                .try_clone()
                .map_err(|e| format!("cannot share the daemon log: {e}"))?;
            cmd.stdout(out).stderr(file);
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.bin.display()))?;
        let mut daemon = DaemonProcess {
            child,
            socket: self.socket.clone(),
            mirror: self.mirror.clone(),
            log: self.log.clone(),
            terminate_on_drop: self.terminate_on_drop,
            scratch: None,
        };
        daemon.wait_listening()?;
        Ok(daemon)
    }

    /// [`Self::try_spawn`], panicking with its error.
    pub fn spawn(&self) -> DaemonProcess {
        self.try_spawn().unwrap_or_else(|e| panic!("{e}"))
    }
}

/// The daemon binary running as a child process, listening on its socket
/// (and mirror socket). Killed and reaped when dropped if still running
/// (see [`DaemonBuilder::terminate_on_drop`]); with a [`Scratch`] handed to
/// it ([`Self::owning`]), that directory goes only after the daemon has.
#[derive(Debug)]
pub struct DaemonProcess {
    child: Child,
    socket: PathBuf,
    mirror: Option<PathBuf>,
    log: Option<PathBuf>,
    terminate_on_drop: bool,
    /// Dropped after `child` is reaped (fields drop after `Drop::drop`).
    scratch: Option<Scratch>,
}

impl DaemonProcess {
    /// How to start `bin` (tests pass
    /// `env!("CARGO_BIN_EXE_vhost-user-iommu")`) listening on `socket`.
    pub fn builder(bin: impl AsRef<Path>, socket: impl AsRef<Path>) -> DaemonBuilder {
        DaemonBuilder {
            bin: bin.as_ref().to_owned(),
            socket: socket.as_ref().to_owned(),
            mirror: None,
            args: Vec::new(),
            envs: Vec::new(),
            rust_log: "warn".to_owned(),
            log: None,
            terminate_on_drop: false,
        }
    }

    /// Hand it the scratch directory its files are in, for a test with one
    /// daemon: the directory is removed (or kept, on a panic) after the
    /// daemon is dead, the order its files need.
    pub fn owning(mut self, scratch: Scratch) -> Self {
        self.scratch = Some(scratch);
        self
    }

    /// The scratch directory handed to it, if any.
    pub fn scratch(&self) -> Option<&Scratch> {
        self.scratch.as_ref()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The vhost-user socket it listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The mirror socket it listens on, if it was given one.
    pub fn mirror(&self) -> Option<&Path> {
        self.mirror.as_deref()
    }

    /// Its log file, if it has one.
    pub fn log_path(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// A front-end session on its socket ([`TestVm::connect`]).
    pub fn connect(&self, opts: VmOptions) -> Result<TestVm> {
        TestVm::connect(&self.socket, opts)
    }

    /// Its log so far (empty without a log file, or before it wrote any).
    pub fn log_text(&self) -> String {
        self.log
            .as_ref()
            .and_then(|l| std::fs::read_to_string(l).ok())
            .unwrap_or_default()
    }

    /// Its log once it holds `needle`, or as it is after `limit` (the
    /// daemon logs on its own time, after it answered).
    pub fn wait_log(&self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let text = self.log_text();
            if text.contains(needle) || Instant::now() > deadline {
                return text;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Panics, with its log, if it has exited (e.g. killed by SIGBUS).
    pub fn assert_alive(&mut self) {
        if let Some(status) = self.try_wait() {
            panic!("the daemon died ({status}); {}", self.log_for_message());
        }
    }

    /// Its exit status if it has exited (reaping it), `None` while it runs.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("waitpid on the daemon")
    }

    /// Wait for it to exit, however long that takes.
    pub fn wait(&mut self) -> ExitStatus {
        self.child.wait().expect("waitpid on the daemon")
    }

    /// Send it signal `sig` (e.g. [`SIGTERM`]); panics if kill(2) fails.
    /// Nothing is sent once it has been reaped: its pid may then name
    /// another process.
    pub fn signal(&mut self, sig: i32) {
        if let Err(e) = self.send(sig) {
            panic!("kill({}, {sig}): {e}", self.child.id());
        }
    }

    /// kill(2) with `sig` unless it has been reaped already.
    fn send(&mut self, sig: i32) -> std::io::Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = libc::pid_t::try_from(self.child.id()).map_err(std::io::Error::other)?;
        // SAFETY: kill(2) takes plain integers and touches no memory of
        // ours; `pid` is our child, not reaped yet (try_wait just found it
        // running or a zombie), so it names no other process.
        if unsafe { libc::kill(pid, sig) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Send it `sig` and wait for it to exit: its exit status.
    pub fn end(mut self, sig: i32) -> ExitStatus {
        self.signal(sig);
        self.wait()
    }

    /// Wait up to `limit` for it to exit (panicking after that): its exit
    /// status and how long it took.
    pub fn wait_exit(&mut self, limit: Duration) -> (ExitStatus, Duration) {
        let start = Instant::now();
        loop {
            if let Some(s) = self.try_wait() {
                return (s, start.elapsed());
            }
            assert!(
                start.elapsed() < limit,
                "the daemon did not exit in {limit:?}"
            );
            std::thread::sleep(POLL);
        }
    }

    /// Its log for a failure message.
    fn log_for_message(&self) -> String {
        match &self.log {
            Some(l) => format!("its log ({}):\n{}", l.display(), self.log_text()),
            None => "its log went to this test's stderr".to_owned(),
        }
    }

    /// Wait until every socket it was given exists.
    fn wait_listening(&mut self) -> std::result::Result<(), String> {
        let start = Instant::now();
        let sockets: Vec<PathBuf> = std::iter::once(&self.socket)
            .chain(&self.mirror)
            .cloned()
            .collect();
        let on = sockets
            .iter()
            .map(|s| s.display().to_string())
            .collect::<Vec<_>>()
            .join(" and ");
        while !sockets.iter().all(|s| s.exists()) {
            let exited = self
                .child
                .try_wait()
                .map_err(|e| format!("waitpid on the daemon: {e}"))?;
            if let Some(status) = exited {
                return Err(format!(
                    "the daemon exited ({status}) before it listened on {on}; {}",
                    self.log_for_message()
                ));
            }
            if start.elapsed() > START_TIMEOUT {
                return Err(format!(
                    "the daemon did not listen on {on} within {START_TIMEOUT:?}; {}",
                    self.log_for_message()
                ));
            }
            std::thread::sleep(POLL);
        }
        Ok(())
    }

    /// SIGTERM, and up to [`TERMINATE_TIMEOUT`] for it to exit; never
    /// panics (it runs in `drop`, maybe while unwinding).
    fn terminate(&mut self) {
        if self.send(SIGTERM).is_err() {
            return;
        }
        let deadline = Instant::now() + TERMINATE_TIMEOUT;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if self.terminate_on_drop {
                self.terminate();
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scratch_directory_is_made_fresh_and_removed_with_its_files() {
        let dir = Scratch::new("unit-removed");
        let path = dir.path().to_owned();
        assert!(path.is_dir());
        assert!(path
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with(&format!("vui-unit-removed-{}-", std::process::id())));
        std::fs::create_dir(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/daemon.log"), "a log").unwrap();
        drop(dir);
        assert!(!path.exists(), "{} outlived its Scratch", path.display());
    }

    #[test]
    fn scratch_directories_of_one_name_never_collide() {
        let dirs: Vec<Scratch> = (0..8).map(|_| Scratch::new("unit-unique")).collect();
        let mut paths: Vec<&Path> = dirs.iter().map(Scratch::path).collect();
        paths.sort();
        paths.dedup();
        assert_eq!(paths.len(), dirs.len());
        // Short enough for a socket in it (AF_UNIX: under 108 bytes).
        let socket = dirs[0].join("viommu-mirror.sock");
        assert!(socket.as_os_str().len() < 108, "{}", socket.display());
    }

    #[test]
    fn a_scratch_directory_is_kept_while_its_thread_panics() {
        let (tx, rx) = std::sync::mpsc::channel();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let dir = Scratch::new("unit-kept");
            std::fs::write(dir.join("daemon.log"), "why it failed").unwrap();
            tx.send(dir.path().to_owned()).unwrap();
            panic!("a failing test (expected by this one)");
        }));
        assert!(caught.is_err());
        let path = rx.recv().unwrap();
        let log = std::fs::read_to_string(path.join("daemon.log"));
        std::fs::remove_dir_all(&path).unwrap();
        assert_eq!(log.unwrap(), "why it failed", "kept with its files");
    }

    #[test]
    fn a_kept_scratch_directory_stays() {
        let mut dir = Scratch::new("unit-keep");
        dir.keep();
        let path = dir.path().to_owned();
        drop(dir);
        assert!(path.is_dir());
        std::fs::remove_dir_all(&path).unwrap();
    }

    #[test]
    fn a_daemon_that_exits_before_listening_is_reported_with_its_log() {
        let dir = Scratch::new("unit-exits");
        let err = DaemonProcess::builder("/bin/sh", dir.join("viommu.sock"))
            .log_file(dir.join("daemon.log"))
            .try_spawn()
            .unwrap_err();
        assert!(err.contains("exited"), "{err}");
        assert!(err.contains("before it listened on"), "{err}");
        assert!(err.contains("its log ("), "{err}");
    }

    #[test]
    fn a_binary_that_is_not_there_is_named() {
        let err = DaemonProcess::builder("/nonexistent/vhost-user-iommu", "/nonexistent/s.sock")
            .try_spawn()
            .unwrap_err();
        assert!(err.contains("/nonexistent/vhost-user-iommu"), "{err}");
    }
}
