// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The vhost-user glue: [`VhostUserBackend`] for a virtio-iommu device.
//!
//! Features, protocol features, the config space and the two virtqueues
//! (virtio 1.2 §5.13.2: queue 0 = requestq, queue 1 = eventq). What a request
//! *means* is the device model's business ([`virtio_iommu::Device`]); this
//! module moves bytes between descriptor chains and the model, completes
//! requests (after the translation mirror acknowledged what they changed,
//! docs/mirror-protocol.md §7), and delivers fault events.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_iommu::NoRam;
use vm_memory::{ByteValued, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::device_state::Transfer;
use crate::exit_event::ExitEvents;
use crate::guest_ram::{self, GuestMem, GuestRamView, MemoryFiles};
use crate::ioas::IommuDevice;
use crate::mirror::{self, MirrorHandle, WaitOutcome};
use crate::poll::{AdaptivePoll, Regime, Window};
use crate::session::{Publish, Reset, Session, Sink};
use crate::state_file::{Journal, Recovered};
use crate::vring::Vring;

mod batch;
mod faults;
mod hooks;
mod inspect;
mod migration;
mod polling;
mod table_readers;
mod worker;

use faults::MAX_PENDING_FAULTS;
pub use hooks::BackendHooks;
pub use inspect::CounterSnapshot;
use polling::Polled;
pub use table_readers::ReaderError;
use worker::SPARE_LOOK_BUSY;

/// Queue indexes (virtio 1.2 §5.13.2).
pub const REQUEST_QUEUE: u16 = 0;
pub const EVENT_QUEUE: u16 = 1;
const NUM_QUEUES: usize = 2;
/// The largest queue the daemon accepts.
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Readable bytes of a request the daemon looks at: the largest request
/// (PROBE, 72 bytes) with room to spare; longer requests are cut here.
const MAX_REQUEST: usize = 256;
/// Writable bytes the daemon fills: the largest PROBE reply it offers.
pub const MAX_REPLY: usize = *virtio_iommu::PROBE_SIZES.end() as usize + 4;
/// The daemon's default maximum polling window, in microseconds
/// (`--poll-us`, src/poll.rs): long enough to span a guest's disk I/O
/// between its MAP and its UNMAP under TCG.
pub const DEFAULT_POLL_US: u64 = 1000;
/// The vring worker's default scheduler slice, in microseconds
/// (`--worker-slice-us`, src/sched.rs; 0: the kernel's default).
pub const DEFAULT_WORKER_SLICE_US: u64 = 0;
/// How long a request waits for the mirror's ACK before the link is
/// declared stuck and closed (then QEMU drops its copy: fail safe).
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `GET_VRING_BASE` waits for a batch in flight to be completed.
const STOP_WAIT: Duration = Duration::from_secs(2);

/// Counters of the vhost-user side (the model keeps its own).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueStats {
    /// Notifications (kicks) of the request queue handled.
    pub kicks: u64,
    /// Batches of requests processed: one per kick, plus those found by
    /// polling (no kick, no wake-up).
    pub batches: u64,
    /// Batches found by polling.
    pub polled_batches: u64,
    /// Used-buffer notifications sent to the driver for the request queue
    /// (Linux's driver polls and asks for none).
    pub used_signals: u64,
    /// Batches after which QEMU's completion eventfd was signalled (a vCPU
    /// may sleep on its kick, docs/mirror-protocol.md §15).
    pub completion_signals: u64,
    /// Time spent polling, in microseconds.
    pub poll_us: u64,
    /// Polling windows cut short because the worker found it had been off
    /// its CPU (src/poll.rs): the host has none to spare, and polling drops
    /// to short bursts for a while.
    pub poll_contended: u64,
    /// Busy regimes ended early: the host was measured to have a CPU to
    /// spare again (src/spare.rs).
    pub spare_found: u64,
    /// Gaps in a polling window that did not make the regime busy: the
    /// host had a CPU to spare.
    pub gaps_forgiven: u64,
    /// Time from each notification to going back to sleep (processing and
    /// polling), in microseconds.
    pub awake_us: u64,
    /// Requests completed.
    pub requests: u64,
    /// Chains whose buffers were not in guest memory.
    pub bad_chains: u64,
    /// Batches that waited for a mirror ACK.
    pub acked_batches: u64,
    /// Requests a previous daemon carried out (its state file says so),
    /// answered again with their status rather than carried out twice.
    pub answered_again: u64,
    /// Fault events QEMU reported (mirror protocol §10): each is delivered,
    /// waits for an event buffer (up to 64), or is dropped.
    #[serde(default)]
    pub faults_reported: u64,
    /// Fault events written to the event queue.
    pub faults_delivered: u64,
    /// Fault events dropped: the oldest beyond 64 waiting for a buffer, one
    /// whose buffer was too small.
    pub faults_dropped: u64,
}

