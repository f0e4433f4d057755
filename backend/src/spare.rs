// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! How much CPU the host has to spare, measured: the idle time of the
//! daemon's CPUs plus the worker's own CPU time, per unit of wall time.
//!
//! The gaps a polling worker finds between its looks at the ring
//! (src/poll.rs) show that it was off its CPU, not why: a guest's QEMU
//! thread that ran a moment on an otherwise idle host makes the same gap as
//! a host whose CPUs all run vCPUs. Idle time tells them apart. The
//! worker's own time counts as spare too: a poller holds a CPU it would give
//! up. Measured on this project's 2-CPU test machine: one busy guest leaves
//! about one CPU to spare, with or without polling; two leave under half.
//!
//! Idle time comes from cpuidle (`/sys/devices/system/cpu/cpuN/cpuidle/
//! stateK/time`, microseconds), else from `/proc/stat` (clock ticks: looks
//! must then be further apart to mean anything).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

/// A host with at least this many CPUs' worth to spare is not busy.
pub const SPARE_MIN: f64 = 0.75;
/// Looks closer together than this reuse the last figure.
const MIN_INTERVAL: Duration = Duration::from_millis(5);
/// ... this, when idle time is counted in clock ticks (`/proc/stat`).
const MIN_INTERVAL_TICKS: Duration = Duration::from_millis(50);
/// A last look older than this says nothing of now.
const STALE: Duration = Duration::from_millis(200);

/// One reading of the counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    pub at: Instant,
    /// Idle time of the CPUs, summed.
    pub idle: Duration,
    /// The calling thread's CPU time.
    pub own: Duration,
}

/// CPUs' worth to spare between two samples.
pub fn spare_between(a: &Sample, b: &Sample) -> f64 {
    let wall = b.at.saturating_duration_since(a.at).as_secs_f64();
    if wall <= 0.0 {
        return 0.0;
    }
    let idle = b.idle.saturating_sub(a.idle).as_secs_f64();
    let own = b.own.saturating_sub(a.own).as_secs_f64();
    (idle + own) / wall
}

/// Where idle time is read from.
#[derive(Debug)]
enum Source {
    /// cpuidle `time` files, microseconds.
    Cpuidle(Vec<File>),
    /// `/proc/stat`, the `cpuN` lines of these CPUs, clock ticks.
    ProcStat(File, Vec<usize>),
}

/// The spare-CPU meter of one thread (its own time is the caller's).
#[derive(Debug)]
pub struct SpareCpu {
    source: Source,
    last: Option<Sample>,
    latest: Option<f64>,
    buf: Vec<u8>,
}

impl SpareCpu {
    /// A meter of `cpus`' idle time.
    pub fn open(cpus: &[usize]) -> io::Result<Self> {
        let mut files = Vec::new();
        for &cpu in cpus {
            for state in 0.. {
                let path = format!("/sys/devices/system/cpu/cpu{cpu}/cpuidle/state{state}/time");
                match File::open(&path) {
                    Ok(f) => files.push(f),
                    Err(_) => break,
                }
            }
        }
        let source = if files.is_empty() {
            Source::ProcStat(File::open("/proc/stat")?, cpus.to_vec())
        } else {
            Source::Cpuidle(files)
        };
        Ok(Self {
            source,
            last: None,
            latest: None,
            buf: Vec::with_capacity(4096),
        })
    }

    /// CPUs' worth to spare since the previous look (at least a few
    /// milliseconds back: a closer look returns the last figure). `None`
    /// when the previous look is missing or too old to mean anything (the
    /// baseline is then taken now), or the counters cannot be read.
    pub fn look(&mut self, now: Instant) -> Option<f64> {
        let min = match self.source {
            Source::Cpuidle(_) => MIN_INTERVAL,
            Source::ProcStat(..) => MIN_INTERVAL_TICKS,
        };
        if let Some(last) = self.last {
            let age = now.saturating_duration_since(last.at);
            if age < min {
                return self.latest;
            }
        }
        let sample = Sample {
            at: now,
            idle: self.idle().ok()?,
            own: thread_cpu_time(),
        };
        self.latest = match self.last.replace(sample) {
            Some(last) if now.saturating_duration_since(last.at) <= STALE => {
                Some(spare_between(&last, &sample))
            }
            _ => None,
        };
        self.latest
    }

