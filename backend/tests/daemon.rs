// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The real daemon, over a real Unix socket, driven by the Rust test
//! front-end acting as VMM and guest driver.

use std::ops::{Deref, DerefMut};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use test_frontend::daemon::{DaemonProcess, Scratch};
use test_frontend::{Desc, Status, TestVm, VmOptions};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-iommu");
const READ: u32 = 1;
const WRITE: u32 = 2;

/// A daemon for one test, its socket in a scratch directory of its own;
/// stopped (SIGTERM, then SIGKILL) when dropped, the directory removed
/// with it (or kept if the test failed).
struct Daemon(DaemonProcess);

impl Daemon {
    fn start(name: &str, args: &[&str]) -> Self {
        let dir = Scratch::new(&format!("test-{name}"));
        let process = DaemonProcess::builder(BIN, dir.join("viommu.sock"))
            .args(args)
            .rust_log("warn")
            .terminate_on_drop(true)
            .spawn()
            .owning(dir);
        Self(process)
    }

    fn connect(&self) -> TestVm {
        self.0
            .connect(VmOptions::default())
            .expect("connect to the daemon")
    }

    /// The test's scratch directory.
    fn dir(&self) -> &Path {
        self.0.scratch().expect("started with one").path()
    }
}

impl Deref for Daemon {
    type Target = DaemonProcess;

    fn deref(&self) -> &DaemonProcess {
        &self.0
    }
}

impl DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut DaemonProcess {
        &mut self.0
    }
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

#[test]
fn config_space_says_what_the_flags_asked() {
    let d = Daemon::start(
        "config",
        &[
            "--endpoints",
            "8",
            "--page-size-mask",
            "0x40201000",
            "--input-range",
            "0x1000-0xffffffffff",
            "--domain-range",
            "1-100",
            "--probe-size",
            "256",
            "--bypass",
            "false",
        ],
    );
    let mut vm = d.connect();
    let c = vm.config().unwrap();
    assert_eq!(c.len(), 40);
    assert_eq!(le64(&c, 0), 0x4020_1000);
    assert_eq!(le64(&c, 8), 0x1000);
    assert_eq!(le64(&c, 16), 0xff_ffff_ffff);
    assert_eq!(le32(&c, 24), 1);
    assert_eq!(le32(&c, 28), 100);
    assert_eq!(le32(&c, 32), 256);
    assert_eq!(c[36], 0);
}

#[test]
fn attach_map_unmap_detach_succeed_in_order() {
    let d = Daemon::start("basic", &["--endpoints", "8"]);
    let mut vm = d.connect();
    let buf = vm.ram().alloc(0x4000, 0x1000).unwrap();
    assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
    assert_eq!(
        vm.map(1, 0x10_0000, 0x10_3fff, buf, READ | WRITE).unwrap(),
        Status::Ok
    );
    assert_eq!(vm.unmap(1, 0x10_0000, 0x10_3fff).unwrap(), Status::Ok);
    assert_eq!(vm.detach(1, 8).unwrap(), Status::Ok);
}

/// The scheduling options make the vring worker call what nothing else
/// does (getpriority and sched_setattr for its slice): under the default
/// filter (`--seccomp kill`) a call missing from the list kills the daemon
/// at its first request.
#[test]
fn the_worker_slice_option_serves_requests_under_the_default_seccomp_filter() {
    let d = Daemon::start(
        "slice",
        &[
            "--endpoints",
            "8",
            "--worker-slice-us",
            "1000",
            "--poll-us",
            "0",
        ],
    );
    let mut vm = d.connect();
    let buf = vm.ram().alloc(0x1000, 0x1000).unwrap();
    assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
    assert_eq!(
        vm.map(1, 0x1000, 0x1fff, buf, READ | WRITE).unwrap(),
        Status::Ok
    );
    assert_eq!(vm.unmap(1, 0x1000, 0x1fff).unwrap(), Status::Ok);
}

