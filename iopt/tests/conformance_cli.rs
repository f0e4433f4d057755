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

/// Whether the kernel cases ran (a line per case names the kernel's
/// outcome).
fn kernel_cases_ran(out: &Output) -> bool {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.contains(" kernel passed") || l.contains(" kernel FAILED"))
}

#[test]
fn a_file_that_is_not_an_iommufd_is_one_error_not_a_failure_in_every_case() {
    // /dev/null opens, but answers no iommufd ioctl.
    for args in [
        &["--iommufd", "/dev/null"][..],
        &["--iommufd", "/dev/null", "--device", "/nonexistent/vfio0"],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(
                "conformance: kernel: cannot run: /dev/null does not answer as an iommufd"
            ),
            "{args:?}: {stdout}"
        );
        assert!(!kernel_cases_ran(&out), "{args:?}: {stdout}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
