// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The figures: each job's aggregate over a group's guests and its mean
//! over the rounds, the progress lines, the table and the `--json` file.

use std::fmt::Write as _;
use std::time::Duration;

use qemu_tests::Viommu;
use serde_json::{json, Map, Value};

use crate::fio::{jobs, Percentiles, Sample};
use crate::group::Group;
use crate::options::{viommu_name, Mode, Options, VIOMMUS};
use crate::procstat::CpuTime;

/// A group's (or a mean of groups') figures for one job.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Aggregate {
    /// Sum over the guests.
    iops: f64,
    /// Sum over the guests.
    kibps: f64,
    /// Mean over the guests.
    lat_us: f64,
    /// Each the mean over the guests of theirs.
    clat: Percentiles,
    /// Sum over the guests.
    ios: f64,
    /// Host CPU seconds of the guests' QEMU processes (and daemons), summed.
    cpu_s: f64,
    /// The daemons' part of `cpu_s`.
    daemon_cpu_s: f64,
    /// Context switches of the guests' QEMU and daemon threads, summed.
    switches: f64,
    host_busy: f64,
}

impl Aggregate {
    /// No figures (a configuration not booted).
    const NONE: Aggregate = Aggregate {
        iops: f64::NAN,
        kibps: f64::NAN,
        lat_us: f64::NAN,
        clat: Percentiles::NONE,
        ios: f64::NAN,
        cpu_s: f64::NAN,
        daemon_cpu_s: f64::NAN,
        switches: f64::NAN,
        host_busy: f64::NAN,
    };

    fn mb_s(&self) -> f64 {
        self.kibps * 1024.0 / 1e6
    }

    /// Host CPU microseconds per I/O.
    fn cpu_us_per_io(&self) -> f64 {
        ratio(self.cpu_s * 1e6, self.ios)
    }

    /// The daemons' CPU microseconds per I/O.
    fn daemon_us_per_io(&self) -> f64 {
        ratio(self.daemon_cpu_s * 1e6, self.ios)
    }

    /// Context switches (QEMU and daemon threads) per I/O.
    fn switches_per_io(&self) -> f64 {
        ratio(self.switches, self.ios)
    }

    /// The mean of each figure (so the mean's CPU per I/O is the total CPU
    /// time over the total I/Os); [`Self::NONE`] for none.
    fn mean(all: &[Aggregate]) -> Aggregate {
        if all.is_empty() {
            return Aggregate::NONE;
        }
        let n = all.len() as f64;
        let mean = |f: fn(&Aggregate) -> f64| all.iter().map(f).sum::<f64>() / n;
        Aggregate {
            iops: mean(|a| a.iops),
            kibps: mean(|a| a.kibps),
            lat_us: mean(|a| a.lat_us),
            clat: Percentiles::mean(all.iter().map(|a| a.clat)),
            ios: mean(|a| a.ios),
            cpu_s: mean(|a| a.cpu_s),
            daemon_cpu_s: mean(|a| a.daemon_cpu_s),
            switches: mean(|a| a.switches),
            host_busy: mean(|a| a.host_busy),
        }
    }
}

/// The guests' figures for one job: each guest's fio result and host CPU
/// time, summed ([`Aggregate::NONE`] for no guests).
fn aggregate(per_guest: &[(Sample, CpuTime)], host_busy: f64) -> Aggregate {
    if per_guest.is_empty() {
        return Aggregate::NONE;
    }
    let samples: Vec<Sample> = per_guest.iter().map(|(s, _)| *s).collect();
    let mean = Sample::mean(&samples);
    Aggregate {
        iops: samples.iter().map(|s| s.iops).sum(),
        kibps: samples.iter().map(|s| s.kibps).sum(),
        lat_us: mean.lat_us,
        clat: mean.clat,
        ios: samples.iter().map(|s| s.ios).sum(),
        cpu_s: per_guest.iter().map(|(_, c)| c.total()).sum(),
        daemon_cpu_s: per_guest.iter().map(|(_, c)| c.daemon).sum(),
        switches: per_guest.iter().map(|(_, c)| c.switches).sum(),
        host_busy,
    }
}

