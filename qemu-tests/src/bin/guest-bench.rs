//! The guest benchmark: the same guest booted three ways — behind our
//! vhost-user-iommu daemon, behind QEMU's in-process virtio-iommu-pci,
//! and with no vIOMMU — running fio on a virtio-blk disk behind the vIOMMU
//! (`iommu_platform=on`), in strict and lazy invalidation mode, with one or
//! more guests of a configuration running at once.
//!
//! `cargo run --release -p qemu-tests --bin guest-bench -- [--guests 1,2] [--rounds N] [--quick]`
//!
//! For every round, guest count n of `--guests` and configuration, n guests
//! boot at the same moment, each with its own scratch directory, its own
//! sparse disk and, behind ours, its own daemon: a process of its own, as an
//! operator runs one per VM (`target/release/vhost-user-iommu`, built from
//! the working tree at the start, with `--poll-us` of `VUI_POLL_US` and the
//! arguments of `VUI_DAEMON_ARGS`). Each guest runs every fio job of
//! `qemu-tests/guest/fio.sh` once, and the jobs of the n guests start
//! together: with `vui.sync=1` a guest prints `VUI-READY job=NAME` before
//! each job (and `job=end` after the last) and waits for a line on its
//! second serial port (ttyS1, the Unix socket `go.sock` in its directory);
//! the host writes that line to every guest once all of them are ready.
//!
//! From a guest's go to its next READY the host reads the CPU time of the
//! guest's QEMU process (and its daemon's) from `/proc/PID/stat`: summed
//! over the guests and divided by their fio I/O count, it is the host CPU
//! per I/O; the whole host's busy fraction over the job (`/proc/stat`) shows
//! whether anything else competed. The tables show per mode, job and guest
//! count the guests' aggregate IOPS and the CPU per I/O, averaged over the
//! rounds. The guests without a vIOMMU boot once per round and guest count:
//! invalidation mode means nothing to them, so their figures stand in both
//! modes' rows.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use qemu_tests::{
    disk_image, initramfs_with, kernel_dir, poll_us, qemu, repo, scratch, Guest, Run, Running,
    Sockets, Viommu,
};
use test_frontend::daemon::DaemonProcess;

const USAGE: &str = "\
usage: guest-bench [--seconds S] [--rounds N] [--quick] [--guests LIST]
                   [--viommu LIST] [--json FILE] [--help]

Boots TCG guests (Debian 6.12, 1 vCPU, 1 GiB each) behind our
vhost-user-iommu daemon, behind QEMU's virtio-iommu-pci and with no vIOMMU,
and runs fio in them on a virtio-blk disk (iommu_platform=on, O_DIRECT):
  rand4k-qd1   4 KiB random reads, psync (QD1)
  rand4k-qd32  4 KiB random reads, libaio iodepth=32
  seq128k-qd1  128 KiB sequential reads, psync (QD1)
in strict (iommu.strict=1) and lazy (iommu.strict=0) mode. For each guest
count n of --guests, n guests of a configuration boot at once (each with its
own disk and, for ours, its own daemon process) and start each fio job at
the same moment. Prints per mode, job and n the guests' aggregate IOPS and
the host CPU time per I/O (their QEMU processes, plus their daemons for
ours), with the ratios ours/QEMU.

  --seconds S   seconds per fio job (default 5)
  --rounds N    boot every configuration N times, round-robin, and average
                (default 1)
  --quick       1 s per job, strict mode only (a smoke run: about 1 min)
  --guests LIST guest counts to run at once, comma-separated, each 1..=8
                (default 1; e.g. 1,2,3)
  --viommu LIST boot only these, comma-separated: ours, qemu, none
                (default all three; to compare two builds of ours, run
                each build's guest-bench with --viommu ours, alternately)
  --json FILE   also write the figures, per round and averaged, to FILE

Environment: VUI_DAEMON_BIN=PATH runs that daemon binary instead of building
the working tree's; VUI_POLL_US=N sets the daemons' --poll-us; VUI_DAEMON_ARGS
adds arguments to every daemon (whitespace-separated; a --poll-us there
wins), to compare daemon options.

Needs the patched QEMU (scripts/qemu/build-qemu.sh) and the guest kernel
(scripts/guest/fetch-kernel.sh); fio comes from Debian's package
(scripts/guest/fetch-fio.sh, run by the initramfs build); the daemon is
built (cargo build --release -p vhost-user-iommu) at the start when ours
is booted. Exits non-zero if a guest fails or reports a disk domain other
than the mode asks for.";

const JOBS: [&str; 3] = ["rand4k-qd1", "rand4k-qd32", "seq128k-qd1"];
/// The name of the guests' last synchronisation point, after their last job.
const END: &str = "end";
const VIOMMUS: [Viommu; 3] = [Viommu::Ours, Viommu::Qemu, Viommu::None];
/// The disk: sparse, so the host's reads cost no device I/O and the
/// guest-side DMA path (the vIOMMU) is what differs between columns.
const DISK_MIB: u64 = 1024;
/// The most guests booted at once (1 GiB of RAM each).
const MAX_GUESTS: usize = 8;
/// How often the host looks at the guests' logs while they run.
const POLL: Duration = Duration::from_millis(5);
/// The line a guest prints before each job (`fio.sh`, `vui.sync=1`).
const READY: &str = "VUI-READY job=";
/// How long a daemon may take to log its counters once its QEMU is gone.
const DAEMON_STATS_WAIT: Duration = Duration::from_secs(5);
/// The longest AF_UNIX socket path (`sun_path` with its NUL).
const SUN_PATH_MAX: usize = 107;

/// The command line.
#[derive(Debug)]
struct Options {
    seconds: u64,
    rounds: u32,
    modes: Vec<Mode>,
    viommus: Vec<Viommu>,
    /// Guest counts, ascending, each once.
    guests: Vec<usize>,
    json: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Strict,
    Lazy,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Strict => "strict",
            Mode::Lazy => "lazy",
        }
    }

    fn cmdline(self) -> &'static str {
        match self {
            Mode::Strict => "iommu.strict=1",
            Mode::Lazy => "iommu.strict=0",
        }
    }

    /// The disk's IOMMU domain type the guest must report in this mode.
    fn domain(self, viommu: Viommu) -> &'static str {
        match (viommu, self) {
            (Viommu::None, _) => "none",
            (_, Mode::Strict) => "DMA",
            (_, Mode::Lazy) => "DMA-FQ",
        }
    }
}

fn viommu_name(v: Viommu) -> &'static str {
    match v {
        Viommu::Ours => "ours",
        Viommu::Qemu => "qemu",
        Viommu::Intel => "intel",
        Viommu::None => "none",
    }
}

fn viommu_by_name(name: &str) -> Option<Viommu> {
    VIOMMUS.into_iter().find(|&v| viommu_name(v) == name)
}

