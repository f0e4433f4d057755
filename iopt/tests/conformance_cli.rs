// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The `iopt-conformance` binary's command line, run as the test guest runs
//! it: `--help` and `--version` answer without running a case, and bad
//! arguments are refused with status 2 before any case runs.

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_iopt-conformance");

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

/// Whether the suite ran: it prints `conformance: ...` lines.
fn ran(out: &Output) -> bool {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with("conformance:"))
}

#[test]
fn help_and_version_answer_without_running_the_suite() {
    let out = run(&["--help"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let help = String::from_utf8_lossy(&out.stdout);
    for word in [
        "Usage: iopt-conformance",
        "--iommufd",
        "--device",
        "/dev/iommu",
    ] {
        assert!(help.contains(word), "--help lacks {word}: {help}");
    }
    assert!(!ran(&out), "the suite ran: {out:?}");

    let out = run(&["--version"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(
        version.starts_with(&format!("iopt-conformance {}", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
}

#[test]
fn bad_arguments_are_refused_with_status_2_before_anything_runs() {
    for args in [
        &["--bogus"][..],
        &["--device"],
        &["--iommufd"],
        &["/dev/iommu"],
        &["--device", "/dev/vfio/devices/vfio0", "extra"],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.starts_with("error: ") && err.contains("try '--help'"),
            "{args:?}: not clap's error: {err}"
        );
        assert!(out.stdout.is_empty(), "{args:?}: the suite ran: {out:?}");
    }
}

#[test]
fn a_device_that_does_not_open_is_an_error_not_a_panic_in_every_case() {
    // /dev/null opens as the iommufd file (the cases' ioctls would fail on
    // it); the device is what is checked first, once.
    let out = run(&["--iommufd", "/dev/null", "--device", "/nonexistent/vfio0"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(
            "conformance: kernel: cannot run: cannot open VFIO device /nonexistent/vfio0"
        ),
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}
