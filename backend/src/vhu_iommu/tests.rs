// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The glue without a socket: an [`IommuBackend`] given a sealed memfd as
//! guest RAM and two vrings laid out in it by hand, driven through its
//! `VhostUserBackend` entry points the way vhost-user-backend's worker
//! drives it (a kick is `handle_event`).

use std::fs::File;
use std::os::fd::FromRawFd;

use test_frontend::wire::MAX_REQ_LEN;
use test_frontend::{Request, MAP_F_READ, MAP_F_WRITE};
use vhost_user_backend::VringRwLock;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::guest_ram::GuestMem;

/// Guest RAM: 1 MiB.
const RAM: u64 = 0x10_0000;
/// Request queue rings: descriptors, available and used ring.
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
/// Event queue rings.
const EVT_DESC: u64 = 0x3000;
const EVT_AVAIL: u64 = 0x4000;
const EVT_USED: u64 = 0x5000;
/// Request and reply buffers start here, 256 bytes a request.
const DATA: u64 = 0x1_0000;
const QUEUE: u16 = 64;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const OK: u8 = 0;
const INVAL: u8 = 4;

/// A memfd of `RAM` bytes sealed against shrinking, as QEMU's
/// `memory-backend-memfd` gives it.
fn sealed_ram() -> GuestMem {
    // SAFETY: memfd_create with a static NUL-terminated name; the new
    // descriptor is owned by the File below.
    let fd = unsafe { libc::memfd_create(c"ram".as_ptr(), libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0, "{}", io::Error::last_os_error());
    // SAFETY: a descriptor just created and owned by nothing else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(RAM).unwrap();
    // SAFETY: fcntl on our own descriptor, no pointers.
    let rc = unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
    assert_eq!(rc, 0);
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        RAM as usize,
        Some(FileOffset::new(f, 0)),
    )])
    .unwrap()
}

/// One front-end's worth of state: the backend, its memory and vrings, and
/// where the next chain goes.
struct Rig {
    backend: IommuBackend,
    mem: GuestMemoryAtomic<GuestMem>,
    vrings: [Vring; 2],
    next_desc: u16,
    submitted: u16,
}

fn vring(mem: &GuestMemoryAtomic<GuestMem>, desc: u64, avail: u64, used: u64) -> Vring {
    let v = VringRwLock::new(mem.clone(), QUEUE).unwrap();
    v.set_queue_size(QUEUE);
    v.set_queue_info(desc, avail, used).unwrap();
    v.set_queue_ready(true);
    v.set_enabled(true);
    v
}

impl Rig {
    /// One event buffer of `len` bytes, the event queue's first, then its
    /// kick.
    fn offer_event_buffer(&self, len: u32) {
        let buf = DATA + 0x8000;
        self.put_desc(EVT_DESC, 0, (buf, len, F_WRITE, 0));
        self.ram()
            .write_obj(0u16, GuestAddress(EVT_AVAIL + 4))
            .unwrap();
        self.ram()
            .write_obj(1u16, GuestAddress(EVT_AVAIL + 2))
            .unwrap();
        self.backend
            .handle_event(EVENT_QUEUE, EventSet::IN, &self.vrings, 0)
            .unwrap();
    }

    fn new() -> Self {
        let config = crate::config::RawConfig::default().check().unwrap();
        let device = crate::emulated::device(&config).unwrap();
        let backend = IommuBackend::new(device, MirrorHandle::disconnected())
            .with_vcpu_following(false)
            .with_polling(Duration::ZERO);
        let mem = GuestMemoryAtomic::new(sealed_ram());
        backend.update_memory(mem.clone()).unwrap();
        let vrings = [
            vring(&mem, DESC, AVAIL, USED),
            vring(&mem, EVT_DESC, EVT_AVAIL, EVT_USED),
        ];
        Self {
            backend,
            mem,
            vrings,
            next_desc: 0,
            submitted: 0,
        }
    }

