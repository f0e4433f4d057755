//! The guest benchmark: the same guest booted three ways in one run — behind
//! our vhost-user-iommu daemon, behind QEMU's in-process virtio-iommu-pci,
//! and with no vIOMMU — running fio on a virtio-blk disk behind the vIOMMU
//! (`iommu_platform=on`), in strict and lazy invalidation mode.
//!
//! `cargo run --release -p qemu-tests --bin guest-bench -- [--rounds N] [--quick]`
//!
//! Each boot runs every fio job of `qemu-tests/guest/fio.sh` once; the
//! configurations are booted round-robin, `--rounds` times, and the table
//! shows the mean of the rounds. The guest without a vIOMMU is booted once
//! per round: invalidation mode means nothing to it, so its figures stand in
//! both modes' rows.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use qemu_tests::{
    disk_image, initramfs_with, kernel_dir, qemu, scratch, Daemon, Guest, Run, Viommu,
};

const USAGE: &str = "\
usage: guest-bench [--seconds S] [--rounds N] [--quick] [--viommu LIST] [--json FILE] [--help]

Boots a TCG guest (Debian 6.12, 1 vCPU, 1 GiB) behind our vhost-user-iommu
daemon, behind QEMU's virtio-iommu-pci and with no vIOMMU, and runs fio in
it on a virtio-blk disk (iommu_platform=on, O_DIRECT):
  rand4k-qd1   4 KiB random reads, psync (QD1)
  rand4k-qd32  4 KiB random reads, libaio iodepth=32
  seq128k-qd1  128 KiB sequential reads, psync (QD1)
in strict (iommu.strict=1) and lazy (iommu.strict=0) mode. Prints IOPS,
MB/s and the ratios ours/QEMU and ours/none per row.

  --seconds S   seconds per fio job (default 5)
  --rounds N    boot every configuration N times, round-robin, and average
                (default 1)
  --quick       1 s per job, strict mode only (a smoke run: about 1 min)
  --viommu LIST boot only these, comma-separated: ours, qemu, none
                (default all three; to compare two builds of ours, run
                each build's guest-bench with --viommu ours, alternately)
  --json FILE   also write the figures, per round and averaged, to FILE

Needs the patched QEMU (scripts/qemu/build-qemu.sh) and the guest kernel
(scripts/guest/fetch-kernel.sh); fio comes from Debian's package
(scripts/guest/fetch-fio.sh, run by the initramfs build). Exits non-zero if
a guest fails or reports a disk domain other than the mode asks for.";

const JOBS: [&str; 3] = ["rand4k-qd1", "rand4k-qd32", "seq128k-qd1"];
const VIOMMUS: [Viommu; 3] = [Viommu::Ours, Viommu::Qemu, Viommu::None];
/// The disk: sparse, so the host's reads cost no device I/O and the
/// guest-side DMA path (the vIOMMU) is what differs between columns.
const DISK_MIB: u64 = 1024;

#[derive(Debug)]
struct Options {
    seconds: u64,
    rounds: u32,
    modes: Vec<Mode>,
    viommus: Vec<Viommu>,
    json: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Strict,
    Lazy,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Strict => "strict",
            Mode::Lazy => "lazy",
        }
    }

    fn cmdline(self) -> &'static str {
        match self {
            Mode::Strict => "iommu.strict=1",
            Mode::Lazy => "iommu.strict=0",
        }
    }

    /// The disk's IOMMU domain type the guest must report in this mode.
    fn domain(self, viommu: Viommu) -> &'static str {
        match (viommu, self) {
            (Viommu::None, _) => "none",
            (_, Mode::Strict) => "DMA",
            (_, Mode::Lazy) => "DMA-FQ",
        }
    }
}

fn viommu_name(v: Viommu) -> &'static str {
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

fn parse(args: &[String]) -> Result<Option<Options>, String> {
    let (mut seconds, mut rounds, mut quick, mut json) = (None, 1, false, None);
    let mut viommus = VIOMMUS.to_vec();
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
        json,
    }))
}

/// One fio job's result in one boot.
#[derive(Clone, Copy, Debug)]
struct Sample {
    iops: f64,
    kibps: f64,
    lat_us: f64,
}

impl Sample {
    fn mb_s(&self) -> f64 {
        self.kibps * 1024.0 / 1e6
    }

