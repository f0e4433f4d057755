// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control socket under a real guest (docs/control-socket.md): the
//! daemon, as a process of its own under its seccomp filter, serves a Linux
//! guest reading its disk in strict mode, and what the socket answers is
//! what that guest made: its QEMU connected on both sockets, its domains,
//! the mappings of its disk's rings, a translation that agrees with the
//! mapping, and the MAP/UNMAP counts still growing while it answers.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use qemu_tests::{
    daemon_bin, disk_image, scratch, skip_unless_ready, Guest, Running, Sockets, Viommu,
};
use serde_json::{json, Value};
use test_frontend::daemon::DaemonProcess;
use vhost_user_iommu::control::client::Client;

fn control(path: &Path) -> Client {
    Client::connect(path, Duration::from_secs(5)).expect("the control socket answers")
}

fn count(v: &Value, path: &[&str]) -> u64 {
    path.iter()
        .fold(v, |v, k| &v[*k])
        .as_u64()
        .unwrap_or_else(|| panic!("{path:?} in {v}"))
}

#[test]
fn the_control_socket_shows_what_a_real_guest_made() {
    skip_unless_ready!();
    let dir = scratch("control-socket");
    let ctl = dir.join("viommu.ctl");
    let daemon = DaemonProcess::builder(daemon_bin(), dir.join("viommu.sock"))
        .mirror(dir.join("viommu-mirror.sock"))
        .arg("--control-socket")
        .arg(&ctl)
        .rust_log("info")
        .log_file(dir.join("daemon.log"))
        .spawn();
    let mut g = Guest::new(Viommu::Ours, "migrate.sh");
    g.disk = Some(disk_image(&dir, 16));
    g.append = "iommu.strict=1".into();
    g.timeout = Duration::from_secs(300);
    let sockets = Sockets {
        socket: &dir.join("viommu.sock"),
        mirror: &dir.join("viommu-mirror.sock"),
        reconnect: true,
    };
    let mut guest = Running::start(g.command_with(Some(sockets)), &dir.join("serial.log"));
    guest.wait_for("VUI-ROUND 1 ok", Duration::from_secs(240));

    let mut c = control(&ctl);
    let status = c.execute("status", Value::Null).unwrap();
    assert_eq!(status["front_end"]["connected"], json!(true), "{status}");
    assert_eq!(status["mirror"]["connected"], json!(true), "{status}");
    assert_eq!(
        status["front_end"]["pid"], status["mirror"]["pid"],
        "one QEMU on both sockets: {status}"
    );
    assert!(count(&status, &["device", "domains"]) >= 1, "{status}");

    // The disk's domain: its endpoint, and the rings' long-lived mappings.
    let eps = c.execute("endpoints", json!({ "attached": true })).unwrap();
    let attached = eps["entries"].as_array().expect("entries").clone();
    assert!(!attached.is_empty(), "{eps}");
    let mut found = None;
    for ep in &attached {
        let (endpoint, domain) = (
            ep["endpoint"].as_u64().unwrap(),
            ep["domain"].as_u64().unwrap(),
        );
        let m = c
            .execute("mappings", json!({ "domain": domain, "count": 16 }))
            .unwrap();
        if let Some(first) = m["entries"].as_array().and_then(|e| e.first()) {
            found = Some((endpoint, first.clone()));
            break;
        }
    }
    let (endpoint, mapping) = found.expect("a domain with mappings (the disk's rings)");
    let iova = mapping["virt_start"].as_u64().unwrap() + 0x10;
    let t = c
        .execute(
            "translate",
            json!({ "endpoint": endpoint, "iova": format!("{iova:#x}") }),
        )
        .unwrap();
    assert_eq!(t["result"], json!("mapped"), "{t}");
    assert_eq!(
        t["gpa"].as_u64().unwrap(),
        mapping["phys_start"].as_u64().unwrap() + 0x10,
        "translate agrees with the mapping: {t} {mapping}"
    );

    // The guest keeps mapping and unmapping while the socket answers.
    let before = c.execute("counters", Value::Null).unwrap();
    guest.wait_for("VUI-ROUND 2 ok", Duration::from_secs(240));
    let after = c.execute("counters", Value::Null).unwrap();
    let maps = |v: &Value| {
        v["requests"]
            .as_array()
            .and_then(|r| r.iter().find(|k| k["kind"] == json!("map")))
            .and_then(|k| k["ok"].as_u64())
            .unwrap_or_else(|| panic!("MAP counts in {v}"))
    };
    assert!(maps(&after) > maps(&before), "{before}\n{after}");

    // The same for people, through `ctl`.
    let out = Command::new(daemon_bin())
        .args(["ctl", "--control-socket"])
        .arg(&ctl)
        .arg("status")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("connected"), "{text}");
    println!(
        "control socket under a guest: {} domains, MAPs {} -> {}, translate {iova:#x} -> {:#x}",
        count(&status, &["device", "domains"]),
        maps(&before),
        maps(&after),
        t["gpa"].as_u64().unwrap()
    );
    guest.kill();
    drop(daemon);
}
