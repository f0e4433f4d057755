// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A system reset while the daemon is away (docs/mirror-protocol.md §6
//! rule 4, §9 rule 1): the daemon, with a `--state-file`, is killed
//! (SIGKILL) under a guest reading its disk through the vIOMMU in strict
//! mode; QEMU keeps its translation copy frozen; the machine is reset
//! (`system_reset` on the monitor) while no daemon runs; the rebooted
//! guest's driver starts and waits for its first request; only then is a
//! new daemon started on the same state file.
//!
//! QEMU drops the frozen copy at the reset and, its mirror being down,
//! sends SYSTEM_RESET right after the next HELLO; the new daemon must drop
//! the state it recovered from its file. The rebooted guest must then be
//! served by a reset device: no domain or mapping from before the reset
//! may survive (a stale mapping would let the new boot's devices reach
//! memory the old one mapped), and its DMA verifies.
//!
//! QEMU reconnects its two sockets on timers of their own, so the new
//! daemon may see either first. Each order has its test: the test holds
//! one socket back (the daemon listens on another name, renamed into place
//! later) until the other has done its part. A third test restarts the
//! daemon once more right after it applied the late SYSTEM_RESET: QEMU,
//! answered, sends no other, so the state file must already hold the
//! reset.

use std::time::{Duration, Instant};

use qemu_tests::{
    disk_image, guest_errors, hmp, skip_unless_ready, state_daemon, Guest, Running, Sockets, Viommu,
};
use test_frontend::daemon::{Scratch, SIGKILL};
use vhost_user_iommu::state_file::Journal;

const SOCKET: &str = "viommu.sock";
const MIRROR: &str = "viommu-mirror.sock";
/// Where a daemon listens on the socket held back, until renamed.
const HELD: &str = "held.sock";

/// Daemon 1 on the state file in `dir` and the guest reading its disk
/// through it, until its second verified round; then daemon 1 is
/// SIGKILLed. The running guest and daemon 1's log.
fn reading_guest_then_daemon_killed(dir: &Scratch) -> (Running, String) {
    let sockets = Sockets {
        socket: &dir.join(SOCKET),
        mirror: &dir.join(MIRROR),
        reconnect: true,
    };
    let mut daemon = state_daemon(dir.path(), 1, SOCKET, MIRROR);
    let mut guest = Running::start(
        guest(dir).command_with(Some(sockets)),
        &dir.join("serial.log"),
    );
    guest.wait_for("VUI-ROUND 2 ok", Duration::from_secs(300));
    daemon.signal(SIGKILL);
    daemon.wait();
    let log = daemon.log_text();
    (guest, log)
}

/// The guest of every test here: `migrate.sh` (a pattern written to the
/// disk, then verified reads, `VUI-ROUND n ok` each) in strict mode, 8
/// rounds a boot; a reset boots it again (`--reboot`); a monitor; QEMU's
/// mirror trace (without the per-access events) in `qemu-trace.log`.
fn guest(dir: &Scratch) -> Guest {
    let mut g = Guest::new(Viommu::Ours, "migrate.sh");
    g.disk = Some(disk_image(dir.path(), 16));
    g.append = "iommu.strict=1 vui.rounds=8".into();
    g.reboot = true;
    g.timeout = Duration::from_secs(600);
    g.qemu_args = [
        "-monitor",
        &format!(
            "unix:{},server=on,wait=off",
            dir.join("monitor.sock").display()
        ),
        "-D",
        &dir.join("qemu-trace.log").display().to_string(),
        "-trace",
        "vhost_user_iommu_*",
        "-trace",
        "-vhost_user_iommu_translate",
        "-trace",
        "-vhost_user_iommu_notify",
    ]
    .map(String::from)
    .to_vec();
    g
}

fn trace(dir: &Scratch) -> String {
    std::fs::read_to_string(dir.join("qemu-trace.log")).unwrap_or_default()
}

