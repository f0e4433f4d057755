// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon's open files, read from `/proc`, for the leak checks of the
//! hostile-front-end and fault-injection tests.

use std::time::{Duration, Instant};

/// How many files process `pid` has open (0 once it has gone).
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// `pid`'s open-file count once it has not changed for half a second
/// (giving up after ten): its idle count, with the last front-end's
/// teardown, which the daemon runs on its own time after the socket closes,
/// finished.
pub fn quiet_fds(pid: u32) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = open_fds(pid);
    let mut since = Instant::now();
    while since.elapsed() < Duration::from_millis(500) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        let n = open_fds(pid);
        if n != last {
            last = n;
            since = Instant::now();
        }
    }
    last
}
