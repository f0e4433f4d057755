// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A front-end that lies or misbehaves must not take the daemon down
//! (issue 11, defects 1-3): memory tables that reach past the end of their
//! files, memory files shrunk under the daemon's feet, and connections that
//! come and go by the thousand or arrive at the open-file limit.
//!
//! Each test drives the real daemon binary over its socket, then checks
//! that the process is still alive, that a well-behaved front-end is served
//! next, and what the log said.

use std::fs::File;
use std::io;
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use test_frontend::daemon::{DaemonProcess, Scratch};
use test_frontend::fds::{open_fds, quiet_fds};
use test_frontend::{Status, TestVm, VmOptions};
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-iommu");
const VERSION_1: u64 = 1 << 32;
const PROTOCOL_FEATURES: u64 = 1 << 30;
/// Where the hostile front-end claims its memory lives in its own address
/// space (vhost-user ring addresses are front-end virtual addresses).
const FRONTEND_VA: u64 = 0x7f00_0000_0000;

/// A daemon whose log goes to a file in a scratch directory of its own,
/// with the checks these tests make on it; killed when dropped (the
/// directory removed with it, or kept if the test failed).
struct Daemon(DaemonProcess);

impl Daemon {
    fn start(name: &str, args: &[&str]) -> Self {
        let dir = Scratch::new(&format!("hostile-{name}"));
        let process = DaemonProcess::builder(BIN, dir.join("viommu.sock"))
            .args(["--endpoints", "8"])
            .args(args)
            .rust_log("warn")
            .log_file(dir.join("daemon.log"))
            .spawn()
            .owning(dir);
        Self(process)
    }

    /// A well-behaved front-end is served: full handshake and an ATTACH.
    fn assert_serves(&mut self) {
        self.assert_alive();
        let mut vm = self
            .connect(VmOptions::default())
            .expect("a well-behaved front-end connects");
        assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
        drop(vm);
        self.assert_alive();
    }

    fn open_fds(&self) -> usize {
        open_fds(self.pid())
    }