#[test]
fn requests_naming_unknown_things_get_noent() {
    let d = Daemon::start("noent", &["--endpoints", "8"]);
    let mut vm = d.connect();
    let buf = vm.ram().alloc(0x1000, 0x1000).unwrap();
    assert_eq!(vm.attach(1, 9, 0).unwrap(), Status::NoEnt);
    assert_eq!(vm.map(1, 0x1000, 0x1fff, buf, READ).unwrap(), Status::NoEnt);
    assert_eq!(vm.unmap(2, 0x1000, 0x1fff).unwrap(), Status::NoEnt);
    assert_eq!(vm.detach(3, 8).unwrap(), Status::NoEnt);
    let (status, _) = vm.probe(9).unwrap();
    assert_eq!(status, Status::NoEnt);
}

#[test]
fn map_rules_give_the_spec_statuses() {
    let d = Daemon::start(
        "maprules",
        &["--endpoints", "8", "--input-range", "0-0xffffffff"],
    );
    let mut vm = d.connect();
    let buf = vm.ram().alloc(0x4000, 0x1000).unwrap();
    assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
    assert_eq!(
        vm.map(1, 0x10_0000, 0x10_1fff, buf, READ).unwrap(),
        Status::Ok
    );
    // Overlap.
    assert_eq!(
        vm.map(1, 0x10_1000, 0x10_2fff, buf, READ).unwrap(),
        Status::Inval
    );
    // Misaligned to the 4 KiB page size.
    assert_eq!(
        vm.map(1, 0x20_0800, 0x20_17ff, buf, READ).unwrap(),
        Status::Range
    );
    // virt_start > virt_end.
    assert_eq!(
        vm.map(1, 0x20_1000, 0x20_0fff, buf, READ).unwrap(),
        Status::Inval
    );
    // Outside the input range.
    assert_eq!(
        vm.map(1, 0x1_0000_0000, 0x1_0000_0fff, buf, READ).unwrap(),
        Status::Range
    );
    // Unknown flags.
    assert_eq!(
        vm.map(1, 0x30_0000, 0x30_0fff, buf, 0x80).unwrap(),
        Status::Inval
    );
    // Physical memory outside guest RAM.
    assert_eq!(
        vm.map(1, 0x30_0000, 0x30_0fff, 0x7_0000_0000, READ)
            .unwrap(),
        Status::Inval
    );
    // An UNMAP that would split a mapping.
    assert_eq!(vm.unmap(1, 0x10_0000, 0x10_0fff).unwrap(), Status::Range);
    // ... and the mapping is still whole: unmapping it all works.
    assert_eq!(vm.unmap(1, 0x10_0000, 0x10_1fff).unwrap(), Status::Ok);
    // Unmapping nothing is not an error.
    assert_eq!(vm.unmap(1, 0x10_0000, 0x10_1fff).unwrap(), Status::Ok);
}

#[test]
fn probe_reports_the_msi_window() {
    let d = Daemon::start("probe", &["--endpoints", "8"]);
    let mut vm = d.connect();
    let (status, props) = vm.probe(8).unwrap();
    assert_eq!(status, Status::Ok);
    let msi = props
        .iter()
        .find(|p| p.subtype == 1)
        .expect("an MSI reserved region");
    assert_eq!((msi.start, msi.end), (0xfee0_0000, 0xfeef_ffff));
}

#[test]
fn endpoints_move_between_domains_and_domains_die_with_their_last_endpoint() {
    let d = Daemon::start("domains", &["--endpoints", "8,16"]);
    let mut vm = d.connect();
    let buf = vm.ram().alloc(0x1000, 0x1000).unwrap();
    assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
    assert_eq!(vm.attach(2, 16, 0).unwrap(), Status::Ok);
    assert_eq!(vm.map(1, 0x1000, 0x1fff, buf, READ).unwrap(), Status::Ok);
    // Endpoint 8 moves to domain 2: domain 1 loses its last endpoint.
    assert_eq!(vm.attach(2, 8, 0).unwrap(), Status::Ok);
    assert_eq!(vm.map(1, 0x2000, 0x2fff, buf, READ).unwrap(), Status::NoEnt);
    assert_eq!(vm.map(2, 0x1000, 0x1fff, buf, READ).unwrap(), Status::Ok);
    assert_eq!(vm.detach(2, 8).unwrap(), Status::Ok);
    assert_eq!(vm.detach(2, 16).unwrap(), Status::Ok);
    assert_eq!(vm.map(2, 0x3000, 0x3fff, buf, READ).unwrap(), Status::NoEnt);
}

