// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The guests' fio jobs (`qemu-tests/guest/fio.sh`) and their results,
//! read from a guest's output once it has finished: fio's own JSON output
//! (`VUI-FIO-JSON` lines), or the `VUI-FIO` lines of busybox dd
//! (`qemu-tests/guest/ddbench.sh`, arm64).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use qemu_tests::{Arch, Run, Viommu};
use serde::Deserialize;

use crate::options::Mode;

/// fio's jobs (`qemu-tests/guest/fio.sh`), on x86.
pub const JOBS: [&str; 3] = ["rand4k-qd1", "rand4k-qd32", "seq128k-qd1"];
/// busybox dd's jobs (`qemu-tests/guest/ddbench.sh`), on arm64, where no
/// fio is in the initramfs: sequential O_DIRECT reads, one at a time.
pub const DD_JOBS: [&str; 2] = ["seq4k-qd1", "seq128k-qd1"];

static ARCH: OnceLock<Arch> = OnceLock::new();

/// The guests' architecture, for [`jobs`]: set once, at the start.
pub fn set_arch(arch: Arch) {
    let _ = ARCH.set(arch);
}

/// The jobs every guest runs, in order: fio's on x86, dd's on arm64.
pub fn jobs() -> &'static [&'static str] {
    match ARCH.get().copied().unwrap_or_default() {
        Arch::X86_64 => &JOBS,
        Arch::Arm64 => &DD_JOBS,
    }
}

/// The guest script that runs [`jobs`], and the initramfs option it needs.
pub fn guest_script(arch: Arch) -> (&'static str, &'static [&'static str]) {
    match arch {
        Arch::X86_64 => ("fio.sh", &["--with-fio"]),
        Arch::Arm64 => ("ddbench.sh", &["--arch", "arm64"]),
    }
}

/// Completion latency percentiles of a job, in microseconds (NaN: none
/// measured, as with dd).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub p99_9: f64,
}

impl Percentiles {
    pub const NONE: Percentiles = Percentiles {
        p50: f64::NAN,
        p99: f64::NAN,
        p99_9: f64::NAN,
    };

    /// Each percentile's mean over `all` (NaN for none).
    pub fn mean(all: impl Iterator<Item = Percentiles> + Clone) -> Percentiles {
        let n = all.clone().count() as f64;
        let mean = |f: fn(&Percentiles) -> f64| all.clone().map(|p| f(&p)).sum::<f64>() / n;
        Percentiles {
            p50: mean(|p| p.p50),
            p99: mean(|p| p.p99),
            p99_9: mean(|p| p.p99_9),
        }
    }
}

/// One fio job's result in one guest.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    pub iops: f64,
    pub kibps: f64,
    /// The mean total latency (submission + completion).
    pub lat_us: f64,
    /// I/Os completed.
    pub ios: f64,
    /// Completion latency percentiles (fio's `clat_ns.percentile`).
    pub clat: Percentiles,
}

impl Sample {
    pub fn mb_s(&self) -> f64 {
        self.kibps * 1024.0 / 1e6
    }

    /// The mean; NaN for no samples (a configuration not booted).
    pub fn mean(samples: &[Sample]) -> Sample {
        let n = samples.len() as f64;
        let sum = |f: fn(&Sample) -> f64| samples.iter().map(f).sum::<f64>() / n;
        Sample {
            iops: sum(|s| s.iops),
            kibps: sum(|s| s.kibps),
            lat_us: sum(|s| s.lat_us),
            ios: sum(|s| s.ios),
            clat: Percentiles::mean(samples.iter().map(|s| s.clat)),
        }
    }
}

/// What guest-bench reads of fio's `--output-format=json`: the read
/// figures of its one job.
#[derive(Debug, Deserialize)]
struct FioOutput {
    jobs: Vec<FioJob>,
}

#[derive(Debug, Deserialize)]
struct FioJob {
    jobname: String,
    read: FioRead,
}

#[derive(Debug, Deserialize)]
struct FioRead {
    iops: f64,
    /// KiB/s.
    bw: f64,
    total_ios: u64,
    lat_ns: FioLatency,
    clat_ns: FioLatency,
}

#[derive(Debug, Deserialize)]
struct FioLatency {
    mean: f64,
    /// By percentile, as fio names them ("99.900000"); absent without
    /// completions.
    #[serde(default)]
    percentile: BTreeMap<String, f64>,
}

impl FioLatency {
    /// The percentile `p` (fio.sh's `--percentile_list`), in µs.
    fn percentile_us(&self, p: &str) -> f64 {
        self.percentile.get(p).map_or(f64::NAN, |ns| ns / 1e3)
    }
}

