// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Fault injection (issue 11): a front-end killed with SIGKILL at a random
//! point while it drives the daemon as hard as it can. Whatever it held is
//! released — the next front-end finds a fresh device — the daemon's open
//! files come back to where they were, and the daemon never stops serving.
//!
//! The front-end under load is this test binary run again as a child
//! (`VUI_KILL_CHILD`), so that it can die with SIGKILL anywhere: in the
//! handshake, mid-request, with requests in flight on the ring.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use test_frontend::daemon::{DaemonProcess, Scratch};
use test_frontend::fds::quiet_fds;
use test_frontend::rng::Rng;
use test_frontend::{Request, Status, TestVm, VmOptions};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-iommu");
const CHILD: &str = "VUI_KILL_CHILD";
/// Kills per run: `VUI_KILLS` (default 40, about 10 s).
const DEFAULT_KILLS: u32 = 40;

fn alive(daemon: &mut DaemonProcess) -> bool {
    daemon.try_wait().is_none()
}

/// The daemon, listening on a socket in `dir`; killed however the test
/// ends.
fn start(dir: &Scratch, endpoints: &str) -> DaemonProcess {
    DaemonProcess::builder(BIN, dir.join("viommu.sock"))
        .args(["--endpoints", endpoints])
        .rust_log("error")
        .spawn()
}

/// The child: map and unmap as fast as the daemon answers, in batches, over
/// two domains, until killed.
fn load(socket: &Path) {
    let mut vm = TestVm::connect(socket, VmOptions::default()).expect("child connects");
    let buf = vm.ram().alloc(0x10_0000, 0x1000).unwrap();
    assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
    assert_eq!(vm.attach(2, 16, 0).unwrap(), Status::Ok);
    let mut i: u64 = 0;
    loop {
        let domain = 1 + (i % 2) as u32;
        let iova = 0x10_0000 + (i % 64) * 0x1000;
        let maps: Vec<Request> = (0..8)
            .map(|k| Request::Map {
                domain,
                virt_start: iova + k * 0x40_0000,
                virt_end: iova + k * 0x40_0000 + 0xfff,
                phys_start: buf,
                flags: 3,
            })
            .collect();
        let _ = vm.submit_batch(&maps);
        let unmaps: Vec<Request> = (0..8)
            .map(|k| Request::Unmap {
                domain,
                virt_start: iova + k * 0x40_0000,
                virt_end: iova + k * 0x40_0000 + 0xfff,
            })
            .collect();
        let _ = vm.submit_batch(&unmaps);
        i += 1;
    }
}

#[test]
fn child_front_end_under_load() {
    // Only meaningful as the child of the test below.
    if let Ok(socket) = std::env::var(CHILD) {
        load(Path::new(&socket));
    }
}

#[test]
fn a_front_end_killed_anywhere_under_load_leaves_nothing_behind() {
    let dir = Scratch::new("kill");
    let mut daemon = start(&dir, "8,16");
    let socket = daemon.socket().to_owned();
    // One well-behaved front-end first: the daemon's steady state.
    drop(TestVm::connect(&socket, VmOptions::default()).unwrap());
    let baseline = quiet_fds(daemon.pid());

    let kills = std::env::var("VUI_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_KILLS);
    let seed = std::env::var("VUI_KILL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed);
    println!("{kills} kills, seed {seed} (VUI_KILLS, VUI_KILL_SEED)");
    let mut rng = Rng(seed);
    let me = std::env::current_exe().unwrap();
    for k in 0..kills {
        let mut child = Command::new(&me)
            .args(["--exact", "child_front_end_under_load", "--nocapture"])
            .env(CHILD, &socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Anywhere from before the handshake to deep in the load.
        std::thread::sleep(Duration::from_millis(rng.next_u64() % 300));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(alive(&mut daemon), "kill {k}: the daemon died");

        // The next front-end is served, with a fresh device: the domains
        // the dead one made are gone.
        let mut vm = TestVm::connect(&socket, VmOptions::default())
            .unwrap_or_else(|e| panic!("kill {k}: the next front-end was not served: {e}"));
        assert_eq!(
            vm.unmap(1, 0, 0xfff).unwrap(),
            Status::NoEnt,
            "kill {k}: domain 1 outlived its front-end"
        );
        assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
        drop(vm);
    }
    let after = quiet_fds(daemon.pid());
    println!("daemon open files: {baseline} before, {after} after {kills} kills");
    assert!(
        after <= baseline,
        "{} files leaked over {kills} kills",
        after - baseline
    );
}

/// CPU time (user + system, in clock ticks) of the daemon's threads.
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .map(|stat| {
            // Fields after the command name, which may hold spaces.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<&str> = rest.split_whitespace().collect();
            f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        })
        .sum()
}

#[test]
fn a_guest_whose_available_index_runs_ahead_of_its_ring_costs_no_spinning_core() {
    let dir = Scratch::new("bogus-avail");
    let mut daemon = start(&dir, "8");
    let socket = daemon.socket().to_owned();
    let mut vm = TestVm::connect(&socket, VmOptions::default()).unwrap();
    assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
    // The available index jumps a thousand entries past a 256-entry ring
    // (virtio 1.2 §2.7.6: the driver MUST NOT), then a kick.
    let q = vm.request_queue();
    let idx_at = q.addrs().avail + 2;
    let bogus = q.avail_idx().wrapping_add(1000);
    q.ram().write_u16(idx_at, bogus).unwrap();
    q.kick().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let pid = daemon.pid();
    let t0 = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(1));
    let spent = cpu_ticks(pid) - t0;
    // 100 ticks = a whole core for the second.
    assert!(
        spent < 30,
        "the daemon spent {spent} ticks of 100 on a broken ring"
    );
    drop(vm);
    // The worker is free to end: the next front-end is served.
    let mut next = TestVm::connect(&socket, VmOptions::default()).unwrap();
    assert_eq!(next.attach(1, 8, 0).unwrap(), Status::Ok);
    assert!(alive(&mut daemon));
}