#[test]
fn bypass_domains_take_no_mappings_and_the_bypass_bit_is_writable() {
    let d = Daemon::start("bypass", &["--endpoints", "8", "--bypass", "false"]);
    let mut vm = d.connect();
    let buf = vm.ram().alloc(0x1000, 0x1000).unwrap();
    assert_eq!(vm.attach(1, 8, 1).unwrap(), Status::Ok);
    assert_eq!(vm.map(1, 0x1000, 0x1fff, buf, READ).unwrap(), Status::Inval);
    assert_eq!(vm.config().unwrap()[36], 0);
    vm.set_bypass(true).unwrap();
    assert_eq!(vm.config().unwrap()[36], 1);
}

#[test]
fn an_unknown_request_type_is_used_unwritten_with_length_0() {
    // virtio 1.3 §5.13.6: the device SHOULD NOT write the buffer and SHOULD
    // set the used length to zero.
    let d = Daemon::start("unknown-type", &["--endpoints", "8"]);
    let mut vm = d.connect();
    let req = vm.ram().alloc(0x100, 8).unwrap();
    let reply = vm.ram().alloc(0x100, 8).unwrap();
    let mut bytes = [0u8; 20];
    bytes[0] = 0x42;
    vm.ram().write(req, &bytes).unwrap();
    vm.ram().write(reply, &[0xaa; 4]).unwrap();
    let used = vm
        .submit_raw(&[
            Desc {
                gpa: req,
                len: 20,
                write: false,
            },
            Desc {
                gpa: reply,
                len: 4,
                write: true,
            },
        ])
        .unwrap();
    assert_eq!(used, 0);
    let mut tail = [0u8; 4];
    vm.ram().read(reply, &mut tail).unwrap();
    assert_eq!(tail, [0xaa; 4], "nothing written");
    // The device goes on serving.
    assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
}

#[test]
fn a_saved_state_loads_into_a_fresh_daemon_with_its_domains_and_mappings() {
    let src = Daemon::start("state-src", &["--endpoints", "8,16"]);
    let mut vm = src.connect();
    let buf = vm.ram().alloc(0x2000, 0x1000).unwrap();
    assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
    assert_eq!(vm.map(1, 0x1000, 0x2fff, buf, 3).unwrap(), Status::Ok);
    assert_eq!(vm.attach(2, 16, 0).unwrap(), Status::Ok);
    let state = vm.save_state().unwrap();
    drop(vm);

    let dst = Daemon::start("state-dst", &["--endpoints", "8,16"]);
    let mut vm = dst.connect();
    vm.load_state(&state).unwrap();
    // Domain 1 holds the mapping: mapping over it is refused, unmapping it
    // works, and then the range is free again.
    assert_eq!(vm.map(1, 0x1000, 0x1fff, buf, 3).unwrap(), Status::Inval);
    assert_eq!(vm.unmap(1, 0x1000, 0x2fff).unwrap(), Status::Ok);
    assert_eq!(vm.map(1, 0x1000, 0x1fff, buf, 3).unwrap(), Status::Ok);
    // Endpoint 16 is in domain 2.
    assert_eq!(vm.detach(2, 16).unwrap(), Status::Ok);

    // A damaged state fails the load and leaves a reset device that serves.
    let mut bad = state.clone();
    bad[0] ^= 0xff;
    assert!(vm.load_state(&bad).is_err());
    assert_eq!(vm.unmap(1, 0, 0xfff).unwrap(), Status::NoEnt, "reset");
    assert!(vm.load_state(&state[..state.len() - 3]).is_err());
    assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
}

