//! The pass-through test bed: real kernel iommufd, a DMA-capable device.
//!
//! These machines have no IOMMU, so the host side runs inside a guest that
//! has one: Debian's stock QEMU with its intel-iommu, a kernel built with IOMMUFD and
//! VFIO_DEVICE_CDEV, and two `edu` devices on vfio-pci. Inside, the
//! conformance suite runs against the kernel, then the daemon in
//! `--mode iommufd` serves the Rust test front-end, which drives the edu
//! DMA engines (guest-tools `passthrough`).

use qemu_tests::{iommufd_kernel, passthrough_skip_reason, stock_qemu, Guest, Viommu};

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
    assert_eq!(run.lines("VUI-CHECK conformance-rc 0").len(), 1);
    assert!(
        run.lines("conformance: kernel:")
            .iter()
            .any(|l| l.contains("0 disagreements")),
        "the model and the kernel disagree"
    );
}
