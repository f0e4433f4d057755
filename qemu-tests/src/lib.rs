// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Real QEMU, real Linux guest: the harness of the guest tests.
//!
//! A test boots the Debian guest kernel under TCG with an initramfs holding
//! the guest-side scripts of `qemu-tests/guest/`, behind one of two
//! vIOMMUs, and reads what the guest printed:
//! - [`Viommu::Ours`]: the project's `vhost-user-iommu` device (the patched
//!   QEMU of `scripts/qemu/`) served by the daemon, run in this process so the
//!   test can read its counters;
//! - [`Viommu::Qemu`]: QEMU's own in-process `virtio-iommu-pci`, the
//!   reference every test also runs against;
//! - [`Viommu::Intel`]: the pass-through test bed: QEMU's intel-iommu under
//!   a kernel built with iommufd, and the daemon inside that guest;
//! - [`Viommu::None`]: no vIOMMU at all (the benchmark's baseline).
//!
//! The tier needs QEMU built and a kernel fetched, so the tests run
//! only when `VUI_QEMU_TESTS=1` (set by `scripts/qemu-tests.sh`, which also
//! builds QEMU and fetches the kernel); otherwise each says it skipped and why.
//!
//! A guest is x86 (q35) by default; [`Arch::Arm64`] boots the arm64 `virt`
//! machine instead (`qemu-system-aarch64`, Debian's arm64 kernel, a busybox
//! initramfs without the x86 guest tools): [`arm64_skip_reason`].

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use test_frontend::daemon::DaemonProcess;
use vhost_user_iommu::config::RawConfig;
use vhost_user_iommu::emulated;
use vhost_user_iommu::mirror::{Hello, MirrorMemory, MirrorServer};
use vhost_user_iommu::serve::{ServeError, Server, SocketSource, Stopper};
use vhost_user_iommu::vhu_iommu::{BackendHooks, IommuBackend, DEFAULT_POLL_US};

/// Which vIOMMU the guest gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Viommu {
    Ours,
    Qemu,
    /// QEMU's intel-iommu (interrupt remapping, caching mode): the host
    /// IOMMU of the pass-through test bed, where the guest kernel runs
    /// iommufd and our daemon runs inside the guest.
    Intel,
    /// No vIOMMU: the disk's DMA goes straight to guest memory.
    None,
}

pub mod side_by_side;

/// The guest's architecture, and with it QEMU's machine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Arch {
    /// q35, `qemu-system-x86_64`, Debian's amd64 kernel.
    #[default]
    X86_64,
    /// `virt` with GICv3 (its ITS the MSI doorbell), `-cpu max`,
    /// `qemu-system-aarch64`, Debian's arm64 kernel.
    Arm64,
}

impl Arch {
    /// Debian's name (`fetch-kernel.sh --arch`, `run-guest.sh --arch`).
    pub fn debian(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    /// `build-qemu.sh --target`.
    pub fn qemu_target(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Arm64 => "aarch64",
        }
    }

    /// The machine's MSI doorbell, which QEMU lets through untranslated
    /// and the daemon's PROBE must report (its `--msi-window`): the APIC
    /// range on x86, the GICv3 ITS `GITS_TRANSLATER` frame on `virt`.
    pub fn msi_window(self) -> (u64, u64) {
        match self {
            Arch::X86_64 => (0xfee0_0000, 0xfeef_ffff),
            Arch::Arm64 => (0x0809_0000, 0x0809_ffff),
        }
    }
}

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Why the tier cannot run, if it cannot.
pub fn skip_reason() -> Option<String> {
    if let Some(why) = tier_off() {
        return Some(why);
    }
    if qemu().is_none() {
        return Some("the patched QEMU is not built (scripts/qemu/build-qemu.sh)".into());
    }
    if kernel_dir().is_none() {
        return Some("the guest kernel is not fetched (scripts/guest/fetch-kernel.sh)".into());
    }
    None
}

/// Why the tier is off, if it is: it runs from scripts/qemu-tests.sh.
fn tier_off() -> Option<String> {
    (std::env::var("VUI_QEMU_TESTS").as_deref() != Ok("1"))
        .then(|| "guest tests run from scripts/qemu-tests.sh (VUI_QEMU_TESTS=1)".into())
}