/// What the glue keeps of a front-end: its memory and rings, pending fault
/// events, counters and the polling window; the device is the session's.
struct State {
    session: Session,
    mem: Option<GuestMemoryAtomic<GuestMem>>,
    event_idx: bool,
    /// Faults waiting for an event buffer.
    faults: VecDeque<virtio_iommu::FaultEvent>,
    /// The vrings, learnt at the first queue event (fault delivery needs the
    /// event queue outside of its own notifications).
    vrings: Option<[Vring; NUM_QUEUES]>,
    stats: QueueStats,
    /// Reused: no allocation per batch once warm.
    completed: Vec<(u16, u32)>,
    /// Reused: the request and reply bytes of each chain, allocated and
    /// zeroed once, not per batch.
    bufs: Box<batch::Buffers>,
    /// The device's counters when the last front-end left.
    last_session: Option<virtio_iommu::Stats>,
    /// Busy-polling of the request queue after each batch.
    poll: AdaptivePoll,
    /// A migration state transfer in flight (SET_DEVICE_STATE_FD).
    transfer: Option<Transfer>,
}

/// The virtio-iommu vhost-user backend. Cheap to clone: clones share the
/// device.
#[derive(Clone)]
pub struct IommuBackend {
    state: Arc<Mutex<State>>,
    mirror: MirrorHandle,
    /// Which memory files a front-end may share (src/guest_ram.rs).
    memory_files: MemoryFiles,
    /// The vring workers' exit events of the current connection.
    exit_events: Arc<ExitEvents>,
    /// The scheduler slice the vring worker asks for (src/sched.rs).
    worker_slice: Option<Duration>,
    /// Serve beside a vCPU asleep on its kick while not polling
    /// (src/placement.rs).
    follow_vcpu: bool,
    /// Batches between claiming their chains and putting them in the used
    /// ring: `GET_VRING_BASE` is answered only once none is
    /// (docs/mirror-protocol.md §8 rule 2).
    in_flight: Arc<AtomicU32>,
    /// What the control socket reads: latencies, events, faults
    /// (src/control/; nothing recorded without one).
    telemetry: Arc<crate::control::Telemetry>,
}

impl IommuBackend {
    /// A backend serving `device`, mirroring its changes to `mirror`.
    pub fn new(device: IommuDevice, mirror: MirrorHandle) -> Self {
        let mut session = Session::new(device, mirror.memory().map(|m| m.writer()));
        session.set_readers(mirror.memory().map(|m| m.readers.clone()));
        Self {
            state: Arc::new(Mutex::new(State {
                session,
                mem: None,
                event_idx: false,
                faults: VecDeque::with_capacity(MAX_PENDING_FAULTS),
                vrings: None,
                stats: QueueStats::default(),
                completed: Vec::with_capacity(MAX_QUEUE_SIZE),
                bufs: Box::new(batch::Buffers::new()),
                last_session: None,
                poll: AdaptivePoll::new(Duration::ZERO),
                transfer: None,
            })),
            mirror,
            memory_files: MemoryFiles::default(),
            exit_events: Arc::new(ExitEvents::default()),
            in_flight: Arc::default(),
            worker_slice: None,
            follow_vcpu: true,
            telemetry: Arc::default(),
        }
    }

    /// The translation mirror this backend publishes to.
    pub fn mirror(&self) -> &MirrorHandle {
        &self.mirror
    }

    /// The vring worker asks the host scheduler for a `slice` (src/sched.rs):
    /// shorter than the vCPUs', it preempts one promptly when a request
    /// wakes it on a host whose CPUs are all busy. `None`: the default.
    pub fn with_worker_slice(mut self, slice: Option<Duration>) -> Self {
        self.worker_slice = slice;
        self
    }

