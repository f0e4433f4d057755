// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A guest test run on both vIOMMUs in one go: QEMU's in-process
//! virtio-iommu-pci first, then ours behind its daemon, each checked alike.

use std::path::Path;

use crate::{disk_image, scratch, Arch, Daemon, Guest, Run, Viommu};

/// Boot the guest `make` builds on QEMU's device and then on ours (with a
/// daemon of its own), assert it passed, and hand each run to `check`.
pub fn run_both(
    arch: Arch,
    name: &str,
    make: impl Fn(Viommu, &Path) -> Guest,
    check: impl Fn(Viommu, &Run, Option<&Daemon>),
) {
    let label = match arch {
        Arch::X86_64 => name.to_string(),
        Arch::Arm64 => format!("arm64 {name}"),
    };
    for viommu in [Viommu::Qemu, Viommu::Ours] {
        let dir = scratch(&format!("{}-{viommu:?}", label.replace(' ', "-")));
        let daemon = (viommu == Viommu::Ours).then(|| Daemon::start_for(&dir, arch));
        let mut guest = make(viommu, &dir);
        guest.arch = arch;
        let run = guest.run(daemon.as_ref());
        // The guest's uptime when its /init started: the boot time.
        let boot = run
            .lines("VUI-UP ")
            .first()
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("?")
            .to_string();
        eprintln!(
            "{label} on {viommu:?}: status {} in {:.1?} (userspace at {boot} s)",
            run.status, run.took
        );
        for l in run.lines("VUI-CHECK") {
            eprintln!("  {l}");
        }
        if let Some(d) = &daemon {
            eprintln!("  daemon: {}", d.stats());
        }
        run.assert_passed(&format!("{label} on {viommu:?}"));
        // A vhost-user channel the daemon closed under QEMU (it offered
        // one it did not keep) shows as this error at start-up.
        assert!(
            run.lines("Unexpected end-of-file").is_empty(),
            "{label} on {viommu:?}: QEMU read a closed channel:\n{}",
            run.output
        );
        check(viommu, &run, daemon.as_ref());
    }
}

/// The guest's `dma.sh` on an 80 MiB disk with `append` on its command
/// line, on both vIOMMUs: its data checks out, and, if `expect_maps`, our
/// daemon saw the MAP/UNMAP traffic of a strict or lazy domain.
pub fn dma(arch: Arch, name: &str, append: &str, expect_maps: bool) {
    run_both(
        arch,
        name,
        |v, dir| {
            let mut g = Guest::new(v, "dma.sh");
            g.disk = Some(disk_image(dir, 80));
            g.append = append.to_string();
            g
        },
        |_, run, daemon| {
            assert_eq!(run.lines("VUI-CHECK md5").len(), 1);
            if let (Some(d), true) = (daemon, expect_maps) {
                let s = d.stats();
                assert!(
                    s.ok[3] > 100 && s.ok[4] > 100,
                    "too little MAP/UNMAP traffic: {s}"
                );
            }
        },
    );
}
