// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Run the iommufd conformance suite against the model and, where
//! `/dev/iommu` exists, the kernel; print one line per case and whether the
//! two agree. Used inside the iommufd test guest.
//!
//! usage: iopt-conformance [--iommufd PATH] [--device /dev/vfio/devices/vfioN]
//! (`--help` for more)

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use iopt::conformance::{run_all, ModelFixture, Outcome};
use iopt::kernel::{KernelFixture, KernelIommufd};
use iopt::Thp;

/// Run the iommufd conformance suite against the model and, where the
/// iommufd device exists, the kernel; print one line per case and whether
/// the two agree.
///
/// The model is that of the running kernel: with or without transparent
/// huge pages as it was built. Without the iommufd device only the model
/// runs. Exit status: 0 if the model and the kernel agree on every case
/// (the model passes all, without a kernel), 1 if not, 2 for bad
/// arguments.
#[derive(Debug, Parser)]
#[command(name = "iopt-conformance", version)]
struct Cli {
    /// The kernel's iommufd device.
    #[arg(long, value_name = "PATH", default_value = KernelIommufd::DEFAULT_PATH)]
    iommufd: PathBuf,

    /// A VFIO cdev device (/dev/vfio/devices/vfioN) for the cases that
    /// attach a device to an IOAS; without it they are skipped.
    #[arg(long, value_name = "PATH")]
    device: Option<PathBuf>,
}

fn main() -> ExitCode {
    // --help and --version answer and exit here, bad arguments with status
    // 2: nothing has run yet.
    let Cli { iommufd, device } = Cli::parse();
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
    let fixture = KernelFixture { iommufd, device };
    if let Err(e) = fixture.check() {
        println!("conformance: kernel: cannot run: {e}");
        return ExitCode::FAILURE;
    }
    let kernel = run_all(&fixture);
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

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("iopt-conformance").chain(args.split_whitespace()))
    }

    #[test]
    fn the_paths_default_or_are_given_and_anything_else_is_refused() {
        Cli::command().debug_assert();
        let cli = parse("").unwrap();
        assert_eq!(cli.iommufd, PathBuf::from("/dev/iommu"));
        assert_eq!(cli.device, None);
        let cli = parse("--device /dev/vfio/devices/vfio0 --iommufd /tmp/x").unwrap();
        assert_eq!(cli.iommufd, PathBuf::from("/tmp/x"));
        assert_eq!(cli.device, Some("/dev/vfio/devices/vfio0".into()));
        let kind = |args: &str| parse(args).unwrap_err().kind();
        assert_eq!(kind("--help"), ErrorKind::DisplayHelp);
        assert_eq!(kind("--version"), ErrorKind::DisplayVersion);
        assert_eq!(kind("--device"), ErrorKind::InvalidValue);
        assert_eq!(kind("--bogus"), ErrorKind::UnknownArgument);
        assert_eq!(kind("/dev/iommu"), ErrorKind::UnknownArgument);
    }
}
