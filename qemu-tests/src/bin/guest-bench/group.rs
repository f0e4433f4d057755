// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! n guests of one configuration booted at once, each with its own
//! directory, disk and (behind ours) daemon process, their fio jobs run in
//! step through the go/ready sync, and each job's measurement window.

use std::io::Write as _;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use qemu_tests::{disk_image, scratch, Arch, Guest, Run, Running, Sockets, Viommu};
use test_frontend::daemon::DaemonProcess;

use crate::daemon::{daemon_report, DaemonReport};
use crate::fio::{check_run, guest_script, jobs, Sample};
use crate::guestlog::{tail, LogTail, END};
use crate::options::{viommu_name, Mode};
use crate::procstat::{
    busy_fraction, find_qemu, host_cpu, process_switches, process_ticks, ticks_per_second, CpuTime,
    Ticks,
};

/// The disk: sparse, so the host's reads cost no device I/O and the
/// guest-side DMA path (the vIOMMU) is what differs between columns.
const DISK_MIB: u64 = 1024;
/// How often the host looks at the guests' logs while they run.
const POLL: Duration = Duration::from_millis(5);
/// The longest AF_UNIX socket path (`sun_path` with its NUL).
const SUN_PATH_MAX: usize = 107;

/// Everything fixed for a whole run.
#[derive(Debug)]
pub struct Ctx {
    pub seconds: u64,
    /// The guests' architecture (and machine).
    pub arch: Arch,
    pub initrd: PathBuf,
    /// The daemon binary and its arguments (when ours is booted).
    pub daemon: Option<(PathBuf, Vec<String>)>,
    /// More QEMU arguments for the guests of ours (`VUI_QEMU_ARGS`), e.g.
    /// `-global vhost-user-iommu-device.kick-wait=off`.
    pub ours_qemu_args: Vec<String>,
}

impl Ctx {
    /// A guest's timeout (run-guest.sh kills it after that): n guests share
    /// the host's cores, so they boot more slowly.
    fn guest_timeout(&self, n: usize) -> Duration {
        Duration::from_secs(60 + 120 * n as u64 + 6 * self.seconds * jobs().len() as u64)
    }
}

/// One guest of a group, while it runs.
#[derive(Debug)]
struct Vm {
    /// Guest `number` (1-based) of its group.
    number: usize,
    /// Declared before `daemon`: the guest goes before its daemon.
    running: Running,
    daemon: Option<DaemonProcess>,
    log: PathBuf,
    go_socket: PathBuf,
    tail: LogTail,
    qemu_pid: u32,
    /// The connection to its ttyS1, made at the first go and kept.
    go: Option<UnixStream>,
    started: Instant,
    /// When its QEMU exited, and with what status.
    ended: Option<(i32, Duration)>,
}

impl Vm {
    /// The CPU ticks of its QEMU and its daemon so far.
    fn cpu_ticks(&self) -> Result<Ticks, String> {
        let daemon = self.daemon.as_ref().map(DaemonProcess::pid);
        Ok(Ticks {
            qemu: process_ticks(self.qemu_pid)?,
            daemon: daemon.map_or(Ok(0), process_ticks)?,
            switches: process_switches(self.qemu_pid)? + daemon.map_or(Ok(0), process_switches)?,
        })
    }

    /// Write the go line to its ttyS1.
    fn go(&mut self) -> Result<(), String> {
        if self.go.is_none() {
            let s = UnixStream::connect(&self.go_socket)
                .map_err(|e| format!("cannot connect to {}: {e}", self.go_socket.display()))?;
            self.go = Some(s);
        }
        if let Some(s) = &mut self.go {
            s.write_all(b"go\n")
                .map_err(|e| format!("cannot write to {}: {e}", self.go_socket.display()))?;
        }
        Ok(())
    }