/// Skip the calling test, saying why, if the tier cannot run.
#[macro_export]
macro_rules! skip_unless_ready {
    () => {
        if let Some(why) = $crate::skip_reason() {
            eprintln!("skipped: {why}");
            return;
        }
    };
}

/// Why the arm64 guests cannot run, if they cannot.
pub fn arm64_skip_reason() -> Option<String> {
    if let Some(why) = tier_off() {
        return Some(why);
    }
    if std::env::var("VUI_ARM64").as_deref() == Ok("0") {
        return Some("VUI_ARM64=0".into());
    }
    if qemu_for(Arch::Arm64).is_none() {
        return Some(
            "the patched qemu-system-aarch64 is not built \
             (scripts/qemu/build-qemu.sh --target aarch64)"
                .into(),
        );
    }
    if kernel_dir_for(Arch::Arm64).is_none() {
        return Some(
            "the arm64 guest kernel is not fetched (scripts/guest/fetch-kernel.sh --arch arm64)"
                .into(),
        );
    }
    None
}

fn script_output(script: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(repo().join(script))
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or("")
            .to_string()
    })
}

/// The path a setup script prints with `--print-path` (what it built or
/// fetched), asked once per test run; `None` if it has nothing yet.
fn printed_path(cell: &OnceLock<Option<PathBuf>>, script: &str) -> Option<PathBuf> {
    cell.get_or_init(|| script_output(script, &["--print-path"]).map(PathBuf::from))
        .clone()
}

/// The patched QEMU binary.
pub fn qemu() -> Option<PathBuf> {
    qemu_for(Arch::X86_64)
}

/// The patched QEMU binary for `arch`'s guests.
pub fn qemu_for(arch: Arch) -> Option<PathBuf> {
    static P: [OnceLock<Option<PathBuf>>; 2] = [OnceLock::new(), OnceLock::new()];
    P[arch as usize]
        .get_or_init(|| {
            script_output(
                "scripts/qemu/build-qemu.sh",
                &["--target", arch.qemu_target(), "--print-path"],
            )
            .map(PathBuf::from)
        })
        .clone()
}

/// Debian's DPDK `dpdk-testpmd` (a wrapper running it from its unpacked
/// packages), if fetched: the vhost-user net back-end of the DPDK test.
pub fn testpmd() -> Option<PathBuf> {
    static P: OnceLock<Option<PathBuf>> = OnceLock::new();
    printed_path(&P, "scripts/dpdk/fetch-testpmd.sh")
}

/// The cached iommufd guest kernel (`bzImage`), if built.
pub fn iommufd_kernel() -> Option<PathBuf> {
    static P: OnceLock<Option<PathBuf>> = OnceLock::new();
    printed_path(&P, "scripts/kernel/build-iommufd-kernel.sh")
}

/// The cached minimal kernel (`bzImage`) of the nested test bed's
/// second-level guest, if built: it has iommufd and VFIO cdev too, and no
/// transparent huge pages.
pub fn minimal_kernel() -> Option<PathBuf> {
    static P: OnceLock<Option<PathBuf>> = OnceLock::new();
    printed_path(&P, "scripts/kernel/build-minimal-kernel.sh")
}

/// Debian's stock QEMU, which the pass-through test bed runs on (it needs
/// only intel-iommu and edu, not the project's device).
pub fn stock_qemu() -> Option<PathBuf> {
    static P: OnceLock<Option<PathBuf>> = OnceLock::new();
    printed_path(&P, "scripts/qemu/install-stock-qemu.sh")
}

/// Why the pass-through test bed cannot run, if it cannot.
pub fn passthrough_skip_reason() -> Option<String> {
    if let Some(why) = tier_off() {
        return Some(why);
    }
    if stock_qemu().is_none() {
        return Some(
            "Debian's qemu-system-x86 is not installed (scripts/qemu/install-stock-qemu.sh)".into(),
        );
    }
    if iommufd_kernel().is_none() {
        return Some(
            "the iommufd guest kernel is not built (scripts/kernel/build-iommufd-kernel.sh, \
             ~5 min; scripts/qemu-tests.sh builds it)"
                .into(),
        );
    }
    None
}