impl Group {
    /// The group's figures for `job`: sums over its guests.
    fn aggregate(&self, job: &str) -> Aggregate {
        let Some(w) = self.windows.iter().find(|w| w.job == job) else {
            return Aggregate::NONE;
        };
        let per_guest: Vec<(Sample, CpuTime)> = self
            .guests
            .iter()
            .zip(&w.cpu)
            .filter_map(|(g, &cpu)| Some((g.sample(job)?, cpu)))
            .collect();
        aggregate(&per_guest, w.host_busy)
    }
}

/// A group's progress lines: each guest's IOPS (and daemon counters), then
/// each job's aggregate.
pub fn progress(g: &Group) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "   round {} {:<6} {:<4} x{}: {:.1} s",
        g.round,
        g.mode.map_or("both", Mode::name),
        viommu_name(g.viommu),
        g.guests.len(),
        g.took.as_secs_f64()
    );
    for (i, guest) in g.guests.iter().enumerate() {
        let figures: Vec<String> = guest
            .results
            .iter()
            .map(|(j, s)| format!("{j} {:.0}", s.iops))
            .collect();
        let daemon = guest
            .daemon
            .as_ref()
            .and_then(|d| d.map_unmap)
            .map_or(String::new(), |(map, unmap)| {
                format!("; daemon: {map} MAP, {unmap} UNMAP")
            });
        let _ = writeln!(
            t,
            "     guest {} {:>5.1} s: IOPS {}{daemon}",
            i + 1,
            guest.took.as_secs_f64(),
            figures.join(", ")
        );
        if let Some(d) = &guest.daemon {
            let _ = writeln!(t, "       daemon {}: {}", i + 1, d.stats);
        }
    }
    let jobs: Vec<String> = jobs()
        .iter()
        .map(|job| {
            let a = g.aggregate(job);
            let daemon = match g.viommu {
                Viommu::Ours => format!(" (daemons {})", figure(a.daemon_us_per_io(), 1)),
                _ => String::new(),
            };
            format!(
                "{job} {:.0} IOPS, {}{daemon} µs CPU/IO, host {}% busy",
                a.iops,
                figure(a.cpu_us_per_io(), 1),
                figure(a.host_busy * 100.0, 0)
            )
        })
        .collect();
    let _ = writeln!(t, "     all: {}", jobs.join("; "));
    t
}

/// The mean over the rounds of `viommu`'s figures for `job` in `mode` with
/// `n` guests at once.
fn mean(groups: &[Group], mode: Mode, viommu: Viommu, n: usize, job: &str) -> Aggregate {
    let all: Vec<Aggregate> = groups
        .iter()
        .filter(|g| g.viommu == viommu && g.guests.len() == n && g.mode.is_none_or(|m| m == mode))
        .map(|g| g.aggregate(job))
        .collect();
    Aggregate::mean(&all)
}

