// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A guest's output as the host reads it while the guest runs: the
//! `VUI-READY` lines of the go/ready sync (`fio.sh`, `vui.sync=1`) and the
//! first `VUI-FAIL`.

use std::fs::File;
use std::io::Read as _;
use std::path::Path;

/// The name of the guests' last synchronisation point, after their last job.
pub const END: &str = "end";
/// The line a guest prints before each job (`fio.sh`, `vui.sync=1`).
const READY: &str = "VUI-READY job=";

/// What the host notices in a guest's output while it runs.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Mark {
    /// `VUI-READY job=NAME`: waiting for the go of job NAME (or [`END`]).
    Ready(String),
    /// A `VUI-FAIL` line.
    Fail(String),
}

/// What `line` of a guest's output tells the host, if anything.
fn mark(line: &str) -> Option<Mark> {
    let line = line.trim_end();
    if let Some(i) = line.find(READY) {
        let job = line[i + READY.len()..].split_whitespace().next()?;
        return Some(Mark::Ready(job.to_string()));
    }
    line.find("VUI-FAIL")
        .map(|i| Mark::Fail(line[i..].to_string()))
}

/// A guest's log file, read as it grows.
#[derive(Debug)]
pub struct LogTail {
    file: File,
    /// The start of a line not yet complete.
    partial: Vec<u8>,
    /// The jobs the guest said it is ready for, in order.
    ready: Vec<String>,
    /// Its first failure line.
    pub failed: Option<String>,
}

impl LogTail {
    pub fn open(path: &Path) -> Result<Self, String> {
        let file = File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Ok(Self {
            file,
            partial: Vec::new(),
            ready: Vec::new(),
            failed: None,
        })
    }

    /// Read what was appended since the last call.
    pub fn poll(&mut self) -> Result<(), String> {
        let mut new = Vec::new();
        self.file
            .read_to_end(&mut new)
            .map_err(|e| format!("cannot read a guest log: {e}"))?;
        self.partial.extend_from_slice(&new);
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            match mark(&String::from_utf8_lossy(&line)) {
                Some(Mark::Ready(job)) => self.ready.push(job),
                Some(Mark::Fail(l)) => {
                    self.failed.get_or_insert(l);
                }
                None => {}
            }
        }
        Ok(())
    }

    pub fn is_ready(&self, job: &str) -> bool {
        self.ready.iter().any(|j| j == job)
    }
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_and_fail_lines_are_marked() {
        assert_eq!(
            mark("[ 1.0] x VUI-READY job=rand4k-qd1\r\n"),
            Some(Mark::Ready("rand4k-qd1".into()))
        );
        assert_eq!(mark("VUI-READY job=end"), Some(Mark::Ready(END.into())));
        assert_eq!(mark("VUI-READY job="), None);
        assert_eq!(
            mark("VUI-FAIL fio rand4k-qd1 exited 1\r"),
            Some(Mark::Fail("VUI-FAIL fio rand4k-qd1 exited 1".into()))
        );
        assert_eq!(mark("VUI-FIO job=x iops=1"), None);
    }

    #[test]
    fn the_tail_of_an_output_is_its_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
        assert_eq!(tail("", 5), "");
    }
}