/// The cached guest kernel directory.
pub fn kernel_dir() -> Option<PathBuf> {
    kernel_dir_for(Arch::X86_64)
}

/// The cached guest kernel directory of `arch`.
pub fn kernel_dir_for(arch: Arch) -> Option<PathBuf> {
    static P: [OnceLock<Option<PathBuf>>; 2] = [OnceLock::new(), OnceLock::new()];
    P[arch as usize]
        .get_or_init(|| {
            script_output(
                "scripts/guest/fetch-kernel.sh",
                &["--arch", arch.debian(), "--print-path"],
            )
            .map(PathBuf::from)
        })
        .clone()
}

/// This process's scratch root, `target/qemu-tests/run-<pid>`. Disk images
/// are tens of MiB, so the roots of runs whose process is gone are removed
/// when a new run starts (a run that is still going keeps its own).
fn run_dir() -> &'static Path {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let root = repo().join("target/qemu-tests");
        if let Ok(entries) = std::fs::read_dir(&root) {
            for e in entries.flatten() {
                let name = e.file_name();
                let pid = name.to_str().and_then(|n| n.strip_prefix("run-"));
                if pid.is_some_and(|p| !Path::new("/proc").join(p).exists()) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let d = root.join(format!("run-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("create target/qemu-tests/run-<pid>");
        d
    })
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = run_dir().join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// The initramfs with every guest script and program, built once per test
/// run: with the Debian kernel's modules, or without any (for the iommufd
/// kernel, which has everything built in).
pub fn initramfs(modules: bool) -> PathBuf {
    static WITH: OnceLock<PathBuf> = OnceLock::new();
    static WITHOUT: OnceLock<PathBuf> = OnceLock::new();
    let (cell, name) = if modules {
        (&WITH, "initrd.gz")
    } else {
        (&WITHOUT, "initrd-no-modules.gz")
    };
    cell.get_or_init(|| {
        let mut options: Vec<PathBuf> = Vec::new();
        if !modules {
            options.push("--no-modules".into());
        }
        for tool in guest_tools() {
            options.extend(["--add".into(), tool]);
        }
        build_initramfs(name, &options)
    })
    .clone()
}

/// The arm64 initramfs: an arm64 busybox, the guest scripts and the arm64
/// kernel's modules (no guest tools: they are built for x86), built once
/// per test run.
pub fn initramfs_arm64() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| build_initramfs("initrd-arm64.gz", &["--arch".into(), "arm64".into()]))
        .clone()
}

/// An initramfs with the guest scripts and the Debian kernel's modules,
/// plus `options` of `scripts/guest/build-initramfs.sh` (e.g. `--with-fio`),
/// as `name` in this run's scratch root; built on every call.
pub fn initramfs_with(name: &str, options: &[&str]) -> PathBuf {
    let options: Vec<PathBuf> = options.iter().map(PathBuf::from).collect();
    build_initramfs(name, &options)
}

fn build_initramfs(name: &str, options: &[PathBuf]) -> PathBuf {
    let out = run_dir().join(name);
    let mut cmd = Command::new(repo().join("scripts/guest/build-initramfs.sh"));
    cmd.arg("--out").arg(&out).args(options);
    for e in std::fs::read_dir(repo().join("qemu-tests/guest")).expect("guest scripts") {
        cmd.arg("--add").arg(e.expect("dir entry").path());
    }
    let st = cmd.status().expect("run build-initramfs.sh");
    assert!(st.success(), "build-initramfs.sh failed");
    out
}

/// The static guest programs (`guest-tools`), built for the guest: a
/// static-pie glibc binary runs in the busybox initramfs without libraries.
pub fn guest_tools() -> Vec<PathBuf> {
    const TARGET: &str = "x86_64-unknown-linux-gnu";
    static BUILT: OnceLock<()> = OnceLock::new();
    let target_dir = repo().join("target/guest");
    BUILT.get_or_init(|| build_guest_tools(TARGET, &target_dir));
    let bin = target_dir.join(TARGET).join("release");
    [
        "edu-dma",
        "passthrough",
        "iopt-conformance",
        "vhost-user-iommu",
    ]
    .map(|b| bin.join(b))
    .to_vec()
}

