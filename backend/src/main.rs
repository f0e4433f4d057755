// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vhost-user-iommu`: the daemon's command line.

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use iopt::kernel::KernelIommufd;
use vhost_user_iommu::config::RawConfig;
use vhost_user_iommu::control::{self, ControlServer, Telemetry};
use vhost_user_iommu::guest_ram::MemoryFiles;
use vhost_user_iommu::listen::Access;
use vhost_user_iommu::mirror::{Hello, MirrorHandle, MirrorMemory, MirrorServer};
use vhost_user_iommu::serve::{Server, SocketSource};
use vhost_user_iommu::state_file::Journal;
use vhost_user_iommu::vhu_iommu::{
    BackendHooks, IommuBackend, DEFAULT_POLL_US, DEFAULT_WORKER_SLICE_US,
};
use vhost_user_iommu::{capabilities, config, confine, emulated, passthrough, sched};

/// How guest domains are implemented.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ModeArg {
    /// Each domain is an IOAS of the in-process iommufd model.
    Emulated,
    /// Each domain is a kernel IOAS on /dev/iommu; endpoints are the --vfio
    /// devices.
    Iommufd,
}

impl From<ModeArg> for config::Mode {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Emulated => config::Mode::Emulated,
            ModeArg::Iommufd => config::Mode::Iommufd,
        }
    }
}

/// What the seccomp filter does with a call outside the list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum SeccompArg {
    Kill,
    Log,
    None,
}

impl From<SeccompArg> for confine::Seccomp {
    fn from(s: SeccompArg) -> Self {
        match s {
            SeccompArg::Kill => confine::Seccomp::Kill,
            SeccompArg::Log => confine::Seccomp::Log,
            SeccompArg::None => confine::Seccomp::None,
        }
    }
}

/// How much the daemon logs when RUST_LOG does not say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogLevelArg {
    Error,
    Warn,
    Info,
    Debug,
    /// Also a line per request and per mirror record (as QEMU's trace
    /// events).
    Trace,
}

impl From<LogLevelArg> for log::LevelFilter {
    fn from(l: LogLevelArg) -> Self {
        match l {
            LogLevelArg::Error => log::LevelFilter::Error,
            LogLevelArg::Warn => log::LevelFilter::Warn,
            LogLevelArg::Info => log::LevelFilter::Info,
            LogLevelArg::Debug => log::LevelFilter::Debug,
            LogLevelArg::Trace => log::LevelFilter::Trace,
        }
    }
}

