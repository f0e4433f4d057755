// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One status line per workload on stderr, rewritten in place at most every
//! half second when stderr is a terminal; elsewhere (CI logs) only the
//! final line of each workload is printed.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// How often the line may change.
const PERIOD: Duration = Duration::from_millis(500);

/// The status line of one workload.
#[derive(Debug)]
pub struct Progress {
    workload: &'static str,
    live: bool,
    next: Instant,
}

impl Progress {
    /// A line for `workload`.
    pub fn new(workload: &'static str) -> Self {
        Progress {
            workload,
            live: std::io::stderr().is_terminal(),
            next: Instant::now(),
        }
    }

    /// Show that leg `leg` has run `requests` requests in `elapsed` of
    /// `total`, if the line has not changed for half a second.
    pub fn update(
        &mut self,
        now: Instant,
        leg: &str,
        requests: u64,
        elapsed: Duration,
        total: Duration,
    ) {
        if !self.live || now < self.next {
            return;
        }
        self.next = now + PERIOD;
        eprint!(
            "\r{:<11} {leg:<7} {:>5.1}/{:.1} s {:>10} req {:>12.0} req/s\x1b[K",
            self.workload,
            elapsed.as_secs_f64(),
            total.as_secs_f64(),
            requests,
            rate(requests, elapsed)
        );
    }

    /// End the line with the workload's results.
    pub fn finish(&mut self, daemon_rate: f64, direct_rate: f64) {
        let (lead, clear) = if self.live {
            ("\r", "\x1b[K")
        } else {
            ("", "")
        };
        eprintln!(
            "{lead}{:<11} daemon {daemon_rate:>12.0} req/s   direct {direct_rate:>12.0} req/s{clear}",
            self.workload
        );
    }
}

/// Requests per second.
pub fn rate(requests: u64, elapsed: Duration) -> f64 {
    let s = elapsed.as_secs_f64();
    if s > 0.0 {
        requests as f64 / s
    } else {
        0.0
    }
}
