// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Run the iommufd conformance suite against the model and, where
//! `/dev/iommu` exists, the kernel; print one line per case and whether the
//! two agree. Used inside the iommufd test guest.
//!
//! usage: iopt-conformance [--iommufd PATH] [--device /dev/vfio/devices/vfioN]

use std::path::PathBuf;
use std::process::ExitCode;

use iopt::conformance::{run_all, ModelFixture, Outcome};
use iopt::kernel::KernelFixture;
use iopt::Thp;

fn main() -> ExitCode {
    let mut iommufd = PathBuf::from("/dev/iommu");
    let mut device = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--iommufd", Some(p)) => iommufd = p.into(),
            ("--device", Some(p)) => device = Some(PathBuf::from(p)),
            _ => {
                eprintln!("usage: iopt-conformance [--iommufd PATH] [--device PATH]");
                return ExitCode::from(2);
            }
        }
    }
    // The model of the kernel this runs on: with or without transparent
    // huge pages as that kernel was built.
    let thp = Thp::of_host();
    println!(
        "conformance: model: {thp:?} transparent huge pages (from {})",
        Thp::SYSFS
    );
    let model = run_all(&ModelFixture { thp });
    if !iommufd.exists() {
        println!(
            "conformance: kernel: skipped: {} does not exist",
            iommufd.display()
        );
        let (p, s, f) = model.counts();
        println!("conformance: model: {p} passed, {s} skipped, {f} failed");
        return if f == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let kernel = run_all(&KernelFixture { iommufd, device });
    let mut disagree = 0;
    for ((name, m), (_, k)) in model.outcomes.iter().zip(&kernel.outcomes) {
        let agree = !matches!((m, k), (Outcome::Failed(_), _) | (_, Outcome::Failed(_)));
        if !agree {
            disagree += 1;
        }
        println!(
            "conformance: {:<60} model {:<8} kernel {}",
            name,
            short(m),
            match k {
                Outcome::Failed(why) => format!("FAILED: {why}"),
                other => short(other).to_string(),
            }
        );
    }
    let (kp, ks, kf) = kernel.counts();
    println!(
        "conformance: kernel: {kp} passed, {ks} skipped, {kf} failed; {disagree} disagreements"
    );
    if disagree == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn short(o: &Outcome) -> &'static str {
    match o {
        Outcome::Passed => "passed",
        Outcome::Skipped(_) => "skipped",
        Outcome::Failed(_) => "FAILED",
    }
}