/// `--guests LIST`: comma-separated guest counts, each 1..=[`MAX_GUESTS`];
/// ascending, each once.
fn parse_guests(list: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for item in list.split(',') {
        let n = item
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_GUESTS).contains(n))
            .ok_or_else(|| {
                format!("--guests {list}: {item:?} is not a guest count 1..={MAX_GUESTS}")
            })?;
        out.push(n);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn parse(args: &[String]) -> Result<Option<Options>, String> {
    let (mut seconds, mut rounds, mut quick, mut json) = (None, 1, false, None);
    let mut viommus = VIOMMUS.to_vec();
    let mut guests = vec![1];
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |what: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{a} needs {what}"))
        };
        match a.as_str() {
            "--help" | "-h" => return Ok(None),
            "--seconds" => {
                let v = value("a number of seconds")?;
                seconds = Some(
                    v.parse::<u64>()
                        .ok()
                        .filter(|s| (1..=600).contains(s))
                        .ok_or_else(|| format!("--seconds {v}: want 1..=600"))?,
                );
            }
            "--rounds" => {
                let v = value("a number")?;
                rounds = v
                    .parse::<u32>()
                    .ok()
                    .filter(|r| (1..=100).contains(r))
                    .ok_or_else(|| format!("--rounds {v}: want 1..=100"))?;
            }
            "--quick" => quick = true,
            "--guests" => guests = parse_guests(&value("a list of guest counts")?)?,
            "--viommu" => {
                let v = value("a list of ours, qemu, none")?;
                let mut chosen = Vec::new();
                for name in v.split(',') {
                    let viommu = viommu_by_name(name).ok_or_else(|| {
                        format!("--viommu {v}: {name:?} is not ours, qemu or none")
                    })?;
                    if !chosen.contains(&viommu) {
                        chosen.push(viommu);
                    }
                }
                // Booted in the table's order, whatever the order asked.
                viommus = VIOMMUS.into_iter().filter(|v| chosen.contains(v)).collect();
            }
            "--json" => json = Some(PathBuf::from(value("a file")?)),
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    Ok(Some(Options {
        seconds: seconds.unwrap_or(if quick { 1 } else { 5 }),
        rounds,
        modes: if quick {
            vec![Mode::Strict]
        } else {
            vec![Mode::Strict, Mode::Lazy]
        },
        viommus,
        guests,
        json,
    }))
}

/// One fio job's result in one guest.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Sample {
    iops: f64,
    kibps: f64,
    lat_us: f64,
    /// I/Os completed.
    ios: f64,
}

impl Sample {
    fn mb_s(&self) -> f64 {
        self.kibps * 1024.0 / 1e6
    }

    /// The mean; NaN for no samples (a configuration not booted).
    fn mean(samples: &[Sample]) -> Sample {
        let n = samples.len() as f64;
        let sum = |f: fn(&Sample) -> f64| samples.iter().map(f).sum::<f64>() / n;
        Sample {
            iops: sum(|s| s.iops),
            kibps: sum(|s| s.kibps),
            lat_us: sum(|s| s.lat_us),
            ios: sum(|s| s.ios),
        }
    }
}

/// `VUI-FIO job=NAME iops=N kibps=N lat_us=N ios=N` lines.
fn parse_fio(run: &Run) -> Result<Vec<(String, Sample)>, String> {
    let mut out = Vec::new();
    for line in run.lines("VUI-FIO ") {
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
                .ok_or_else(|| format!("no {key} in {line:?}"))
        };
        let num = |key: &str| -> Result<f64, String> {
            let v = field(key)?;
            v.parse().map_err(|_| format!("{key}={v} is not a number"))
        };
        out.push((
            field("job")?.to_string(),
            Sample {
                iops: num("iops")?,
                kibps: num("kibps")?,
                lat_us: num("lat_us")?,
                ios: num("ios")?,
            },
        ));
    }
    Ok(out)
}

// ---- /proc ------------------------------------------------------------

/// What the benchmark reads of a `/proc/PID/stat` line.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ProcStat {
    /// The command name (field 2, without its parentheses).
    comm: String,
    /// The process group (field 5).
    pgrp: u32,
    /// User plus system CPU time in clock ticks (fields 14 and 15).
    ticks: u64,
}

/// Parse a `/proc/PID/stat` line. The command name may hold spaces and
/// parentheses, so the fields after it are counted from the last `)`.
fn parse_proc_stat(line: &str) -> Result<ProcStat, String> {
    let bad = |why: String| format!("bad /proc/PID/stat line ({why}): {line:?}");
    let open = line.find('(').ok_or_else(|| bad("no '('".into()))?;
    let close = line
        .rfind(')')
        .filter(|&c| c > open)
        .ok_or_else(|| bad("no ')' after the '('".into()))?;
    // Field 3 (the state) is the first word after the command name.
    let rest: Vec<&str> = line[close + 1..].split_whitespace().collect();
    let field = |n: usize| -> Result<u64, String> {
        let w = rest
            .get(n - 3)
            .ok_or_else(|| bad(format!("no field {n}")))?;
        w.parse()
            .map_err(|_| bad(format!("field {n} is {w:?}, not a number")))
    };
    let pgrp = u32::try_from(field(5)?).map_err(|_| bad("process group out of range".into()))?;
    Ok(ProcStat {
        comm: line[open + 1..close].to_string(),
        pgrp,
        ticks: field(14)?.saturating_add(field(15)?),
    })
}

/// The CPU ticks (user + system) process `pid` has used so far.
fn process_ticks(pid: u32) -> Result<u64, String> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    Ok(parse_proc_stat(&text)?.ticks)
}

/// Clock ticks per second, the unit of `/proc` CPU times.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf(3) only reads a system constant; it takes no pointer.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Among `(pid, /proc/PID/stat line)`s, the QEMU process of process group
/// `pgrp` (its command name starts with "qemu").
fn qemu_among<'a>(pgrp: u32, stats: impl IntoIterator<Item = (u32, &'a str)>) -> Option<u32> {
    stats
        .into_iter()
        .find(|(_, line)| {
            parse_proc_stat(line).is_ok_and(|s| s.pgrp == pgrp && s.comm.starts_with("qemu"))
        })
        .map(|(pid, _)| pid)
}

/// The QEMU process of process group `pgrp`, if it runs now.
fn find_qemu(pgrp: u32) -> Option<u32> {
    let mut stats = Vec::new();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(text) = std::fs::read_to_string(e.path().join("stat")) {
            stats.push((pid, text));
        }
    }
    qemu_among(pgrp, stats.iter().map(|(p, t)| (*p, t.as_str())))
}

/// The whole host's CPU time, in clock ticks, from `/proc/stat`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct HostCpu {
    /// Not idle and not waiting for I/O.
    busy: u64,
    total: u64,
}

/// The `cpu` line of `/proc/stat`: user nice system idle iowait irq softirq
/// steal (guest and guest_nice are part of user and nice already).
fn parse_host_cpu(text: &str) -> Result<HostCpu, String> {
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or("no \"cpu \" line in /proc/stat")?;
    let values = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|w| w.parse::<u64>())
        .collect::<Result<Vec<u64>, _>>()
        .map_err(|_| format!("bad /proc/stat line: {line:?}"))?;
    if values.len() < 4 {
        return Err(format!("short /proc/stat line: {line:?}"));
    }
    let total: u64 = values.iter().sum();
    let idle = values[3] + values.get(4).copied().unwrap_or(0);
    Ok(HostCpu {
        busy: total.saturating_sub(idle),
        total,
    })
}

