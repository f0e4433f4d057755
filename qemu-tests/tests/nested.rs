// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The nested test bed (issue 12): a VFIO device given to a QEMU guest
//! behind vhost-user-iommu, its DMA checked from inside that guest.
//!
//! These machines have no IOMMU, so the host is itself a guest ("L1"):
//! Debian's stock QEMU with intel-iommu and two `edu` devices, the iommufd
//! kernel (scripts/kernel/build-iommufd-kernel.sh). Inside it the daemon
//! and the project's patched QEMU run a second-level guest ("L2", the
//! minimal kernel of scripts/kernel/build-minimal-kernel.sh) that gets both
//! edu devices with `-device vfio-pci` behind `vhost-user-iommu`, and drives
//! their DMA engines through guest VFIO type1 (guest-tools `edu-dma`).
//! qemu-tests/guest/nested-l1.sh and nested-l2.sh are the two levels'
//! scripts; scripts/guest/build-nested-initramfs.sh packs them.
//!
//! Who carries out the guest's mappings is the parameter, [`VfioPath`].
//!
//! After the guest-VFIO checks, L2 puts its second edu device in an
//! identity domain (no driver; its group's `type` set to `identity`, which
//! Linux 6.12's virtio-iommu turns into an ATTACH with the BYPASS flag) and
//! DMAs to guest-physical addresses from userspace; then it removes the
//! device (sysfs `remove`: the one path on which 6.12 sends DETACH,
//! drivers/iommu/virtio-iommu.c viommu_release_device) and checks that the
//! device's DMA is blocked (the daemon runs with `--bypass false`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use qemu_tests::{
    iommufd_kernel, minimal_kernel, passthrough_skip_reason, qemu, repo, stock_qemu, Guest, Viommu,
};

/// Who owns the passed-through device's DMA mappings in L1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum VfioPath {
    /// QEMU's VFIO (legacy type1 container) follows the guest's mappings
    /// through IOMMU notifiers fed by the mirror; the daemon is emulated.
    QemuOwned,
    /// QEMU forwards the VFIO device (`iommufd=`) to the daemon, which
    /// attaches it to its kernel IOASes; QEMU maps nothing.
    DaemonOwned,
}

impl VfioPath {
    /// `vui.path=` for nested-l1.sh.
    fn name(self) -> &'static str {
        match self {
            Self::QemuOwned => "qemu-owned",
            Self::DaemonOwned => "daemon-owned",
        }
    }
}

/// The target directory cargo uses (`CARGO_TARGET_DIR`, else `target/`).
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"))
}

/// Why the nested test bed cannot run, if it cannot.
fn skip_reason(path: VfioPath) -> Option<String> {
    if let Some(why) = passthrough_skip_reason() {
        return Some(why);
    }
    if qemu().is_none() {
        return Some("the patched QEMU is not built (scripts/qemu/build-qemu.sh)".into());
    }
    if minimal_kernel().is_none() {
        return Some(
            "the minimal second-level kernel is not built \
             (scripts/kernel/build-minimal-kernel.sh, ~5 min; scripts/qemu-tests.sh builds it)"
                .into(),
        );
    }
    if std::env::var("VUI_NESTED").as_deref() == Ok("0") {
        return Some(format!(
            "the nested test bed ({}) is off: VUI_NESTED=0 (it takes 2.5-4.5 min a path on \
             these 2-core machines, measured 2026-11-26: the second-level minimal kernel \
             reaches userspace 66-158 s into its own clock, depending on the machine's load)",
            path.name()
        ));
    }
    None
}