#[test]
fn with_a_dirty_log_the_pages_the_daemon_writes_are_logged() {
    // QEMU migrates a vhost-user device only if its back-end logs the guest
    // pages it writes (VHOST_USER_PROTOCOL_F_LOG_SHMFD, SET_LOG_BASE).
    let d = Daemon::start("dirty-log", &["--endpoints", "8"]);
    let mut vm = d.connect();
    let pages = 16 << 20 >> 12;
    let log = tempfile_of(d.dir(), pages / 8);
    vm.set_dirty_log(&log, pages as u64 / 8).unwrap();
    let req = vm.ram().alloc(0x1000, 0x1000).unwrap();
    let reply = vm.ram().alloc(0x1000, 0x1000).unwrap();
    vm.ram()
        .write(req, &[1, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0])
        .unwrap();
    let used = vm
        .submit_raw(&[
            Desc {
                gpa: req,
                len: 16,
                write: false,
            },
            Desc {
                gpa: reply,
                len: 4,
                write: true,
            },
        ])
        .unwrap();
    assert_eq!(used, 4);
    let bits = std::fs::read(format!("/proc/self/fd/{}", log.as_raw_fd())).unwrap();
    let logged = |gpa: u64| bits[(gpa >> 12) as usize / 8] & (1 << ((gpa >> 12) % 8)) != 0;
    assert!(logged(reply), "the reply's page");
    assert!(!logged(req), "the request was only read");
}

#[test]
fn with_a_dirty_log_the_used_ring_pages_are_logged_too() {
    // The used ring is written in place, a batch at a time: its pages must
    // reach the log like the replies do, or a migrated guest would find
    // completions missing.
    let d = Daemon::start("dirty-log-used", &["--endpoints", "8"]);
    let mut vm = d.connect();
    let pages = 16 << 20 >> 12;
    let log = tempfile_of(d.dir(), pages / 8);
    vm.set_dirty_log(&log, pages as u64 / 8).unwrap();
    // A few requests in one batch.
    assert_eq!(
        vm.submit_batch(&[
            test_frontend::Request::Attach {
                domain: 1,
                endpoint: 8,
                flags: 0,
            },
            test_frontend::Request::Detach {
                domain: 1,
                endpoint: 8,
            },
        ])
        .unwrap(),
        [Status::Ok, Status::Ok]
    );
    let used = vm.request_queue().addrs().used;
    let bits = std::fs::read(format!("/proc/self/fd/{}", log.as_raw_fd())).unwrap();
    let logged = |gpa: u64| bits[(gpa >> 12) as usize / 8] & (1 << ((gpa >> 12) % 8)) != 0;
    assert!(logged(used), "the used ring's page");
}

/// A file of `len` zero bytes, made in `dir` and unlinked at once.
fn tempfile_of(dir: &Path, len: usize) -> std::fs::File {
    let path = dir.join("dirty-log");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let _ = std::fs::remove_file(&path);
    f.set_len(len as u64).unwrap();
    f
}

#[test]
fn the_last_page_of_a_full_64_bit_input_range_maps_and_unmaps() {
    let d = Daemon::start(
        "last-page",
        &["--endpoints", "8", "--input-range", "0-0xffffffffffffffff"],
    );
    let mut vm = d.connect();
    let buf = vm.ram().alloc(0x1000, 0x1000).unwrap();
    assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
    let last = u64::MAX - 0xfff;
    assert_eq!(vm.map(1, last, u64::MAX, buf, 3).unwrap(), Status::Ok);
    assert_eq!(vm.unmap(1, last, u64::MAX).unwrap(), Status::Ok);
    assert_eq!(vm.map(1, last, u64::MAX, buf, 3).unwrap(), Status::Ok);
}

#[test]
fn a_chain_pointing_outside_guest_memory_is_completed_empty_and_the_daemon_lives_on() {
    let d = Daemon::start("badchain", &["--endpoints", "8"]);
    let mut vm = d.connect();
    let reply = vm.ram().alloc(0x100, 8).unwrap();
    let used = vm
        .submit_raw(&[
            Desc {
                gpa: 0x7_0000_0000,
                len: 20,
                write: false,
            },
            Desc {
                gpa: reply,
                len: 4,
                write: true,
            },
        ])
        .unwrap();
    assert_eq!(used, 0);
    // A short request (no room for the body) gets an error status.
    let req = vm.ram().alloc(0x100, 8).unwrap();
    vm.ram().write(req, &[1, 0, 0, 0]).unwrap();
    let used = vm
        .submit_raw(&[
            Desc {
                gpa: req,
                len: 4,
                write: false,
            },
            Desc {
                gpa: reply,
                len: 4,
                write: true,
            },
        ])
        .unwrap();
    assert_eq!(used, 4);
    let mut tail = [0u8; 4];
    vm.ram().read(reply, &mut tail).unwrap();
    assert_ne!(tail[0], 0, "a short ATTACH must not succeed");
    assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
}

