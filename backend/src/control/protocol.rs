// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control socket's protocol (docs/control-socket.md): JSON lines, in
//! QMP's shape. The daemon greets; each command is one line
//! `{"execute": NAME, "arguments": {...}, "id": ANY}` and gets one line
//! back, `{"return": {...}, "id": ...}` or
//! `{"error": {"class": ..., "desc": ...}, "id": ...}`; after `subscribe`,
//! event lines `{"event": KIND, "data": {...}, "time_us": N}` come between
//! answers.
//!
//! Everything a client sends is untrusted: a line is at most
//! [`MAX_LINE`] bytes, pages at most [`MAX_PAGE`] entries, and anything
//! that does not parse is an error answer, never a panic.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::events::KINDS;
use super::histogram::Snapshot;

/// The protocol's version, in the greeting.
pub const PROTOCOL: u32 = 1;
/// The longest command line accepted, newline included.
pub const MAX_LINE: usize = 8192;
/// The most entries one page holds (what is copied under the device lock).
pub const MAX_PAGE: u32 = 1024;
/// Entries per page when `count` is not given.
pub const DEFAULT_PAGE: u32 = 256;
/// The most endpoints one `endpoints` answer looks at under the device
/// lock (with `attached`, most may be skipped).
pub const MAX_SCAN: u32 = 8192;

/// The commands, by name.
pub const COMMANDS: [&str; 11] = [
    "status",
    "endpoints",
    "domains",
    "mappings",
    "translate",
    "counters",
    "latency",
    "faults",
    "subscribe",
    "unsubscribe",
    "commands",
];

/// An error's class, as QMP's (`GenericError` and the like).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorClass {
    /// The line is not JSON, or not a command object.
    ParseError,
    /// The line is longer than [`MAX_LINE`]: the connection is closed.
    LineTooLong,
    CommandNotFound,
    InvalidArgument,
    /// No such domain (or endpoint).
    NotFound,
    /// The daemon serves its cap of clients: the connection is closed.
    TooManyClients,
    /// A subscriber did not read its events fast enough: closed.
    TooSlow,
}

/// Why a command line was not carried out.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("not a command: {0}")]
    Parse(String),
    #[error("line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("no command {0:?}; commands: {COMMANDS:?}")]
    UnknownCommand(String),
    #[error("{0}")]
    Arguments(String),
    #[error("no domain {0}")]
    NoDomain(u32),
    #[error("the daemon serves {0} control clients already")]
    TooManyClients(usize),
    #[error("events were not read fast enough; the subscription is closed")]
    TooSlow,
    #[error("closed, silent, to make room for another client")]
    Evicted,
}

impl ProtocolError {
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Parse(_) => ErrorClass::ParseError,
            Self::LineTooLong => ErrorClass::LineTooLong,
            Self::UnknownCommand(_) => ErrorClass::CommandNotFound,
            Self::Arguments(_) => ErrorClass::InvalidArgument,
            Self::NoDomain(_) => ErrorClass::NotFound,
            Self::TooManyClients(_) | Self::Evicted => ErrorClass::TooManyClients,
            Self::TooSlow => ErrorClass::TooSlow,
        }
    }
}

/// Which permission `translate` looks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    Read,
    Write,
    /// Either: a mapping with any permission translates.
    #[default]
    Any,
}

/// One command, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Status,
    Endpoints {
        start: u32,
        count: u32,
        attached: bool,
    },
    Domains {
        start: u32,
        count: u32,
    },
    Mappings {
        domain: u32,
        start: u64,
        count: u32,
    },
    Translate {
        endpoint: u32,
        iova: u64,
        access: Access,
    },
    Counters,
    Latency,
    Faults,
    /// A mask of [`KINDS`] bits.
    Subscribe {
        mask: u32,
    },
    Unsubscribe,
    Commands,
}

/// A number as JSON gives it, or as a string (`"0x1000"`, `"4096"`), for
/// addresses written by people.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum Num {
    Int(u64),
    Text(String),
}

