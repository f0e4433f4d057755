// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Events for the control socket's subscribers, and the ring of recent
//! faults.
//!
//! The rule: an event never makes its source wait. The request path (and
//! the mirror and serve threads) hand events to a bounded queue with
//! `try_send` — a lock-free slot claim on the standard library's array
//! channel, whose receiver never sleeps on it (the dispatcher polls with
//! `try_recv`, so no sender ever has a waiter to wake) — and an event that
//! finds the queue full is dropped and counted. With no subscriber of an
//! event's kind, it is not even built: one relaxed load of the kinds
//! subscribed to decides (per request, or per batch for the endpoints a
//! batch attached and detached).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;
use virtio_iommu::request::{self, Request};
use virtio_iommu::wire::fault;

use crate::mirror::Record;

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
    /// The device went back to power-on, in part or whole, for `kind`'s
    /// reason ([`crate::session::Reset::name`]); what it held then.
    Reset {
        kind: &'static str,
        #[serde(flatten)]
        held: Held,
    },
    /// A QEMU connected to the mirror socket (connection `connection`,
    /// `pid`: its process, if found).
    MirrorConnected {
        connection: u64,
        pid: Option<u32>,
    },
    /// A connection to the mirror socket was refused: `reason`
    /// `not_front_end` (not the front-end's process) or `busy` (a QEMU is
    /// connected).
    MirrorRefused {
        pid: Option<u32>,
        reason: &'static str,
    },
    /// A mirror connection ended: `how` is `closed` (QEMU closed it),
    /// `reset` (QEMU exited with data unread), `error` (what QEMU sent was
    /// not the protocol) or `dropped` (the daemon closed it: no ACK or read
    /// in time, the daemon stopping).
    MirrorDisconnected {
        connection: u64,
        how: &'static str,
    },
    /// An endpoint entered a domain (by the guest's ATTACH, or a state
    /// restored).
    EndpointAttached {
        endpoint: u32,
        domain: u32,
        bypass: bool,
    },
    /// An endpoint left a domain (by the guest's DETACH, or an ATTACH
    /// moving it to another). A reset detaches every endpoint: its
    /// [`Event::Reset`] stands for them.
    EndpointDetached {
        endpoint: u32,
        domain: u32,
    },
    /// A fault went into a buffer of the guest's event queue.
    FaultReported(FaultRecord),
    /// A fault never reached the guest: `why` is `no_buffer` (the guest
    /// posted none while [`FAULT_RING`] newer ones came), `bad_buffer` (the
    /// buffer could not hold it) or `reset` (the device was reset first).
    FaultDropped {
        #[serde(flatten)]
        fault: FaultRecord,
        why: &'static str,
    },
    /// The device took a saved state: `source` is `state_file` (a previous
    /// daemon's, at start) or `migration` (the source's, over
    /// `SET_DEVICE_STATE_FD`); what it holds now.
    StateRestored {
        source: &'static str,
        #[serde(flatten)]
        held: Held,
    },
}

/// What the device holds: its domains, their mappings, the endpoints
/// attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Held {
    pub domains: usize,
    pub mappings: usize,
    pub attached: usize,
}

