// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The command line (clap): the options, and the configurations and
//! invalidation modes they name.

use std::path::PathBuf;

use clap::Parser;
use qemu_tests::{Arch, Viommu};

/// What `--help` says after the options: the jobs, the environment and
/// what the run needs.
const AFTER_HELP: &str = "\
Boots TCG guests (Debian 6.12, 1 vCPU, 1 GiB each) behind our
vhost-user-iommu daemon, behind QEMU's virtio-iommu-pci and with no vIOMMU,
and runs fio in them on a virtio-blk disk (iommu_platform=on, O_DIRECT):
  rand4k-qd1   4 KiB random reads, psync (QD1)
  rand4k-qd32  4 KiB random reads, libaio iodepth=32
  seq128k-qd1  128 KiB sequential reads, psync (QD1)
in strict (iommu.strict=1) and lazy (iommu.strict=0) mode. For each guest
count n of --guests, n guests of a configuration boot at once (each with its
own disk and, for ours, its own daemon process) and start each fio job at
the same moment. Prints per mode, job and n the guests' aggregate IOPS and
the host CPU time per I/O (their QEMU processes, plus their daemons for
ours), with the ratios ours/QEMU; fio's completion latency percentiles
(p50, p99, p99.9: fio's clat_ns.percentile, the mean over the guests), and
the context switches of the guests' QEMU and daemon threads per I/O.

Environment: VUI_DAEMON_BIN=PATH runs that daemon binary instead of building
the working tree's; VUI_POLL_US=N sets the daemons' --poll-us; VUI_DAEMON_ARGS
adds arguments to every daemon (whitespace-separated; a --poll-us there
wins), to compare daemon options; VUI_QEMU_ARGS adds arguments to the QEMU
of every guest of ours (e.g. -global vhost-user-iommu-device.kick-wait=off).

Needs the patched QEMU (scripts/qemu/build-qemu.sh) and the guest kernel
(scripts/guest/fetch-kernel.sh); fio comes from Debian's package
(scripts/guest/fetch-fio.sh, run by the initramfs build); the daemon is
built (cargo build --release -p vhost-user-iommu) at the start when ours
is booted. Exits non-zero if a guest fails or reports a disk domain other
than the mode asks for.";

/// The guest benchmark: fio in TCG guests behind our vIOMMU, QEMU's and
/// none.
#[derive(Debug, Parser)]
#[command(name = "guest-bench", after_help = AFTER_HELP)]
pub struct Cli {
    /// Seconds per fio job, 1..=600 (default 5; 1 with --quick)
    #[arg(long, value_name = "S", value_parser = clap::value_parser!(u64).range(1..=600))]
    seconds: Option<u64>,
    /// Boot every configuration N times, round-robin, and average
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    /// 1 s per job, strict mode only (a smoke run: about 1 min)
    #[arg(long)]
    quick: bool,
    /// Guest counts to run at once, comma-separated, each 1..=8 (e.g. 1,2,3)
    #[arg(long, value_name = "LIST", default_value = "1", value_parser = parse_guests)]
    guests: GuestCounts,
    /// Boot only these, comma-separated: ours, qemu, none (default all
    /// three); to compare two builds of ours, run each build's guest-bench
    /// with --viommu ours, alternately
    #[arg(long, value_name = "LIST", value_parser = parse_viommus)]
    viommu: Option<Viommus>,
    /// x86_64 (q35, fio) or arm64: the `virt` machine (GICv3, -cpu max,
    /// TCG; qemu-system-aarch64 of scripts/qemu/build-qemu.sh --target
    /// aarch64, the kernel of scripts/guest/fetch-kernel.sh --arch arm64),
    /// whose busybox initramfs has no fio: busybox dd reads the disk
    /// instead (qemu-tests/guest/ddbench.sh: seq4k-qd1, seq128k-qd1,
    /// O_DIRECT)
    #[arg(long, value_name = "ARCH", default_value = "x86_64", value_parser = parse_arch)]
    arch: Arch,
    /// Also write the figures, per round and averaged, to FILE (JSON)
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// A value of an option that does not parse.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    #[error("{0:?} is not a guest count 1..={MAX_GUESTS}")]
    GuestCount(String),
    #[error("{0:?} is not ours, qemu or none")]
    Viommu(String),
    #[error("{0:?} is neither x86_64 nor arm64")]
    Arch(String),
}

/// `--guests`: ascending, each once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestCounts(Vec<usize>);

/// `--viommu`: in the table's order, each once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Viommus(Vec<Viommu>);

pub const VIOMMUS: [Viommu; 3] = [Viommu::Ours, Viommu::Qemu, Viommu::None];
/// The most guests booted at once (1 GiB of RAM each).
const MAX_GUESTS: usize = 8;

/// The command line.
#[derive(Debug)]
pub struct Options {
    pub seconds: u64,
    pub rounds: u32,
    pub modes: Vec<Mode>,
    pub viommus: Vec<Viommu>,
    /// Guest counts, ascending, each once.
    pub guests: Vec<usize>,
    pub arch: Arch,
    pub json: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Strict,
    Lazy,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Strict => "strict",
            Mode::Lazy => "lazy",
        }
    }

    pub fn cmdline(self) -> &'static str {
        match self {
            Mode::Strict => "iommu.strict=1",
            Mode::Lazy => "iommu.strict=0",
        }
    }

    /// The disk's IOMMU domain type the guest must report in this mode.
    pub fn domain(self, viommu: Viommu) -> &'static str {
        match (viommu, self) {
            (Viommu::None, _) => "none",
            (_, Mode::Strict) => "DMA",
            (_, Mode::Lazy) => "DMA-FQ",
        }
    }
}

