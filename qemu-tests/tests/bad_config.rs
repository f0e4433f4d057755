// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Test 6 of issue 4: configurations that cannot work fail at QEMU start
//! with a message saying why, instead of a guest that silently lacks its
//! IOMMU.

use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use qemu_tests::{qemu, scratch, skip_unless_ready, Daemon};

/// Start QEMU (paused: `-S`) with `args`; it must exit non-zero within a
/// minute. Returns its stderr.
fn qemu_fails(args: &[String]) -> String {
    let mut child = Command::new(qemu().expect("QEMU"))
        .args([
            "-M",
            "q35",
            "-accel",
            "tcg",
            "-m",
            "256M",
            "-S",
            "-display",
            "none",
            "-nodefaults",
        ])
        .args(["-L", "/usr/share/seabios", "-L", "/usr/share/qemu"])
        .args([
            "-object",
            "memory-backend-memfd,id=mem,size=256M,share=on",
            "-numa",
            "node,memdev=mem",
        ])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start QEMU");
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(!status.success(), "QEMU accepted {args:?}");
            eprintln!("QEMU refused as expected: {}", err.trim());
            return err;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("QEMU did not fail with {args:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ours(socket: &std::path::Path) -> Vec<String> {
    vec![
        "-chardev".into(),
        format!("socket,id=c0,path={}", socket.display()),
        "-device".into(),
        "vhost-user-iommu,chardev=c0".into(),
    ]
}

#[test]
fn an_absent_daemon_is_a_start_error() {
    skip_unless_ready!();
    let dir = scratch("absent");
    let err = qemu_fails(&ours(&dir.join("nobody-listens.sock")));
    assert!(err.contains("nobody-listens.sock"), "{err}");
}

#[test]
fn a_socket_that_is_not_a_vhost_user_backend_is_a_start_error() {
    skip_unless_ready!();
    let dir = scratch("wrong");
    let path = dir.join("not-vhost-user.sock");
    let listener = UnixListener::bind(&path).unwrap();
    // Accept and hang up at once, as a wrong service would.
    let t = std::thread::spawn(move || {
        for s in listener.incoming().take(1) {
            drop(s);
        }
    });
    let err = qemu_fails(&ours(&path));
    assert!(err.to_lowercase().contains("vhost"), "{err}");
    let _ = t.join();
}

#[test]
fn two_viommus_are_a_start_error() {
    skip_unless_ready!();
    let dir = scratch("two");
    let daemon = Daemon::start(&dir);
    let mut args = ours(&daemon.socket);
    args.extend(["-device".into(), "virtio-iommu-pci".into()]);
    let err = qemu_fails(&args);
    assert!(err.contains("multiple vIOMMUs"), "{err}");
}

/// The same rule holds for QEMU's own device: the reference for the test above.
#[test]
fn two_of_qemus_own_viommus_are_a_start_error_too() {
    skip_unless_ready!();
    let args: Vec<String> = ["-device", "virtio-iommu-pci", "-device", "virtio-iommu-pci"]
        .map(String::from)
        .to_vec();
    let err = qemu_fails(&args);
    assert!(err.contains("multiple vIOMMUs"), "{err}");
}