#[test]
fn a_batch_of_requests_completes_with_one_kick() {
    let d = Daemon::start("batch", &["--endpoints", "8"]);
    let mut vm = d.connect();
    let buf = vm.ram().alloc(0x40_0000, 0x1000).unwrap();
    assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
    let reqs: Vec<_> = (0..64u64)
        .map(|i| test_frontend::Request::Map {
            domain: 1,
            virt_start: 0x100_0000 + i * 0x1000,
            virt_end: 0x100_0fff + i * 0x1000,
            phys_start: buf + i * 0x1000,
            flags: READ | WRITE,
        })
        .collect();
    let statuses = vm.submit_batch(&reqs).unwrap();
    assert_eq!(statuses.len(), 64);
    assert!(statuses.iter().all(|s| *s == Status::Ok), "{statuses:?}");
    assert_eq!(
        vm.unmap(1, 0x100_0000, 0x100_0000 + 64 * 0x1000 - 1)
            .unwrap(),
        Status::Ok
    );
}

#[test]
fn a_new_front_end_finds_a_fresh_device() {
    let d = Daemon::start("reconnect", &["--endpoints", "8"]);
    {
        let mut vm = d.connect();
        assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
    }
    let mut vm = d.connect();
    let buf = vm.ram().alloc(0x1000, 0x1000).unwrap();
    // Domain 1 died with the old front-end.
    assert_eq!(vm.map(1, 0x1000, 0x1fff, buf, READ).unwrap(), Status::NoEnt);
    assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
}

#[test]
fn sigterm_ends_the_daemon_promptly_and_cleanly() {
    for connected in [false, true] {
        let mut d = Daemon::start(&format!("sigterm-{connected}"), &["--endpoints", "8"]);
        let vm = connected.then(|| d.connect());
        d.signal(libc::SIGTERM);
        let (status, took) = d.wait_exit(Duration::from_secs(5));
        assert!(status.success(), "exit status {status}");
        assert!(took < Duration::from_secs(2), "took {took:?}");
        assert!(!d.socket().exists(), "the socket file is removed");
        drop(vm);
    }
}

/// `st_dev`, `st_ino` of what `path` names.
fn file_id(path: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path).unwrap();
    (m.dev(), m.ino())
}

/// A daemon started by mistake on the sockets or the state file of one
/// that runs is refused, saying which, and takes none of its paths: the
/// first keeps serving at every one, and, stopped, leaves no lock file.
#[test]
fn a_second_daemon_on_a_served_path_or_state_file_is_refused_and_takes_nothing() {
    let dir = Scratch::new("test-served-twice");
    let (sock, mirror, ctl, state) = (
        dir.join("viommu.sock"),
        dir.join("mirror.sock"),
        dir.join("ctl.sock"),
        dir.join("state"),
    );
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let mut first = DaemonProcess::builder(BIN, &sock)
        .mirror(&mirror)
        .args(["--endpoints", "8", "--control-socket", &s(&ctl)])
        .args(["--state-file", &s(&state)])
        .rust_log("warn")
        .terminate_on_drop(true)
        .spawn();
    let ids = [&sock, &mirror, &ctl].map(|p| file_id(p));
    let other = |name: &str| s(&dir.join(name));
    let pid = first.pid().to_string();
    for (args, says) in [
        // The whole command line again: the first socket it binds is
        // refused.
        (
            vec![s(&sock), s(&mirror), s(&ctl), s(&state)],
            format!("{} is served by process {pid}", ctl.display()),
        ),
        // Only the state file: refused after binding its own sockets,
        // which go with it.
        (
            vec![other("v1"), other("m1"), other("c1"), s(&state)],
            "is in use by another daemon".to_string(),
        ),
        // Only the vhost-user socket in common.
        (
            vec![s(&sock), other("m2"), other("c2"), other("s2")],
            format!("{} is served by process {pid}", sock.display()),
        ),
        // Only the mirror socket.
        (
            vec![other("v3"), s(&mirror), other("c3"), other("s3")],
            format!("{} is served by process {pid}", mirror.display()),
        ),
        // Only the control socket.
        (
            vec![other("v4"), other("m4"), s(&ctl), other("s4")],
            format!("{} is served by process {pid}", ctl.display()),
        ),
    ] {
        let out = Command::new(BIN)
            .args(["--endpoints", "8", "--socket-path", &args[0]])
            .args(["--mirror-socket", &args[1], "--control-socket", &args[2]])
            .args(["--state-file", &args[3]])
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {err}");
        assert!(err.contains(&says), "{args:?}: {err}");
        assert_eq!([&sock, &mirror, &ctl].map(|p| file_id(p)), ids, "{args:?}");
    }
    // What the refused ones had bound or made before they gave up went
    // with them.
    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".log"))
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            "ctl.sock",
            "ctl.sock.lock",
            "mirror.sock",
            "mirror.sock.lock",
            "state",
            "viommu.sock",
            "viommu.sock.lock"
        ]
    );
    first.assert_alive();
    let mut vm = first.connect(VmOptions::default()).unwrap();
    assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
    drop(vm);
    first.signal(libc::SIGTERM);
    let (status, _) = first.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "{status}");
    for p in [&sock, &mirror, &ctl] {
        let mut lock = p.as_os_str().to_owned();
        lock.push(".lock");
        assert!(!p.exists(), "{} left", p.display());
        assert!(
            !Path::new(&lock).exists(),
            "{} left",
            Path::new(&lock).display()
        );
    }
}