impl Num {
    fn value(&self, what: &str) -> Result<u64, ProtocolError> {
        match self {
            Num::Int(n) => Ok(*n),
            Num::Text(s) => {
                let s = s.trim();
                let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
                    Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16),
                    None => s.replace('_', "").parse(),
                };
                r.map_err(|_| ProtocolError::Arguments(format!("{what}: {s:?} is not a number")))
            }
        }
    }

    fn u32(&self, what: &str) -> Result<u32, ProtocolError> {
        u32::try_from(self.value(what)?)
            .map_err(|_| ProtocolError::Arguments(format!("{what}: more than 32 bits")))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    execute: String,
    #[serde(default)]
    arguments: Option<Value>,
    #[serde(default)]
    id: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PageArgs {
    start: Option<Num>,
    count: Option<Num>,
    attached: Option<bool>,
    domain: Option<Num>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TranslateArgs {
    endpoint: Num,
    iova: Num,
    #[serde(default)]
    access: Access,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscribeArgs {
    events: Option<Vec<String>>,
}

/// A page's `count`: [`DEFAULT_PAGE`] if not given, 1 to [`MAX_PAGE`].
fn count(n: Option<&Num>) -> Result<u32, ProtocolError> {
    let Some(n) = n else {
        return Ok(DEFAULT_PAGE);
    };
    match n.value("count")? {
        c @ 1.. if c <= u64::from(MAX_PAGE) => Ok(c as u32),
        c => Err(ProtocolError::Arguments(format!(
            "count: {c}: want 1 to {MAX_PAGE}"
        ))),
    }
}

fn arguments<T: for<'de> Deserialize<'de> + Default>(v: Option<Value>) -> Result<T, ProtocolError> {
    match v {
        None | Some(Value::Null) => Ok(T::default()),
        Some(v) => serde_json::from_value(v).map_err(|e| ProtocolError::Arguments(e.to_string())),
    }
}

/// A subscription mask of event kinds by name (all of them if none is
/// named).
pub fn mask_of(names: Option<&[String]>) -> Result<u32, ProtocolError> {
    let Some(names) = names else {
        return Ok((1 << KINDS.len()) - 1);
    };
    names
        .iter()
        .try_fold(0, |mask, n| match KINDS.iter().position(|k| k == n) {
            Some(i) => Ok(mask | 1 << i),
            None => Err(ProtocolError::Arguments(format!(
                "no event {n:?}; events: {KINDS:?}"
            ))),
        })
}

/// The names of the kinds in `mask`.
pub fn kinds_of(mask: u32) -> Vec<String> {
    KINDS
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, k)| k.to_string())
        .collect()
}

/// Parse one command line (without its newline). The `id`, if the line
/// had one, comes back either way, for the answer to carry.
pub fn parse(line: &[u8]) -> (Option<Value>, Result<Command, ProtocolError>) {
    let env: Envelope = match serde_json::from_slice(line) {
        Ok(e) => e,
        Err(e) => return (None, Err(ProtocolError::Parse(e.to_string()))),
    };
    (env.id, command(&env.execute, env.arguments))
}

fn command(name: &str, args: Option<Value>) -> Result<Command, ProtocolError> {
    let none = |args: Option<Value>, c: Command| match args {
        None | Some(Value::Null) => Ok(c),
        Some(Value::Object(m)) if m.is_empty() => Ok(c),
        Some(_) => Err(ProtocolError::Arguments(format!(
            "{name} takes no arguments"
        ))),
    };
    match name {
        "status" => none(args, Command::Status),
        "counters" => none(args, Command::Counters),
        "latency" => none(args, Command::Latency),
        "faults" => none(args, Command::Faults),
        "unsubscribe" => none(args, Command::Unsubscribe),
        "commands" => none(args, Command::Commands),
        "endpoints" | "domains" | "mappings" => {
            let a: PageArgs = arguments(args)?;
            let count = count(a.count.as_ref())?;
            let misplaced =
                |what: &str| ProtocolError::Arguments(format!("{name} takes no {what:?} argument"));
            match name {
                "endpoints" => {
                    if a.domain.is_some() {
                        return Err(misplaced("domain"));
                    }
                    Ok(Command::Endpoints {
                        start: a.start.as_ref().map_or(Ok(0), |n| n.u32("start"))?,
                        count,
                        attached: a.attached.unwrap_or(false),
                    })
                }
                "domains" => {
                    if a.domain.is_some() || a.attached.is_some() {
                        return Err(misplaced("domain or attached"));
                    }
                    Ok(Command::Domains {
                        start: a.start.as_ref().map_or(Ok(0), |n| n.u32("start"))?,
                        count,
                    })
                }
                _ => {
                    if a.attached.is_some() {
                        return Err(misplaced("attached"));
                    }
                    let domain = a
                        .domain
                        .ok_or_else(|| ProtocolError::Arguments("mappings: no domain".into()))?
                        .u32("domain")?;
                    Ok(Command::Mappings {
                        domain,
                        start: a.start.as_ref().map_or(Ok(0), |n| n.value("start"))?,
                        count,
                    })
                }
            }
        }
        "translate" => {
            let a: TranslateArgs = match args {
                Some(v) => serde_json::from_value(v)
                    .map_err(|e| ProtocolError::Arguments(e.to_string()))?,
                None => {
                    return Err(ProtocolError::Arguments(
                        "translate: want endpoint and iova".into(),
                    ))
                }
            };
            Ok(Command::Translate {
                endpoint: a.endpoint.u32("endpoint")?,
                iova: a.iova.value("iova")?,
                access: a.access,
            })
        }
        "subscribe" => {
            let a: SubscribeArgs = arguments(args)?;
            Ok(Command::Subscribe {
                mask: mask_of(a.events.as_deref())?,
            })
        }
        other => Err(ProtocolError::UnknownCommand(
            other.chars().take(64).collect(),
        )),
    }
}

/// The first line the daemon sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Greeting {
    pub daemon: String,
    pub version: String,
    pub protocol: u32,
    pub commands: Vec<String>,
}

