// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The guests' fio jobs (`qemu-tests/guest/fio.sh`) and their results: the
//! `VUI-FIO` lines of a guest's output, checked once it has finished.

use std::sync::OnceLock;

use qemu_tests::{Arch, Run, Viommu};

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

/// One fio job's result in one guest.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    pub iops: f64,
    pub kibps: f64,
    pub lat_us: f64,
    /// I/Os completed.
    pub ios: f64,
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
        }
    }
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
                ios: num("ios")?,
            },
        ));
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
    let results = parse_fio(run)?;
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
        assert_eq!(r[0].1.ios, 6172.0);
        assert!((r[0].1.mb_s() - 5.056).abs() < 0.001);
    }
}
