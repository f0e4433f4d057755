//! The daemon restarted under a running guest (issue 11): while the guest
//! reads its disk through the vIOMMU in strict mode — a MAP and an UNMAP
//! per request — the daemon is killed (SIGKILL), started again on the same
//! `--state-file`, then stopped (SIGTERM) and started again. QEMU
//! reconnects both sockets (`reconnect-ms=`), keeps translating from its
//! frozen copy meanwhile (docs/mirror-protocol.md §6), and the daemon comes
//! back with every domain and mapping (docs/state-journal.md): the guest's
//! data keeps verifying and its driver never sees an error.

use std::path::Path;
use std::time::{Duration, Instant};

use qemu_tests::{
    disk_image, guest_tools, scratch, skip_unless_ready, Guest, Running, Sockets, Viommu,
};
use test_frontend::daemon::{DaemonProcess, SIGKILL, SIGTERM};

/// Daemon number `n`: both sockets and the state file in `dir`, its log in
/// `daemon-<n>.log` there; killed when dropped.
fn start(bin: &Path, dir: &Path, n: u32) -> DaemonProcess {
    DaemonProcess::builder(bin, dir.join("viommu.sock"))
        .mirror(dir.join("viommu-mirror.sock"))
        .arg("--state-file")
        .arg(dir.join("state"))
        .rust_log("info")
        .log_file(dir.join(format!("daemon-{n}.log")))
        .spawn()
}

fn rounds(out: &str) -> usize {
    out.matches("VUI-ROUND").count()
}

#[test]
fn a_daemon_killed_and_restarted_under_a_guest_doing_dma_loses_nothing() {
    skip_unless_ready!();
    let dir = scratch("restart");
    let bin = guest_tools()
        .into_iter()
        .find(|p| p.ends_with("vhost-user-iommu"))
        .expect("the daemon binary");
    let mut g = Guest::new(Viommu::Ours, "migrate.sh");
    g.disk = Some(disk_image(&dir, 16));
    g.append = "iommu.strict=1".into();
    g.timeout = Duration::from_secs(300);
    let sockets = Sockets {
        socket: &dir.join("viommu.sock"),
        mirror: &dir.join("viommu-mirror.sock"),
        reconnect: true,
    };

    let mut daemon = start(&bin, &dir, 1);
    let mut guest = Running::start(g.command_with(Some(sockets)), &dir.join("serial.log"));
    guest.wait_for("VUI-ROUND 2 ok", Duration::from_secs(240));

    let mut restarts = Vec::new();
    for (n, signal, number) in [(2, "KILL", SIGKILL), (3, "TERM", SIGTERM)] {
        let before = rounds(&guest.output());
        daemon.signal(number);
        daemon.wait();
        let old_log = daemon.log_text();
        let t = Instant::now();
        daemon = start(&bin, &dir, n);
        // Two more rounds of verified reads after the restart.
        let want = format!("VUI-ROUND {} ok", before + 1);
        guest.wait_for(&want, Duration::from_secs(120));
        let took = t.elapsed();
        let log = daemon.log_text();
        assert!(
            log.contains("state file: recovered"),
            "daemon {n} recovered nothing:\n{log}\n(the one before:\n{old_log})"
        );
        let recovered = log
            .lines()
            .find(|l| l.contains("state file: recovered"))
            .unwrap_or_default()
            .to_owned();
        restarts.push((signal, took, recovered));
    }
    guest.wait_for("VUI-CHECK migrate", Duration::from_secs(240));
    guest.wait_for("VUI-GUEST-DONE rc=0", Duration::from_secs(30));
    let out = guest.output();
    for (signal, took, recovered) in &restarts {
        println!(
            "restart after SIG{signal}: guest's next verified round {took:.1?} after; {recovered}"
        );
    }
    for bad in ["I/O error", "viommu", "Buffer I/O", "blk_update_request"] {
        let lines: Vec<&str> = out
            .lines()
            .filter(|l| l.contains(bad) && (l.contains("error") || l.contains("fail")))
            .collect();
        assert!(
            lines.is_empty(),
            "the guest noticed ({bad}): {lines:?}\n{out}"
        );
    }
    println!(
        "{} verified rounds, {} restarts",
        rounds(&out),
        restarts.len()
    );
}