fn build_guest_tools(target: &str, target_dir: &Path) {
    // The daemon as it ships; then the conformance suite's runner, which
    // needs iopt's `conformance` feature (off in the daemon's build).
    let builds: [&[&str]; 2] = [
        &["-p", "guest-tools", "-p", "vhost-user-iommu", "--bins"],
        &[
            "-p",
            "iopt",
            "--bin",
            "iopt-conformance",
            "--features",
            "conformance",
        ],
    ];
    for packages in builds {
        let st = Command::new(env!("CARGO"))
            .args(["build", "--release", "--locked"])
            .args(packages)
            .args(["--target", target])
            .arg("--target-dir")
            .arg(target_dir)
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .status()
            .expect("cargo build guest-tools");
        assert!(st.success(), "building guest-tools ({packages:?}) failed");
    }
}

/// `vui-table-net` (the `table-net` package), the vhost-user net back-end
/// that reads the daemon's shared table itself; built for the host on first
/// use.
pub fn table_net_bin() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let target_dir = repo().join("target/table-net");
            let st = Command::new(env!("CARGO"))
                .args(["build", "--release", "--locked", "-p", "table-net"])
                .arg("--target-dir")
                .arg(&target_dir)
                .status()
                .expect("cargo build table-net");
            assert!(st.success(), "building table-net failed");
            target_dir.join("release/vui-table-net")
        })
        .clone()
}

/// The daemon, in this process, with its mirror.
pub struct Daemon {
    pub backend: IommuBackend,
    pub socket: PathBuf,
    pub mirror: PathBuf,
    stopper: Stopper,
    thread: Option<JoinHandle<Result<(), ServeError>>>,
    _mirror_server: MirrorServer,
}

/// The daemon binary the guest tools' build made, for tests that run it
/// as a process of its own (to kill and restart it).
pub fn daemon_bin() -> PathBuf {
    guest_tools()
        .into_iter()
        .find(|p| p.ends_with("vhost-user-iommu"))
        .expect("the daemon binary")
}

/// Daemon number `n` as a process of its own, on the state file
/// `dir/state` (docs/state-journal.md), listening on `dir/socket` and the
/// mirror socket `dir/mirror`, its log in `dir/daemon-<n>.log`; killed
/// when dropped. For the tests that kill it and start another on the same
/// file under a running guest.
pub fn state_daemon(dir: &Path, n: u32, socket: &str, mirror: &str) -> DaemonProcess {
    DaemonProcess::builder(daemon_bin(), dir.join(socket))
        .mirror(dir.join(mirror))
        .arg("--state-file")
        .arg(dir.join("state"))
        .rust_log("info")
        .log_file(dir.join(format!("daemon-{n}.log")))
        .spawn()
}

/// The lines of a guest's output in which its kernel reported an I/O
/// error or a virtio-iommu error: a guest that "did not notice" a daemon
/// restart or a reset has none.
pub fn guest_errors(out: &str) -> Vec<&str> {
    const SIGNS: [&str; 4] = ["I/O error", "viommu", "Buffer I/O", "blk_update_request"];
    out.lines()
        .filter(|l| {
            SIGNS.iter().any(|s| l.contains(s)) && (l.contains("error") || l.contains("fail"))
        })
        .collect()
}

/// The daemon's `--poll-us`: `VUI_POLL_US` from the environment (to
/// compare polling windows in the guest benchmark), else the daemon's
/// default.
pub fn poll_us() -> u64 {
    std::env::var("VUI_POLL_US")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_POLL_US)
}

impl Daemon {
    /// Start serving in `dir` with the default configuration.
    pub fn start(dir: &Path) -> Self {
        Self::start_for(dir, Arch::X86_64)
    }

    /// Start serving in `dir` a guest of `arch`: its machine's MSI window
    /// (`--msi-window`), announced on the mirror, where QEMU's is checked
    /// against it.
    pub fn start_for(dir: &Path, arch: Arch) -> Self {
        let (start, last) = arch.msi_window();
        Self::start_with(dir, Some((start, last)))
    }

