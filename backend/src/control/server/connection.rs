// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One client's connection: its thread reads command lines within their
//! deadlines, answers each, and forwards the events it subscribed to
//! (docs/control-socket.md; the bounds are the parent module's).

use super::*;

/// Why a client's connection ended.
#[derive(Debug, thiserror::Error)]
enum Closed {
    #[error("the client closed it")]
    ByClient,
    #[error("the server stops")]
    Stopping,
    #[error("{0}")]
    Dropped(&'static str),
    #[error("{0}")]
    Io(io::Error),
}

pub(super) fn serve_client(shared: &Arc<Shared>, stream: UnixStream, id: u64) {
    let slot = Arc::new(Slot {
        id,
        last_heard_ms: AtomicU64::new(shared.now_ms()),
        subscribed: AtomicBool::new(false),
        evicted: AtomicBool::new(false),
    });
    shared
        .slots
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(slot.clone());
    let mut client = Client {
        shared: shared.clone(),
        stream,
        id,
        slot,
        input: Vec::with_capacity(1024),
        partial_since: None,
        last_heard: Instant::now(),
        subscription: None,
    };
    match client.run() {
        Ok(()) | Err(Closed::ByClient | Closed::Stopping) => {}
        Err(e) => {
            shared.counters.dropped.fetch_add(1, Ordering::Relaxed);
            log::debug!("control socket: client {id} closed: {e}");
            client.linger();
        }
    }
    client.unsubscribe();
    shared
        .slots
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|s| s.id != id);
    shared.clients.fetch_sub(1, Ordering::SeqCst);
}

struct Client {
    shared: Arc<Shared>,
    stream: UnixStream,
    id: u64,
    slot: Arc<Slot>,
    /// Bytes of a line not yet whole, at most [`MAX_LINE`].
    input: Vec<u8>,
    partial_since: Option<Instant>,
    last_heard: Instant,
    subscription: Option<(Receiver<Arc<str>>, Arc<AtomicBool>)>,
}

impl Client {
    fn run(&mut self) -> Result<(), Closed> {
        let limits = self.shared.limits;
        self.stream
            .set_write_timeout(Some(limits.write))
            .map_err(Closed::Io)?;
        self.stream
            .set_read_timeout(Some(IDLE_TICK))
            .map_err(Closed::Io)?;
        let greeting = GreetingLine {
            greeting: Greeting {
                daemon: "vhost-user-iommu".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                protocol: PROTOCOL,
                commands: COMMANDS.iter().map(|c| c.to_string()).collect(),
            },
        };
        let mut line = serde_json::to_vec(&greeting).unwrap_or_default();
        line.push(b'\n');
        self.write(&line)?;
        let mut chunk = [0u8; 4096];
        loop {
            if self.shared.stop.load(Ordering::Relaxed) {
                return Err(Closed::Stopping);
            }
            self.forward_events()?;
            let now = Instant::now();
            if self
                .partial_since
                .is_some_and(|t| now.duration_since(t) > limits.line)
            {
                return Err(Closed::Dropped("a line did not arrive whole in time"));
            }
            if self.subscription.is_none() && now.duration_since(self.last_heard) > limits.idle {
                return Err(Closed::Dropped("idle"));
            }
            if self.slot.evicted.load(Ordering::Relaxed) {
                let line = answer_line(None, Err(ProtocolError::Evicted));
                let _ = self.write(&line);
                return Err(Closed::Dropped("silent while another client waited"));
            }
            let tick = match self.subscription {
                Some(_) => SUBSCRIBED_TICK,
                None => IDLE_TICK,
            };
            if !readable(&self.stream, tick)? {
                continue;
            }
            let n = match self.stream.read(&mut chunk) {
                Ok(0) => return Err(Closed::ByClient),
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(Closed::Io(e)),
            };
            self.last_heard = Instant::now();
            self.slot
                .last_heard_ms
                .store(self.shared.now_ms(), Ordering::Relaxed);
            self.take_input(&chunk[..n])?;
        }
    }

