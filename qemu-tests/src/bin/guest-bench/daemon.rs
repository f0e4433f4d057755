// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Our daemon as the benchmark runs it: built from the working tree, its
//! arguments, and the counters it logs when its QEMU goes.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use qemu_tests::repo;
use serde_json::Value;
use test_frontend::daemon::DaemonProcess;

/// How long a daemon may take to log its counters once its QEMU is gone.
const DAEMON_STATS_WAIT: Duration = Duration::from_secs(5);

/// The daemon's arguments after its sockets: `--poll-us poll_us` unless
/// `extra` (`VUI_DAEMON_ARGS`, whitespace-separated) sets it, then `extra`.
pub fn daemon_args(extra: Option<&str>, poll_us: u64) -> Vec<String> {
    let extra: Vec<String> = extra
        .unwrap_or("")
        .split_whitespace()
        .map(String::from)
        .collect();
    let sets_poll = extra
        .iter()
        .any(|a| a == "--poll-us" || a.starts_with("--poll-us="));
    let mut args = Vec::new();
    if !sets_poll {
        args.extend(["--poll-us".to_string(), poll_us.to_string()]);
    }
    args.extend(extra);
    args
}

/// The path of the binary `name` in cargo's `--message-format=json` output.
fn cargo_executable(json_lines: &str, name: &str) -> Option<PathBuf> {
    json_lines
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact")
        .filter_map(|m| m["executable"].as_str().map(PathBuf::from))
        .find(|p| p.file_name().is_some_and(|f| f == name))
}

/// Build the daemon from the working tree (`cargo build --release -p
/// vhost-user-iommu`), so that no stale binary is measured; its path.
pub fn build_daemon() -> Result<PathBuf, String> {
    let out = Command::new(env!("CARGO"))
        .current_dir(repo())
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "vhost-user-iommu",
            "--bin",
            "vhost-user-iommu",
            "--message-format=json-render-diagnostics",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo build --release -p vhost-user-iommu failed ({}): see above",
            out.status
        ));
    }
    cargo_executable(&String::from_utf8_lossy(&out.stdout), "vhost-user-iommu")
        .ok_or_else(|| "cargo built no vhost-user-iommu binary (or did not say where)".into())
}

/// What a daemon said when its QEMU went: its counters line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonReport {
    /// `stats: ...; QueueStats { ... }`, or why there is none.
    pub stats: String,
    /// Successful MAPs and UNMAPs, from `stats`.
    pub map_unmap: Option<(u64, u64)>,
}

/// The last `stats: ` line of a daemon's log, from `stats: ` on.
fn stats_line(log: &str) -> Option<&str> {
    log.lines()
        .rev()
        .find_map(|l| l.find("stats: ").map(|i| l[i..].trim_end()))
}

/// The successful MAP and UNMAP counts of a daemon's `stats: ` line
/// (`... map 12/0 unmap 11/0 ...`, ok/failed).
fn map_unmap(stats: &str) -> Option<(u64, u64)> {
    let words: Vec<&str> = stats.split_whitespace().collect();
    let ok = |name: &str| -> Option<u64> {
        let i = words.iter().position(|w| *w == name)?;
        words.get(i + 1)?.split('/').next()?.parse().ok()
    };
    Some((ok("map")?, ok("unmap")?))
}

/// The counters `daemon` logged when its QEMU went (waiting a little for
/// them: it logs on its own time).
pub fn daemon_report(daemon: &DaemonProcess) -> DaemonReport {
    let log = daemon.wait_log("stats: ", DAEMON_STATS_WAIT);
    match stats_line(&log) {
        Some(line) => DaemonReport {
            stats: line.to_string(),
            map_unmap: map_unmap(line),
        },
        None => DaemonReport {
            stats: format!("(no stats line in its log within {DAEMON_STATS_WAIT:?})"),
            map_unmap: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_args_add_poll_us_unless_given() {
        assert_eq!(daemon_args(None, 1000), ["--poll-us", "1000"]);
        assert_eq!(
            daemon_args(Some(" --foo  bar\t--baz "), 50),
            ["--poll-us", "50", "--foo", "bar", "--baz"]
        );
        assert_eq!(daemon_args(Some("--poll-us 0"), 50), ["--poll-us", "0"]);
        assert_eq!(daemon_args(Some("--poll-us=7"), 50), ["--poll-us=7"]);
    }

    #[test]
    fn the_daemon_binary_is_found_in_cargo_output() {
        let out = r#"{"reason":"compiler-artifact","target":{"name":"log"},"executable":null,"fresh":true}
{"reason":"compiler-artifact","target":{"name":"vhost-user-iommu"},"executable":"/w/target/release/vhost-user-iommu","fresh":false}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            cargo_executable(out, "vhost-user-iommu"),
            Some(PathBuf::from("/w/target/release/vhost-user-iommu"))
        );
        assert_eq!(cargo_executable(out, "other"), None);
        assert_eq!(cargo_executable("", "vhost-user-iommu"), None);
        // A path JSON had to escape.
        let escaped = r#"{"reason":"compiler-artifact","executable":"/w \"x\"/vhost-user-iommu"}"#;
        assert_eq!(
            cargo_executable(escaped, "vhost-user-iommu"),
            Some(PathBuf::from("/w \"x\"/vhost-user-iommu"))
        );
    }

    #[test]
    fn daemon_stats_lines_give_map_and_unmap() {
        let log = "[INFO] front-end disconnected\n\
                   [2025 INFO serve] stats: other 0/0 attach 1/0 detach 0/0 map 1234/2 unmap 1200/0 \
                   probe 1/0 (ok/failed); 1 domains, 34 mappings, 1 endpoints attached; \
                   QueueStats { kicks: 5 }\n";
        let line = stats_line(log).unwrap();
        assert!(line.starts_with("stats: other 0/0") && line.ends_with("kicks: 5 }"));
        assert_eq!(map_unmap(line), Some((1234, 1200)));
        assert_eq!(stats_line("no counters\n"), None);
        assert_eq!(map_unmap("stats: map x/0 unmap 1/0"), None);
        assert_eq!(map_unmap("stats: map 1/0"), None);
    }
}