/// `a / b`, or NaN (no figure) when `b` is not positive.
pub fn ratio(a: f64, b: f64) -> f64 {
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

/// Per mode and job, a row per guest count: the mean aggregate IOPS and
/// host CPU per I/O of each configuration, the ratios of ours to QEMU's
/// (and IOPS of ours to none), and the host's busy percentage; then a row
/// per guest count of each configuration's completion latency
/// percentiles (fio's, the mean over the guests and rounds), and one of
/// context switches per I/O (the guests' QEMU and daemon threads).
pub fn table(opts: &Options, groups: &[Group]) -> String {
    let mut t = String::new();
    for &mode in &opts.modes {
        for &job in jobs() {
            let _ = writeln!(t, "-- {} {job}", mode.name());
            let _ = writeln!(
                t,
                "{:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>10} {:>9} {:>13}",
                "guests",
                "ours IOPS",
                "qemu IOPS",
                "none IOPS",
                "IOPS o/q",
                "IOPS o/n",
                "ours µs/IO",
                "qemu µs/IO",
                "none µs/IO",
                "µs/IO o/q",
                "busy% o/q/n"
            );
            for &n in &opts.guests {
                let [o, q, no] = VIOMMUS.map(|v| mean(groups, mode, v, n, job));
                let busy = [o, q, no].map(|a| figure(a.host_busy * 100.0, 0)).join("/");
                let _ = writeln!(
                    t,
                    "{:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>10} {:>9} {:>13}",
                    n,
                    figure(o.iops, 0),
                    figure(q.iops, 0),
                    figure(no.iops, 0),
                    figure(ratio(o.iops, q.iops), 3),
                    figure(ratio(o.iops, no.iops), 3),
                    figure(o.cpu_us_per_io(), 1),
                    figure(q.cpu_us_per_io(), 1),
                    figure(no.cpu_us_per_io(), 1),
                    figure(ratio(o.cpu_us_per_io(), q.cpu_us_per_io()), 3),
                    busy
                );
            }
            let _ = writeln!(
                t,
                "{:>6} {:>9} {:>9} {:>10} {:>9} {:>9} {:>10} {:>9} {:>9} {:>10}",
                "clat µs",
                "ours p50",
                "ours p99",
                "ours p99.9",
                "qemu p50",
                "qemu p99",
                "qemu p99.9",
                "none p50",
                "none p99",
                "none p99.9"
            );
            for &n in &opts.guests {
                let clat = VIOMMUS.map(|v| mean(groups, mode, v, n, job).clat);
                let _ = write!(t, "{n:>7}");
                for p in clat {
                    let _ = write!(
                        t,
                        " {:>9} {:>9} {:>10}",
                        figure(p.p50, 1),
                        figure(p.p99, 1),
                        figure(p.p99_9, 1)
                    );
                }
                let _ = writeln!(t);
            }
            let _ = writeln!(
                t,
                "{:>6} {:>9} {:>9} {:>9} {:>9}",
                "sw/IO", "ours", "qemu", "none", "o/q"
            );
            for &n in &opts.guests {
                let [o, q, no] = VIOMMUS.map(|v| mean(groups, mode, v, n, job).switches_per_io());
                let _ = writeln!(
                    t,
                    "{n:>6} {:>9} {:>9} {:>9} {:>9}",
                    figure(o, 2),
                    figure(q, 2),
                    figure(no, 2),
                    figure(ratio(o, q), 3)
                );
            }
        }
    }
    t
}

// ---- JSON -----------------------------------------------------------------

/// A figure to 3 decimals; NaN (a configuration not booted) is `null`.
fn num(x: f64) -> Value {
    json!((x * 1e3).round() / 1e3)
}

/// Completion latency percentiles, in µs (`null`: none, as with dd).
fn json_clat(p: &Percentiles) -> Value {
    json!({"p50": num(p.p50), "p99": num(p.p99), "p99_9": num(p.p99_9)})
}

/// One guest's fio result for one job.
fn json_sample(s: &Sample) -> Value {
    json!({
        "iops": num(s.iops),
        "mb_s": num(s.mb_s()),
        "lat_us": num(s.lat_us),
        "clat_us": json_clat(&s.clat),
        "ios": num(s.ios),
    })
}

/// A group's (or a mean's) figures for one job.
fn json_aggregate(a: &Aggregate) -> Value {
    json!({
        "iops": num(a.iops),
        "mb_s": num(a.mb_s()),
        "lat_us": num(a.lat_us),
        "clat_us": json_clat(&a.clat),
        "ios": num(a.ios),
        "cpu_s": num(a.cpu_s),
        "cpu_us_per_io": num(a.cpu_us_per_io()),
        "daemon_cpu_s": num(a.daemon_cpu_s),
        "daemon_cpu_us_per_io": num(a.daemon_us_per_io()),
        "switches_per_io": num(a.switches_per_io()),
        "host_busy": num(a.host_busy),
    })
}

/// One guest of a group: its results with the CPU of its job windows.
fn json_guest(g: &Group, i: usize) -> Value {
    let guest = &g.guests[i];
    let results: Map<String, Value> = guest
        .results
        .iter()
        .map(|(job, s)| {
            let w = g.windows.iter().find(|w| w.job == job);
            let cpu = w.and_then(|w| w.cpu.get(i).copied());
            let (cpu, daemon) = cpu.map_or((f64::NAN, f64::NAN), |c| (c.total(), c.daemon));
            let secs = w
                .and_then(|w| w.seconds.get(i).copied())
                .unwrap_or(f64::NAN);
            let figures = json!({
                "fio": json_sample(s),
                "cpu_s": num(cpu),
                "cpu_us_per_io": num(ratio(cpu * 1e6, s.ios)),
                "daemon_cpu_s": num(daemon),
                "window_s": num(secs),
            });
            (job.clone(), figures)
        })
        .collect();
    let daemon = guest.daemon.as_ref().map(|d| {
        let (map, unmap) = d.map_unmap.unzip();
        json!({"map": map, "unmap": unmap, "stats": d.stats})
    });
    json!({
        "guest": i + 1,
        "seconds": num(guest.took.as_secs_f64()),
        "daemon": daemon,
        "results": results,
    })
}

/// One group: its aggregate figures per job, and each guest's.
fn json_group(g: &Group) -> Value {
    let jobs: Map<String, Value> = jobs()
        .iter()
        .map(|job| (job.to_string(), json_aggregate(&g.aggregate(job))))
        .collect();
    let guests: Vec<Value> = (0..g.guests.len()).map(|i| json_guest(g, i)).collect();
    json!({
        "round": g.round,
        "mode": g.mode.map(Mode::name),
        "viommu": viommu_name(g.viommu),
        "guests": g.guests.len(),
        "seconds": num(g.took.as_secs_f64()),
        "jobs": jobs,
        "per_guest": guests,
    })
}

/// The whole run as JSON: the settings, the means per mode, job and guest
/// count, and every group with its guests.
pub fn json(
    opts: &Options,
    command: &str,
    daemon_args: &[String],
    groups: &[Group],
    took: Duration,
    load: [f64; 2],
) -> String {
    let mut means = Vec::new();
    for &mode in &opts.modes {
        for &job in jobs() {
            for &n in &opts.guests {
                let [o, q, no] = VIOMMUS.map(|v| mean(groups, mode, v, n, job));
                means.push(json!({
                    "mode": mode.name(),
                    "job": job,
                    "guests": n,
                    "ours": json_aggregate(&o),
                    "qemu": json_aggregate(&q),
                    "none": json_aggregate(&no),
                    "ours_over_qemu": num(ratio(o.iops, q.iops)),
                    "ours_over_none": num(ratio(o.iops, no.iops)),
                    "cpu_ours_over_qemu": num(ratio(o.cpu_us_per_io(), q.cpu_us_per_io())),
                }));
            }
        }
    }
    let modes: Vec<&str> = opts.modes.iter().map(|m| m.name()).collect();
    let groups: Vec<Value> = groups.iter().map(json_group).collect();
    let run = json!({
        "command": command,
        "guest": "TCG, 1 vCPU, 1 GiB, Debian 6.12, virtio-blk iommu_platform=on, fio O_DIRECT",
        "seconds_per_job": opts.seconds,
        "rounds": opts.rounds,
        "modes": modes,
        "guests": opts.guests,
        "daemon_args": daemon_args,
        "total_seconds": num(took.as_secs_f64()),
        "host_loadavg": {"start": num(load[0]), "end": num(load[1])},
        "mean": means,
        "groups": groups,
    });
    format!("{run:#}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::group::{GuestRun, Window};
    use crate::options::{parse, Options};

    fn opts(s: &str) -> Options {
        parse(std::iter::once("guest-bench").chain(s.split_whitespace())).unwrap()
    }

    fn sample(iops: f64, ios: f64) -> Sample {
        Sample {
            iops,
            kibps: iops * 4.0,
            lat_us: 1e6 / iops,
            ios,
            clat: Percentiles {
                p50: 1e6 / iops,
                p99: 2e6 / iops,
                p99_9: 4e6 / iops,
            },
        }
    }

    fn cpu(qemu: f64, daemon: f64) -> CpuTime {
        CpuTime {
            qemu,
            daemon,
            switches: (qemu + daemon) * 1e4,
        }
    }

    /// Two guests behind QEMU's vIOMMU, strict, with a window for the
    /// first job only.
    fn two_qemu_guests() -> Group {
        let guest = |iops: f64| GuestRun {
            took: Duration::ZERO,
            results: jobs()
                .iter()
                .map(|j| (j.to_string(), sample(iops, iops)))
                .collect(),
            daemon: None,
        };
        Group {
            round: 1,
            mode: Some(Mode::Strict),
            viommu: Viommu::Qemu,
            took: Duration::ZERO,
            guests: vec![guest(100.0), guest(300.0)],
            windows: vec![Window {
                job: jobs()[0],
                cpu: vec![cpu(0.1, 0.0), cpu(0.3, 0.0)],
                seconds: vec![1.0, 1.0],
                host_busy: 1.0,
            }],
        }
    }

    #[test]
    fn a_configuration_not_booted_has_no_figures() {
        let m = Sample::mean(&[]);
        assert!(m.iops.is_nan() && m.lat_us.is_nan());
        assert!(ratio(1.0, m.iops).is_nan());
        assert_eq!(figure(ratio(1.0, m.iops), 3), "-");
        assert_eq!(figure(1.31159, 3), "1.312");
        let a = Aggregate::mean(&[]);
        assert!(a.iops.is_nan() && a.cpu_us_per_io().is_nan());
        assert!(aggregate(&[], 0.5).iops.is_nan());
    }

    #[test]
    fn guests_are_summed_and_cpu_is_per_io() {
        let a = aggregate(
            &[
                (sample(1000.0, 1000.0), cpu(0.375, 0.125)),
                (sample(500.0, 500.0), cpu(0.25, 0.0)),
            ],
            0.9,
        );
        assert_eq!(a.iops, 1500.0);
        assert_eq!(a.kibps, 6000.0);
        assert_eq!(a.ios, 1500.0);
        assert_eq!(a.cpu_s, 0.75);
        assert_eq!(a.lat_us, 1500.0);
        assert_eq!(a.host_busy, 0.9);
        assert_eq!(a.cpu_us_per_io(), 500.0);
        assert_eq!((a.daemon_cpu_s, a.daemon_us_per_io()), (0.125, 250.0 / 3.0));
        // Switches are summed over the guests, then per I/O: (5000 + 2500) / 1500.
        assert_eq!((a.switches, a.switches_per_io()), (7500.0, 5.0));
        // The mean of rounds: CPU per I/O is the total CPU over the total I/Os.
        let b = aggregate(&[(sample(3000.0, 3000.0), cpu(0.5, 0.0))], 0.5);
        let m = Aggregate::mean(&[a, b]);
        assert_eq!(m.iops, 2250.0);
        assert!((m.cpu_us_per_io() - 1.25e6 / 4500.0).abs() < 1e-9);
        assert!((m.host_busy - 0.7).abs() < 1e-12);
        // No I/O: no CPU per I/O.
        assert!(aggregate(&[(sample(1.0, 0.0), cpu(1.0, 0.0))], 0.1)
            .cpu_us_per_io()
            .is_nan());
    }

    #[test]
    fn a_group_aggregates_each_job_over_its_guests() {
        let g = two_qemu_guests();
        let a = g.aggregate(jobs()[0]);
        assert_eq!((a.iops, a.ios), (400.0, 400.0));
        assert!((a.cpu_us_per_io() - 1000.0).abs() < 1e-9);
        // A job without a window has no figures.
        assert!(g.aggregate(jobs()[1]).iops.is_nan());
        let groups = [g];
        assert_eq!(
            mean(&groups, Mode::Strict, Viommu::Qemu, 2, jobs()[0]).iops,
            400.0
        );
        assert!(mean(&groups, Mode::Strict, Viommu::Qemu, 1, jobs()[0])
            .iops
            .is_nan());
        assert!(mean(&groups, Mode::Lazy, Viommu::Qemu, 2, jobs()[0])
            .iops
            .is_nan());
        let t = table(&opts("--quick --guests 1,2"), &groups);
        assert!(t.contains("     2         -       400"), "{t}");
        // Latency: the mean over the guests of each percentile (10000 and
        // 3333.3 µs at p50), none for a configuration not booted.
        let clat = t.lines().find(|l| l.starts_with("      2 ")).unwrap();
        let cells: Vec<&str> = clat.split_whitespace().collect();
        assert_eq!(cells[..4], ["2", "-", "-", "-"], "{t}");
        assert_eq!(cells[4..7], ["6666.7", "13333.3", "26666.7"], "{t}");
        assert_eq!(cells[7..], ["-", "-", "-"], "{t}");
    }

    #[test]
    fn the_json_holds_the_means_and_every_guest() {
        let opts = opts("--quick --guests 2");
        let daemon_args = ["--poll-us".to_string(), "5".to_string()];
        let load = [0.5, f64::NAN];
        let text = json(
            &opts,
            "c \"x\"",
            &daemon_args,
            &[two_qemu_guests()],
            Duration::ZERO,
            load,
        );
        assert!(text.ends_with("}\n"));
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["command"], "c \"x\"");
        assert_eq!(v["daemon_args"], json!(["--poll-us", "5"]));
        assert_eq!(v["host_loadavg"], json!({"start": 0.5, "end": null}));
        let mean = &v["mean"][0];
        assert_eq!(
            (&mean["job"], &mean["guests"]),
            (&json!(jobs()[0]), &json!(2))
        );
        assert_eq!(mean["qemu"]["iops"], 400.0);
        assert_eq!(mean["qemu"]["cpu_us_per_io"], 1000.0);
        assert_eq!(
            mean["qemu"]["clat_us"],
            json!({"p50": 6666.667, "p99": 13333.333, "p99_9": 26666.667})
        );
        assert!(mean["ours"]["clat_us"]["p99"].is_null());
        // A configuration not booted: null, and so are its ratios.
        assert!(mean["ours"]["iops"].is_null() && mean["ours_over_qemu"].is_null());
        let group = &v["groups"][0];
        assert_eq!(
            (&group["mode"], &group["viommu"]),
            (&json!("strict"), &json!("qemu"))
        );
        let guest = &group["per_guest"][1];
        assert_eq!(guest["guest"], 2);
        assert_eq!(guest["results"][jobs()[0]]["cpu_s"], 0.3);
        assert_eq!(guest["results"][jobs()[0]]["cpu_us_per_io"], 1000.0);
        // A job without a window: its fio figures, no CPU.
        assert_eq!(guest["results"][jobs()[1]]["fio"]["iops"], 300.0);
        assert_eq!(
            guest["results"][jobs()[1]]["fio"]["clat_us"]["p99"],
            6666.667
        );
        assert!(guest["results"][jobs()[1]]["cpu_s"].is_null());
    }
}
