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

use vui_fuzz::{run, Budget, Options, TARGETS};

const USAGE: &str = "usage: vui-fuzz [--seconds S | --inputs N] [--seed N] [--target NAME]... [--replay INDEX] [--daemon PATH] [-v]

  --seconds S     total time, shared equally by the targets (default 60)
  --inputs N      N inputs per target instead of a time
  --seed N        the run's seed (default 1); input i of a target is a function of (seed, i)
  --target NAME   run only this target (repeatable): request chain ioas ram-bound vhost-user mirror control
  --replay INDEX  run only input INDEX (with --target), verbose
  --daemon PATH   the vhost-user-iommu binary (default: next to this one)
  -v              print every finding as it happens

Exit status: 0 if no target found a panic, hang or divergence, 1 otherwise.";

fn main() -> ExitCode {
    let mut seconds: u64 = 60;
    let mut inputs: Option<u64> = None;
    let mut seed: u64 = 1;
    let mut targets: Vec<String> = Vec::new();
    let mut replay: Option<u64> = None;
    let mut opts = Options {
        daemon: None,
        verbose: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |what: &str| -> Result<String, String> {
            args.next().ok_or_else(|| format!("{what} needs a value"))
        };
        let r: Result<(), String> = (|| {
            match a.as_str() {
                "--seconds" => {
                    seconds = value("--seconds")?
                        .parse()
                        .map_err(|e| format!("--seconds: {e}"))?
                }
                "--inputs" => {
                    inputs = Some(
                        value("--inputs")?
                            .parse()
                            .map_err(|e| format!("--inputs: {e}"))?,
                    )
                }
                "--seed" => {
                    seed = value("--seed")?
                        .parse()
                        .map_err(|e| format!("--seed: {e}"))?
                }
                "--target" => targets.push(value("--target")?),
                "--replay" => {
                    replay = Some(
                        value("--replay")?
                            .parse()
                            .map_err(|e| format!("--replay: {e}"))?,
                    )
                }
                "--daemon" => opts.daemon = Some(PathBuf::from(value("--daemon")?)),
                "-v" | "--verbose" => opts.verbose = true,
                "-h" | "--help" => return Err(String::new()),
                other => return Err(format!("unknown argument {other}")),
            }
            Ok(())
        })();
        if let Err(e) = r {
            if !e.is_empty() {
                eprintln!("{e}");
            }
            eprintln!("{USAGE}");
            return if e.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            };
        }
    }
    if targets.is_empty() {
        targets = TARGETS.iter().map(|s| s.to_string()).collect();
    }
    let (first, budget) = match (replay, inputs) {
        (Some(i), _) => {
            opts.verbose = true;
            (i, Budget::Inputs(1))
        }
        (None, Some(n)) => (0, Budget::Inputs(n)),
        (None, None) => (
            0,
            Budget::Time(Duration::from_secs(seconds) / targets.len() as u32),
        ),
    };
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
