// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control socket's threads: one accepts, one per client (at most
//! [`Limits::max_clients`]) reads its commands and writes the answers, one
//! hands events to the subscribers. None of them is the request path: a
//! command takes the device lock only for a snapshot of bounded size
//! (src/vhu_iommu/inspect.rs), and the events reach the dispatcher
//! through a queue the request path never waits on (src/control/events.rs).
//!
//! A client is untrusted: its lines are bounded ([`MAX_LINE`]), a line
//! must arrive whole within [`Limits::line`], an answer must be read within
//! [`Limits::write`], a client that sends nothing for [`Limits::idle`] (and
//! has no subscription) is closed, and a subscriber whose queue of event
//! lines ([`Limits::subscriber_queue`]) fills is closed. Anything that does
//! not parse is an error answer.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::events::Stamped;
use super::protocol::{
    self, Command, ControlCounters, FaultRow, Faults, FrontEnd, Greeting, GreetingLine,
    KindLatency, ProtocolError, RequestCount, Status, Subscription, COMMANDS, MAX_LINE, PROTOCOL,
};
use super::REQUEST_KINDS;
use crate::listen::SocketFile;
use crate::vhu_iommu::IommuBackend;

mod connection;
use connection::serve_client;

/// What bounds a client (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_clients: usize,
    /// How long a client without a subscription may stay silent.
    pub idle: Duration,
    /// How long a line may take to arrive whole.
    pub line: Duration,
    /// How long one answer (or event line) may take to be read.
    pub write: Duration,
    /// Event lines waiting for one subscriber.
    pub subscriber_queue: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_clients: 8,
            idle: Duration::from_secs(60),
            line: Duration::from_secs(5),
            write: Duration::from_secs(5),
            subscriber_queue: 1024,
        }
    }
}

/// What `status` says of the daemon beyond the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DaemonInfo {
    /// `emulated` or `iommufd`.
    pub mode: &'static str,
}

/// How often a client thread looks at its subscription's queue (and at
/// the server stopping) while it waits for input.
const SUBSCRIBED_TICK: Duration = Duration::from_millis(20);
/// How often a client thread without a subscription looks at its
/// deadlines and at the server stopping.
const IDLE_TICK: Duration = Duration::from_millis(200);
/// How long a client must have been silent to be closed for a new one
/// when the cap of clients is reached.
const EVICT_IDLE: Duration = Duration::from_secs(1);
/// How long a client being closed for what it did may take to read the
/// error that says why.
const LINGER: Duration = Duration::from_millis(200);
/// How often the dispatcher looks at the event queue while there are
/// subscribers (it never sleeps on the queue itself: see events.rs).
const DISPATCH_TICK: Duration = Duration::from_millis(10);

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    refused: AtomicU64,
    dropped: AtomicU64,
    commands: AtomicU64,
    errors: AtomicU64,
}

#[derive(Debug)]
struct Subscriber {
    client: u64,
    mask: u32,
    tx: SyncSender<Arc<str>>,
    /// Set by the dispatcher when the queue was full: the client closes.
    lagging: Arc<AtomicBool>,
}

/// A client as the accept loop sees it: when it was last heard from,
/// whether it subscribed, whether it was told to make room.
#[derive(Debug)]
struct Slot {
    id: u64,
    last_heard_ms: AtomicU64,
    subscribed: AtomicBool,
    evicted: AtomicBool,
}

struct Shared {
    started: Instant,
    backend: IommuBackend,
    info: DaemonInfo,
    limits: Limits,
    stop: AtomicBool,
    clients: AtomicUsize,
    next_client: AtomicU64,
    counters: Counters,
    subscribers: Mutex<Vec<Subscriber>>,
    slots: Mutex<Vec<Arc<Slot>>>,
    /// Wakes the dispatcher when the first subscriber comes (and at stop).
    subscribed: Condvar,
}

