// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The results: the `--json` document and the table on stdout.

use std::fmt::Write as _;

use serde::Serialize;

use crate::histogram::Latency;
use crate::progress::rate;
use crate::run::LegOutcome;
use crate::scaling::ScalingPoint;

/// The whole run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// `vhost-user-iommu-bench`.
    pub tool: &'static str,
    /// This program's version.
    pub version: &'static str,
    /// What was asked for.
    pub settings: Settings,
    /// One entry per workload, in the order they ran (none with
    /// `--scaling`).
    pub workloads: Vec<WorkloadReport>,
    /// With `--scaling`: one entry per number of existing mappings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scaling: Option<Vec<ScalingPoint>>,
}

/// The command line's values, as used.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    /// Measured seconds per leg and workload.
    pub seconds: f64,
    /// Warm-up seconds per leg and workload.
    pub warmup_seconds: f64,
    /// Requests per kick in `batch`.
    pub qd: usize,
    /// Domains in `domains`.
    pub domains: u32,
    /// Bytes per mapping in `batch` and `domains`.
    pub size: u64,
    /// `--smoke` was given.
    pub smoke: bool,
    /// The daemon: `spawned PATH` or `external SOCKET` (empty with
    /// `--scaling`, which runs no daemon).
    pub daemon: String,
    /// `--qemu-leg`: each workload also ran with a QEMU stand-in on the
    /// daemon's translation mirror, checking every MAP/UNMAP in the table.
    pub qemu_leg: bool,
    /// `--notifiers`: and once more with the workload's endpoints having
    /// IOMMU notifiers (every MAP/UNMAP a record QEMU acknowledges).
    pub notifiers: bool,
    /// The daemon's mirror socket, with `--qemu-leg`.
    pub mirror_socket: Option<String>,
    /// `--scaling` was given.
    pub scaling: bool,
}

/// One workload on both legs.
#[derive(Clone, Debug, Serialize)]
pub struct WorkloadReport {
    /// Its name (`strict-4k`, ...).
    pub name: &'static str,
    /// What it sends.
    pub description: String,
    /// Most requests in one kick.
    pub requests_per_kick: usize,
    /// Through the daemon, over vhost-user (no QEMU on its mirror).
    pub daemon: LegReport,
    /// The device model called in-process.
    pub direct: LegReport,
    /// daemon ÷ direct.
    pub ratio: Ratio,
    /// With `--qemu-leg`: through the daemon with a QEMU stand-in.
    pub qemu: Vec<QemuReport>,
}

/// One workload through the daemon with a QEMU stand-in on its mirror.
#[derive(Clone, Debug, Serialize)]
pub struct QemuReport {
    /// `+qemu` or `+qemu+notif`.
    pub label: &'static str,
    /// Whether the workload's endpoints had IOMMU notifiers.
    pub notifiers: bool,
    /// The numbers, as for the daemon leg.
    pub daemon: LegReport,
    /// This ÷ direct.
    pub ratio: Ratio,
}

/// One leg's numbers.
#[derive(Clone, Debug, Serialize)]
pub struct LegReport {
    /// Requests measured.
    pub requests: u64,
    /// Measured wall time.
    pub seconds: f64,
    /// Throughput.
    pub req_per_s: f64,
    /// Latency from the kick to the completion, in nanoseconds.
    pub latency_ns: Latency,
    /// The daemon's CPU time (all threads) per request, if watched.
    pub cpu_ns_per_req: Option<f64>,
    /// The daemon's context switches per request, if watched.
    pub context_switches_per_req: Option<f64>,
    /// Notifications (kicks) the driver sent per request.
    pub kicks_per_req: Option<f64>,
    /// Allocations of this process per request, if counted (the direct
    /// leg: the device model's own).
    pub allocations_per_req: Option<f64>,
    /// With a QEMU stand-in: translations checked through the shared table.
    pub translation_checks: Option<u64>,
    /// With a QEMU stand-in: MAP/UNMAP records QEMU received per request.
    pub mirror_records_per_req: Option<f64>,
}