    /// Whether the worker serves beside a vCPU asleep on its kick while it
    /// does not poll (src/placement.rs); on by default.
    pub fn with_vcpu_following(mut self, on: bool) -> Self {
        self.follow_vcpu = on;
        self
    }

    /// Poll the request queue for up to `max` after each batch (adaptive,
    /// [`AdaptivePoll`]); zero turns polling off.
    pub fn with_polling(self, max: Duration) -> Self {
        self.lock().poll = AdaptivePoll::new(max);
        self
    }

    /// Which memory files front-ends may share (default: only files sealed
    /// against shrinking, [`MemoryFiles::SealedOnly`]).
    pub fn with_memory_files(mut self, accept: MemoryFiles) -> Self {
        self.memory_files = accept;
        self
    }

    /// Journal every change to the state file `journal` (src/state_file.rs),
    /// after becoming the device `recovered` describes, if a previous
    /// daemon left one: its attachments and mappings (entering the IOASes
    /// when the front-end's memory table arrives), and the requests it
    /// carried out that the driver may not have seen completed. A state
    /// the device refuses (a daemon started with other options) is logged
    /// and the device starts reset. A state taken is told to the
    /// telemetry of [`Self::with_telemetry`] (for the control socket's
    /// `status`), whichever of the two is given first.
    pub fn with_journal(self, journal: Journal, recovered: Option<Recovered>) -> Self {
        self.lock()
            .session
            .start_journal(journal, recovered, &self.mirror);
        self
    }

