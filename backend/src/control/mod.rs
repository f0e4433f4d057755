// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Watching the daemon while it runs: the control socket
//! (`--control-socket PATH`, docs/control-socket.md) and what the request
//! path leaves for it.
//!
//! - [`Telemetry`]: what the request path, the mirror and the serve loop
//!   record — latency histograms ([`histogram`]), events for subscribers
//!   and recent faults ([`events`]), whether a front-end is connected. The
//!   request path only ever does lock-free atomic updates here, and none
//!   at all without a control socket;
//! - [`protocol`]: the commands and answers, JSON lines (like QMP);
//! - [`server`]: the socket's own threads (accept, one per client, the
//!   event dispatcher); snapshots of the device are copied out under the
//!   device lock a bounded page at a time (src/vhu_iommu/inspect.rs);
//! - [`client`] and [`ctl`]: `vhost-user-iommu ctl`, the socket for people
//!   (tables) and scripts (`--json`).

pub mod client;
pub mod ctl;
pub mod events;
pub mod histogram;
pub mod protocol;
pub mod server;
mod show;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use events::{Event, EventQueue, FaultRecord, FaultRing, Held};
pub use histogram::Histogram;
pub use server::ControlServer;

use crate::ioas::IommuDevice;
use crate::mirror::Record;
use events::{ENDPOINT_EVENTS, REQUEST_EVENTS, RESET_EVENT};

/// Request types by their type byte (virtio 1.2 §5.13.6), index 0 for
/// anything else: the latency histograms' order.
pub const REQUEST_KINDS: [&str; 6] = ["other", "attach", "detach", "map", "unmap", "probe"];

/// Service-time histograms.
#[derive(Debug, Default)]
pub struct Latency {
    /// Per request type ([`REQUEST_KINDS`]): from the end of the previous
    /// request of its batch (or the batch's start) to its reply written —
    /// claiming and reading its chain, carrying it out, writing the reply.
    pub requests: [Histogram; 6],
    /// Per batch: from taking the device lock to the used ring updated,
    /// waits for QEMU's ACK included.
    pub batches: Histogram,
}

/// The last saved state the device took ([`Telemetry::state_restored`]),
/// for `status`: a client that connects after it learns it there (the
/// state file's is taken as the daemon starts, before any client can
/// connect, let alone subscribe).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Restored {
    /// `state_file` or `migration`.
    pub source: &'static str,
    /// What the device held once it took the state.
    pub held: Held,
    /// When: microseconds since the daemon started, as events' `time_us`.
    pub time_us: u64,
}

/// What the daemon records for its control socket (see the module doc).
#[derive(Debug)]
pub struct Telemetry {
    started: Instant,
    /// Whether anything is recorded: a control socket exists.
    on: bool,
    latency: Latency,
    events: EventQueue,
    faults: Mutex<FaultRing>,
    /// Written by restores only (the daemon's start, a migration's state
    /// loaded), read by `status`: never the request path.
    restored: Mutex<Option<Restored>>,
    front_end: AtomicBool,
    /// The front-end's process (0: unknown or none).
    front_end_pid: AtomicU32,
    connections: AtomicU64,
}

impl Default for Telemetry {
    /// Nothing recorded: no control socket.
    fn default() -> Self {
        Self::new(false)
    }
}

impl Telemetry {
    /// `on`: a control socket will read it.
    pub fn new(on: bool) -> Self {
        let started = Instant::now();
        Self {
            started,
            on,
            latency: Latency::default(),
            // No control socket: a queue of one, never used.
            events: EventQueue::new(started, if on { events::EVENT_QUEUE } else { 1 }),
            faults: Mutex::default(),
            restored: Mutex::default(),
            front_end: AtomicBool::new(false),
            front_end_pid: AtomicU32::new(0),
            connections: AtomicU64::new(0),
        }
    }

