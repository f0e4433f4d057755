// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The guest tests on the arm64 `virt` machine (GICv3, `-cpu max`, TCG):
//! each runs against QEMU's virtio-iommu-pci and against ours, which the
//! machine wires alike (device-tree `iommu-map`, the ITS doorbell as the
//! reserved MSI region). Busybox-only guests: the x86 guest tools are not
//! in their initramfs. Skipped, saying so, unless the aarch64 QEMU is built
//! and the arm64 kernel fetched (`scripts/qemu-tests.sh` does both).

use std::time::Instant;

use qemu_tests::{
    arm64_skip_reason, disk_image, scratch, side_by_side, Arch, Daemon, Guest, Run, Viommu,
};

macro_rules! skip_unless_arm64 {
    () => {
        if let Some(why) = arm64_skip_reason() {
            eprintln!("skipped (arm64): {why}");
            return;
        }
    };
}

/// `vui.msi=` for bind.sh: the window as the guest's reserved_regions
/// print it.
fn msi_param() -> String {
    let (start, last) = Arch::Arm64.msi_window();
    format!("vui.msi={start:#018x}-{last:#018x}")
}

fn arm64_guest(viommu: Viommu, test: &'static str) -> Guest {
    let mut g = Guest::new(viommu, test);
    g.arch = Arch::Arm64;
    g
}

fn run_both(
    name: &str,
    make: impl Fn(Viommu, &std::path::Path) -> Guest,
    check: impl Fn(Viommu, &Run, Option<&Daemon>),
) {
    side_by_side::run_both(Arch::Arm64, name, make, check)
}

#[test]
fn arm64_the_driver_binds_and_groups_show_the_its_doorbell() {
    skip_unless_arm64!();
    run_both(
        "bind",
        |v, dir| {
            let mut g = arm64_guest(v, "bind.sh");
            g.disk = Some(disk_image(dir, 16));
            g.append = msi_param();
            g
        },
        |_, run, daemon| {
            assert!(!run.lines("VUI-GROUP").is_empty());
            if let Some(d) = daemon {
                assert!(
                    d.stats().ok[1] > 0,
                    "the daemon saw no ATTACH: {}",
                    d.stats()
                );
                assert!(
                    d.stats().ok[5] > 0,
                    "the daemon saw no PROBE: {}",
                    d.stats()
                );
            }
        },
    );
}

fn dma(name: &str, append: &str, expect_maps: bool) {
    side_by_side::dma(Arch::Arm64, name, append, expect_maps)
}

#[test]
fn arm64_dma_through_the_viommu_in_strict_mode() {
    skip_unless_arm64!();
    dma("dma-strict", "iommu.strict=1", true);
}

#[test]
fn arm64_dma_through_the_viommu_in_lazy_mode() {
    skip_unless_arm64!();
    dma("dma-lazy", "iommu.strict=0", true);
}

#[test]
fn arm64_dma_with_identity_domains() {
    skip_unless_arm64!();
    dma("dma-identity", "iommu.passthrough=1", false);
}

#[test]
fn arm64_domain_changes_and_pci_remove_and_rescan() {
    skip_unless_arm64!();
    run_both(
        "rebind",
        |v, dir| {
            let mut g = arm64_guest(v, "rebind.sh");
            g.disk = Some(disk_image(dir, 16));
            g
        },
        |_, run, daemon| {
            assert_eq!(run.lines("VUI-CHECK md5").len(), 3, "three DMA rounds");
            if let Some(d) = daemon {
                let s = d.stats();
                assert!(s.ok[2] >= 1, "PCI remove sends DETACH: {s}");
                assert_eq!(s.failed, [0; 6], "no request failed: {s}");
            }
        },
    );
}

/// A daemon started with x86's window (its default) behind the `virt`
/// machine: QEMU names both windows and the --msi-window to use, and exits
/// at start-up instead of booting a guest whose MSIs would fault.
#[test]
fn arm64_a_daemon_with_the_wrong_msi_window_is_refused_at_start_up() {
    skip_unless_arm64!();
    let dir = scratch("arm64-msi-mismatch");
    let daemon = Daemon::start_with(&dir, None);
    let mut g = arm64_guest(Viommu::Ours, "bind.sh");
    g.timeout = std::time::Duration::from_secs(120);
    let t0 = Instant::now();
    let run = g.run(Some(&daemon));
    eprintln!(
        "arm64 msi-mismatch: status {} in {:.1?}",
        run.status,
        t0.elapsed()
    );
    assert_ne!(run.status, 0, "QEMU must refuse:\n{}", run.output);
    assert!(
        run.output.contains("MSI window 0xfee00000-0xfeefffff")
            && run.output.contains("--msi-window 0x8090000-0x809ffff"),
        "QEMU names both windows and the fix:\n{}",
        run.output
    );
    assert!(
        !run.output.contains("Run /init"),
        "refused before the guest's userspace:\n{}",
        run.output
    );
}