/// The whole host's CPU time now.
fn host_cpu() -> Result<HostCpu, String> {
    let text = std::fs::read_to_string("/proc/stat")
        .map_err(|e| format!("cannot read /proc/stat: {e}"))?;
    parse_host_cpu(&text)
}

/// The host's busy fraction between two readings; NaN if no time passed.
fn busy_fraction(from: HostCpu, to: HostCpu) -> f64 {
    ratio(
        to.busy.saturating_sub(from.busy) as f64,
        to.total.saturating_sub(from.total) as f64,
    )
}

/// The host's 1-minute load average: other work on the host's two cores
/// shows in every figure, so the run reports it.
fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

// ---- the daemon ---------------------------------------------------------

/// The daemon's arguments after its sockets: `--poll-us poll_us` unless
/// `extra` (`VUI_DAEMON_ARGS`, whitespace-separated) sets it, then `extra`.
fn daemon_args(extra: Option<&str>, poll_us: u64) -> Vec<String> {
    let extra: Vec<String> = extra
        .unwrap_or("")
        .split_whitespace()
        .map(String::from)
        .collect();
    let sets_poll = extra
        .iter()
        .any(|a| a == "--poll-us" || a.starts_with("--poll-us="));
    let mut args = Vec::new();
    if !sets_poll {
        args.extend(["--poll-us".to_string(), poll_us.to_string()]);
    }
    args.extend(extra);
    args
}

/// The path of the binary `name` in cargo's `--message-format=json` output.
fn cargo_executable(json_lines: &str, name: &str) -> Option<PathBuf> {
    const KEY: &str = "\"executable\":\"";
    json_lines
        .lines()
        .filter(|l| l.contains("\"reason\":\"compiler-artifact\""))
        .filter_map(|l| {
            let rest = &l[l.find(KEY)? + KEY.len()..];
            let path = &rest[..rest.find('"')?];
            // A path JSON had to escape is not worth decoding here.
            (!path.contains('\\')).then(|| PathBuf::from(path))
        })
        .find(|p| p.file_name().is_some_and(|f| f == name))
}

/// Build the daemon from the working tree (`cargo build --release -p
/// vhost-user-iommu`), so that no stale binary is measured; its path.
fn build_daemon() -> Result<PathBuf, String> {
    let out = Command::new(env!("CARGO"))
        .current_dir(repo())
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "vhost-user-iommu",
            "--bin",
            "vhost-user-iommu",
            "--message-format=json-render-diagnostics",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo build --release -p vhost-user-iommu failed ({}): see above",
            out.status
        ));
    }
    cargo_executable(&String::from_utf8_lossy(&out.stdout), "vhost-user-iommu")
        .ok_or_else(|| "cargo built no vhost-user-iommu binary (or did not say where)".into())
}

/// What a daemon said when its QEMU went: its counters line.
#[derive(Clone, Debug, PartialEq, Eq)]
struct DaemonReport {
    /// `stats: ...; QueueStats { ... }`, or why there is none.
    stats: String,
    /// Successful MAPs and UNMAPs, from `stats`.
    map_unmap: Option<(u64, u64)>,
}

/// The last `stats: ` line of a daemon's log, from `stats: ` on.
fn stats_line(log: &str) -> Option<&str> {
    log.lines()
        .rev()
        .find_map(|l| l.find("stats: ").map(|i| l[i..].trim_end()))
}

/// The successful MAP and UNMAP counts of a daemon's `stats: ` line
/// (`... map 12/0 unmap 11/0 ...`, ok/failed).
fn map_unmap(stats: &str) -> Option<(u64, u64)> {
    let words: Vec<&str> = stats.split_whitespace().collect();
    let ok = |name: &str| -> Option<u64> {
        let i = words.iter().position(|w| *w == name)?;
        words.get(i + 1)?.split('/').next()?.parse().ok()
    };
    Some((ok("map")?, ok("unmap")?))
}

/// The counters `daemon` logged when its QEMU went (waiting a little for
/// them: it logs on its own time).
fn daemon_report(daemon: &DaemonProcess) -> DaemonReport {
    let log = daemon.wait_log("stats: ", DAEMON_STATS_WAIT);
    match stats_line(&log) {
        Some(line) => DaemonReport {
            stats: line.to_string(),
            map_unmap: map_unmap(line),
        },
        None => DaemonReport {
            stats: format!("(no stats line in its log within {DAEMON_STATS_WAIT:?})"),
            map_unmap: None,
        },
    }
}

// ---- guests running together ----------------------------------------------

/// What the host notices in a guest's output while it runs.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Mark {
    /// `VUI-READY job=NAME`: waiting for the go of job NAME (or [`END`]).
    Ready(String),
    /// A `VUI-FAIL` line.
    Fail(String),
}

/// What `line` of a guest's output tells the host, if anything.
fn mark(line: &str) -> Option<Mark> {
    let line = line.trim_end();
    if let Some(i) = line.find(READY) {
        let job = line[i + READY.len()..].split_whitespace().next()?;
        return Some(Mark::Ready(job.to_string()));
    }
    line.find("VUI-FAIL")
        .map(|i| Mark::Fail(line[i..].to_string()))
}

/// A guest's log file, read as it grows.
#[derive(Debug)]
struct LogTail {
    file: File,
    /// The start of a line not yet complete.
    partial: Vec<u8>,
    /// The jobs the guest said it is ready for, in order.
    ready: Vec<String>,
    /// Its first failure line.
    failed: Option<String>,
}

impl LogTail {
    fn open(path: &Path) -> Result<Self, String> {
        let file = File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Ok(Self {
            file,
            partial: Vec::new(),
            ready: Vec::new(),
            failed: None,
        })
    }

    /// Read what was appended since the last call.
    fn poll(&mut self) -> Result<(), String> {
        let mut new = Vec::new();
        self.file
            .read_to_end(&mut new)
            .map_err(|e| format!("cannot read a guest log: {e}"))?;
        self.partial.extend_from_slice(&new);
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            match mark(&String::from_utf8_lossy(&line)) {
                Some(Mark::Ready(job)) => self.ready.push(job),
                Some(Mark::Fail(l)) => {
                    self.failed.get_or_insert(l);
                }
                None => {}
            }
        }
        Ok(())
    }

    fn is_ready(&self, job: &str) -> bool {
        self.ready.iter().any(|j| j == job)
    }
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Everything fixed for a whole run.
#[derive(Debug)]
struct Ctx {
    seconds: u64,
    initrd: PathBuf,
    /// The daemon binary and its arguments (when ours is booted).
    daemon: Option<(PathBuf, Vec<String>)>,
}

