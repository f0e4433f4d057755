// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest memory changes under live mappings (issue 11): while the guest
//! reads its disk through the vIOMMU in strict mode, a DIMM is hot-added
//! (the guest onlines it as ZONE_MOVABLE, so its page cache — the DMA
//! buffers of the next reads — moves into it) and later hot-removed (ACPI
//! eject; the kernel offlines it first). Each time QEMU sends the daemon a
//! new memory table with the device's mappings live (the virtqueues' among
//! them); every round of reads must still verify.

use std::path::Path;
use std::time::{Duration, Instant};

use qemu_tests::{disk_image, hmp, scratch, skip_unless_ready, Daemon, Guest, Running, Viommu};
use virtio_iommu::{Change, Map};

/// The `key=value` figure of the last round line of `out`.
fn last_round_figure(out: &str, key: &str) -> Option<u64> {
    out.lines()
        .rev()
        .filter(|l| l.contains("VUI-ROUND"))
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
        })
}

fn rounds(out: &str) -> usize {
    out.matches("VUI-ROUND").count()
}

/// The address and size of `dimm0` in an `info memory-devices` answer.
fn dimm_range(info: &str) -> (u64, u64) {
    let field = |name: &str| -> u64 {
        let v = info
            .lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in: {info}"));
        let v = v.trim();
        match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).expect("hex"),
            None => v.parse().expect("decimal"),
        }
    };
    (field("addr:"), field("size:"))
}

/// Sample the daemon's mappings until one reaches guest-physical memory
/// in `[base, base + size)` (strict mode maps each buffer only for the
/// duration of its I/O); what it found.
fn wait_for_mapping_into(daemon: &Daemon, base: u64, size: u64, limit: Duration) -> String {
    let t = Instant::now();
    while t.elapsed() < limit {
        let hit = daemon.backend.with_device(|d| {
            d.save_state().entries.iter().find_map(|e| match *e {
                Change::Map(Map {
                    domain,
                    virt_start,
                    phys_start,
                    ..
                }) if phys_start >= base && phys_start - base < size => Some(format!(
                    "domain {domain}: IOVA {virt_start:#x} -> GPA {phys_start:#x}"
                )),
                _ => None,
            })
        });
        if let Some(h) = hit {
            return h;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    panic!("in {limit:?} no mapping reached the DIMM at {base:#x}+{size:#x}");
}

/// Run `command` on the monitor; panics on an error answer.
#[track_caller]
fn monitor(socket: &Path, command: &str) {
    let answer = hmp(socket, command);
    assert!(
        !answer.to_lowercase().contains("error"),
        "{command}: {answer}"
    );
}

#[test]
fn memory_hot_added_and_removed_under_dma_through_the_viommu_keeps_verifying() {
    skip_unless_ready!();
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .is_test(true)
        .try_init();
    let dir = scratch("memory-hotplug");
    let daemon = Daemon::start(&dir);
    let socket = dir.join("monitor.sock");
    let mut g = Guest::new(Viommu::Ours, "hotplug.sh");
    g.disk = Some(disk_image(&dir, 16));
    g.append = "iommu.strict=1 memhp_default_state=offline".into();
    g.timeout = Duration::from_secs(300);
    g.qemu_args = [
        "-m",
        "1G,slots=2,maxmem=2G",
        "-monitor",
        &format!("unix:{},server=on,wait=off", socket.display()),
    ]
    .map(String::from)
    .to_vec();
    let mut guest = Running::start(g.command(Some(&daemon)), &dir.join("serial.log"));
    guest.wait_for("VUI-ROUND 2 ok", Duration::from_secs(240));
    let before = last_round_figure(&guest.output(), "memtotal").expect("memtotal");

    // Hot-add 256 MiB.
    let t = Instant::now();
    monitor(
        &socket,
        "object_add memory-backend-memfd,id=hot0,size=256M,share=on",
    );
    monitor(&socket, "device_add pc-dimm,id=dimm0,memdev=hot0");
    guest.wait_for("VUI-LOG onlined", Duration::from_secs(60));
    let n = rounds(&guest.output());
    guest.wait_for(&format!("VUI-ROUND {} ok", n + 2), Duration::from_secs(60));
    let out = guest.output();
    let added = last_round_figure(&out, "memtotal").expect("memtotal");
    let movable = last_round_figure(&out, "movable").unwrap_or(0);
    assert!(added > before, "the guest did not get the DIMM:\n{out}");
    assert!(movable > 0, "the DIMM was not onlined as movable:\n{out}");
    // The reads' buffers are in the DIMM now: the daemon maps them.
    let (base, size) = dimm_range(&hmp(&socket, "info memory-devices"));
    let seen = wait_for_mapping_into(&daemon, base, size, Duration::from_secs(60));
    println!(
        "hot-add: guest memory {before} KiB -> {added} KiB, movable zone {movable} pages; \
         the daemon mapped DMA buffers in the DIMM ({seen}); verified rounds go on ({:.1?})",
        t.elapsed()
    );

    // Hot-remove it: the guest offlines it (migrating the page cache out)
    // and ejects it; QEMU drops the region.
    let t = Instant::now();
    monitor(&socket, "device_del dimm0");
    loop {
        let devices = hmp(&socket, "info memory-devices");
        if !devices.contains("dimm0") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "the DIMM was never removed: {devices}\n{}",
            guest.output()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    monitor(&socket, "object_del hot0");
    let n = rounds(&guest.output());
    guest.wait_for(&format!("VUI-ROUND {} ok", n + 2), Duration::from_secs(60));
    let removed = last_round_figure(&guest.output(), "memtotal").expect("memtotal");
    println!(
        "hot-remove: guest memory {added} KiB -> {removed} KiB ({:.1?})",
        t.elapsed()
    );
    assert!(removed < added, "the guest still has the DIMM");

    guest.wait_for("VUI-CHECK hotplug", Duration::from_secs(240));
    guest.wait_for("VUI-GUEST-DONE rc=0", Duration::from_secs(30));
    let stats = daemon.stats();
    println!("daemon: {stats}");
    assert!(stats.ok[3] > 0 && stats.ok[4] > 0, "no MAP/UNMAP served");
}
