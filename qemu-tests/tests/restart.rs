// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
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
    disk_image, guest_errors, scratch, skip_unless_ready, state_daemon, Guest, Running, Sockets,
    Viommu,
};
use test_frontend::daemon::{DaemonProcess, SIGKILL, SIGTERM};

/// Daemon number `n` on the state file in `dir` (sockets `viommu.sock`
/// and `viommu-mirror.sock`).
fn start(dir: &Path, n: u32) -> DaemonProcess {
    state_daemon(dir, n, "viommu.sock", "viommu-mirror.sock")
}

/// The guest of these tests: `migrate.sh` (a pattern written to a 16 MiB
/// disk in `dir`, then verified reads, `VUI-ROUND n ok` each) behind our
/// vIOMMU in strict mode, a MAP and an UNMAP per read.
fn strict_reader(dir: &Path) -> Guest {
    let mut g = Guest::new(Viommu::Ours, "migrate.sh");
    g.disk = Some(disk_image(dir, 16));
    g.append = "iommu.strict=1".into();
    g.timeout = Duration::from_secs(300);
    g
}

fn rounds(out: &str) -> usize {
    out.matches("VUI-ROUND").count()
}

#[test]
fn a_daemon_killed_and_restarted_under_a_guest_doing_dma_loses_nothing() {
    skip_unless_ready!();
    let dir = scratch("restart");
    let g = strict_reader(&dir);
    let sockets = Sockets {
        socket: &dir.join("viommu.sock"),
        mirror: &dir.join("viommu-mirror.sock"),
        reconnect: true,
    };

    let mut daemon = start(&dir, 1);
    let mut guest = Running::start(g.command_with(Some(sockets)), &dir.join("serial.log"));
    guest.wait_for("VUI-ROUND 2 ok", Duration::from_secs(240));

    let mut restarts = Vec::new();
    for (n, signal, number) in [(2, "KILL", SIGKILL), (3, "TERM", SIGTERM)] {
        let before = rounds(&guest.output());
        daemon.signal(number);
        daemon.wait();
        let old_log = daemon.log_text();
        let t = Instant::now();
        daemon = start(&dir, n);
        // Two more rounds of verified reads after the restart.
        let want = format!("VUI-ROUND {} ok", before + 1);
        guest.wait_for(&want, Duration::from_secs(120));
        let took = t.elapsed();
        let log = daemon.log_text();
        assert!(
            log.contains("state file: recovered"),
            "daemon {n} recovered nothing:\n{log}\n(the one before:\n{old_log})"
        );
        // The same QEMU process reconnected (its HELLO's instance, mirror
        // protocol 2.2): the state is given back, not reset.
        assert!(
            log.contains("the QEMU of the recovered state is back"),
            "daemon {n} did not know its QEMU again:\n{log}"
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
    let errors = guest_errors(&out);
    assert!(errors.is_empty(), "the guest noticed: {errors:?}\n{out}");
    println!(
        "{} verified rounds, {} restarts",
        rounds(&out),
        restarts.len()
    );
}

/// The daemon dies, then its QEMU too (a crash of the whole VM's
/// processes); both are started again on the same sockets and state file.
/// The state the file holds is the dead QEMU's guest's: the new QEMU — its
/// guest booting — must get a reset device, not that state (stale domains
/// and mappings of another guest), and its guest's DMA must verify.
#[test]
fn a_qemu_started_afresh_on_the_same_state_file_gets_a_reset_device() {
    skip_unless_ready!();
    let dir = scratch("restart-fresh");
    let g = strict_reader(&dir);
    let (socket, mirror) = (dir.join("viommu.sock"), dir.join("viommu-mirror.sock"));
    let sockets = || Sockets {
        socket: &socket,
        mirror: &mirror,
        reconnect: true,
    };

    let daemon = start(&dir, 1);
    let mut guest = Running::start(g.command_with(Some(sockets())), &dir.join("serial-1.log"));
    guest.wait_for("VUI-ROUND 1 ok", Duration::from_secs(240));
    daemon.end(SIGKILL);
    guest.kill();

    let daemon = start(&dir, 2);
    let mut guest = Running::start(g.command_with(Some(sockets())), &dir.join("serial-2.log"));
    guest.wait_for("VUI-ROUND 2 ok", Duration::from_secs(240));
    let log = daemon.log_text();
    assert!(
        log.contains("state file: recovered"),
        "nothing was recovered, so nothing is shown:\n{log}"
    );
    assert!(
        log.contains("belongs to another QEMU"),
        "the new QEMU got the old guest's state:\n{log}"
    );
    println!(
        "{}",
        log.lines()
            .find(|l| l.contains("belongs to another QEMU"))
            .unwrap_or_default()
    );
}