/// How much more the daemon takes than the device model alone.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Ratio {
    /// Wall time per request: direct req/s ÷ daemon req/s.
    pub time_per_req: f64,
    /// The daemon's CPU time per request ÷ the direct leg's time per
    /// request, if the daemon was watched.
    pub cpu_per_req: Option<f64>,
    /// Median latency.
    pub p50: f64,
}

fn per_req(total: f64, requests: u64) -> f64 {
    if requests == 0 {
        0.0
    } else {
        total / requests as f64
    }
}

impl LegReport {
    /// The report of one leg's outcome.
    pub fn of(o: &LegOutcome) -> Self {
        LegReport {
            requests: o.requests,
            seconds: o.elapsed.as_secs_f64(),
            req_per_s: rate(o.requests, o.elapsed),
            latency_ns: Latency::of(&o.latency),
            cpu_ns_per_req: o.cost.map(|c| per_req(c.cpu.as_nanos() as f64, o.requests)),
            context_switches_per_req: o
                .cost
                .map(|c| per_req(c.context_switches as f64, o.requests)),
            kicks_per_req: o.notifications.map(|n| per_req(n as f64, o.requests)),
            allocations_per_req: o.allocations.map(|n| per_req(n as f64, o.requests)),
            translation_checks: o.mirror.map(|m| m.checks),
            mirror_records_per_req: o
                .mirror
                .map(|m| per_req(m.map_unmap_records as f64, o.requests)),
        }
    }

    /// Wall nanoseconds per request.
    fn ns_per_req(&self) -> f64 {
        if self.req_per_s > 0.0 {
            1e9 / self.req_per_s
        } else {
            f64::INFINITY
        }
    }
}

fn quotient(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::INFINITY
    }
}

impl Ratio {
    /// `daemon` compared with `direct`.
    pub fn of(daemon: &LegReport, direct: &LegReport) -> Self {
        Ratio {
            time_per_req: quotient(daemon.ns_per_req(), direct.ns_per_req()),
            cpu_per_req: daemon
                .cpu_ns_per_req
                .map(|cpu| quotient(cpu, direct.ns_per_req())),
            p50: quotient(daemon.latency_ns.p50 as f64, direct.latency_ns.p50 as f64),
        }
    }
}

fn us(ns: f64) -> String {
    format!("{:.2}", ns / 1000.0)
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map(f).unwrap_or_else(|| "-".into())
}