    /// The exit events the serve loop prepares before each connection and
    /// reclaims after it (src/exit_event.rs).
    pub fn exit_events(&self) -> &ExitEvents {
        &self.exit_events
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is plain data; a panic on another thread leaves it
        // consistent enough to keep serving (and a guest must not be able to
        // wedge the daemon through one).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The process of the connected front-end (`None`: it left, or is
    /// unknown): only its mirror connection is served
    /// (docs/mirror-protocol.md §6 rule 7).
    pub fn front_end_process(&self, pid: Option<u32>) {
        self.mirror.set_front_end(pid);
        if pid.is_some() {
            self.telemetry.front_end_came(pid);
        }
    }

    /// A front-end connected whose process could not be found: the mirror
    /// serves any process, as without one.
    pub fn front_end_process_unknown(&self) {
        self.mirror.set_front_end_unknown();
        self.telemetry.front_end_came(None);
    }

    /// Start over for a new front-end connection: the device at power-on,
    /// no memory, no vrings (the old front-end's state is gone) — unless it
    /// is the recovered device's QEMU reconnecting.
    pub fn new_connection(&self) {
        let mut st = self.lock();
        if st.session.take_recovered() {
            st.mem = None;
            st.vrings = None;
            return;
        }
        self.mirror.new_front_end();
        self.reset(&mut st, Reset::FrontEnd);
    }

    /// The front-end is gone, and its guest memory with it: no IOAS may keep
    /// pointing there (a kernel IOAS would keep the pages pinned and the
    /// devices reaching them), so the device is reset and every area
    /// unmapped now, not at the next connection.
    pub fn disconnected(&self) {
        // A request parked for a mirror ACK must not hold the worker (and so
        // the next front-end) until the ACK timeout (mirror protocol §7).
        self.mirror.release_waiters();
        // Its QEMU is gone, and any copy of the state with it.
        self.mirror.expect_peer(false);
        let mut st = self.lock();
        st.last_session = Some(st.session.device().stats());
        self.reset(&mut st, Reset::FrontEnd);
        drop(st);
        self.telemetry.front_end_left();
    }

    /// The daemon is stopping (a signal) under a front-end that is still
    /// there: the state file keeps the state as it is, for the daemon that
    /// will take over (nothing after this is journalled; the reset that
    /// follows releases this process's resources only).
    pub fn stopping(&self) {
        if self.lock().session.keep_journal() {
            log::info!("state file: kept for the next daemon");
        }
    }

    /// Drop the vrings a queue event cached after [`Self::disconnected`]:
    /// once the connection's workers are gone, nothing may keep the
    /// front-end's eventfds and memory open until the next connection.
    pub fn release_vrings(&self) {
        self.lock().vrings = None;
    }

    /// Every reset: the session's part and the glue's, by the one table
    /// of [`Reset::clears`].
    fn reset(&self, st: &mut State, kind: Reset) {
        let clears = kind.clears();
        self.telemetry.reset(kind.name(), st.session.device());
        st.session.reset(kind, &self.mirror);
        if clears.memory {
            st.mem = None;
        }
        if clears.queues {
            st.vrings = None;
            st.event_idx = false;
        }
        if clears.faults {
            for f in st.faults.drain(..) {
                self.telemetry.fault_dropped(&f, "reset");
            }
        }
    }

    /// Make a change outside the request path (config writes, VFIO devices
    /// leaving) and mirror it without waiting (docs/mirror-protocol.md §8
    /// rule 1).
    fn change<R>(
        &self,
        st: &mut State,
        f: impl FnOnce(&mut IommuDevice, &mut Sink<'_, '_>) -> R,
    ) -> R {
        st.session.change(&self.mirror, Publish::Now, f)
    }

    /// A QEMU's mirror HELLO, before its dump is made: is the recovered
    /// state its own, and whose is the state file
    /// ([`Session::hello_is_foreign`], [`Session::hello_names`]).
    pub fn qemu_hello(&self, instance: u64) {
        let mut st = self.lock();
        if st.session.hello_is_foreign(instance) {
            self.reset(&mut st, Reset::ForeignQemu);
        }
        st.session.hello_names(instance);
    }

    /// The shared table's counters, if there is one.
    pub fn table_stats(&self) -> Option<mirror::TableStats> {
        self.lock().session.table().map(|t| t.stats())
    }

    /// The device model's counters and the queue counters. Once a front-end
    /// has left (and until the next one sends its memory table), the model's
    /// counters are those it had when it left.
    pub fn stats(&self) -> (virtio_iommu::Stats, QueueStats) {
        let st = self.lock();
        let model = match (&st.mem, st.last_session) {
            (None, Some(last)) => last,
            _ => st.session.device().stats(),
        };
        let queues = QueueStats {
            answered_again: st.session.answered_again(),
            ..st.stats
        };
        (model, queues)
    }

    /// Run `f` on the device under the lock (for the mirror hooks and
    /// inspection).
    pub fn with_device<R>(&self, f: impl FnOnce(&mut IommuDevice) -> R) -> R {
        f(self.lock().session.device_mut())
    }

    /// Take a VFIO device QEMU forwarded (pass-through mode with devices
    /// from QEMU, docs/mirror-protocol.md §14).
    pub fn adopt_vfio(
        &self,
        endpoint: u32,
        devid: u32,
        iommufd: std::os::fd::OwnedFd,
        file: std::os::fd::OwnedFd,
    ) -> Result<(), crate::passthrough::AdoptError> {
        let mut st = self.lock();
        let State { session, mem, .. } = &mut *st;
        let device = session.device_mut();
        match mem {
            Some(m) => {
                let guard = m.memory();
                let ram = GuestRamView::new(&guard);
                crate::passthrough::adopt(device, endpoint, devid, iommufd, file, &ram)
            }
            None => crate::passthrough::adopt(device, endpoint, devid, iommufd, file, &NoRam),
        }
    }

    /// QEMU took back the VFIO device of `endpoint` (`None`: all of them,
    /// its connection ended).
    pub fn forget_vfio(&self, endpoint: Option<u32>) {
        let mut st = self.lock();
        self.change(&mut st, |device, sink| match endpoint {
            Some(ep) => crate::passthrough::forget(device, ep, sink),
            None => crate::passthrough::forget_all(device, sink),
        });
    }

    /// Handle one notification of the request queue: every available
    /// request, as one batch, then one mirror wait and one guest
    /// notification; then poll for the next batch while the guest's
    /// notifications stay suppressed (src/poll.rs), and only then re-enable
    /// them and re-check (virtio 1.2 §2.7.10).
    fn process_requests(&self, vring: &Vring) -> io::Result<()> {
        let woke = Instant::now();
        let (window, mem, unconfirmed) = self.woken(woke);
        // A vCPU asleep on its kick (docs/mirror-protocol.md §15) on a host
        // with no CPU to spare: its own CPU is the one to serve it on, and
        // a poller there would only take its time.
        let vcpu_sleeps = self.mirror.vcpus_sleep();
        let window = match window.regime {
            Regime::Busy if vcpu_sleeps => Window {
                length: Duration::ZERO,
                ..window
            },
            _ => window,
        };
        if self.follow_vcpu {
            self.place_worker(vcpu_sleeps && window.length.is_zero());
        }
        // A recovered state may be another QEMU's: nothing is carried out
        // on it before a QEMU's HELLO has said (its dump, made after the
        // HELLO, is acknowledged once it has).
        let polled = match (unconfirmed, mem) {
            (true, _) if self.mirror.wait_synced() == WaitOutcome::Released => Polled::default(),
            (_, None) => Polled::default(),
            (_, Some(mem)) => self.serve_and_poll(vring, &mem, window)?,
        };
        self.going_to_sleep(woke, polled);
        Ok(())
    }

    /// The worker woke at `woke`: count the kick, and decide how long it
    /// may poll (issue 17's regimes, `poll.rs`). Returns that window, the
    /// guest memory, and whether the state still waits for its QEMU.
    fn woken(&self, woke: Instant) -> (Window, Option<GuestMemoryLoadGuard<GuestMem>>, bool) {
        let mut st = self.lock();
        st.stats.kicks += 1;
        st.poll.woken(woke);
        // The busy regime ends as soon as the host is seen to have a CPU
        // to spare again, not only when its cool-down runs out.
        if st.poll.regime(woke) == Regime::Busy
            && Self::cpu_to_spare(woke, SPARE_LOOK_BUSY) == Some(true)
        {
            st.poll.spare_found();
            st.stats.spare_found += 1;
        }
        (
            st.poll.window(woke),
            st.mem.as_ref().map(|m| m.memory()),
            st.session.unconfirmed(),
        )
    }

    /// The worker goes back to sleep: account its time and what the poll
    /// saw, so the next window is planned from it.
    fn going_to_sleep(&self, woke: Instant, polled: Polled) {
        let mut st = self.lock();
        let now = Instant::now();
        st.stats.poll_us += polled.time.as_micros() as u64;
        st.stats.awake_us += now.saturating_duration_since(woke).as_micros() as u64;
        if polled.contended {
            // A gap with a CPU to spare was a moment's preemption (one of
            // the guest's QEMU threads), not a busy host.
            if Self::cpu_to_spare(now, Duration::ZERO) == Some(true) {
                st.stats.gaps_forgiven += 1;
            } else {
                st.stats.poll_contended += 1;
                // Only a meter can end a busy regime that waits for one.
                let until_spare = self.mirror.vcpus_sleep() && Self::spare_measurable();
                st.poll.contended(now, until_spare);
            }
        } else if polled.spare {
            st.poll.uncontended();
        }
        st.poll.sleeping(now);
    }
}

impl VhostUserBackend for IommuBackend {
    type Bitmap = crate::dirty_log::DirtyLog;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    /// Transport features (VERSION_1 is mandatory for virtio-iommu, virtio
    /// 1.2 §5.13.3; EVENT_IDX and indirect descriptors for batching) plus the
    /// device's own.
    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            // Writes to guest memory are logged once QEMU sets a log
            // (src/dirty_log.rs): QEMU migrates only back-ends that can.
            | VhostUserVirtioFeatures::LOG_ALL.bits()
            | self.lock().session.device().features()
    }