    /// The mean; NaN for no samples (a configuration not booted).
    fn mean(samples: &[Sample]) -> Sample {
        let n = samples.len() as f64;
        let sum = |f: fn(&Sample) -> f64| samples.iter().map(f).sum::<f64>() / n;
        Sample {
            iops: sum(|s| s.iops),
            kibps: sum(|s| s.kibps),
            lat_us: sum(|s| s.lat_us),
        }
    }
}

/// One guest boot.
#[derive(Debug)]
struct Boot {
    round: u32,
    /// `None` for the guest without a vIOMMU (it serves both modes).
    mode: Option<Mode>,
    viommu: Viommu,
    took: Duration,
    /// (job, result), in the order the guest ran them.
    results: Vec<(String, Sample)>,
    /// The daemon's MAP and UNMAP counts (ours only).
    daemon: Option<(u64, u64)>,
}

/// `VUI-FIO job=NAME iops=N kibps=N lat_us=N ios=N` lines.
fn parse_fio(run: &Run) -> Result<Vec<(String, Sample)>, String> {
    let mut out = Vec::new();
    for line in run.lines("VUI-FIO ") {
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
                .ok_or_else(|| format!("no {key} in {line:?}"))
        };
        let num = |key: &str| -> Result<f64, String> {
            let v = field(key)?;
            v.parse().map_err(|_| format!("{key}={v} is not a number"))
        };
        out.push((
            field("job")?.to_string(),
            Sample {
                iops: num("iops")?,
                kibps: num("kibps")?,
                lat_us: num("lat_us")?,
            },
        ));
    }
    Ok(out)
}

fn boot(
    opts: &Options,
    disk: &std::path::Path,
    initrd: &std::path::Path,
    round: u32,
    mode: Option<Mode>,
    viommu: Viommu,
) -> Result<Boot, String> {
    let what = format!(
        "round {round} {} {}",
        mode.map_or("any", Mode::name),
        viommu_name(viommu)
    );
    let dir = scratch(&format!("guest-bench-{}", viommu_name(viommu)));
    let daemon = (viommu == Viommu::Ours).then(|| Daemon::start(&dir));
    let mut guest = Guest::new(viommu, "fio.sh");
    guest.disk = Some(disk.to_path_buf());
    guest.initrd = Some(initrd.to_path_buf());
    guest.qemu_args = ["-smp", "1"].map(String::from).to_vec();
    guest.append = format!(
        "{} vui.secs={}",
        mode.map_or("", Mode::cmdline),
        opts.seconds
    );
    guest.timeout = Duration::from_secs(180 + 6 * opts.seconds * JOBS.len() as u64);
    let run = guest.run(daemon.as_ref());
    let fail = |why: String| {
        let tail: Vec<&str> = run.output.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!("{what}: {why}\n--- last guest output:\n{}", tail.join("\n"))
    };
    if run.status != 0 {
        return Err(fail(format!(
            "the guest exited {} after {:.1?}",
            run.status, run.took
        )));
    }
    let want = mode.unwrap_or(Mode::Strict).domain(viommu);
    let domain = run
        .lines("VUI-CHECK vda-domain ")
        .first()
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or("?")
        .to_string();
    if domain != want {
        return Err(fail(format!(
            "the disk's IOMMU domain is {domain}, not {want}"
        )));
    }
    let results = parse_fio(&run).map_err(fail)?;
    for job in JOBS {
        if !results.iter().any(|(j, _)| j == job) {
            return Err(fail(format!("no result for {job}")));
        }
    }
    let daemon = daemon.map(|d| {
        let q = d.queue_stats();
        println!(
            "   daemon queue: {} requests, {} kicks, {} batches ({} found polling, {} µs polling), {} waited for an ACK, {} used signals, {} µs awake",
            q.requests, q.kicks, q.batches, q.polled_batches, q.poll_us, q.acked_batches, q.used_signals, q.awake_us
        );
        let s = d.stats();
        (s.ok[3], s.ok[4])
    });
    Ok(Boot {
        round,
        mode,
        viommu,
        took: run.took,
        results,
        daemon,
    })
}

/// The mean of `viommu`'s results for `job` in `mode` over all rounds.
fn mean(boots: &[Boot], mode: Mode, viommu: Viommu, job: &str) -> Sample {
    let samples: Vec<Sample> = boots
        .iter()
        .filter(|b| b.viommu == viommu && b.mode.is_none_or(|m| m == mode))
        .flat_map(|b| b.results.iter().filter(|(j, _)| j == job).map(|(_, s)| *s))
        .collect();
    Sample::mean(&samples)
}

/// The host's 1-minute load average: other work on the host's two cores
/// shows in every figure, so the run reports it.
fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

