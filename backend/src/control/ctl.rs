// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vhost-user-iommu ctl`: the control socket for people (tables) and
//! scripts (`--json`: each answer as the daemon's JSON, one line).

use std::io::{self, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::client::{Client, ClientError};
use super::protocol::{self, DEFAULT_PAGE};
use super::show;

/// `ctl`'s command line.
#[derive(Debug, clap::Args)]
pub struct CtlArgs {
    /// The daemon's --control-socket.
    #[arg(long, value_name = "PATH")]
    pub control_socket: PathBuf,

    /// Print each answer (and event) as the daemon's JSON, one line each,
    /// instead of tables.
    #[arg(long)]
    pub json: bool,

    /// How long to wait for each answer, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    pub timeout: u64,

    #[command(subcommand)]
    pub command: CtlCommand,
}

/// Which permission `translate` looks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AccessArg {
    Read,
    Write,
    Any,
}

/// What to ask the daemon (docs/control-socket.md).
#[derive(Debug, clap::Subcommand)]
pub enum CtlCommand {
    /// The daemon: mode, uptime, front-end, mirror peer, the device in
    /// numbers.
    Status,
    /// Endpoints and the domain each is attached to (attached ones only,
    /// unless --all).
    Endpoints {
        #[arg(long, value_name = "ID", default_value = "0", value_parser = number32)]
        start: u32,
        #[arg(long, default_value_t = DEFAULT_PAGE)]
        count: u32,
        /// Unattached endpoints too.
        #[arg(long)]
        all: bool,
    },
    /// Domains: kind, endpoints, mappings.
    Domains {
        #[arg(long, value_name = "ID", default_value = "0", value_parser = number32)]
        start: u32,
        #[arg(long, default_value_t = DEFAULT_PAGE)]
        count: u32,
    },
    /// A page of a domain's mappings, in IOVA order, from the one holding
    /// --start.
    Mappings {
        #[arg(value_parser = number32)]
        domain: u32,
        #[arg(long, value_name = "IOVA", default_value = "0", value_parser = number64)]
        start: u64,
        #[arg(long, default_value_t = DEFAULT_PAGE)]
        count: u32,
    },
    /// Where an endpoint's access to an IOVA goes now.
    Translate {
        #[arg(value_parser = number32)]
        endpoint: u32,
        #[arg(value_parser = number64)]
        iova: u64,
        #[arg(long, value_enum, default_value_t = AccessArg::Any)]
        access: AccessArg,
    },
    /// Requests by type and outcome, the queue's, the table's and the
    /// control socket's counters.
    Counters,
    /// Service-time histograms: per request type, and per batch.
    Latency,
    /// The most recent faults QEMU reported.
    Faults,
    /// Print events as they come (every kind unless some are named). The
    /// guest's requests: attach, detach, map, unmap. The device and its
    /// peers: front_end_connected, front_end_disconnected, reset,
    /// endpoint_attached, endpoint_detached, state_restored,
    /// mirror_connected, mirror_refused, mirror_disconnected, fault (QEMU's),
    /// fault_reported (to the guest), fault_dropped.
    Subscribe {
        events: Vec<String>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long)]
        seconds: Option<u64>,
    },
}

/// Numbers as people write them: decimal or 0x hex.
fn number64(s: &str) -> Result<u64, String> {
    crate::config::parse_u64("number", s).map_err(|e| e.to_string())
}

fn number32(s: &str) -> Result<u32, String> {
    u32::try_from(number64(s)?).map_err(|_| format!("{s}: more than 32 bits"))
}

/// Why `ctl` failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("cannot write the answer: {0}")]
    Output(#[from] io::Error),
}

/// Run `args` against the daemon, printing to `out`.
pub fn run(args: &CtlArgs, out: &mut dyn Write) -> Result<(), CtlError> {
    let timeout = Duration::from_secs(args.timeout.max(1));
    let mut c = Client::connect(&args.control_socket, timeout)?;
    let (name, arguments) = request(&args.command);
    if let CtlCommand::Subscribe { count, seconds, .. } = args.command {
        return subscribe(&mut c, name, arguments, args.json, count, seconds, out);
    }
    let v = c.execute(name, arguments)?;
    if args.json {
        writeln!(out, "{v}")?;
        return Ok(());
    }
    let text = human(&args.command, v)?;
    out.write_all(text.as_bytes())?;
    Ok(())
}