    fn acked_features(&self, features: u64) {
        let mut guard = self.lock();
        let st = &mut *guard;
        st.session.device_mut().set_acked_features(features);
        st.session.commit();
    }

    /// CONFIG is required by QEMU's vhost-user-base; REPLY_ACK lets a
    /// front-end wait for each message; RESET_DEVICE gives a device reset.
    ///
    /// Only what the daemon uses is offered. Not BACKEND_REQ: the daemon
    /// sends the front-end no request (its config space changes only by
    /// the guest's own writes), so it would drop the channel's socket as
    /// soon as `SET_BACKEND_REQ_FD` gave it, and QEMU reads that end of
    /// file as an error ("Unexpected end-of-file before all data were
    /// read" at every start).
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::DEVICE_STATE
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    /// A state transfer starts (src/vhu_iommu/migration.rs).
    fn set_device_state_fd(
        &self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        file: std::fs::File,
    ) -> io::Result<Option<std::fs::File>> {
        self.start_transfer(direction, phase, file)
    }

    /// The end of a state transfer (src/vhu_iommu/migration.rs).
    fn check_device_state(&self) -> io::Result<()> {
        self.finish_transfer()
    }

    /// A device reset (virtio 1.2 §2.4): the translation state goes back to
    /// power-on, and the mirror follows.
    fn reset_device(&self) {
        let mut st = self.lock();
        self.reset(&mut st, Reset::Device);
    }