/// A table cell: `x` with `decimals` decimals, or "-" for a configuration
/// not booted (`--viommu`).
fn figure(x: f64, decimals: usize) -> String {
    if x.is_finite() {
        format!("{x:.decimals$}")
    } else {
        "-".into()
    }
}

fn table(opts: &Options, boots: &[Boot]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{:<7} {:<12} {:>9} {:>8} {:>9} {:>8} {:>9} {:>8} {:>9} {:>9}",
        "mode",
        "job",
        "ours IOPS",
        "MB/s",
        "qemu IOPS",
        "MB/s",
        "none IOPS",
        "MB/s",
        "ours/qemu",
        "ours/none"
    );
    for &mode in &opts.modes {
        for job in JOBS {
            let [o, q, n] = VIOMMUS.map(|v| mean(boots, mode, v, job));
            let _ = writeln!(
                t,
                "{:<7} {:<12} {:>9} {:>8} {:>9} {:>8} {:>9} {:>8} {:>9} {:>9}",
                mode.name(),
                job,
                figure(o.iops, 0),
                figure(o.mb_s(), 2),
                figure(q.iops, 0),
                figure(q.mb_s(), 2),
                figure(n.iops, 0),
                figure(n.mb_s(), 2),
                figure(ratio(o.iops, q.iops), 3),
                figure(ratio(o.iops, n.iops), 3)
            );
        }
    }
    t
}

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A finite number, or `null`.
fn json_num(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.3}")
    } else {
        "null".into()
    }
}

fn json_sample(s: &Sample) -> String {
    format!(
        "{{\"iops\": {}, \"mb_s\": {}, \"lat_us\": {}}}",
        json_num(s.iops),
        json_num(s.mb_s()),
        json_num(s.lat_us)
    )
}

