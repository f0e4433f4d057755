// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What QEMU is sent and how waits end: the dump, SYNC batches, ACKs,
//! releases, faults and system resets.

use super::*;

#[test]
fn requests_wait_for_a_synced_qemu_once_one_holds_a_copy() {
    let (server, _rec, path) = start("synced", vec![]);
    let h = server.handle();
    assert_eq!(h.wait_synced(), WaitOutcome::Acked, "no QEMU ever: no wait");
    // A peer that never acknowledged its dump holds no copy QEMU would
    // keep: its leaving holds nothing up.
    let mut q = FakeQemu::connect(&path);
    q.hello();
    let _hello = q.recv().unwrap();
    let _dump = q.recv().unwrap();
    drop(q);
    while h.is_connected() {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(h.wait_synced(), WaitOutcome::Acked, "never synced: no wait");
    let q = connect_synced(&path, &h);
    assert_eq!(h.wait_synced(), WaitOutcome::Acked, "synced: no wait");
    drop(q);
    while h.is_connected() {
        std::thread::sleep(Duration::from_millis(5));
    }
    // The link is gone: a waiter stays until the next QEMU acks its dump.
    let (waiter, rx) = spawn_wait_synced(&h);
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "it waits"
    );
    let mut q = FakeQemu::connect(&path);
    q.hello();
    let _hello = q.recv().unwrap();
    let (dump, _) = q.recv().unwrap();
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "until the ACK"
    );
    q.ack(dump.seq);
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)),
        Ok(WaitOutcome::Acked)
    );
    waiter.join().unwrap();
    // A waiter is released when the vring stops.
    drop(q);
    while h.is_connected() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let (waiter, rx) = spawn_wait_synced(&h);
    // (Released again until it answers: it may not be waiting yet.)
    let outcome = loop {
        h.release_waiters();
        if let Ok(o) = rx.recv_timeout(Duration::from_millis(100)) {
            break o;
        }
    };
    assert_eq!(outcome, WaitOutcome::Released);
    waiter.join().unwrap();
    // The front-end left: its QEMU and any copy with it.
    h.expect_peer(false);
    assert_eq!(h.wait_synced(), WaitOutcome::Acked);
}

#[test]
fn changes_before_qemus_hello_go_into_its_dump_not_ahead_of_it() {
    let state = vec![Record::Reset {
        system: false,
        reset_id: 0,
    }];
    let (server, _rec, path) = start("early", state);
    let h = server.handle();
    let mut q = FakeQemu::connect(&path);
    let _ = q.recv_hello();
    while !h.is_connected() {
        std::thread::sleep(Duration::from_millis(5));
    }
    // A daemon restoring its state file under a QEMU that connected
    // first: a SYNC batch now would say a copy is whole that is not.
    let attach = Record::Attach {
        endpoint: 8,
        domain: 1,
        bypass: true,
        root: 0,
    };
    assert_eq!(h.publish_sync(&[attach]), None);
    assert_eq!(h.publish(&[attach]), None);
    q.hello();
    let (hdr, p) = q.recv().unwrap();
    assert_eq!((hdr.seq, hdr.flags), (1, EVENTS_F_SYNC), "the dump first");
    assert_eq!(p.len(), RECORD_LEN, "the dump alone: {p:?}");
    assert!(h.publish(&[attach]).is_some(), "after the dump, changes go");
}