    /// Start serving in `dir`, its PROBE reporting `msi_window` (`None`:
    /// the daemon's default) — a wrong one for the test of the refusal.
    pub fn start_with(dir: &Path, msi_window: Option<(u64, u64)>) -> Self {
        let config = RawConfig {
            msi_window: msi_window.map(|(a, b)| format!("{a:#x}-{b:#x}")),
            ..RawConfig::default()
        };
        Self::start_config(dir, config)
    }

    /// Start serving in `dir` with `config` (e.g. boot bypass off).
    pub fn start_config(dir: &Path, config: RawConfig) -> Self {
        let config = config.check().expect("daemon config");
        let device = emulated::device(&config).expect("device");
        let socket = dir.join("viommu.sock");
        let mirror = dir.join("viommu-mirror.sock");
        // sun_path holds 108 bytes with its NUL.
        assert!(
            mirror.as_os_str().len() < 108,
            "socket path too long for AF_UNIX ({}): check out the repository at a shorter path",
            mirror.display()
        );
        let hooks = Arc::new(BackendHooks::default());
        let memory = MirrorMemory::for_device(device.device_config()).expect("shared table");
        let hello =
            Hello::new(config.device.bypass, false).with_msi_window(config.device.msi_window);
        let mirror_server =
            MirrorServer::start_with(&mirror, hello, hooks.clone(), Arc::new(memory))
                .expect("mirror socket");
        let backend = IommuBackend::new(device, mirror_server.handle())
            .with_polling(Duration::from_micros(poll_us()));
        let _ = hooks.0.set(backend.clone());
        let server = Server::bind(&SocketSource::Path(socket.clone())).expect("vhost-user socket");
        let stopper = server.stopper();
        let b = backend.clone();
        let thread = Some(std::thread::spawn(move || server.run(&b)));
        Self {
            backend,
            socket,
            mirror,
            stopper,
            thread,
            _mirror_server: mirror_server,
        }
    }

    /// The device model's counters.
    pub fn stats(&self) -> virtio_iommu::Stats {
        self.backend.stats().0
    }

    /// The queue counters: kicks, batches, batches found by polling, time
    /// spent polling, batches that waited for QEMU's ACK.
    pub fn queue_stats(&self) -> vhost_user_iommu::vhu_iommu::QueueStats {
        self.backend.stats().1
    }
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("socket", &self.socket)
            .field("mirror", &self.mirror)
            .finish_non_exhaustive()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stopper.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a guest run produced.
#[derive(Debug)]
pub struct Run {
    pub status: i32,
    pub output: String,
    pub took: Duration,
}

impl Run {
    /// Lines starting with `prefix`.
    pub fn lines(&self, prefix: &str) -> Vec<&str> {
        self.output
            .lines()
            .filter_map(|l| l.find(prefix).map(|i| &l[i..]))
            .collect()
    }

    /// Panic with the guest output unless it passed.
    #[track_caller]
    pub fn assert_passed(&self, what: &str) {
        assert!(
            self.status == 0,
            "{what}: guest exited {} after {:?}\n{}",
            self.status,
            self.took,
            self.output
        );
    }
}

/// Where QEMU finds the daemon.
#[derive(Clone, Copy, Debug)]
pub struct Sockets<'a> {
    /// The vhost-user socket.
    pub socket: &'a Path,
    /// The mirror socket.
    pub mirror: &'a Path,
    /// QEMU reconnects the vhost-user socket too (`reconnect-ms=`), so a
    /// daemon can be restarted under the guest.
    pub reconnect: bool,
}