impl Ctx {
    /// A guest's timeout (run-guest.sh kills it after that): n guests share
    /// the host's cores, so they boot more slowly.
    fn guest_timeout(&self, n: usize) -> Duration {
        Duration::from_secs(60 + 120 * n as u64 + 6 * self.seconds * JOBS.len() as u64)
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
        Ok(Ticks {
            qemu: process_ticks(self.qemu_pid)?,
            daemon: match &self.daemon {
                Some(d) => process_ticks(d.pid())?,
                None => 0,
            },
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

/// A guest's CPU time so far, in clock ticks: its QEMU's and its daemon's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Ticks {
    qemu: u64,
    daemon: u64,
}

/// A guest's host CPU time over a window, in seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct CpuTime {
    qemu: f64,
    /// Its daemon's (ours only; 0 otherwise).
    daemon: f64,
}

impl CpuTime {
    /// The CPU time between two readings, at `ticks_per_s` clock ticks per
    /// second.
    fn between(from: Ticks, to: Ticks, ticks_per_s: f64) -> CpuTime {
        CpuTime {
            qemu: to.qemu.saturating_sub(from.qemu) as f64 / ticks_per_s,
            daemon: to.daemon.saturating_sub(from.daemon) as f64 / ticks_per_s,
        }
    }

    fn total(&self) -> f64 {
        self.qemu + self.daemon
    }
}

/// One job's measurement window in a group: from the go to each guest's
/// next READY.
#[derive(Clone, Debug, PartialEq)]
struct Window {
    job: &'static str,
    /// Per guest: host CPU time of its QEMU (and daemon).
    cpu: Vec<CpuTime>,
    /// Per guest: the window's length in seconds.
    seconds: Vec<f64>,
    /// The whole host's busy fraction from the go to the last READY.
    host_busy: f64,
}

/// One guest's results in a group.
#[derive(Debug)]
struct GuestRun {
    took: Duration,
    /// (job, result), in the order the guest ran them.
    results: Vec<(String, Sample)>,
    /// Its daemon's counters (ours only).
    daemon: Option<DaemonReport>,
}

impl GuestRun {
    /// Its fio result for `job`.
    fn sample(&self, job: &str) -> Option<Sample> {
        self.results
            .iter()
            .find_map(|(j, s)| (j == job).then_some(*s))
    }
}

/// n guests of one configuration, booted together.
#[derive(Debug)]
struct Group {
    round: u32,
    /// `None` for the guests without a vIOMMU (they serve both modes).
    mode: Option<Mode>,
    viommu: Viommu,
    took: Duration,
    guests: Vec<GuestRun>,
    windows: Vec<Window>,
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

    /// The group's figures for `job`: sums over its guests.
    fn aggregate(&self, job: &str) -> Aggregate {
        let Some(w) = self.windows.iter().find(|w| w.job == job) else {
            return Aggregate::NONE;
        };
        let per_guest: Vec<(Sample, CpuTime)> = self
            .guests
            .iter()
            .zip(&w.cpu)
            .filter_map(|(g, &cpu)| Some((g.sample(job)?, cpu)))
            .collect();
        aggregate(&per_guest, w.host_busy)
    }
}

/// A group's (or a mean of groups') figures for one job.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Aggregate {
    /// Sum over the guests.
    iops: f64,
    /// Sum over the guests.
    kibps: f64,
    /// Mean over the guests.
    lat_us: f64,
    /// Sum over the guests.
    ios: f64,
    /// Host CPU seconds of the guests' QEMU processes (and daemons), summed.
    cpu_s: f64,
    /// The daemons' part of `cpu_s`.
    daemon_cpu_s: f64,
    host_busy: f64,
}

impl Aggregate {
    /// No figures (a configuration not booted).
    const NONE: Aggregate = Aggregate {
        iops: f64::NAN,
        kibps: f64::NAN,
        lat_us: f64::NAN,
        ios: f64::NAN,
        cpu_s: f64::NAN,
        daemon_cpu_s: f64::NAN,
        host_busy: f64::NAN,
    };

    fn mb_s(&self) -> f64 {
        self.kibps * 1024.0 / 1e6
    }

    /// Host CPU microseconds per I/O.
    fn cpu_us_per_io(&self) -> f64 {
        ratio(self.cpu_s * 1e6, self.ios)
    }

    /// The daemons' CPU microseconds per I/O.
    fn daemon_us_per_io(&self) -> f64 {
        ratio(self.daemon_cpu_s * 1e6, self.ios)
    }

