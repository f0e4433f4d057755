// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Events for the control socket's subscribers, and the ring of recent
//! faults.
//!
//! The rule: an event never makes its source wait. The request path (and
//! the mirror and serve threads) hand events to a bounded queue with
//! `try_send` — a lock-free slot claim on the standard library's array
//! channel, whose receiver never sleeps on it (the dispatcher polls with
//! `try_recv`, so no sender ever has a waiter to wake) — and an event that
//! finds the queue full is dropped and counted. With no subscriber, no
//! event is even built: one relaxed load decides.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;
use virtio_iommu::request::{self, Request};
use virtio_iommu::wire::fault;

/// Events waiting for the dispatcher.
pub const EVENT_QUEUE: usize = 4096;
/// Faults kept for `faults`.
pub const FAULT_RING: usize = 64;

/// Something that happened, as a subscriber reads it
/// (`{"event": KIND, "data": {...}, "time_us": ...}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "event", content = "data", rename_all = "snake_case")]
pub enum Event {
    /// An ATTACH request, and the status the device answered.
    Attach {
        domain: u32,
        endpoint: u32,
        bypass: bool,
        status: &'static str,
    },
    Detach {
        domain: u32,
        endpoint: u32,
        status: &'static str,
    },
    Map {
        domain: u32,
        virt_start: u64,
        virt_end: u64,
        phys_start: u64,
        flags: u32,
        status: &'static str,
    },
    Unmap {
        domain: u32,
        virt_start: u64,
        virt_end: u64,
        status: &'static str,
    },
    /// An emulated device's DMA faulted in QEMU (docs/mirror-protocol.md
    /// §10).
    Fault(FaultRecord),
    /// A vhost-user front-end connected (`pid`: its process, if found).
    FrontEndConnected {
        pid: Option<u32>,
    },
    FrontEndDisconnected,
}

/// A fault, as `faults` and the `fault` event give it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct FaultRecord {
    pub endpoint: u32,
    pub address: u64,
    /// `unknown`, `domain` or `mapping` (VIRTIO_IOMMU_FAULT_R_*).
    pub reason: &'static str,
    /// READ 1, WRITE 2, EXEC 4 (VIRTIO_IOMMU_FAULT_F_*).
    pub flags: u32,
}

impl FaultRecord {
    pub fn new(reason: u8, flags: u32, endpoint: u32, address: u64) -> Self {
        Self {
            endpoint,
            address,
            reason: match reason {
                fault::R_DOMAIN => "domain",
                fault::R_MAPPING => "mapping",
                _ => "unknown",
            },
            flags: flags & (fault::F_READ | fault::F_WRITE | fault::F_EXEC),
        }
    }
}

/// The kinds, as subscribers name them; bit `i` of a subscription's mask
/// is `KINDS[i]`.
pub const KINDS: [&str; 7] = [
    "attach",
    "detach",
    "map",
    "unmap",
    "fault",
    "front_end_connected",
    "front_end_disconnected",
];

impl Event {
    /// Its bit in a subscription mask.
    pub fn bit(&self) -> u32 {
        1 << match self {
            Event::Attach { .. } => 0,
            Event::Detach { .. } => 1,
            Event::Map { .. } => 2,
            Event::Unmap { .. } => 3,
            Event::Fault(_) => 4,
            Event::FrontEndConnected { .. } => 5,
            Event::FrontEndDisconnected => 6,
        }
    }

    /// The event of a request (its device-readable bytes) the device
    /// answered with `reply`; none for PROBE and requests that did not
    /// parse.
    pub fn of_request(req: &[u8], reply: &[u8]) -> Option<Self> {
        let status = status_name(*reply.get(reply.len().checked_sub(4)?)?);
        Some(match request::parse(req).ok()? {
            Request::Attach {
                domain,
                endpoint,
                flags,
                ..
            } => Event::Attach {
                domain,
                endpoint,
                bypass: flags & virtio_iommu::wire::ATTACH_F_BYPASS != 0,
                status,
            },
            Request::Detach { domain, endpoint } => Event::Detach {
                domain,
                endpoint,
                status,
            },
            Request::Map(m) => Event::Map {
                domain: m.domain,
                virt_start: m.virt_start,
                virt_end: m.virt_end,
                phys_start: m.phys_start,
                flags: m.flags,
                status,
            },
            Request::Unmap(u) => Event::Unmap {
                domain: u.domain,
                virt_start: u.virt_start,
                virt_end: u.virt_end,
                status,
            },
            Request::Probe { .. } => return None,
        })
    }
}

/// A request status by its name in virtio 1.2 §5.13.6
/// (VIRTIO_IOMMU_S_*), lower case.
pub fn status_name(status: u8) -> &'static str {
    match status {
        0 => "ok",
        1 => "ioerr",
        2 => "unsupp",
        3 => "deverr",
        4 => "inval",
        5 => "range",
        6 => "noent",
        7 => "fault",
        8 => "nomem",
        _ => "unknown",
    }
}