/// The first line, as sent: `{"greeting": {...}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GreetingLine {
    pub greeting: Greeting,
}

/// An error answer's body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub class: ErrorClass,
    pub desc: String,
}

/// An answer line.
pub fn answer(id: Option<Value>, result: Result<Value, ProtocolError>) -> Value {
    let mut v = match result {
        Ok(r) => serde_json::json!({ "return": r }),
        Err(e) => {
            serde_json::json!({ "error": ErrorBody { class: e.class(), desc: e.to_string() } })
        }
    };
    if let Some(id) = id {
        v["id"] = id;
    }
    v
}

/// `status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    /// `emulated` or `iommufd`.
    pub mode: String,
    pub pid: u32,
    pub uptime_ms: u64,
    pub front_end: FrontEnd,
    pub mirror: Mirror,
    pub device: DeviceSummary,
    pub requests: RequestSummary,
    pub control: ControlCounters,
    /// The last saved state the device took since the daemon started
    /// (`null`: none). Absent from an older daemon's answer.
    #[serde(default)]
    pub last_restore: Option<Restore>,
}

/// A saved state the device took: `source` `state_file` (a previous
/// daemon's, as this one started) or `migration`; when (microseconds since
/// the daemon started, as events' `time_us`); what the device held then.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restore {
    pub source: String,
    pub time_us: u64,
    pub domains: usize,
    pub mappings: usize,
    pub attached: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontEnd {
    pub connected: bool,
    pub pid: Option<u32>,
    /// Front-ends that connected since the daemon started.
    pub connections: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mirror {
    /// The daemon has a `--mirror-socket`.
    pub configured: bool,
    /// A QEMU is connected to it.
    pub connected: bool,
    /// Its process, if known.
    pub pid: Option<u32>,
    /// It acknowledged the dump of the state: its copy is the daemon's.
    pub synced: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSummary {
    /// Unattached endpoints bypass translation (the config space's).
    pub bypass: bool,
    pub endpoints: usize,
    pub attached: usize,
    pub domains: usize,
    pub mappings: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestSummary {
    pub ok: u64,
    pub failed: u64,
}

/// The control socket's own counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlCounters {
    /// Clients connected now.
    pub clients: u64,
    pub accepted: u64,
    /// Refused at the cap of clients.
    pub refused: u64,
    /// Closed by the daemon: too slow, too long a line, past a deadline.
    pub dropped: u64,
    pub commands: u64,
    /// Lines answered with an error.
    pub errors: u64,
}

/// A page: its entries and where the next starts (`None`: the last).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page<T, C> {
    pub entries: Vec<T>,
    pub next: Option<C>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRow {
    pub endpoint: u32,
    pub domain: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainRow {
    pub domain: u32,
    /// A bypass domain (ATTACH_F_BYPASS): no IOAS, no mappings.
    pub bypass: bool,
    pub endpoints: u32,
    pub mappings: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingRow {
    pub virt_start: u64,
    /// Inclusive.
    pub virt_end: u64,
    pub phys_start: u64,
    /// VIRTIO_IOMMU_MAP_F_*: READ 1, WRITE 2, MMIO 4.
    pub flags: u32,
    /// The mapping is an area of the domain's IOAS (not MMIO-only).
    pub in_ioas: bool,
}

/// `mappings`: a page of one domain's mappings, in IOVA order; `next` is
/// the IOVA to start the next page at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mappings {
    pub domain: u32,
    /// The domain's mappings in all.
    pub total: usize,
    #[serde(flatten)]
    pub page: Page<MappingRow, u64>,
}

/// `translate`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Translation {
    pub endpoint: u32,
    pub iova: u64,
    /// The endpoint's domain, if attached.
    pub domain: Option<u32>,
    /// `mapped`, `bypass` or `fault`.
    pub result: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpa: Option<u64>,
    /// Bytes contiguous from `gpa` in the mapping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub len: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flags: Option<u32>,
    /// For a fault: `unknown` (no such endpoint), `domain` or `mapping`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Requests of one type, by outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestCount {
    pub kind: String,
    pub ok: u64,
    pub failed: u64,
}

/// `counters`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub requests: Vec<RequestCount>,
    pub device: DeviceSummary,
    pub queue: crate::vhu_iommu::QueueStats,
    /// The shared translation table's, with a mirror.
    pub table: Option<crate::mirror::TableStats>,
    pub events: super::events::EventCounters,
    pub control: ControlCounters,
}

/// One request type's service times.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindLatency {
    pub kind: String,
    #[serde(flatten)]
    pub histogram: Snapshot,
}

