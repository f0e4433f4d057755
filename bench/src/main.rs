// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vhost-user-iommu-bench`: the command line.

mod counting_alloc;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use vhost_user_iommu::config::{CliError, Config, RawConfig};
use vhost_user_iommu_bench::daemon::{self, DaemonError, DaemonProcess};
use vhost_user_iommu_bench::daemon_leg::DaemonLeg;
use vhost_user_iommu_bench::direct_leg::DirectLeg;
use vhost_user_iommu_bench::leg::LegError;
use vhost_user_iommu_bench::plot::{self, PlotError, Series};
use vhost_user_iommu_bench::progress::Progress;
use vhost_user_iommu_bench::qemu_leg::{QemuLeg, QemuVariant};
use vhost_user_iommu_bench::qemu_standin::{QemuError, QemuStandIn};
use vhost_user_iommu_bench::report::{
    self, LegReport, QemuReport, Ratio, Report, Settings, WorkloadReport,
};
use vhost_user_iommu_bench::run::{run_leg, LegOutcome, RunError, Timing, Watch};
use vhost_user_iommu_bench::scaling::{self, ScalingError, ScalingPoint};
use vhost_user_iommu_bench::workload::{Params, Plan, Workload};

#[global_allocator]
static ALLOCATOR: counting_alloc::CountingAlloc = counting_alloc::CountingAlloc;

/// Measured and warm-up time per leg with --smoke.
const SMOKE: Timing = Timing {
    warmup: Duration::from_millis(50),
    measure: Duration::from_millis(200),
};
/// Guest RAM besides the mapped buffer: rings, request buffers.
const RAM_OVERHEAD: u64 = 16 << 20;
/// Where the direct leg's buffer lives in its guest RAM.
const DIRECT_BUFFER: u64 = 2 << 20;
/// Largest --size.
const MAX_SIZE: u64 = 1 << 30;

const LONG_ABOUT: &str = "\
Host-side load generator for the vhost-user-iommu daemon.

