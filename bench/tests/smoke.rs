// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The bench binary end to end, against a daemon served in this process
//! (the backend library, as the daemon's own demo does), so that
//! `cargo test` needs no daemon binary built beforehand.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::thread::JoinHandle;

use serde_json::Value;
use test_frontend::daemon::Scratch;
use vhost_user_iommu::config::RawConfig;
use vhost_user_iommu::emulated;
use vhost_user_iommu::mirror::{MirrorHandle, MirrorMemory, MirrorServer};
use vhost_user_iommu::serve::{ServeError, Server, SocketSource, Stopper};
use vhost_user_iommu::vhu_iommu::{BackendHooks, IommuBackend};

const BENCH: &str = env!("CARGO_BIN_EXE_vhost-user-iommu-bench");
const WORKLOADS: [&str; 5] = ["strict-4k", "strict-64k", "strict-2m", "batch", "domains"];

/// The daemon on a thread of this process, its sockets in a scratch
/// directory of its own; stopped when dropped, the directory removed after
/// it (or kept if the test failed).
struct InProcessDaemon {
    socket: PathBuf,
    /// The translation mirror's socket, if it has one.
    mirror: Option<PathBuf>,
    stopper: Stopper,
    thread: Option<JoinHandle<Result<(), ServeError>>>,
    mirror_server: Option<MirrorServer>,
    /// Last: dropped after the daemon has stopped.
    _dir: Scratch,
}

impl InProcessDaemon {
    /// Serving endpoints `endpoints`, without a mirror (no QEMU).
    fn start(name: &str, endpoints: &str) -> Self {
        Self::start_with(name, endpoints, false)
    }

    /// Serving endpoints `endpoints`, with a translation mirror if `mirror`
    /// (set up as the daemon's main does for --mirror-socket).
    fn start_with(name: &str, endpoints: &str, mirror: bool) -> Self {
        let dir = Scratch::new(&format!("bench-{name}"));
        let socket = dir.join("viommu.sock");
        let config = RawConfig {
            endpoints: Some(endpoints.into()),
            ..RawConfig::default()
        }
        .check()
        .unwrap();
        let device = emulated::device(&config).unwrap();
        let hooks = Arc::new(BackendHooks::default());
        let (mirror_server, handle, mirror_path) = if mirror {
            let path = dir.join("viommu.mirror");
            let memory = MirrorMemory::for_device(device.device_config()).unwrap();
            let s =
                MirrorServer::start(&path, config.device.bypass, hooks.clone(), Arc::new(memory))
                    .unwrap();
            let h = s.handle();
            (Some(s), h, Some(path))
        } else {
            (None, MirrorHandle::disconnected(), None)
        };
        let backend = IommuBackend::new(device, handle);
        let _ = hooks.0.set(backend.clone());
        let server = Server::bind(&SocketSource::Path(socket.clone())).unwrap();
        let stopper = server.stopper();
        let thread = std::thread::spawn(move || server.run(&backend));
        InProcessDaemon {
            socket,
            mirror: mirror_path,
            stopper,
            thread: Some(thread),
            mirror_server,
            _dir: dir,
        }
    }
}

