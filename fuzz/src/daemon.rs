// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon process the socket targets talk to: started with its log in
//! a file, checked for life, restarted if it died (after the death was
//! counted). Its files go when the run was clean and stay when it was not.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use test_frontend::daemon::{DaemonBuilder, DaemonProcess, Scratch, SIGKILL};
use test_frontend::{Status, VmOptions};

use crate::Verdict;

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

/// A daemon process, its sockets and logs in a scratch directory of its
/// own; killed when dropped. The directory goes with it after a clean run;
/// after one that found something ([`Daemon::keep_logs`]) it is kept, with
/// the log of every death, and its path printed.
/// How often, in inputs, a daemon target checks that well-behaved peers
/// are still served.
pub const SERVE_EVERY: u64 = 8;

#[derive(Debug)]
pub struct Daemon {
    /// How it was started, to start it again after a death.
    start: DaemonBuilder,
    process: DaemonProcess,
    pub socket: PathBuf,
    pub mirror: Option<PathBuf>,
    /// Its `--control-socket`, if it has one.
    pub control: Option<PathBuf>,
    pub log: PathBuf,
    /// Deaths seen (each followed by a restart).
    pub deaths: u64,
    /// Last: fields drop in order, so the daemon is dead before its
    /// directory goes.
    dir: Scratch,
}

impl Daemon {
    pub fn start(bin: &Path, name: &str, mirror: bool, args: &[&str]) -> Result<Self, String> {
        Self::start_with(bin, name, mirror, false, args)
    }

    /// [`Self::start`], with a `--control-socket` in its directory if
    /// `control`.
    pub fn start_with(
        bin: &Path,
        name: &str,
        mirror: bool,
        control: bool,
        args: &[&str],
    ) -> Result<Self, String> {
        let mut dir = Scratch::new(&format!("fuzz-{name}"));
        let socket = dir.join("viommu.sock");
        let mirror = mirror.then(|| dir.join("viommu.mirror"));
        let control = control.then(|| dir.join("control.sock"));
        let log = dir.join("daemon.log");
        let mut start = DaemonProcess::builder(bin, &socket)
            .args(["--endpoints", "8,9", "--poll-us", "0"])
            .args(args)
            .rust_log("warn")
            .env("RUST_BACKTRACE", "1")
            .log_file(&log);
        if let Some(m) = &mirror {
            start = start.mirror(m);
        }
        if let Some(c) = &control {
            start = start.arg("--control-socket").arg(c);
        }
        let process = match start.try_spawn() {
            Ok(p) => p,
            Err(e) => {
                dir.keep();
                return Err(e);
            }
        };
        Ok(Self {
            start,
            process,
            socket,
            mirror,
            control,
            log,
            deaths: 0,
            dir,
        })
    }

    /// `Err` with the log's tail if the daemon has exited.
    pub fn alive(&mut self) -> Result<(), String> {
        match self.process.try_wait() {
            None => Ok(()),
            Some(status) => Err(format!(
                "the daemon died ({status}); log:\n{}",
                self.log_tail()
            )),
        }
    }

    /// The last lines of the daemon's log.
    pub fn log_tail(&self) -> String {
        let text = self.process.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Whether the log shows a panic.
    pub fn log_has_panic(&self) -> bool {
        self.process.log_text().contains("panicked")
    }

    /// A well-behaved front-end is served: handshake, ATTACH, MAP, UNMAP,
    /// DETACH.
    pub fn serves(&mut self) -> Result<(), String> {
        self.alive()?;
        let opts = VmOptions {
            timeout: Duration::from_secs(5),
            ..VmOptions::default()
        };
        let mut vm = self
            .process
            .connect(opts)
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

    /// The daemon still runs and its log shows no panic: a "panic" finding
    /// otherwise.
    pub fn unharmed(&mut self) -> Verdict {
        self.living()?;
        if self.log_has_panic() {
            return Err(format!("panic: in the daemon's log:\n{}", self.log_tail()));
        }
        Ok(())
    }

    /// The verdict on a well-behaved peer's session `served`: a "panic" if
    /// the daemon died meanwhile, a "hang" if it lives but did not serve.
    pub fn judge(&mut self, served: Result<(), String>) -> Verdict {
        served.map_err(|e| match self.alive() {
            Err(dead) => format!("panic: {dead}"),
            Ok(()) => format!("hang: {e}; log:\n{}", self.log_tail()),
        })
    }

    /// The daemon still runs: a "panic" finding otherwise.
    pub fn living(&mut self) -> Verdict {
        self.alive().map_err(|e| format!("panic: {e}"))
    }

    /// Restart the daemon if it died (a target going on after a finding).
    pub fn recover(&mut self) {
        if self.alive().is_err() {
            let _ = self.restart();
        }
    }

    /// Start again after a death; the dead one's log is kept beside as
    /// `daemon.death<n>.log`.
    pub fn restart(&mut self) -> Result<(), String> {
        self.process.signal(SIGKILL);
        self.process.wait();
        self.deaths += 1;
        let old = self.process.log_text();
        let keep = self.log.with_extension(format!("death{}.log", self.deaths));
        let _ = std::fs::write(keep, old);
        self.process = self.start.try_spawn()?;
        Ok(())
    }

    /// Keep the scratch directory (logs, the logs of deaths) when dropped,
    /// and say where: the run found something.
    pub fn keep_logs(&mut self) {
        self.dir.keep();
    }
}
