//! The daemon process the socket targets talk to: started with its log in
//! a file, checked for life, restarted if it died (after the death was
//! counted).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use test_frontend::{Status, TestVm, VmOptions};

const DAEMON_BIN: &str = "vhost-user-iommu";

/// `explicit`, or the daemon next to this executable (cargo puts every
/// binary of the workspace in one directory; tests run from `deps/`
/// below it).
pub fn locate(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(format!("no daemon at {}", p.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut dir = exe.parent();
    while let Some(d) = dir {
        let cand = d.join(DAEMON_BIN);
        if cand.is_file() {
            return Ok(cand);
        }
        if d.file_name().is_some_and(|n| n == "target") {
            break;
        }
        dir = d.parent();
    }
    Err(format!(
        "no {DAEMON_BIN} next to {}; build it first (cargo build [--release] -p vhost-user-iommu) or pass --daemon PATH",
        exe.display()
    ))
}

/// Connect to `path`, retrying for a few seconds while it refuses (a
/// socket file can exist a moment before its listener does).
pub fn connect(path: &Path) -> Result<std::os::unix::net::UnixStream, String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => {
                return Err(format!("hang: cannot connect: {e}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// A daemon process; killed when dropped.
#[derive(Debug)]
pub struct Daemon {
    bin: PathBuf,
    args: Vec<String>,
    child: Child,
    pub socket: PathBuf,
    pub mirror: Option<PathBuf>,
    pub log: PathBuf,
    /// Deaths seen (each followed by a restart).
    pub deaths: u64,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Daemon {
    pub fn start(bin: &Path, name: &str, mirror: bool, args: &[&str]) -> Result<Self, String> {
        let base = std::env::temp_dir().join(format!(
            "vui-fuzz-{}-{name}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let socket = base.with_extension("sock");
        let mirror = mirror.then(|| base.with_extension("mirror"));
        let log = base.with_extension("log");
        let child = Self::spawn(bin, &socket, mirror.as_deref(), &log, args)?;
        let d = Self {
            bin: bin.to_path_buf(),
            args: args.iter().map(|s| s.to_string()).collect(),
            child,
            socket,
            mirror,
            log,
            deaths: 0,
        };
        d.wait_listening()?;
        Ok(d)
    }

    fn spawn(
        bin: &Path,
        socket: &Path,
        mirror: Option<&Path>,
        log: &Path,
        args: &[impl AsRef<std::ffi::OsStr>],
    ) -> Result<Child, String> {
        let _ = std::fs::remove_file(socket);
        let mut cmd = Command::new(bin);
        cmd.arg("--socket-path").arg(socket);
        if let Some(m) = mirror {
            let _ = std::fs::remove_file(m);
            cmd.arg("--mirror-socket").arg(m);
        }
        cmd.args(["--endpoints", "8,9", "--poll-us", "0"])
            .args(args)
            .env("RUST_LOG", "warn")
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(log).map_err(|e| e.to_string())?);
        cmd.spawn()
            .map_err(|e| format!("starting {}: {e}", bin.display()))
    }

    fn wait_listening(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(self.socket.exists() && self.mirror.as_ref().is_none_or(|m| m.exists())) {
            if Instant::now() > deadline {
                return Err(format!(
                    "the daemon did not listen; log:\n{}",
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// `Err` with the log's tail if the daemon has exited.
    pub fn alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!(
                "the daemon died ({status}); log:\n{}",
                self.log_tail()
            )),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The last lines of the daemon's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Whether the log shows a panic.
    pub fn log_has_panic(&self) -> bool {
        std::fs::read_to_string(&self.log).is_ok_and(|t| t.contains("panicked"))
    }

    /// A well-behaved front-end is served: handshake, ATTACH, MAP, UNMAP,
    /// DETACH.
    pub fn serves(&mut self) -> Result<(), String> {
        self.alive()?;
        let opts = VmOptions {
            timeout: Duration::from_secs(5),
            ..VmOptions::default()
        };
        let mut vm = TestVm::connect(&self.socket, opts)
            .map_err(|e| format!("a well-behaved front-end could not connect: {e}"))?;
        let steps = [
            vm.attach(1, 8, 0),
            vm.map(1, 0x10_0000, 0x10_0fff, 0x1000, 3),
            vm.unmap(1, 0x10_0000, 0x10_0fff),
            vm.detach(1, 8),
        ];
        drop(vm);
        for (i, s) in steps.into_iter().enumerate() {
            match s {
                Ok(Status::Ok) => {}
                other => return Err(format!("well-behaved request {i}: {other:?}")),
            }
        }
        self.alive()
    }

    /// Start again after a death.
    pub fn restart(&mut self) -> Result<(), String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.deaths += 1;
        let old = std::fs::read_to_string(&self.log).unwrap_or_default();
        let keep = self.log.with_extension(format!("death{}.log", self.deaths));
        let _ = std::fs::write(keep, old);
        self.child = Self::spawn(
            &self.bin,
            &self.socket,
            self.mirror.as_deref(),
            &self.log,
            &self.args,
        )?;
        self.wait_listening()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
        if let Some(m) = &self.mirror {
            let _ = std::fs::remove_file(m);
        }
    }
}