    fn ram(&self) -> impl std::ops::Deref<Target = GuestMem> + '_ {
        self.mem.memory()
    }

    fn put_desc(&self, at: u64, i: u16, (addr, len, flags, next): (u64, u32, u16, u16)) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.ram()
            .write_slice(&d, GuestAddress(at + 16 * u64::from(i)))
            .unwrap();
    }

    /// Make the chain `descs` (address, length, flags; NEXT is added)
    /// available on the request queue without kicking; its head.
    fn offer(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        for (k, &(addr, len, flags)) in descs.iter().enumerate() {
            let i = head + k as u16;
            let more = k + 1 < descs.len();
            let flags = flags | if more { F_NEXT } else { 0 };
            self.put_desc(DESC, i, (addr, len, flags, if more { i + 1 } else { 0 }));
        }
        self.next_desc += descs.len() as u16;
        let slot = AVAIL + 4 + 2 * u64::from(self.submitted % QUEUE);
        self.ram().write_obj(head, GuestAddress(slot)).unwrap();
        self.submitted = self.submitted.wrapping_add(1);
        self.ram()
            .write_obj(self.submitted, GuestAddress(AVAIL + 2))
            .unwrap();
        head
    }

    /// Offer `r` with room for its reply; where the reply goes.
    fn offer_request(&mut self, r: &Request) -> (u64, usize) {
        let mut buf = [0u8; MAX_REQ_LEN];
        let len = r.encode(&mut buf);
        let at = DATA + 0x100 * u64::from(self.submitted);
        self.ram()
            .write_slice(&buf[..len], GuestAddress(at))
            .unwrap();
        let reply_len = r.writable_len(0);
        let reply = at + 0x80;
        self.offer(&[(at, len as u32, 0), (reply, reply_len as u32, F_WRITE)]);
        (reply, reply_len)
    }

    /// The kick, as vhost-user-backend's worker delivers it.
    fn kick(&self) -> io::Result<()> {
        self.backend
            .handle_event(REQUEST_QUEUE, EventSet::IN, &self.vrings, 0)
    }

    /// The used ring: its index and its elements (id, length) so far.
    fn used(&self) -> (u16, Vec<(u32, u32)>) {
        let idx: u16 = self.ram().read_obj(GuestAddress(USED + 2)).unwrap();
        let elems = (0..idx)
            .map(|i| {
                let at = USED + 4 + 8 * u64::from(i % QUEUE);
                let id: u32 = self.ram().read_obj(GuestAddress(at)).unwrap();
                let len: u32 = self.ram().read_obj(GuestAddress(at + 4)).unwrap();
                (id, len)
            })
            .collect();
        (idx, elems)
    }

    /// The status byte of a reply of `len` bytes at `at` (its tail is last).
    fn status(&self, (at, len): (u64, usize)) -> u8 {
        let tail = at + (len - 4) as u64;
        self.ram().read_obj(GuestAddress(tail)).unwrap()
    }

    fn queue_stats(&self) -> QueueStats {
        self.backend.stats().1
    }
}

fn attach(domain: u32, endpoint: u32) -> Request {
    Request::Attach {
        domain,
        endpoint,
        flags: 0,
    }
}

fn map(domain: u32, iova: u64, gpa: u64) -> Request {
    Request::Map {
        domain,
        virt_start: iova,
        virt_end: iova + 0xfff,
        phys_start: gpa,
        flags: MAP_F_READ | MAP_F_WRITE,
    }
}