    /// The mean of each figure (so the mean's CPU per I/O is the total CPU
    /// time over the total I/Os); [`Self::NONE`] for none.
    fn mean(all: &[Aggregate]) -> Aggregate {
        if all.is_empty() {
            return Aggregate::NONE;
        }
        let n = all.len() as f64;
        let mean = |f: fn(&Aggregate) -> f64| all.iter().map(f).sum::<f64>() / n;
        Aggregate {
            iops: mean(|a| a.iops),
            kibps: mean(|a| a.kibps),
            lat_us: mean(|a| a.lat_us),
            ios: mean(|a| a.ios),
            cpu_s: mean(|a| a.cpu_s),
            daemon_cpu_s: mean(|a| a.daemon_cpu_s),
            host_busy: mean(|a| a.host_busy),
        }
    }
}

/// The guests' figures for one job: each guest's fio result and host CPU
/// time, summed ([`Aggregate::NONE`] for no guests).
fn aggregate(per_guest: &[(Sample, CpuTime)], host_busy: f64) -> Aggregate {
    if per_guest.is_empty() {
        return Aggregate::NONE;
    }
    let samples: Vec<Sample> = per_guest.iter().map(|(s, _)| *s).collect();
    Aggregate {
        iops: samples.iter().map(|s| s.iops).sum(),
        kibps: samples.iter().map(|s| s.kibps).sum(),
        lat_us: Sample::mean(&samples).lat_us,
        ios: samples.iter().map(|s| s.ios).sum(),
        cpu_s: per_guest.iter().map(|(_, c)| c.total()).sum(),
        daemon_cpu_s: per_guest.iter().map(|(_, c)| c.daemon).sum(),
        host_busy,
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
                .args(args)
                .rust_log("info")
                .log_file(dir.join("daemon.log"))
                .try_spawn()
                .map_err(|e| format!("guest {number}'s daemon: {e}"))?,
        ),
        (Viommu::Ours, None) => return Err("ours without a daemon binary".into()),
        _ => None,
    };
    let mut guest = Guest::new(viommu, "fio.sh");
    guest.disk = Some(disk);
    guest.initrd = Some(ctx.initrd.clone());
    guest.qemu_args = vec![
        "-smp".into(),
        "1".into(),
        "-serial".into(),
        format!("unix:{},server=on,wait=off", go.display()),
    ];
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
    wait_ready(vms, JOBS[0], deadline)?;
    let mut windows = Vec::new();
    for (k, &job) in JOBS.iter().enumerate() {
        let next = JOBS.get(k + 1).copied().unwrap_or(END);
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

/// A finished guest's fio results, checked: it passed, its disk is in the
/// domain the mode asks for, every job has a result.
fn check_run(
    run: &Run,
    mode: Option<Mode>,
    viommu: Viommu,
) -> Result<Vec<(String, Sample)>, String> {
    if run.status != 0 {
        return Err(format!(
            "the guest exited {} after {:.1?}",
            run.status, run.took
        ));
    }
    let want = mode.unwrap_or(Mode::Strict).domain(viommu);
    let domain = run
        .lines("VUI-CHECK vda-domain ")
        .first()
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or("?")
        .to_string();
    if domain != want {
        return Err(format!("the disk's IOMMU domain is {domain}, not {want}"));
    }
    let results = parse_fio(run)?;
    for job in JOBS {
        if !results.iter().any(|(j, _)| j == job) {
            return Err(format!("no result for {job}"));
        }
    }
    Ok(results)
}

/// Boot n guests of one configuration together and run their jobs in step.
fn run_group(
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

/// A group's progress lines: each guest's IOPS (and daemon counters), then
/// each job's aggregate.
fn progress(g: &Group) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "   round {} {:<6} {:<4} x{}: {:.1} s",
        g.round,
        g.mode.map_or("both", Mode::name),
        viommu_name(g.viommu),
        g.guests.len(),
        g.took.as_secs_f64()
    );
    for (i, guest) in g.guests.iter().enumerate() {
        let figures: Vec<String> = guest
            .results
            .iter()
            .map(|(j, s)| format!("{j} {:.0}", s.iops))
            .collect();
        let daemon = guest
            .daemon
            .as_ref()
            .and_then(|d| d.map_unmap)
            .map_or(String::new(), |(map, unmap)| {
                format!("; daemon: {map} MAP, {unmap} UNMAP")
            });
        let _ = writeln!(
            t,
            "     guest {} {:>5.1} s: IOPS {}{daemon}",
            i + 1,
            guest.took.as_secs_f64(),
            figures.join(", ")
        );
        if let Some(d) = &guest.daemon {
            let _ = writeln!(t, "       daemon {}: {}", i + 1, d.stats);
        }
    }
    let jobs: Vec<String> = JOBS
        .iter()
        .map(|job| {
            let a = g.aggregate(job);
            let daemon = match g.viommu {
                Viommu::Ours => format!(" (daemons {})", figure(a.daemon_us_per_io(), 1)),
                _ => String::new(),
            };
            format!(
                "{job} {:.0} IOPS, {}{daemon} µs CPU/IO, host {}% busy",
                a.iops,
                figure(a.cpu_us_per_io(), 1),
                figure(a.host_busy * 100.0, 0)
            )
        })
        .collect();
    let _ = writeln!(t, "     all: {}", jobs.join("; "));
    t
}

/// The mean over the rounds of `viommu`'s figures for `job` in `mode` with
/// `n` guests at once.
fn mean(groups: &[Group], mode: Mode, viommu: Viommu, n: usize, job: &str) -> Aggregate {
    let all: Vec<Aggregate> = groups
        .iter()
        .filter(|g| g.viommu == viommu && g.guests.len() == n && g.mode.is_none_or(|m| m == mode))
        .map(|g| g.aggregate(job))
        .collect();
    Aggregate::mean(&all)
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

/// A table cell: `x` with `decimals` decimals, or "-" for a configuration
/// not booted (`--viommu`).
fn figure(x: f64, decimals: usize) -> String {
    if x.is_finite() {
        format!("{x:.decimals$}")
    } else {
        "-".into()
    }
}

/// Per mode and job, a row per guest count: the mean aggregate IOPS and
/// host CPU per I/O of each configuration, the ratios of ours to QEMU's
/// (and IOPS of ours to none), and the host's busy percentage.
fn table(opts: &Options, groups: &[Group]) -> String {
    let mut t = String::new();
    for &mode in &opts.modes {
        for job in JOBS {
            let _ = writeln!(t, "-- {} {job}", mode.name());
            let _ = writeln!(
                t,
                "{:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>10} {:>9} {:>13}",
                "guests",
                "ours IOPS",
                "qemu IOPS",
                "none IOPS",
                "IOPS o/q",
                "IOPS o/n",
                "ours µs/IO",
                "qemu µs/IO",
                "none µs/IO",
                "µs/IO o/q",
                "busy% o/q/n"
            );
            for &n in &opts.guests {
                let [o, q, no] = VIOMMUS.map(|v| mean(groups, mode, v, n, job));
                let busy = [o, q, no].map(|a| figure(a.host_busy * 100.0, 0)).join("/");
                let _ = writeln!(
                    t,
                    "{:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>10} {:>9} {:>13}",
                    n,
                    figure(o.iops, 0),
                    figure(q.iops, 0),
                    figure(no.iops, 0),
                    figure(ratio(o.iops, q.iops), 3),
                    figure(ratio(o.iops, no.iops), 3),
                    figure(o.cpu_us_per_io(), 1),
                    figure(q.cpu_us_per_io(), 1),
                    figure(no.cpu_us_per_io(), 1),
                    figure(ratio(o.cpu_us_per_io(), q.cpu_us_per_io()), 3),
                    busy
                );
            }
        }
    }
    t
}

// ---- JSON -----------------------------------------------------------------

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A finite number, or `null`.
fn json_num(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.3}")
    } else {
        "null".into()
    }
}

/// One guest's fio result for one job.
fn json_sample(s: &Sample) -> String {
    format!(
        "{{\"iops\": {}, \"mb_s\": {}, \"lat_us\": {}, \"ios\": {}}}",
        json_num(s.iops),
        json_num(s.mb_s()),
        json_num(s.lat_us),
        json_num(s.ios)
    )
}

/// A group's (or a mean's) figures for one job.
fn json_aggregate(a: &Aggregate) -> String {
    format!(
        "{{\"iops\": {}, \"mb_s\": {}, \"lat_us\": {}, \"ios\": {}, \"cpu_s\": {}, \
         \"cpu_us_per_io\": {}, \"daemon_cpu_s\": {}, \"daemon_cpu_us_per_io\": {}, \
         \"host_busy\": {}}}",
        json_num(a.iops),
        json_num(a.mb_s()),
        json_num(a.lat_us),
        json_num(a.ios),
        json_num(a.cpu_s),
        json_num(a.cpu_us_per_io()),
        json_num(a.daemon_cpu_s),
        json_num(a.daemon_us_per_io()),
        json_num(a.host_busy)
    )
}

/// One guest of a group: its results with the CPU of its job windows.
fn json_guest(g: &Group, i: usize) -> String {
    let guest = &g.guests[i];
    let results: Vec<String> = guest
        .results
        .iter()
        .map(|(job, s)| {
            let w = g.windows.iter().find(|w| w.job == job);
            let cpu = w.and_then(|w| w.cpu.get(i).copied());
            let (cpu, daemon) = cpu.map_or((f64::NAN, f64::NAN), |c| (c.total(), c.daemon));
            let secs = w
                .and_then(|w| w.seconds.get(i).copied())
                .unwrap_or(f64::NAN);
            format!(
                "{}: {{\"fio\": {}, \"cpu_s\": {}, \"cpu_us_per_io\": {}, \
                 \"daemon_cpu_s\": {}, \"window_s\": {}}}",
                json_str(job),
                json_sample(s),
                json_num(cpu),
                json_num(ratio(cpu * 1e6, s.ios)),
                json_num(daemon),
                json_num(secs)
            )
        })
        .collect();
    let daemon = guest.daemon.as_ref().map_or("null".into(), |d| {
        let (map, unmap) = d
            .map_unmap
            .map_or(("null".into(), "null".into()), |(m, u)| {
                (m.to_string(), u.to_string())
            });
        format!(
            "{{\"map\": {map}, \"unmap\": {unmap}, \"stats\": {}}}",
            json_str(&d.stats)
        )
    });
    format!(
        "{{\"guest\": {}, \"seconds\": {}, \"daemon\": {daemon}, \"results\": {{{}}}}}",
        i + 1,
        json_num(guest.took.as_secs_f64()),
        results.join(", ")
    )
}

