// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vui-fuzz`: run the fuzz targets for a time or a number of inputs and
//! print, per target, the inputs tried, panics, hangs and divergences.
//!
//! ```text
//! cargo build --release -p vhost-user-iommu -p vui-fuzz
//! target/release/vui-fuzz --seconds 600 --seed 1
//! target/release/vui-fuzz --target ioas --seed 1 --replay 4711 -v
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use vui_fuzz::{run, Budget, Options, TARGETS};

/// Run the fuzz targets for a time or a number of inputs: input i of a
/// target is a function of (seed, i), so any finding replays alone.
///
/// Exit status: 0 if no target found a panic, hang or divergence, 1
/// otherwise.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Total time in seconds, shared equally by the targets.
    #[arg(
        long,
        value_name = "S",
        default_value_t = 60,
        conflicts_with = "inputs"
    )]
    seconds: u64,

    /// N inputs per target instead of a time.
    #[arg(long, value_name = "N")]
    inputs: Option<u64>,

    /// The run's seed.
    #[arg(long, value_name = "N", default_value_t = 1)]
    seed: u64,

    /// Run only this target (repeatable) [default: all].
    #[arg(long = "target", value_name = "NAME", value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    targets: Vec<String>,

    /// Run only input INDEX (with --target), verbose.
    #[arg(long, value_name = "INDEX")]
    replay: Option<u64>,

    /// The vhost-user-iommu binary [default: next to this one].
    #[arg(long, value_name = "PATH")]
    daemon: Option<PathBuf>,

    /// Print every finding as it happens.
    #[arg(short, long)]
    verbose: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut opts = Options {
        daemon: cli.daemon,
        verbose: cli.verbose,
    };
    let targets: Vec<String> = if cli.targets.is_empty() {
        TARGETS.iter().map(|s| s.to_string()).collect()
    } else {
        cli.targets
    };
    let (first, budget) = match (cli.replay, cli.inputs) {
        (Some(i), _) => {
            opts.verbose = true;
            (i, Budget::Inputs(1))
        }
        (None, Some(n)) => (0, Budget::Inputs(n)),
        (None, None) => (
            0,
            Budget::Time(Duration::from_secs(cli.seconds) / targets.len() as u32),
        ),
    };
    let seed = cli.seed;
    println!("vui-fuzz: seed {seed}, {budget:?} per target");
    let mut clean = true;
    for t in &targets {
        let report = run(t, seed, first, budget, &opts);
        println!("{report}");
        clean &= report.clean();
    }
    println!(
        "{}",
        if clean {
            "no panics, hangs or divergences"
        } else {
            "FINDINGS above; replay one with --target NAME --seed N --replay INDEX"
        }
    );
    if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