#[test]
fn one_kick_serves_every_available_request_in_order_as_one_batch() {
    let mut rig = Rig::new();
    let endpoint = rig
        .backend
        .with_device(|d| d.endpoint_ids().next().unwrap());
    let replies = [
        rig.offer_request(&attach(1, endpoint)),
        rig.offer_request(&map(1, 0x1000, 0x8_0000)),
        rig.offer_request(&map(1, 0x1000, 0x9_0000)),
        rig.offer_request(&Request::Unmap {
            domain: 1,
            virt_start: 0x1000,
            virt_end: 0x1fff,
        }),
    ];
    rig.kick().unwrap();
    let (idx, used) = rig.used();
    assert_eq!(idx, 4);
    let heads: Vec<u32> = used.iter().map(|&(id, _)| id).collect();
    assert_eq!(heads, [0, 2, 4, 6], "in the order they were made available");
    assert!(used.iter().all(|&(_, len)| len == 4), "{used:?}");
    let statuses: Vec<u8> = replies.iter().map(|&r| rig.status(r)).collect();
    // The second MAP of the same IOVA overlaps the first: INVAL (§5.13.6.5).
    assert_eq!(statuses, [OK, OK, INVAL, OK]);
    let q = rig.queue_stats();
    assert_eq!((q.kicks, q.batches, q.requests, q.bad_chains), (1, 1, 4, 0));
    assert_eq!(rig.backend.with_device(|d| d.stats().domains), 1);
}

/// What the driver would find at the instant a batch's used index moves:
/// (used index, EVENT_IDX `avail_event`, used-ring flags), each time.
fn watch_used_stores(rig: &Rig) -> std::rc::Rc<std::cell::RefCell<Vec<(u16, u16, u16)>>> {
    let seen = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let (mem, out) = (rig.mem.clone(), seen.clone());
    super::batch::probe::after_used(move || {
        let ram = mem.memory();
        let idx: u16 = ram.read_obj(GuestAddress(USED + 2)).unwrap();
        let flags: u16 = ram.read_obj(GuestAddress(USED)).unwrap();
        let avail_event: u16 = ram
            .read_obj(GuestAddress(USED + 4 + 8 * u64::from(QUEUE)))
            .unwrap();
        out.borrow_mut().push((idx, avail_event, flags));
    });
    seen
}

#[test]
fn with_event_idx_the_next_request_is_asked_for_before_a_batch_is_seen_used() {
    let mut rig = Rig::new();
    rig.vrings[0].set_queue_event_idx(true);
    let endpoint = rig
        .backend
        .with_device(|d| d.endpoint_ids().next().unwrap());
    let seen = watch_used_stores(&rig);
    rig.offer_request(&attach(1, endpoint));
    rig.offer_request(&map(1, 0x1000, 0x8_0000));
    rig.kick().unwrap();
    rig.offer_request(&map(1, 0x2000, 0x9_0000));
    rig.kick().unwrap();
    // Linux's driver queues its next MAP as soon as it sees the last one
    // used, and notifies only if avail_event says so (virtio 1.2 §2.7.10):
    // by then avail_event must already name the next request's index.
    assert_eq!(*seen.borrow(), [(2, 2, 0), (3, 3, 0)]);
}

#[test]
fn without_event_idx_notifications_are_enabled_before_a_batch_is_seen_used() {
    let mut rig = Rig::new();
    let endpoint = rig
        .backend
        .with_device(|d| d.endpoint_ids().next().unwrap());
    let seen = watch_used_stores(&rig);
    rig.offer_request(&attach(1, endpoint));
    rig.kick().unwrap();
    // VRING_USED_F_NO_NOTIFY, set while the batch was taken, is clear.
    assert_eq!(seen.borrow().as_slice(), [(1, 0, 0)]);
}

#[test]
fn a_chain_outside_guest_memory_is_used_with_nothing_written_and_the_next_is_served() {
    let mut rig = Rig::new();
    let endpoint = rig
        .backend
        .with_device(|d| d.endpoint_ids().next().unwrap());
    // A request whose reply lies past the end of guest RAM.
    let mut buf = [0u8; MAX_REQ_LEN];
    let len = attach(1, endpoint).encode(&mut buf);
    rig.ram()
        .write_slice(&buf[..len], GuestAddress(DATA))
        .unwrap();
    rig.offer(&[(DATA, len as u32, 0), (RAM - 2, 4, F_WRITE)]);
    // A writable descriptor before a readable one (virtio 1.2 §2.7.4.2).
    rig.offer(&[(DATA + 0x80, 4, F_WRITE), (DATA, len as u32, 0)]);
    let good = rig.offer_request(&attach(1, endpoint));
    rig.kick().unwrap();
    let (idx, used) = rig.used();
    assert_eq!(idx, 3);
    assert_eq!((used[0].1, used[1].1, used[2].1), (0, 0, 4));
    assert_eq!(rig.status(good), OK);
    assert_eq!(rig.queue_stats().bad_chains, 2);
    assert_eq!(rig.backend.with_device(|d| d.domain_of(endpoint)), Some(1));
}

