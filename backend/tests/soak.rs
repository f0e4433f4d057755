// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The bounded soak (issue 11): for `VUI_SOAK_SECS` seconds (default 20;
//! minutes for a local run) one guest's worth of MAP/UNMAP load, mixed at
//! random with the four ways a device's life can be interrupted:
//!
//! - the **front-end vanishes** with requests in flight (its socket closes
//!   mid-load): the next front-end finds a reset device;
//! - the **daemon is killed** (SIGKILL) or **stopped** (SIGTERM) under its
//!   front-end and started again on its `--state-file`: it comes back with
//!   every attachment and mapping;
//! - the **device migrates** to a second daemon (vhost-user DEVICE_STATE):
//!   the destination has every attachment and mapping.
//!
//! The test keeps a ledger of what the driver was told: every status must
//! be the one the ledger predicts, and after each restart and migration the
//! daemon's whole state (read back through DEVICE_STATE) must equal the
//! ledger, mapping by mapping. It prints requests served, interruptions
//! survived, mappings checked, and lost (always 0, or it fails).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use test_frontend::daemon::{DaemonProcess, Scratch};
use test_frontend::rng::Rng;
use test_frontend::{Request, Status, TestVm, VmOptions, MAP_F_READ, MAP_F_WRITE};
use virtio_iommu::{Change, DeviceState, Map};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-iommu");
/// Endpoint → domain, attached at every fresh start.
const ATTACH: [(u32, u32); 3] = [(8, 1), (16, 2), (24, 3)];
const PAGE: u64 = 0x1000;
/// IOVA pages per domain the load uses.
const IOVA_PAGES: u64 = 512;
/// Guest RAM pages (the test front-end's default 16 MiB).
const RAM_PAGES: u64 = (16 << 20) / PAGE;

/// Daemon `name` with its state file, both in `dir`; killed however the
/// test ends.
fn start(dir: &Scratch, name: &str) -> DaemonProcess {
    DaemonProcess::builder(BIN, dir.join(format!("{name}.sock")))
        .arg("--state-file")
        .arg(dir.join(format!("{name}.state")))
        .args(["--endpoints", "8,16,24"])
        .rust_log("error")
        .spawn()
}

fn connect(d: &DaemonProcess) -> TestVm {
    d.connect(VmOptions::default()).expect("connect")
}

/// What the driver was told: domain → first IOVA → (last IOVA, GPA).
#[derive(Default)]
struct Ledger(BTreeMap<u32, BTreeMap<u64, (u64, u64)>>);

impl Ledger {
    fn overlaps(&self, domain: u32, start: u64, end: u64) -> bool {
        self.0.get(&domain).is_some_and(|m| {
            m.range(..=end)
                .next_back()
                .is_some_and(|(_, &(last, _))| last >= start)
        })
    }

    fn mappings(&self) -> usize {
        self.0.values().map(BTreeMap::len).sum()
    }

    /// The daemon's saved state is exactly this ledger.
    fn check(&self, state: &DeviceState, when: &str) -> usize {
        let mut attached = BTreeMap::new();
        let mut mapped: BTreeMap<u32, BTreeMap<u64, (u64, u64)>> = BTreeMap::new();
        for e in &state.entries {
            match *e {
                Change::Attach {
                    endpoint, domain, ..
                } => {
                    attached.insert(endpoint, domain);
                }
                Change::Map(Map {
                    domain,
                    virt_start,
                    virt_end,
                    phys_start,
                    flags,
                }) => {
                    assert_eq!(flags, MAP_F_READ | MAP_F_WRITE, "{when}: flags");
                    mapped
                        .entry(domain)
                        .or_default()
                        .insert(virt_start, (virt_end, phys_start));
                }
                _ => {}
            }
        }
        let want: BTreeMap<u32, u32> = ATTACH.into_iter().collect();
        assert_eq!(attached, want, "{when}: attachments");
        let ledger: BTreeMap<u32, BTreeMap<u64, (u64, u64)>> = self
            .0
            .iter()
            .filter(|(_, m)| !m.is_empty())
            .map(|(&d, m)| (d, m.clone()))
            .collect();
        assert_eq!(mapped, ledger, "{when}: mappings lost or invented");
        self.mappings()
    }
}

fn decode(bytes: &[u8]) -> DeviceState {
    DeviceState::decode(bytes).expect("a state the daemon saved decodes")
}

fn fresh(vm: &mut TestVm, ledger: &mut Ledger) {
    ledger.0.clear();
    for (endpoint, domain) in ATTACH {
        assert_eq!(vm.attach(domain, endpoint, 0).unwrap(), Status::Ok);
    }
}

