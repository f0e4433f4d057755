// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon as systemd runs it: the example units in backend/share/systemd
//! pass `systemd-analyze verify`, and socket activation (LISTEN_FDS) serves
//! a front-end. Skipped, saying so, on a host without systemd's tools.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use test_frontend::daemon::Scratch;
use test_frontend::{Status, TestVm, VmOptions};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-iommu");
const UNITS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/share/systemd");

/// Whether `tool` runs here; if not, say the test is skipped and why.
fn have(tool: &str, test: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIP {test}: {tool} is not installed (Debian package systemd)");
    }
    ok
}

/// The units, their ExecStart pointed at the binary under test, as the
/// instance `vm1` (systemd-analyze verifies instances, not templates).
fn units_in(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for kind in ["service", "socket"] {
        let text = std::fs::read_to_string(format!("{UNITS}/vhost-user-iommu@.{kind}")).unwrap();
        let text = text.replace("/usr/libexec/vhost-user-iommu", BIN);
        std::fs::write(dir.join(format!("vhost-user-iommu@.{kind}")), text).unwrap();
        let instance = dir.join(format!("vhost-user-iommu@vm1.{kind}"));
        std::os::unix::fs::symlink(format!("vhost-user-iommu@.{kind}"), &instance).unwrap();
        out.push(instance);
    }
    out
}

#[test]
fn the_example_units_pass_systemd_analyze_verify() {
    if !have("systemd-analyze", "systemd-analyze verify") {
        return;
    }
    let dir = Scratch::new("systemd-verify");
    let units = units_in(dir.path());
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&units)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Unknown keys are warnings with exit status 0: none is allowed either.
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");
}

/// A process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn socket_activation_serves_a_front_end() {
    if !have("systemd-socket-activate", "socket activation") {
        return;
    }
    let dir = Scratch::new("systemd-activate");
    let sock = dir.join("viommu.sock");
    // systemd-socket-activate listens, and on the first connection runs
    // the daemon with the socket as LISTEN_FDS=1 (no --socket-path).
    let _activator = Killed(
        Command::new("systemd-socket-activate")
            .arg("--listen")
            .arg(&sock)
            .args([BIN, "--endpoints", "8"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(t0.elapsed() < Duration::from_secs(10), "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut vm = TestVm::connect(&sock, VmOptions::default()).unwrap();
    assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
    assert_eq!(vm.detach(1, 8).unwrap(), Status::Ok);
}

#[test]
fn listen_fds_for_another_process_is_not_taken() {
    // LISTEN_PID names another process: the socket is not ours, and with no
    // --socket-path there is nothing to listen on.
    let out = Command::new(BIN)
        .env("LISTEN_PID", "1")
        .env("LISTEN_FDS", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no socket to listen on"), "{stderr}");
}