/// One group: its aggregate figures per job, and each guest's.
fn json_group(g: &Group) -> String {
    let jobs: Vec<String> = JOBS
        .iter()
        .map(|job| format!("{}: {}", json_str(job), json_aggregate(&g.aggregate(job))))
        .collect();
    let guests: Vec<String> = (0..g.guests.len())
        .map(|i| format!("        {}", json_guest(g, i)))
        .collect();
    format!(
        "    {{\"round\": {}, \"mode\": {}, \"viommu\": {}, \"guests\": {}, \"seconds\": {}, \
         \"jobs\": {{{}}},\n      \"per_guest\": [\n{}\n      ]}}",
        g.round,
        g.mode.map_or("null".into(), |m| json_str(m.name())),
        json_str(viommu_name(g.viommu)),
        g.guests.len(),
        json_num(g.took.as_secs_f64()),
        jobs.join(", "),
        guests.join(",\n")
    )
}

/// The whole run as JSON: the settings, the means per mode, job and guest
/// count, and every group with its guests.
fn json(
    opts: &Options,
    command: &str,
    daemon_args: &[String],
    groups: &[Group],
    took: Duration,
    load: [f64; 2],
) -> String {
    let mut j = String::from("{\n");
    let modes: Vec<String> = opts.modes.iter().map(|m| json_str(m.name())).collect();
    let counts: Vec<String> = opts.guests.iter().map(usize::to_string).collect();
    let args: Vec<String> = daemon_args.iter().map(|a| json_str(a)).collect();
    let _ = writeln!(j, "  \"command\": {},", json_str(command));
    let _ = writeln!(
        j,
        "  \"guest\": \"TCG, 1 vCPU, 1 GiB, Debian 6.12, virtio-blk iommu_platform=on, fio O_DIRECT\","
    );
    let _ = writeln!(j, "  \"seconds_per_job\": {},", opts.seconds);
    let _ = writeln!(j, "  \"rounds\": {},", opts.rounds);
    let _ = writeln!(j, "  \"modes\": [{}],", modes.join(", "));
    let _ = writeln!(j, "  \"guests\": [{}],", counts.join(", "));
    let _ = writeln!(j, "  \"daemon_args\": [{}],", args.join(", "));
    let _ = writeln!(j, "  \"total_seconds\": {},", json_num(took.as_secs_f64()));
    let _ = writeln!(
        j,
        "  \"host_loadavg\": {{\"start\": {}, \"end\": {}}},",
        json_num(load[0]),
        json_num(load[1])
    );
    j.push_str("  \"mean\": [\n");
    let mut rows = Vec::new();
    for &mode in &opts.modes {
        for job in JOBS {
            for &n in &opts.guests {
                let [o, q, no] = VIOMMUS.map(|v| mean(groups, mode, v, n, job));
                rows.push(format!(
                    "    {{\"mode\": {}, \"job\": {}, \"guests\": {n}, \"ours\": {}, \"qemu\": {}, \
                     \"none\": {}, \"ours_over_qemu\": {}, \"ours_over_none\": {}, \
                     \"cpu_ours_over_qemu\": {}}}",
                    json_str(mode.name()),
                    json_str(job),
                    json_aggregate(&o),
                    json_aggregate(&q),
                    json_aggregate(&no),
                    json_num(ratio(o.iops, q.iops)),
                    json_num(ratio(o.iops, no.iops)),
                    json_num(ratio(o.cpu_us_per_io(), q.cpu_us_per_io()))
                ));
            }
        }
    }
    j.push_str(&rows.join(",\n"));
    j.push_str("\n  ],\n  \"groups\": [\n");
    let groups: Vec<String> = groups.iter().map(json_group).collect();
    j.push_str(&groups.join(",\n"));
    j.push_str("\n  ]\n}\n");
    j
}

// ---- main -------------------------------------------------------------------