/// An event and when it happened (microseconds since the daemon started).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamped {
    pub time_us: u64,
    pub event: Event,
}

/// The sources' end of the event queue (see the module doc).
#[derive(Debug)]
pub struct EventQueue {
    started: Instant,
    tx: SyncSender<Stamped>,
    rx: Mutex<Option<Receiver<Stamped>>>,
    subscribers: AtomicUsize,
    published: AtomicU64,
    dropped: AtomicU64,
}

/// The event queue's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct EventCounters {
    pub subscribers: u64,
    /// Events queued for the subscribers.
    pub published: u64,
    /// Events dropped because the queue was full.
    pub dropped: u64,
}

impl EventQueue {
    pub fn new(started: Instant, capacity: usize) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel(capacity);
        Self {
            started,
            tx,
            rx: Mutex::new(Some(rx)),
            subscribers: AtomicUsize::new(0),
            published: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Whether anyone listens: without, no event is built.
    #[inline]
    pub fn wanted(&self) -> bool {
        self.subscribers.load(Ordering::Relaxed) > 0
    }

    /// Queue `event` if anyone listens; never waits: a full queue drops it
    /// (counted).
    pub fn publish(&self, event: Event) {
        if !self.wanted() {
            return;
        }
        let time_us = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        match self.tx.try_send(Stamped { time_us, event }) {
            Ok(()) => self.published.fetch_add(1, Ordering::Relaxed),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed)
            }
        };
    }

    /// The receiving end, once (the control server's dispatcher).
    pub fn take_receiver(&self) -> Option<Receiver<Stamped>> {
        self.rx.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// A subscriber came or went.
    pub fn subscribed(&self, yes: bool) {
        if yes {
            self.subscribers.fetch_add(1, Ordering::Relaxed);
        } else {
            self.subscribers.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub fn counters(&self) -> EventCounters {
        EventCounters {
            subscribers: self.subscribers.load(Ordering::Relaxed) as u64,
            published: self.published.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }
}

/// The last [`FAULT_RING`] faults, oldest first, and how many there were.
/// Written by the mirror's reader thread, never the request path.
#[derive(Debug, Default)]
pub struct FaultRing {
    ring: VecDeque<(u64, FaultRecord)>,
    total: u64,
}

impl FaultRing {
    pub fn push(&mut self, time_us: u64, f: FaultRecord) {
        if self.ring.len() == FAULT_RING {
            self.ring.pop_front();
        }
        self.ring.push_back((time_us, f));
        self.total += 1;
    }

    pub fn recent(&self) -> impl Iterator<Item = &(u64, FaultRecord)> + '_ {
        self.ring.iter()
    }

    pub fn total(&self) -> u64 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_subscribers_nothing_is_queued_and_a_full_queue_drops() {
        let q = EventQueue::new(Instant::now(), 2);
        q.publish(Event::FrontEndDisconnected);
        assert_eq!(q.counters(), EventCounters::default());
        q.subscribed(true);
        for _ in 0..3 {
            q.publish(Event::FrontEndDisconnected);
        }
        let c = q.counters();
        assert_eq!((c.published, c.dropped), (2, 1));
        let rx = q.take_receiver().unwrap();
        assert_eq!(rx.try_iter().count(), 2);
        assert!(q.take_receiver().is_none());
    }

    #[test]
    fn request_events_carry_the_requests_fields_and_status() {
        let map = test_frontend_free_map();
        assert_eq!(
            Event::of_request(&map, &[6, 0, 0, 0]).unwrap().bit(),
            1 << 2
        );
        assert!(matches!(
            Event::of_request(&map, &[6, 0, 0, 0]),
            Some(Event::Map {
                domain: 1,
                virt_start: 0x1000,
                virt_end: 0x1fff,
                phys_start: 0x8000,
                flags: 3,
                status: "noent"
            })
        ));
        assert_eq!(Event::of_request(&map, &[]), None, "no tail");
        assert_eq!(Event::of_request(&[5, 0, 0, 0], &[0; 4]), None, "PROBE");
    }

    /// A MAP request's bytes (virtio 1.2 §5.13.6.5).
    fn test_frontend_free_map() -> Vec<u8> {
        let mut b = vec![3u8, 0, 0, 0];
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&0x1000u64.to_le_bytes());
        b.extend_from_slice(&0x1fffu64.to_le_bytes());
        b.extend_from_slice(&0x8000u64.to_le_bytes());
        b.extend_from_slice(&3u32.to_le_bytes());
        b
    }

    #[test]
    fn the_fault_ring_keeps_the_last_and_counts_all() {
        let mut r = FaultRing::default();
        for i in 0..(FAULT_RING as u64 + 5) {
            r.push(i, FaultRecord::new(2, 1, 8, i));
        }
        assert_eq!(r.total(), FAULT_RING as u64 + 5);
        assert_eq!(r.recent().count(), FAULT_RING);
        assert_eq!(r.recent().next().unwrap().0, 5);
    }
}