    fn idle(&mut self) -> io::Result<Duration> {
        match &self.source {
            Source::Cpuidle(files) => {
                let mut us = 0u64;
                for f in files {
                    us += read_u64(f, &mut self.buf)?;
                }
                Ok(Duration::from_micros(us))
            }
            Source::ProcStat(f, cpus) => {
                read_all(f, &mut self.buf)?;
                let text = String::from_utf8_lossy(&self.buf);
                let ticks = proc_stat_idle_ticks(&text, cpus);
                // SAFETY: sysconf only reads a system constant.
                let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
                Ok(Duration::from_micros(ticks * 1_000_000 / hz))
            }
        }
    }
}

/// Idle and iowait ticks of `cpus` in `/proc/stat`'s text.
pub fn proc_stat_idle_ticks(text: &str, cpus: &[usize]) -> u64 {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let cpu: usize = f.next()?.strip_prefix("cpu")?.parse().ok()?;
            if !cpus.contains(&cpu) {
                return None;
            }
            let v: Vec<u64> = f.take(5).filter_map(|x| x.parse().ok()).collect();
            // user nice system idle iowait
            Some(v.get(3)? + v.get(4).copied().unwrap_or(0))
        })
        .sum()
}

fn read_all(f: &File, buf: &mut Vec<u8>) -> io::Result<()> {
    buf.clear();
    buf.resize(buf.capacity().max(4096), 0);
    let mut n = 0;
    loop {
        let got = f.read_at(&mut buf[n..], n as u64)?;
        if got == 0 {
            break;
        }
        n += got;
        if n == buf.len() {
            buf.resize(n * 2, 0);
        }
    }
    buf.truncate(n);
    Ok(())
}

fn read_u64(f: &File, buf: &mut Vec<u8>) -> io::Result<u64> {
    read_all(f, buf)?;
    std::str::from_utf8(buf)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not a number"))
}

/// The calling thread's CPU time.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, a live local.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(at: Instant, idle_ms: u64, own_ms: u64) -> Sample {
        Sample {
            at,
            idle: Duration::from_millis(idle_ms),
            own: Duration::from_millis(own_ms),
        }
    }

    #[test]
    fn spare_is_idle_plus_own_time_per_wall_time() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(20);
        // One CPU idle all along, the other running the poller half of it.
        assert_eq!(spare_between(&s(t0, 100, 5), &s(t1, 120, 15)), 1.5);
        // Two CPUs busy with others.
        assert_eq!(spare_between(&s(t0, 100, 5), &s(t1, 100, 5)), 0.0);
        // Backwards counters or no time: nothing to spare.
        assert_eq!(spare_between(&s(t1, 100, 5), &s(t0, 90, 5)), 0.0);
        assert_eq!(spare_between(&s(t0, 1, 1), &s(t0, 2, 2)), 0.0);
    }

    #[test]
    fn proc_stat_lines_of_the_cpus_asked_are_summed() {
        let text = "cpu  10 0 5 1000 7 0 0\ncpu0 5 0 2 400 3 0 0\ncpu1 5 0 3 600 4 0 0\nintr 1\n";
        assert_eq!(proc_stat_idle_ticks(text, &[0, 1]), 1007);
        assert_eq!(proc_stat_idle_ticks(text, &[1]), 604);
        assert_eq!(proc_stat_idle_ticks(text, &[2]), 0);
    }

    #[test]
    fn looks_give_a_figure_once_there_is_a_recent_baseline() {
        let mut m = SpareCpu::open(&[0]).unwrap();
        let t0 = Instant::now();
        assert_eq!(m.look(t0), None, "no baseline yet");
        std::thread::sleep(Duration::from_millis(60));
        let t1 = Instant::now();
        let spare = m.look(t1).expect("a figure");
        assert!((0.0..=2.0).contains(&spare), "{spare}");
        assert_eq!(
            m.look(t1 + Duration::from_millis(1)),
            Some(spare),
            "too close: reused"
        );
        assert_eq!(m.look(t1 + Duration::from_secs(1)), None, "stale baseline");
    }
}