/// The static guest programs (edu-dma, the daemon) in this target dir.
fn static_tools() -> PathBuf {
    const TARGET: &str = "x86_64-unknown-linux-gnu";
    let dir = target_dir().join("guest");
    let st = Command::new(env!("CARGO"))
        .args([
            "build",
            "--release",
            "--locked",
            "--bins",
            "--target",
            TARGET,
        ])
        .args(["-p", "guest-tools", "-p", "vhost-user-iommu"])
        .arg("--target-dir")
        .arg(&dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .status()
        .expect("cargo build");
    assert!(st.success(), "building the static guest programs failed");
    dir.join(TARGET).join("release")
}

fn l1_initramfs(out: &Path) -> PathBuf {
    let st = Command::new(repo().join("scripts/guest/build-nested-initramfs.sh"))
        .arg("--out")
        .arg(out)
        .arg("--tools")
        .arg(static_tools())
        .status()
        .expect("build-nested-initramfs.sh");
    assert!(st.success(), "build-nested-initramfs.sh failed");
    out.to_path_buf()
}

/// The checks every path must pass: from inside L2 (`nested-*` of
/// edu-dma) and from L1 (`nested-l1-*` of nested-l1.sh).
const CHECKS: &[&str] = &[
    "VUI-CHECK nested-dma-lands-exactly ok",
    "VUI-CHECK nested-after-unmap-untouched ok",
    "VUI-CHECK nested-read-only-readable ok",
    "VUI-CHECK nested-read-only-refuses-writes ok",
    "VUI-CHECK nested-domains-isolated ok",
    "VUI-CHECK nested-bypass-identity ok",
    "VUI-CHECK nested-bypass-outside-ram-untouched ok",
    "VUI-CHECK nested-bypass-after-fault-lands ok",
    "VUI-CHECK nested-detach-blocks ok",
    "VUI-CHECK nested-hold-mapped ok",
    "VUI-CHECK nested-vanished-viommu-unmaps ok",
    "VUI-CHECK nested-l2-rc 0",
    "VUI-CHECK nested-l1-dmar-fault-at-unmapped-iova yes",
    "VUI-CHECK nested-l1-dmar-fault-outside-l2-ram yes",
    "VUI-CHECK nested-l1-dmar-fault-after-detach yes",
    "VUI-CHECK nested-l1-saw-bypass-attach yes",
    "VUI-CHECK nested-l1-saw-detach yes",
    "VUI-CHECK nested-l1-dmar-fault-after-daemon-exit yes",
    "VUI-CHECK nested-l1-qemu-exit-released ok",
];

/// Seconds from a `... at N s` line.
fn seconds_at(line: &str) -> Option<f64> {
    let rest = &line[line.find(" at ")? + 4..];
    rest.split_whitespace().next()?.parse().ok()
}

fn nested(path: VfioPath) {
    if let Some(why) = skip_reason(path) {
        eprintln!("skipped: {why}");
        return;
    }
    let dir = target_dir().join(format!("qemu-tests/nested-{}", path.name()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let mut g = Guest::new(Viommu::Intel, "nested-l1.sh");
    g.kernel = iommufd_kernel();
    g.qemu = stock_qemu();
    g.edu = 2;
    g.initrd = Some(l1_initramfs(&dir.join("nested-l1.gz")));
    g.append = format!("intel_iommu=on vui.path={}", path.name());
    g.timeout = Duration::from_secs(1200);
    let run = g.run(None);
    println!(
        "nested {}: L1 status {}, L1 wall time {:.1?}",
        path.name(),
        run.status,
        run.took
    );
    for l in run
        .lines("VUI-")
        .iter()
        .filter(|l| !l.starts_with("VUI-LOG daemon:"))
    {
        println!("  {l}");
    }
    if let Some(boot) = run
        .lines("VUI-LOG nested-l2 userspace at")
        .first()
        .and_then(|l| seconds_at(l))
    {
        println!(
            "nested {}: L2 kernel start to userspace {boot:.2} s",
            path.name()
        );
    }
    run.assert_passed(&format!("nested test bed, {}", path.name()));
    for check in CHECKS {
        assert_eq!(run.lines(check).len(), 1, "{}: {check}", path.name());
    }
}

#[test]
fn nested_guest_dma_follows_its_viommu_qemu_owned_vfio() {
    nested(VfioPath::QemuOwned);
}

#[test]
fn nested_guest_dma_follows_its_viommu_daemon_owned_vfio() {
    nested(VfioPath::DaemonOwned);
}
