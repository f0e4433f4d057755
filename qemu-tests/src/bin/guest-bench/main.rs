// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The guest benchmark: the same guest booted three ways — behind our
//! vhost-user-iommu daemon, behind QEMU's in-process virtio-iommu-pci,
//! and with no vIOMMU — running fio on a virtio-blk disk behind the vIOMMU
//! (`iommu_platform=on`), in strict and lazy invalidation mode, with one or
//! more guests of a configuration running at once.
//!
//! `cargo run --release -p qemu-tests --bin guest-bench -- [--guests 1,2] [--rounds N] [--quick]`
//! (`--help` for every option)
//!
//! For every round, guest count n of `--guests` and configuration, n guests
//! boot at the same moment, each with its own scratch directory, its own
//! sparse disk and, behind ours, its own daemon: a process of its own, as an
//! operator runs one per VM (`target/release/vhost-user-iommu`, built from
//! the working tree at the start, with `--poll-us` of `VUI_POLL_US` and the
//! arguments of `VUI_DAEMON_ARGS`). Each guest runs every fio job of
//! `qemu-tests/guest/fio.sh` once, and the jobs of the n guests start
//! together: with `vui.sync=1` a guest prints `VUI-READY job=NAME` before
//! each job (and `job=end` after the last) and waits for a line on its
//! second serial port (ttyS1, the Unix socket `go.sock` in its directory);
//! the host writes that line to every guest once all of them are ready.
//!
//! From a guest's go to its next READY the host reads the CPU time of the
//! guest's QEMU process (and its daemon's) from `/proc/PID/stat`: summed
//! over the guests and divided by their fio I/O count, it is the host CPU
//! per I/O; the whole host's busy fraction over the job (`/proc/stat`) shows
//! whether anything else competed. The tables show per mode, job and guest
//! count the guests' aggregate IOPS and the CPU per I/O, and fio's
//! completion latency percentiles (p50, p99, p99.9, from its JSON output),
//! averaged over the rounds. The guests without a vIOMMU boot once per
//! round and guest count: invalidation mode means nothing to them, so their
//! figures stand in both modes' rows.

mod daemon;
mod fio;
mod group;
mod guestlog;
mod options;
mod procstat;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use qemu_tests::{initramfs_with, kernel_dir_for, poll_us, qemu_for, Arch, Viommu};

use crate::daemon::{build_daemon, daemon_args};
use crate::group::{run_group, Ctx};
use crate::options::{parse, Mode, Options};
use crate::procstat::loadavg;
use crate::report::{json, progress, table};

/// The configurations of one round, in the order they boot: for each mode
/// ours then QEMU's, then (once) none.
fn plan(opts: &Options) -> Vec<(Option<Mode>, Viommu)> {
    let mut plan = Vec::new();
    for &mode in &opts.modes {
        for viommu in [Viommu::Ours, Viommu::Qemu] {
            if opts.viommus.contains(&viommu) {
                plan.push((Some(mode), viommu));
            }
        }
    }
    if opts.viommus.contains(&Viommu::None) {
        plan.push((None, Viommu::None));
    }
    plan
}

fn main() -> ExitCode {
    // clap prints --help (and exits 0) or the error (and exits 2) before
    // anything starts.
    let opts = parse(std::env::args_os()).unwrap_or_else(|e| e.exit());
    let args: Vec<String> = std::env::args().skip(1).collect();
    fio::set_arch(opts.arch);
    let (target, debian) = (opts.arch.qemu_target(), opts.arch.debian());
    if qemu_for(opts.arch).is_none() {
        eprintln!(
            "guest-bench: the patched QEMU is not built: run scripts/qemu/build-qemu.sh \
             --target {target}"
        );
        return ExitCode::FAILURE;
    }
    if kernel_dir_for(opts.arch).is_none() {
        eprintln!(
            "guest-bench: no guest kernel: run scripts/guest/fetch-kernel.sh --arch {debian}"
        );
        return ExitCode::FAILURE;
    }
    let mut command = String::from("cargo run --release -p qemu-tests --bin guest-bench");
    if !args.is_empty() {
        command.push_str(" -- ");
        command.push_str(&args.join(" "));
    }
    let start = Instant::now();
    let load_start = loadavg();
    println!("== {command}");
    let daemon_args = daemon_args(std::env::var("VUI_DAEMON_ARGS").ok().as_deref(), poll_us());
    let daemon = if opts.viommus.contains(&Viommu::Ours) {
        let built = match std::env::var_os("VUI_DAEMON_BIN") {
            // Another build of the daemon (a worktree of another commit), to
            // compare two builds in one run.
            Some(bin) => Ok(PathBuf::from(bin)),
            None => {
                println!("== building the daemon (cargo build --release -p vhost-user-iommu)");
                build_daemon()
            }
        };
        match built {
            Ok(bin) => {
                println!("== daemon: {} {}", bin.display(), daemon_args.join(" "));
                Some((bin, daemon_args.clone()))
            }
            Err(e) => {
                eprintln!("guest-bench: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let (script, initrd_options) = fio::guest_script(opts.arch);
    println!("== building the initramfs for {script} ({debian})");
    let ctx = Ctx {
        seconds: opts.seconds,
        arch: opts.arch,
        initrd: initramfs_with(&format!("initrd-bench-{debian}.gz"), initrd_options),
        daemon,
        ours_qemu_args: std::env::var("VUI_QEMU_ARGS")
            .unwrap_or_default()
            .split_whitespace()
            .map(String::from)
            .collect(),
    };
    if !ctx.ours_qemu_args.is_empty() {
        println!(
            "== QEMU arguments for ours: {}",
            ctx.ours_qemu_args.join(" ")
        );
    }

    // Round-robin: every guest count and configuration once per round, in
    // the same order.
    let plan = plan(&opts);
    let mut groups = Vec::new();
    for round in 1..=opts.rounds {
        for &n in &opts.guests {
            for &(mode, viommu) in &plan {
                match run_group(&ctx, round, n, mode, viommu) {
                    Ok(g) => {
                        print!("{}", progress(&g));
                        groups.push(g);
                    }
                    Err(e) => {
                        eprintln!("guest-bench: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
        }
    }
    let took = start.elapsed();
    let load = [load_start, loadavg()];
    let (tool, machine) = match opts.arch {
        Arch::X86_64 => ("fio", "x86 q35"),
        Arch::Arm64 => ("busybox dd", "arm64 virt (GICv3, -cpu max)"),
    };
    println!(
        "== {tool} in each guest: {machine}, TCG, 1 vCPU, 1 GiB, virtio-blk (iommu_platform=on), \
         O_DIRECT; {} s per job, the guests' jobs started together; mean of {} round(s); none = \
         no vIOMMU (one boot per round, both modes)",
        opts.seconds, opts.rounds
    );
    println!(
        "== IOPS: sum over the guests; µs/IO: host CPU time of the guests' QEMU processes \
         (+ their daemons for ours) over their I/Os; busy%: the whole host, during the job; \
         clat µs: fio's completion latency percentiles, the mean over the guests (dd has none)",
    );
    println!(
        "== host load average {:.2} at the start, {:.2} at the end",
        load[0], load[1]
    );
    print!("{}", table(&opts, &groups));
    let boots: usize = groups.iter().map(|g| g.guests.len()).sum();
    println!(
        "== {boots} boots in {} group(s) in {:.0} s ({command})",
        groups.len(),
        took.as_secs_f64()
    );
    if let Some(path) = &opts.json {
        let text = json(&opts, &command, &daemon_args, &groups, took, load);
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("guest-bench: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("== figures written to {}", path.display());
    }
    ExitCode::SUCCESS
}