    fn set_event_idx(&self, enabled: bool) {
        self.lock().event_idx = enabled;
    }

    /// `struct virtio_iommu_config` (virtio 1.2 §5.13.4), any part of it;
    /// bytes past its end read as zero.
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = self.lock().session.device().config();
        let bytes = config.as_slice();
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(bytes.len());
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(bytes.len());
        out[..end - start].copy_from_slice(&bytes[start..end]);
        out
    }

    /// Only `bypass` is writable (virtio 1.2 §5.13.4.2, with BYPASS_CONFIG);
    /// the change is mirrored without waiting (docs/mirror-protocol.md §8
    /// rule 1: the vhost-user thread never waits for QEMU).
    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let mut st = self.lock();
        let r = self.change(&mut st, |device, sink| {
            device.write_config(offset, buf, sink)
        });
        r.map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
    }

    /// `SET_MEM_TABLE` (and memory hot-(un)plug): every IOAS area moves to
    /// the new mapping of its guest pages before the old one can go away.
    ///
    /// The table is checked first ([`guest_ram::check_table`]): a region
    /// past the end of its file, or in a file the front-end can shrink,
    /// would kill the daemon with SIGBUS at its first access. vhost-user-
    /// backend has mapped the table and handed it to the vrings already, so
    /// a refused table is swapped for an empty one before anything reads it;
    /// the error then ends the connection (the front-end gets a failed
    /// REPLY_ACK first, if it asked for one).
    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMem>) -> io::Result<()> {
        let table = mem.memory();
        let mut st = self.lock();
        match guest_ram::check_table(&table, self.memory_files) {
            Ok(unsealed) => {
                for gpa in unsealed {
                    log::warn!(
                        "memory region at guest {gpa:#x}: its file is not sealed against \
                         shrinking; a front-end that shrinks it kills the daemon \
                         (--allow-unsealed-memory)"
                    );
                }
                st.session.set_memory(&GuestRamView::new(&table));
                st.mem = Some(mem);
                Ok(())
            }
            Err(e) => {
                drop(table);
                mem.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .replace(GuestMem::new());
                st.session.set_memory(&NoRam);
                log::error!("front-end memory table refused: {e}");
                Err(io::Error::new(io::ErrorKind::InvalidInput, e))
            }
        }
    }

    /// The exit event the serve loop prepared for this connection's worker
    /// (made beforehand, so running out of files is reported there rather
    /// than leaving a worker that cannot be stopped; src/exit_event.rs).
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exit_events.take()
    }

    /// `GET_VRING_BASE`: the front-end stops the queue. Requests parked for
    /// a mirror ACK complete now, and the answer (the base QEMU saves) waits
    /// until they are in the used ring (docs/mirror-protocol.md §8 rule 2):
    /// a used element written after it lands in a ring QEMU has stopped.
    fn stop_vring(&self, _queue_index: u32) -> io::Result<()> {
        self.mirror.release_waiters();
        let t0 = Instant::now();
        while self.in_flight.load(Ordering::Acquire) > 0 {
            if t0.elapsed() > STOP_WAIT {
                log::warn!("GET_VRING_BASE: a batch is still being served after {STOP_WAIT:?}");
                break;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!(
                "unexpected epoll events {evset:?}"
            )));
        }
        let [req, evt] = vrings else {
            return Err(io::Error::other("expected two vrings"));
        };
        self.tune_worker_thread();
        {
            let mut st = self.lock();
            if st.vrings.is_none() {
                st.vrings = Some([req.clone(), evt.clone()]);
            }
        }
        match device_event {
            REQUEST_QUEUE => self.process_requests(req),
            EVENT_QUEUE => {
                let mut st = self.lock();
                if st.event_idx {
                    evt.disable_notification().map_err(io::Error::other)?;
                    self.deliver_faults(&mut st, evt);
                    evt.enable_notification().map_err(io::Error::other)?;
                }
                self.deliver_faults(&mut st, evt);
                Ok(())
            }
            other => Err(io::Error::other(format!("unknown queue event {other}"))),
        }
    }
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("device", &self.session.device().stats())
            .field("event_idx", &self.event_idx)
            .field("faults", &self.faults)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for IommuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IommuBackend")
            .field("state", &self.state)
            .field("mirror", &self.mirror)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
