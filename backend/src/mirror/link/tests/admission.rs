// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Who is served and for how long: the front-end's process, HELLO and
//! dump deadlines, one QEMU at a time, a peer that misbehaves, stopping.

use super::*;

#[test]
fn only_the_front_ends_process_is_served_now_or_once_it_is_known() {
    let (server, _rec, path) = start("front-end", vec![]);
    let h = server.handle();
    let me = std::process::id();
    // The front-end is another process (pid 1): we are refused.
    h.set_front_end(Some(1));
    let mut q = FakeQemu::connect(&path);
    assert!(q.recv().is_none(), "refused");
    assert!(!h.is_connected());
    // The front-end is us: served.
    h.set_front_end(Some(me));
    let mut q = connect_synced(&path, &h);
    // A front-end of another process comes: our connection goes.
    h.set_front_end(Some(1));
    assert!(q.recv().is_none(), "closed");
    wait_for("closed", || !h.is_connected());
    // No front-end: anyone may connect (QEMU's mirror may come first).
    h.set_front_end(None);
    let _q = connect_synced(&path, &h);
}

#[test]
fn a_hello_that_would_reset_a_recovered_state_counts_only_from_the_front_ends_process() {
    let (server, rec, path) = start("recovery-front-end", vec![]);
    let h = server.handle();
    rec.recovery.store(true, Ordering::SeqCst);
    // The recovered state's own QEMU (instance 5) is let in at once.
    let mut q = FakeQemu::connect(&path);
    q.recv_hello();
    q.hello_as(5);
    let (dump, _) = q.recv().expect("the dump, at once");
    assert_eq!(dump.msg_type, MsgType::Events as u16);
    drop(q);
    wait_for("closed", || !h.is_connected());
    rec.instances.lock().unwrap().clear();
    // No front-end yet: the HELLO waits for one, deciding nothing.
    let mut q = FakeQemu::connect(&path);
    q.recv_hello();
    q.hello_as(7);
    std::thread::sleep(Duration::from_millis(100));
    assert!(rec.instances.lock().unwrap().is_empty(), "undecided");
    // The front-end is another process: this peer's HELLO is not its.
    h.set_front_end(Some(1));
    assert!(q.recv().is_none(), "closed");
    assert!(rec.instances.lock().unwrap().is_empty());
    // The front-end is this process: its HELLO decides.
    h.set_front_end(None);
    let mut q = FakeQemu::connect(&path);
    q.recv_hello();
    q.hello_as(7);
    h.set_front_end(Some(std::process::id()));
    let (dump, _) = q.recv().expect("the dump, once the front-end is known");
    assert_eq!(dump.msg_type, MsgType::Events as u16);
    assert_eq!(*rec.instances.lock().unwrap(), vec![7]);
}

#[test]
fn a_dump_not_acknowledged_in_time_closes_the_connection() {
    let (server, _rec, path) = start("dump-ack", vec![]);
    let h = server.handle();
    h.set_dump_ack_deadline(Duration::from_millis(100));
    let mut q = FakeQemu::connect(&path);
    q.recv_hello();
    q.hello();
    let (dump, _) = q.recv().unwrap();
    assert_eq!(dump.msg_type, MsgType::Events as u16);
    // No ACK.
    assert!(q.recv().is_none(), "closed");
    wait_for("closed", || !h.is_connected());
    // One that acknowledges stays.
    let q = connect_synced(&path, &h);
    std::thread::sleep(Duration::from_millis(300));
    assert!(h.is_connected());
    drop(q);
}

#[test]
fn a_peer_that_sends_no_hello_in_time_is_closed_and_the_next_served() {
    let (server, _rec, path) = start("hello-deadline", vec![]);
    let h = server.handle();
    h.set_hello_deadline(Duration::from_millis(100));
    let mut silent = FakeQemu::connect(&path);
    let (hello, _, _) = silent.recv_hello();
    assert_eq!(hello.msg_type, MsgType::Hello as u16);
    let t0 = Instant::now();
    assert!(silent.recv().is_none(), "closed");
    assert!(t0.elapsed() < Duration::from_secs(4), "by the deadline");
    wait_for("closed", || !h.is_connected());
    let _q = connect_synced(&path, &h);
}

#[test]
fn a_second_peer_is_refused_while_qemu_is_connected_and_served_once_it_left() {
    let (server, rec, path) = start("second", vec![]);
    let h = server.handle();
    let mut q = connect_synced(&path, &h);
    let mut intruder = FakeQemu::connect(&path);
    // Its HELLO may find the socket already shut by the refusal.
    let _ = intruder.try_hello();
    assert!(intruder.recv().is_none(), "refused without a HELLO");
    // Both from this process (SO_PEERCRED).
    let pid = Some(std::process::id());
    let peers = rec.peers(2);
    assert_eq!(
        peers[..2],
        [
            PeerEvent::Connected { connection: 1, pid },
            PeerEvent::Refused {
                pid,
                why: Refusal::Busy(1)
            }
        ]
    );
    // The first one is still served.
    let t = h.publish(&[Record::GlobalBypass(false)]).unwrap();
    let (batch, _) = q.recv().unwrap();
    q.ack(batch.seq);
    assert_eq!(h.wait(t, Duration::from_secs(5)), WaitOutcome::Acked);
    // Once it has gone, the next QEMU gets in, even before the daemon
    // has read the close.
    drop(q);
    let _next = connect_synced(&path, &h);
    let gone = PeerEvent::Gone {
        connection: 1,
        how: Ended::Closed,
    };
    let t0 = Instant::now();
    while !rec.peers.lock().unwrap().contains(&gone) {
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", rec.peers(0));
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn the_server_stops_even_when_its_socket_file_is_gone() {
    let (server, _rec, path) = start("unlinked", vec![]);
    let _q = connect_synced(&path, &server.handle());
    std::fs::remove_file(&path).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(server);
        tx.send(()).unwrap();
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("the stop waited for an accept nobody could wake");
}

#[test]
fn a_message_before_hello_is_a_protocol_error_that_closes() {
    let (server, _rec, path) = start("nohello", vec![]);
    let mut q = FakeQemu::connect(&path);
    q.ack(1);
    // Whatever of our HELLO and dump got out before the close, then EOF.
    let mut messages = 0;
    while q.recv().is_some() {
        messages += 1;
        assert!(messages <= 2, "the daemon keeps the connection open");
    }
    assert!(!server.handle().is_connected());
}
