// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A vhost-user back-end that reads the daemon's shared translation table
//! itself (issue 19, docs/mirror-protocol.md §16): `vui-table-net`
//! (table-net/) answers the guest's ARP and ping behind our vIOMMU, every
//! ring and buffer access translated through the table in a reader
//! section. The guest pings with a payload pattern; the back-end checks
//! every request's checksums and pattern, the guest's kernel every reply's
//! checksum, and no echo may be lost (a reader of the table never misses).
//! UNMAPs complete after the back-end's sections (the daemon's reader
//! handshake), without a record to QEMU or an IOTLB message to the
//! back-end.
//!
//! The figures (`VUI_NET_FIGURES=1`): the same rounds as the DPDK test's
//! figures, p50/p99 and replies lost, to read beside testpmd's IOTLB path
//! (tests/vhost_user_net.rs, `figures_side_by_side`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use qemu_tests::{scratch, skip_unless_ready, Daemon, Guest, Running, Viommu};
use vhost_user_iommu::config::RawConfig;
use vhost_user_iommu::listen::{listen_at, Access};
use vhost_user_iommu::table_socket::TableServer;

/// The NIC's PCI slot, so its endpoint is known before QEMU starts.
const NIC_ADDR: &str = "05.0";
const NIC_ENDPOINT: &str = "00:05.0";
const PATTERN: &str = "a5";

/// One ping round, from the guest's `VUI-PING` line.
#[derive(Debug, Default)]
struct Ping {
    size: u32,
    sent: u32,
    received: u32,
    p50: String,
    p99: String,
}

fn pings(output: &str) -> Vec<Ping> {
    output
        .lines()
        .filter_map(|l| l.find("VUI-PING").map(|i| &l[i..]))
        .map(|l| {
            let mut p = Ping::default();
            for (k, v) in l.split_whitespace().filter_map(|kv| kv.split_once('=')) {
                match k {
                    "size" => p.size = v.parse().unwrap_or(0),
                    "sent" => p.sent = v.parse().unwrap_or(0),
                    "received" => p.received = v.parse().unwrap_or(0),
                    "p50" => p.p50 = v.to_string(),
                    "p99" => p.p99 = v.to_string(),
                    _ => {}
                }
            }
            p
        })
        .collect()
}