    /// Whether a control socket reads this.
    pub fn on(&self) -> bool {
        self.on
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The time to measure a batch from: `None` without a control socket
    /// (then no clock is read either).
    #[inline]
    pub fn clock(&self) -> Option<Instant> {
        self.on.then(Instant::now)
    }

    /// A request of type byte `kind` took from `since` to now; the next is
    /// measured from the returned instant.
    #[inline]
    pub fn request_done(&self, kind: u8, since: Instant) -> Instant {
        let now = Instant::now();
        let i = usize::from(kind).min(REQUEST_KINDS.len() - 1);
        self.latency.requests[i].record(now.saturating_duration_since(since));
        now
    }

    /// A batch took from `since` to now.
    #[inline]
    pub fn batch_done(&self, since: Instant) {
        self.latency.batches.record(since.elapsed());
    }

    pub fn latency(&self) -> &Latency {
        &self.latency
    }

    pub fn events(&self) -> &EventQueue {
        &self.events
    }

    /// A request (its readable bytes) was answered with `reply`: its event
    /// goes to the subscribers, if there are any of request events (none:
    /// nothing is done).
    #[inline]
    pub fn request_event(&self, req: &[u8], reply: &[u8]) {
        if self.events.wants(REQUEST_EVENTS) {
            if let Some(e) = Event::of_request(req, reply) {
                self.events.publish(e);
            }
        }
    }

    /// A batch of changes sent the mirror `records`: the endpoints it
    /// attached and detached, for their subscribers. Once per batch (the
    /// device lock held): without a control socket, one test of a field;
    /// without a subscriber of those kinds, one relaxed load.
    #[inline]
    pub fn endpoint_changes(&self, records: &[Record]) {
        if self.on && self.events.wants(ENDPOINT_EVENTS) {
            records
                .iter()
                .filter_map(Event::of_record)
                .for_each(|e| self.events.publish(e));
        }
    }

    /// The device is reset for `kind`'s reason
    /// ([`crate::session::Reset::name`]), holding what `device` holds
    /// before.
    pub fn reset(&self, kind: &'static str, device: &IommuDevice) {
        if self.events.wants(RESET_EVENT) {
            let held = Held::of(device);
            self.events.publish(Event::Reset { kind, held });
        }
    }

    /// `device` took a saved state from `source` (`state_file`,
    /// `migration`): kept for `status` ([`Self::last_restore`]) and
    /// published to its subscribers. Never on the request path: once at
    /// the daemon's start, or for a migration's state.
    pub fn state_restored(&self, source: &'static str, device: &IommuDevice) {
        if !self.on {
            return;
        }
        let restored = Restored {
            source,
            held: Held::of(device),
            time_us: self.events.now_us(),
        };
        *self.restored.lock().unwrap_or_else(|e| e.into_inner()) = Some(restored);
        let event = Event::StateRestored {
            source,
            held: restored.held,
        };
        self.events.publish_at(restored.time_us, event);
    }

    /// The last saved state the device took since the daemon started, if
    /// any.
    pub fn last_restore(&self) -> Option<Restored> {
        *self.restored.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fault event was written into a buffer of the guest's event queue.
    pub fn fault_reported(&self, f: &virtio_iommu::FaultEvent) {
        self.events
            .publish(Event::FaultReported(FaultRecord::of_event(f)));
    }

    /// A fault event never reached the guest, for `why` ([`Event::FaultDropped`]).
    pub fn fault_dropped(&self, f: &virtio_iommu::FaultEvent, why: &'static str) {
        self.events.publish(Event::FaultDropped {
            fault: FaultRecord::of_event(f),
            why,
        });
    }

    /// QEMU reported a fault (the mirror's reader thread).
    pub fn fault(&self, f: FaultRecord) {
        if !self.on {
            return;
        }
        let time_us = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(time_us, f);
        self.events.publish(Event::Fault(f));
    }

    /// The recent faults (oldest first) and how many there were in all.
    pub fn recent_faults(&self) -> (Vec<(u64, FaultRecord)>, u64) {
        let r = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        (r.recent().copied().collect(), r.total())
    }

    /// A front-end connected (its process, if found) or left (`None`
    /// connected: see [`Self::front_end_left`]).
    pub fn front_end_came(&self, pid: Option<u32>) {
        self.front_end.store(true, Ordering::Relaxed);
        self.front_end_pid
            .store(pid.unwrap_or(0), Ordering::Relaxed);
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.events.publish(Event::FrontEndConnected { pid });
    }

    pub fn front_end_left(&self) {
        if self.front_end.swap(false, Ordering::Relaxed) {
            self.front_end_pid.store(0, Ordering::Relaxed);
            self.events.publish(Event::FrontEndDisconnected);
        }
    }

    /// Whether a front-end is connected, its process if known, and how
    /// many have connected since the daemon started.
    pub fn front_end(&self) -> (bool, Option<u32>, u64) {
        let pid = self.front_end_pid.load(Ordering::Relaxed);
        (
            self.front_end.load(Ordering::Relaxed),
            (pid != 0).then_some(pid),
            self.connections.load(Ordering::Relaxed),
        )
    }
}
