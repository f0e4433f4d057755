// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Target `control`: the daemon's control socket (`--control-socket`,
//! docs/control-socket.md) played by a hostile local client: arbitrary
//! bytes, commands of every name with arguments of every type and edge
//! value, lines split across writes, over-long lines, subscriptions never
//! read, answers never read, connections closed mid-line or mid-answer,
//! many connections at once; sometimes a front-end makes requests (and so
//! events) meanwhile.
//!
//! Every line the daemon sends must be JSON with one of `greeting`,
//! `return`, `error`, `event`; the daemon must never die or hang: after
//! every few inputs and at the end a well-behaved front-end is served and
//! a well-behaved control client gets its `status`.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
use test_frontend::{TestVm, VmOptions};
use vhost_user_iommu::control::client::Client;
use vhost_user_iommu::control::protocol::{self, COMMANDS};

use crate::daemon::{locate, Daemon, SERVE_EVERY};
use crate::{Gen, Options, Target, Verdict};

/// A JSON value of some type, edgy when a number.
fn value(g: &mut Gen, depth: u32) -> Value {
    match g.below(if depth > 2 { 5 } else { 7 }) {
        0 => Value::Null,
        1 => Value::Bool(g.bool()),
        2 => Value::from(g.edgy_u64()),
        3 => Value::from(-(g.below(1 << 40) as i64)),
        4 => Value::from(g.pick(&[
            "0x1000",
            "0x",
            "0xffffffffffffffff",
            "0x1_0000_0000",
            "18446744073709551616",
            "",
            "read",
            "write",
            "any",
            "map",
            "fault",
            "-1",
            "1e3",
        ])),
        5 => Value::Array((0..g.below(4)).map(|_| value(g, depth + 1)).collect()),
        _ => Value::Object(
            (0..g.below(4))
                .map(|_| (key(g), value(g, depth + 1)))
                .collect(),
        ),
    }
}

fn key(g: &mut Gen) -> String {
    g.pick(&[
        "domain", "start", "count", "attached", "endpoint", "iova", "access", "events", "x", "",
    ])
    .to_string()
}

/// One command line, well-formed or not.
fn command(g: &mut Gen) -> Vec<u8> {
    let mut cmd = serde_json::Map::new();
    if g.chance(15, 16) {
        let name = if g.chance(7, 8) {
            g.pick(&COMMANDS).to_string()
        } else {
            String::from_utf8_lossy(&g.bytes_upto(12)).into_owned()
        };
        cmd.insert("execute".into(), Value::from(name));
    }
    if g.chance(2, 3) {
        let args = if g.chance(3, 4) {
            Value::Object((0..g.below(4)).map(|_| (key(g), value(g, 1))).collect())
        } else {
            value(g, 1)
        };
        cmd.insert("arguments".into(), args);
    }
    if g.chance(1, 2) {
        cmd.insert("id".into(), value(g, 2));
    }
    if g.chance(1, 16) {
        cmd.insert(key(g), value(g, 2));
    }
    let mut line = Value::Object(cmd).to_string().into_bytes();
    if g.chance(1, 8) && !line.is_empty() {
        // Cut, or one byte changed.
        let at = g.below(line.len() as u64) as usize;
        if g.bool() {
            line.truncate(at);
        } else {
            line[at] = g.u8();
        }
    }
    line.push(b'\n');
    line
}

/// What one input sends.
fn input(g: &mut Gen) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..g.range(1, 8) {
        match g.below(10) {
            0 => out.extend(g.bytes_upto(300)),
            1 if g.chance(1, 4) => {
                // Longer than a line may be.
                let n = g.pick(&[protocol::MAX_LINE - 1, protocol::MAX_LINE, 64 << 10]);
                out.extend(std::iter::repeat_n(b'{', n));
            }
            2 => out.extend_from_slice(b"\n\r\n \n"),
            _ => out.extend(command(g)),
        }
    }
    out
}

/// Every whole line the daemon sent must be one of its kinds of line.
fn check_lines(bytes: &[u8]) -> Verdict {
    let whole = match bytes.iter().rposition(|&b| b == b'\n') {
        Some(end) => &bytes[..end],
        None => return Ok(()),
    };
    for line in whole.split(|&b| b == b'\n') {
        let v: Value = serde_json::from_slice(line).map_err(|e| {
            format!(
                "the daemon sent a line that is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&line[..line.len().min(200)])
            )
        })?;
        if !["greeting", "return", "error", "event"]
            .iter()
            .any(|k| v.get(k).is_some())
        {
            return Err(format!("the daemon sent an unknown line: {v}"));
        }
    }
    Ok(())
}

