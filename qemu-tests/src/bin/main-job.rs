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

use clap::Parser;
use qemu_tests::{disk_image, repo, scratch, Daemon, Guest, Viommu};

/// The main job: a Linux guest whose disk DMA goes through
/// vhost-user-iommu.
///
/// Builds (or reuses) the patched QEMU (scripts/qemu/build-qemu.sh) and
/// fetches the Debian guest kernel (scripts/guest/fetch-kernel.sh), both
/// cached in ~/.cache/vhost-user-iommu/; starts the daemon in this process,
/// boots the guest under TCG with a virtio-blk disk behind the vIOMMU
/// (strict invalidation), writes and reads back 64 MiB, and prints what the
/// guest driver and the daemon did. It takes no options.
#[derive(Debug, Parser)]
#[command(name = "main-job", version)]
struct Cli {}

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
    // --help and --version answer and exit here; anything else is refused.
    let Cli {} = Cli::parse();
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

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn help_and_version_answer_and_arguments_are_refused() {
        Cli::command().debug_assert();
        let kind = |args: &[&str]| Cli::try_parse_from(args).unwrap_err().kind();
        assert_eq!(kind(&["main-job", "--help"]), ErrorKind::DisplayHelp);
        assert_eq!(kind(&["main-job", "--version"]), ErrorKind::DisplayVersion);
        assert_eq!(kind(&["main-job", "--quick"]), ErrorKind::UnknownArgument);
        assert_eq!(kind(&["main-job", "x"]), ErrorKind::UnknownArgument);
        assert!(Cli::try_parse_from(["main-job"]).is_ok());
    }
}