impl Shared {
    fn subscribers(&self) -> MutexGuard<'_, Vec<Subscriber>> {
        self.subscribers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tell the event sources which kinds `subs` (the subscribers, under
    /// their lock) want now: no other is built.
    fn tell_sources(&self, subs: &[Subscriber]) {
        self.backend
            .telemetry()
            .events()
            .subscriptions(subs.iter().map(|s| s.mask));
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// At the cap of clients: tell the one silent the longest (at least
    /// [`EVICT_IDLE`], without a subscription) to make room. False if none
    /// may be.
    fn evict_one(&self) -> bool {
        let now = self.now_ms();
        let min_idle = EVICT_IDLE.as_millis() as u64;
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let oldest = slots
            .iter()
            .filter(|s| !s.evicted.load(Ordering::Relaxed) && !s.subscribed.load(Ordering::Relaxed))
            .filter(|s| now.saturating_sub(s.last_heard_ms.load(Ordering::Relaxed)) >= min_idle)
            .min_by_key(|s| s.last_heard_ms.load(Ordering::Relaxed));
        match oldest {
            Some(s) => {
                s.evicted.store(true, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    fn control_counters(&self) -> ControlCounters {
        let c = &self.counters;
        ControlCounters {
            clients: self.clients.load(Ordering::Relaxed) as u64,
            accepted: c.accepted.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            commands: c.commands.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
        }
    }
}

/// The control socket, served until dropped (its path is removed then,
/// if it still names this socket).
pub struct ControlServer {
    shared: Arc<Shared>,
    file: Option<SocketFile>,
    /// The listening socket, to wake the accept at the stop.
    waker: UnixListener,
    accept: Option<JoinHandle<()>>,
    dispatch: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer")
            .field("path", &self.file.as_ref().map(SocketFile::path))
            .field("counters", &self.shared.control_counters())
            .finish_non_exhaustive()
    }
}

impl ControlServer {
    /// Serve `listener` (placed as `file`, if it was bound at a path) for
    /// `backend`.
    pub fn start(
        listener: UnixListener,
        file: Option<SocketFile>,
        backend: IommuBackend,
        info: DaemonInfo,
        limits: Limits,
    ) -> io::Result<Self> {
        let events = backend.telemetry().events().take_receiver();
        let shared = Arc::new(Shared {
            started: Instant::now(),
            backend,
            info,
            limits,
            stop: AtomicBool::new(false),
            clients: AtomicUsize::new(0),
            next_client: AtomicU64::new(0),
            counters: Counters::default(),
            subscribers: Mutex::default(),
            slots: Mutex::default(),
            subscribed: Condvar::new(),
        });
        let dispatch = match events {
            Some(rx) => {
                let s = shared.clone();
                Some(
                    std::thread::Builder::new()
                        .name("control-events".into())
                        .spawn(move || dispatch(&s, &rx))?,
                )
            }
            None => None,
        };
        let s = shared.clone();
        let waker = listener.try_clone()?;
        let accept = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || accept_loop(&s, &listener))?;
        Ok(Self {
            shared,
            file,
            waker,
            accept: Some(accept),
            dispatch,
        })
    }

    /// The socket's own counters.
    pub fn counters(&self) -> ControlCounters {
        self.shared.control_counters()
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.subscribed.notify_all();
        // Wake the accept, even if the socket's path is gone; the client
        // threads see the stop within a tick.
        crate::listen::wake_accept(&self.waker);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        if let Some(f) = &self.file {
            f.remove();
        }
        if let Some(t) = self.dispatch.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: &UnixListener) {
    log::info!("control socket: serving");
    loop {
        let accepted = listener.accept();
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // Out of files, most likely: not a busy loop.
                log::warn!("control socket: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        // At the cap, a client silent for a while makes room: held-open
        // connections cannot lock the operator out. Those told to go and
        // still on their way out are at most one per slot, so there are
        // never more than twice the cap.
        let max = shared.limits.max_clients;
        if shared.clients.load(Ordering::SeqCst) >= max && !shared.evict_one() {
            shared.counters.refused.fetch_add(1, Ordering::Relaxed);
            refuse(stream, max);
            continue;
        }
        shared.clients.fetch_add(1, Ordering::SeqCst);
        shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
        let id = shared.next_client.fetch_add(1, Ordering::Relaxed);
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("control-client".into())
            .spawn(move || serve_client(&s, stream, id));
        if let Err(e) = spawned {
            shared.clients.fetch_sub(1, Ordering::SeqCst);
            log::warn!("control socket: cannot start a client thread: {e}");
        }
    }
}

/// Tell a client over the cap why it is closed, without waiting for it.
fn refuse(stream: UnixStream, max: usize) {
    let line = answer_line(None, Err(ProtocolError::TooManyClients(max)));
    if stream.set_nonblocking(true).is_ok() {
        let _ = (&stream).write(&line);
    }
}

fn answer_line(id: Option<Value>, result: Result<Value, ProtocolError>) -> Vec<u8> {
    let mut line = serde_json::to_vec(&protocol::answer(id, result))
        .unwrap_or_else(|_| br#"{"error":{"class":"ParseError","desc":"unencodable"}}"#.to_vec());
    line.push(b'\n');
    line
}

/// The dispatcher: each event made into its line once, and offered to each
/// subscriber that asked for its kind; a subscriber whose queue is full is
/// marked lagging (its thread closes it).
fn dispatch(shared: &Shared, rx: &Receiver<Stamped>) {
    loop {
        {
            let mut subs = shared.subscribers();
            while subs.is_empty() && !shared.stop.load(Ordering::SeqCst) {
                subs = shared
                    .subscribed
                    .wait_timeout(subs, Duration::from_secs(1))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let mut any = false;
        for _ in 0..1024 {
            let ev = match rx.try_recv() {
                Ok(ev) => ev,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return,
            };
            any = true;
            let Some(line) = event_line(&ev) else {
                continue;
            };
            let bit = ev.event.bit();
            for s in shared.subscribers().iter().filter(|s| s.mask & bit != 0) {
                if let Err(TrySendError::Full(_)) = s.tx.try_send(line.clone()) {
                    s.lagging.store(true, Ordering::Relaxed);
                }
            }
        }
        if !any {
            std::thread::sleep(DISPATCH_TICK);
        }
    }
}

/// `{"event": KIND, "data": {...}, "time_us": N}` and its newline.
fn event_line(ev: &Stamped) -> Option<Arc<str>> {
    let mut v = serde_json::to_value(ev.event).ok()?;
    v.as_object_mut()?
        .insert("time_us".into(), Value::from(ev.time_us));
    let mut s = v.to_string();
    s.push('\n');
    Some(s.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::client::{Client, ClientError};
    use crate::control::protocol::ErrorClass;
    use crate::control::Telemetry;
    use crate::mirror::MirrorHandle;
    use std::io::BufRead;
    use std::path::PathBuf;

    /// A server over a device without a front-end, at a fresh path.
    fn server(name: &str, limits: Limits) -> (ControlServer, PathBuf) {
        let config = crate::config::RawConfig {
            endpoints: Some("8,9".into()),
            ..Default::default()
        }
        .check()
        .unwrap();
        let device = crate::emulated::device(&config).unwrap();
        let backend = IommuBackend::new(device, MirrorHandle::disconnected())
            .with_telemetry(Arc::new(Telemetry::new(true)));
        let path = std::env::temp_dir().join(format!("vui-control-{name}-{}", std::process::id()));
        let (listener, file) = crate::listen::listen_at(&path, Default::default()).unwrap();
        let info = DaemonInfo { mode: "emulated" };
        let s = ControlServer::start(listener, Some(file), backend, info, limits).unwrap();
        (s, path)
    }

    fn raw(path: &Path) -> (UnixStream, io::BufReader<UnixStream>) {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let r = io::BufReader::new(s.try_clone().unwrap());
        (s, r)
    }

    fn line(r: &mut impl BufRead) -> Value {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l:?}"))
    }

    use std::path::Path;

    #[test]
    fn commands_are_answered_and_bad_lines_get_errors_not_a_closed_socket() {
        let (_s, path) = server("answers", Limits::default());
        let (mut w, mut r) = raw(&path);
        assert_eq!(line(&mut r)["greeting"]["protocol"], PROTOCOL);
        for (input, class) in [
            ("garbage\n", "ParseError"),
            ("{\"execute\":\"reboot\",\"id\":3}\n", "CommandNotFound"),
            ("\u{0}\u{ff}\n", "ParseError"),
            (
                "{\"execute\":\"mappings\",\"arguments\":{\"domain\":1}}\n",
                "NotFound",
            ),
            (
                "{\"execute\":\"status\",\"arguments\":{\"x\":1}}\n",
                "InvalidArgument",
            ),
        ] {
            w.write_all(input.as_bytes()).unwrap();
            let a = line(&mut r);
            assert_eq!(a["error"]["class"], class, "{input:?}: {a}");
        }
        // Blank lines are skipped; a command split over writes is one.
        w.write_all(b"\n\r\n{\"execute\":\"sta").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        w.write_all(b"tus\",\"id\":\"s\"}\r\n").unwrap();
        let a = line(&mut r);
        assert_eq!(a["id"], "s");
        assert_eq!(a["return"]["mode"], "emulated");
        assert_eq!(a["return"]["device"]["endpoints"], 2);
        assert_eq!(a["return"]["control"]["errors"], 5);
    }

    #[test]
    fn a_line_too_long_is_an_error_and_the_end_of_the_connection() {
        let (_s, path) = server("long", Limits::default());
        let (mut w, mut r) = raw(&path);
        line(&mut r);
        let _ = w.write_all(&vec![b'x'; MAX_LINE * 4]);
        assert_eq!(line(&mut r)["error"]["class"], "LineTooLong");
        let mut rest = String::new();
        assert_eq!(r.read_line(&mut rest).unwrap(), 0, "closed");
    }

    #[test]
    fn clients_over_the_cap_are_refused_and_others_served_after() {
        let limits = Limits {
            max_clients: 2,
            ..Limits::default()
        };
        let (s, path) = server("cap", limits);
        let mut a = Client::connect(&path, Duration::from_secs(5)).unwrap();
        let b = Client::connect(&path, Duration::from_secs(5)).unwrap();
        match Client::connect(&path, Duration::from_secs(5)) {
            Err(ClientError::Daemon { class, .. }) => assert_eq!(class, ErrorClass::TooManyClients),
            other => panic!("{other:?}"),
        }
        // Once one has been silent a while, a newcomer takes its place:
        // the silent one (b) goes, the one that spoke (a) stays.
        std::thread::sleep(EVICT_IDLE + Duration::from_millis(100));
        let _: Status = a.call("status", Value::Null).unwrap();
        let mut n = Client::connect(&path, Duration::from_secs(5)).unwrap();
        let _: Status = n.call("status", Value::Null).unwrap();
        let _: Status = a.call("status", Value::Null).unwrap();
        drop((a, b, n));
        let deadline = Instant::now() + Duration::from_secs(5);
        while s.counters().clients > 0 {
            assert!(Instant::now() < deadline, "clients never left");
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut c = Client::connect(&path, Duration::from_secs(5)).unwrap();
        let st: Status = c.call("status", Value::Null).unwrap();
        assert_eq!(st.control.refused, 1);
    }

    #[test]
    fn silent_clients_and_half_lines_are_closed_at_their_deadlines() {
        let limits = Limits {
            idle: Duration::from_millis(300),
            line: Duration::from_millis(300),
            ..Limits::default()
        };
        let (s, path) = server("deadlines", limits);
        for half in [false, true] {
            let (mut w, mut r) = raw(&path);
            line(&mut r);
            if half {
                w.write_all(b"{\"execute\":").unwrap();
            }
            let t0 = Instant::now();
            let mut rest = String::new();
            assert_eq!(r.read_line(&mut rest).unwrap(), 0, "closed");
            assert!(t0.elapsed() < Duration::from_secs(3));
        }
        assert_eq!(s.counters().dropped, 2);
    }

    #[test]
    fn a_client_that_never_reads_is_dropped_without_holding_anyone_else() {
        let limits = Limits {
            write: Duration::from_millis(300),
            ..Limits::default()
        };
        let (s, path) = server("noread", limits);
        let (mut w, _r) = raw(&path);
        // Commands whose answers it never reads, until the socket's buffer
        // is full and the daemon gives up on it.
        let cmd = b"{\"execute\":\"counters\"}\n".repeat(64);
        w.set_write_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let t0 = Instant::now();
        while w.write_all(&cmd).is_ok() && t0.elapsed() < Duration::from_secs(10) {}
        let mut c = Client::connect(&path, Duration::from_secs(5)).unwrap();
        let _: Status = c.call("status", Value::Null).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while s.counters().dropped == 0 {
            assert!(
                Instant::now() < deadline,
                "the silent reader was never dropped"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn the_server_stops_even_when_its_socket_file_is_gone() {
        let (s, path) = server("unlinked", Limits::default());
        let _c = Client::connect(&path, Duration::from_secs(5)).unwrap();
        std::fs::remove_file(&path).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(s);
            tx.send(()).unwrap();
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the stop waited for an accept nobody could wake");
    }

    #[test]
    fn only_the_kinds_subscribed_to_are_built_and_none_once_all_left() {
        use crate::control::events::{ENDPOINT_EVENTS, REQUEST_EVENTS, RESET_EVENT};
        let (s, path) = server("wanted", Limits::default());
        let events = s.shared.backend.telemetry().events();
        assert!(!events.wants(u32::MAX), "nobody subscribed: nothing built");
        let mut ops = Client::connect(&path, Duration::from_secs(5)).unwrap();
        let _: Subscription = ops
            .call("subscribe", serde_json::json!({"events": ["reset"]}))
            .unwrap();
        // An operator watching resets costs the request path nothing.
        assert!(events.wants(RESET_EVENT));
        assert!(!events.wants(REQUEST_EVENTS | ENDPOINT_EVENTS));
        let mut maps = Client::connect(&path, Duration::from_secs(5)).unwrap();
        let _: Subscription = maps
            .call("subscribe", serde_json::json!({"events": ["map"]}))
            .unwrap();
        assert!(events.wants(RESET_EVENT) && events.wants(REQUEST_EVENTS));
        // Subscribing again replaces the kinds.
        let _: Subscription = maps
            .call(
                "subscribe",
                serde_json::json!({"events": ["endpoint_attached"]}),
            )
            .unwrap();
        assert!(!events.wants(REQUEST_EVENTS) && events.wants(ENDPOINT_EVENTS));
        let _: Value = maps.call("unsubscribe", Value::Null).unwrap();
        assert!(!events.wants(ENDPOINT_EVENTS) && events.wants(RESET_EVENT));
        assert_eq!(events.counters().subscribers, 1);
        // A subscriber that goes away takes its kinds with it.
        drop(ops);
        let deadline = Instant::now() + Duration::from_secs(5);
        while events.wants(u32::MAX) {
            assert!(Instant::now() < deadline, "the kinds of a gone client");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(events.counters().subscribers, 0);
    }

    #[test]
    fn subscribers_get_the_kinds_they_asked_for_and_the_socket_goes_with_the_server() {
        let (s, path) = server("events", Limits::default());
        let mut c = Client::connect(&path, Duration::from_secs(5)).unwrap();
        let sub: Subscription = c
            .call(
                "subscribe",
                serde_json::json!({"events": ["front_end_connected"]}),
            )
            .unwrap();
        assert_eq!(sub.events, ["front_end_connected"]);
        let t = s.shared.backend.telemetry().clone();
        t.front_end_left();
        t.front_end_came(Some(42));
        t.front_end_left();
        let e = c.next_event(Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!(e["event"], "front_end_connected");
        assert_eq!(e["data"]["pid"], 42);
        assert!(e["time_us"].is_u64());
        assert!(c.next_event(Duration::from_millis(200)).unwrap().is_none());
        let st: Status = c.call("status", Value::Null).unwrap();
        assert!(!st.front_end.connected);
        assert_eq!(st.front_end.connections, 1);
        drop(s);
        assert!(!path.exists());
    }
}
