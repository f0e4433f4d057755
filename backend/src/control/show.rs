// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control socket's answers for people: aligned tables and `key:
//! value` lines (`vhost-user-iommu ctl` without `--json`).

use std::fmt::Write;

use serde_json::Value;

use super::histogram::Snapshot;
use super::protocol::{
    Counters, DomainRow, EndpointRow, Faults, Latency, Mappings, Page, Status, Translation,
};

/// Rows under a header, each column as wide as its widest cell; columns
/// of numbers (every cell starting with a digit) right-aligned, their
/// header too.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    let mut numeric = vec![!rows.is_empty(); header.len()];
    for r in rows {
        for (i, c) in r.iter().enumerate().take(header.len()) {
            widths[i] = widths[i].max(c.chars().count());
            numeric[i] &= c.starts_with(|ch: char| ch.is_ascii_digit());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, c) in cells.enumerate().take(header.len()) {
            if i > 0 {
                l.push_str("  ");
            }
            let w = widths[i];
            if numeric[i] {
                let _ = write!(l, "{c:>w$}");
            } else {
                let _ = write!(l, "{c:<w$}");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for r in rows {
        line(&mut r.iter().map(String::as_str));
    }
    if rows.is_empty() {
        out.push_str("(none)\n");
    }
    out
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// `r`, `w`, `rw`, with `mmio`.
pub fn perm(flags: u32) -> String {
    let mut s = String::new();
    if flags & 1 != 0 {
        s.push('r');
    }
    if flags & 2 != 0 {
        s.push('w');
    }
    if flags & 4 != 0 {
        s.push_str(if s.is_empty() { "mmio" } else { "+mmio" });
    }
    if s.is_empty() {
        s.push('-');
    }
    s
}

/// A byte count in the largest binary unit that divides it.
fn size(bytes: u128) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{} {unit}", bytes >> shift);
        }
    }
    format!("{bytes} B")
}

/// Nanoseconds, in the unit that reads best.
fn ns(v: u64) -> String {
    match v {
        0..1_000 => format!("{v} ns"),
        1_000..1_000_000 => format!("{:.1} µs", v as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} ms", v as f64 / 1e6),
        _ => format!("{:.2} s", v as f64 / 1e9),
    }
}

pub fn status(s: &Status) -> String {
    let up = s.uptime_ms / 1000;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "daemon:     vhost-user-iommu {} (process {}), {} mode",
        s.version, s.pid, s.mode
    );
    let _ = writeln!(
        o,
        "uptime:     {}h{:02}m{:02}s",
        up / 3600,
        up / 60 % 60,
        up % 60
    );
    let fe = match (s.front_end.connected, s.front_end.pid) {
        (true, Some(pid)) => format!("connected (process {pid})"),
        (true, None) => "connected (process unknown)".into(),
        (false, _) => "not connected".into(),
    };
    let _ = writeln!(
        o,
        "front-end:  {fe}; {} connections since start",
        s.front_end.connections
    );
    let m = &s.mirror;
    let mirror = match (m.configured, m.connected) {
        (false, _) => "none (no --mirror-socket)".into(),
        (true, false) => "no QEMU connected".into(),
        (true, true) => format!(
            "QEMU {}{}",
            m.pid
                .map_or("(process unknown)".into(), |p| format!("process {p}")),
            if m.synced {
                ", synced"
            } else {
                ", not synced yet"
            }
        ),
    };
    let _ = writeln!(o, "mirror:     {mirror}");
    let d = &s.device;
    let _ = writeln!(
        o,
        "device:     {} domains, {} mappings, {}/{} endpoints attached, bypass {}",
        d.domains,
        d.mappings,
        d.attached,
        d.endpoints,
        if d.bypass { "on" } else { "off" }
    );
    let _ = writeln!(
        o,
        "requests:   {} ok, {} failed",
        s.requests.ok, s.requests.failed
    );
    let restored = match &s.last_restore {
        None => "no saved state taken since start".into(),
        Some(r) => format!(
            "{} at {:.6} s: {} domains, {} mappings, {} endpoints attached",
            match r.source.as_str() {
                "state_file" => "the state file",
                "migration" => "a migration state",
                other => other,
            },
            r.time_us as f64 / 1e6,
            r.domains,
            r.mappings,
            r.attached
        ),
    };
    let _ = writeln!(o, "restored:   {restored}");
    let _ = writeln!(
        o,
        "control:    {} clients ({} accepted, {} refused, {} dropped)",
        s.control.clients, s.control.accepted, s.control.refused, s.control.dropped
    );
    o
}