fn json(opts: &Options, command: &str, boots: &[Boot], took: Duration, load: [f64; 2]) -> String {
    let mut j = String::from("{\n");
    let modes: Vec<String> = opts.modes.iter().map(|m| json_str(m.name())).collect();
    let _ = writeln!(j, "  \"command\": {},", json_str(command));
    let _ = writeln!(
        j,
        "  \"guest\": \"TCG, 1 vCPU, 1 GiB, Debian 6.12, virtio-blk iommu_platform=on, fio O_DIRECT\","
    );
    let _ = writeln!(j, "  \"seconds_per_job\": {},", opts.seconds);
    let _ = writeln!(j, "  \"rounds\": {},", opts.rounds);
    let _ = writeln!(j, "  \"modes\": [{}],", modes.join(", "));
    let _ = writeln!(j, "  \"total_seconds\": {},", json_num(took.as_secs_f64()));
    let _ = writeln!(
        j,
        "  \"host_loadavg\": {{\"start\": {}, \"end\": {}}},",
        json_num(load[0]),
        json_num(load[1])
    );
    j.push_str("  \"mean\": [\n");
    let mut rows = Vec::new();
    for &mode in &opts.modes {
        for job in JOBS {
            let [o, q, n] = VIOMMUS.map(|v| mean(boots, mode, v, job));
            rows.push(format!(
                "    {{\"mode\": {}, \"job\": {}, \"ours\": {}, \"qemu\": {}, \"none\": {}, \
                 \"ours_over_qemu\": {}, \"ours_over_none\": {}}}",
                json_str(mode.name()),
                json_str(job),
                json_sample(&o),
                json_sample(&q),
                json_sample(&n),
                json_num(ratio(o.iops, q.iops)),
                json_num(ratio(o.iops, n.iops))
            ));
        }
    }
    j.push_str(&rows.join(",\n"));
    j.push_str("\n  ],\n  \"boots\": [\n");
    let boots: Vec<String> = boots
        .iter()
        .map(|b| {
            let results: Vec<String> = b
                .results
                .iter()
                .map(|(job, s)| format!("{}: {}", json_str(job), json_sample(s)))
                .collect();
            let daemon = b.daemon.map_or("null".into(), |(map, unmap)| {
                format!("{{\"map\": {map}, \"unmap\": {unmap}}}")
            });
            format!(
                "    {{\"round\": {}, \"mode\": {}, \"viommu\": {}, \"seconds\": {}, \
                 \"daemon\": {daemon}, \"results\": {{{}}}}}",
                b.round,
                b.mode.map_or("null".into(), |m| json_str(m.name())),
                json_str(viommu_name(b.viommu)),
                json_num(b.took.as_secs_f64()),
                results.join(", ")
            )
        })
        .collect();
    j.push_str(&boots.join(",\n"));
    j.push_str("\n  ]\n}\n");
    j
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match parse(&args) {
        Ok(Some(o)) => o,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("guest-bench: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if qemu().is_none() {
        eprintln!("guest-bench: the patched QEMU is not built: run scripts/qemu/build-qemu.sh");
        return ExitCode::FAILURE;
    }
    if kernel_dir().is_none() {
        eprintln!("guest-bench: no guest kernel: run scripts/guest/fetch-kernel.sh");
        return ExitCode::FAILURE;
    }
    let mut command = String::from("cargo run --release -p qemu-tests --bin guest-bench");
    if !args.is_empty() {
        command.push_str(" -- ");
        command.push_str(&args.join(" "));
    }
    let start = Instant::now();
    let load_start = loadavg();
    println!("== {command}");
    println!("== building the initramfs with fio");
    let initrd = initramfs_with("initrd-fio.gz", &["--with-fio"]);
    let dir = scratch("guest-bench");
    let disk = disk_image(&dir, DISK_MIB);

    // Round-robin: every configuration once per round, in the same order.
    let mut plan: Vec<(Option<Mode>, Viommu)> = Vec::new();
    for &mode in &opts.modes {
        for viommu in [Viommu::Ours, Viommu::Qemu] {
            if opts.viommus.contains(&viommu) {
                plan.push((Some(mode), viommu));
            }
        }
    }
    if opts.viommus.contains(&Viommu::None) {
        plan.push((None, Viommu::None));
    }
    let mut boots = Vec::new();
    for round in 1..=opts.rounds {
        for &(mode, viommu) in &plan {
            match boot(&opts, &disk, &initrd, round, mode, viommu) {
                Ok(b) => {
                    let figures: Vec<String> = b
                        .results
                        .iter()
                        .map(|(j, s)| format!("{j} {:.0}", s.iops))
                        .collect();
                    let daemon = b.daemon.map_or(String::new(), |(map, unmap)| {
                        format!("; daemon: {map} MAP, {unmap} UNMAP")
                    });
                    println!(
                        "   round {round} {:<6} {:<4} {:>5.1} s: IOPS {}{daemon}",
                        mode.map_or("both", Mode::name),
                        viommu_name(viommu),
                        b.took.as_secs_f64(),
                        figures.join(", ")
                    );
                    boots.push(b);
                }
                Err(e) => {
                    eprintln!("guest-bench: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    let took = start.elapsed();
    let load = [load_start, loadavg()];
    println!(
        "== fio in the guest: TCG, 1 vCPU, 1 GiB, virtio-blk (iommu_platform=on), O_DIRECT; \
         {} s per job, mean of {} round(s); none = no vIOMMU (one boot per round, both modes)",
        opts.seconds, opts.rounds
    );
    println!(
        "== host load average {:.2} at the start, {:.2} at the end",
        load[0], load[1]
    );
    print!("{}", table(&opts, &boots));
    println!(
        "== {} boots in {:.0} s ({command})",
        boots.len(),
        took.as_secs_f64()
    );
    if let Some(path) = &opts.json {
        if let Err(e) = std::fs::write(path, json(&opts, &command, &boots, took, load)) {
            eprintln!("guest-bench: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("== figures written to {}", path.display());
    }
    ExitCode::SUCCESS
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
        assert!(parse(&args("--rounds 0")).is_err());
        assert!(parse(&args("--json")).is_err());
        assert!(parse(&args("--help")).unwrap().is_none());
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
    fn a_configuration_not_booted_has_no_figures() {
        let m = Sample::mean(&[]);
        assert!(m.iops.is_nan() && m.lat_us.is_nan());
        assert!(ratio(1.0, m.iops).is_nan());
        assert_eq!(figure(ratio(1.0, m.iops), 3), "-");
        assert_eq!(figure(1.31159, 3), "1.312");
    }

    #[test]
    fn fio_lines_are_parsed() {
        let run = Run {
            status: 0,
            output: "x VUI-FIO job=rand4k-qd1 iops=1234.5 kibps=4938 lat_us=801.2 ios=6172\n"
                .into(),
            took: Duration::ZERO,
        };
        let r = parse_fio(&run).unwrap();
        assert_eq!(r[0].0, "rand4k-qd1");
        assert_eq!(r[0].1.iops, 1234.5);
        assert!((r[0].1.mb_s() - 5.056).abs() < 0.001);
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_str("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
        assert_eq!(json_num(f64::NAN), "null");
    }
}