/// vhost-user back-end for a virtio-iommu device (virtio ID 23) whose domains
/// are iommufd I/O address spaces.
///
/// QEMU: -chardev socket,id=c0,path=SOCKET -device vhost-user-iommu,chardev=c0
#[derive(Debug, Parser)]
#[command(version, long_version = capabilities::LONG_VERSION, about, long_about = None)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    /// Without a command, the daemon runs (the flags below).
    #[command(subcommand)]
    command: Option<Subcommand>,

    /// Listen for the front-end on this Unix socket path. Without it and
    /// --fd, the socket systemd's socket activation passed (LISTEN_FDS=1).
    #[arg(long, value_name = "PATH", conflicts_with = "fd")]
    socket_path: Option<PathBuf>,

    /// Use this inherited, listening Unix socket instead of --socket-path.
    #[arg(long, value_name = "N")]
    fd: Option<RawFd>,

    /// The mode of the sockets the daemon binds (--socket-path,
    /// --mirror-socket, --control-socket), in octal, e.g. 0660; set before
    /// they appear.
    #[arg(long, value_name = "OCTAL", value_parser = socket_mode)]
    socket_mode: Option<u32>,

    /// The group of the sockets the daemon binds: a name or a number (e.g.
    /// the group QEMU runs as, with --socket-mode 0660).
    #[arg(long, value_name = "GROUP", value_parser = socket_group)]
    socket_group: Option<u32>,

    /// Print the back-end's capabilities as JSON and exit.
    #[arg(long)]
    print_capabilities: bool,

    /// Print this manual page (roff, man(7)) and exit.
    #[arg(long, hide = true)]
    print_man_page: bool,

    /// Endpoint IDs (PCI requester IDs) the device manages: IDs and inclusive
    /// ranges, comma-separated [default: 0-0xffff].
    #[arg(long, value_name = "LIST")]
    endpoints: Option<String>,

    /// Page sizes the device supports, as a bit mask [default: 0xfffffffffffff000].
    #[arg(long, value_name = "MASK")]
    page_size_mask: Option<String>,

    /// Inclusive IOVA range domains can map [default: 0-0xffffffffffff].
    #[arg(long, value_name = "A-B")]
    input_range: Option<String>,

    /// Inclusive range of domain IDs [default: 0-0xffffffff].
    #[arg(long, value_name = "A-B")]
    domain_range: Option<String>,

    /// The MSI doorbell window PROBE reports: the machine's, which QEMU lets
    /// through untranslated (x86: 0xfee00000-0xfeefffff; arm64 `virt`:
    /// 0x8090000-0x809ffff with GICv3's ITS, 0x8020000-0x8020fff with
    /// GICv2m). A QEMU whose machine names another is refused at its mirror
    /// HELLO [default: 0xfee00000-0xfeefffff].
    #[arg(long, value_name = "A-B")]
    msi_window: Option<String>,

    /// Bytes of PROBE properties per endpoint: a multiple of 4 from 24 to
    /// 4096 [default: 512].
    #[arg(long, value_name = "BYTES")]
    probe_size: Option<u32>,

    /// Whether endpoints not attached to a domain bypass translation at
    /// power-on (the config space's `bypass`; firmware DMA needs it). On by
    /// default, as QEMU's own virtio-iommu.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    bypass: bool,

    /// How domains are implemented.
    #[arg(long, value_enum, default_value_t = ModeArg::Emulated)]
    mode: ModeArg,

    /// Listen for QEMU's translation mirror on this Unix socket
    /// (docs/mirror-protocol.md).
    #[arg(long, value_name = "PATH")]
    mirror_socket: Option<PathBuf>,

    /// Pass-through endpoint EP is this VFIO cdev device (--mode iommufd;
    /// repeatable): EP=/dev/vfio/devices/vfioN, or EP=fd:N for a device file
    /// a launcher opened and left open for this process. Without --vfio,
    /// --mode iommufd takes the iommufd-backed VFIO devices QEMU forwards
    /// over --mirror-socket (`-device vfio-pci,iommufd=...` behind
    /// vhost-user-iommu-pci).
    #[arg(long, value_name = "EP=DEVICE")]
    vfio: Vec<String>,

    /// After each batch of requests, poll the request queue for up to this
    /// many microseconds before sleeping, with the guest's notifications
    /// suppressed (adaptive: the window grows while requests keep coming
    /// within it and shrinks when they stop; an idle guest costs nothing).
    /// 0 turns polling off.
    #[arg(long, value_name = "US", default_value_t = DEFAULT_POLL_US)]
    poll_us: u64,

    /// Ask the host scheduler for this slice (in microseconds, 100 to
    /// 100000) for the thread that serves the request queue: a slice
    /// shorter than the vCPUs' lets a request's wake-up preempt a busy vCPU
    /// at once on a host with no idle CPU (Linux >= 6.12 EEVDF; no privilege
    /// needed, no more CPU share). 0 keeps the kernel's default.
    #[arg(long, value_name = "US", default_value_t = DEFAULT_WORKER_SLICE_US)]
    worker_slice_us: u64,

    /// While it does not poll, serve the request queue on the CPU the
    /// guest's vCPU kicked it from, while that vCPU sleeps on its kick (a
    /// QEMU whose vhost-user-iommu-pci has kick-wait=on, the default): a
    /// hand-off on one CPU instead of waking another. "off" leaves the
    /// thread wherever the scheduler puts it.
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = on_off, action = clap::ArgAction::Set)]
    follow_vcpu: bool,

    /// Accept guest memory files that are not sealed against shrinking
    /// (QEMU's memory-backend-file on hugetlbfs or /dev/shm). By default only
    /// sealed files are (memory-backend-memfd, seal=on by default): a
    /// front-end that shrinks an unsealed file kills the daemon (SIGBUS).
    #[arg(long)]
    allow_unsealed_memory: bool,

    /// Journal the device's state to this file (create it if missing; best
    /// on a tmpfs, private to this daemon, about 32 MiB at most), and
    /// recover it at start: a daemon restarted under a running guest (QEMU
    /// with `reconnect-ms=` on both chardevs) comes back with every
    /// attachment and mapping the guest made (docs/state-journal.md).
    #[arg(long, value_name = "PATH")]
    state_file: Option<PathBuf>,

    /// What happens to a system call outside the daemon's own list, once
    /// it has bound its sockets and opened its files: "kill" the process
    /// (SIGSYS), "log" it and let it through (the kernel's audit log,
    /// `audit: type=1326`), or "none" (no filter). no_new_privs is set in
    /// every case.
    #[arg(long, value_enum, default_value_t = SeccompArg::Kill)]
    seccomp: SeccompArg,

    /// Whether the modelled kernel has transparent huge pages (emulated
    /// mode): with "on" the IOVAs the model allocates are aligned up to 2 MiB,
    /// with "off" up to a page, as Linux's iommufd built without
    /// CONFIG_TRANSPARENT_HUGEPAGE does. --mode iommufd takes the host's
    /// (/sys/kernel/mm/transparent_hugepage) [default: on].
    #[arg(long, value_name = "on|off", value_parser = on_off)]
    model_thp: Option<bool>,

    /// The iommufd device node (--mode iommufd).
    #[arg(long, value_name = "PATH", default_value = KernelIommufd::DEFAULT_PATH)]
    iommufd: PathBuf,

    /// What the daemon logs (on stderr): "trace" adds a line per request
    /// and per mirror record, as QEMU's trace events. RUST_LOG, when set,
    /// is applied over it: a bare level there replaces it, module
    /// directives (e.g. RUST_LOG=virtio_iommu=trace) refine it.
    #[arg(long, value_enum, default_value_t = LogLevelArg::Info)]
    log_level: LogLevelArg,

    /// Serve the control socket at this path (JSON lines, like QMP:
    /// status, endpoints, domains, mappings, translate, counters, latency
    /// histograms, faults, events; docs/control-socket.md), with the
    /// --socket-mode and --socket-group of the other sockets. `ctl` talks
    /// to it.
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,

    /// Serve the shared translation table to vhost-user back-ends that
    /// translate through it themselves (docs/mirror-protocol.md §16), on
    /// this Unix socket, with the --socket-mode and --socket-group of the
    /// other sockets. Needs --mirror-socket (the table is the mirror's).
    #[arg(long, value_name = "PATH")]
    table_socket: Option<PathBuf>,

    /// The longest a guest UNMAP waits for a table reader's section to end;
    /// a reader still in it then is revoked (§16.3).
    #[arg(long, value_name = "MS", default_value_t = 200)]
    table_reader_grace_ms: u64,
}