fn next_hint<C: std::fmt::Display>(o: &mut String, next: Option<C>) {
    if let Some(n) = next {
        let _ = writeln!(o, "(more: --start {n})");
    }
}

pub fn endpoints(p: &Page<EndpointRow, u32>) -> String {
    let rows: Vec<Vec<String>> = p
        .entries
        .iter()
        .map(|e| vec![format!("{:#06x}", e.endpoint), opt(e.domain)])
        .collect();
    let mut o = table(&["ENDPOINT", "DOMAIN"], &rows);
    next_hint(&mut o, p.next.map(|n| format!("{n:#x}")));
    o
}

pub fn domains(p: &Page<DomainRow, u32>) -> String {
    let rows: Vec<Vec<String>> = p
        .entries
        .iter()
        .map(|d| {
            vec![
                d.domain.to_string(),
                if d.bypass { "bypass" } else { "translated" }.into(),
                d.endpoints.to_string(),
                d.mappings.to_string(),
            ]
        })
        .collect();
    let mut o = table(&["DOMAIN", "KIND", "ENDPOINTS", "MAPPINGS"], &rows);
    next_hint(&mut o, p.next);
    o
}

pub fn mappings(m: &Mappings) -> String {
    let rows: Vec<Vec<String>> = m
        .page
        .entries
        .iter()
        .map(|r| {
            vec![
                format!("{:#x}", r.virt_start),
                format!("{:#x}", r.virt_end),
                format!("{:#x}", r.phys_start),
                size(u128::from(r.virt_end - r.virt_start) + 1),
                perm(r.flags),
            ]
        })
        .collect();
    let mut o = format!(
        "domain {}: {} mappings, {} shown\n",
        m.domain,
        m.total,
        m.page.entries.len()
    );
    o.push_str(&table(&["IOVA", "IOVA END", "GPA", "SIZE", "PERM"], &rows));
    next_hint(&mut o, m.page.next.map(|n| format!("{n:#x}")));
    o
}

pub fn translation(t: &Translation) -> String {
    let at = format!(
        "endpoint {:#x} (domain {}) iova {:#x}",
        t.endpoint,
        opt(t.domain),
        t.iova
    );
    match (t.result.as_str(), t.gpa, t.len, t.flags) {
        ("mapped", Some(gpa), Some(len), Some(flags)) => format!(
            "{at} -> gpa {gpa:#x} ({} contiguous, {})\n",
            size(u128::from(len)),
            perm(flags)
        ),
        ("bypass", ..) => format!("{at} -> bypass (untranslated)\n"),
        _ => format!(
            "{at} -> fault ({})\n",
            t.reason.as_deref().unwrap_or("unknown")
        ),
    }
}

pub fn counters(c: &Counters) -> String {
    let rows: Vec<Vec<String>> = c
        .requests
        .iter()
        .map(|r| vec![r.kind.clone(), r.ok.to_string(), r.failed.to_string()])
        .collect();
    let mut o = table(&["REQUEST", "OK", "FAILED"], &rows);
    let q = serde_json::to_value(c.queue).unwrap_or(Value::Null);
    o.push('\n');
    let mut rows = Vec::new();
    if let Value::Object(m) = q {
        for (k, v) in m {
            rows.push(vec![k, v.to_string()]);
        }
    }
    if let Some(t) = c.table {
        rows.push(vec![
            "table_pages_in_use".into(),
            t.pages_in_use.to_string(),
        ]);
        rows.push(vec![
            "table_pages_in_limbo".into(),
            t.pages_in_limbo.to_string(),
        ]);
        rows.push(vec![
            "table_alloc_failures".into(),
            t.alloc_failures.to_string(),
        ]);
    }
    let e = c.events;
    rows.push(vec!["event_subscribers".into(), e.subscribers.to_string()]);
    rows.push(vec!["events_published".into(), e.published.to_string()]);
    rows.push(vec!["events_dropped".into(), e.dropped.to_string()]);
    let k = c.control;
    rows.push(vec!["control_commands".into(), k.commands.to_string()]);
    rows.push(vec!["control_errors".into(), k.errors.to_string()]);
    rows.push(vec!["control_dropped".into(), k.dropped.to_string()]);
    o.push_str(&table(&["COUNTER", "VALUE"], &rows));
    o
}

