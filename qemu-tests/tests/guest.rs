// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The guest tests of issue 4: each runs against our device and against
//! QEMU's in-process virtio-iommu-pci in the same run.

use qemu_tests::{disk_image, side_by_side, skip_unless_ready, Arch, Daemon, Guest, Viommu};

fn run_both(
    name: &str,
    make: impl Fn(Viommu, &std::path::Path) -> Guest,
    check: impl Fn(Viommu, &qemu_tests::Run, Option<&Daemon>),
) {
    side_by_side::run_both(Arch::X86_64, name, make, check)
}

fn dma(name: &str, append: &str, expect_maps: bool) {
    side_by_side::dma(Arch::X86_64, name, append, expect_maps)
}

#[test]
fn the_driver_binds_and_groups_show_the_msi_window() {
    skip_unless_ready!();
    run_both(
        "bind",
        |v, dir| {
            let mut g = Guest::new(v, "bind.sh");
            g.disk = Some(disk_image(dir, 16));
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
            }
        },
    );
}

#[test]
fn dma_through_the_viommu_in_strict_mode() {
    skip_unless_ready!();
    dma("dma-strict", "iommu.strict=1", true);
}

#[test]
fn dma_through_the_viommu_in_lazy_mode() {
    skip_unless_ready!();
    dma("dma-lazy", "iommu.strict=0", true);
}

#[test]
fn dma_with_identity_domains() {
    skip_unless_ready!();
    dma("dma-identity", "iommu.passthrough=1", false);
}

#[test]
fn domain_changes_and_pci_remove_attach_and_detach() {
    skip_unless_ready!();
    run_both(
        "rebind",
        |v, dir| {
            let mut g = Guest::new(v, "rebind.sh");
            g.disk = Some(disk_image(dir, 16));
            g
        },
        |_, run, daemon| {
            assert_eq!(run.lines("VUI-CHECK md5").len(), 3, "three DMA rounds");
            if let Some(d) = daemon {
                let s = d.stats();
                let at_boot = s.attached as u64;
                assert!(
                    s.ok[1] >= at_boot + 3,
                    "one ATTACH per endpoint at boot, then one per retype and one after the rescan: {s}"
                );
                assert!(s.ok[2] >= 1, "PCI remove sends DETACH: {s}");
                assert_eq!(s.failed, [0; 6], "no request failed: {s}");
                assert_eq!(
                    s.domains, s.attached,
                    "one domain per endpoint, none left over: {s}"
                );
            }
        },
    );
}

#[test]
fn guest_vfio_dma_through_the_viommu_and_a_fault_after_unmap() {
    skip_unless_ready!();
    run_both(
        "edu",
        |v, _| {
            let mut g = Guest::new(v, "edu.sh");
            g.edu = 1;
            // Neither vIOMMU remaps interrupts on x86, so type1 refuses a
            // container unless told MSIs are not isolated (both alike).
            g.append = "vfio_iommu_type1.allow_unsafe_interrupts=1".into();
            g
        },
        |_, run, daemon| {
            assert_eq!(run.lines("VUI-CHECK edu-dma-both-ways ok").len(), 1);
            assert_eq!(run.lines("VUI-CHECK edu-after-unmap untouched").len(), 1);
            if let Some(d) = daemon {
                let s = d.stats();
                assert!(s.ok[3] > 0 && s.ok[4] > 0, "no MAP/UNMAP from VFIO: {s}");
            }
        },
    );
}
