// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control socket (`--control-socket`, docs/control-socket.md) of a
//! real daemon process, under the seccomp filter it runs with by default,
//! while the Rust test front-end plays VMM and guest driver: what it
//! answers matches what the front-end did, its events come as the
//! requests do, and hostile clients neither stall requests nor crash it.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use test_frontend::daemon::{DaemonProcess, Scratch};
use test_frontend::{Status, TestVm, VmOptions, ATTACH_F_BYPASS, MAP_F_READ, MAP_F_WRITE};
use vhost_user_iommu::control::client::{Client, ClientError};
use vhost_user_iommu::control::protocol::{self, DomainRow, EndpointRow, Mappings, Page};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-iommu");
const TIMEOUT: Duration = Duration::from_secs(5);

/// A daemon with a control socket, its log in its scratch directory.
struct Daemon {
    process: DaemonProcess,
    control: PathBuf,
}

impl Daemon {
    fn start(name: &str, endpoints: &str) -> Self {
        let dir = Scratch::new(&format!("test-control-{name}"));
        let control = dir.join("control.sock");
        let process = DaemonProcess::builder(BIN, dir.join("viommu.sock"))
            .args(["--endpoints", endpoints, "--control-socket"])
            .arg(&control)
            .rust_log("warn")
            .env("RUST_BACKTRACE", "1")
            .log_file(dir.join("daemon.log"))
            .terminate_on_drop(true)
            .spawn()
            .owning(dir);
        Self { process, control }
    }