pub fn viommu_name(v: Viommu) -> &'static str {
    match v {
        Viommu::Ours => "ours",
        Viommu::Qemu => "qemu",
        Viommu::Intel => "intel",
        Viommu::None => "none",
    }
}

fn viommu_by_name(name: &str) -> Option<Viommu> {
    VIOMMUS.into_iter().find(|&v| viommu_name(v) == name)
}

/// `--guests LIST`: comma-separated guest counts, each 1..=[`MAX_GUESTS`].
fn parse_guests(list: &str) -> Result<GuestCounts, OptionError> {
    let mut out = Vec::new();
    for item in list.split(',') {
        let n = item
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_GUESTS).contains(n))
            .ok_or_else(|| OptionError::GuestCount(item.to_string()))?;
        out.push(n);
    }
    out.sort_unstable();
    out.dedup();
    Ok(GuestCounts(out))
}

/// `--viommu LIST`: comma-separated names of [`VIOMMUS`].
fn parse_viommus(list: &str) -> Result<Viommus, OptionError> {
    let mut chosen = Vec::new();
    for name in list.split(',') {
        chosen.push(viommu_by_name(name).ok_or_else(|| OptionError::Viommu(name.to_string()))?);
    }
    // Booted in the table's order, whatever the order asked.
    Ok(Viommus(
        VIOMMUS.into_iter().filter(|v| chosen.contains(v)).collect(),
    ))
}

/// `--arch`: Debian's name or QEMU's.
fn parse_arch(name: &str) -> Result<Arch, OptionError> {
    match name {
        "x86_64" | "amd64" => Ok(Arch::X86_64),
        "arm64" | "aarch64" => Ok(Arch::Arm64),
        other => Err(OptionError::Arch(other.to_string())),
    }
}

impl From<Cli> for Options {
    fn from(cli: Cli) -> Self {
        Options {
            seconds: cli.seconds.unwrap_or(if cli.quick { 1 } else { 5 }),
            rounds: cli.rounds,
            modes: if cli.quick {
                vec![Mode::Strict]
            } else {
                vec![Mode::Strict, Mode::Lazy]
            },
            viommus: cli.viommu.map_or(VIOMMUS.to_vec(), |v| v.0),
            guests: cli.guests.0,
            arch: cli.arch,
            json: cli.json,
        }
    }
}