#[test]
fn a_kick_before_the_memory_table_touches_nothing() {
    let config = crate::config::RawConfig::default().check().unwrap();
    let backend = IommuBackend::new(
        crate::emulated::device(&config).unwrap(),
        MirrorHandle::disconnected(),
    )
    .with_vcpu_following(false);
    let mem = GuestMemoryAtomic::new(sealed_ram());
    let vrings = [
        vring(&mem, DESC, AVAIL, USED),
        vring(&mem, EVT_DESC, EVT_AVAIL, EVT_USED),
    ];
    mem.memory()
        .write_obj(1u16, GuestAddress(AVAIL + 2))
        .unwrap();
    backend
        .handle_event(REQUEST_QUEUE, EventSet::IN, &vrings, 0)
        .unwrap();
    let used: u16 = mem.memory().read_obj(GuestAddress(USED + 2)).unwrap();
    assert_eq!(used, 0);
    assert!(backend
        .handle_event(7, EventSet::IN, &vrings, 0)
        .is_err_and(|e| e.to_string().contains("unknown queue event 7")));
    assert!(backend
        .handle_event(REQUEST_QUEUE, EventSet::OUT, &vrings, 0)
        .is_err());
}

#[test]
fn a_memory_table_without_files_is_refused_and_leaves_no_ram() {
    let rig = Rig::new();
    let anonymous = GuestMem::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
    let e = rig
        .backend
        .update_memory(GuestMemoryAtomic::new(anonymous))
        .unwrap_err();
    assert!(e.to_string().contains("no file behind it"), "{e}");
}

#[test]
fn no_backend_request_channel_is_offered_as_none_would_be_kept() {
    // vhost-user-backend drops the channel of a back-end that does not take
    // it (`set_backend_req_fd`), and QEMU reports the closed socket as an
    // error: a feature offered is a channel kept open.
    let rig = Rig::new();
    let offered = rig.backend.protocol_features();
    assert!(!offered.contains(VhostUserProtocolFeatures::BACKEND_REQ));
    assert!(
        offered.contains(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK)
    );
}

#[test]
fn reset_device_clears_the_device() {
    let mut rig = Rig::new();
    let endpoint = rig
        .backend
        .with_device(|d| d.endpoint_ids().next().unwrap());
    rig.offer_request(&attach(1, endpoint));
    rig.kick().unwrap();
    assert_eq!(rig.backend.with_device(|d| d.stats().domains), 1);
    rig.backend.reset_device();
    assert_eq!(rig.backend.with_device(|d| d.stats().domains), 0);
    assert_eq!(rig.backend.with_device(|d| d.domain_of(endpoint)), None);
}

#[test]
fn a_fault_waits_for_an_event_buffer_and_goes_into_the_next_one() {
    let mut rig = Rig::new();
    // The worker learns the vrings at its first event.
    rig.offer_request(&Request::Probe { endpoint: 0 });
    rig.kick().unwrap();
    rig.backend
        .report_fault(virtio_iommu::FaultEvent::default());
    rig.offer_event_buffer(32);
    let idx: u16 = rig.ram().read_obj(GuestAddress(EVT_USED + 2)).unwrap();
    let len: u32 = rig.ram().read_obj(GuestAddress(EVT_USED + 8)).unwrap();
    assert_eq!(
        (idx, len),
        (1, 24),
        "one fault record (virtio 1.2 §5.13.6.9)"
    );
    assert_eq!(rig.queue_stats().faults_delivered, 1);
}