#[test]
fn connect_sends_hello_then_after_qemus_hello_the_full_state_as_one_sync_batch() {
    let state = vec![
        Record::Reset {
            system: false,
            reset_id: 0,
        },
        Record::Attach {
            endpoint: 8,
            domain: 1,
            bypass: false,
            root: 5,
        },
    ];
    let (_server, rec, path) = start("dump", state.clone());
    let mut q = FakeQemu::connect(&path);
    // The HELLO arrives with the table and the notifier flags.
    let (h, p, files) = q.recv_hello();
    assert_eq!(files.len(), 2);
    assert_eq!(h.msg_type, MsgType::Hello as u16);
    assert_eq!(p[16], 1, "boot_bypass from start()");
    assert_eq!(
        u32::from_le_bytes(p[24..28].try_into().unwrap()),
        64,
        "table pages"
    );
    assert_eq!(p[28], 3, "levels for a 32-bit input range");
    assert_eq!(
        u32::from_le_bytes(p[32..36].try_into().unwrap()) as usize,
        crate::mirror::NOTIFIER_FLAGS_LEN
    );
    for fd in files {
        assert!(std::fs::File::from(fd).metadata().unwrap().len() > 0);
    }
    // The dump waits for QEMU's HELLO (§6 step 2).
    q.0.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert!(q.recv().is_none(), "a dump before QEMU's HELLO");
    q.0.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    q.hello_as(0xfeed_f00d);
    let (h, p) = q.recv().unwrap();
    assert_eq!(*rec.instances.lock().unwrap(), [0xfeed_f00d]);
    assert_eq!(h.msg_type, MsgType::Events as u16);
    assert_eq!((h.seq, h.flags), (1, EVENTS_F_SYNC));
    assert_eq!(p.len(), 2 * RECORD_LEN);
    assert_eq!(p[..RECORD_LEN], state[0].encode());
    assert_eq!(p[RECORD_LEN..], state[1].encode());
}

#[test]
fn publish_without_qemu_needs_no_wait() {
    let (server, _rec, _path) = start("noqemu", vec![]);
    assert_eq!(server.handle().publish(&[Record::GlobalBypass(true)]), None);
    assert_eq!(
        MirrorHandle::disconnected().publish(&[Record::GlobalBypass(true)]),
        None
    );
}

#[test]
fn wait_returns_acked_only_after_qemu_acks_that_batch() {
    let (server, _rec, path) = start("ack", vec![]);
    let h = server.handle();
    let mut q = connect_synced(&path, &h);
    let t = h.publish(&[Record::Unmap(Unmap {
        domain: 1,
        virt_start: 0,
        virt_end: 0xfff,
    })]);
    let t = t.expect("connected: a ticket");
    let (ev, p) = q.recv().unwrap();
    assert_eq!((ev.seq, ev.flags, p.len()), (2, 0, RECORD_LEN));
    let waiter = {
        let h = h.clone();
        std::thread::spawn(move || h.wait(t, Duration::from_secs(5)))
    };
    std::thread::sleep(Duration::from_millis(50));
    assert!(!waiter.is_finished(), "completed before the ACK");
    q.ack(2);
    assert_eq!(waiter.join().unwrap(), WaitOutcome::Acked);
}

#[test]
fn a_closed_connection_ends_the_wait() {
    let (server, _rec, path) = start("close", vec![]);
    let h = server.handle();
    let q = connect_synced(&path, &h);
    let t = h.publish(&[Record::GlobalBypass(false)]).unwrap();
    drop(q);
    assert_eq!(h.wait(t, Duration::from_secs(5)), WaitOutcome::Disconnected);
    assert!(!h.is_connected());
}

#[test]
fn a_missing_ack_times_out_and_closes_the_connection() {
    let (server, _rec, path) = start("timeout", vec![]);
    let h = server.handle();
    let mut q = connect_synced(&path, &h);
    let t = h.publish(&[Record::GlobalBypass(false)]).unwrap();
    assert_eq!(h.wait(t, Duration::from_millis(50)), WaitOutcome::TimedOut);
    // QEMU sees the batch, then EOF: it drops its copy (fail safe).
    assert!(q.recv().is_some());
    assert!(q.recv().is_none());
}

#[test]
fn release_waiters_ends_a_wait_without_an_ack() {
    let (server, _rec, path) = start("release", vec![]);
    let h = server.handle();
    let _q = connect_synced(&path, &h);
    let t = h.publish(&[Record::GlobalBypass(false)]).unwrap();
    let waiter = {
        let h = h.clone();
        std::thread::spawn(move || h.wait(t, Duration::from_secs(5)))
    };
    std::thread::sleep(Duration::from_millis(20));
    h.release_waiters();
    assert_eq!(waiter.join().unwrap(), WaitOutcome::Released);
}

