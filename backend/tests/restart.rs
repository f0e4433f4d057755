// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A daemon restarted with `--state-file` comes back as the device its
//! front-end left: killed (SIGKILL) or stopped (SIGTERM) under a connected
//! front-end, the next daemon has every domain, attachment and mapping.
//! A front-end that leaves takes the state with it. A control client learns
//! of the restore.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use test_frontend::daemon::{DaemonProcess, Scratch};
use test_frontend::rng::Rng;
use test_frontend::{Request, Status, TestVm, VmOptions, MAP_F_READ, MAP_F_WRITE};
use vhost_user_iommu::control::client::Client;
use vhost_user_iommu::control::protocol;

const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-iommu");
const RW: u32 = MAP_F_READ | MAP_F_WRITE;

/// Daemon number `n` on the state file in `dir`, its log in
/// `daemon-<n>.log` there; killed however the test ends.
fn start(dir: &Scratch, n: u32) -> DaemonProcess {
    DaemonProcess::builder(BIN, dir.join("viommu.sock"))
        .arg("--state-file")
        .arg(dir.join("state"))
        .args(["--endpoints", "8,16"])
        .rust_log("info")
        .log_file(dir.join(format!("daemon-{n}.log")))
        .spawn()
}

fn connect(d: &DaemonProcess) -> TestVm {
    d.connect(VmOptions::default()).expect("connect")
}

fn scratch(name: &str) -> Scratch {
    Scratch::new(&format!("restart-{name}"))
}

/// Domain 1 (endpoint 8) with two mappings, domain 2 (endpoint 16) with
/// one.
fn make_state(vm: &mut TestVm) {
    assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
    assert_eq!(vm.attach(2, 16, 0).unwrap(), Status::Ok);
    assert_eq!(
        vm.map(1, 0x1000, 0x1fff, 0x10_0000, RW).unwrap(),
        Status::Ok
    );
    assert_eq!(
        vm.map(1, 0x8000, 0xbfff, 0x20_0000, MAP_F_READ).unwrap(),
        Status::Ok
    );
    assert_eq!(
        vm.map(2, 0x4000, 0x4fff, 0x30_0000, RW).unwrap(),
        Status::Ok
    );
    // Made and gone again: must not come back.
    assert_eq!(
        vm.map(2, 0x6000, 0x6fff, 0x30_0000, RW).unwrap(),
        Status::Ok
    );
    assert_eq!(vm.unmap(2, 0x6000, 0x6fff).unwrap(), Status::Ok);
}

/// The state `make_state` made is there: each mapping exists (a MAP over
/// it is refused, its UNMAP succeeds once), the unmapped one does not.
fn assert_state(vm: &mut TestVm, log: &str) {
    for (domain, start, end) in [
        (1, 0x1000, 0x1fff),
        (1, 0x8000, 0xbfff),
        (2, 0x4000, 0x4fff),
    ] {
        assert_ne!(
            vm.map(domain, start, end, 0x40_0000, RW).unwrap(),
            Status::Ok,
            "domain {domain} {start:#x}-{end:#x} is mapped already; daemon log:\n{log}"
        );
    }
    assert_eq!(
        vm.map(2, 0x6000, 0x6fff, 0x30_0000, RW).unwrap(),
        Status::Ok,
        "the mapping unmapped before the restart stayed unmapped"
    );
    // Attached as before: attaching again is a no-op; a domain that was
    // never made is not there.
    assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
    assert_eq!(vm.unmap(3, 0, 0xfff).unwrap(), Status::NoEnt);
    // Splitting a recovered mapping is refused like any other (§5.13.6.6).
    assert_eq!(vm.unmap(1, 0x8000, 0x8fff).unwrap(), Status::Range);
    assert_eq!(vm.unmap(1, 0x8000, 0xbfff).unwrap(), Status::Ok);
}

fn restart_keeps_the_state(signal: i32, name: &str) {
    let dir = scratch(name);
    let first = start(&dir, 1);
    let mut vm = connect(&first);
    make_state(&mut vm);
    // The front-end stays connected: the daemon goes first.
    first.end(signal);
    let second = start(&dir, 2);
    drop(vm);
    let mut vm = connect(&second);
    let log = second.log_text();
    assert!(
        log.contains("recovered 5 attachments and mappings"),
        "the second daemon says what it recovered:\n{log}"
    );
    assert_state(&mut vm, &log);
}

#[test]
fn a_daemon_killed_under_its_front_end_comes_back_with_every_mapping() {
    restart_keeps_the_state(libc::SIGKILL, "kill");
}

#[test]
fn a_daemon_stopped_under_its_front_end_leaves_its_state_to_the_next() {
    restart_keeps_the_state(libc::SIGTERM, "term");
}