impl Held {
    pub fn of(device: &crate::ioas::IommuDevice) -> Self {
        let s = device.stats();
        Self {
            domains: s.domains,
            mappings: s.mappings,
            attached: s.attached,
        }
    }
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
    /// The fault of an event written for the guest.
    pub fn of_event(e: &virtio_iommu::FaultEvent) -> Self {
        Self::new(
            e.reason,
            e.flags.into(),
            e.endpoint.into(),
            e.address.into(),
        )
    }

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
pub const KINDS: [&str; 16] = [
    "attach",
    "detach",
    "map",
    "unmap",
    "fault",
    "front_end_connected",
    "front_end_disconnected",
    "reset",
    "mirror_connected",
    "mirror_refused",
    "mirror_disconnected",
    "endpoint_attached",
    "endpoint_detached",
    "fault_reported",
    "fault_dropped",
    "state_restored",
];

/// The bits of the request events (`attach`, `detach`, `map`, `unmap`).
pub const REQUEST_EVENTS: u32 = 0b1111;
/// The bits of `endpoint_attached` and `endpoint_detached`.
pub const ENDPOINT_EVENTS: u32 = 0b11 << 11;
/// The bit of `reset`.
pub const RESET_EVENT: u32 = 1 << 7;
/// The bit of `state_restored`.
pub const STATE_EVENT: u32 = 1 << 15;

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
            Event::Reset { .. } => 7,
            Event::MirrorConnected { .. } => 8,
            Event::MirrorRefused { .. } => 9,
            Event::MirrorDisconnected { .. } => 10,
            Event::EndpointAttached { .. } => 11,
            Event::EndpointDetached { .. } => 12,
            Event::FaultReported(_) => 13,
            Event::FaultDropped { .. } => 14,
            Event::StateRestored { .. } => 15,
        }
    }

    /// The event of an ATTACH or DETACH record a batch sent the mirror;
    /// none for the others.
    pub fn of_record(r: &Record) -> Option<Self> {
        match *r {
            Record::Attach {
                endpoint,
                domain,
                bypass,
                ..
            } => Some(Event::EndpointAttached {
                endpoint,
                domain,
                bypass,
            }),
            Record::Detach { endpoint, domain } => {
                Some(Event::EndpointDetached { endpoint, domain })
            }
            _ => None,
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
    /// The kinds someone subscribed to: the union of the subscriptions'
    /// masks.
    wanted: AtomicU32,
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
            wanted: AtomicU32::new(0),
            published: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Whether anyone listens for a kind of `bits` (a mask of [`KINDS`]
    /// bits): without, no such event is built.
    #[inline]
    pub fn wants(&self, bits: u32) -> bool {
        self.wanted.load(Ordering::Relaxed) & bits != 0
    }

    /// Microseconds since the daemon started: an event's `time_us`.
    pub fn now_us(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Queue `event` if anyone listens for its kind; never waits: a full
    /// queue drops it (counted).
    pub fn publish(&self, event: Event) {
        if self.wants(event.bit()) {
            self.send(self.now_us(), event);
        }
    }

    /// [`Self::publish`] `event` as having happened at `time_us`
    /// ([`Self::now_us`]), for a source that keeps that time too.
    pub fn publish_at(&self, time_us: u64, event: Event) {
        if self.wants(event.bit()) {
            self.send(time_us, event);
        }
    }

    fn send(&self, time_us: u64, event: Event) {
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

    /// The subscriptions now: one mask of [`KINDS`] bits each. Events of
    /// kinds none of them asked for are not even built from now on.
    pub fn subscriptions(&self, masks: impl Iterator<Item = u32>) {
        let (n, wanted) = masks.fold((0, 0), |(n, w), m| (n + 1, w | m));
        self.subscribers.store(n, Ordering::Relaxed);
        self.wanted.store(wanted, Ordering::Relaxed);
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
        q.subscriptions([u32::MAX].into_iter());
        for _ in 0..3 {
            q.publish(Event::FrontEndDisconnected);
        }
        let c = q.counters();
        assert_eq!((c.subscribers, c.published, c.dropped), (1, 2, 1));
        let rx = q.take_receiver().unwrap();
        assert_eq!(rx.try_iter().count(), 2);
        assert!(q.take_receiver().is_none());
        q.subscriptions(std::iter::empty());
        assert!(!q.wants(u32::MAX));
        assert_eq!(q.counters().subscribers, 0);
    }

    #[test]
    fn only_kinds_someone_subscribed_to_are_queued() {
        let q = EventQueue::new(Instant::now(), 16);
        let rx = q.take_receiver().unwrap();
        // One subscriber of resets, one of map and unmap.
        q.subscriptions([RESET_EVENT, 0b1100].into_iter());
        assert!(q.wants(REQUEST_EVENTS) && q.wants(RESET_EVENT));
        assert!(!q.wants(ENDPOINT_EVENTS) && !q.wants(STATE_EVENT));
        q.publish(Event::FrontEndDisconnected);
        q.publish(Event::EndpointDetached {
            endpoint: 1,
            domain: 2,
        });
        let reset = Event::Reset {
            kind: "device",
            held: Held::default(),
        };
        q.publish(reset);
        let got: Vec<Event> = rx.try_iter().map(|s| s.event).collect();
        assert_eq!(got, [reset]);
        assert_eq!(q.counters().published, 1);
    }

    /// One event of each kind.
    fn one_of_each() -> Vec<Event> {
        let f = FaultRecord::new(fault::R_MAPPING, 2, 8, 0x1000);
        vec![
            Event::Attach {
                domain: 1,
                endpoint: 8,
                bypass: false,
                status: "ok",
            },
            Event::Detach {
                domain: 1,
                endpoint: 8,
                status: "ok",
            },
            Event::Map {
                domain: 1,
                virt_start: 0,
                virt_end: 0xfff,
                phys_start: 0,
                flags: 1,
                status: "ok",
            },
            Event::Unmap {
                domain: 1,
                virt_start: 0,
                virt_end: 0xfff,
                status: "ok",
            },
            Event::Fault(f),
            Event::FrontEndConnected { pid: Some(7) },
            Event::FrontEndDisconnected,
            Event::Reset {
                kind: "system",
                held: Held {
                    domains: 1,
                    mappings: 2,
                    attached: 3,
                },
            },
            Event::MirrorConnected {
                connection: 1,
                pid: None,
            },
            Event::MirrorRefused {
                pid: Some(9),
                reason: "busy",
            },
            Event::MirrorDisconnected {
                connection: 1,
                how: "closed",
            },
            Event::EndpointAttached {
                endpoint: 8,
                domain: 1,
                bypass: true,
            },
            Event::EndpointDetached {
                endpoint: 8,
                domain: 1,
            },
            Event::FaultReported(f),
            Event::FaultDropped {
                fault: f,
                why: "no_buffer",
            },
            Event::StateRestored {
                source: "migration",
                held: Held {
                    domains: 1,
                    mappings: 2,
                    attached: 3,
                },
            },
        ]
    }

    #[test]
    fn every_kind_has_its_own_bit_named_as_its_event_line() {
        let all = one_of_each();
        assert_eq!(all.len(), KINDS.len());
        let mut seen = 0;
        for e in &all {
            let v = serde_json::to_value(e).unwrap();
            let i = e.bit().trailing_zeros() as usize;
            assert_eq!(v["event"], KINDS[i], "{e:?}");
            assert_eq!(seen & e.bit(), 0, "{e:?}: a bit of its own");
            seen |= e.bit();
        }
        let bits_of = |names: &[&str]| {
            names.iter().fold(0, |m, n| {
                m | 1 << KINDS.iter().position(|k| k == n).unwrap()
            })
        };
        assert_eq!(
            REQUEST_EVENTS,
            bits_of(&["attach", "detach", "map", "unmap"])
        );
        assert_eq!(
            ENDPOINT_EVENTS,
            bits_of(&["endpoint_attached", "endpoint_detached"])
        );
        assert_eq!(RESET_EVENT, bits_of(&["reset"]));
        assert_eq!(STATE_EVENT, bits_of(&["state_restored"]));
    }

    #[test]
    fn event_lines_carry_what_an_operator_reads() {
        let line = |e: Event| serde_json::to_value(e).unwrap();
        let all = one_of_each();
        assert_eq!(
            line(all[14]),
            serde_json::json!({"event": "fault_dropped", "data": {"endpoint": 8,
                "address": 0x1000, "reason": "mapping", "flags": 2, "why": "no_buffer"}})
        );
        assert_eq!(
            line(all[7])["data"],
            serde_json::json!({"kind": "system", "domains": 1, "mappings": 2, "attached": 3})
        );
        assert_eq!(
            line(all[9]),
            serde_json::json!({"event": "mirror_refused", "data": {"pid": 9, "reason": "busy"}})
        );
        assert_eq!(
            line(all[13])["data"],
            serde_json::json!({"endpoint": 8, "address": 0x1000, "reason": "mapping", "flags": 2})
        );
        let wire = virtio_iommu::FaultEvent {
            reason: fault::R_DOMAIN,
            flags: 5.into(),
            endpoint: 3.into(),
            address: 0xdead_0000.into(),
            ..Default::default()
        };
        assert_eq!(
            FaultRecord::of_event(&wire),
            FaultRecord::new(fault::R_DOMAIN, 5, 3, 0xdead_0000)
        );
    }

    #[test]
    fn attach_and_detach_records_are_endpoint_events() {
        let attach = Record::Attach {
            endpoint: 8,
            domain: 1,
            bypass: false,
            root: 3,
        };
        assert_eq!(
            Event::of_record(&attach),
            Some(Event::EndpointAttached {
                endpoint: 8,
                domain: 1,
                bypass: false
            })
        );
        assert_eq!(
            Event::of_record(&Record::Detach {
                endpoint: 8,
                domain: 1
            }),
            Some(Event::EndpointDetached {
                endpoint: 8,
                domain: 1
            })
        );
        assert_eq!(Event::of_record(&Record::GlobalBypass(true)), None);
        assert_ne!(
            Event::of_record(&attach).unwrap().bit() & ENDPOINT_EVENTS,
            0
        );
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