/// A guest to boot.
#[derive(Clone, Debug)]
pub struct Guest {
    pub viommu: Viommu,
    /// x86 (q35) or arm64 (`virt`).
    pub arch: Arch,
    pub test: &'static str,
    /// Extra kernel parameters.
    pub append: String,
    /// A raw disk image behind the vIOMMU (virtio-blk, iommu_platform=on).
    pub disk: Option<PathBuf>,
    /// How many of QEMU's `edu` DMA test devices sit behind the vIOMMU.
    pub edu: u8,
    /// The kernel to boot instead of Debian's (then the initramfs carries
    /// no modules).
    pub kernel: Option<PathBuf>,
    /// The QEMU binary instead of the project's patched build.
    pub qemu: Option<PathBuf>,
    /// The initramfs instead of [`initramfs`]'s (e.g. one from
    /// [`initramfs_with`]).
    pub initrd: Option<PathBuf>,
    /// More QEMU arguments, after the harness's own (a later `-smp` wins).
    pub qemu_args: Vec<String>,
    /// A reset boots the machine again (`run-guest.sh --reboot`: no
    /// `-no-reboot`) rather than ending QEMU; off by default.
    pub reboot: bool,
    pub timeout: Duration,
}

impl Guest {
    pub fn new(viommu: Viommu, test: &'static str) -> Self {
        Self {
            viommu,
            arch: Arch::X86_64,
            test,
            append: String::new(),
            disk: None,
            edu: 0,
            kernel: None,
            qemu: None,
            initrd: None,
            qemu_args: Vec::new(),
            reboot: false,
            timeout: Duration::from_secs(600),
        }
    }

    /// Boot it (with `daemon` for [`Viommu::Ours`]) and wait for the end.
    pub fn run(&self, daemon: Option<&Daemon>) -> Run {
        let start = Instant::now();
        let out = self
            .command(daemon)
            .stdin(Stdio::null())
            .output()
            .expect("run-guest.sh");
        let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
        output.push_str(&String::from_utf8_lossy(&out.stderr));
        Run {
            status: out.status.code().unwrap_or(-1),
            output,
            took: start.elapsed(),
        }
    }

    /// The `scripts/guest/run-guest.sh` command that boots it, for a caller
    /// that drives it while it runs (a monitor, a migration).
    pub fn command(&self, daemon: Option<&Daemon>) -> Command {
        self.command_with(daemon.map(|d| Sockets {
            socket: &d.socket,
            mirror: &d.mirror,
            reconnect: false,
        }))
    }

    /// [`Self::command`] for a daemon that is not in this process.
    pub fn command_with(&self, daemon: Option<Sockets<'_>>) -> Command {
        const MEM: &str = "1G";
        let mut args: Vec<String> = Vec::new();
        match self.viommu {
            Viommu::Ours => {
                let d = daemon.expect("our vIOMMU needs the daemon");
                let vhost_user = match d.reconnect {
                    true => ",reconnect-ms=200",
                    false => "",
                };
                args.extend(
                    [
                        "-object",
                        &format!("memory-backend-memfd,id=mem,size={MEM},share=on"),
                        "-numa",
                        "node,memdev=mem",
                        "-chardev",
                        &format!("socket,id=c0,path={}{vhost_user}", d.socket.display()),
                        "-chardev",
                        &format!("socket,id=m0,path={},reconnect-ms=200", d.mirror.display()),
                        "-device",
                        "vhost-user-iommu,chardev=c0,mirror=m0",
                    ]
                    .map(String::from),
                );
            }
            Viommu::Qemu => args.extend(["-device", "virtio-iommu-pci"].map(String::from)),
            Viommu::Intel => args
                .extend(["-device", "intel-iommu,intremap=on,caching-mode=on"].map(String::from)),
            Viommu::None => {}
        }
        if let Some(disk) = &self.disk {
            args.extend(
                [
                    "-drive",
                    &format!(
                        "if=none,id=d0,file={},format=raw,cache=none",
                        disk.display()
                    ),
                    "-device",
                    "virtio-blk-pci,drive=d0,iommu_platform=on,disable-legacy=on",
                ]
                .map(String::from),
            );
        }
        for _ in 0..self.edu {
            args.extend(["-device", "edu"].map(String::from));
        }
        args.extend(self.qemu_args.iter().cloned());
        let mut cmd = Command::new(repo().join("scripts/guest/run-guest.sh"));
        if let Some(k) = &self.kernel {
            cmd.arg("--kernel").arg(k);
        }
        if let Some(q) = &self.qemu {
            cmd.arg("--qemu").arg(q);
        }
        if self.reboot {
            cmd.arg("--reboot");
        }
        cmd.arg("--arch").arg(self.arch.debian());
        let initrd = match (&self.initrd, self.arch) {
            (Some(i), _) => i.clone(),
            (None, Arch::Arm64) => initramfs_arm64(),
            (None, Arch::X86_64) => initramfs(self.kernel.is_none()),
        };
        cmd.arg("--initrd")
            .arg(initrd)
            .arg("--memory")
            .arg(MEM)
            .arg("--timeout")
            .arg(self.timeout.as_secs().to_string())
            .arg("--append")
            .arg(format!("vui.test={} {}", self.test, self.append))
            .arg("--")
            .args(&args);
        cmd
    }
}