fn latency_row(kind: &str, h: &Snapshot) -> Vec<String> {
    vec![
        kind.into(),
        h.count.to_string(),
        ns(h.mean_ns),
        ns(h.p50_ns),
        ns(h.p90_ns),
        ns(h.p99_ns),
        ns(h.max_ns),
    ]
}

pub fn latency(l: &Latency) -> String {
    let mut rows: Vec<Vec<String>> = l
        .requests
        .iter()
        .filter(|k| k.histogram.count > 0)
        .map(|k| latency_row(&k.kind, &k.histogram))
        .collect();
    rows.push(latency_row("(batch)", &l.batches));
    let mut o = table(
        &["REQUEST", "COUNT", "MEAN", "P50<", "P90<", "P99<", "MAX"],
        &rows,
    );
    o.push_str("(percentiles: the upper bound of their power-of-two bucket)\n");
    o
}

pub fn faults(f: &Faults) -> String {
    let rows: Vec<Vec<String>> = f
        .faults
        .iter()
        .map(|r| {
            vec![
                format!("{:.3}", r.time_us as f64 / 1e6),
                format!("{:#x}", r.endpoint),
                format!("{:#x}", r.address),
                r.reason.clone(),
                perm(r.flags),
            ]
        })
        .collect();
    let mut o = format!(
        "{} faults since start, the last {} shown\n",
        f.total,
        rows.len()
    );
    o.push_str(&table(
        &["TIME (s)", "ENDPOINT", "ADDRESS", "REASON", "ACCESS"],
        &rows,
    ));
    o
}

/// One event line: its time, kind and fields.
pub fn event(v: &Value) -> String {
    let time = v["time_us"].as_u64().unwrap_or(0) as f64 / 1e6;
    let kind = v["event"].as_str().unwrap_or("?");
    let mut fields = String::new();
    if let Value::Object(m) = &v["data"] {
        for (k, val) in m {
            let shown = match (k.as_str(), val.as_u64()) {
                ("virt_start" | "virt_end" | "phys_start" | "address" | "endpoint", Some(n)) => {
                    format!("{n:#x}")
                }
                (_, _) => match val {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                },
            };
            let _ = write!(fields, " {k}={shown}");
        }
    }
    format!("{time:>12.6} {kind}{fields}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_right_align_numbers() {
        let t = table(
            &["A", "NAME"],
            &[
                vec!["1".into(), "x".into()],
                vec!["100".into(), "long".into()],
            ],
        );
        assert_eq!(t, "  A  NAME\n  1  x\n100  long\n");
    }

    #[test]
    fn status_says_which_saved_state_the_device_took_and_when() {
        use crate::control::protocol::{
            ControlCounters, DeviceSummary, FrontEnd, Mirror, RequestSummary, Restore,
        };
        let mut s = Status {
            version: "0.1.0".into(),
            mode: "emulated".into(),
            pid: 7,
            uptime_ms: 61_000,
            front_end: FrontEnd {
                connected: false,
                pid: None,
                connections: 0,
            },
            mirror: Mirror {
                configured: false,
                connected: false,
                pid: None,
                synced: false,
            },
            device: DeviceSummary {
                bypass: true,
                endpoints: 2,
                attached: 2,
                domains: 2,
                mappings: 3,
            },
            requests: RequestSummary { ok: 0, failed: 0 },
            control: ControlCounters::default(),
            last_restore: None,
        };
        assert!(
            status(&s).contains("restored:   no saved state taken since start\n"),
            "{}",
            status(&s)
        );
        s.last_restore = Some(Restore {
            source: "state_file".into(),
            time_us: 1_250,
            domains: 2,
            mappings: 3,
            attached: 2,
        });
        assert!(
            status(&s).contains(
                "restored:   the state file at 0.001250 s: 2 domains, 3 mappings, 2 endpoints attached\n"
            ),
            "{}",
            status(&s)
        );
    }

    #[test]
    fn sizes_permissions_and_times_read_as_people_write_them() {
        assert_eq!(size(0x1000), "4 KiB");
        assert_eq!(size(0x20_0000), "2 MiB");
        assert_eq!(size(0x1800), "6 KiB");
        assert_eq!(size(1 << 64), "16777216 TiB");
        assert_eq!(size(5), "5 B");
        assert_eq!(
            (perm(1), perm(3), perm(4), perm(0)),
            ("r".into(), "rw".into(), "mmio".into(), "-".into())
        );
        assert_eq!(ns(1500), "1.5 µs");
    }
}
