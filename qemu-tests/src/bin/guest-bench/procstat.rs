// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Host CPU readings from `/proc`: a process's CPU time (`/proc/PID/stat`),
//! the whole host's (`/proc/stat`) and its load average.

/// What the benchmark reads of a `/proc/PID/stat` line.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ProcStat {
    /// The command name (field 2, without its parentheses).
    comm: String,
    /// The process group (field 5).
    pgrp: u32,
    /// User plus system CPU time in clock ticks (fields 14 and 15).
    ticks: u64,
}

/// Parse a `/proc/PID/stat` line. The command name may hold spaces and
/// parentheses, so the fields after it are counted from the last `)`.
fn parse_proc_stat(line: &str) -> Result<ProcStat, String> {
    let bad = |why: String| format!("bad /proc/PID/stat line ({why}): {line:?}");
    let open = line.find('(').ok_or_else(|| bad("no '('".into()))?;
    let close = line
        .rfind(')')
        .filter(|&c| c > open)
        .ok_or_else(|| bad("no ')' after the '('".into()))?;
    // Field 3 (the state) is the first word after the command name.
    let rest: Vec<&str> = line[close + 1..].split_whitespace().collect();
    let field = |n: usize| -> Result<u64, String> {
        let w = rest
            .get(n - 3)
            .ok_or_else(|| bad(format!("no field {n}")))?;
        w.parse()
            .map_err(|_| bad(format!("field {n} is {w:?}, not a number")))
    };
    let pgrp = u32::try_from(field(5)?).map_err(|_| bad("process group out of range".into()))?;
    Ok(ProcStat {
        comm: line[open + 1..close].to_string(),
        pgrp,
        ticks: field(14)?.saturating_add(field(15)?),
    })
}

/// The CPU ticks (user + system) process `pid` has used so far.
pub fn process_ticks(pid: u32) -> Result<u64, String> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    Ok(parse_proc_stat(&text)?.ticks)
}

/// Clock ticks per second, the unit of `/proc` CPU times.
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf(3) only reads a system constant; it takes no pointer.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Among `(pid, /proc/PID/stat line)`s, the QEMU process of process group
/// `pgrp` (its command name starts with "qemu").
fn qemu_among<'a>(pgrp: u32, stats: impl IntoIterator<Item = (u32, &'a str)>) -> Option<u32> {
    stats
        .into_iter()
        .find(|(_, line)| {
            parse_proc_stat(line).is_ok_and(|s| s.pgrp == pgrp && s.comm.starts_with("qemu"))
        })
        .map(|(pid, _)| pid)
}

/// The QEMU process of process group `pgrp`, if it runs now.
pub fn find_qemu(pgrp: u32) -> Option<u32> {
    let mut stats = Vec::new();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(text) = std::fs::read_to_string(e.path().join("stat")) {
            stats.push((pid, text));
        }
    }
    qemu_among(pgrp, stats.iter().map(|(p, t)| (*p, t.as_str())))
}

/// The whole host's CPU time, in clock ticks, from `/proc/stat`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostCpu {
    /// Not idle and not waiting for I/O.
    busy: u64,
    total: u64,
}

/// The `cpu` line of `/proc/stat`: user nice system idle iowait irq softirq
/// steal (guest and guest_nice are part of user and nice already).
fn parse_host_cpu(text: &str) -> Result<HostCpu, String> {
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or("no \"cpu \" line in /proc/stat")?;
    let values = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|w| w.parse::<u64>())
        .collect::<Result<Vec<u64>, _>>()
        .map_err(|_| format!("bad /proc/stat line: {line:?}"))?;
    if values.len() < 4 {
        return Err(format!("short /proc/stat line: {line:?}"));
    }
    let total: u64 = values.iter().sum();
    let idle = values[3] + values.get(4).copied().unwrap_or(0);
    Ok(HostCpu {
        busy: total.saturating_sub(idle),
        total,
    })
}

/// The whole host's CPU time now.
pub fn host_cpu() -> Result<HostCpu, String> {
    let text = std::fs::read_to_string("/proc/stat")
        .map_err(|e| format!("cannot read /proc/stat: {e}"))?;
    parse_host_cpu(&text)
}

/// The host's busy fraction between two readings; NaN if no time passed.
pub fn busy_fraction(from: HostCpu, to: HostCpu) -> f64 {
    let total = to.total.saturating_sub(from.total);
    match total {
        0 => f64::NAN,
        _ => to.busy.saturating_sub(from.busy) as f64 / total as f64,
    }
}

/// The host's 1-minute load average: other work on the host's two cores
/// shows in every figure, so the run reports it.
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// The context switches, voluntary and not, of one thread's
/// `/proc/PID/task/TID/status`; `None` if it has no such lines.
fn parse_switches(status: &str) -> Option<u64> {
    let count = |key: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
    };
    Some(count("voluntary_ctxt_switches:")? + count("nonvoluntary_ctxt_switches:")?)
}

/// The context switches of every thread process `pid` has now (a thread
/// that has exited no longer counts: readings are taken while the guest
/// runs, whose threads live as long as it does).
pub fn process_switches(pid: u32) -> Result<u64, String> {
    let dir = format!("/proc/{pid}/task");
    let tasks = std::fs::read_dir(&dir).map_err(|e| format!("cannot read {dir}: {e}"))?;
    let mut sum = 0;
    for t in tasks.flatten() {
        // A thread may end between the listing and the read.
        if let Ok(text) = std::fs::read_to_string(t.path().join("status")) {
            sum += parse_switches(&text).unwrap_or(0);
        }
    }
    Ok(sum)
}