/// One burst of load: MAPs and UNMAPs, each status checked against the
/// ledger, which follows.
fn load(vm: &mut TestVm, ledger: &mut Ledger, rng: &mut Rng, n: u32) -> u64 {
    let mut served = 0;
    for _ in 0..n {
        let domain = ATTACH[rng.below(ATTACH.len() as u64) as usize].1;
        let existing: Vec<(u64, u64)> = ledger
            .0
            .get(&domain)
            .map(|m| m.iter().map(|(&s, &(e, _))| (s, e)).collect())
            .unwrap_or_default();
        if !existing.is_empty() && rng.below(2) == 0 {
            let (start, end) = existing[rng.below(existing.len() as u64) as usize];
            assert_eq!(vm.unmap(domain, start, end).unwrap(), Status::Ok);
            ledger.0.get_mut(&domain).unwrap().remove(&start);
        } else {
            let pages = 1 + rng.below(4);
            let start = rng.below(IOVA_PAGES - pages) * PAGE;
            let end = start + pages * PAGE - 1;
            let gpa = rng.below(RAM_PAGES - pages) * PAGE;
            let status = vm
                .map(domain, start, end, gpa, MAP_F_READ | MAP_F_WRITE)
                .unwrap();
            if ledger.overlaps(domain, start, end) {
                assert_ne!(status, Status::Ok, "MAP over a live mapping accepted");
            } else {
                assert_eq!(status, Status::Ok, "MAP {domain} {start:#x}-{end:#x}");
                ledger
                    .0
                    .entry(domain)
                    .or_default()
                    .insert(start, (end, gpa));
            }
        }
        served += 1;
    }
    served
}

#[test]
fn soak_mixing_load_front_end_loss_daemon_restarts_and_migrations_loses_nothing() {
    let secs = std::env::var("VUI_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20u64);
    let seed = std::env::var("VUI_SOAK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x50a6);
    println!("soak: {secs} s, seed {seed} (VUI_SOAK_SECS, VUI_SOAK_SEED)");
    let dir = Scratch::new("soak");
    let mut rng = Rng(seed);
    let mut names = (0u32..).map(|n| format!("d{n}"));
    let mut daemon = start(&dir, &names.next().unwrap());
    let mut vm = connect(&daemon);
    let mut ledger = Ledger::default();
    fresh(&mut vm, &mut ledger);

    let (mut requests, mut vanished, mut kills, mut stops, mut migrations, mut checked) =
        (0u64, 0u32, 0u32, 0u32, 0u32, 0usize);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) {
        let n = 50 + rng.below(200) as u32;
        requests += load(&mut vm, &mut ledger, &mut rng, n);
        match rng.below(8) {
            // The front-end vanishes with requests on the ring.
            0 => {
                let burst: Vec<Request> = (0..16)
                    .map(|i| Request::Map {
                        domain: 1,
                        virt_start: (IOVA_PAGES + i) * PAGE,
                        virt_end: (IOVA_PAGES + i + 1) * PAGE - 1,
                        phys_start: 0,
                        flags: MAP_F_READ,
                    })
                    .collect();
                let _ = vm.submit(&burst);
                drop(vm);
                vm = connect(&daemon);
                assert!(
                    decode(&vm.save_state().unwrap()).entries.is_empty(),
                    "a vanished front-end's state outlived it"
                );
                fresh(&mut vm, &mut ledger);
                vanished += 1;
            }
            // The daemon dies or stops under its front-end and comes back.
            1 | 2 => {
                let name = names.next().unwrap();
                let state = daemon.socket().with_extension("state");
                let (signal, number) = if rng.below(2) == 0 {
                    ("KILL", libc::SIGKILL)
                } else {
                    ("TERM", libc::SIGTERM)
                };
                daemon.end(number);
                match signal {
                    "KILL" => kills += 1,
                    _ => stops += 1,
                }
                std::fs::rename(&state, dir.join(format!("{name}.state"))).unwrap();
                daemon = start(&dir, &name);
                drop(vm);
                vm = connect(&daemon);
                checked += ledger.check(
                    &decode(&vm.save_state().unwrap()),
                    &format!("after SIG{signal} and restart"),
                );
            }
            // The device migrates to a fresh daemon.
            3 => {
                let bytes = vm.save_state().unwrap();
                let dst = start(&dir, &names.next().unwrap());
                let mut dst_vm = connect(&dst);
                dst_vm.load_state(&bytes).unwrap();
                drop(vm);
                daemon = dst;
                vm = dst_vm;
                checked += ledger.check(&decode(&vm.save_state().unwrap()), "after migration");
                migrations += 1;
            }
            _ => {}
        }
    }
    checked += ledger.check(&decode(&vm.save_state().unwrap()), "at the end");
    println!(
        "soak: {:.0?}: {requests} requests served; front-ends vanished {vanished}, daemons \
         killed {kills} and stopped {stops} (each restarted on its state file), migrations \
         {migrations}; {checked} mappings checked after restores; lost 0",
        t0.elapsed()
    );
    assert!(
        vanished + kills + stops + migrations > 0,
        "no interruption in {secs} s"
    );
    drop(vm);
    drop(daemon);
}