/// Wait until `done` holds for the guest's output; panics (with the
/// output) on timeout, a failure line, or QEMU's end.
#[track_caller]
fn wait_until(guest: &mut Running, what: &str, limit: Duration, done: impl Fn(&str) -> bool) {
    let t0 = Instant::now();
    loop {
        let out = guest.output();
        assert!(!out.contains("VUI-FAIL"), "the guest failed:\n{out}");
        if done(&out) {
            return;
        }
        if let Some(status) = guest.child.try_wait().expect("QEMU's status") {
            panic!("QEMU ended ({status}) before {what}:\n{out}");
        }
        assert!(t0.elapsed() < limit, "no {what} in {limit:?}:\n{out}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The number right after `key` in `text` (`recovered 4 …` → 4).
fn after(text: &str, key: &str) -> Option<u64> {
    let rest = &text[text.find(key)? + key.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The number right before `key` in `text` (`2 domains` → 2).
fn before(text: &str, key: &str) -> Option<u64> {
    let head = &text[..text.find(key)?];
    let digits: String = head
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    digits.parse().ok()
}

/// `ok/failed` of request type `name` in a daemon's `stats:` line.
fn counts(stats: &str, name: &str) -> (u64, u64) {
    let key = format!(" {name} ");
    let ok = after(stats, &key).unwrap_or_else(|| panic!("no {name} in: {stats}"));
    let failed = after(stats, &format!("{key}{ok}/")).expect("failed count");
    (ok, failed)
}

/// The second boot's output: from its first round on (each boot starts
/// its rounds at 0), once there are two boots' rounds.
fn second_boot(out: &str) -> Option<&str> {
    (out.matches("VUI-ROUND 0 ok").count() == 2)
        .then(|| &out[out.rfind("VUI-ROUND 0 ok").unwrap()..])
}

/// The line of `log` holding `needle`.
fn line<'a>(log: &'a str, needle: &str) -> Option<&'a str> {
    log.lines().find(|l| l.contains(needle))
}

/// Which of its sockets the daemon started after the reset offers first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum First {
    /// The mirror: QEMU's HELLO and SYSTEM_RESET reach the daemon before
    /// the vhost-user connection sets the device up for the new boot.
    Mirror,
    /// The vhost-user socket: the new boot's driver has its features set
    /// and its waiting request taken before the mirror connects.
    VhostUser,
}

/// Daemon 1 under a guest reading its disk; SIGKILL; `system_reset`; the
/// rebooted guest's driver starts and waits; daemon 2 on the same state
/// file, its sockets offered in the order `first`; the second boot runs to
/// its end. Checks that daemon 2 dropped what it recovered, the rebooted
/// guest's DMA verifies, and what daemon 2 serves at the end is only what
/// the rebooted guest created.
fn reset_while_away(name: &str, first: First) {
    let dir = Scratch::new(name);
    let monitor = dir.join("monitor.sock");
    let (mut guest, log1) = reading_guest_then_daemon_killed(&dir);
    // A round past its DMA when the daemon died may still end; the next
    // waits in the queue.
    std::thread::sleep(Duration::from_secs(2));
    let started = trace(&dir).matches("boot_phase_end").count();
    let reset_at = guest.output().len();
    let answer = hmp(&monitor, "system_reset");
    assert!(
        !answer.to_lowercase().contains("error"),
        "system_reset: {answer}"
    );
    // The second boot gets as far as its virtio-iommu driver: it sets
    // DRIVER_OK (QEMU's boot phase ends) and waits for its first request,
    // which no daemon takes.
    let t = Instant::now();
    while trace(&dir).matches("boot_phase_end").count() <= started {
        assert!(
            guest.child.try_wait().expect("QEMU's status").is_none(),
            "QEMU ended at the reset (run-guest.sh --reboot?):\n{}",
            guest.output()
        );
        assert!(
            t.elapsed() < Duration::from_secs(240),
            "the rebooted guest's driver never started:\n{}\n{}",
            guest.output(),
            trace(&dir)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    let away = guest.output()[reset_at..].to_owned();
    assert!(
        !away.contains("VUI-ROUND"),
        "the rebooted guest read its disk with no daemon behind its vIOMMU:\n{away}"
    );

    // Daemon 2, on the same state file, one socket held back.
    let held = match first {
        First::Mirror => SOCKET,
        First::VhostUser => MIRROR,
    };
    let _ = std::fs::remove_file(dir.join(held));
    let t = Instant::now();
    let daemon = match first {
        First::Mirror => state_daemon(dir.path(), 2, HELD, MIRROR),
        First::VhostUser => state_daemon(dir.path(), 2, SOCKET, HELD),
    };
    let wanted = match first {
        // The system reset applied.
        First::Mirror => "mirror: system reset",
        // The vhost-user connection made (QEMU sets the device up at
        // once: the new boot's driver runs).
        First::VhostUser => "front-end connected",
    };
    let log = daemon.wait_log(wanted, Duration::from_secs(60));
    assert!(log.contains(wanted), "no {wanted:?} from daemon 2:\n{log}");
    // Time for QEMU to set the device up (the new driver's features, its
    // rings) and for the daemon to see the waiting request.
    std::thread::sleep(Duration::from_secs(2));
    std::fs::rename(dir.join(HELD), dir.join(held)).expect("offer the held socket");

    wait_until(
        &mut guest,
        "two verified rounds after the reset",
        Duration::from_secs(300),
        |out| second_boot(out).is_some_and(|s| s.contains("VUI-ROUND 1 ok")),
    );
    let took = t.elapsed();
    wait_until(
        &mut guest,
        "the second boot's end",
        Duration::from_secs(300),
        |out| out.contains("VUI-GUEST-DONE"),
    );
    let status = guest.child.wait().expect("QEMU's status");
    let out = guest.output();
    // The daemon logs its counters when QEMU's connection ends.
    let log2 = daemon.wait_log("stats:", Duration::from_secs(30));
    let trace = trace(&dir);
    let context = format!(
        "\n== daemon 1\n{log1}\n== daemon 2\n{log2}\n== QEMU's mirror trace (tail)\n{}\n== guest\n{out}",
        trace
            .lines()
            .filter(|l| !l.contains("_events "))
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Daemon 2 came back with what daemon 1 left, then applied QEMU's
    // SYSTEM_RESET, dropping all of it: its reset found exactly the
    // recovered attachments and mappings (nothing of the new boot yet).
    let recovered = line(&log2, "state file: recovered")
        .unwrap_or_else(|| panic!("daemon 2 recovered nothing{context}"));
    let recovered_n = after(recovered, "recovered ").expect("recovered count");
    assert!(
        recovered_n > 0,
        "nothing recovered, so nothing to drop: the test proves nothing{context}"
    );
    let reset = line(&log2, "mirror: system reset")
        .unwrap_or_else(|| panic!("daemon 2 applied no system reset{context}"));
    assert!(
        log2.find(recovered) < log2.find(reset),
        "the reset came before the recovery{context}"
    );
    let reset_id = after(reset, "system reset ").expect("reset id");
    let dropped = before(reset, " mappings").expect("mappings")
        + before(reset, " attachments").expect("attachments");
    assert_eq!(
        dropped, recovered_n,
        "the system reset did not drop exactly the recovered state{context}"
    );
    // QEMU's side: it sent that SYSTEM_RESET after the new HELLO (the
    // mirror was down at the reset) and applied the daemon's answer.
    let connected = trace
        .rfind("mirror connected")
        .expect("QEMU's mirror connected");
    let tail = &trace[connected..];
    assert!(
        tail.contains(&format!("SYSTEM_RESET id={reset_id}"))
            && tail.contains(&format!("reset_id={reset_id} system=1")),
        "QEMU did not send SYSTEM_RESET {reset_id} on the new connection, or did not \
         apply the answer{context}"
    );

    // The second boot ran the guest script from its start (the boots are
    // told apart by position: each starts its rounds at 0), verified every
    // round and ended well; the guest's driver saw no error.
    assert!(status.success(), "QEMU: {status}{context}");
    let second = second_boot(&out).unwrap_or_default();
    assert!(
        second.contains("VUI-CHECK migrate rounds=8") && second.contains("VUI-GUEST-DONE rc=0"),
        "the second boot did not verify all its rounds{context}"
    );
    let errors = guest_errors(&out);
    assert!(errors.is_empty(), "the guest noticed: {errors:?}{context}");

    // What daemon 2 serves after the reboot is what the rebooted guest
    // created, by daemon 2's `stats:` line at QEMU's exit (the device as it
    // was then; the counters count the requests daemon 2 carried out, all
    // of them the new boot's: a recovered state is not counted):
    // - no request failed. The new boot's attachments and DMA mappings land
    //   on the same domain ids and IOVAs as the old boot's (e.g. its rings
    //   at the top of the 32-bit space), so a surviving old domain or
    //   mapping makes its MAPs fail (overlap) — and a device that lost the
    //   features the new driver acked fails its PROBEs;
    // - every live mapping is one of its MAPs not undone by one of its
    //   UNMAPs (Linux unmaps each mapping it made, at least one per UNMAP),
    //   every live domain and attachment one of its ATTACHes: a recovered
    //   mapping still there would be one more;
    // - no request of the new boot was answered from the old boot's
    //   journal instead of being carried out.
    let stats = line(&log2, "stats:").unwrap_or_else(|| panic!("no stats from daemon 2{context}"));
    let (attach, attach_failed) = counts(stats, "attach");
    let (map, map_failed) = counts(stats, "map");
    let (unmap, unmap_failed) = counts(stats, "unmap");
    let (probe, probe_failed) = counts(stats, "probe");
    let (detach, detach_failed) = counts(stats, "detach");
    let domains = before(stats, " domains").expect("domains");
    let mappings = before(stats, " mappings").expect("mappings");
    let attached = before(stats, " endpoints attached").expect("attached");
    let answered = after(stats, "answered_again: ").expect("answered_again");
    println!(
        "{name}: recovered {recovered_n}, dropped at system reset {reset_id}; second boot \
         verified 2 rounds {took:.1?} after daemon 2 started; daemon 2 carried out attach \
         {attach} detach {detach} map {map} unmap {unmap} probe {probe}; left {domains} \
         domains, {mappings} mappings, {attached} attached"
    );
    assert_eq!(
        (
            attach_failed,
            detach_failed,
            map_failed,
            unmap_failed,
            probe_failed
        ),
        (0, 0, 0, 0, 0),
        "daemon 2 failed requests of the rebooted guest (attach, detach, map, unmap, \
         probe): {stats}{context}"
    );
    assert!(
        attach > 0 && map > 0,
        "the rebooted guest's DMA did not go through daemon 2{context}"
    );
    assert!(
        mappings <= map.saturating_sub(unmap) && domains <= attach && attached <= attach,
        "daemon 2 holds more than the rebooted guest created: {stats}{context}"
    );
    assert_eq!(
        answered, 0,
        "requests of the new boot answered from the old one's journal{context}"
    );
}

/// QEMU's mirror reconnects first: its SYSTEM_RESET reaches the daemon
/// before the vhost-user connection sets the device up for the new boot.
#[test]
fn a_system_reset_while_the_daemon_is_away_leaves_nothing_of_the_old_boot() {
    skip_unless_ready!();
    reset_while_away("reset-away", First::Mirror);
}

/// QEMU's vhost-user socket reconnects first: the device is set up for the
/// new boot (its driver's features) and its waiting request taken, and
/// SYSTEM_RESET comes after.
#[test]
fn a_system_reset_while_away_applied_after_the_vhost_user_connection_keeps_the_new_boot() {
    skip_unless_ready!();
    reset_while_away("reset-away-vu", First::VhostUser);
}

/// A daemon restarted right after applying the late SYSTEM_RESET, before
/// the rebooted guest sent anything (it is paused, `stop`): QEMU has its
/// answer and sends no SYSTEM_RESET to the next daemon, so the state file
/// must already say "reset", or the next daemon serves the old boot's
/// domains and mappings to the new one.
#[test]
fn a_daemon_restarted_after_the_late_system_reset_recovers_nothing_of_the_old_boot() {
    skip_unless_ready!();
    let dir = Scratch::new("reset-away-again");
    let monitor = dir.join("monitor.sock");
    let (mut guest, _) = reading_guest_then_daemon_killed(&dir);
    let answer = hmp(&monitor, "system_reset");
    assert!(
        !answer.to_lowercase().contains("error"),
        "system_reset: {answer}"
    );
    std::thread::sleep(Duration::from_secs(2));
    let answer = hmp(&monitor, "stop");
    assert!(!answer.to_lowercase().contains("error"), "stop: {answer}");

    let mut daemon = state_daemon(dir.path(), 2, SOCKET, MIRROR);
    let log2 = daemon.wait_log("mirror: system reset", Duration::from_secs(60));
    assert!(
        log2.contains("mirror: system reset"),
        "daemon 2 applied no system reset:\n{log2}"
    );
    daemon.signal(SIGKILL);
    daemon.wait();
    drop(daemon);
    // What daemon 3 would serve: the paused guest created nothing since
    // the reset, so nothing.
    let left = {
        let (journal, recovered) = Journal::open(&dir.join("state")).expect("the state file");
        drop(journal);
        recovered
            .expect("a readable state file")
            .map(|r| r.state.entries)
    };
    let left = left.unwrap_or_default();
    assert!(
        left.is_empty(),
        "after the system reset the state file still holds {left:?}\n== daemon 2\n{log2}"
    );

    let daemon = state_daemon(dir.path(), 3, SOCKET, MIRROR);
    let answer = hmp(&monitor, "cont");
    assert!(!answer.to_lowercase().contains("error"), "cont: {answer}");
    wait_until(
        &mut guest,
        "the second boot's end",
        Duration::from_secs(300),
        |out| second_boot(out).is_some_and(|s| s.contains("VUI-GUEST-DONE")),
    );
    let out = guest.output();
    assert!(
        out.contains("VUI-GUEST-DONE rc=0"),
        "the second boot failed:\n{out}\n== daemon 3\n{}",
        daemon.log_text()
    );
}