/// `latency`: service-time histograms, in nanoseconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Latency {
    /// Per request type: claiming, reading, carrying out and replying to
    /// one request.
    pub requests: Vec<KindLatency>,
    /// Per batch: device lock to used ring, QEMU's ACKs included.
    pub batches: Snapshot,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultRow {
    pub time_us: u64,
    pub endpoint: u32,
    pub address: u64,
    pub reason: String,
    pub flags: u32,
}

/// `faults`: the most recent, oldest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Faults {
    pub faults: Vec<FaultRow>,
    /// Faults since the daemon started.
    pub total: u64,
}

/// `subscribe` / `unsubscribe`: the kinds now subscribed to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    pub events: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(line: &str) -> Result<Command, ProtocolError> {
        parse(line.as_bytes()).1
    }

    #[test]
    fn commands_parse_with_their_defaults_and_hex_strings() {
        assert_eq!(cmd(r#"{"execute":"status"}"#), Ok(Command::Status));
        assert_eq!(
            cmd(r#"{"execute":"mappings","arguments":{"domain":1,"start":"0x1000"}}"#),
            Ok(Command::Mappings {
                domain: 1,
                start: 0x1000,
                count: DEFAULT_PAGE
            })
        );
        assert_eq!(
            cmd(
                r#"{"execute":"translate","arguments":{"endpoint":8,"iova":4096,"access":"write"}}"#
            ),
            Ok(Command::Translate {
                endpoint: 8,
                iova: 4096,
                access: Access::Write
            })
        );
        assert_eq!(
            cmd(r#"{"execute":"subscribe","arguments":{"events":["map","fault"]}}"#),
            Ok(Command::Subscribe {
                mask: 1 << 2 | 1 << 4
            })
        );
        let (id, c) =
            parse(br#"{"execute":"endpoints","id":{"n":[1]},"arguments":{"attached":true}}"#);
        assert_eq!(id, Some(serde_json::json!({"n":[1]})));
        assert_eq!(
            c,
            Ok(Command::Endpoints {
                start: 0,
                count: DEFAULT_PAGE,
                attached: true
            })
        );
    }

    #[test]
    fn bad_lines_are_errors_of_their_class() {
        let class = |l: &str| cmd(l).unwrap_err().class();
        assert_eq!(class("not json"), ErrorClass::ParseError);
        assert_eq!(class("[1,2]"), ErrorClass::ParseError);
        assert_eq!(
            class(r#"{"execute":"status","x":1}"#),
            ErrorClass::ParseError
        );
        assert_eq!(
            class(r#"{"execute":"reboot"}"#),
            ErrorClass::CommandNotFound
        );
        for l in [
            r#"{"execute":"status","arguments":[1]}"#,
            r#"{"execute":"mappings"}"#,
            r#"{"execute":"mappings","arguments":{"domain":1,"count":0}}"#,
            r#"{"execute":"mappings","arguments":{"domain":1,"count":100000}}"#,
            r#"{"execute":"mappings","arguments":{"domain":-1}}"#,
            r#"{"execute":"mappings","arguments":{"domain":"0x1_0000_0000"}}"#,
            r#"{"execute":"translate","arguments":{"endpoint":8}}"#,
            r#"{"execute":"translate","arguments":{"endpoint":8,"iova":"zz"}}"#,
            r#"{"execute":"subscribe","arguments":{"events":["reboot"]}}"#,
            r#"{"execute":"domains","arguments":{"domain":3}}"#,
        ] {
            assert_eq!(class(l), ErrorClass::InvalidArgument, "{l}");
        }
    }

    #[test]
    fn a_status_says_its_last_restore_and_one_without_the_field_reads_as_none() {
        let mut v = serde_json::json!({
            "version": "0.1.0", "mode": "emulated", "pid": 1, "uptime_ms": 2,
            "front_end": {"connected": false, "pid": null, "connections": 0},
            "mirror": {"configured": false, "connected": false, "pid": null, "synced": false},
            "device": {"bypass": true, "endpoints": 2, "attached": 0, "domains": 0, "mappings": 0},
            "requests": {"ok": 0, "failed": 0},
            "control": {"clients": 1, "accepted": 1, "refused": 0, "dropped": 0, "commands": 1, "errors": 0}
        });
        // An older daemon's answer: no `last_restore`.
        let st: Status = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(st.last_restore, None);
        assert_eq!(
            serde_json::to_value(&st).unwrap()["last_restore"],
            Value::Null
        );
        let restore = serde_json::json!({
            "source": "state_file", "time_us": 812, "domains": 2, "mappings": 3, "attached": 2
        });
        v["last_restore"] = restore.clone();
        let st: Status = serde_json::from_value(v).unwrap();
        let r = st.last_restore.as_ref().unwrap();
        assert_eq!(
            (r.source.as_str(), r.time_us, r.mappings),
            ("state_file", 812, 3)
        );
        assert_eq!(serde_json::to_value(&st).unwrap()["last_restore"], restore);
    }

    #[test]
    fn answers_carry_the_id_and_the_error_class() {
        let a = answer(Some(7.into()), Err(ProtocolError::NoDomain(3)));
        assert_eq!(a["id"], 7);
        assert_eq!(a["error"]["class"], "NotFound");
        let a = answer(None, Ok(serde_json::json!({})));
        assert!(a.get("id").is_none() && a.get("return").is_some());
    }
}