    /// The daemon's open-file count once it has settled at or below `want`
    /// (a front-end's resources are released after its socket closes).
    fn settled_fds(&self, want: usize, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        loop {
            let n = self.open_fds();
            if n <= want || Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's idle open-file count (see [`quiet_fds`]).
    fn quiet_fds(&self) -> usize {
        quiet_fds(self.pid())
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

/// A memfd of `size` bytes, sealed against shrinking and growing when
/// `sealed` (as QEMU's memory-backend-memfd does by default).
fn memfd(size: u64, sealed: bool) -> File {
    // SAFETY: the name is NUL-terminated and not retained; the result is
    // checked before use.
    let fd = unsafe {
        libc::memfd_create(
            c"hostile-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: a fresh descriptor nobody else owns.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size).unwrap();
    if sealed {
        // SAFETY: fcntl on an open descriptor with integer arguments.
        let r = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
            )
        };
        assert_eq!(r, 0, "F_ADD_SEALS: {}", io::Error::last_os_error());
    }
    file
}

/// A front-end that speaks vhost-user by hand: the handshake up to the
/// memory table, with REPLY_ACK so every message gets its verdict.
struct RawFrontend {
    fe: Frontend,
    kick: EventFd,
    call: EventFd,
}

impl RawFrontend {
    fn connect(d: &Daemon) -> Self {
        let stream = UnixStream::connect(d.socket()).expect("connect");
        // A stalled daemon fails the test instead of hanging it.
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut fe = Frontend::from_stream(stream, 2);
        fe.set_owner().unwrap();
        let offered = fe.get_features().unwrap();
        assert_ne!(offered & VERSION_1, 0);
        fe.set_features(VERSION_1 | PROTOCOL_FEATURES).unwrap();
        let proto = fe.get_protocol_features().unwrap()
            & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK);
        fe.set_protocol_features(proto).unwrap();
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        Self {
            fe,
            kick: EventFd::new(0).unwrap(),
            call: EventFd::new(0).unwrap(),
        }
    }

    /// SET_MEM_TABLE with these (gpa, size, file offset) regions of `file`.
    fn set_mem_table(&mut self, file: &File, regions: &[(u64, u64, u64)]) -> vhost::Result<()> {
        let info: Vec<_> = regions
            .iter()
            .map(|&(gpa, size, offset)| VhostUserMemoryRegionInfo {
                guest_phys_addr: gpa,
                memory_size: size,
                userspace_addr: FRONTEND_VA + gpa,
                mmap_offset: offset,
                mmap_handle: file.as_raw_fd(),
            })
            .collect();
        self.fe.set_mem_table(&info).map(|_| ())
    }

    /// Set up the request queue (8 entries) with its rings at `gpa` and
    /// kick it: the daemon reads the rings there.
    fn ring_at(&mut self, gpa: u64) -> vhost::Result<()> {
        self.fe.set_vring_num(0, 8)?;
        self.fe.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: 8,
                queue_size: 8,
                flags: 0,
                desc_table_addr: FRONTEND_VA + gpa,
                avail_ring_addr: FRONTEND_VA + gpa + 0x1000,
                used_ring_addr: FRONTEND_VA + gpa + 0x2000,
                log_addr: None,
            },
        )?;
        self.fe.set_vring_base(0, 0)?;
        self.fe.set_vring_call(0, &self.call)?;
        self.fe.set_vring_kick(0, &self.kick)?;
        self.fe.set_vring_enable(0, true)?;
        let _ = self.kick.write(1);
        Ok(())
    }
}

// ---- defect 1: a region past the end of its file -------------------------

#[test]
fn a_region_reaching_past_the_end_of_its_file_is_refused() {
    let mut d = Daemon::start("past-eof", &[]);
    // 64 KiB of file, 16 MiB of claimed RAM.
    let file = memfd(0x1_0000, true);
    let mut fe = RawFrontend::connect(&d);
    let accepted = fe.set_mem_table(&file, &[(0, 16 << 20, 0)]).is_ok();
    // Whatever the front-end does next, the daemon never touches that
    // memory: ring set-up there (past the end of the file) and a kick.
    let _ = fe.ring_at(8 << 20);
    std::thread::sleep(Duration::from_millis(200));
    drop(fe);
    d.assert_alive();
    assert!(
        !accepted,
        "a table reaching past the end of its file is refused"
    );
    let log = d.wait_log("end of its file", Duration::from_secs(5));
    assert!(
        log.contains("end of its file"),
        "the log says why the table was refused:\n{log}"
    );
    d.assert_serves();
}

#[test]
fn regions_past_the_end_at_an_offset_or_second_in_the_table_are_refused() {
    let mut d = Daemon::start("past-eof-offset", &[]);
    let file = memfd(0x10_0000, true);
    // The offset puts the region's tail past the end.
    let mut fe = RawFrontend::connect(&d);
    assert!(fe.set_mem_table(&file, &[(0, 0x10_0000, 0x1000)]).is_err());
    drop(fe);
    // A region starting exactly at the end of the file.
    let mut fe = RawFrontend::connect(&d);
    assert!(fe.set_mem_table(&file, &[(0, 0x1000, 0x10_0000)]).is_err());
    drop(fe);
    // The first region is fine, the second is not: the whole table goes.
    let mut fe = RawFrontend::connect(&d);
    assert!(fe
        .set_mem_table(&file, &[(0, 0x8_0000, 0), (1 << 32, 0x10_0000, 0x8_0000)])
        .is_err());
    let _ = fe.ring_at(0x1000);
    std::thread::sleep(Duration::from_millis(200));
    drop(fe);
    // A table that fits exactly is accepted.
    let mut fe = RawFrontend::connect(&d);
    fe.set_mem_table(&file, &[(0, 0x8_0000, 0), (1 << 32, 0x8_0000, 0x8_0000)])
        .expect("a table inside its file is accepted");
    drop(fe);
    d.assert_serves();
}

// ---- defect 2: a memory file shrunk after SET_MEM_TABLE -------------------

#[test]
fn a_front_end_that_shrinks_its_memory_cannot_kill_the_daemon() {
    let mut d = Daemon::start("shrink", &[]);
    let file = memfd(16 << 20, false);
    let mut fe = RawFrontend::connect(&d);
    let accepted = fe.set_mem_table(&file, &[(0, 16 << 20, 0)]).is_ok();
    // Rings inside the file; then the file goes away under them.
    let _ = fe.ring_at(0x10_0000);
    file.set_len(0).unwrap();
    let _ = fe.kick.write(1);
    std::thread::sleep(Duration::from_millis(300));
    drop(fe);
    d.assert_alive();
    assert!(!accepted, "a memory file that can shrink is refused");
    let log = d.wait_log("F_SEAL_SHRINK", Duration::from_secs(5));
    assert!(
        log.contains("F_SEAL_SHRINK") && log.contains("memory-backend-memfd"),
        "the log names the seal and the fix:\n{log}"
    );
    d.assert_serves();
}

#[test]
fn a_file_sealed_against_shrinking_is_accepted_and_cannot_shrink() {
    let mut d = Daemon::start("sealed", &[]);
    let file = memfd(16 << 20, true);
    let mut fe = RawFrontend::connect(&d);
    fe.set_mem_table(&file, &[(0, 16 << 20, 0)])
        .expect("a sealed file is accepted");
    assert!(file.set_len(0).is_err(), "the seal holds");
    drop(fe);
    d.assert_serves();
}

#[test]
fn allow_unsealed_memory_accepts_a_file_that_can_shrink_and_says_so() {
    let mut d = Daemon::start("unsealed-ok", &["--allow-unsealed-memory"]);
    let file = memfd(16 << 20, false);
    let mut fe = RawFrontend::connect(&d);
    fe.set_mem_table(&file, &[(0, 16 << 20, 0)])
        .expect("an unsealed file is accepted when allowed");
    // The size is still checked.
    drop(fe);
    let mut fe = RawFrontend::connect(&d);
    assert!(fe.set_mem_table(&file, &[(0, 32 << 20, 0)]).is_err());
    drop(fe);
    let log = d.wait_log("not sealed", Duration::from_secs(5));
    assert!(log.contains("not sealed"), "a warning per table:\n{log}");
    d.assert_serves();
}

// ---- defect 3: file descriptors across connections ------------------------

/// How many front-ends come and go in the leak test (`VUI_RECONNECTS`
/// overrides it, e.g. 10000 for the figure).
fn reconnects() -> usize {
    std::env::var("VUI_RECONNECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

#[test]
fn front_ends_coming_and_going_leave_no_open_files_behind() {
    let mut d = Daemon::start("fd-leak", &[]);
    d.assert_serves();
    let baseline = d.quiet_fds();
    let n = reconnects();
    let t0 = Instant::now();
    for i in 0..n {
        if i % 10 == 0 {
            // A full handshake with rings and a request ...
            let mut vm = d.connect(VmOptions::default()).expect("connect");
            assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
        } else {
            // ... or a front-end that gives up after SET_OWNER.
            let stream = UnixStream::connect(d.socket()).unwrap();
            let fe = Frontend::from_stream(stream, 2);
            fe.set_owner().unwrap();
        }
    }
    let after = d.settled_fds(baseline, Duration::from_secs(10));
    eprintln!(
        "open files of the daemon: {baseline} before, {after} after {n} front-ends ({:?})",
        t0.elapsed()
    );
    assert_eq!(after, baseline, "no file stays open per connection");
    d.assert_serves();
}

/// `prlimit(2)` on the daemon: its soft open-file limit (the hard one
/// stays, so the limit can be raised again without privileges).
fn set_nofile(pid: u32, limit: u64) {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let pid = pid as libc::pid_t;
    // SAFETY: prlimit reading the current limits into a valid struct.
    let r = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(r, 0, "prlimit: {}", io::Error::last_os_error());
    let new = libc::rlimit {
        rlim_cur: limit.min(old.rlim_max),
        rlim_max: old.rlim_max,
    };
    // SAFETY: prlimit with a valid struct to read and no old value to write.
    let r = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    assert_eq!(r, 0, "prlimit: {}", io::Error::last_os_error());
}

/// A full handshake, given up after `limit`: Ok(true) served, Ok(false)
/// refused, Err if it did not finish in time (a silent stall).
fn try_handshake(d: &Daemon, limit: Duration) -> Result<bool, String> {
    let socket = d.socket().to_owned();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let served = TestVm::connect(&socket, VmOptions::default())
            .and_then(|mut vm| vm.attach(1, 8, 0))
            .map(|s| s == Status::Ok)
            .unwrap_or(false);
        let _ = tx.send(served);
    });
    rx.recv_timeout(limit)
        .map_err(|_| format!("no answer in {limit:?}"))
}

#[test]
fn at_the_open_file_limit_a_front_end_is_refused_with_a_logged_error_never_a_stall() {
    let mut d = Daemon::start("emfile", &[]);
    d.assert_serves();
    let pid = d.pid();
    let baseline = d.quiet_fds() as u64;
    // Every limit from "no room at all" up, and around the room the daemon
    // wants before it takes a connection (64 files): no limit may leave a
    // handshake hanging halfway.
    let mut refused = 0;
    for extra in (0..12u64).chain(56..72) {
        set_nofile(pid, baseline + extra);
        match try_handshake(&d, Duration::from_secs(10)) {
            Ok(served) => refused += u32::from(!served),
            Err(e) => panic!(
                "at {baseline}+{extra} open files the handshake stalled ({e}); log:\n{}",
                d.log_text()
            ),
        }
        d.assert_alive();
        // Back to a roomy limit: the next front-end is served.
        set_nofile(pid, 1024);
        if try_handshake(&d, Duration::from_secs(10)) != Ok(true) {
            panic!(
                "after the limit at {baseline}+{extra} was lifted no front-end was served; log:\n{}",
                d.log_text()
            );
        }
    }
    assert!(
        refused > 0,
        "some limit was low enough to refuse a front-end"
    );
    let log = d.log_text();
    assert!(
        log.contains("open files"),
        "the log says the daemon ran out of open files:\n{log}"
    );
    let after = d.settled_fds(baseline as usize, Duration::from_secs(10));
    assert!(
        after as u64 <= baseline,
        "{} files leaked on the error paths ({baseline} before, {after} after)",
        after as u64 - baseline
    );
}