/// The fio line prefixes: fio's JSON output on one line after
/// `VUI-FIO-JSON job=NAME ` (`fio.sh`), dd's figures after `VUI-FIO `
/// (`ddbench.sh`).
const FIO_JSON: &str = "VUI-FIO-JSON job=";
const DD_LINE: &str = "VUI-FIO ";

/// Why a guest's result line is not understood.
#[derive(Debug, thiserror::Error)]
pub enum ResultError {
    #[error("no {key} in {line:?}")]
    Missing { key: &'static str, line: String },
    #[error("{key}={value} is not a number")]
    NotANumber { key: &'static str, value: String },
    #[error("fio's JSON for {job} does not parse: {source}")]
    Json {
        job: String,
        source: serde_json::Error,
    },
    #[error("fio's JSON for {job} holds job {found:?}")]
    OtherJob { job: String, found: Option<String> },
}

/// A `VUI-FIO-JSON job=NAME {...}` line (after its prefix): fio's figures
/// of job NAME.
fn parse_fio_json(rest: &str) -> Result<(String, Sample), ResultError> {
    let (job, json) = rest.split_once(' ').unwrap_or((rest, ""));
    let json_error = |source| ResultError::Json {
        job: job.to_string(),
        source,
    };
    let out: FioOutput = serde_json::from_str(json).map_err(json_error)?;
    let [j] = &out.jobs[..] else {
        return Err(ResultError::OtherJob {
            job: job.into(),
            found: None,
        });
    };
    if j.jobname != job {
        return Err(ResultError::OtherJob {
            job: job.into(),
            found: Some(j.jobname.clone()),
        });
    }
    let r = &j.read;
    let sample = Sample {
        iops: r.iops,
        kibps: r.bw,
        lat_us: r.lat_ns.mean / 1e3,
        ios: r.total_ios as f64,
        clat: Percentiles {
            p50: r.clat_ns.percentile_us("50.000000"),
            p99: r.clat_ns.percentile_us("99.000000"),
            p99_9: r.clat_ns.percentile_us("99.900000"),
        },
    };
    Ok((job.to_string(), sample))
}

/// A `VUI-FIO job=NAME iops=N kibps=N lat_us=N ios=N` line (dd's).
fn parse_dd_line(line: &str) -> Result<(String, Sample), ResultError> {
    let field = |key: &'static str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
            .ok_or_else(|| ResultError::Missing {
                key,
                line: line.to_string(),
            })
    };
    let num = |key: &'static str| -> Result<f64, ResultError> {
        let v = field(key)?;
        v.parse().map_err(|_| ResultError::NotANumber {
            key,
            value: v.to_string(),
        })
    };
    Ok((
        field("job")?.to_string(),
        Sample {
            iops: num("iops")?,
            kibps: num("kibps")?,
            lat_us: num("lat_us")?,
            ios: num("ios")?,
            clat: Percentiles::NONE,
        },
    ))
}

/// A guest's job results, in the order it printed them.
fn parse_fio(run: &Run) -> Result<Vec<(String, Sample)>, ResultError> {
    let mut out = Vec::new();
    for line in run.output.lines() {
        if let Some(i) = line.find(FIO_JSON) {
            out.push(parse_fio_json(&line[i + FIO_JSON.len()..])?);
        } else if let Some(i) = line.find(DD_LINE) {
            out.push(parse_dd_line(&line[i..])?);
        }
    }
    Ok(out)
}

