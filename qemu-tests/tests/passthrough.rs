// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The pass-through test bed: real kernel iommufd, a DMA-capable device.
//!
//! These machines have no IOMMU, so the host side runs inside a guest that
//! has one: Debian's stock QEMU with its intel-iommu, a kernel built with IOMMUFD and
//! VFIO_DEVICE_CDEV, and two `edu` devices on vfio-pci. Inside, the
//! conformance suite runs against the kernel, then the daemon in
//! `--mode iommufd` serves the Rust test front-end, which drives the edu
//! DMA engines (guest-tools `passthrough`). A second guest runs the
//! conformance suite alone on a kernel built without transparent huge pages
//! (the nested test bed's minimal kernel), where the IOVA allocator aligns
//! to a page at most.

use qemu_tests::{
    iommufd_kernel, minimal_kernel, passthrough_skip_reason, stock_qemu, Guest, Run, Viommu,
};

/// The suite ran every case on the kernel (a device was there for the
/// device and pinning cases) and the model agreed on each.
fn assert_conformance(run: &Run) {
    assert_eq!(run.lines("VUI-CHECK conformance-rc 0").len(), 1);
    let summary = run.lines("conformance: kernel:");
    assert!(
        summary.iter().any(|l| l.contains("0 disagreements")),
        "the model and the kernel disagree"
    );
    assert!(
        summary.iter().any(|l| l.contains(" 0 skipped, 0 failed")),
        "cases were skipped or failed on the kernel: {summary:?}"
    );
}

#[test]
fn guest_maps_become_kernel_ioas_mappings_that_real_dma_obeys() {
    if let Some(why) = passthrough_skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let mut g = Guest::new(Viommu::Intel, "passthrough.sh");
    g.kernel = iommufd_kernel();
    g.qemu = stock_qemu();
    g.edu = 2;
    g.append = "intel_iommu=on".into();
    let run = g.run(None);
    println!("passthrough: status {} in {:.1?}", run.status, run.took);
    for l in run.lines("conformance:").iter().chain(&run.lines("VUI-")) {
        println!("  {l}");
    }
    for l in run.lines("passthrough:") {
        println!("  {l}");
    }
    run.assert_passed("pass-through test bed");
    for check in [
        "probe-msi-window",
        "memory-to-device",
        "device-to-memory",
        "after-unmap-untouched",
        "read-only-refuses-writes",
        "domains-isolated",
        "bypass-is-identity",
        "detached-is-blocked",
        "second-bind-refused",
        "disconnect-unmaps",
    ] {
        assert_eq!(
            run.lines(&format!("VUI-CHECK pt-{check} ok")).len(),
            1,
            "check {check}"
        );
    }
    assert_eq!(run.lines("VUI-CHECK pt-fault-logged yes").len(), 1);
    assert_eq!(run.lines("VUI-CHECK cli-iommufd-mode ok").len(), 1);
    assert_eq!(run.lines("VUI-CHECK cli-second-daemon-refused ok").len(), 1);
    assert_conformance(&run);
    assert_eq!(
        run.lines("conformance: model: Enabled transparent huge pages")
            .len(),
        1,
        "the test bed's kernel is built with THP"
    );
}

#[test]
fn the_model_without_thp_answers_as_a_kernel_built_without_it() {
    if let Some(why) = passthrough_skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let Some(kernel) = minimal_kernel() else {
        eprintln!(
            "skipped: the minimal kernel is not built (scripts/kernel/build-minimal-kernel.sh, \
             ~5 min; scripts/qemu-tests.sh builds it)"
        );
        return;
    };
    let mut g = Guest::new(Viommu::Intel, "conformance.sh");
    g.kernel = Some(kernel);
    g.qemu = stock_qemu();
    g.edu = 1;
    g.append = "intel_iommu=on".into();
    let run = g.run(None);
    println!(
        "no-THP conformance: status {} in {:.1?}",
        run.status, run.took
    );
    for l in run.lines("conformance:").iter().chain(&run.lines("VUI-")) {
        println!("  {l}");
    }
    run.assert_passed("conformance on a kernel without THP");
    assert_eq!(
        run.lines("conformance: model: Disabled transparent huge pages")
            .len(),
        1,
        "the minimal kernel is built without THP"
    );
    assert_conformance(&run);
}