/// See the module doc.
#[derive(Debug)]
pub struct ControlTarget {
    daemon: Daemon,
    inputs: u64,
    bytes: u64,
    read_back: u64,
    with_frontend: u64,
    served: u64,
}

impl ControlTarget {
    pub fn new(opts: &Options) -> Result<Self, String> {
        let bin = locate(opts.daemon.as_deref())?;
        Ok(Self {
            daemon: Daemon::start_with(&bin, "control", false, true, &[])?,
            inputs: 0,
            bytes: 0,
            read_back: 0,
            with_frontend: 0,
            served: 0,
        })
    }

    fn path(&self) -> PathBuf {
        self.daemon
            .control
            .clone()
            .expect("started with a control socket")
    }

    /// A well-behaved client gets its status (past the cap of clients
    /// that hostile connections may still hold for a moment).
    fn control_serves(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let r = Client::connect(&self.path(), Duration::from_secs(5))
                .and_then(|mut c| c.call::<protocol::Status>("status", Value::Null));
            match r {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("a well-behaved control client got no status: {e}"))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn check_daemon(&mut self) -> Verdict {
        self.daemon.unharmed()?;
        let served = self.daemon.serves().and_then(|()| self.control_serves());
        self.daemon.judge(served)?;
        self.served += 1;
        Ok(())
    }
}

impl Target for ControlTarget {
    fn one(&mut self, g: &mut Gen) -> Verdict {
        self.inputs += 1;
        // Sometimes a front-end makes events while the input runs.
        let front_end = g.chance(1, 4).then(|| {
            self.with_frontend += 1;
            let socket = self.daemon.socket.clone();
            std::thread::spawn(move || {
                let opts = VmOptions {
                    timeout: Duration::from_secs(10),
                    ..VmOptions::default()
                };
                TestVm::connect(&socket, opts).and_then(|mut vm| {
                    for i in 0..16u64 {
                        vm.attach(1, 8, 0)?;
                        vm.map(
                            1,
                            0x10_0000 + i * 0x1000,
                            0x10_0fff + i * 0x1000,
                            0x2_0000,
                            3,
                        )?;
                    }
                    vm.unmap(1, 0, u64::MAX)?;
                    Ok(())
                })
            })
        });
        let connections = g.range(1, 4);
        let mut held = Vec::new();
        for _ in 0..connections {
            let mut s = crate::daemon::connect(&self.path())?;
            s.set_write_timeout(Some(Duration::from_millis(500)))
                .map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .map_err(|e| e.to_string())?;
            let bytes = input(g);
            self.bytes += bytes.len() as u64;
            // In one write, or in pieces with pauses.
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                let n = if g.chance(3, 4) {
                    rest.len()
                } else {
                    (g.range(1, 64) as usize).min(rest.len())
                };
                if s.write_all(&rest[..n]).is_err() {
                    break;
                }
                rest = &rest[n..];
                if !rest.is_empty() && g.chance(1, 4) {
                    std::thread::sleep(Duration::from_millis(g.below(20)));
                }
            }
            match g.below(3) {
                // Read what came, and check it.
                0 => {
                    let mut got = Vec::new();
                    let mut buf = [0u8; 65536];
                    let until = Instant::now() + Duration::from_millis(g.range(20, 300));
                    while Instant::now() < until && got.len() < 4 << 20 {
                        match s.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                            Err(_) => break,
                        }
                    }
                    self.read_back += got.len() as u64;
                    check_lines(&got)?;
                }
                // Keep it open, unread, for the rest of the input.
                1 => held.push(s),
                // Close at once (mid-answer, maybe).
                _ => drop(s),
            }
        }
        if let Some(f) = front_end {
            let r = f.join().unwrap_or_else(|_| {
                Err(test_frontend::Error::BadReply("front-end panicked".into()))
            });
            if let Err(e) = r {
                return Err(match self.daemon.alive() {
                    Err(dead) => format!("panic: {dead}"),
                    Ok(()) => format!(
                        "hang: a front-end was not served while hostile control clients were connected: {e}"
                    ),
                });
            }
        }
        drop(held);
        self.daemon.living()?;
        if self.inputs.is_multiple_of(SERVE_EVERY) {
            self.check_daemon()?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Verdict {
        self.check_daemon()
    }

    fn daemon(&mut self) -> Option<&mut Daemon> {
        Some(&mut self.daemon)
    }

    fn notes(&self) -> Vec<String> {
        vec![format!(
            "{} bytes over {} inputs ({} bytes of answers read and checked, {} with a front-end meanwhile); well-behaved front-end + control client served {} times; daemon restarts after death: {}",
            self.bytes, self.inputs, self.read_back, self.with_frontend, self.served, self.daemon.deaths
        )]
    }
}