fn run_cli(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().unwrap()
}

#[test]
fn print_capabilities_prints_json_and_exits_zero() {
    let out = run_cli(&["--print-capabilities"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("\"type\": \"iommu\""), "{text}");
}

#[test]
fn bad_command_lines_exit_nonzero_with_a_message() {
    for (args, needle) in [
        (
            vec!["--socket-path", "/tmp/x", "--fd", "3"],
            "cannot be used with",
        ),
        (vec![], "--socket-path"),
        (
            vec!["--socket-path", "/tmp/vui-x.sock", "--mode", "iommufd"],
            "needs --vfio EP=DEVICE, or --mirror-socket",
        ),
        (
            vec![
                "--socket-path",
                "/tmp/vui-x.sock",
                "--mode",
                "iommufd",
                "--vfio",
                "8=/dev/vfio/devices/vfio0",
                "--iommufd",
                "/nonexistent/iommu",
            ],
            "CONFIG_IOMMUFD",
        ),
        (
            vec!["--socket-path", "/tmp/vui-x.sock", "--vfio", "8=fd:9"],
            "--vfio is for --mode iommufd",
        ),
        (
            vec!["--socket-path", "/tmp/vui-x.sock", "--endpoints", "zz"],
            "--endpoints",
        ),
        (
            vec!["--socket-path", "/nonexistent-dir/x.sock"],
            "cannot listen",
        ),
        (vec!["--fd", "77"], "--fd 77"),
    ] {
        let out = run_cli(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(needle),
            "{args:?}: stderr {err:?} lacks {needle:?}"
        );
    }
}

/// Send `n` MAP/UNMAP pairs back to back, the way Linux's driver does
/// (post, notify if the device asked for it, spin on the used ring); the
/// kicks it took.
fn strict_pairs(vm: &mut TestVm, n: usize) -> u64 {
    use test_frontend::Request;
    let buf = vm.ram().alloc(0x1000, 0x1000).unwrap();
    let before = vm.request_queue().kicks();
    for i in 0..n {
        let iova = 0x10_0000 + (i as u64 % 64) * 0x1000;
        let reqs = [
            Request::Map {
                domain: 1,
                virt_start: iova,
                virt_end: iova + 0xfff,
                phys_start: buf,
                flags: READ | WRITE,
            },
            Request::Unmap {
                domain: 1,
                virt_start: iova,
                virt_end: iova + 0xfff,
            },
        ];
        for r in &reqs {
            assert_eq!(vm.submit(std::slice::from_ref(r)).unwrap(), 1);
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                if let Some(c) = vm.poll_completion().unwrap() {
                    assert_eq!(c.status, Status::Ok);
                    break;
                }
                assert!(Instant::now() < deadline, "request {i} never completed");
                std::hint::spin_loop();
            }
        }
    }
    vm.request_queue().kicks() - before
}

