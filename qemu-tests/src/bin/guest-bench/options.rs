// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The command line: `USAGE`, the options, and the configurations and
//! invalidation modes they name.

use std::path::PathBuf;

use qemu_tests::{Arch, Viommu};

pub const USAGE: &str = "\
usage: guest-bench [--seconds S] [--rounds N] [--quick] [--guests LIST]
                   [--viommu LIST] [--arch x86_64|arm64] [--json FILE] [--help]

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
ours), with the ratios ours/QEMU.

  --seconds S   seconds per fio job (default 5)
  --rounds N    boot every configuration N times, round-robin, and average
                (default 1)
  --quick       1 s per job, strict mode only (a smoke run: about 1 min)
  --guests LIST guest counts to run at once, comma-separated, each 1..=8
                (default 1; e.g. 1,2,3)
  --viommu LIST boot only these, comma-separated: ours, qemu, none
                (default all three; to compare two builds of ours, run
                each build's guest-bench with --viommu ours, alternately)
  --arch A      x86_64 (default: q35, fio) or arm64: the `virt` machine
                (GICv3, -cpu max, TCG; qemu-system-aarch64 of
                scripts/qemu/build-qemu.sh --target aarch64, the kernel of
                scripts/guest/fetch-kernel.sh --arch arm64), whose busybox
                initramfs has no fio: busybox dd reads the disk instead
                (qemu-tests/guest/ddbench.sh: seq4k-qd1, seq128k-qd1, O_DIRECT)
  --json FILE   also write the figures, per round and averaged, to FILE

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

/// `--guests LIST`: comma-separated guest counts, each 1..=[`MAX_GUESTS`];
/// ascending, each once.
fn parse_guests(list: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for item in list.split(',') {
        let n = item
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_GUESTS).contains(n))
            .ok_or_else(|| {
                format!("--guests {list}: {item:?} is not a guest count 1..={MAX_GUESTS}")
            })?;
        out.push(n);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

pub fn parse(args: &[String]) -> Result<Option<Options>, String> {
    let (mut seconds, mut rounds, mut quick, mut json) = (None, 1, false, None);
    let mut viommus = VIOMMUS.to_vec();
    let mut guests = vec![1];
    let mut arch = Arch::X86_64;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |what: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{a} needs {what}"))
        };
        match a.as_str() {
            "--help" | "-h" => return Ok(None),
            "--seconds" => {
                let v = value("a number of seconds")?;
                seconds = Some(
                    v.parse::<u64>()
                        .ok()
                        .filter(|s| (1..=600).contains(s))
                        .ok_or_else(|| format!("--seconds {v}: want 1..=600"))?,
                );
            }
            "--rounds" => {
                let v = value("a number")?;
                rounds = v
                    .parse::<u32>()
                    .ok()
                    .filter(|r| (1..=100).contains(r))
                    .ok_or_else(|| format!("--rounds {v}: want 1..=100"))?;
            }
            "--quick" => quick = true,
            "--guests" => guests = parse_guests(&value("a list of guest counts")?)?,
            "--viommu" => {
                let v = value("a list of ours, qemu, none")?;
                let mut chosen = Vec::new();
                for name in v.split(',') {
                    let viommu = viommu_by_name(name).ok_or_else(|| {
                        format!("--viommu {v}: {name:?} is not ours, qemu or none")
                    })?;
                    if !chosen.contains(&viommu) {
                        chosen.push(viommu);
                    }
                }
                // Booted in the table's order, whatever the order asked.
                viommus = VIOMMUS.into_iter().filter(|v| chosen.contains(v)).collect();
            }
            "--json" => json = Some(PathBuf::from(value("a file")?)),
            "--arch" => {
                arch = match value("x86_64 or arm64")?.as_str() {
                    "x86_64" | "amd64" => Arch::X86_64,
                    "arm64" | "aarch64" => Arch::Arm64,
                    other => return Err(format!("--arch {other}: want x86_64 or arm64")),
                }
            }
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    Ok(Some(Options {
        seconds: seconds.unwrap_or(if quick { 1 } else { 5 }),
        rounds,
        modes: if quick {
            vec![Mode::Strict]
        } else {
            vec![Mode::Strict, Mode::Lazy]
        },
        viommus,
        guests,
        arch,
        json,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn quick_is_one_second_strict_only() {
        let o = parse(&args("--quick")).unwrap().unwrap();
        assert_eq!((o.seconds, o.rounds), (1, 1));
        assert_eq!(o.modes, [Mode::Strict]);
        let o = parse(&args("--quick --seconds 3")).unwrap().unwrap();
        assert_eq!(o.seconds, 3);
    }

    #[test]
    fn defaults_are_five_seconds_both_modes() {
        let o = parse(&[]).unwrap().unwrap();
        assert_eq!((o.seconds, o.rounds), (5, 1));
        assert_eq!(o.modes, [Mode::Strict, Mode::Lazy]);
        assert_eq!(o.guests, [1]);
        assert!(parse(&args("--rounds 0")).is_err());
        assert!(parse(&args("--json")).is_err());
        assert!(parse(&args("--help")).unwrap().is_none());
    }

    #[test]
    fn arch_is_x86_by_default_and_arm64_on_request() {
        assert_eq!(parse(&[]).unwrap().unwrap().arch, Arch::X86_64);
        let o = parse(&args("--arch arm64 --quick")).unwrap().unwrap();
        assert_eq!((o.arch, o.seconds), (Arch::Arm64, 1));
        assert_eq!(
            parse(&args("--arch aarch64")).unwrap().unwrap().arch,
            Arch::Arm64
        );
        assert!(parse(&args("--arch riscv64")).is_err());
        assert!(parse(&args("--arch")).is_err());
    }

    #[test]
    fn viommu_list_picks_configurations_in_table_order() {
        assert_eq!(parse(&[]).unwrap().unwrap().viommus, VIOMMUS);
        let o = parse(&args("--viommu none,ours,ours")).unwrap().unwrap();
        assert_eq!(o.viommus, [Viommu::Ours, Viommu::None]);
        assert!(parse(&args("--viommu intel")).is_err());
        assert!(parse(&args("--viommu ours,")).is_err());
        assert!(parse(&args("--viommu")).is_err());
    }

    #[test]
    fn guest_counts_are_sorted_once_each_and_bounded() {
        assert_eq!(parse_guests("1,2,3").unwrap(), [1, 2, 3]);
        assert_eq!(parse_guests("3,1,3").unwrap(), [1, 3]);
        assert_eq!(parse_guests(" 2").unwrap(), [2]);
        assert_eq!(parse_guests("8").unwrap(), [8]);
        for bad in ["", "0", "9", "1,", ",1", "-1", "two", "1;2", "1.5"] {
            let e = parse_guests(bad).unwrap_err();
            assert!(e.contains("--guests"), "{bad:?}: {e}");
        }
        let o = parse(&args("--guests 2,1")).unwrap().unwrap();
        assert_eq!(o.guests, [1, 2]);
        assert!(parse(&args("--guests")).is_err());
        assert!(parse(&args("--guests 0")).is_err());
    }
}
