// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Migration of a guest whose DMA goes through vhost-user-iommu: while the
//! guest reads its disk through the vIOMMU in strict mode, the machine is
//! saved to a file and restored into a fresh QEMU with a fresh daemon, or
//! moved live to one waiting for it. The
//! daemon's state travels in QEMU's migration stream (vhost-user
//! DEVICE_STATE, docs/device-state.md); the guest's DMA must keep verifying,
//! including through mappings made before the move (the virtqueues').

use std::path::Path;
use std::time::{Duration, Instant};

use qemu_tests::{disk_image, hmp, scratch, skip_unless_ready, Daemon, Guest, Running, Viommu};

/// Where the machine goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Move {
    /// Saved to a file, then the destination starts and loads it.
    File,
    /// Live, over a Unix socket, to a destination waiting for it: the
    /// guest keeps running during the copy, so the daemon's dirty log must
    /// account for every page it writes.
    Live,
}

/// Wait for `migrate` to complete, on the monitor at `monitor`.
fn wait_completed(monitor: &Path, answer: &str) -> Duration {
    let t0 = Instant::now();
    loop {
        let info = hmp(monitor, "info migrate");
        if info.contains("Status: completed") || info.contains("status: completed") {
            return t0.elapsed();
        }
        assert!(
            !info.contains("failed") && t0.elapsed() < Duration::from_secs(120),
            "migration did not complete: {info}\n(migrate answered: {answer})"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn migrate(how: Move) {
    // The daemons run in this process: their warnings and errors go to the
    // test's output.
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .is_test(true)
        .try_init();
    let dir = scratch(match how {
        Move::File => "migration-file",
        Move::Live => "migration-live",
    });
    let state = dir.join("machine.state");
    let channel = dir.join("migration.sock");
    let mut g = Guest::new(Viommu::Ours, "migrate.sh");
    g.disk = Some(disk_image(&dir, 16));
    g.append = "iommu.strict=1".into();
    g.timeout = Duration::from_secs(300);
    let uri = match how {
        Move::File => format!("file:{}", state.display()),
        Move::Live => format!("unix:{}", channel.display()),
    };

    let start_dst = || {
        let dst_dir = dir.join("dst");
        std::fs::create_dir_all(&dst_dir).unwrap();
        let daemon = Daemon::start(&dst_dir);
        let mut guest = g.clone();
        guest.qemu_args = vec!["-incoming".into(), uri.clone()];
        let running = Running::start(guest.command(Some(&daemon)), &dst_dir.join("serial.log"));
        (daemon, running)
    };

    // A live destination waits for the source from the start.
    let mut dst = None;
    if how == Move::Live {
        dst = Some(start_dst());
        let t = Instant::now();
        while !channel.exists() {
            assert!(t.elapsed() < Duration::from_secs(30), "no incoming socket");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    // The source.
    let src_dir = dir.join("src");
    std::fs::create_dir_all(&src_dir).unwrap();
    let src_daemon = Daemon::start(&src_dir);
    let monitor = src_dir.join("monitor.sock");
    let mut src_guest = g.clone();
    src_guest.qemu_args = vec![
        "-monitor".into(),
        format!("unix:{},server=on,wait=off", monitor.display()),
    ];
    let mut src = Running::start(
        src_guest.command(Some(&src_daemon)),
        &src_dir.join("serial.log"),
    );
    src.wait_for("VUI-ROUND 2 ok", Duration::from_secs(240));
    let answer = hmp(&monitor, &format!("migrate {uri}"));
    assert!(!answer.contains("rror"), "migrate: {answer}");
    let moved_in = wait_completed(&monitor, &answer);
    // Let QEMU close the channel and exit cleanly.
    let _ = hmp(&monitor, "quit");
    let t_quit = Instant::now();
    while src.child.try_wait().unwrap().is_none() {
        assert!(
            t_quit.elapsed() < Duration::from_secs(30),
            "the source QEMU did not quit"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = src.output();
    let rounds_before = before.matches("VUI-ROUND").count();
    let src_stats = src_daemon.stats();
    drop(src);
    drop(src_daemon);

    // The destination: a fresh daemon, a fresh QEMU, the guest goes on.
    let t1 = Instant::now();
    let (dst_daemon, mut dst) = dst.take().unwrap_or_else(start_dst);
    dst.wait_for("VUI-CHECK migrate", Duration::from_secs(240));
    dst.wait_for("VUI-GUEST-DONE rc=0", Duration::from_secs(30));
    let after = dst.output();
    let rounds_after = after.matches("VUI-ROUND").count();
    let dst_stats = dst_daemon.stats();
    println!(
        "migration ({how:?}): moved in {moved_in:.1?}; {rounds_before} rounds before, \
         {rounds_after} after (then finished in {:.1?})",
        t1.elapsed()
    );
    println!("  source daemon: {src_stats}");
    println!("  destination daemon: {dst_stats}");
    assert!(rounds_after > 0, "no DMA after the move:\n{after}");
    assert!(
        dst_stats.ok[3] > 0 && dst_stats.ok[4] > 0,
        "the destination daemon served no MAP/UNMAP: {dst_stats}"
    );
    assert_eq!(
        dst_stats.ok[1], 0,
        "the guest did not attach again: its domains came with the state"
    );
}

#[test]
fn a_guest_doing_dma_through_the_viommu_migrates_to_a_fresh_qemu_and_daemon_through_a_file() {
    skip_unless_ready!();
    migrate(Move::File);
}

#[test]
fn a_guest_doing_dma_through_the_viommu_migrates_live_to_a_fresh_qemu_and_daemon() {
    skip_unless_ready!();
    migrate(Move::Live);
}