/// A finished guest's fio results, checked: it passed, its disk is in the
/// domain the mode asks for, every job has a result.
pub fn check_run(
    run: &Run,
    mode: Option<Mode>,
    viommu: Viommu,
) -> Result<Vec<(String, Sample)>, String> {
    if run.status != 0 {
        return Err(format!(
            "the guest exited {} after {:.1?}",
            run.status, run.took
        ));
    }
    let want = mode.unwrap_or(Mode::Strict).domain(viommu);
    let domain = run
        .lines("VUI-CHECK vda-domain ")
        .first()
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or("?")
        .to_string();
    if domain != want {
        return Err(format!("the disk's IOMMU domain is {domain}, not {want}"));
    }
    let results = parse_fio(run).map_err(|e| e.to_string())?;
    for &job in jobs() {
        if !results.iter().any(|(j, _)| j == job) {
            return Err(format!("no result for {job}"));
        }
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn run(output: &str) -> Run {
        Run {
            status: 0,
            output: output.into(),
            took: Duration::ZERO,
        }
    }

    /// fio 3.33's JSON output of one job, cut to what matters and put on
    /// one line as fio.sh does (indentation dropped, newlines removed).
    const FIO_JSON_LINE: &str = concat!(
        "[    3.1] VUI-FIO-JSON job=rand4k-qd1 {\"fio version\" : \"fio-3.33\",",
        "\"timestamp\" : 1765100000,\"time\" : \"Mon Dec  7 16:00:00 2026\",",
        "\"jobs\" : [{\"jobname\" : \"rand4k-qd1\",\"groupid\" : 0,\"error\" : 0,",
        "\"read\" : {\"io_bytes\" : 25288704,\"io_kbytes\" : 24696,\"bw_bytes\" : 5057740,",
        "\"bw\" : 4939,\"iops\" : 1234.5,\"runtime\" : 5000,\"total_ios\" : 6174,",
        "\"short_ios\" : 0,\"drop_ios\" : 0,",
        "\"slat_ns\" : {\"min\" : 0,\"max\" : 0,\"mean\" : 0.0,\"stddev\" : 0.0,\"N\" : 0},",
        "\"clat_ns\" : {\"min\" : 500000,\"max\" : 9000000,\"mean\" : 790000.5,",
        "\"stddev\" : 1000.0,\"N\" : 6174,\"percentile\" : {\"50.000000\" : 765952,",
        "\"99.000000\" : 1531904,\"99.900000\" : 4014080}},",
        "\"lat_ns\" : {\"min\" : 510000,\"max\" : 9100000,\"mean\" : 801200.0,",
        "\"stddev\" : 1000.0,\"N\" : 6174}},",
        "\"write\" : {\"io_bytes\" : 0,\"iops\" : 0.0}}]}"
    );

    #[test]
    fn fio_json_lines_give_the_figures_and_clat_percentiles() {
        let r = parse_fio(&run(&format!("boot\n{FIO_JSON_LINE}\nVUI-PASS\n"))).unwrap();
        assert_eq!(r.len(), 1);
        let (job, s) = &r[0];
        assert_eq!(job, "rand4k-qd1");
        assert_eq!((s.iops, s.kibps, s.ios), (1234.5, 4939.0, 6174.0));
        assert!((s.lat_us - 801.2).abs() < 1e-9);
        assert!((s.clat.p50 - 765.952).abs() < 1e-9);
        assert!((s.clat.p99 - 1531.904).abs() < 1e-9);
        assert!((s.clat.p99_9 - 4014.08).abs() < 1e-9);
    }

    #[test]
    fn fio_json_that_is_cut_or_of_another_job_is_an_error() {
        let cut = &FIO_JSON_LINE[..FIO_JSON_LINE.len() - 10];
        let e = parse_fio(&run(cut)).unwrap_err();
        assert!(matches!(e, ResultError::Json { .. }), "{e}");
        let other = FIO_JSON_LINE.replace("job=rand4k-qd1", "job=seq128k-qd1");
        let e = parse_fio(&run(&other)).unwrap_err();
        assert!(
            e.to_string()
                .contains("for seq128k-qd1 holds job Some(\"rand4k-qd1\")"),
            "{e}"
        );
        let none = "VUI-FIO-JSON job=x {\"jobs\": []}";
        assert!(matches!(
            parse_fio(&run(none)),
            Err(ResultError::OtherJob { found: None, .. })
        ));
    }

    #[test]
    fn a_job_without_completions_has_no_percentiles() {
        let line =
            "VUI-FIO-JSON job=j {\"jobs\":[{\"jobname\":\"j\",\"read\":{\"iops\":0,\"bw\":0,\
            \"total_ios\":0,\"lat_ns\":{\"mean\":0},\"clat_ns\":{\"mean\":0}}}]}";
        let r = parse_fio(&run(line)).unwrap();
        assert!(r[0].1.clat.p50.is_nan() && r[0].1.clat.p99_9.is_nan());
    }

    #[test]
    fn dd_lines_are_parsed_without_percentiles() {
        let r = parse_fio(&run(
            "x VUI-FIO job=seq4k-qd1 iops=1234.5 kibps=4938 lat_us=801.2 ios=6172\n",
        ))
        .unwrap();
        assert_eq!(r[0].0, "seq4k-qd1");
        assert_eq!(r[0].1.iops, 1234.5);
        assert_eq!(r[0].1.ios, 6172.0);
        assert!((r[0].1.mb_s() - 5.056).abs() < 0.001);
        assert!(r[0].1.clat.p99.is_nan());
        let e = parse_fio(&run("VUI-FIO job=a iops=x kibps=1 lat_us=1 ios=1")).unwrap_err();
        assert_eq!(e.to_string(), "iops=x is not a number");
        let e = parse_fio(&run("VUI-FIO job=a iops=1")).unwrap_err();
        assert!(e.to_string().starts_with("no kibps in"), "{e}");
    }

    #[test]
    fn percentiles_average_each_one() {
        let p = |x: f64| Percentiles {
            p50: x,
            p99: 2.0 * x,
            p99_9: 3.0 * x,
        };
        let m = Percentiles::mean([p(1.0), p(3.0)].into_iter());
        assert_eq!(m, p(2.0));
        assert!(Percentiles::mean(std::iter::empty()).p50.is_nan());
    }
}