/// The back-end's counters, from its `--stats` file.
fn counters(path: &Path) -> Vec<(String, u64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn get(c: &[(String, u64)], k: &str) -> u64 {
    c.iter().find(|(n, _)| n == k).map_or(0, |(_, v)| *v)
}

struct TableNet {
    child: Child,
    stats: PathBuf,
    log: PathBuf,
    socket: PathBuf,
}

impl TableNet {
    fn start(dir: &Path, table: &Path) -> Self {
        let socket = dir.join("net.sock");
        let stats = dir.join("table-net.stats");
        let log = dir.join("table-net.log");
        let out = std::fs::File::create(&log).expect("table-net log");
        let child = Command::new(qemu_tests::table_net_bin())
            .env(
                "RUST_LOG",
                std::env::var("VUI_TABLE_NET_LOG").unwrap_or_else(|_| "info".into()),
            )
            .arg("--socket")
            .arg(&socket)
            .arg("--table-socket")
            .arg(table)
            .args(["--endpoint", NIC_ENDPOINT, "--pattern", PATTERN])
            .arg("--stats")
            .arg(&stats)
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("vui-table-net");
        let t0 = Instant::now();
        while !socket.exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "vui-table-net did not listen:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            stats,
            log,
            socket,
        }
    }

    /// Wait for it to end (its front-end gone) and read its counters.
    fn finish(mut self) -> Vec<(String, u64)> {
        let t0 = Instant::now();
        while self.child.try_wait().ok().flatten().is_none() {
            if t0.elapsed() > Duration::from_secs(10) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        counters(&self.stats)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for TableNet {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one run gave.
struct Outcome {
    pings: Vec<Ping>,
    backend: Vec<(String, u64)>,
    daemon: (virtio_iommu::Stats, vhost_user_iommu::vhu_iommu::QueueStats),
    readers: vhost_user_iommu::mirror::readers::ReaderStats,
    output: String,
}

fn run(name: &str, append: &str, boot_bypass: bool) -> Outcome {
    let dir = scratch(name);
    let daemon = Daemon::start_config(
        &dir,
        RawConfig {
            bypass: Some(boot_bypass),
            ..RawConfig::default()
        },
    );
    let table_path = dir.join("table.sock");
    let (listener, file) = listen_at(&table_path, Access::default()).expect("table socket");
    let table =
        TableServer::start(listener, Some(file), daemon.backend.clone()).expect("table socket");
    let net = TableNet::start(&dir, &table_path);
    let mut g = Guest::new(Viommu::Ours, "net.sh");
    g.append = append.to_string();
    g.timeout = Duration::from_secs(300);
    g.qemu_args.extend(
        [
            "-chardev",
            &format!("socket,id=n0,path={}", net.socket.display()),
            "-netdev",
            "vhost-user,id=net0,chardev=n0",
            "-device",
            &format!(
                "virtio-net-pci,netdev=net0,iommu_platform=on,disable-legacy=on,romfile=,\
                 addr={NIC_ADDR}"
            ),
        ]
        .map(String::from),
    );
    let t0 = Instant::now();
    let mut guest = Running::start(g.command(Some(&daemon)), &dir.join("guest.log"));
    // Not `wait_for`: a failed guest still has counters to show.
    while !guest.output().contains("VUI-GUEST-DONE")
        && guest.child.try_wait().expect("QEMU's status").is_none()
        && t0.elapsed() < Duration::from_secs(280)
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    let t1 = Instant::now();
    while guest.child.try_wait().expect("QEMU's status").is_none()
        && t1.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    guest.kill();
    let output = guest.output();
    let readers = daemon
        .backend
        .mirror()
        .memory()
        .expect("a table")
        .readers
        .stats();
    let log = net.log();
    let backend = net.finish();
    drop(table);
    eprintln!("{name}: done in {:.1?}", t0.elapsed());
    for l in output
        .lines()
        .filter(|l| l.contains("VUI-PING") || l.contains("VUI-CHECK") || l.contains("VUI-FAIL"))
    {
        eprintln!("  {}", l.trim());
    }
    eprintln!("  table-net: {backend:?}");
    eprintln!("  daemon: {}", daemon.stats());
    eprintln!("  daemon queue: {:?}", daemon.queue_stats());
    eprintln!("  readers: {readers:?}");
    assert!(
        output.contains("VUI-GUEST-DONE rc=0"),
        "{name}: the guest failed\n{output}\ntable-net:\n{log}"
    );
    Outcome {
        pings: pings(&output),
        backend,
        daemon: (daemon.stats(), daemon.queue_stats()),
        readers,
        output,
    }
}

fn table_net(name: &str, append: &str) {
    let r = run(
        name,
        &format!("{append} vui.rounds=56:40:0.02,1400:40:0.02 vui.pattern={PATTERN}"),
        true,
    );
    // Every echo came back: a reader of the table never misses.
    assert!(!r.pings.is_empty(), "{name}: no ping round\n{}", r.output);
    for p in &r.pings {
        assert!(
            p.sent > 0 && p.received == p.sent,
            "{name}: {p:?}: replies lost\n{}",
            r.output
        );
    }
    let sent: u64 = r.pings.iter().map(|p| u64::from(p.sent)).sum();
    let b = &r.backend;
    // The data: every request's checksums and payload pattern, read
    // through the table; the replies' checksums the guest's kernel checked.
    assert!(get(b, "echoes") >= sent, "{name}: {b:?}");
    assert_eq!(get(b, "pattern_ok"), get(b, "echoes"), "{name}: {b:?}");
    for k in ["pattern_bad", "bad_checksum", "dma_errors", "dropped"] {
        assert_eq!(get(b, k), 0, "{name}: {k} in {b:?}");
    }
    assert!(get(b, "walks") > 0 && get(b, "arp") > 0, "{name}: {b:?}");
    // Zero messages per mapping: the only IOTLB messages are QEMU's at
    // the start (the used rings) and those of an ATTACH or DETACH.
    let (s, q) = &r.daemon;
    assert!(s.ok[3] > 0 && s.ok[4] > 0, "{name}: no MAP/UNMAP: {s}");
    assert!(
        get(b, "iotlb_msgs") < s.ok[4] / 2,
        "{name}: {} IOTLB messages for {} UNMAPs: {b:?}",
        get(b, "iotlb_msgs"),
        s.ok[4]
    );
    // No batch waited for QEMU for an UNMAP: only ATTACH and DETACH do.
    assert!(
        q.acked_batches <= s.ok[1] + s.ok[2],
        "{name}: {} batches waited for QEMU: {s} {q:?}",
        q.acked_batches
    );
    // The UNMAPs waited for the back-end's sections instead, and it was
    // never late.
    assert!(r.readers.graces > 0, "{name}: {:?}", r.readers);
    assert_eq!(r.readers.revoked, 0, "{name}: {:?}", r.readers);
}

#[test]
fn ping_through_a_backend_reading_the_table_in_strict_mode() {
    skip_unless_ready!();
    table_net("table-net-strict", "iommu.strict=1");
}

#[test]
fn ping_through_a_backend_reading_the_table_in_lazy_mode() {
    skip_unless_ready!();
    table_net("table-net-lazy", "iommu.strict=0");
}

/// Boot bypass off and no driver for the vIOMMU: the NIC is attached to
/// nothing, the back-end's reader page says so, and no frame passes.
#[test]
fn without_a_guest_driver_and_bypass_off_the_table_reader_moves_nothing() {
    skip_unless_ready!();
    let r = run(
        "table-net-refused",
        "acpi=off module_blacklist=virtio_iommu vui.expect=none vui.rounds=56:5:0.2",
        false,
    );
    assert_eq!(r.output.matches("VUI-CHECK no-reply").count(), 1);
    let b = &r.backend;
    for k in ["frames_in", "frames_out", "walks"] {
        assert_eq!(get(b, k), 0, "{k} in {b:?}");
    }
    assert!(get(b, "refused_passes") > 0, "{b:?}");
}

/// The figures: latency over thousands of echoes and replies lost, strict
/// and lazy, with `VUI_NET_FIGURES=1` (the rounds of `VUI_NET_ROUNDS`, as
/// the DPDK test's figures).
#[test]
fn figures() {
    skip_unless_ready!();
    if std::env::var("VUI_NET_FIGURES").as_deref() != Ok("1") {
        eprintln!("skipped: the figures run with VUI_NET_FIGURES=1");
        return;
    }
    let rounds = std::env::var("VUI_NET_ROUNDS")
        .unwrap_or_else(|_| "56:3000:0.005,1400:1000:0.005".to_string());
    let mut table = Vec::new();
    for (mode, append) in [("strict", "iommu.strict=1"), ("lazy", "iommu.strict=0")] {
        let r = run(
            &format!("table-net-figures-{mode}"),
            &format!("{append} vui.rounds={rounds} vui.pattern={PATTERN}"),
            true,
        );
        let b = &r.backend;
        let us_per_pass = get(b, "pass_ns") as f64 / 1e3 / get(b, "passes").max(1) as f64;
        for p in &r.pings {
            table.push(format!(
                "{mode:6} table-net {:5}B {:5}/{:<5} lost {:5.1}%  p50 {:>8} ms  p99 {:>8} ms  \
                 answered {}/{}, {} walks, {:.1} µs per pass, IOTLB messages {}, reader graces {}",
                p.size,
                p.received,
                p.sent,
                100.0 * f64::from(p.sent - p.received.min(p.sent)) / f64::from(p.sent.max(1)),
                p.p50,
                p.p99,
                get(b, "frames_out"),
                get(b, "frames_in"),
                get(b, "walks"),
                us_per_pass,
                get(b, "iotlb_msgs"),
                r.readers.graces,
            ));
        }
    }
    eprintln!("vhost-user net through the shared table (vui-table-net), rounds {rounds}:");
    for l in &table {
        eprintln!("  {l}");
    }
}