/// The host's idle CPUs over a stretch: (idle jiffies, all jiffies) of
/// /proc/stat's `cpu` line now, to be subtracted from a later reading.
fn host_jiffies() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .filter_map(|w| w.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (idle, v.iter().take(8).sum())
}

#[test]
fn while_the_daemon_polls_back_to_back_requests_need_no_kick() {
    // A generous window, so that a loaded test machine still shows it.
    let d = Daemon::start("poll", &["--poll-us", "200000"]);
    let mut vm = d.connect();
    assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
    // The window opens as short sleeps show polling would pay. The poller
    // gives way when it finds itself off its CPU and no CPU is spare
    // (src/poll.rs, src/spare.rs: by design, on a busy host it must not
    // spin): on a test machine busy with other tests a round may need
    // kicks; in a round with a CPU to spare almost none. So each round
    // also measures the host's idle CPUs.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    strict_pairs(&mut vm, 50);
    let mut rounds = Vec::new();
    for _ in 0..12 {
        let (idle0, all0) = host_jiffies();
        let kicks = strict_pairs(&mut vm, 200);
        let (idle1, all1) = host_jiffies();
        let spare = cpus * (idle1 - idle0) as f64 / (all1 - all0).max(1) as f64;
        rounds.push((kicks, spare));
        if kicks < 40 {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    if rounds.iter().all(|&(k, spare)| k >= 40 && spare < 0.75) {
        eprintln!(
            "skipped the polling half: no round had a CPU to spare (kicks, idle CPUs: \
             {rounds:?}), and the poller gives way then by design"
        );
    } else {
        assert!(
            rounds.iter().any(|&(k, _)| k < 40),
            "kicks for 400 requests and the host's idle CPUs, round by round: {rounds:?}"
        );
    }

    let d = Daemon::start("nopoll", &["--poll-us", "0"]);
    let mut vm = d.connect();
    assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
    // Without polling, a request needs a kick unless it arrives before the
    // daemon re-enabled notifications after the previous one.
    let kicks = strict_pairs(&mut vm, 50);
    assert!(
        kicks >= 50,
        "without polling: {kicks} kicks for 100 requests"
    );
}

/// `--log-level trace`: a line per request (as QEMU's trace events) with
/// its fields and status; RUST_LOG, set, is applied over the flag.
#[test]
fn log_level_trace_gives_a_line_per_request_and_rust_log_overrides_it() {
    for (rust_log, traced) in [("", true), ("info", false), ("virtio_iommu=trace", true)] {
        let dir = Scratch::new("test-trace");
        let log = dir.join("daemon.log");
        let d = DaemonProcess::builder(BIN, dir.join("viommu.sock"))
            .args(["--endpoints", "8", "--log-level", "trace"])
            .rust_log(rust_log)
            .log_file(&log)
            .spawn()
            .owning(dir);
        let mut vm = d.connect(VmOptions::default()).unwrap();
        let buf = vm.ram().alloc(0x1000, 0x1000).unwrap();
        assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
        assert_eq!(vm.map(1, 0x1000, 0x1fff, buf, READ).unwrap(), Status::Ok);
        assert_eq!(vm.unmap(1, 0x1000, 0x1fff).unwrap(), Status::Ok);
        assert_eq!(vm.detach(2, 8).unwrap(), Status::NoEnt);
        let lines = [
            "virtio_iommu_attach domain=1 endpoint=0x8 flags=0x0 status=Ok".to_string(),
            format!(
                "virtio_iommu_map domain=1 virt_start=0x1000 virt_end=0x1fff \
                 phys_start={buf:#x} flags=0x1 status=Ok"
            ),
            "virtio_iommu_unmap domain=1 virt_start=0x1000 virt_end=0x1fff status=Ok".into(),
            "virtio_iommu_detach domain=2 endpoint=0x8 status=NoEnt".into(),
        ];
        drop(vm);
        let text = d.wait_log("front-end disconnected", Duration::from_secs(5));
        for l in &lines {
            assert_eq!(
                text.contains(l.as_str()),
                traced,
                "RUST_LOG={rust_log:?}: {l}\n{text}"
            );
        }
    }
}