/// The events a control socket's subscriber of every kind gets (none is
/// built without one: [`crate::control::EventQueue::wants`]).
fn watched(rig: &mut Rig) -> std::sync::mpsc::Receiver<crate::control::events::Stamped> {
    let telemetry = Arc::new(crate::control::Telemetry::new(true));
    rig.backend = rig.backend.clone().with_telemetry(telemetry.clone());
    let rx = telemetry.events().take_receiver().unwrap();
    telemetry.events().subscriptions([u32::MAX].into_iter());
    rx
}

fn kinds(rx: &std::sync::mpsc::Receiver<crate::control::events::Stamped>) -> Vec<String> {
    rx.try_iter()
        .map(|s| {
            serde_json::to_value(s.event).unwrap()["event"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

#[test]
fn a_fault_that_does_not_fit_its_event_buffer_is_dropped_and_said_so() {
    let mut rig = Rig::new();
    let rx = watched(&mut rig);
    rig.offer_request(&Request::Probe { endpoint: 0 });
    rig.kick().unwrap();
    rig.backend
        .report_fault(virtio_iommu::encode_fault(2, 1, 8, 0x4000));
    // A buffer of 8 bytes: the 24-byte record does not fit.
    rig.offer_event_buffer(8);
    let events: Vec<_> = rx.try_iter().map(|s| s.event).collect();
    assert_eq!(
        events,
        [crate::control::Event::FaultDropped {
            fault: crate::control::FaultRecord::new(2, 1, 8, 0x4000),
            why: "bad_buffer",
        }]
    );
    assert_eq!(rig.queue_stats().faults_dropped, 1);
}

#[test]
fn a_device_reset_says_what_it_dropped_and_drops_the_waiting_faults() {
    let mut rig = Rig::new();
    let rx = watched(&mut rig);
    let endpoint = rig
        .backend
        .with_device(|d| d.endpoint_ids().next().unwrap());
    rig.offer_request(&attach(1, endpoint));
    rig.kick().unwrap();
    rig.backend
        .report_fault(virtio_iommu::encode_fault(2, 1, endpoint, 0x4000));
    assert_eq!(
        kinds(&rx),
        ["attach", "endpoint_attached"],
        "the request, then what it changed"
    );
    rig.backend.reset_device();
    let events: Vec<_> = rx.try_iter().map(|s| s.event).collect();
    assert_eq!(
        events,
        [
            crate::control::Event::Reset {
                kind: "device",
                held: crate::control::events::Held {
                    domains: 1,
                    mappings: 0,
                    attached: 1,
                },
            },
            crate::control::Event::FaultDropped {
                fault: crate::control::FaultRecord::new(2, 1, endpoint, 0x4000),
                why: "reset",
            },
        ]
    );
}

#[test]
fn faults_without_an_event_buffer_wait_up_to_64_and_every_report_is_counted() {
    let mut rig = Rig::new();
    rig.offer_request(&Request::Probe { endpoint: 0 });
    rig.kick().unwrap();
    for i in 0..70u64 {
        rig.backend
            .report_fault(virtio_iommu::encode_fault(2, 1, 8, 0x4000 + (i << 12)));
    }
    let q = rig.queue_stats();
    // 64 wait for a buffer; the 6 oldest beyond are dropped.
    assert_eq!(
        (q.faults_reported, q.faults_delivered, q.faults_dropped),
        (70, 0, 6)
    );
    rig.offer_event_buffer(64);
    let q = rig.queue_stats();
    assert_eq!(
        (q.faults_reported, q.faults_delivered, q.faults_dropped),
        (70, 1, 6)
    );
    // The one delivered is the oldest kept: the seventh reported.
    let mut record = [0u8; 24];
    rig.ram()
        .read_slice(&mut record, GuestAddress(DATA + 0x8000))
        .unwrap();
    assert_eq!(
        u64::from_le_bytes(record[16..24].try_into().unwrap()),
        0x4000 + (6 << 12)
    );
}