/// The command's name and arguments on the wire.
fn request(command: &CtlCommand) -> (&'static str, Value) {
    match *command {
        CtlCommand::Status => ("status", Value::Null),
        CtlCommand::Endpoints { start, count, all } => (
            "endpoints",
            json!({ "start": start, "count": count, "attached": !all }),
        ),
        CtlCommand::Domains { start, count } => {
            ("domains", json!({ "start": start, "count": count }))
        }
        CtlCommand::Mappings {
            domain,
            start,
            count,
        } => (
            "mappings",
            json!({ "domain": domain, "start": start, "count": count }),
        ),
        CtlCommand::Translate {
            endpoint,
            iova,
            access,
        } => (
            "translate",
            json!({
                "endpoint": endpoint,
                "iova": iova,
                "access": match access {
                    AccessArg::Read => "read",
                    AccessArg::Write => "write",
                    AccessArg::Any => "any",
                },
            }),
        ),
        CtlCommand::Counters => ("counters", Value::Null),
        CtlCommand::Latency => ("latency", Value::Null),
        CtlCommand::Faults => ("faults", Value::Null),
        CtlCommand::Subscribe { ref events, .. } => (
            "subscribe",
            match events.is_empty() {
                true => Value::Null,
                false => json!({ "events": events }),
            },
        ),
    }
}

fn typed<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, CtlError> {
    serde_json::from_value(v).map_err(|e| ClientError::Garbled(e.to_string()).into())
}

/// An answer as a table.
fn human(command: &CtlCommand, v: Value) -> Result<String, CtlError> {
    Ok(match command {
        CtlCommand::Status => show::status(&typed(v)?),
        CtlCommand::Endpoints { .. } => show::endpoints(&typed(v)?),
        CtlCommand::Domains { .. } => show::domains(&typed(v)?),
        CtlCommand::Mappings { .. } => show::mappings(&typed(v)?),
        CtlCommand::Translate { .. } => show::translation(&typed(v)?),
        CtlCommand::Counters => show::counters(&typed(v)?),
        CtlCommand::Latency => show::latency(&typed(v)?),
        CtlCommand::Faults => show::faults(&typed(v)?),
        CtlCommand::Subscribe { .. } => {
            let s: protocol::Subscription = typed(v)?;
            format!("subscribed to {}\n", s.events.join(", "))
        }
    })
}

fn subscribe(
    c: &mut Client,
    name: &str,
    arguments: Value,
    json: bool,
    count: Option<u64>,
    seconds: Option<u64>,
    out: &mut dyn Write,
) -> Result<(), CtlError> {
    let v = c.execute(name, arguments)?;
    if !json {
        let s: protocol::Subscription = typed(v)?;
        writeln!(out, "subscribed to {}", s.events.join(", "))?;
    }
    out.flush()?;
    let end = seconds.map(|s| Instant::now() + Duration::from_secs(s));
    let mut seen = 0;
    while count.is_none_or(|n| seen < n) {
        let wait = match end {
            Some(e) => e.saturating_duration_since(Instant::now()),
            None => Duration::from_secs(1),
        };
        if wait.is_zero() {
            break;
        }
        let Some(e) = c.next_event(wait.min(Duration::from_secs(1)))? else {
            continue;
        };
        seen += 1;
        if json {
            writeln!(out, "{e}")?;
        } else {
            out.write_all(show::event(&e).as_bytes())?;
        }
        out.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        ctl: CtlArgs,
    }

    #[test]
    fn subscribes_help_names_every_event_kind() {
        let mut cmd = Cli::command();
        let help = cmd
            .find_subcommand_mut("subscribe")
            .expect("subscribe")
            .render_long_help()
            .to_string();
        // Names run together across the help's line breaks.
        let words: Vec<&str> = help
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .collect();
        for kind in crate::control::events::KINDS {
            assert!(words.contains(&kind), "{kind} in:\n{help}");
        }
    }
}