/// The configurations of one round, in the order they boot: for each mode
/// ours then QEMU's, then (once) none.
fn plan(opts: &Options) -> Vec<(Option<Mode>, Viommu)> {
    let mut plan = Vec::new();
    for &mode in &opts.modes {
        for viommu in [Viommu::Ours, Viommu::Qemu] {
            if opts.viommus.contains(&viommu) {
                plan.push((Some(mode), viommu));
            }
        }
    }
    if opts.viommus.contains(&Viommu::None) {
        plan.push((None, Viommu::None));
    }
    plan
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match parse(&args) {
        Ok(Some(o)) => o,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("guest-bench: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if qemu().is_none() {
        eprintln!("guest-bench: the patched QEMU is not built: run scripts/qemu/build-qemu.sh");
        return ExitCode::FAILURE;
    }
    if kernel_dir().is_none() {
        eprintln!("guest-bench: no guest kernel: run scripts/guest/fetch-kernel.sh");
        return ExitCode::FAILURE;
    }
    let mut command = String::from("cargo run --release -p qemu-tests --bin guest-bench");
    if !args.is_empty() {
        command.push_str(" -- ");
        command.push_str(&args.join(" "));
    }
    let start = Instant::now();
    let load_start = loadavg();
    println!("== {command}");
    let daemon_args = daemon_args(std::env::var("VUI_DAEMON_ARGS").ok().as_deref(), poll_us());
    let daemon = if opts.viommus.contains(&Viommu::Ours) {
        let built = match std::env::var_os("VUI_DAEMON_BIN") {
            // Another build of the daemon (a worktree of another commit), to
            // compare two builds in one run.
            Some(bin) => Ok(PathBuf::from(bin)),
            None => {
                println!("== building the daemon (cargo build --release -p vhost-user-iommu)");
                build_daemon()
            }
        };
        match built {
            Ok(bin) => {
                println!("== daemon: {} {}", bin.display(), daemon_args.join(" "));
                Some((bin, daemon_args.clone()))
            }
            Err(e) => {
                eprintln!("guest-bench: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    println!("== building the initramfs with fio");
    let ctx = Ctx {
        seconds: opts.seconds,
        initrd: initramfs_with("initrd-fio.gz", &["--with-fio"]),
        daemon,
    };

    // Round-robin: every guest count and configuration once per round, in
    // the same order.
    let plan = plan(&opts);
    let mut groups = Vec::new();
    for round in 1..=opts.rounds {
        for &n in &opts.guests {
            for &(mode, viommu) in &plan {
                match run_group(&ctx, round, n, mode, viommu) {
                    Ok(g) => {
                        print!("{}", progress(&g));
                        groups.push(g);
                    }
                    Err(e) => {
                        eprintln!("guest-bench: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
        }
    }
    let took = start.elapsed();
    let load = [load_start, loadavg()];
    println!(
        "== fio in each guest: TCG, 1 vCPU, 1 GiB, virtio-blk (iommu_platform=on), O_DIRECT; \
         {} s per job, the guests' jobs started together; mean of {} round(s); none = no vIOMMU \
         (one boot per round, both modes)",
        opts.seconds, opts.rounds
    );
    println!(
        "== IOPS: sum over the guests; µs/IO: host CPU time of the guests' QEMU processes \
         (+ their daemons for ours) over their I/Os; busy%: the whole host, during the job"
    );
    println!(
        "== host load average {:.2} at the start, {:.2} at the end",
        load[0], load[1]
    );
    print!("{}", table(&opts, &groups));
    let boots: usize = groups.iter().map(|g| g.guests.len()).sum();
    println!(
        "== {boots} boots in {} group(s) in {:.0} s ({command})",
        groups.len(),
        took.as_secs_f64()
    );
    if let Some(path) = &opts.json {
        let text = json(&opts, &command, &daemon_args, &groups, took, load);
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("guest-bench: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("== figures written to {}", path.display());
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn quick_is_one_second_strict_only() {
        let o = parse(&args("--quick")).unwrap().unwrap();
        assert_eq!((o.seconds, o.rounds), (1, 1));
        assert_eq!(o.modes, [Mode::Strict]);
        let o = parse(&args("--quick --seconds 3")).unwrap().unwrap();
        assert_eq!(o.seconds, 3);
    }

    #[test]
    fn defaults_are_five_seconds_both_modes() {
        let o = parse(&[]).unwrap().unwrap();
        assert_eq!((o.seconds, o.rounds), (5, 1));
        assert_eq!(o.modes, [Mode::Strict, Mode::Lazy]);
        assert_eq!(o.guests, [1]);
        assert!(parse(&args("--rounds 0")).is_err());
        assert!(parse(&args("--json")).is_err());
        assert!(parse(&args("--help")).unwrap().is_none());
    }

    #[test]
    fn viommu_list_picks_configurations_in_table_order() {
        assert_eq!(parse(&[]).unwrap().unwrap().viommus, VIOMMUS);
        let o = parse(&args("--viommu none,ours,ours")).unwrap().unwrap();
        assert_eq!(o.viommus, [Viommu::Ours, Viommu::None]);
        assert!(parse(&args("--viommu intel")).is_err());
        assert!(parse(&args("--viommu ours,")).is_err());
        assert!(parse(&args("--viommu")).is_err());
    }

    #[test]
    fn guest_counts_are_sorted_once_each_and_bounded() {
        assert_eq!(parse_guests("1,2,3").unwrap(), [1, 2, 3]);
        assert_eq!(parse_guests("3,1,3").unwrap(), [1, 3]);
        assert_eq!(parse_guests(" 2").unwrap(), [2]);
        assert_eq!(parse_guests("8").unwrap(), [8]);
        for bad in ["", "0", "9", "1,", ",1", "-1", "two", "1;2", "1.5"] {
            let e = parse_guests(bad).unwrap_err();
            assert!(e.contains("--guests"), "{bad:?}: {e}");
        }
        let o = parse(&args("--guests 2,1")).unwrap().unwrap();
        assert_eq!(o.guests, [1, 2]);
        assert!(parse(&args("--guests")).is_err());
        assert!(parse(&args("--guests 0")).is_err());
    }

    #[test]
    fn a_configuration_not_booted_has_no_figures() {
        let m = Sample::mean(&[]);
        assert!(m.iops.is_nan() && m.lat_us.is_nan());
        assert!(ratio(1.0, m.iops).is_nan());
        assert_eq!(figure(ratio(1.0, m.iops), 3), "-");
        assert_eq!(figure(1.31159, 3), "1.312");
        let a = Aggregate::mean(&[]);
        assert!(a.iops.is_nan() && a.cpu_us_per_io().is_nan());
        assert!(aggregate(&[], 0.5).iops.is_nan());
    }

    #[test]
    fn fio_lines_are_parsed() {
        let run = Run {
            status: 0,
            output: "x VUI-FIO job=rand4k-qd1 iops=1234.5 kibps=4938 lat_us=801.2 ios=6172\n"
                .into(),
            took: Duration::ZERO,
        };
        let r = parse_fio(&run).unwrap();
        assert_eq!(r[0].0, "rand4k-qd1");
        assert_eq!(r[0].1.iops, 1234.5);
        assert_eq!(r[0].1.ios, 6172.0);
        assert!((r[0].1.mb_s() - 5.056).abs() < 0.001);
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_str("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
        assert_eq!(json_num(f64::NAN), "null");
    }

    /// A /proc/PID/stat line with `comm`, process group `pgrp`, utime 1234
    /// and stime 56.
    fn stat_line(pid: u32, comm: &str, pgrp: u32) -> String {
        format!(
            "{pid} ({comm}) S 1 {pgrp} {pgrp} 0 -1 4194560 1500 0 0 0 1234 56 0 0 20 0 3 0 \
             12345 1234567890 5000 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0"
        )
    }

    #[test]
    fn proc_stat_fields_count_from_the_last_parenthesis() {
        let s = parse_proc_stat(&stat_line(42, "qemu-system-x86", 40)).unwrap();
        assert_eq!(
            s,
            ProcStat {
                comm: "qemu-system-x86".into(),
                pgrp: 40,
                ticks: 1290
            }
        );
        // A command name with spaces and parentheses of its own.
        let s = parse_proc_stat(&stat_line(7, "a) b (c) 9 9", 3)).unwrap();
        assert_eq!(
            (s.comm.as_str(), s.pgrp, s.ticks),
            ("a) b (c) 9 9", 3, 1290)
        );
        for bad in [
            "",
            "42 qemu S 1 2",
            "42 )qemu( S 1 2 3",
            "42 (qemu) S 1",
            "42 (qemu) S 1 x 3 0 -1 0 0 0 0 0 1 2",
        ] {
            assert!(parse_proc_stat(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_qemu_of_a_process_group_is_found_by_its_name() {
        let lines = [
            (10, stat_line(10, "run-guest.sh", 10)),
            (11, stat_line(11, "timeout", 10)),
            (12, stat_line(12, "qemu-system-x86", 99)),
            (13, stat_line(13, "qemu-system-x86", 10)),
            (14, stat_line(14, "tee", 10)),
        ];
        let stats = || lines.iter().map(|(p, l)| (*p, l.as_str()));
        assert_eq!(qemu_among(10, stats()), Some(13));
        assert_eq!(qemu_among(99, stats()), Some(12));
        assert_eq!(qemu_among(5, stats()), None);
    }

    #[test]
    fn host_cpu_is_busy_over_total_without_idle_and_iowait() {
        let a = parse_host_cpu("cpu  100 0 50 800 50 0 0 0 30 0\ncpu0 1 2 3 4\n").unwrap();
        assert_eq!(
            a,
            HostCpu {
                busy: 150,
                total: 1000
            }
        );
        let b = parse_host_cpu("cpu  250 0 100 850 50 0 0 0 90 0\n").unwrap();
        assert_eq!(busy_fraction(a, b), 0.8);
        assert!(busy_fraction(a, a).is_nan());
        assert!(parse_host_cpu("cpu0 1 2 3 4\n").is_err());
        assert!(parse_host_cpu("cpu  1 2 x 4\n").is_err());
        assert!(parse_host_cpu("cpu  1 2\n").is_err());
    }

    fn sample(iops: f64, ios: f64) -> Sample {
        Sample {
            iops,
            kibps: iops * 4.0,
            lat_us: 1e6 / iops,
            ios,
        }
    }

    fn cpu(qemu: f64, daemon: f64) -> CpuTime {
        CpuTime { qemu, daemon }
    }

    #[test]
    fn cpu_time_is_ticks_between_readings_in_seconds() {
        let from = Ticks {
            qemu: 100,
            daemon: 7,
        };
        let to = Ticks {
            qemu: 250,
            daemon: 32,
        };
        let c = CpuTime::between(from, to, 100.0);
        assert_eq!(c, cpu(1.5, 0.25));
        assert_eq!(c.total(), 1.75);
        // A reading that went backwards (cannot happen) counts nothing.
        assert_eq!(CpuTime::between(to, from, 100.0), cpu(0.0, 0.0));
    }

    #[test]
    fn guests_are_summed_and_cpu_is_per_io() {
        let a = aggregate(
            &[
                (sample(1000.0, 1000.0), cpu(0.375, 0.125)),
                (sample(500.0, 500.0), cpu(0.25, 0.0)),
            ],
            0.9,
        );
        assert_eq!(a.iops, 1500.0);
        assert_eq!(a.kibps, 6000.0);
        assert_eq!(a.ios, 1500.0);
        assert_eq!(a.cpu_s, 0.75);
        assert_eq!(a.lat_us, 1500.0);
        assert_eq!(a.host_busy, 0.9);
        assert_eq!(a.cpu_us_per_io(), 500.0);
        assert_eq!((a.daemon_cpu_s, a.daemon_us_per_io()), (0.125, 250.0 / 3.0));
        // The mean of rounds: CPU per I/O is the total CPU over the total I/Os.
        let b = aggregate(&[(sample(3000.0, 3000.0), cpu(0.5, 0.0))], 0.5);
        let m = Aggregate::mean(&[a, b]);
        assert_eq!(m.iops, 2250.0);
        assert!((m.cpu_us_per_io() - 1.25e6 / 4500.0).abs() < 1e-9);
        assert!((m.host_busy - 0.7).abs() < 1e-12);
        // No I/O: no CPU per I/O.
        assert!(aggregate(&[(sample(1.0, 0.0), cpu(1.0, 0.0))], 0.1)
            .cpu_us_per_io()
            .is_nan());
    }

    #[test]
    fn a_group_aggregates_each_job_over_its_guests() {
        let guest = |iops: f64| GuestRun {
            took: Duration::ZERO,
            results: JOBS
                .iter()
                .map(|j| (j.to_string(), sample(iops, iops)))
                .collect(),
            daemon: None,
        };
        let g = Group {
            round: 1,
            mode: Some(Mode::Strict),
            viommu: Viommu::Qemu,
            took: Duration::ZERO,
            guests: vec![guest(100.0), guest(300.0)],
            windows: vec![Window {
                job: JOBS[0],
                cpu: vec![cpu(0.1, 0.0), cpu(0.3, 0.0)],
                seconds: vec![1.0, 1.0],
                host_busy: 1.0,
            }],
        };
        let a = g.aggregate(JOBS[0]);
        assert_eq!((a.iops, a.ios), (400.0, 400.0));
        assert!((a.cpu_us_per_io() - 1000.0).abs() < 1e-9);
        // A job without a window has no figures.
        assert!(g.aggregate(JOBS[1]).iops.is_nan());
        let groups = [g];
        assert_eq!(
            mean(&groups, Mode::Strict, Viommu::Qemu, 2, JOBS[0]).iops,
            400.0
        );
        assert!(mean(&groups, Mode::Strict, Viommu::Qemu, 1, JOBS[0])
            .iops
            .is_nan());
        assert!(mean(&groups, Mode::Lazy, Viommu::Qemu, 2, JOBS[0])
            .iops
            .is_nan());
        assert!(table(
            &parse(&args("--quick --guests 1,2")).unwrap().unwrap(),
            &groups
        )
        .contains("     2         -       400"));
    }

    #[test]
    fn ready_and_fail_lines_are_marked() {
        assert_eq!(
            mark("[ 1.0] x VUI-READY job=rand4k-qd1\r\n"),
            Some(Mark::Ready("rand4k-qd1".into()))
        );
        assert_eq!(mark("VUI-READY job=end"), Some(Mark::Ready(END.into())));
        assert_eq!(mark("VUI-READY job="), None);
        assert_eq!(
            mark("VUI-FAIL fio rand4k-qd1 exited 1\r"),
            Some(Mark::Fail("VUI-FAIL fio rand4k-qd1 exited 1".into()))
        );
        assert_eq!(mark("VUI-FIO job=x iops=1"), None);
    }

    #[test]
    fn daemon_args_add_poll_us_unless_given() {
        assert_eq!(daemon_args(None, 1000), ["--poll-us", "1000"]);
        assert_eq!(
            daemon_args(Some(" --foo  bar\t--baz "), 50),
            ["--poll-us", "50", "--foo", "bar", "--baz"]
        );
        assert_eq!(daemon_args(Some("--poll-us 0"), 50), ["--poll-us", "0"]);
        assert_eq!(daemon_args(Some("--poll-us=7"), 50), ["--poll-us=7"]);
    }

    #[test]
    fn the_daemon_binary_is_found_in_cargo_output() {
        let out = r#"{"reason":"compiler-artifact","target":{"name":"log"},"executable":null,"fresh":true}
{"reason":"compiler-artifact","target":{"name":"vhost-user-iommu"},"executable":"/w/target/release/vhost-user-iommu","fresh":false}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            cargo_executable(out, "vhost-user-iommu"),
            Some(PathBuf::from("/w/target/release/vhost-user-iommu"))
        );
        assert_eq!(cargo_executable(out, "other"), None);
        assert_eq!(cargo_executable("", "vhost-user-iommu"), None);
    }

    #[test]
    fn daemon_stats_lines_give_map_and_unmap() {
        let log = "[INFO] front-end disconnected\n\
                   [2025 INFO serve] stats: other 0/0 attach 1/0 detach 0/0 map 1234/2 unmap 1200/0 \
                   probe 1/0 (ok/failed); 1 domains, 34 mappings, 1 endpoints attached; \
                   QueueStats { kicks: 5 }\n";
        let line = stats_line(log).unwrap();
        assert!(line.starts_with("stats: other 0/0") && line.ends_with("kicks: 5 }"));
        assert_eq!(map_unmap(line), Some((1234, 1200)));
        assert_eq!(stats_line("no counters\n"), None);
        assert_eq!(map_unmap("stats: map x/0 unmap 1/0"), None);
        assert_eq!(map_unmap("stats: map 1/0"), None);
    }

    #[test]
    fn the_tail_of_an_output_is_its_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
        assert_eq!(tail("", 5), "");
    }
}