/// A guest's CPU time so far, in clock ticks: its QEMU's and its daemon's;
/// and their threads' context switches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ticks {
    pub qemu: u64,
    pub daemon: u64,
    /// Context switches of its QEMU's and its daemon's threads.
    pub switches: u64,
}

/// A guest's host CPU time over a window, in seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuTime {
    pub qemu: f64,
    /// Its daemon's (ours only; 0 otherwise).
    pub daemon: f64,
    /// Context switches of its QEMU's and daemon's threads in the window:
    /// each hand-off between a vCPU and another thread on its CPU costs
    /// two (docs/shared-host.md).
    pub switches: f64,
}

impl CpuTime {
    /// The CPU time between two readings, at `ticks_per_s` clock ticks per
    /// second.
    pub fn between(from: Ticks, to: Ticks, ticks_per_s: f64) -> CpuTime {
        CpuTime {
            qemu: to.qemu.saturating_sub(from.qemu) as f64 / ticks_per_s,
            daemon: to.daemon.saturating_sub(from.daemon) as f64 / ticks_per_s,
            switches: to.switches.saturating_sub(from.switches) as f64,
        }
    }

    pub fn total(&self) -> f64 {
        self.qemu + self.daemon
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A /proc/PID/stat line with `comm`, process group `pgrp`, utime 1234
    /// and stime 56.
    fn stat_line(pid: u32, comm: &str, pgrp: u32) -> String {
        format!(
            "{pid} ({comm}) S 1 {pgrp} {pgrp} 0 -1 4194560 1500 0 0 0 1234 56 0 0 20 0 3 0 \
             12345 1234567890 5000 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0"
        )
    }

    #[test]
    fn a_threads_switches_are_its_voluntary_and_involuntary_ones() {
        let status = "Name:\tqemu-system-x86\nState:\tS (sleeping)\n\
                      voluntary_ctxt_switches:\t1200\nnonvoluntary_ctxt_switches:\t34\n";
        assert_eq!(parse_switches(status), Some(1234));
        assert_eq!(
            parse_switches("Name:\tx\nvoluntary_ctxt_switches:\t5\n"),
            None
        );
        // This very process has at least one thread that has switched.
        assert!(process_switches(std::process::id()).unwrap() > 0);
        assert!(process_switches(u32::MAX).is_err());
    }

    #[test]
    fn proc_stat_fields_count_from_the_last_parenthesis() {
        let s = parse_proc_stat(&stat_line(42, "qemu-system-x86", 40)).unwrap();
        assert_eq!(
            s,
            ProcStat {
                comm: "qemu-system-x86".into(),
                pgrp: 40,
                ticks: 1290
            }
        );
        // A command name with spaces and parentheses of its own.
        let s = parse_proc_stat(&stat_line(7, "a) b (c) 9 9", 3)).unwrap();
        assert_eq!(
            (s.comm.as_str(), s.pgrp, s.ticks),
            ("a) b (c) 9 9", 3, 1290)
        );
        for bad in [
            "",
            "42 qemu S 1 2",
            "42 )qemu( S 1 2 3",
            "42 (qemu) S 1",
            "42 (qemu) S 1 x 3 0 -1 0 0 0 0 0 1 2",
        ] {
            assert!(parse_proc_stat(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_qemu_of_a_process_group_is_found_by_its_name() {
        let lines = [
            (10, stat_line(10, "run-guest.sh", 10)),
            (11, stat_line(11, "timeout", 10)),
            (12, stat_line(12, "qemu-system-x86", 99)),
            (13, stat_line(13, "qemu-system-x86", 10)),
            (14, stat_line(14, "tee", 10)),
        ];
        let stats = || lines.iter().map(|(p, l)| (*p, l.as_str()));
        assert_eq!(qemu_among(10, stats()), Some(13));
        assert_eq!(qemu_among(99, stats()), Some(12));
        assert_eq!(qemu_among(5, stats()), None);
    }

    #[test]
    fn host_cpu_is_busy_over_total_without_idle_and_iowait() {
        let a = parse_host_cpu("cpu  100 0 50 800 50 0 0 0 30 0\ncpu0 1 2 3 4\n").unwrap();
        assert_eq!(
            a,
            HostCpu {
                busy: 150,
                total: 1000
            }
        );
        let b = parse_host_cpu("cpu  250 0 100 850 50 0 0 0 90 0\n").unwrap();
        assert_eq!(busy_fraction(a, b), 0.8);
        assert!(busy_fraction(a, a).is_nan());
        assert!(parse_host_cpu("cpu0 1 2 3 4\n").is_err());
        assert!(parse_host_cpu("cpu  1 2 x 4\n").is_err());
        assert!(parse_host_cpu("cpu  1 2\n").is_err());
    }

    #[test]
    fn cpu_time_is_ticks_between_readings_in_seconds() {
        let cpu = |qemu, daemon, switches| CpuTime {
            qemu,
            daemon,
            switches,
        };
        let from = Ticks {
            qemu: 100,
            daemon: 7,
            switches: 1000,
        };
        let to = Ticks {
            qemu: 250,
            daemon: 32,
            switches: 1600,
        };
        let c = CpuTime::between(from, to, 100.0);
        assert_eq!(c, cpu(1.5, 0.25, 600.0));
        assert_eq!(c.total(), 1.75);
        // A reading that went backwards (cannot happen) counts nothing.
        assert_eq!(CpuTime::between(to, from, 100.0), cpu(0.0, 0.0, 0.0));
    }
}