impl Drop for InProcessDaemon {
    fn drop(&mut self) {
        self.stopper.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        drop(self.mirror_server.take());
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn bench(args: &[&str]) -> Output {
    Command::new(BENCH)
        .args(args)
        .output()
        .expect("run the bench")
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8 here")
}

#[test]
fn smoke_run_reports_every_workload_with_nonzero_throughput() {
    let daemon = InProcessDaemon::start_with("smoke", "8-11", true);
    let mirror = daemon.mirror.clone().unwrap();
    let dir = Scratch::new("bench-out");
    let json = dir.join("report.json");
    let svg = dir.join("latency.svg");
    let pid = std::process::id().to_string();
    let out = bench(&[
        "--smoke",
        "--socket",
        path_str(&daemon.socket),
        "--mirror-socket",
        path_str(&mirror),
        "--qemu-leg",
        "--notifiers",
        "--daemon-pid",
        &pid,
        "--domains",
        "4",
        "--qd",
        "8",
        "--json",
        path_str(&json),
        "--plot",
        path_str(&svg),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stderr}");

    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["settings"]["smoke"], true);
    assert_eq!(report["settings"]["qemu_leg"], true);
    assert_eq!(report["settings"]["notifiers"], true);
    assert_eq!(report["settings"]["mirror_socket"], path_str(&mirror));
    let workloads = report["workloads"].as_array().unwrap();
    let names: Vec<&str> = workloads
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, WORKLOADS);
    for w in workloads {
        for leg in ["daemon", "direct"] {
            let rate = w[leg]["req_per_s"].as_f64().unwrap();
            assert!(rate > 0.0, "{} {leg}: {rate} req/s", w["name"]);
            assert!(w[leg]["latency_ns"]["p50"].as_u64().unwrap() > 0);
        }
        assert!(w["daemon"]["cpu_ns_per_req"].as_f64().is_some());
        assert!(w["ratio"]["time_per_req"].as_f64().unwrap() > 0.0);
        assert!(w["direct"]["allocations_per_req"].as_f64().is_some());
        // The QEMU stand-in: every MAP/UNMAP was walked in the shared
        // table; with notifiers each one was also a record QEMU acked.
        let qemu = w["qemu"].as_array().unwrap();
        let labels: Vec<&str> = qemu.iter().map(|q| q["label"].as_str().unwrap()).collect();
        assert_eq!(labels, ["+qemu", "+qemu+notif"]);
        for q in qemu {
            let leg = &q["daemon"];
            assert!(leg["req_per_s"].as_f64().unwrap() > 0.0);
            assert!(leg["translation_checks"].as_u64().unwrap() > 0, "{q}");
        }
        assert_eq!(qemu[0]["daemon"]["mirror_records_per_req"], 0.0);
        assert_eq!(qemu[1]["daemon"]["mirror_records_per_req"], 1.0);
    }
    assert_eq!(workloads[3]["requests_per_kick"], 8);

    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("alloc/req"), "{table}");
    for name in WORKLOADS {
        assert!(table.contains(name), "table lacks {name}: {table}");
        assert!(
            table.contains(&format!("{name} +qemu+notif")),
            "table lacks {name} +qemu+notif: {table}"
        );
        assert!(
            stderr.contains(name),
            "no progress line for {name}: {stderr}"
        );
    }
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.starts_with("<svg"));
    assert!(plot.contains("strict-4k"));
}

#[test]
fn scaling_smoke_run_reports_each_point_up_to_ten_thousand() {
    let dir = Scratch::new("bench-scaling");
    let json = dir.join("report.json");
    let svg = dir.join("scaling.svg");
    let out = bench(&[
        "--scaling",
        "--smoke",
        "--json",
        path_str(&json),
        "--plot",
        path_str(&svg),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stderr}");

    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["settings"]["scaling"], true);
    let points = report["scaling"].as_array().unwrap();
    let existing: Vec<u64> = points
        .iter()
        .map(|p| p["existing"].as_u64().unwrap())
        .collect();
    assert_eq!(existing, [100, 1_000, 10_000]);
    for p in points {
        for subject in ["device", "table"] {
            let s = &p[subject];
            assert!(s["map_unmap_ns"]["p50"].as_u64().unwrap() > 0, "{p}");
            assert!(s["translate_ns"].as_f64().unwrap() > 0.0, "{p}");
        }
        assert!(p["device"]["allocations_per_req"].as_f64().is_some());
    }
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("10000"), "{table}");
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.starts_with("<svg") && plot.contains("table translate"));
}

#[test]
fn qemu_leg_on_an_external_daemon_needs_its_mirror_socket() {
    let out = bench(&["--smoke", "--socket", "/nonexistent.sock", "--qemu-leg"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--mirror-socket"), "{stderr}");
}

#[test]
fn a_request_the_daemon_refuses_fails_the_run_with_its_status() {
    // The daemon serves endpoint 8 only; `domains` needs 8 and 9.
    let daemon = InProcessDaemon::start("refused", "8");
    let out = bench(&[
        "--smoke",
        "--socket",
        path_str(&daemon.socket),
        "--workloads",
        "domains",
        "--domains",
        "2",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("domains, daemon: NoEnt"), "{stderr}");
}

#[test]
fn a_missing_daemon_binary_is_named_with_how_to_build_it() {
    let out = bench(&["--smoke", "--daemon", "/nonexistent/vhost-user-iommu"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/vhost-user-iommu"), "{stderr}");
    assert!(
        stderr.contains("cargo build --release -p vhost-user-iommu"),
        "{stderr}"
    );
}

#[test]
fn a_png_plot_is_refused_before_anything_runs() {
    let out = bench(&["--socket", "/nonexistent.sock", "--plot", "lat.png"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("only SVG"), "{stderr}");
}

#[test]
fn help_explains_every_workload_and_flag() {
    let out = bench(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for word in WORKLOADS.iter().chain(&[
        "--seconds",
        "--warmup",
        "--qd",
        "--domains",
        "--size",
        "--socket",
        "--daemon-pid",
        "--smoke",
        "--json",
        "--plot",
        "SVG",
        "--qemu-leg",
        "--notifiers",
        "--mirror-socket",
        "--scaling",
        "alloc/req",
    ]) {
        assert!(help.contains(word), "--help lacks {word}");
    }
}
