// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A client of the control socket, for `vhost-user-iommu ctl` and tests:
//! one command at a time, each answer awaited with a deadline; event lines
//! that come meanwhile are kept for [`Client::next_event`].

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::protocol::{ErrorBody, ErrorClass, Greeting, GreetingLine};

/// The longest line taken from the daemon (a page of mappings is about
/// 150 KiB).
pub const MAX_ANSWER: usize = 16 << 20;

/// Why a command got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("no answer in {0:?}")]
    Timeout(Duration),
    #[error("the daemon closed the connection")]
    Closed,
    #[error("not what the daemon answers: {0}")]
    Garbled(String),
    #[error("{desc} ({class:?})")]
    Daemon { class: ErrorClass, desc: String },
}

/// See the module doc.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    /// Bytes read past the last whole line.
    pending: Vec<u8>,
    events: VecDeque<Value>,
    timeout: Duration,
    next_id: u64,
    greeting: Greeting,
}

impl Client {
    /// Connect to the socket at `path` and take its greeting; each answer
    /// is then awaited for up to `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_owned(),
            source,
        })?;
        stream.set_write_timeout(Some(timeout))?;
        let mut c = Self {
            stream,
            pending: Vec::new(),
            events: VecDeque::new(),
            timeout,
            next_id: 1,
            greeting: Greeting {
                daemon: String::new(),
                version: String::new(),
                protocol: 0,
                commands: Vec::new(),
            },
        };
        let first = c
            .read_value(Instant::now() + timeout)?
            .ok_or(ClientError::Timeout(timeout))?;
        if first.get("error").is_some() {
            return Err(daemon_error(&first));
        }
        let g: GreetingLine =
            serde_json::from_value(first).map_err(|e| ClientError::Garbled(e.to_string()))?;
        c.greeting = g.greeting;
        Ok(c)
    }

    /// The daemon's greeting.
    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// Run `command` with `arguments` (`Value::Null`: none) and return
    /// what it returned.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = serde_json::json!({ "execute": command, "id": id });
        if !arguments.is_null() {
            msg["arguments"] = arguments;
        }
        let mut line = msg.to_string().into_bytes();
        line.push(b'\n');
        self.stream.write_all(&line)?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let v = self
                .read_value(deadline)?
                .ok_or(ClientError::Timeout(self.timeout))?;
            if v.get("event").is_some() {
                self.events.push_back(v);
                continue;
            }
            if v.get("id").is_some_and(|i| i != id) {
                continue;
            }
            if v.get("error").is_some() {
                return Err(daemon_error(&v));
            }
            return match v {
                Value::Object(mut m) => m
                    .remove("return")
                    .ok_or_else(|| ClientError::Garbled(Value::Object(m).to_string())),
                other => Err(ClientError::Garbled(other.to_string())),
            };
        }
    }

    /// [`Self::execute`], the answer as a `T`.
    pub fn call<T: DeserializeOwned>(
        &mut self,
        command: &str,
        arguments: Value,
    ) -> Result<T, ClientError> {
        let v = self.execute(command, arguments)?;
        serde_json::from_value(v).map_err(|e| ClientError::Garbled(e.to_string()))
    }

    /// The next event line (after `subscribe`), waiting up to `timeout`;
    /// `None` if none came.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<Value>, ClientError> {
        if let Some(e) = self.events.pop_front() {
            return Ok(Some(e));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let Some(v) = self.read_value(deadline)? else {
                return Ok(None);
            };
            if v.get("event").is_some() {
                return Ok(Some(v));
            }
            if v.get("error").is_some() {
                return Err(daemon_error(&v));
            }
        }
    }

    /// The next line as JSON, or `None` at `deadline`.
    fn read_value(&mut self, deadline: Instant) -> Result<Option<Value>, ClientError> {
        let mut chunk = [0u8; 16384];
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                return serde_json::from_slice(&line[..end])
                    .map(Some)
                    .map_err(|e| ClientError::Garbled(e.to_string()));
            }
            if self.pending.len() > MAX_ANSWER {
                return Err(ClientError::Garbled(format!(
                    "a line longer than {MAX_ANSWER} bytes"
                )));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(n) => self.pending.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

fn daemon_error(v: &Value) -> ClientError {
    match serde_json::from_value::<ErrorBody>(v["error"].clone()) {
        Ok(b) => ClientError::Daemon {
            class: b.class,
            desc: b.desc,
        },
        Err(_) => ClientError::Garbled(v.to_string()),
    }
}