#[test]
fn faults_reach_the_hooks() {
    let (server, rec, path) = start("fault", vec![]);
    let h = server.handle();
    let mut q = connect_synced(&path, &h);
    let mut p = [0u8; 24];
    p[0..4].copy_from_slice(&0x18u32.to_le_bytes());
    p[4..8].copy_from_slice(&2u32.to_le_bytes());
    p[8..16].copy_from_slice(&0x5000u64.to_le_bytes());
    p[16] = 2;
    q.send(MsgType::Fault as u16, 0, &p);
    // An ACK after it proves the fault was processed (in order).
    let t = h.publish(&[Record::GlobalBypass(false)]).unwrap();
    q.recv().unwrap();
    q.ack(2);
    assert_eq!(h.wait(t, Duration::from_secs(5)), WaitOutcome::Acked);
    assert_eq!(
        *rec.faults.lock().unwrap(),
        vec![proto::Fault {
            endpoint: 0x18,
            flags: 2,
            address: 0x5000,
            reason: 2
        }]
    );
}

#[test]
fn system_reset_is_answered_with_a_sync_reset_batch() {
    let (server, rec, path) = start("sysreset", vec![]);
    let h = server.handle();
    let mut q = connect_synced(&path, &h);
    q.send(MsgType::SystemReset as u16, 3, &[]);
    let (ev, p) = q.recv().unwrap();
    assert_eq!((ev.seq, ev.flags), (2, EVENTS_F_SYNC));
    assert_eq!(
        p[..RECORD_LEN],
        Record::Reset {
            system: true,
            reset_id: 3
        }
        .encode()
    );
    assert_eq!(*rec.resets.lock().unwrap(), vec![3]);
}

#[test]
fn a_peer_that_stops_reading_is_closed() {
    let (server, rec, path) = start("no-reader", vec![]);
    let h = server.handle();
    h.set_write_deadline(Duration::from_millis(200));
    let _q = connect_synced(&path, &h);
    // QEMU reads nothing more; batches pile up past the socket's buffer.
    let records = vec![Record::GlobalBypass(true); MAX_RECORDS];
    let t0 = Instant::now();
    while h.is_connected() {
        h.publish(&records);
        assert!(t0.elapsed() < Duration::from_secs(10), "never closed");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The daemon's doing, not QEMU's.
    assert_eq!(
        rec.peers(2).last(),
        Some(&PeerEvent::Gone {
            connection: 1,
            how: Ended::Dropped
        })
    );
}

#[test]
fn an_ack_for_an_unsent_batch_is_a_protocol_error() {
    let (server, rec, path) = start("badack", vec![]);
    let h = server.handle();
    let mut q = connect_synced(&path, &h);
    q.ack(5);
    assert!(q.recv().is_none());
    assert!(!h.is_connected());
    assert_eq!(
        rec.peers(2).last(),
        Some(&PeerEvent::Gone {
            connection: 1,
            how: Ended::Error
        })
    );
}

#[test]
fn a_large_publish_is_split_into_full_batches() {
    let (server, _rec, path) = start("split", vec![]);
    let h = server.handle();
    let mut q = connect_synced(&path, &h);
    let records = vec![Record::GlobalBypass(true); MAX_RECORDS + 1];
    let t = h.publish(&records).unwrap();
    let (a, pa) = q.recv().unwrap();
    let (b, pb) = q.recv().unwrap();
    assert_eq!((a.seq, pa.len()), (2, MAX_RECORDS * RECORD_LEN));
    assert_eq!((b.seq, pb.len()), (3, RECORD_LEN));
    q.ack(2);
    q.ack(3);
    assert_eq!(h.wait(t, Duration::from_secs(5)), WaitOutcome::Acked);
}