    /// `why`, with the end of the guest's output.
    fn failure(&self, why: &str) -> String {
        let out = std::fs::read_to_string(&self.log).unwrap_or_default();
        format!(
            "guest {}: {why}\n--- last output of guest {} ({}):\n{}",
            self.number,
            self.number,
            self.log.display(),
            tail(&out, 40)
        )
    }

    /// Its exit status, reaping it, if QEMU (run-guest.sh) has exited.
    fn exited(&mut self) -> Result<Option<i32>, String> {
        let status = self
            .running
            .child
            .try_wait()
            .map_err(|e| format!("waitpid on guest {}: {e}", self.number))?;
        Ok(status.map(|s| s.code().unwrap_or(-1)))
    }
}

/// One job's measurement window in a group: from the go to each guest's
/// next READY.
#[derive(Clone, Debug, PartialEq)]
pub struct Window {
    pub job: &'static str,
    /// Per guest: host CPU time of its QEMU (and daemon).
    pub cpu: Vec<CpuTime>,
    /// Per guest: the window's length in seconds.
    pub seconds: Vec<f64>,
    /// The whole host's busy fraction from the go to the last READY.
    pub host_busy: f64,
}

/// One guest's results in a group.
#[derive(Debug)]
pub struct GuestRun {
    pub took: Duration,
    /// (job, result), in the order the guest ran them.
    pub results: Vec<(String, Sample)>,
    /// Its daemon's counters (ours only).
    pub daemon: Option<DaemonReport>,
}

impl GuestRun {
    /// Its fio result for `job`.
    pub fn sample(&self, job: &str) -> Option<Sample> {
        self.results
            .iter()
            .find_map(|(j, s)| (j == job).then_some(*s))
    }
}

/// n guests of one configuration, booted together.
#[derive(Debug)]
pub struct Group {
    pub round: u32,
    /// `None` for the guests without a vIOMMU (they serve both modes).
    pub mode: Option<Mode>,
    pub viommu: Viommu,
    pub took: Duration,
    pub guests: Vec<GuestRun>,
    pub windows: Vec<Window>,
}

impl Group {
    /// How error messages name a group.
    fn what(round: u32, mode: Option<Mode>, viommu: Viommu, n: usize) -> String {
        format!(
            "round {round} {} {} x{n}",
            mode.map_or("any", Mode::name),
            viommu_name(viommu)
        )
    }
}

/// The daemon's `--msi-window`: its machine's (x86's is its default).
fn msi_window_args(arch: Arch) -> Vec<String> {
    match arch {
        Arch::X86_64 => Vec::new(),
        Arch::Arm64 => {
            let (start, last) = arch.msi_window();
            vec!["--msi-window".into(), format!("{start:#x}-{last:#x}")]
        }
    }
}

/// Prepare guest `number`'s directory, disk and daemon; its boot command.
fn prepare(
    ctx: &Ctx,
    number: usize,
    n: usize,
    mode: Option<Mode>,
    viommu: Viommu,
) -> Result<(PathBuf, Option<DaemonProcess>, Command), String> {
    let dir = scratch(&format!("gb-{}-{number}", viommu_name(viommu)));
    let disk = disk_image(&dir, DISK_MIB);
    let go = dir.join("go.sock");
    let mirror = dir.join("viommu-mirror.sock");
    for s in [&go, &mirror] {
        if s.as_os_str().len() > SUN_PATH_MAX {
            return Err(format!(
                "socket path too long for AF_UNIX ({}): check out the repository at a shorter path",
                s.display()
            ));
        }
    }
    let daemon = match (viommu, &ctx.daemon) {
        (Viommu::Ours, Some((bin, args))) => Some(
            DaemonProcess::builder(bin, dir.join("viommu.sock"))
                .mirror(&mirror)
                .args(msi_window_args(ctx.arch))
                .args(args)
                .rust_log("info")
                .log_file(dir.join("daemon.log"))
                .try_spawn()
                .map_err(|e| format!("guest {number}'s daemon: {e}"))?,
        ),
        (Viommu::Ours, None) => return Err("ours without a daemon binary".into()),
        _ => None,
    };
    let mut guest = Guest::new(viommu, guest_script(ctx.arch).0);
    guest.arch = ctx.arch;
    guest.disk = Some(disk);
    guest.initrd = Some(ctx.initrd.clone());
    guest.qemu_args = vec![
        "-smp".into(),
        "1".into(),
        "-serial".into(),
        format!("unix:{},server=on,wait=off", go.display()),
    ];
    if viommu == Viommu::Ours {
        guest.qemu_args.extend(ctx.ours_qemu_args.iter().cloned());
    }
    guest.append = format!(
        "{} vui.secs={} vui.sync=1",
        mode.map_or("", Mode::cmdline),
        ctx.seconds
    );
    guest.timeout = ctx.guest_timeout(n);
    let cmd = guest.command_with(daemon.as_ref().map(|d| Sockets {
        socket: d.socket(),
        mirror: &mirror,
        reconnect: false,
    }));
    Ok((dir, daemon, cmd))
}

