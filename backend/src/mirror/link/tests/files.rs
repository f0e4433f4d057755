// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Files QEMU hands over: forwarded VFIO devices (§14) and the completion
//! files of kicks that wait (§15).

use super::*;

#[test]
fn forwarded_vfio_devices_reach_the_hooks_with_their_files_and_go_with_the_connection() {
    let (server, rec, path) = start_offering("vfio", vec![], true);
    let h = server.handle();
    let mut q = FakeQemu::connect(&path);
    q.hello();
    let (hello, p) = q.recv().unwrap();
    assert_eq!(hello.msg_type, MsgType::Hello as u16);
    let features = u64::from_le_bytes(p[8..16].try_into().unwrap());
    assert_eq!(
        features,
        proto::FEATURE_VFIO_DEVICES | proto::FEATURE_COMPLETION_FD
    );
    let (_dump, _) = q.recv().unwrap();
    q.ack(1);
    wait_connected(&h);

    let (iommufd, device) = two_files();
    q.vfio_device(0x18, 7, proto::VFIO_DEVICE_ADD, &[&iommufd, &device]);
    q.vfio_device(0x18, 0, proto::VFIO_DEVICE_REMOVE, &[]);
    wait_for("removal", || !rec.vfio_removed.lock().unwrap().is_empty());
    assert_eq!(
        *rec.vfio.lock().unwrap(),
        vec![(0x18, 7, inode(&iommufd), inode(&device))]
    );
    assert_eq!(rec.vfio_gone.load(Ordering::SeqCst), 0);
    drop(q);
    wait_for("gone", || rec.vfio_gone.load(Ordering::SeqCst) == 1);
}

#[test]
fn files_without_an_add_and_an_add_without_files_or_offer_are_protocol_errors() {
    let (iommufd, device) = two_files();
    // Files on an ACK.
    let (server, _rec, path) = start_offering("vfio-stray", vec![], true);
    let h = server.handle();
    let mut q = connect_synced(&path, &h);
    let mut ack = [0u8; HEADER_LEN];
    Header {
        msg_type: MsgType::Ack as u16,
        flags: 0,
        size: 0,
        seq: 2,
    }
    .encode(&mut ack);
    q.0.send_with_fds(&[&ack[..]], &[iommufd.as_raw_fd()])
        .unwrap();
    assert!(q.recv().is_none(), "closed");
    // An ADD with one file.
    let (server, rec, path) = start_offering("vfio-short", vec![], true);
    let h = server.handle();
    let mut q = connect_synced(&path, &h);
    q.vfio_device(1, 1, proto::VFIO_DEVICE_ADD, &[&device]);
    assert!(q.recv().is_none(), "closed");
    assert!(rec.vfio.lock().unwrap().is_empty());
    // An ADD to a daemon that did not offer it.
    let (server, rec, path) = start_offering("vfio-unoffered", vec![], false);
    let h = server.handle();
    let mut q = connect_synced(&path, &h);
    q.vfio_device(1, 1, proto::VFIO_DEVICE_ADD, &[&iommufd, &device]);
    assert!(q.recv().is_none(), "closed");
    assert!(rec.vfio.lock().unwrap().is_empty());
    assert_eq!(rec.vfio_gone.load(Ordering::SeqCst), 0, "nothing offered");
}

/// A COMPLETION_FD message, with `files` attached to its first byte.
fn completion_fd(q: &mut FakeQemu, files: &[&OwnedFd]) {
    let mut h = [0u8; HEADER_LEN];
    Header {
        msg_type: MsgType::CompletionFd as u16,
        flags: 0,
        size: 0,
        seq: 0,
    }
    .encode(&mut h);
    let fds: Vec<_> = files.iter().map(|f| f.as_raw_fd()).collect();
    q.0.send_with_fds(&[&h[..]], &fds).unwrap();
}

fn eventfd() -> (vmm_sys_util::eventfd::EventFd, OwnedFd) {
    let ev = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    // SAFETY: a fresh duplicate, owned by the OwnedFd alone.
    let file = unsafe { OwnedFd::from_raw_fd(libc::dup(ev.as_raw_fd())) };
    (ev, file)
}

#[test]
fn qemus_completion_files_are_used_while_its_connection_lasts() {
    let (server, _rec, path) = start("completion", vec![]);
    let h = server.handle();
    assert!(!h.signal_completions(), "no QEMU, no signal");
    let mut q = connect_synced(&path, &h);
    let (ev, file) = eventfd();
    let page = KickPage::new();
    page.set(Some(1), true);
    completion_fd(&mut q, &[&file, &page.file()]);
    wait_for("armed", || h.signal_completions());
    assert_eq!(h.vcpu_cpu(), Some(1));
    assert!(ev.read().unwrap() >= 1);
    h.signal_completions();
    assert_eq!(ev.read().unwrap(), 1);
    drop(q);
    wait_for("disarmed", || !h.signal_completions());
    assert_eq!(h.vcpu_cpu(), None);
    // The next QEMU's own files take over.
    let mut q = connect_synced(&path, &h);
    let (ev2, file2) = eventfd();
    let page2 = KickPage::new();
    page2.set(Some(0), true);
    completion_fd(&mut q, &[&file2, &page2.file()]);
    wait_for("armed again", || h.signal_completions());
    assert_eq!(h.vcpu_cpu(), Some(0));
    assert!(ev2.read().unwrap() >= 1);
}

#[test]
fn a_completion_fd_without_its_files_or_offer_closes_and_a_wrong_file_is_ignored() {
    let page = KickPage::new();
    // One file of two.
    let (server, _rec, path) = start("completion-nofile", vec![]);
    let h = server.handle();
    let mut q = connect_synced(&path, &h);
    completion_fd(&mut q, &[&page.file()]);
    assert!(q.recv().is_none(), "closed");
    assert!(!h.signal_completions());
    // Not offered.
    let (server, _rec, path) = start_with_hello(
        "completion-unoffered",
        Hello {
            completion_fd: false,
            ..Hello::new(true, false)
        },
    );
    let h = server.handle();
    let mut q = connect_synced(&path, &h);
    let (_ev, file) = eventfd();
    completion_fd(&mut q, &[&file, &page.file()]);
    assert!(q.recv().is_none(), "closed");
    assert!(!h.signal_completions());
    // A file that is no pipe: refused, the connection stays.
    let (server, rec, path) = start("completion-file", vec![]);
    let h = server.handle();
    let mut q = connect_synced(&path, &h);
    let null: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
    page.set(Some(0), true);
    completion_fd(&mut q, &[&null, &page.file()]);
    q.send(MsgType::Fault as u16, 0, &{
        let mut f = [0u8; proto::FAULT_LEN];
        f[16] = 1;
        f
    });
    wait_for("the fault after it", || {
        !rec.faults.lock().unwrap().is_empty()
    });
    assert!(!h.signal_completions());
    assert!(h.is_connected());
}