/// The state file is read as the daemon starts, before a control client
/// can connect, let alone subscribe: a client that connects later learns
/// of the restore from `status` (its source, what the device held, when),
/// and `ctl status` prints it.
#[test]
fn a_control_client_that_connects_later_learns_the_state_file_was_restored() {
    let dir = scratch("control");
    let first = start(&dir, 1);
    let mut vm = connect(&first);
    make_state(&mut vm);
    first.end(libc::SIGKILL);
    let control = dir.join("control.sock");
    let second = DaemonProcess::builder(BIN, dir.join("viommu.sock"))
        .arg("--state-file")
        .arg(dir.join("state"))
        .args(["--endpoints", "8,16", "--control-socket"])
        .arg(&control)
        .rust_log("info")
        .log_file(dir.join("daemon-2.log"))
        .spawn();
    drop(vm);
    // The control socket is bound before the vhost-user socket the spawn
    // waited for.
    let mut c = Client::connect(&control, Duration::from_secs(5)).unwrap();
    let st: protocol::Status = c.call("status", Value::Null).unwrap();
    let log = second.log_text();
    let r = st
        .last_restore
        .as_ref()
        .unwrap_or_else(|| panic!("status says no restore:\n{log}"));
    // Domain 1 (endpoint 8) with two mappings, domain 2 (endpoint 16) with one.
    assert_eq!(
        (r.source.as_str(), r.domains, r.mappings, r.attached),
        ("state_file", 2, 3, 2),
        "{log}"
    );
    assert!(
        r.time_us <= st.uptime_ms.saturating_add(1) * 1000,
        "{r:?} {st:?}"
    );
    assert_eq!(
        (st.device.domains, st.device.mappings, st.device.attached),
        (2, 3, 2)
    );

    let out = Command::new(BIN)
        .args(["ctl", "--control-socket"])
        .arg(&control)
        .arg("status")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("restored:"))
        .unwrap_or_else(|| panic!("ctl status has no restore line:\n{text}"));
    assert!(line.contains("the state file at"), "{text}");
    assert!(
        line.ends_with(": 2 domains, 3 mappings, 2 endpoints attached"),
        "{text}"
    );
}

#[test]
fn a_front_end_that_leaves_takes_the_state_with_it() {
    let dir = scratch("leave");
    let first = start(&dir, 1);
    let mut vm = connect(&first);
    make_state(&mut vm);
    drop(vm);
    // The daemon resets the device when its front-end leaves (after the
    // socket closes, on its own time).
    std::thread::sleep(Duration::from_millis(300));
    first.end(libc::SIGKILL);
    let second = start(&dir, 2);
    let mut vm = connect(&second);
    assert_eq!(
        vm.unmap(1, 0, 0xfff).unwrap(),
        Status::NoEnt,
        "domain 1 outlived its front-end:\n{}",
        second.log_text()
    );
}

#[test]
fn a_state_file_another_daemon_holds_is_refused() {
    let dir = scratch("busy");
    let _first = start(&dir, 1);
    let out = Command::new(BIN)
        .arg("--socket-path")
        .arg(dir.join("other.sock"))
        .arg("--state-file")
        .arg(dir.join("state"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another daemon"), "{err}");
}

#[test]
fn a_damaged_state_file_is_logged_and_the_device_starts_reset() {
    let dir = scratch("damaged");
    std::fs::write(dir.join("state"), b"not a journal at all").unwrap();
    let d = start(&dir, 1);
    let mut vm = connect(&d);
    assert_eq!(vm.unmap(1, 0, 0xfff).unwrap(), Status::NoEnt);
    assert!(
        d.log_text().contains("nothing recovered"),
        "{}",
        d.log_text()
    );
}

/// The daemon dies while it works through a ring of MAPs; the front-end
/// restarts the ring at its used index on the next daemon, as QEMU does, so
/// requests the dead daemon carried out but never completed come again.
/// Each must complete OK exactly once: carried out twice, a MAP would fail
/// on its own mapping. The state ends with every mapping exactly once.
#[test]
fn requests_in_flight_when_the_daemon_dies_are_carried_out_exactly_once() {
    let dir = scratch("inflight");
    let mut rng = Rng(0x1f11);
    let mut daemon = start(&dir, 0);
    let mut vm = connect(&daemon);
    assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
    let mut mapped = 0u64;
    let mut logs = String::new();
    for round in 1..=12 {
        let reqs: Vec<Request> = (mapped..mapped + 256)
            .map(|page| Request::Map {
                domain: 1,
                virt_start: page << 12,
                virt_end: (page << 12) | 0xfff,
                phys_start: (page % 4096) << 12,
                flags: RW,
            })
            .collect();
        let posted = vm.submit(&reqs).unwrap();
        std::thread::sleep(Duration::from_micros(rng.below(800)));
        daemon.end(libc::SIGKILL);
        daemon = start(&dir, round);
        vm.reconnect(daemon.socket()).unwrap();
        let t = Instant::now();
        let mut done = 0;
        while done < posted {
            match vm.poll_completion().unwrap() {
                Some(c) => {
                    assert_eq!(
                        c.status,
                        Status::Ok,
                        "round {round}: a MAP in flight at the kill failed (carried out twice?); \
                         daemon log:\n{}",
                        daemon.log_text()
                    );
                    done += 1;
                }
                None => {
                    assert!(
                        t.elapsed() < Duration::from_secs(10),
                        "round {round}: {done} of {posted} completed; daemon log:\n{}",
                        daemon.log_text()
                    );
                    std::thread::yield_now();
                }
            }
        }
        mapped += posted as u64;
        logs.push_str(&daemon.log_text());
    }
    let state = virtio_iommu::DeviceState::decode(&vm.save_state().unwrap()).unwrap();
    let maps = state
        .entries
        .iter()
        .filter(|e| matches!(e, virtio_iommu::Change::Map(_)))
        .count();
    assert_eq!(maps as u64, mapped, "every MAP exactly once");
    let answered: u64 = logs
        .lines()
        .filter_map(|l| {
            l.split("state file: ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    println!("{mapped} MAPs over 12 daemon kills; {answered} answered from the state file");
}
