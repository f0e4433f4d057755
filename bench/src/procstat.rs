// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What a process cost, from `/proc`: CPU time (`/proc/PID/stat` utime +
//! stime, all threads) and context switches (voluntary + involuntary,
//! summed over `/proc/PID/task/*/status`).

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A `/proc` file could not be read or understood.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// Reading failed (the process is gone, or not ours to see).
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The contents were not as proc(5) describes.
    #[error("{path}: no {what}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The missing field.
        what: &'static str,
    },
}

/// A process's counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    /// User + system CPU time of all its threads.
    pub cpu: Duration,
    /// Voluntary + involuntary context switches of its live threads.
    pub context_switches: u64,
}

impl Sample {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &Sample) -> Sample {
        Sample {
            cpu: self.cpu.saturating_sub(earlier.cpu),
            context_switches: self
                .context_switches
                .saturating_sub(earlier.context_switches),
        }
    }
}

fn read(path: &Path) -> Result<String, ProcError> {
    std::fs::read_to_string(path).map_err(|source| ProcError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Clock ticks per second, the unit of utime and stime.
fn clock_ticks() -> u64 {
    // SAFETY: sysconf takes an integer and touches no memory of ours.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz).ok().filter(|&hz| hz > 0).unwrap_or(100)
}

/// utime + stime, in ticks, from the contents of `/proc/PID/stat`.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold anything,
    // spaces and ')' included: fields are counted after its last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    // Field 3 (state) is the first after the name; utime and stime are 14
    // and 15.
    let utime: u64 = fields.nth(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// voluntary + nonvoluntary context switches from a `status` file.
pub fn parse_status_switches(status: &str) -> Option<u64> {
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
    };
    Some(field("voluntary_ctxt_switches:")? + field("nonvoluntary_ctxt_switches:")?)
}

/// Resident memory in bytes, from the `VmRSS:` line of a `status` file.
pub fn parse_status_rss(status: &str) -> Option<u64> {
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    kb.checked_mul(1024)
}

/// `pid`'s resident memory now, in bytes.
pub fn rss_bytes(pid: u32) -> Result<u64, ProcError> {
    let path = PathBuf::from(format!("/proc/{pid}/status"));
    parse_status_rss(&read(&path)?).ok_or(ProcError::Parse {
        path,
        what: "VmRSS",
    })
}

/// Read `pid`'s counters now.
pub fn sample(pid: u32) -> Result<Sample, ProcError> {
    let dir = PathBuf::from(format!("/proc/{pid}"));
    let stat_path = dir.join("stat");
    let ticks = parse_stat_ticks(&read(&stat_path)?).ok_or(ProcError::Parse {
        path: stat_path,
        what: "utime/stime",
    })?;
    let hz = clock_ticks();
    let cpu =
        Duration::from_secs(ticks / hz) + Duration::from_nanos((ticks % hz) * 1_000_000_000 / hz);

    let task_dir = dir.join("task");
    let tasks = std::fs::read_dir(&task_dir).map_err(|source| ProcError::Read {
        path: task_dir.clone(),
        source,
    })?;
    let mut context_switches = 0;
    for task in tasks.flatten() {
        let path = task.path().join("status");
        // A thread that ended since the directory was listed counts no more.
        let Ok(status) = std::fs::read_to_string(&path) else {
            continue;
        };
        context_switches += parse_status_switches(&status).ok_or(ProcError::Parse {
            path,
            what: "voluntary_ctxt_switches/nonvoluntary_ctxt_switches",
        })?;
    }
    Ok(Sample {
        cpu,
        context_switches,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let stat = "1234 (vhost) user (x)) S 1 1234 1234 0 -1 4194560 100 0 0 0 \
                    250 75 0 0 20 0 3 0 12345 1000000 200 18446744073709551615";
        assert_eq!(parse_stat_ticks(stat), Some(325));
        assert_eq!(parse_stat_ticks("1 (x) S 1 2"), None);
    }

    #[test]
    fn switches_are_voluntary_plus_involuntary() {
        let status = "Name:\tvhost-user-iomm\nvoluntary_ctxt_switches:\t120\n\
                      nonvoluntary_ctxt_switches:\t7\n";
        assert_eq!(parse_status_switches(status), Some(127));
        assert_eq!(parse_status_switches("Name:\tx\n"), None);
    }

    #[test]
    fn rss_is_read_in_kilobytes() {
        let status = "Name:\tx\nVmRSS:\t    2048 kB\nThreads:\t1\n";
        assert_eq!(parse_status_rss(status), Some(2 << 20));
        assert_eq!(parse_status_rss("Name:\tx\n"), None);
        assert!(rss_bytes(std::process::id()).unwrap() > 0);
    }

    #[test]
    fn this_process_can_be_sampled() {
        let before = sample(std::process::id()).unwrap();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        let after = sample(std::process::id()).unwrap();
        assert!(after.cpu >= before.cpu);
        assert!(after.since(&before).cpu < Duration::from_secs(60));
    }
}