/// Boot n guests at once: their daemons first, then every QEMU.
fn start_group(ctx: &Ctx, n: usize, mode: Option<Mode>, viommu: Viommu) -> Result<Vec<Vm>, String> {
    let mut prepared = Vec::new();
    for number in 1..=n {
        prepared.push(prepare(ctx, number, n, mode, viommu)?);
    }
    let started = Instant::now();
    let mut vms = Vec::new();
    for (i, (dir, daemon, cmd)) in prepared.into_iter().enumerate() {
        let log = dir.join("guest.log");
        let running = Running::start(cmd, &log);
        let tail = LogTail::open(&log)?;
        vms.push(Vm {
            number: i + 1,
            running,
            daemon,
            log,
            go_socket: dir.join("go.sock"),
            tail,
            qemu_pid: 0,
            go: None,
            started,
            ended: None,
        });
    }
    for vm in &mut vms {
        vm.qemu_pid = wait_for_qemu(vm)?;
    }
    Ok(vms)
}

/// The pid of a guest's QEMU, once run-guest.sh has started it.
fn wait_for_qemu(vm: &mut Vm) -> Result<u32, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(pid) = find_qemu(vm.running.child.id()) {
            return Ok(pid);
        }
        if let Some(status) = vm.exited()? {
            return Err(vm.failure(&format!("run-guest.sh exited {status} before QEMU ran")));
        }
        if Instant::now() > deadline {
            return Err(vm.failure("no QEMU process in its process group after 30 s"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait until every guest printed `VUI-READY job=<job>`; per guest, its
/// CPU ticks and the time when the host saw that line.
fn wait_ready(
    vms: &mut [Vm],
    job: &str,
    deadline: Instant,
) -> Result<Vec<(Ticks, Instant)>, String> {
    let mut seen: Vec<Option<(Ticks, Instant)>> = vec![None; vms.len()];
    loop {
        for (vm, seen) in vms.iter_mut().zip(seen.iter_mut()) {
            if seen.is_some() {
                continue;
            }
            // Whether it ended is asked before its log is read, so that
            // nothing it printed before the end is missed.
            let exited = vm.exited()?;
            vm.tail.poll()?;
            if let Some(line) = &vm.tail.failed {
                return Err(vm.failure(&format!("it failed: {line}")));
            }
            if vm.tail.is_ready(job) {
                *seen = Some((vm.cpu_ticks().map_err(|e| vm.failure(&e))?, Instant::now()));
            } else if let Some(status) = exited {
                return Err(
                    vm.failure(&format!("it exited {status} before it was ready for {job}"))
                );
            }
        }
        if seen.iter().all(Option::is_some) {
            return Ok(seen.into_iter().flatten().collect());
        }
        if Instant::now() > deadline {
            let late: Vec<String> = vms
                .iter()
                .zip(&seen)
                .filter(|(_, s)| s.is_none())
                .map(|(vm, _)| vm.number.to_string())
                .collect();
            let first = vms.iter().zip(&seen).find(|(_, s)| s.is_none());
            let why = format!("guest(s) {} not ready for {job} in time", late.join(", "));
            return Err(first.map_or(why.clone(), |(vm, _)| vm.failure(&why)));
        }
        std::thread::sleep(POLL);
    }
}

/// Run the guests' jobs in step: a go to all at once for each job, and
/// each job's measurement window.
fn run_jobs(vms: &mut [Vm], deadline: Instant, ticks_per_s: f64) -> Result<Vec<Window>, String> {
    wait_ready(vms, jobs()[0], deadline)?;
    let mut windows = Vec::new();
    for (k, &job) in jobs().iter().enumerate() {
        let next = jobs().get(k + 1).copied().unwrap_or(END);
        let start: Vec<Ticks> = vms
            .iter()
            .map(|vm| vm.cpu_ticks().map_err(|e| vm.failure(&e)))
            .collect::<Result<_, _>>()?;
        let host_start = host_cpu()?;
        let t0 = Instant::now();
        for vm in vms.iter_mut() {
            vm.go().map_err(|e| vm.failure(&e))?;
        }
        let ends = wait_ready(vms, next, deadline)?;
        let host_end = host_cpu()?;
        windows.push(Window {
            job,
            cpu: start
                .iter()
                .zip(&ends)
                .map(|(&a, &(b, _))| CpuTime::between(a, b, ticks_per_s))
                .collect(),
            seconds: ends
                .iter()
                .map(|(_, t)| t.duration_since(t0).as_secs_f64())
                .collect(),
            host_busy: busy_fraction(host_start, host_end),
        });
    }
    // Past "end": let them finish.
    for vm in vms.iter_mut() {
        vm.go().map_err(|e| vm.failure(&e))?;
    }
    Ok(windows)
}

/// Wait until every guest's QEMU has exited.
fn wait_ended(vms: &mut [Vm], deadline: Instant) -> Result<(), String> {
    loop {
        let mut all = true;
        for vm in vms.iter_mut() {
            if vm.ended.is_none() {
                match vm.exited()? {
                    Some(status) => vm.ended = Some((status, vm.started.elapsed())),
                    None => all = false,
                }
            }
        }
        if all {
            return Ok(());
        }
        if Instant::now() > deadline {
            let vm = vms.iter().find(|vm| vm.ended.is_none());
            let why = "it did not end in time after its last job";
            return Err(vm.map_or(why.to_string(), |vm| vm.failure(why)));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Boot n guests of one configuration together and run their jobs in step.
pub fn run_group(
    ctx: &Ctx,
    round: u32,
    n: usize,
    mode: Option<Mode>,
    viommu: Viommu,
) -> Result<Group, String> {
    let what = Group::what(round, mode, viommu, n);
    let start = Instant::now();
    let deadline = start + ctx.guest_timeout(n) + Duration::from_secs(30);
    let mut vms = start_group(ctx, n, mode, viommu).map_err(|e| format!("{what}: {e}"))?;
    let windows =
        run_jobs(&mut vms, deadline, ticks_per_second()).map_err(|e| format!("{what}: {e}"))?;
    wait_ended(&mut vms, deadline).map_err(|e| format!("{what}: {e}"))?;
    let mut guests = Vec::new();
    for vm in &vms {
        let (status, took) = vm.ended.unwrap_or((-1, start.elapsed()));
        let run = Run {
            status,
            output: std::fs::read_to_string(&vm.log).unwrap_or_default(),
            took,
        };
        let results =
            check_run(&run, mode, viommu).map_err(|e| format!("{what}: {}", vm.failure(&e)))?;
        guests.push(GuestRun {
            took,
            results,
            daemon: vm.daemon.as_ref().map(daemon_report),
        });
    }
    Ok(Group {
        round,
        mode,
        viommu,
        took: start.elapsed(),
        guests,
        windows,
    })
}