/// A zeroed raw disk image of `mib` MiB.
pub fn disk_image(dir: &Path, mib: u64) -> PathBuf {
    let p = dir.join("disk.img");
    let f = std::fs::File::create(&p).expect("disk image");
    f.set_len(mib << 20).expect("disk size");
    p
}

/// A guest running while the test drives it, its serial output going to a
/// file; killed however the test ends — QEMU included: `run-guest.sh` runs
/// it under `timeout`, so the three are a process group of their own, and
/// the whole group goes.
#[derive(Debug)]
pub struct Running {
    pub child: std::process::Child,
    log: PathBuf,
}

impl Running {
    /// Spawn `cmd` (a [`Guest::command`]) with its output to `log`, as the
    /// leader of a new process group.
    pub fn start(mut cmd: Command, log: &Path) -> Self {
        use std::os::unix::process::CommandExt;
        let out = std::fs::File::create(log).expect("guest log");
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("guest log"))
            .stderr(out)
            .spawn()
            .expect("run-guest.sh");
        Self {
            child,
            log: log.to_owned(),
        }
    }

    /// The output so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until the output holds `needle`; panics (with the output) on
    /// timeout, a failure line, or QEMU's end.
    #[track_caller]
    pub fn wait_for(&mut self, needle: &str, limit: Duration) {
        let t0 = Instant::now();
        loop {
            let out = self.output();
            assert!(!out.contains("VUI-FAIL"), "the guest failed:\n{out}");
            if out.contains(needle) {
                return;
            }
            if let Some(status) = self.child.try_wait().expect("QEMU's status") {
                panic!("QEMU ended ({status}) before {needle:?}:\n{out}");
            }
            assert!(t0.elapsed() < limit, "no {needle:?} in {limit:?}:\n{out}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Running {
    /// SIGKILL the guest's whole process group: `run-guest.sh`, `timeout`
    /// and QEMU (a QEMU crash, as far as the daemon can tell).
    pub fn kill(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let group = self.child.id() as libc::pid_t;
            // SAFETY: kill(2) of the process group this struct's child leads
            // (made by `start`), which it has not reaped yet, so the id
            // cannot have been reused.
            unsafe { libc::kill(-group, libc::SIGKILL) };
        }
        let _ = self.child.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One human monitor command on the monitor socket at `socket`
/// (`-monitor unix:PATH,server=on,wait=off`); its answer.
pub fn hmp(socket: &Path, command: &str) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("monitor socket");
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    std::io::Write::write_all(&mut s, format!("{command}\n").as_bytes()).expect("monitor write");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(2) {
        match std::io::Read::read(&mut s, &mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) if !out.is_empty() => break,
            Err(_) => {}
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_errors_are_io_and_viommu_errors_only() {
        let out = "VUI-ROUND 1 ok\n\
                   [ 3.1] I/O error, dev vda, sector 8 op 0x0:(READ)\n\
                   [ 3.2] virtio_iommu virtio0: viommu: request failed\n\
                   [ 3.3] viommu: probe ok\n\
                   [ 3.4] error: unrelated";
        assert_eq!(
            guest_errors(out),
            [
                "[ 3.1] I/O error, dev vda, sector 8 op 0x0:(READ)",
                "[ 3.2] virtio_iommu virtio0: viommu: request failed"
            ]
        );
    }
}