/// Columns of `rows` under `header`, the first left-aligned, the others
/// right-aligned, two spaces apart.
fn layout(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        for (i, (cell, &w)) in cells.zip(&width).enumerate() {
            if i == 0 {
                let _ = write!(out, "{cell:<w$}");
            } else {
                let _ = write!(out, "  {cell:>w$}");
            }
        }
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// The daemon-side cells of a row: name, QD, throughput, latencies, cost.
fn daemon_cells(name: String, qd: usize, d: &LegReport) -> Vec<String> {
    vec![
        name,
        qd.to_string(),
        format!("{:.0}", d.req_per_s),
        us(d.latency_ns.p50 as f64),
        us(d.latency_ns.p99 as f64),
        us(d.latency_ns.p99_9 as f64),
        opt(d.cpu_ns_per_req, us),
        opt(d.context_switches_per_req, |v| format!("{v:.3}")),
        opt(d.kicks_per_req, |v| format!("{v:.3}")),
    ]
}

/// The table printed at the end: one row per workload, and one per QEMU
/// variant under it; latencies in µs.
pub fn table(report: &Report) -> String {
    let qemu = report.settings.qemu_leg;
    let mut header = vec![
        "workload", "QD", "req/s", "p50", "p99", "p99.9", "CPU/req", "csw/req", "kick/req",
    ];
    if qemu {
        header.push("rec/req");
    }
    header.extend(["direct req/s", "direct p50", "alloc/req", "x time", "x CPU"]);
    let ratio_cells = |r: &Ratio| {
        [
            format!("{:.1}", r.time_per_req),
            opt(r.cpu_per_req, |v| format!("{v:.1}")),
        ]
    };
    let mut rows = Vec::new();
    for w in &report.workloads {
        let x = &w.direct;
        let mut row = daemon_cells(w.name.to_string(), w.requests_per_kick, &w.daemon);
        if qemu {
            row.push("-".into());
        }
        row.extend([
            format!("{:.0}", x.req_per_s),
            us(x.latency_ns.p50 as f64),
            opt(x.allocations_per_req, |v| format!("{v:.2}")),
        ]);
        row.extend(ratio_cells(&w.ratio));
        rows.push(row);
        for q in &w.qemu {
            let name = format!("{} {}", w.name, q.label);
            let mut row = daemon_cells(name, w.requests_per_kick, &q.daemon);
            row.push(opt(q.daemon.mirror_records_per_req, |v| format!("{v:.3}")));
            row.extend([String::new(), String::new(), String::new()]);
            row.extend(ratio_cells(&q.ratio));
            rows.push(row);
        }
    }
    let mut out = layout(&header, &rows);
    out.push_str(
        "\nlatency (p50, p99, p99.9, direct p50) and CPU/req in µs; daemon columns: through the \
         daemon over vhost-user,\nthe driver kicking then busy-polling the used ring; CPU/req and \
         csw/req: the daemon process's CPU time and\ncontext switches per request; direct: the \
         same requests on the daemon's device model in-process;\nalloc/req: heap allocations per \
         request in the direct leg (after warm-up);\nx time = daemon time per request \
         ÷ direct, x CPU = daemon CPU per request ÷ direct time per request.\n",
    );
    if qemu {
        let checks: u64 = report
            .workloads
            .iter()
            .flat_map(|w| &w.qemu)
            .filter_map(|q| q.daemon.translation_checks)
            .sum();
        let _ = write!(
            out,
            "+qemu: a QEMU stand-in on the daemon's mirror (the daemon's first row has none \
             connected); after every MAP/UNMAP\nthe driver walked the shared table for the mapped \
             IOVAs ({checks} walks, all as expected); +notif: the endpoints have\nIOMMU notifiers, \
             so each MAP/UNMAP is also a record QEMU acknowledges before the request completes;\n\
             rec/req: MAP/UNMAP records QEMU received per request.\n"
        );
    }
    out
}

/// The `--scaling` table: one row per number of existing mappings; times
/// in ns.
pub fn scaling_table(points: &[ScalingPoint]) -> String {
    let header = [
        "mappings",
        "dev map/unmap p50",
        "p99",
        "alloc/req",
        "dev translate",
        "table map/unmap p50",
        "p99",
        "table translate",
        "table pages",
        "RSS MiB",
    ];
    let rows: Vec<Vec<String>> = points
        .iter()
        .map(|p| {
            vec![
                p.existing.to_string(),
                p.device.map_unmap_ns.p50.to_string(),
                p.device.map_unmap_ns.p99.to_string(),
                opt(p.device.allocations_per_req, |v| format!("{v:.2}")),
                format!("{:.1}", p.device.translate_ns),
                p.table.map_unmap_ns.p50.to_string(),
                p.table.map_unmap_ns.p99.to_string(),
                format!("{:.1}", p.table.translate_ns),
                p.table_pages.to_string(),
                opt(p.rss_bytes.map(|b| b as f64), |b| {
                    format!("{:.0}", b / f64::from(1 << 20))
                }),
            ]
        })
        .collect();
    let mut out = layout(&header, &rows);
    out.push_str(
        "\nmappings: 4 KiB mappings already in the domain (every other page); times in ns; \
         map/unmap: per MAP or UNMAP request\nof a new 4 KiB mapping in a random free page (QD1); \
         translate: per translation of a random existing IOVA;\ndev: the daemon's device model \
         (handle_request, Device::translate); table: the shared translation table alone\n\
         (TranslationTable::map/unmap, table::translate); alloc/req: heap allocations per device \
         MAP or UNMAP;\nRSS: this process with both filled.\n",
    );
    out
}