It starts the daemon (the `vhost-user-iommu` binary next to this one, or
--daemon PATH; or uses a running one with --socket PATH), then plays VMM and
guest driver over vhost-user: each workload connects, ATTACHes its
endpoints, warms up, and sends MAP/UNMAP requests for --seconds, the driver
kicking and then busy-polling the used ring as Linux's virtio-iommu driver
does. Each request's latency runs from the kick to the driver seeing its used
element. The daemon's CPU time (/proc/PID/stat utime+stime) and context
switches (/proc/PID/task/*/status) are read around the measured part.

Every workload then runs the same requests on the daemon's device model
in-process (\"direct\": the emulated iommufd model, no transport), and the
table shows daemon ÷ direct.

Workloads:
  strict-4k   QD1: MAP 4 KiB, UNMAP it, one request per kick (Linux, strict mode)
  strict-64k  the same with 64 KiB
  strict-2m   the same with 2 MiB
  batch       --qd MAPs of --size in one kick, then --qd UNMAPs in the next
  domains     strict, --size, round-robin over --domains domains, one endpoint each

Domain d uses endpoint --first-endpoint + d - 1; a spawned daemon is given
exactly those (--endpoints). The daemon runs without --mirror-socket (no QEMU)
unless --qemu-leg is given.

--qemu-leg: the daemon gets --mirror-socket, and each workload runs again
with a QEMU stand-in connected there (row `NAME +qemu`): it speaks the mirror
protocol (docs/mirror-protocol.md), maps the shared translation table, and
acknowledges every batch of events at once. After each MAP completes the
driver walks the table for the mapped IOVA, as QEMU's emulated devices do on
their next DMA, and checks it gives the mapped GPA; after each UNMAP, that it
is gone. A failed check stops the run (a strictness bug). --notifiers adds a
row `NAME +qemu+notif` where the stand-in has set the notifier flags of the
workload's endpoints (a VFIO device behind the vIOMMU): every MAP/UNMAP is
then a record the daemon waits for QEMU to acknowledge.

--scaling: instead of the workloads, the device model in-process (and the
shared translation table alone) with one domain holding N existing 4 KiB
mappings, N = 100 ... 1 000 000 (up to 10 000 with --smoke): ns per MAP or
UNMAP of a new 4 KiB mapping (p50, p99), per translation of an existing
IOVA, and allocations per request; --seconds and --warmup are per N.

The alloc/req column counts this program's heap allocations per request in
the direct leg after warm-up: whether the device model allocates.

Output: one progress line per workload on stderr, a table on stdout, --json
FILE for the numbers, --plot FILE.svg for the latency distributions (or the
--scaling curve; SVG only: PNG would need a font rasteriser from system
libraries).

Build both binaries, then run:
  cargo build --release -p vhost-user-iommu -p vhost-user-iommu-bench
  target/release/vhost-user-iommu-bench --seconds 3 --json bench.json --plot bench.svg
  target/release/vhost-user-iommu-bench --seconds 2 --qemu-leg --notifiers
  target/release/vhost-user-iommu-bench --scaling --plot scaling.svg";

/// Host-side load generator for the vhost-user-iommu daemon: MAP/UNMAP
/// workloads, latency percentiles, throughput, the daemon's CPU time and
/// context switches per request, and the same requests on the device model
/// in-process.
#[derive(Debug, Parser)]
#[command(version, about, long_about = LONG_ABOUT)]
struct Cli {
    /// Workloads to run, comma-separated [default: all, in this order].
    #[arg(long, value_enum, value_delimiter = ',', value_name = "LIST")]
    workloads: Vec<Workload>,

    /// Measured seconds per workload, for each leg.
    #[arg(long, default_value_t = 3.0, value_name = "S")]
    seconds: f64,

    /// Unmeasured seconds before each measurement.
    #[arg(long, default_value_t = 0.5, value_name = "S")]
    warmup: f64,

    /// Requests per kick in `batch`.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=512))]
    qd: u16,

    /// Domains (one endpoint each) in `domains`.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    domains: u32,

    /// Bytes per mapping in `batch` and `domains`: a multiple of 4 KiB,
    /// with an optional k/m/g suffix (binary).
    #[arg(long, default_value = "4k", value_parser = parse_size, value_name = "BYTES")]
    size: u64,

    /// Endpoint ID of domain 1.
    #[arg(long, default_value_t = 8, value_name = "ID")]
    first_endpoint: u32,

    /// The daemon executable to start [default: vhost-user-iommu next to
    /// this program].
    #[arg(long, value_name = "PATH", conflicts_with = "socket")]
    daemon: Option<PathBuf>,

    /// Use the daemon already listening here instead of starting one (it
    /// must serve the endpoints the workloads use).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,

    /// With --socket: the daemon's process ID, for its CPU time and context
    /// switches (without it those columns are empty).
    #[arg(long, value_name = "PID", requires = "socket")]
    daemon_pid: Option<u32>,

    /// Also run each workload with a QEMU stand-in on the daemon's
    /// translation mirror, checking every MAP/UNMAP through the shared
    /// table (rows `NAME +qemu`).
    #[arg(long)]
    qemu_leg: bool,

    /// With --qemu-leg: also with the workload's endpoints having IOMMU
    /// notifiers, so that every MAP/UNMAP is acknowledged by QEMU (rows
    /// `NAME +qemu+notif`).
    #[arg(long, requires = "qemu_leg")]
    notifiers: bool,

    /// With --socket and --qemu-leg: the running daemon's --mirror-socket.
    #[arg(long, value_name = "PATH", requires_all = ["socket", "qemu_leg"])]
    mirror_socket: Option<PathBuf>,

    /// Instead of the workloads: MAP/UNMAP and translation cost on the
    /// device model (and on the shared translation table alone) against
    /// the number of mappings already in the domain, 100 to 1 000 000.
    #[arg(long, conflicts_with_all = ["workloads", "socket", "daemon", "qemu_leg"])]
    scaling: bool,

    /// Run every workload for about 0.2 s (for CI): checks that everything
    /// works, measures nothing worth keeping. With --scaling: 0.2 s per
    /// point, up to 10 000 mappings.
    #[arg(long)]
    smoke: bool,

    /// Write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,

    /// Draw the latency histograms (with --scaling: the scaling curve)
    /// into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
}

/// Why the bench failed.
#[derive(Debug, thiserror::Error)]
enum BenchError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error("{workload}, {leg}: {source}")]
    Run {
        workload: &'static str,
        leg: &'static str,
        source: RunError,
    },
    #[error("{workload}: the QEMU stand-in: {source}")]
    Qemu {
        workload: &'static str,
        source: QemuError,
    },
    #[error("--scaling: {0}")]
    Scaling(#[from] ScalingError),
    #[error("the direct leg's configuration: {0}")]
    Config(#[from] CliError),
    #[error("--json {path}: {source}")]
    Json {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Plot(#[from] PlotError),
}

/// Parse `4096`, `4k`, `64K`, `2m`, `1g` (binary units).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 10),
        Some((i, 'm' | 'M')) => (&s[..i], 20),
        Some((i, 'g' | 'G')) => (&s[..i], 30),
        _ => (s, 0),
    };
    let n: u64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 4096, 64k, 2m)"))?;
    let bytes = n
        .checked_mul(1 << shift)
        .filter(|&b| b <= MAX_SIZE)
        .ok_or_else(|| format!("`{s}` is larger than 1 GiB"))?;
    if bytes == 0 || !bytes.is_multiple_of(4096) {
        return Err(format!("`{s}` is not a non-zero multiple of 4 KiB"));
    }
    Ok(bytes)
}

fn seconds(flag: &str, s: f64) -> Result<Duration, BenchError> {
    Duration::try_from_secs_f64(s)
        .ok()
        .filter(|d| *d <= Duration::from_secs(24 * 3600))
        .ok_or_else(|| BenchError::Usage(format!("{flag} {s}: not a number of seconds")))
}

/// Where the daemon is, and whether we started it.
enum Target {
    Spawned(DaemonProcess),
    External {
        socket: PathBuf,
        mirror: Option<PathBuf>,
        pid: Option<u32>,
    },
}

impl Target {
    fn mirror(&self) -> Option<&Path> {
        match self {
            Target::Spawned(d) => d.mirror(),
            Target::External { mirror, .. } => mirror.as_deref(),
        }
    }

    fn socket(&self) -> &Path {
        match self {
            Target::Spawned(d) => d.socket(),
            Target::External { socket, .. } => socket,
        }
    }

    fn pid(&self) -> Option<u32> {
        match self {
            Target::Spawned(d) => Some(d.pid()),
            Target::External { pid, .. } => *pid,
        }
    }
}

/// One workload's results, with its histograms for the plot.
struct Outcome {
    report: WorkloadReport,
    daemon: LegOutcome,
    qemu: Vec<(String, LegOutcome)>,
    direct: LegOutcome,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-user-iommu-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What every leg watches: the daemon's `/proc` counters (not for the
/// direct leg) and this process's allocations.
fn watch(pid: Option<u32>) -> Watch {
    Watch {
        pid,
        allocations: Some(counting_alloc::allocations),
    }
}

fn run(cli: Cli) -> Result<(), BenchError> {
    if let Some(p) = &cli.plot {
        plot::check_path(p)?;
    }
    let timing = if cli.smoke {
        SMOKE
    } else {
        Timing {
            warmup: seconds("--warmup", cli.warmup)?,
            measure: seconds("--seconds", cli.seconds)?,
        }
    };
    let params = Params {
        qd: usize::from(cli.qd),
        domains: cli.domains,
        size: cli.size,
        first_endpoint: cli.first_endpoint,
    };
    if u64::from(cli.first_endpoint) + u64::from(cli.domains) > 0x1_0000 {
        return Err(BenchError::Usage(format!(
            "--first-endpoint {:#x} + --domains {} goes past endpoint 0xffff",
            cli.first_endpoint, cli.domains
        )));
    }
    if cli.qemu_leg && cli.socket.is_some() && cli.mirror_socket.is_none() {
        return Err(BenchError::Usage(
            "--qemu-leg with --socket needs the daemon's --mirror-socket PATH".into(),
        ));
    }
    // The device the daemon runs: its defaults, serving our endpoints.
    let config = RawConfig {
        endpoints: Some(params.endpoint_list()),
        ..RawConfig::default()
    }
    .check()?;
    let mut settings = Settings {
        seconds: timing.measure.as_secs_f64(),
        warmup_seconds: timing.warmup.as_secs_f64(),
        qd: params.qd,
        domains: params.domains,
        size: params.size,
        smoke: cli.smoke,
        daemon: String::new(),
        qemu_leg: cli.qemu_leg,
        notifiers: cli.notifiers,
        mirror_socket: None,
        scaling: cli.scaling,
    };
    if cli.scaling {
        return run_scaling(&cli, &config, timing, settings);
    }

    let workloads = if cli.workloads.is_empty() {
        Workload::ALL.to_vec()
    } else {
        cli.workloads.clone()
    };
    let target = match &cli.socket {
        Some(socket) => Target::External {
            socket: socket.clone(),
            mirror: cli.mirror_socket.clone(),
            pid: cli.daemon_pid,
        },
        None => {
            let binary = daemon::locate(cli.daemon.as_deref())?;
            let base = std::env::temp_dir().join(format!("vui-bench-{}", std::process::id()));
            let socket = base.with_extension("sock");
            let mirror = cli.qemu_leg.then(|| base.with_extension("mirror"));
            let args = ["--endpoints".to_string(), params.endpoint_list()];
            Target::Spawned(DaemonProcess::spawn(
                &binary,
                &socket,
                mirror.as_deref(),
                &args,
            )?)
        }
    };
    settings.daemon = match &target {
        Target::Spawned(d) => format!("spawned (pid {}) on {}", d.pid(), d.socket().display()),
        Target::External { socket, .. } => format!("external on {}", socket.display()),
    };
    settings.mirror_socket = target.mirror().map(|m| m.display().to_string());
    let variants: &[QemuVariant] = match (cli.qemu_leg, cli.notifiers) {
        (false, _) => &[],
        (true, false) => &[QemuVariant::Table],
        (true, true) => &[QemuVariant::Table, QemuVariant::Notifiers],
    };

    let mut outcomes = Vec::with_capacity(workloads.len());
    for &w in &workloads {
        outcomes.push(run_workload(
            w, &params, timing, &target, variants, &config,
        )?);
    }
    drop(target);

    let report = Report {
        tool: env!("CARGO_PKG_NAME"),
        version: env!("CARGO_PKG_VERSION"),
        settings,
        workloads: outcomes.iter().map(|o| o.report.clone()).collect(),
        scaling: None,
    };
    print!("{}", report::table(&report));
    write_json(cli.json.as_deref(), &report)?;
    if let Some(path) = &cli.plot {
        let mut daemon = Vec::new();
        for o in &outcomes {
            daemon.push(Series {
                name: o.report.name,
                latency: &o.daemon.latency,
            });
            daemon.extend(o.qemu.iter().map(|(name, leg)| Series {
                name,
                latency: &leg.latency,
            }));
        }
        let direct: Vec<Series<'_>> = outcomes
            .iter()
            .map(|o| Series {
                name: o.report.name,
                latency: &o.direct.latency,
            })
            .collect();
        plot::write_svg(path, &daemon, &direct)?;
    }
    Ok(())
}

fn write_json(path: Option<&Path>, report: &Report) -> Result<(), BenchError> {
    let Some(path) = path else {
        return Ok(());
    };
    let json_err = |source| BenchError::Json {
        path: path.to_path_buf(),
        source,
    };
    let text = serde_json::to_string_pretty(report).map_err(|e| json_err(e.into()))?;
    std::fs::write(path, text + "\n").map_err(json_err)
}

/// `--scaling`: the curve, its table, JSON and plot.
fn run_scaling(
    cli: &Cli,
    config: &Config,
    timing: Timing,
    settings: Settings,
) -> Result<(), BenchError> {
    let points = scaling::points(cli.smoke);
    let curve: Vec<ScalingPoint> = scaling::run(
        config,
        &points,
        timing,
        Some(counting_alloc::allocations),
        &mut |p| {
            eprintln!(
                "scaling {:>9} mappings: device MAP/UNMAP p50 {} ns, table p50 {} ns",
                p.existing, p.device.map_unmap_ns.p50, p.table.map_unmap_ns.p50
            )
        },
    )?;
    print!("{}", report::scaling_table(&curve));
    if let Some(path) = &cli.plot {
        plot::write_scaling_svg(path, &curve)?;
    }
    let report = Report {
        tool: env!("CARGO_PKG_NAME"),
        version: env!("CARGO_PKG_VERSION"),
        settings,
        workloads: Vec::new(),
        scaling: Some(curve),
    };
    write_json(cli.json.as_deref(), &report)
}

/// The endpoints `plan` attaches.
fn endpoints_of(plan: &Plan) -> impl Iterator<Item = u32> + '_ {
    plan.setup.iter().filter_map(|r| match *r {
        test_frontend::Request::Attach { endpoint, .. } => Some(endpoint),
        _ => None,
    })
}

/// Run `w` through the daemon (then once per QEMU variant, each with a
/// fresh QEMU stand-in on the daemon's mirror), then on the device model
/// in-process.
fn run_workload(
    w: Workload,
    params: &Params,
    timing: Timing,
    target: &Target,
    variants: &[QemuVariant],
    config: &Config,
) -> Result<Outcome, BenchError> {
    let name = w.name();
    let failed = |leg: &'static str| {
        move |source: RunError| BenchError::Run {
            workload: name,
            leg,
            source,
        }
    };
    let size = w.mapping_size(params);
    let ram = RAM_OVERHEAD + 2 * size.max(2 << 20);
    let mut progress = Progress::new(name);
    let connect = || -> Result<(DaemonLeg, Plan), RunError> {
        // A fresh connection: the daemon starts each front-end with a fresh device.
        let leg = DaemonLeg::connect(target.socket(), w.requests_per_kick(params), ram)?;
        let buffer = leg.alloc(size, size.min(2 << 20))?;
        Ok((leg, w.plan(params, buffer)))
    };

    let (mut leg, plan) = connect().map_err(failed("daemon"))?;
    let daemon = run_leg(
        &mut leg,
        &plan,
        timing,
        watch(target.pid()),
        &mut progress,
        "daemon",
    )
    .map_err(failed("daemon"))?;
    drop(leg);

    let mut qemu = Vec::with_capacity(variants.len());
    if let (Some(mirror), false) = (target.mirror(), variants.is_empty()) {
        let qemu_err = |source| BenchError::Qemu {
            workload: name,
            source,
        };
        for &v in variants {
            let label = v.label();
            let standin = QemuStandIn::connect(mirror).map_err(qemu_err)?;
            let (leg, plan) = connect().map_err(failed(label))?;
            if v.notifiers() {
                standin
                    .set_notified(endpoints_of(&plan))
                    .map_err(qemu_err)?;
            }
            let mut leg = QemuLeg::new(leg, &standin);
            let outcome = run_leg(
                &mut leg,
                &plan,
                timing,
                watch(target.pid()),
                &mut progress,
                label,
            )
            .map_err(failed(label))?;
            qemu.push((v, outcome));
        }
    }

    let mut leg = DirectLeg::new(config, ram).map_err(|e: LegError| failed("direct")(e.into()))?;
    let plan = w.plan(params, DIRECT_BUFFER);
    let direct = run_leg(
        &mut leg,
        &plan,
        timing,
        watch(None),
        &mut progress,
        "direct",
    )
    .map_err(failed("direct"))?;

    let (d, x) = (LegReport::of(&daemon), LegReport::of(&direct));
    progress.finish(d.req_per_s, x.req_per_s);
    let qemu_reports = qemu
        .iter()
        .map(|(v, o)| {
            let r = LegReport::of(o);
            QemuReport {
                label: v.label(),
                notifiers: v.notifiers(),
                ratio: Ratio::of(&r, &x),
                daemon: r,
            }
        })
        .collect();
    Ok(Outcome {
        report: WorkloadReport {
            name,
            description: w.description(params),
            requests_per_kick: w.requests_per_kick(params),
            ratio: Ratio::of(&d, &x),
            daemon: d,
            direct: x,
            qemu: qemu_reports,
        },
        daemon,
        qemu: qemu
            .into_iter()
            .map(|(v, o)| (format!("{name} {}", v.label()), o))
            .collect(),
        direct,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_suffixes_and_must_be_pages() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("2m"), Ok(2 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        for bad in ["0", "100", "6000", "2g", "x", "k", "-4k"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
