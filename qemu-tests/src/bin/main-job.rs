// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The main job: a Linux guest whose disk DMA goes through vhost-user-iommu.
//!
//! Sets everything up on first run (the patched QEMU is built and the Debian
//! guest kernel fetched, both cached in ~/.cache/vhost-user-iommu/), starts
//! the daemon in this process, boots the guest under TCG with a virtio-blk
//! disk behind the vIOMMU (strict invalidation), writes and reads back
//! 64 MiB, and prints what the guest driver and the daemon did.
//!
//! `cargo run --release -p qemu-tests --bin main-job`

use std::process::{Command, ExitCode};

use qemu_tests::{disk_image, repo, scratch, Daemon, Guest, Viommu};

fn setup(script: &str) -> bool {
    println!("== {script}");
    match Command::new(repo().join(script)).status() {
        Ok(s) if s.success() => true,
        Ok(s) => {
            eprintln!("main-job: {script} failed ({s})");
            false
        }
        Err(e) => {
            eprintln!("main-job: cannot run {script}: {e}");
            false
        }
    }
}

fn main() -> ExitCode {
    if !setup("scripts/qemu/build-qemu.sh") || !setup("scripts/guest/fetch-kernel.sh") {
        return ExitCode::FAILURE;
    }
    let dir = scratch("main-job");
    let daemon = Daemon::start(&dir);
    println!(
        "== daemon listening on {} (mirror {})",
        daemon.socket.display(),
        daemon.mirror.display()
    );
    let mut guest = Guest::new(Viommu::Ours, "dma.sh");
    guest.disk = Some(disk_image(&dir, 80));
    guest.append = "iommu.strict=1".into();
    println!("== booting the guest (TCG, a few seconds)");
    let run = guest.run(Some(&daemon));
    println!("== what the guest saw (its virtio-iommu driver, then the DMA check)");
    for l in run
        .lines("VUI-LOG")
        .into_iter()
        .chain(run.lines("VUI-CHECK"))
    {
        println!("   {l}");
    }
    println!("== the daemon");
    println!("   {}", daemon.stats());
    println!("== guest exited with {} after {:.1?}", run.status, run.took);
    if run.status == 0 {
        ExitCode::SUCCESS
    } else {
        eprintln!("{}", run.output);
        ExitCode::FAILURE
    }
}
