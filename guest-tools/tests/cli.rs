// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The guest programs' command lines, run as the guest scripts run them:
//! `--help` and `--version` answer without touching a device (no `EDU:`,
//! `VUI-CHECK` or `passthrough:` line, which each prints once it starts),
//! and bad arguments are refused with clap's error and status 2 before
//! anything runs.

use std::process::{Command, Output};

const EDU_DMA: &str = env!("CARGO_BIN_EXE_edu-dma");
const PASSTHROUGH: &str = env!("CARGO_BIN_EXE_passthrough");

fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(bin).args(args).output().unwrap()
}

/// Whether the program started its work: the first lines each prints then.
fn started(out: &Output) -> bool {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&out.stderr).lines())
        .any(|l| {
            ["EDU:", "VUI-CHECK", "VUI-LOG", "passthrough:"]
                .iter()
                .any(|p| l.starts_with(p))
        })
}

fn answers(bin: &str, name: &str, args: &[&str], words: &[&str]) {
    let out = run(bin, args);
    assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
    assert!(!started(&out), "{args:?} started the work: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    for w in words {
        assert!(text.contains(w), "{name} {args:?} lacks {w:?}: {text}");
    }
    let out = run(bin, &["--version"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{name} {}\n", env!("CARGO_PKG_VERSION"))
    );
}

fn refuses(bin: &str, args: &[&str]) {
    let out = run(bin, args);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
    assert!(!started(&out) && out.stdout.is_empty(), "{args:?}: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: ") && err.contains("try '--help'"),
        "{args:?}: not clap's error: {err}"
    );
}

#[test]
fn edu_dma_help_answers_without_touching_a_device() {
    let words = [
        "Usage: edu-dma [BDF]",
        "suite",
        "rates",
        "hold",
        "identity",
        "detached",
        "Exit status",
    ];
    answers(EDU_DMA, "edu-dma", &["--help"], &words);
    answers(EDU_DMA, "edu-dma", &["-h"], &["Usage: edu-dma [BDF]"]);
    answers(
        EDU_DMA,
        "edu-dma",
        &["suite", "--help"],
        &["Usage: edu-dma suite <BDF1> <BDF2>"],
    );
    answers(
        EDU_DMA,
        "edu-dma",
        &["detached", "--help"],
        &["Usage: edu-dma detached <BAR0>"],
    );
}

#[test]
fn edu_dma_refuses_bad_arguments_with_status_2() {
    for args in [
        &["--bogus"][..],
        &["0000:00:04.0", "0000:00:05.0"],
        &["00:04.0"],
        &["suite", "0000:00:04.0"],
        &["rates"],
        &["hold", "0000:00:04.0", "extra"],
        &["identity", "not-a-bdf"],
        &["detached", "0xfea00010"],
        &["detached", "nothex"],
    ] {
        refuses(EDU_DMA, args);
    }
}

#[test]
fn passthrough_help_answers_without_starting_the_daemon() {
    answers(
        PASSTHROUGH,
        "passthrough",
        &["--help"],
        &[
            "Usage: passthrough [VFIO_CDEV_A] [VFIO_CDEV_B]",
            "Exit status",
        ],
    );
}

#[test]
fn passthrough_refuses_bad_arguments_with_status_2() {
    for args in [
        &["--bogus"][..],
        &["/dev/vfio/devices/vfio0"],
        &["/dev/a", "/dev/b", "/dev/c"],
    ] {
        refuses(PASSTHROUGH, args);
    }
}