/// Commands besides running the daemon.
#[derive(Debug, clap::Subcommand)]
enum Subcommand {
    /// Ask a running daemon through its --control-socket and print the
    /// answer for people (tables) or scripts (--json).
    Ctl(control::ctl::CtlArgs),
}

/// The logger: `level`, then RUST_LOG's directives over it (a bare level
/// replaces `level`; `module=level` directives add to it), and
/// RUST_LOG_STYLE for colours, as env_logger reads them.
fn init_logging(level: log::LevelFilter) {
    let mut b = env_logger::Builder::new();
    b.filter_level(level);
    if let Ok(filters) = std::env::var("RUST_LOG") {
        if !filters.trim().is_empty() {
            b.parse_filters(&filters);
        }
    }
    if let Ok(style) = std::env::var("RUST_LOG_STYLE") {
        b.parse_write_style(&style);
    }
    b.init();
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    if let Some(Subcommand::Ctl(args)) = cli.command.take() {
        return match control::ctl::run(&args, &mut std::io::stdout().lock()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vhost-user-iommu ctl: {e}");
                ExitCode::FAILURE
            }
        };
    }
    init_logging(cli.log_level.into());
    if cli.print_capabilities {
        print!("{}", capabilities::capabilities_json());
        return ExitCode::SUCCESS;
    }
    if cli.print_man_page {
        let man = clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).section("8");
        return match man.render(&mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vhost-user-iommu: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-user-iommu: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--socket-mode`: octal permission bits.
fn socket_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| m & !0o777 == 0)
        .ok_or_else(|| format!("{s:?}: want octal permission bits, e.g. 0660"))
}

/// `--socket-group`: a group name (group(5)) or number.
fn socket_group(s: &str) -> Result<u32, String> {
    if let Ok(gid) = s.parse::<u32>() {
        return Ok(gid);
    }
    let name = std::ffi::CString::new(s).map_err(|_| format!("{s:?}: not a group name"))?;
    // SAFETY: getgrnam reads a NUL-terminated name and returns a pointer to
    // static storage (or null), read at once, before any other call could
    // reuse it (the command line is parsed on the main thread, alone).
    let gr = unsafe { libc::getgrnam(name.as_ptr()) };
    if gr.is_null() {
        return Err(format!("{s:?}: no such group"));
    }
    // SAFETY: non-null: a valid `struct group`.
    Ok(unsafe { (*gr).gr_gid })
}

/// `on` or `off`.
fn on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{s:?}: want on or off")),
    }
}

/// `--worker-slice-us`: 0 for the kernel's default, else a slice the
/// kernel accepts.
fn worker_slice(us: u64) -> Result<Option<Duration>, String> {
    let slice = Duration::from_micros(us);
    match us {
        0 => Ok(None),
        _ if (sched::SLICE_MIN..=sched::SLICE_MAX).contains(&slice) => Ok(Some(slice)),
        _ => Err(format!(
            "--worker-slice-us {us}: want 0 or {}..={}",
            sched::SLICE_MIN.as_micros(),
            sched::SLICE_MAX.as_micros()
        )),
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    // Before any thread starts: it edits the environment.
    let systemd_socket = SocketSource::from_systemd()?;
    let config = RawConfig {
        endpoints: cli.endpoints,
        page_size_mask: cli.page_size_mask,
        input_range: cli.input_range,
        domain_range: cli.domain_range,
        msi_window: cli.msi_window,
        probe_size: cli.probe_size,
        bypass: Some(cli.bypass),
        mode: cli.mode.into(),
        vfio: cli.vfio,
        model_thp: cli.model_thp,
    }
    .check()?;
    let vfio_from_qemu = config.vfio_from_front_end();
    if vfio_from_qemu && cli.mirror_socket.is_none() {
        return Err(config::CliError::NoVfio.into());
    }
    let device = match config.mode {
        config::Mode::Emulated => emulated::device(&config)?,
        config::Mode::Iommufd if vfio_from_qemu => passthrough::device_for_front_end(&config)?,
        config::Mode::Iommufd => passthrough::device(&config, &cli.iommufd)?,
    };
    let device_config = *device.device_config();
    let source = match (cli.socket_path, cli.fd, systemd_socket) {
        (Some(p), None, _) => SocketSource::Path(p),
        (None, Some(fd), _) => SocketSource::Fd(fd),
        (None, None, Some(s)) => s,
        _ => return Err(config::CliError::NoSocket.into()),
    };
    let access = Access {
        mode: cli.socket_mode,
        group: cli.socket_group,
    };
    // Before the vhost-user socket: a launcher that waits for that one
    // finds this one listening too.
    let control_listener = match &cli.control_socket {
        Some(path) => Some(
            vhost_user_iommu::listen::listen_at(path, access).map_err(|e| {
                format!("cannot listen on --control-socket {}: {e}", path.display())
            })?,
        ),
        None => None,
    };
    if cli.table_socket.is_some() && cli.mirror_socket.is_none() {
        return Err("--table-socket needs --mirror-socket: the table is the mirror's".into());
    }
    let table_listener = match &cli.table_socket {
        Some(path) => Some(
            vhost_user_iommu::listen::listen_at(path, access)
                .map_err(|e| format!("cannot listen on --table-socket {}: {e}", path.display()))?,
        ),
        None => None,
    };
    let server = Server::bind_with(&source, access)?;
    server.stop_on_signals()?;

    let hooks = Arc::new(BackendHooks::default());
    let (mirror_server, mirror) = match &cli.mirror_socket {
        Some(path) => {
            let memory = MirrorMemory::for_device(&device_config)?;
            memory
                .readers
                .set_grace(Duration::from_millis(cli.table_reader_grace_ms));
            let hello = Hello::new(config.device.bypass, vfio_from_qemu)
                .with_msi_window(config.device.msi_window);
            let s = MirrorServer::start_with_access(
                path,
                access,
                hello,
                hooks.clone(),
                Arc::new(memory),
            )
            .map_err(|e| format!("cannot listen on --mirror-socket {}: {e}", path.display()))?;
            let h = s.handle();
            (Some(s), h)
        }
        None => (None, MirrorHandle::disconnected()),
    };
    let memory_files = match cli.allow_unsealed_memory {
        true => MemoryFiles::AllowUnsealed,
        false => MemoryFiles::SealedOnly,
    };
    let telemetry = Arc::new(Telemetry::new(control_listener.is_some()));
    let mut backend = IommuBackend::new(device, mirror)
        .with_telemetry(telemetry)
        .with_polling(Duration::from_micros(cli.poll_us))
        .with_worker_slice(worker_slice(cli.worker_slice_us)?)
        .with_vcpu_following(cli.follow_vcpu)
        .with_memory_files(memory_files);
    if let Some(path) = &cli.state_file {
        let (journal, found) = Journal::open(path)?;
        let recovered = found.unwrap_or_else(|e| {
            log::error!(
                "state file {}: {e}: nothing recovered, starting over",
                path.display()
            );
            None
        });
        backend = backend.with_journal(journal, recovered);
    }
    let _ = hooks.0.set(backend.clone());
    // Every socket is bound and every file opened: from here on the daemon
    // makes only the calls on its list (src/confine.rs).
    confine::confine(cli.seccomp.into())?;
    log::info!(
        "virtio-iommu ({:?} mode): {} endpoints, page size mask {:#x}, input range {:#x}-{:#x}, \
         transparent huge pages {:?}",
        config.mode,
        config.endpoints.len(),
        device_config.page_size_mask,
        device_config.input_range.0,
        device_config.input_range.1,
        config.thp
    );
    let control = match control_listener {
        Some((listener, file)) => Some(ControlServer::start(
            listener,
            Some(file),
            backend.clone(),
            control::server::DaemonInfo {
                mode: match config.mode {
                    config::Mode::Emulated => "emulated",
                    config::Mode::Iommufd => "iommufd",
                },
            },
            control::server::Limits::default(),
        )?),
        None => None,
    };
    let table = match table_listener {
        Some((listener, file)) => Some(vhost_user_iommu::table_socket::TableServer::start(
            listener,
            Some(file),
            backend.clone(),
        )?),
        None => None,
    };
    server.run(&backend)?;
    drop(table);
    drop(control);
    drop(mirror_server);
    Ok(())
}
