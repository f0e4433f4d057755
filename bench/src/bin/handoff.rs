// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What one hand-off between two processes costs on this host, by where
//! they run: a request's round trip between a vCPU that sleeps on its kick
//! and the daemon's worker, stripped to its bones (two pipes, one byte each
//! way). docs/shared-host.md, "Kicks that wait", quotes its figures.
//!
//! `handoff [--round-trips N]` prints, per placement (both on one CPU, one
//! CPU each, left to the scheduler), the wall time and the parent's CPU
//! time per round trip. Needs two CPUs for the second placement.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Instant;

use clap::Parser;

/// Round trips between two processes through two pipes, by placement:
/// wall time and the parent's CPU time per round trip.
#[derive(Debug, Parser)]
#[command(name = "handoff")]
struct Cli {
    /// Round trips per placement
    #[arg(long, value_name = "N", default_value_t = 100_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    round_trips: u32,
    /// The other end (run by the measuring process itself), on CPU `CPU`
    /// if given
    #[arg(long, value_name = "CPU", hide = true, num_args = 0..=1)]
    child: Option<Option<usize>>,
}

/// Hold the calling process to `cpu`.
fn pin(cpu: usize) -> std::io::Result<()> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(std::io::Error::other("no such CPU"));
    }
    // SAFETY: `cpu` is below CPU_SETSIZE (checked just before).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: sched_setaffinity reads the live set of the size given.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// This process's CPU time, in microseconds.
fn cpu_us() -> f64 {
    // SAFETY: an all-zero rusage is valid; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes one rusage into `ru`.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 * 1e6 + tv.tv_usec as f64;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// The child: echo each byte, on `cpu` if given.
fn child(cpu: Option<usize>) -> std::io::Result<()> {
    if let Some(c) = cpu {
        pin(c)?;
    }
    let (mut i, mut o) = (std::io::stdin().lock(), std::io::stdout().lock());
    let mut b = [0u8; 1];
    while i.read(&mut b)? == 1 {
        o.write_all(&b)?;
        o.flush()?;
    }
    Ok(())
}

/// Round trips to a child, the parent on `mine` and the child on `its`.
fn measure(n: u32, mine: Option<usize>, its: Option<usize>) -> std::io::Result<(f64, f64)> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.arg("--child");
    if let Some(c) = its {
        cmd.arg(c.to_string());
    }
    let mut ch = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
    let (mut to, mut from) = (ch.stdin.take().unwrap(), ch.stdout.take().unwrap());
    if let Some(c) = mine {
        pin(c)?;
    }
    let mut b = [0u8; 1];
    // Warm up: both sides running and placed.
    for _ in 0..1000 {
        to.write_all(&b)?;
        from.read_exact(&mut b)?;
    }
    let (t0, c0) = (Instant::now(), cpu_us());
    for _ in 0..n {
        to.write_all(&b)?;
        from.read_exact(&mut b)?;
    }
    let (wall, cpu) = (t0.elapsed().as_secs_f64() * 1e6, cpu_us() - c0);
    drop(to);
    ch.wait()?;
    Ok((wall / f64::from(n), cpu / f64::from(n)))
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Some(cpu) = cli.child {
        return match child(cpu) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(_) => std::process::ExitCode::FAILURE,
        };
    }
    let n = cli.round_trips;
    println!("{n} round trips between two processes, one byte each way through two pipes");
    for (what, mine, its) in [
        ("both on CPU 0", Some(0), Some(0)),
        ("CPU 0 and CPU 1", Some(0), Some(1)),
        ("left to the scheduler", None, None),
    ] {
        // Each placement in a fresh parent thread: its pinning stays there.
        let r = std::thread::spawn(move || measure(n, mine, its)).join();
        match r {
            Ok(Ok((wall, cpu))) => {
                println!("{what:>22}: {wall:7.2} µs wall, {cpu:6.2} µs CPU (parent) per round trip")
            }
            Ok(Err(e)) => println!("{what:>22}: cannot measure: {e}"),
            Err(_) => println!("{what:>22}: the measuring thread panicked"),
        }
    }
    std::process::ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("handoff").chain(args.split_whitespace()))
    }

    #[test]
    fn round_trips_default_and_must_be_positive() {
        Cli::command().debug_assert();
        assert_eq!(parse("").unwrap().round_trips, 100_000);
        assert_eq!(parse("--round-trips 5").unwrap().round_trips, 5);
        for bad in ["--round-trips 0", "--round-trips x", "--round-trips", "x"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(parse("--help").unwrap_err().kind(), ErrorKind::DisplayHelp);
    }

    #[test]
    fn the_child_is_told_its_cpu_or_none() {
        assert_eq!(parse("").unwrap().child, None);
        assert_eq!(parse("--child").unwrap().child, Some(None));
        assert_eq!(parse("--child 1").unwrap().child, Some(Some(1)));
    }
}