    fn client(&self) -> Client {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match Client::connect(&self.control, TIMEOUT) {
                Ok(c) => return c,
                Err(e) if Instant::now() > deadline => panic!("control socket: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn vm(&self) -> TestVm {
        self.process.connect(VmOptions::default()).unwrap()
    }

    /// `vhost-user-iommu ctl --control-socket ... ARGS`: its stdout.
    fn ctl(&self, args: &[&str]) -> String {
        let out = Command::new(BIN)
            .arg("ctl")
            .arg("--control-socket")
            .arg(&self.control)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "ctl {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    /// `vhost-user-iommu ctl ... subscribe ARGS` (for at most 10 s), its
    /// output piped, once its subscription is in place: once the daemon
    /// counts `subscribers` (asked through `c`).
    fn ctl_subscriber(&self, args: &[&str], c: &mut Client, subscribers: u64) -> Child {
        let child = Command::new(BIN)
            .args(["ctl", "--control-socket"])
            .arg(&self.control)
            .arg("subscribe")
            .args(args)
            .args(["--seconds", "10"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + TIMEOUT;
        while c
            .call::<protocol::Counters>("counters", Value::Null)
            .unwrap()
            .events
            .subscribers
            < subscribers
        {
            assert!(Instant::now() < deadline, "ctl never subscribed");
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.process.assert_alive();
            let log = self.process.log_text();
            assert!(!log.contains("panicked"), "{log}");
        }
    }
}

const DOMAIN: u32 = 1;
const MAPPINGS: u64 = 40;
const IOVA: u64 = 0x10_0000;

/// Endpoint 8 in domain 1 with [`MAPPINGS`] 4 KiB mappings every 8 KiB
/// from [`IOVA`] (read-only every third), 16 in domain 2, 9 in a bypass
/// domain 3; the mappings' GPAs.
fn populate(vm: &mut TestVm) -> Vec<u64> {
    assert_eq!(vm.attach(DOMAIN, 8, 0).unwrap(), Status::Ok);
    assert_eq!(vm.attach(2, 16, 0).unwrap(), Status::Ok);
    assert_eq!(vm.attach(3, 9, ATTACH_F_BYPASS).unwrap(), Status::Ok);
    let mut gpas = Vec::new();
    for i in 0..MAPPINGS {
        let gpa = vm.ram().alloc(0x1000, 0x1000).unwrap();
        let iova = IOVA + i * 0x2000;
        let flags = if i % 3 == 0 {
            MAP_F_READ
        } else {
            MAP_F_READ | MAP_F_WRITE
        };
        assert_eq!(
            vm.map(DOMAIN, iova, iova + 0xfff, gpa, flags).unwrap(),
            Status::Ok
        );
        gpas.push(gpa);
    }
    gpas
}

#[test]
fn status_domains_mappings_and_translate_match_what_the_front_end_did() {
    let d = Daemon::start("state", "8,9,16,0x20-0x2f");
    let mut c = d.client();
    assert_eq!(c.greeting().protocol, protocol::PROTOCOL);
    let st: protocol::Status = c.call("status", Value::Null).unwrap();
    assert!(!st.front_end.connected);
    assert_eq!((st.mode.as_str(), st.device.endpoints), ("emulated", 19));
    assert!(!st.mirror.configured);

    let mut vm = d.vm();
    let gpas = populate(&mut vm);
    let st: protocol::Status = c.call("status", Value::Null).unwrap();
    assert!(st.front_end.connected);
    if let Some(pid) = st.front_end.pid {
        assert_eq!(pid, std::process::id(), "the front-end is this process");
    }
    let dev = &st.device;
    assert_eq!(
        (dev.domains, dev.attached, dev.mappings),
        (3, 3, MAPPINGS as usize)
    );
    assert_eq!(st.requests.ok, 3 + MAPPINGS);

    // Domains, two to a page.
    let p: Page<DomainRow, u32> = c.call("domains", json!({"count": 2})).unwrap();
    assert_eq!(p.next, Some(3));
    assert_eq!(
        p.entries[0],
        DomainRow {
            domain: 1,
            bypass: false,
            endpoints: 1,
            mappings: 40
        }
    );
    let p: Page<DomainRow, u32> = c.call("domains", json!({"start": 3})).unwrap();
    assert_eq!(
        p.entries,
        [DomainRow {
            domain: 3,
            bypass: true,
            endpoints: 1,
            mappings: 0
        }]
    );
    assert_eq!(p.next, None);

    // Endpoints: the attached ones; all of them a page at a time.
    let p: Page<EndpointRow, u32> = c.call("endpoints", json!({"attached": true})).unwrap();
    let attached: Vec<_> = p.entries.iter().map(|e| (e.endpoint, e.domain)).collect();
    assert_eq!(attached, [(8, Some(1)), (9, Some(3)), (16, Some(2))]);
    let p: Page<EndpointRow, u32> = c
        .call("endpoints", json!({"start": 9, "count": 3}))
        .unwrap();
    let ids: Vec<_> = p.entries.iter().map(|e| e.endpoint).collect();
    assert_eq!((ids, p.next), (vec![9, 16, 0x20], Some(0x21)));

    // Mappings, 16 to a page, following the cursor: what was mapped.
    let mut seen = Vec::new();
    let mut start = Some(0u64);
    while let Some(s) = start {
        let m: Mappings = c
            .call(
                "mappings",
                json!({"domain": DOMAIN, "start": s, "count": 16}),
            )
            .unwrap();
        assert_eq!(m.total, MAPPINGS as usize);
        assert!(m.page.entries.len() <= 16);
        seen.extend(m.page.entries);
        start = m.page.next;
    }
    assert_eq!(seen.len(), MAPPINGS as usize);
    for (i, m) in seen.iter().enumerate() {
        let iova = IOVA + i as u64 * 0x2000;
        assert_eq!(
            (m.virt_start, m.virt_end, m.phys_start),
            (iova, iova + 0xfff, gpas[i])
        );
        assert_eq!(m.flags, if i % 3 == 0 { 1 } else { 3 });
    }
    // A page from inside a mapping starts with the one holding it.
    let m: Mappings = c
        .call(
            "mappings",
            json!({"domain": 1, "start": "0x102800", "count": 2}),
        )
        .unwrap();
    assert_eq!(m.page.entries[0].virt_start, 0x10_2000);
    assert_eq!(m.page.next, Some(0x10_6000));
    match c.call::<Mappings>("mappings", json!({"domain": 7})) {
        Err(ClientError::Daemon { class, .. }) => assert_eq!(class, protocol::ErrorClass::NotFound),
        other => panic!("{other:?}"),
    }

    // Translate: as the device would.
    let t: protocol::Translation = c
        .call("translate", json!({"endpoint": 8, "iova": IOVA + 0x2010}))
        .unwrap();
    assert_eq!(
        (t.result.as_str(), t.gpa, t.flags),
        ("mapped", Some(gpas[1] + 0x10), Some(3))
    );
    assert_eq!((t.domain, t.len), (Some(1), Some(0xff0)));
    let t: protocol::Translation = c
        .call(
            "translate",
            json!({"endpoint": 8, "iova": IOVA, "access": "write"}),
        )
        .unwrap();
    assert_eq!(
        (t.result.as_str(), t.reason.as_deref()),
        ("fault", Some("mapping")),
        "read-only"
    );
    let t: protocol::Translation = c
        .call("translate", json!({"endpoint": 8, "iova": IOVA + 0x1000}))
        .unwrap();
    assert_eq!(t.reason.as_deref(), Some("mapping"), "between mappings");
    let t: protocol::Translation = c
        .call("translate", json!({"endpoint": 9, "iova": 5}))
        .unwrap();
    assert_eq!(t.result, "bypass");
    let t: protocol::Translation = c
        .call("translate", json!({"endpoint": 0x77, "iova": 5}))
        .unwrap();
    assert_eq!(t.reason.as_deref(), Some("unknown"));
    let t: protocol::Translation = c
        .call("translate", json!({"endpoint": 0x21, "iova": 5}))
        .unwrap();
    assert_eq!(t.result, "bypass", "unattached, with boot bypass on");

    // Counters and latency: every request counted and timed.
    let k: protocol::Counters = c.call("counters", Value::Null).unwrap();
    let map = k.requests.iter().find(|r| r.kind == "map").unwrap();
    assert_eq!((map.ok, map.failed), (MAPPINGS, 0));
    assert_eq!(k.queue.requests, 3 + MAPPINGS);
    let l: protocol::Latency = c.call("latency", Value::Null).unwrap();
    let map = l.requests.iter().find(|r| r.kind == "map").unwrap();
    assert_eq!(map.histogram.count, MAPPINGS);
    assert!(map.histogram.max_ns > 0 && map.histogram.p50_ns <= map.histogram.max_ns);
    assert!(l.batches.count >= MAPPINGS, "one kick per request");

    // ctl prints the same for people, and as JSON for scripts.
    let text = d.ctl(&["mappings", "1", "--count", "3"]);
    assert!(text.contains("domain 1: 40 mappings, 3 shown"), "{text}");
    assert!(text.contains(&format!("{:#x}", gpas[2])), "{text}");
    assert!(text.contains("(more: --start 0x106000)"), "{text}");
    let text = d.ctl(&["translate", "8", "0x102010"]);
    assert!(
        text.contains(&format!("-> gpa {:#x}", gpas[1] + 0x10)),
        "{text}"
    );
    let text = d.ctl(&["status"]);
    assert!(
        text.contains("3 domains, 40 mappings, 3/19 endpoints attached"),
        "{text}"
    );
    for cmd in [
        &["domains"][..],
        &["endpoints"],
        &["counters"],
        &["latency"],
        &["faults"],
    ] {
        assert!(!d.ctl(cmd).is_empty(), "{cmd:?}");
    }
    let json: Value = serde_json::from_str(&d.ctl(&["--json", "domains"])).unwrap();
    assert_eq!(json["entries"].as_array().unwrap().len(), 3);

    drop(vm);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let st: protocol::Status = c.call("status", Value::Null).unwrap();
        if !st.front_end.connected {
            assert_eq!(st.front_end.connections, 1);
            assert_eq!(
                st.device.domains, 0,
                "the device is reset when its front-end leaves"
            );
            break;
        }
        assert!(Instant::now() < deadline, "the front-end never left");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The next event, skipping none.
fn event(c: &mut Client) -> Value {
    c.next_event(TIMEOUT).unwrap().expect("an event")
}

#[test]
fn subscribers_see_each_request_and_front_end_as_it_happens() {
    let d = Daemon::start("events", "8");
    let mut all = d.client();
    let sub: protocol::Subscription = all.call("subscribe", Value::Null).unwrap();
    assert_eq!(sub.events.len(), 16);
    let mut maps = d.client();
    maps.call::<protocol::Subscription>("subscribe", json!({"events": ["map"]}))
        .unwrap();

    let mut vm = d.vm();
    let buf = vm.ram().alloc(0x1000, 0x1000).unwrap();
    assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
    assert_eq!(
        vm.map(1, 0x1000, 0x1fff, buf, MAP_F_READ).unwrap(),
        Status::Ok
    );
    assert_eq!(
        vm.map(4, 0x1000, 0x1fff, buf, MAP_F_READ).unwrap(),
        Status::NoEnt
    );
    assert_eq!(vm.unmap(1, 0, u64::MAX).unwrap(), Status::Ok);
    assert_eq!(vm.detach(1, 8).unwrap(), Status::Ok);
    drop(vm);

    // A new front-end finds the device reset for it.
    let e = event(&mut all);
    assert_eq!(
        (&e["event"], &e["data"]["kind"]),
        (&json!("reset"), &json!("front_end"))
    );
    let e = event(&mut all);
    assert_eq!(e["event"], "front_end_connected");
    let e = event(&mut all);
    assert_eq!(e["event"], "attach");
    assert_eq!(
        e["data"],
        json!({"domain": 1, "endpoint": 8, "bypass": false, "status": "ok"})
    );
    let e = event(&mut all);
    assert_eq!(e["event"], "endpoint_attached");
    assert_eq!(
        e["data"],
        json!({"domain": 1, "endpoint": 8, "bypass": false})
    );
    let e = event(&mut all);
    assert_eq!(
        e["data"],
        json!({"domain": 1, "virt_start": 0x1000, "virt_end": 0x1fff, "phys_start": buf, "flags": 1, "status": "ok"})
    );
    let e = event(&mut all);
    assert_eq!(
        (e["event"].as_str(), e["data"]["status"].as_str()),
        (Some("map"), Some("noent"))
    );
    let e = event(&mut all);
    assert_eq!(e["event"], "unmap");
    assert_eq!(e["data"]["virt_end"], u64::MAX);
    let e = event(&mut all);
    assert_eq!(e["event"], "detach");
    let e = event(&mut all);
    assert_eq!(e["event"], "endpoint_detached");
    assert_eq!(e["data"], json!({"domain": 1, "endpoint": 8}));
    // The front-end leaves: the device is reset, with nothing left in it.
    let e = event(&mut all);
    assert_eq!(e["event"], "reset");
    assert_eq!(
        e["data"],
        json!({"kind": "front_end", "domains": 0, "mappings": 0, "attached": 0})
    );
    let e = event(&mut all);
    assert_eq!(e["event"], "front_end_disconnected");
    let mut times = Vec::new();
    for _ in 0..2 {
        let e = event(&mut maps);
        assert_eq!(e["event"], "map");
        times.push(e["time_us"].as_u64().unwrap());
    }
    assert!(times[0] <= times[1]);
    assert!(
        maps.next_event(Duration::from_millis(300))
            .unwrap()
            .is_none(),
        "only maps"
    );

    // ctl's subscribe prints them for people.
    let out = d.ctl_subscriber(&["attach", "--count", "1"], &mut all, 3);
    let mut vm = d.vm();
    assert_eq!(vm.attach(5, 8, 0).unwrap(), Status::Ok);
    let out = out.wait_with_output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("subscribed to attach"), "{text}");
    let line = text.lines().find(|l| l.contains(" attach ")).expect(&text);
    for field in ["domain=5", "endpoint=0x8", "bypass=false", "status=ok"] {
        assert!(line.contains(field), "{text}");
    }
}

/// The events of what the device does besides answering requests: an
/// ATTACH that moves an endpoint, a device reset (with what it held), a
/// migration state loaded, a damaged one refused. The subscriber asked for
/// none of the request events, and gets none.
#[test]
fn subscribers_see_endpoints_move_resets_and_states_restored() {
    use vhost::vhost_user::VhostUserFrontend;
    let src = Daemon::start("state-events-src", "8,16");
    let mut vm = src.vm();
    let buf = vm.ram().alloc(0x2000, 0x1000).unwrap();
    assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
    assert_eq!(vm.map(1, 0x1000, 0x2fff, buf, 3).unwrap(), Status::Ok);
    assert_eq!(vm.attach(2, 16, 0).unwrap(), Status::Ok);
    let state = vm.save_state().unwrap();
    drop(vm);

    let d = Daemon::start("state-events", "8,16");
    let mut c = d.client();
    let kinds = [
        "reset",
        "endpoint_attached",
        "endpoint_detached",
        "state_restored",
    ];
    let sub: protocol::Subscription = c.call("subscribe", json!({ "events": kinds })).unwrap();
    assert_eq!(sub.events, kinds);
    let mut vm = d.vm();
    let e = event(&mut c);
    assert_eq!(
        (&e["event"], &e["data"]["kind"]),
        (&json!("reset"), &json!("front_end"))
    );

    vm.load_state(&state).unwrap();
    // The state's attachments enter the device, then the event says what
    // it holds.
    let mut attached = Vec::new();
    for _ in 0..2 {
        let e = event(&mut c);
        assert_eq!(e["event"], "endpoint_attached", "{e}");
        attached.push((e["data"]["endpoint"].clone(), e["data"]["domain"].clone()));
    }
    attached.sort_by_key(|(ep, _)| ep.as_u64());
    assert_eq!(attached, [(json!(8), json!(1)), (json!(16), json!(2))]);
    let e = event(&mut c);
    assert_eq!(e["event"], "state_restored");
    assert_eq!(
        e["data"],
        json!({"source": "migration", "domains": 2, "mappings": 1, "attached": 2})
    );
    // `status` keeps it, at the event's time, for a client that was not
    // subscribed.
    let st: protocol::Status = d.client().call("status", Value::Null).unwrap();
    assert_eq!(
        st.last_restore,
        Some(protocol::Restore {
            source: "migration".into(),
            time_us: e["time_us"].as_u64().unwrap(),
            domains: 2,
            mappings: 1,
            attached: 2,
        })
    );

    // ATTACH moving 16 to domain 1: it leaves domain 2 (gone with it), then
    // enters domain 1; no `attach` (a request event) comes between.
    assert_eq!(vm.attach(1, 16, 0).unwrap(), Status::Ok);
    let e = event(&mut c);
    assert_eq!(
        (&e["event"], &e["data"]),
        (
            &json!("endpoint_detached"),
            &json!({"endpoint": 16, "domain": 2})
        )
    );
    let e = event(&mut c);
    assert_eq!(
        (&e["event"], &e["data"]),
        (
            &json!("endpoint_attached"),
            &json!({"endpoint": 16, "domain": 1, "bypass": false})
        )
    );

    // A device reset, with what the device held when it came.
    vm.frontend().reset_device().unwrap();
    let e = event(&mut c);
    assert_eq!(
        (&e["event"], &e["data"]),
        (
            &json!("reset"),
            &json!({"kind": "device", "domains": 1, "mappings": 1, "attached": 2})
        )
    );

    // A damaged state: refused, and the device reset so that nothing is
    // half-loaded.
    let mut bad = state.clone();
    bad[0] ^= 0xff;
    assert!(vm.load_state(&bad).is_err());
    let e = event(&mut c);
    assert_eq!(
        (&e["event"], &e["data"]["kind"]),
        (&json!("reset"), &json!("refused_state"))
    );
    drop(vm);
    let e = event(&mut c);
    assert_eq!(
        (&e["event"], &e["data"]["kind"]),
        (&json!("reset"), &json!("front_end"))
    );
    assert!(c.next_event(Duration::from_millis(300)).unwrap().is_none());

    // ctl prints them for people.
    let out = d.ctl_subscriber(&["reset", "state_restored", "--count", "2"], &mut c, 2);
    let mut vm = d.vm();
    vm.load_state(&state).unwrap();
    let out = out.wait_with_output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("subscribed to reset, state_restored"),
        "{text}"
    );
    let reset = text.lines().find(|l| l.contains(" reset ")).expect(&text);
    assert!(reset.contains("kind=front_end"), "{text}");
    let restored = text
        .lines()
        .find(|l| l.contains(" state_restored "))
        .expect(&text);
    for field in ["source=migration", "domains=2", "mappings=1", "attached=2"] {
        assert!(restored.contains(field), "{text}");
    }
}

/// A front-end doing MAP/UNMAP pairs until `stop`: the pairs done and the
/// longest any took.
fn strict_pairs(mut vm: TestVm, stop: &AtomicBool) -> (u64, Duration) {
    let buf = vm.ram().alloc(0x1000, 0x1000).unwrap();
    let (mut n, mut worst) = (0, Duration::ZERO);
    while !stop.load(Ordering::Relaxed) {
        let t0 = Instant::now();
        assert_eq!(
            vm.map(1, 0x1000, 0x1fff, buf, MAP_F_READ).unwrap(),
            Status::Ok
        );
        assert_eq!(vm.unmap(1, 0x1000, 0x1fff).unwrap(), Status::Ok);
        worst = worst.max(t0.elapsed());
        n += 1;
    }
    (n, worst)
}

fn connect(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s
}

#[test]
fn hostile_clients_neither_stall_requests_nor_crash_the_daemon() {
    let d = Daemon::start("hostile", "8");
    let mut vm = d.vm();
    assert_eq!(vm.attach(1, 8, 0).unwrap(), Status::Ok);
    let stop = Arc::new(AtomicBool::new(false));
    let guest = {
        let stop = stop.clone();
        std::thread::spawn(move || strict_pairs(vm, &stop))
    };
    let path = d.control.clone();
    let end = Instant::now() + Duration::from_secs(3);
    let hostile: Vec<std::thread::JoinHandle<()>> = vec![
        // Garbage, newlines included.
        std::thread::spawn({
            let path = path.clone();
            move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64;
                while Instant::now() < end {
                    let mut s = connect(&path);
                    let bytes: Vec<u8> = (0..4096)
                        .map(|_| {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            x as u8
                        })
                        .collect();
                    let _ = s.write_all(&bytes);
                    let _ = s.write_all(b"\n{\"execute\":\n[[[[\n\"\\u0000\"\n");
                }
            }
        }),
        // Huge lines.
        std::thread::spawn({
            let path = path.clone();
            move || {
                while Instant::now() < end {
                    let mut s = connect(&path);
                    let _ = s.write_all(&vec![b'{'; 1 << 20]);
                }
            }
        }),
        // Commands whose answers are never read.
        std::thread::spawn({
            let path = path.clone();
            move || {
                let mut s = connect(&path);
                let cmd = b"{\"execute\":\"mappings\",\"arguments\":{\"domain\":1,\"count\":1024}}\n{\"execute\":\"counters\"}\n";
                while Instant::now() < end && s.write_all(cmd).is_ok() {}
            }
        }),
        // Disconnecting mid-answer.
        std::thread::spawn({
            let path = path.clone();
            move || {
                while Instant::now() < end {
                    let mut s = connect(&path);
                    let _ = s.write_all(b"{\"execute\":\"latency\"}\n{\"execute\":\"counters\"}\n");
                    let mut b = [0u8; 10];
                    let _ = s.read(&mut b);
                }
            }
        }),
        // Subscribed, never reading, while the guest makes events.
        std::thread::spawn({
            let path = path.clone();
            move || {
                let mut s = connect(&path);
                let _ = s.write_all(b"{\"execute\":\"subscribe\"}\n");
                std::thread::sleep(end.saturating_duration_since(Instant::now()));
            }
        }),
        // Many clients, held open.
        std::thread::spawn({
            let path = path.clone();
            move || {
                let held: Vec<UnixStream> = (0..64).map(|_| connect(&path)).collect();
                std::thread::sleep(end.saturating_duration_since(Instant::now()));
                drop(held);
            }
        }),
    ];
    for h in hostile {
        h.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let (pairs, worst) = guest.join().unwrap();
    assert!(pairs > 100, "only {pairs} MAP/UNMAP pairs in 3 s");
    assert!(worst < Duration::from_secs(1), "a pair took {worst:?}");
    // The daemon is alive and answers a well-behaved client once the
    // hostile ones are gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    let st: protocol::Status = loop {
        match Client::connect(&path, TIMEOUT).and_then(|mut c| c.call("status", Value::Null)) {
            Ok(st) => break st,
            Err(e) => {
                assert!(Instant::now() < deadline, "never served again: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    assert!(st.control.refused > 0, "{:?}", st.control);
    assert!(st.control.dropped > 0, "{:?}", st.control);
    assert!(st.control.errors > 0, "{:?}", st.control);
    assert_eq!(st.requests.failed, 0);
    eprintln!(
        "{pairs} pairs, the longest {worst:?}; control: {:?}",
        st.control
    );
}
