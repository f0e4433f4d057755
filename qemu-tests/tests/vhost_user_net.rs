// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! DPDK's vhost-user net back-end behind the vIOMMU (issue 19), as a user
//! runs it: Debian's `dpdk-testpmd` with the `net_vhost` PMD and
//! `iommu-support=1` answers the guest's ARP and ping (`icmpecho`), the
//! guest's `virtio-net-pci` (`iommu_platform=on`) on `-netdev vhost-user`
//! behind QEMU's virtio-iommu-pci and behind ours, side by side. testpmd
//! asks QEMU for every translation it uses (vhost-user IOTLB misses, which
//! QEMU answers through the vIOMMU's `translate()`), and QEMU tells it every
//! guest UNMAP (its IOMMU notifier waits for testpmd's reply).
//!
//! The figures (`VUI_NET_FIGURES=1`): more echoes, a larger payload and
//! latency percentiles, printed side by side.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use qemu_tests::{scratch, skip_unless_ready, Daemon, Guest, Running, Viommu};
use vhost_user_iommu::config::RawConfig;

/// testpmd serving one vhost-user socket, driven on its interactive prompt.
struct Testpmd {
    child: Child,
    stdin: ChildStdin,
    log: PathBuf,
    socket: PathBuf,
}

impl Testpmd {
    fn start(bin: &Path, dir: &Path) -> Self {
        let socket = dir.join("net.sock");
        let log = dir.join("testpmd.log");
        let out = std::fs::File::create(&log).expect("testpmd log");
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        // The forwarding lcore polls: let it float over every CPU rather
        // than take one from the guest.
        let lcores = format!("(0,1)@(0-{})", cpus - 1);
        // testpmd prints its answers with stdio: line-buffered, they reach
        // the log as they are printed, not at its exit.
        let mut child = Command::new("stdbuf")
            .arg("-oL")
            .arg(bin)
            .args(["--no-huge", "-m", "256", "--no-pci", "--iova-mode=va"])
            .arg(format!("--file-prefix=vui{}", std::process::id()))
            .arg(format!("--lcores={lcores}"))
            .arg("--vdev")
            .arg(format!(
                "net_vhost0,iface={},iommu-support=1",
                socket.display()
            ))
            .args(["--", "-i", "--total-num-mbufs=2048"])
            .arg("--forward-mode=icmpecho")
            .stdin(Stdio::piped())
            .stdout(out.try_clone().expect("testpmd log"))
            .stderr(out)
            .spawn()
            .expect("dpdk-testpmd");
        let stdin = child.stdin.take().expect("testpmd's stdin");
        let mut t = Self {
            child,
            stdin,
            log,
            socket,
        };
        let t0 = Instant::now();
        while !t.output().contains("testpmd>") {
            if let Some(st) = t.child.try_wait().expect("testpmd's status") {
                panic!("testpmd ended ({st}):\n{}", t.output());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "testpmd did not start:\n{}",
                t.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        t
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One command on the prompt; what it printed once `until` showed
    /// (and a moment more), or after 5 s.
    fn command(&mut self, c: &str, until: &str) -> String {
        let from = self.output().len();
        writeln!(self.stdin, "{c}").expect("testpmd's prompt");
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(100));
            if self.output().get(from..).unwrap_or("").contains(until) {
                std::thread::sleep(Duration::from_millis(300));
                break;
            }
        }
        self.output().get(from..).unwrap_or("").to_string()
    }

    /// The port's extended statistics, by name.
    fn xstats(&mut self) -> Vec<(String, u64)> {
        self.command("show port xstats 0", "extended statistics")
            .lines()
            .filter_map(|l| {
                let (k, v) = l.trim().split_once(": ")?;
                Some((
                    k.trim_start_matches("testpmd> ").to_string(),
                    v.trim().parse().ok()?,
                ))
            })
            .collect()
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sum of the counters whose name ends with `suffix`.
fn sum(xstats: &[(String, u64)], suffix: &str) -> u64 {
    xstats
        .iter()
        .filter(|(k, _)| k.ends_with(suffix))
        .map(|(_, v)| v)
        .sum()
}

/// One ping round's figures, from the guest's `VUI-PING` line.
#[derive(Debug, Default, Clone)]
struct Ping {
    size: u32,
    sent: u32,
    received: u32,
    p50: f64,
    p99: f64,
    secs: f64,
}

impl Ping {
    fn parse(line: &str) -> Self {
        let mut p = Ping::default();
        for kv in line.split_whitespace() {
            let Some((k, v)) = kv.split_once('=') else {
                continue;
            };
            match k {
                "size" => p.size = v.parse().unwrap_or(0),
                "sent" => p.sent = v.parse().unwrap_or(0),
                "received" => p.received = v.parse().unwrap_or(0),
                "p50" => p.p50 = v.parse().unwrap_or(f64::NAN),
                "p99" => p.p99 = v.parse().unwrap_or(f64::NAN),
                "secs" => p.secs = v.parse().unwrap_or(0.0),
                _ => {}
            }
        }
        p
    }

    /// Echo payload carried both ways, in Mbit/s.
    fn mbit(&self) -> f64 {
        f64::from(self.received) * f64::from(self.size) * 8.0 * 2.0 / self.secs / 1e6
    }
}

/// What one guest run gave.
struct NetRun {
    pings: Vec<Ping>,
    xstats: Vec<(String, u64)>,
    daemon: Option<(virtio_iommu::Stats, vhost_user_iommu::vhu_iommu::QueueStats)>,
    output: String,
}

/// What QEMU itself printed among the guest's console lines, and its trace.
fn qemu_lines(output: &str) -> String {
    output
        .lines()
        .filter(|l| l.starts_with("qemu-system-") || l.contains("vhost_user_iommu_"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A guest on `viommu` with its NIC on testpmd; `append` is for the kernel.
fn run(testpmd: &Path, name: &str, viommu: Viommu, append: &str, boot_bypass: bool) -> NetRun {
    // The daemon runs in this process: its log (the mirror link's
    // connections and their ends among it) goes to the test's output.
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .is_test(true)
        .try_init();
    let dir = scratch(&format!("{name}-{viommu:?}"));
    let daemon = (viommu == Viommu::Ours).then(|| {
        Daemon::start_config(
            &dir,
            RawConfig {
                bypass: Some(boot_bypass),
                ..RawConfig::default()
            },
        )
    });
    let mut pmd = Testpmd::start(testpmd, &dir);
    let mut g = Guest::new(viommu, "net.sh");
    g.append = format!("{append} vui.hold=3");
    g.timeout = Duration::from_secs(300);
    let trace = dir.join("qemu-trace.log");
    if viommu == Viommu::Ours {
        // The mirror link as QEMU saw it (when it synced, what it was
        // told), for a failure to show.
        g.qemu_args
            .extend(["-D".to_string(), trace.display().to_string()]);
        for event in [
            "mirror_state",
            "hello",
            "events",
            "system_reset",
            "boot_phase_end",
            "fault",
        ] {
            g.qemu_args
                .extend(["-trace".to_string(), format!("vhost_user_iommu_{event}")]);
        }
    } else {
        // vhost-user shares guest memory with the back-end (ours has it).
        g.qemu_args.extend(
            [
                "-object",
                "memory-backend-memfd,id=mem,size=1G,share=on",
                "-numa",
                "node,memdev=mem",
            ]
            .map(String::from),
        );
        g.qemu_args.extend(
            [
                "-global",
                &format!(
                    "virtio-iommu-pci.boot-bypass={}",
                    if boot_bypass { "on" } else { "off" }
                ),
            ]
            .map(String::from),
        );
    }
    g.qemu_args.extend(
        [
            "-chardev",
            &format!("socket,id=n0,path={}", pmd.socket.display()),
            "-netdev",
            "vhost-user,id=net0,chardev=n0",
            "-device",
            "virtio-net-pci,netdev=net0,iommu_platform=on,disable-legacy=on,romfile=",
        ]
        .map(String::from),
    );
    let t0 = Instant::now();
    let mut guest = Running::start(g.command(daemon.as_ref()), &dir.join("guest.log"));
    // testpmd's forwarding core polls: it starts once the guest's NIC is
    // up, not to take a CPU from the guest's boot.
    guest.wait_for("VUI-NET-UP", Duration::from_secs(240));
    pmd.command("start", "forwarding");
    guest.wait_for("VUI-NET-HOLD", Duration::from_secs(240));
    let xstats = pmd.xstats();
    // Without ACPI the guest cannot power off: it halts after its line.
    guest.wait_for("VUI-GUEST-DONE", Duration::from_secs(60));
    let t1 = Instant::now();
    while guest.child.try_wait().expect("QEMU's status").is_none()
        && t1.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    guest.kill();
    let mut output = guest.output();
    if let Ok(t) = std::fs::read_to_string(&trace) {
        output.push_str(&t);
    }
    eprintln!("{name} on {viommu:?}: done in {:.1?}", t0.elapsed());
    for l in output
        .lines()
        .filter(|l| l.contains("VUI-PING") || l.contains("VUI-CHECK"))
    {
        eprintln!("  {}", l.trim());
    }
    let iotlb: Vec<_> = xstats.iter().filter(|(k, _)| k.contains("iotlb")).collect();
    eprintln!("  testpmd: {iotlb:?}");
    let daemon = daemon.map(|d| {
        eprintln!("  daemon: {}", d.stats());
        eprintln!("  daemon queue: {:?}", d.queue_stats());
        (d.stats(), d.queue_stats())
    });
    assert!(
        output.contains("VUI-GUEST-DONE rc=0"),
        "{name} on {viommu:?}: the guest failed\n{output}\ntestpmd:\n{}",
        pmd.output()
    );
    let pings = output
        .lines()
        .filter_map(|l| l.find("VUI-PING").map(|i| Ping::parse(&l[i..])))
        .collect();
    NetRun {
        pings,
        xstats,
        daemon,
        output,
    }
}

fn testpmd_or_skip() -> Option<PathBuf> {
    if let Some(why) = qemu_tests::skip_reason() {
        eprintln!("skipped: {why}");
        return None;
    }
    let t = qemu_tests::testpmd();
    if t.is_none() {
        eprintln!(
            "skipped: Debian's DPDK testpmd is not fetched (scripts/dpdk/fetch-testpmd.sh; \
             apt has no dpdk-dev here?)"
        );
    }
    t
}

/// The strict and lazy runs' assertions, on either vIOMMU.
fn check_traffic(name: &str, viommu: Viommu, r: &NetRun) {
    let received: u32 = r.pings.iter().map(|p| p.received).sum();
    assert!(received > 0, "{name} on {viommu:?}: no reply\n{}", r.output);
    let misses = sum(&r.xstats, "iotlb_misses");
    let hits = sum(&r.xstats, "iotlb_hits");
    assert!(
        misses > 0 && hits > 0,
        "{name} on {viommu:?}: testpmd translated nothing through its IOTLB: {:?}",
        r.xstats
    );
    if let Some((s, q)) = &r.daemon {
        assert!(s.ok[3] > 0 && s.ok[4] > 0, "no MAP/UNMAP: {s}");
        // vhost needs UNMAPs only (protocol 2.5): the batches that waited
        // for QEMU are those with an UNMAP, ATTACH or DETACH, never one of
        // MAPs alone.
        let waitable = s.ok[1] + s.ok[2] + s.ok[4];
        assert!(
            q.acked_batches > 0 && q.acked_batches <= waitable,
            "{name}: {} batches waited for QEMU, but only {waitable} requests need to: {s} {q:?}",
            q.acked_batches
        );
    }
}

fn traffic(name: &str, append: &str) {
    let Some(testpmd) = testpmd_or_skip() else {
        return;
    };
    for viommu in [Viommu::Qemu, Viommu::Ours] {
        let r = run(
            &testpmd,
            name,
            viommu,
            &format!("{append} vui.rounds=56:40:0.02"),
            true,
        );
        check_traffic(name, viommu, &r);
    }
}

#[test]
fn ping_through_dpdk_vhost_user_net_in_strict_mode() {
    skip_unless_ready!();
    traffic("net-strict", "iommu.strict=1");
}

#[test]
fn ping_through_dpdk_vhost_user_net_in_lazy_mode() {
    skip_unless_ready!();
    traffic("net-lazy", "iommu.strict=0");
}

/// Boot bypass off and no guest driver for the vIOMMU: nothing attaches
/// the NIC, so every translation testpmd asks for is refused (QEMU says
/// so), and no frame passes either way.
#[test]
fn without_a_guest_driver_and_bypass_off_no_frame_passes() {
    skip_unless_ready!();
    let Some(testpmd) = testpmd_or_skip() else {
        return;
    };
    for viommu in [Viommu::Qemu, Viommu::Ours] {
        let r = run(
            &testpmd,
            "net-refused",
            viommu,
            // A Linux that knows the NIC sits behind a virtio-iommu (the
            // ACPI VIOT table) defers its probe until the IOMMU's driver
            // comes: without ACPI it does not know, and without the
            // driver nothing attaches.
            "acpi=off module_blacklist=virtio_iommu vui.expect=none vui.rounds=56:5:0.2",
            false,
        );
        assert_eq!(r.output.matches("VUI-CHECK no-reply").count(), 1);
        for k in ["rx_good_packets", "tx_good_packets", "iotlb_hits"] {
            assert_eq!(sum(&r.xstats, k), 0, "{viommu:?}: {k} in {:?}", r.xstats);
        }
        // QEMU asks the vIOMMU for the used rings' translations before it
        // starts the back-end (vhost_dev_start), and for each IOTLB miss of
        // the back-end's: refused, vhost does not start (EFAULT), or the
        // miss is not answered.
        assert!(
            r.output.contains("unable to start vhost net: 14")
                || r.output.contains("Fail to lookup the translated address"),
            "{viommu:?}: QEMU refused no translation to testpmd\n{}",
            r.output
        );
        if let Some((_, q)) = &r.daemon {
            // Each refused access is a fault for the guest (none takes it:
            // up to 64 wait for an event buffer, the rest are dropped).
            // QEMU sends a fault only while its mirror copy is synced
            // (docs/mirror-protocol.md §10), at most 16 between two looks
            // of its main loop: its own lines say what it saw.
            assert!(
                q.faults_reported > 0 && q.faults_delivered == 0,
                "the daemon heard of no refused access, or delivered one to a guest without a driver: {q:?}\nQEMU said:\n{}",
                qemu_lines(&r.output)
            );
        }
    }
}

/// The figures: latency over thousands of echoes, replies lost and a
/// throughput figure, with no vIOMMU, QEMU's and ours in one run, strict
/// and lazy. A benchmark rather than a test: it runs with
/// `VUI_NET_FIGURES=1` and checks only that replies came.
#[test]
fn figures_side_by_side() {
    skip_unless_ready!();
    if std::env::var("VUI_NET_FIGURES").as_deref() != Ok("1") {
        eprintln!("skipped: the figures run with VUI_NET_FIGURES=1");
        return;
    }
    let Some(testpmd) = testpmd_or_skip() else {
        return;
    };
    let rounds = std::env::var("VUI_NET_ROUNDS")
        .unwrap_or_else(|_| "56:3000:0.005,1400:1000:0.005".to_string());
    let mut table = Vec::new();
    for (mode, append) in [("strict", "iommu.strict=1"), ("lazy", "iommu.strict=0")] {
        for viommu in [Viommu::None, Viommu::Qemu, Viommu::Ours] {
            if viommu == Viommu::None && mode == "lazy" {
                continue;
            }
            let r = run(
                &testpmd,
                &format!("net-figures-{mode}"),
                viommu,
                &format!("{append} vui.rounds={rounds}"),
                true,
            );
            let misses = sum(&r.xstats, "iotlb_misses");
            for p in &r.pings {
                table.push(format!(
                    "{mode:6} {:5} {:5}B {:5}/{:<5} lost {:5.1}%  p50 {:8.3} ms  p99 {:8.3} ms  \
                     {:7.3} Mbit/s  testpmd IOTLB misses {misses}",
                    format!("{viommu:?}"),
                    p.size,
                    p.received,
                    p.sent,
                    100.0 * f64::from(p.sent - p.received.min(p.sent)) / f64::from(p.sent.max(1)),
                    p.p50,
                    p.p99,
                    p.mbit(),
                ));
            }
            let received: u32 = r.pings.iter().map(|p| p.received).sum();
            assert!(received > 0, "{mode} on {viommu:?}: no reply");
        }
    }
    eprintln!("vhost-user net (DPDK testpmd icmpecho), rounds {rounds}:");
    for l in &table {
        eprintln!("  {l}");
    }
}