/// The options of `args` (the program's name first), or clap's error
/// (which, for `--help`, is the help text).
pub fn parse<I, T>(args: I) -> Result<Options, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    Cli::try_parse_from(args).map(Options::from)
}

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;
    use clap::CommandFactory;

    use super::*;

    fn args(s: &str) -> Result<Options, clap::Error> {
        parse(std::iter::once("guest-bench").chain(s.split_whitespace()))
    }

    fn kind(s: &str) -> ErrorKind {
        args(s).unwrap_err().kind()
    }

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn help_and_version_requests_start_nothing() {
        assert_eq!(kind("--help"), ErrorKind::DisplayHelp);
        assert_eq!(kind("-h"), ErrorKind::DisplayHelp);
        assert_eq!(kind("--quick --help"), ErrorKind::DisplayHelp);
        let help = Cli::command().render_long_help().to_string();
        for flag in [
            "--seconds",
            "--rounds",
            "--quick",
            "--guests",
            "--viommu",
            "--arch",
            "--json",
        ] {
            assert!(help.contains(flag), "{flag} in the help");
        }
        for var in [
            "VUI_DAEMON_BIN",
            "VUI_POLL_US",
            "VUI_DAEMON_ARGS",
            "VUI_QEMU_ARGS",
        ] {
            assert!(help.contains(var), "{var} in the help");
        }
    }

    #[test]
    fn quick_is_one_second_strict_only() {
        let o = args("--quick").unwrap();
        assert_eq!((o.seconds, o.rounds), (1, 1));
        assert_eq!(o.modes, [Mode::Strict]);
        assert_eq!(args("--quick --seconds 3").unwrap().seconds, 3);
        assert_eq!(args("--seconds=3 --quick").unwrap().seconds, 3);
    }

    #[test]
    fn defaults_are_five_seconds_both_modes() {
        let o = args("").unwrap();
        assert_eq!((o.seconds, o.rounds), (5, 1));
        assert_eq!(o.modes, [Mode::Strict, Mode::Lazy]);
        assert_eq!(o.guests, [1]);
        assert_eq!(o.json, None);
        assert_eq!(
            args("--json out.json").unwrap().json,
            Some(PathBuf::from("out.json"))
        );
    }

    #[test]
    fn numbers_out_of_range_or_missing_are_refused() {
        for bad in [
            "--rounds 0",
            "--rounds 101",
            "--rounds x",
            "--seconds 0",
            "--seconds 601",
        ] {
            assert_eq!(kind(bad), ErrorKind::ValueValidation, "{bad}");
        }
        assert_eq!(args("--rounds 100").unwrap().rounds, 100);
        assert_eq!(args("--seconds 600").unwrap().seconds, 600);
        for missing in [
            "--json",
            "--rounds",
            "--seconds",
            "--guests",
            "--viommu",
            "--arch",
        ] {
            assert!(args(missing).is_err(), "{missing}");
        }
        assert_eq!(kind("--frobnicate"), ErrorKind::UnknownArgument);
        assert_eq!(kind("extra"), ErrorKind::UnknownArgument);
    }

    #[test]
    fn arch_is_x86_by_default_and_arm64_on_request() {
        assert_eq!(args("").unwrap().arch, Arch::X86_64);
        let o = args("--arch arm64 --quick").unwrap();
        assert_eq!((o.arch, o.seconds), (Arch::Arm64, 1));
        assert_eq!(args("--arch aarch64").unwrap().arch, Arch::Arm64);
        assert_eq!(args("--arch amd64").unwrap().arch, Arch::X86_64);
        assert_eq!(kind("--arch riscv64"), ErrorKind::ValueValidation);
        assert_eq!(
            parse_arch("riscv64"),
            Err(OptionError::Arch("riscv64".into()))
        );
    }

    #[test]
    fn viommu_list_picks_configurations_in_table_order() {
        assert_eq!(args("").unwrap().viommus, VIOMMUS);
        let o = args("--viommu none,ours,ours").unwrap();
        assert_eq!(o.viommus, [Viommu::Ours, Viommu::None]);
        for bad in ["intel", "ours,", ""] {
            assert!(parse_viommus(bad).is_err(), "{bad:?}");
        }
        assert_eq!(kind("--viommu intel"), ErrorKind::ValueValidation);
        let e = args("--viommu ours,intel").unwrap_err().to_string();
        assert!(e.contains("\"intel\" is not ours, qemu or none"), "{e}");
    }

    #[test]
    fn guest_counts_are_sorted_once_each_and_bounded() {
        let counts = |s: &str| parse_guests(s).map(|g| g.0);
        assert_eq!(counts("1,2,3").unwrap(), [1, 2, 3]);
        assert_eq!(counts("3,1,3").unwrap(), [1, 3]);
        assert_eq!(counts(" 2").unwrap(), [2]);
        assert_eq!(counts("8").unwrap(), [8]);
        for bad in ["", "0", "9", "1,", ",1", "-1", "two", "1;2", "1.5"] {
            assert!(
                matches!(counts(bad), Err(OptionError::GuestCount(_))),
                "{bad:?}"
            );
        }
        assert_eq!(args("--guests 2,1").unwrap().guests, [1, 2]);
        assert_eq!(args("--guests=3").unwrap().guests, [3]);
        assert_eq!(kind("--guests 0"), ErrorKind::ValueValidation);
    }
}