    /// Answer every whole line in `bytes` (after what came before); keep
    /// the rest, up to [`MAX_LINE`].
    fn take_input(&mut self, mut bytes: &[u8]) -> Result<(), Closed> {
        while let Some(end) = bytes.iter().position(|&b| b == b'\n') {
            if self.input.len() + end > MAX_LINE {
                return self.too_long();
            }
            let mut line = std::mem::take(&mut self.input);
            line.extend_from_slice(&bytes[..end]);
            bytes = &bytes[end + 1..];
            self.partial_since = None;
            self.line(&line)?;
            line.clear();
            self.input = line;
        }
        if self.input.len() + bytes.len() > MAX_LINE {
            return self.too_long();
        }
        self.input.extend_from_slice(bytes);
        if !self.input.is_empty() && self.partial_since.is_none() {
            self.partial_since = Some(Instant::now());
        }
        Ok(())
    }

    /// Before closing on a client: what it sent and we did not read would
    /// turn the close into a reset that loses our last answer (the error
    /// saying why), so our side is shut and its input read away, for
    /// [`LINGER`] at most.
    fn linger(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        let end = Instant::now() + LINGER;
        let mut sink = [0u8; 4096];
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            if self
                .stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .is_err()
            {
                return;
            }
            match self.stream.read(&mut sink) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    fn too_long(&mut self) -> Result<(), Closed> {
        self.count_error();
        let line = answer_line(None, Err(ProtocolError::LineTooLong));
        let _ = self.write(&line);
        Err(Closed::Dropped("line too long"))
    }

    fn count_error(&self) {
        self.shared.counters.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// One command line: its answer written.
    fn line(&mut self, line: &[u8]) -> Result<(), Closed> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        self.shared
            .counters
            .commands
            .fetch_add(1, Ordering::Relaxed);
        let (id, command) = protocol::parse(line);
        let result = command.and_then(|c| self.execute(c));
        if result.is_err() {
            self.count_error();
        }
        let answer = answer_line(id, result);
        self.write(&answer)
    }

    fn execute(&mut self, command: Command) -> Result<Value, ProtocolError> {
        let backend = &self.shared.backend;
        let value = match command {
            Command::Status => to_value(&self.status()),
            Command::Endpoints {
                start,
                count,
                attached,
            } => to_value(&backend.endpoints_page(start, count, attached)),
            Command::Domains { start, count } => to_value(&backend.domains_page(start, count)),
            Command::Mappings {
                domain,
                start,
                count,
            } => match backend.mappings_page(domain, start, count) {
                Some(m) => to_value(&m),
                None => return Err(ProtocolError::NoDomain(domain)),
            },
            Command::Translate {
                endpoint,
                iova,
                access,
            } => to_value(&backend.translate(endpoint, iova, access)),
            Command::Counters => to_value(&self.counters()),
            Command::Latency => to_value(&latency(backend)),
            Command::Faults => to_value(&faults(backend)),
            Command::Subscribe { mask } => {
                self.subscribe(mask);
                to_value(&Subscription {
                    events: protocol::kinds_of(mask),
                })
            }
            Command::Unsubscribe => {
                self.unsubscribe();
                to_value(&Subscription { events: Vec::new() })
            }
            Command::Commands => to_value(&COMMANDS),
        };
        Ok(value)
    }

    fn status(&self) -> Status {
        let backend = &self.shared.backend;
        let t = backend.telemetry();
        let (device, requests) = backend.summary();
        let (connected, pid, connections) = t.front_end();
        Status {
            version: env!("CARGO_PKG_VERSION").into(),
            mode: self.shared.info.mode.into(),
            pid: std::process::id(),
            uptime_ms: u64::try_from(t.uptime().as_millis()).unwrap_or(u64::MAX),
            front_end: FrontEnd {
                connected,
                pid,
                connections,
            },
            mirror: backend.mirror_status(),
            device,
            requests,
            control: self.shared.control_counters(),
            last_restore: t.last_restore().map(|r| protocol::Restore {
                source: r.source.into(),
                time_us: r.time_us,
                domains: r.held.domains,
                mappings: r.held.mappings,
                attached: r.held.attached,
            }),
        }
    }

    fn counters(&self) -> protocol::Counters {
        let backend = &self.shared.backend;
        let c = backend.counter_snapshot();
        protocol::Counters {
            requests: REQUEST_KINDS
                .iter()
                .enumerate()
                .map(|(i, k)| RequestCount {
                    kind: k.to_string(),
                    ok: c.ok[i],
                    failed: c.failed[i],
                })
                .collect(),
            device: c.device,
            queue: c.queue,
            table: c.table,
            events: backend.telemetry().events().counters(),
            control: self.shared.control_counters(),
        }
    }

    fn subscribe(&mut self, mask: u32) {
        let mut subs = self.shared.subscribers();
        if let Some(s) = subs.iter_mut().find(|s| s.client == self.id) {
            s.mask = mask;
            self.shared.tell_sources(&subs);
            return;
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(self.shared.limits.subscriber_queue);
        let lagging = Arc::new(AtomicBool::new(false));
        subs.push(Subscriber {
            client: self.id,
            mask,
            tx,
            lagging: lagging.clone(),
        });
        self.shared.tell_sources(&subs);
        drop(subs);
        self.subscription = Some((rx, lagging));
        self.slot.subscribed.store(true, Ordering::Relaxed);
        self.shared.subscribed.notify_all();
    }

    fn unsubscribe(&mut self) {
        if self.subscription.take().is_none() {
            return;
        }
        self.slot.subscribed.store(false, Ordering::Relaxed);
        let mut subs = self.shared.subscribers();
        subs.retain(|s| s.client != self.id);
        self.shared.tell_sources(&subs);
    }

    /// Write the event lines waiting for this subscriber.
    fn forward_events(&mut self) -> Result<(), Closed> {
        let Some((rx, lagging)) = &self.subscription else {
            return Ok(());
        };
        if lagging.load(Ordering::Relaxed) {
            let line = answer_line(None, Err(ProtocolError::TooSlow));
            let _ = self.write(&line);
            return Err(Closed::Dropped("a subscriber too slow for its events"));
        }
        let mut lines = Vec::new();
        while let Ok(line) = rx.try_recv() {
            lines.push(line);
            if lines.len() == 256 {
                break;
            }
        }
        for l in lines {
            self.write(l.as_bytes())?;
        }
        Ok(())
    }

    /// Write `bytes` whole within [`Limits::write`], or close.
    fn write(&mut self, bytes: &[u8]) -> Result<(), Closed> {
        let deadline = Instant::now() + self.shared.limits.write;
        let mut rest = bytes;
        while !rest.is_empty() {
            if Instant::now() > deadline {
                return Err(Closed::Dropped("an answer was not read in time"));
            }
            match self.stream.write(rest) {
                Ok(0) => return Err(Closed::ByClient),
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(Closed::Dropped("an answer was not read in time"))
                }
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Err(Closed::ByClient),
                Err(e) => return Err(Closed::Io(e)),
            }
        }
        Ok(())
    }
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn latency(backend: &IommuBackend) -> protocol::Latency {
    let l = backend.telemetry().latency();
    protocol::Latency {
        requests: REQUEST_KINDS
            .iter()
            .zip(&l.requests)
            .map(|(k, h)| KindLatency {
                kind: k.to_string(),
                histogram: h.snapshot(),
            })
            .collect(),
        batches: l.batches.snapshot(),
    }
}

fn faults(backend: &IommuBackend) -> Faults {
    let (recent, total) = backend.telemetry().recent_faults();
    Faults {
        faults: recent
            .into_iter()
            .map(|(time_us, f)| FaultRow {
                time_us,
                endpoint: f.endpoint,
                address: f.address,
                reason: f.reason.into(),
                flags: f.flags,
            })
            .collect(),
        total,
    }
}

/// Whether `stream` has input (or an end) within `timeout`.
fn readable(stream: &UnixStream, timeout: Duration) -> Result<bool, Closed> {
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd for a descriptor `stream` keeps open.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::Interrupted => Ok(false),
            _ => Err(Closed::Io(e)),
        };
    }
    Ok(n > 0)
}
