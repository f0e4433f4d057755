// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The device as one front-end's guest sees it, whoever serves its queues:
//! the device model, what QEMU sees of it (the shared translation table and
//! the records of each change), the state file, the requests a previous
//! daemon carried out, and whose state it is.
//!
//! The vhost-user glue (src/vhu_iommu/) moves bytes between rings and this
//! session; everything that changes the device goes through here, so that
//! every change reaches the journal and the mirror by the same road:
//! [`Session::change`] outside the request path, [`Requests`] on it. Resets
//! are one function over one table ([`Reset::clears`]).

use std::sync::Arc;

use virtio_iommu::journal::{self, Answered, Completion};
use virtio_iommu::{GuestRam, NoRam};

use crate::control::Telemetry;
use crate::guest_ram::RamBacking;
use crate::ioas::{DaemonIoas, IommuDevice};
use crate::mirror::{
    Batch, Effects, MirrorHandle, Readers, Record, SharedMem, Ticket, TranslationTable,
};
use crate::state_file::{Journal, Journaled, Recovered};
use table_reader::{EndpointState, Mode};

/// The translation table shared with QEMU (docs/mirror-protocol.md §11).
pub type SharedTable = TranslationTable<Arc<SharedMem>>;

/// Where the device's changes go: the mirror's batch, and the state file.
pub type Sink<'j, 'b> = Journaled<'j, Batch<'b, Arc<SharedMem>>>;

/// Why the device goes back (in part) to power-on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reset {
    /// A front-end left, or a new one came that is not the recovered
    /// state's: its guest memory is gone, and no IOAS may keep pointing
    /// there (a kernel IOAS would keep the pages pinned).
    FrontEnd,
    /// `VHOST_USER_RESET_DEVICE` (virtio 1.2 §2.4).
    Device,
    /// The recovered state belongs to another QEMU process than the one
    /// whose HELLO came (docs/state-journal.md rule 6).
    ForeignQemu,
    /// QEMU's SYSTEM_RESET over the mirror (docs/mirror-protocol.md §9):
    /// the translation state only, the driver's features stay.
    System,
    /// A migration state that could not be decoded: nothing half-loaded.
    RefusedState,
}

/// What a [`Reset`] clears.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Clears {
    /// The requests a previous daemon carried out, answered again.
    pub answers: bool,
    /// Features and config as well as translations (`Device::reset`);
    /// otherwise translations only (`Device::reset_translation`).
    pub features: bool,
    /// The guest memory table, in the model and in the glue.
    pub memory: bool,
    /// The glue's vrings and EVENT_IDX.
    pub queues: bool,
    /// Fault events waiting for an event buffer.
    pub faults: bool,
    /// The recovered state's claim, and whose the state file is.
    pub recovery: bool,
}

impl Reset {
    /// As the control socket's `reset` event names it.
    pub const fn name(self) -> &'static str {
        match self {
            Reset::FrontEnd => "front_end",
            Reset::Device => "device",
            Reset::ForeignQemu => "foreign_qemu",
            Reset::System => "system",
            Reset::RefusedState => "refused_state",
        }
    }

    /// The one table of what each reset clears.
    pub const fn clears(self) -> Clears {
        let (answers, features, memory, queues, faults, recovery) = match self {
            Reset::FrontEnd => (true, true, true, true, true, true),
            Reset::Device => (true, true, false, false, true, false),
            Reset::ForeignQemu => (true, true, false, false, false, true),
            Reset::System => (true, false, false, false, true, false),
            Reset::RefusedState => (false, true, false, false, false, false),
        };
        Clears {
            answers,
            features,
            memory,
            queues,
            faults,
            recovery,
        }
    }
}

/// How a change outside the request path is published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Publish {
    /// Sent without waiting (docs/mirror-protocol.md §8 rule 1).
    Now,
    /// Ending in a SYNC batch, sent even if empty: QEMU's copy is whole
    /// again (a recovered or loaded state).
    Sync,
}

/// The device and everything that follows its changes.
#[derive(Debug)]
pub struct Session {
    device: IommuDevice,
    /// The translation table shared with QEMU, when there is a mirror.
    table: Option<SharedTable>,
    /// Reused: no allocation per batch once warm.
    records: Vec<Record>,
    /// The state file, with `--state-file` (src/state_file.rs).
    journal: Option<Journal>,
    /// Requests a previous daemon carried out whose completion the driver
    /// may not have seen: answered from the journal, not carried out again.
    answered: Answered,
    /// Requests answered that way.
    answered_again: u64,
    /// The device was recovered from the state file: the next front-end
    /// (QEMU reconnecting) finds it as the guest left it, not reset.
    recovered: bool,
    /// The QEMU process the recovered state belongs to (its mirror HELLO
    /// `instance`), until a QEMU's HELLO says whether it is that one: until
    /// then no request is carried out (docs/state-journal.md rule 6).
    recovered_for: Option<u64>,
    /// The QEMU process of this front-end session, from the first mirror
    /// HELLO that named one (0: none yet): the one the state file is for.
    qemu_instance: u64,
    /// Where the endpoints attached and detached are told (the control
    /// socket's events; nothing recorded without one).
    telemetry: Arc<Telemetry>,
    /// Back-ends reading the table themselves (docs/mirror-protocol.md
    /// §16), when there is a table.
    readers: Option<Arc<Readers>>,
    /// The last batch of requests removed a translation while readers were
    /// registered: it completes after their sections ([`Self::take_grace`]).
    grace_pending: bool,
}

impl Session {
    /// A session over `device`, its changes going to `table` if there is one.
    pub fn new(device: IommuDevice, table: Option<SharedTable>) -> Self {
        Self {
            device,
            table,
            records: Vec::new(),
            journal: None,
            answered: Answered::default(),
            answered_again: 0,
            recovered: false,
            recovered_for: None,
            readers: None,
            grace_pending: false,
            qemu_instance: 0,
            telemetry: Arc::default(),
        }
    }

    /// Tell `telemetry` the endpoints attached and detached, and the states
    /// restored: a state already taken from the state file, not yet handed
    /// to a front-end, is told to it now (so the daemon's set-up may give
    /// the journal and the telemetry in either order).
    pub fn watch(&mut self, telemetry: Arc<Telemetry>) {
        if self.recovered && telemetry.last_restore().is_none() {
            telemetry.state_restored("state_file", &self.device);
        }
        self.telemetry = telemetry;
    }

    pub fn device(&self) -> &IommuDevice {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut IommuDevice {
        &mut self.device
    }

    /// Guest RAM is now `ram`: the model's pins are answered from it first
    /// (iommufd pins user pages, iopt/src/pinning.rs), then the device moves
    /// its mappings.
    pub fn set_memory(&mut self, ram: &impl GuestRam) {
        if let DaemonIoas::Model(m) = self.device.iommufd_mut() {
            m.set_backing(Arc::new(RamBacking::of(ram)));
        }
        self.device.set_memory(ram);
    }

    pub fn table(&self) -> Option<&SharedTable> {
        self.table.as_ref()
    }

    /// The requests a previous daemon carried out that were answered again.
    pub fn answered_again(&self) -> u64 {
        self.answered_again
    }

    /// Journal every change to `journal`, after becoming the device
    /// `recovered` describes, if a previous daemon left one (its
    /// attachments and mappings, entering the IOASes when the front-end's
    /// memory table arrives, and the requests it carried out that the driver
    /// may not have seen completed). A state the device refuses (a daemon
    /// started with other options) is logged and the device starts reset.
    pub fn start_journal(
        &mut self,
        mut journal: Journal,
        recovered: Option<Recovered>,
        mirror: &MirrorHandle,
    ) {
        let mut answered = Answered::default();
        if let Some(r) = recovered {
            let restored = self.change(mirror, Publish::Sync, |device, sink| {
                device.restore_state(&r.state, &NoRam, sink)
            });
            match restored {
                Ok(()) => {
                    self.telemetry.state_restored("state_file", &self.device);
                    log::info!(
                        "state file: recovered {} attachments and mappings ({} records; \
                         the last {} completions kept to answer requests that come again)",
                        r.state.entries.len(),
                        r.records,
                        r.answered.pending().len()
                    );
                    self.recovered = true;
                    self.recovered_for = (r.instance != 0).then_some(r.instance);
                    self.qemu_instance = r.instance;
                    answered = r.answered;
                    // Its QEMU kept running, translating with a frozen copy:
                    // requests wait until it has this state.
                    mirror.expect_peer(true);
                }
                Err(e) => {
                    log::error!("state file: the recovered state was refused ({e}): starting reset")
                }
            }
        }
        journal.start(&self.device, &answered);
        self.answered = answered;
        self.journal = Some(journal);
    }

    /// The daemon is stopping under a front-end that is still there: the
    /// state file keeps the state as it is, for the daemon that will take
    /// over. True if there was one.
    pub fn keep_journal(&mut self) -> bool {
        self.journal.take().is_some()
    }

    /// Commit the device's settings (features, config) to the state file.
    pub fn commit(&mut self) {
        if let Some(j) = self.journal.as_mut() {
            j.commit(&self.device);
        }
    }

    /// A new front-end connects. True if it finds the recovered device (its
    /// QEMU reconnecting), which is kept; false if the device must be reset
    /// for it.
    pub fn take_recovered(&mut self) -> bool {
        std::mem::take(&mut self.recovered)
    }

    /// No request may be carried out yet: the recovered state may be
    /// another QEMU's, until a QEMU's HELLO says.
    pub fn unconfirmed(&self) -> bool {
        self.recovered_for.is_some()
    }

    /// Make a change outside the request path (resets, config writes,
    /// restores) and publish it to the mirror. The only place, with
    /// [`Self::requests`], where a journal and mirror sink is built.
    pub fn change<R>(
        &mut self,
        mirror: &MirrorHandle,
        publish: Publish,
        f: impl FnOnce(&mut IommuDevice, &mut Sink<'_, '_>) -> R,
    ) -> R {
        let mut batch = Batch::new(self.table.as_mut(), &mut self.records);
        let r = f(
            &mut self.device,
            &mut Journaled {
                sink: &mut batch,
                journal: self.journal.as_mut(),
            },
        );
        if let Some(j) = self.journal.as_mut() {
            j.commit(&self.device);
        }
        let effects = batch.effects();
        let readers = self.readers.as_deref().filter(|r| !r.is_empty());
        let out = batch.finish(mirror.notifier_flags(), |ep| {
            readers.as_ref().is_some_and(|r| r.owns_iotlb(ep))
        });
        self.telemetry.endpoint_changes(out);
        let ticket = match publish {
            Publish::Now => mirror.publish(out),
            Publish::Sync => mirror.publish_sync(out),
        };
        self.readers_after_change(effects);
        if ticket.is_none() {
            self.release_table_pages(mirror);
        }
        r
    }

    /// Off the request path (resets, config writes, restores): the
    /// readers' states are published and their grace waited for here,
    /// bounded (§16.3).
    fn readers_after_change(&mut self, effects: Effects) {
        if self.publish_to_readers(effects) {
            self.grace_pending = false;
            if let Some(r) = &self.readers {
                r.synchronize();
            }
        }
    }

    /// Tell the table readers what a batch changed: their endpoints'
    /// states, under the lock and after the table stores. True if the
    /// batch must wait for their sections before it completes.
    fn publish_to_readers(&mut self, effects: Effects) -> bool {
        let Some(readers) = self.readers.as_ref().filter(|r| !r.is_empty()) else {
            return false;
        };
        if effects.moves {
            readers.update_states(|ep| self.reader_state(ep));
        }
        self.grace_pending |= effects.removes;
        effects.removes
    }

    /// What endpoint `ep`'s DMA goes through now, as a table reader must
    /// see it (§16.2): bypass, its domain's tree, or nothing.
    pub fn reader_state(&self, ep: u32) -> EndpointState {
        let mode = match self.device.translate(ep, 0, false) {
            virtio_iommu::Translation::Bypass => Mode::Bypass,
            _ => match (self.device.domain_of(ep), self.table.as_ref()) {
                (Some(d), Some(t)) if t.root(d) != 0 => Mode::Translated { root: t.root(d) },
                _ => Mode::Blocked,
            },
        };
        EndpointState {
            mode,
            revoked: false,
        }
    }

    /// Serve table readers from `readers` (the table's registry).
    pub fn set_readers(&mut self, readers: Option<Arc<Readers>>) {
        self.readers = readers;
    }

    /// Whether the last batch of requests must wait for the table readers'
    /// sections before it completes (§16.3); cleared by the call.
    pub fn take_grace(&mut self) -> bool {
        std::mem::take(&mut self.grace_pending)
    }

    /// Carry out one batch of requests (`f` calls [`Requests::request`] for
    /// each), then publish what they changed, under the caller's lock so the
    /// mirror sees changes in the order the device made them
    /// (docs/mirror-protocol.md §6). MAPs and UNMAPs QEMU only translates
    /// with are in the shared table already: nothing to send, nothing to
    /// wait for (§11). The ticket, if QEMU must acknowledge the batch.
    pub fn requests<R>(
        &mut self,
        mirror: &MirrorHandle,
        f: impl FnOnce(&mut Requests<'_, '_>) -> R,
    ) -> (R, Option<Ticket>) {
        let mut batch = Batch::new(self.table.as_mut(), &mut self.records);
        let r = f(&mut Requests {
            device: &mut self.device,
            journal: self.journal.as_mut(),
            answered: &mut self.answered,
            answered_again: &mut self.answered_again,
            sink: &mut batch,
        });
        let effects = batch.effects();
        let readers = self.readers.as_deref().filter(|r| !r.is_empty());
        let out = batch.finish(mirror.notifier_flags(), |ep| {
            readers.as_ref().is_some_and(|r| r.owns_iotlb(ep))
        });
        self.telemetry.endpoint_changes(out);
        let ticket = mirror.publish(out);
        self.publish_to_readers(effects);
        if ticket.is_none() {
            self.release_table_pages(mirror);
        }
        (r, ticket)
    }

    /// QEMU acknowledged a batch: table pages of destroyed domains are no
    /// longer walked.
    pub fn acked(&mut self) {
        self.release_limbo();
    }

    /// Pages in limbo become reusable, once no table reader can be walking
    /// them either (§16.3: a bounded wait for their sections, usually none
    /// open: the batch that retired the pages waited already).
    fn release_limbo(&mut self) {
        let Some(t) = self.table.as_mut() else {
            return;
        };
        if t.stats().pages_in_limbo == 0 {
            return;
        }
        if let Some(r) = self.readers.as_ref().filter(|r| !r.is_empty()) {
            r.synchronize();
        }
        t.release_limbo();
    }

    /// Table pages of destroyed domains become reusable once QEMU cannot be
    /// walking them: after an ACK, or if no QEMU ever connected. A QEMU
    /// whose link closed keeps translating with its frozen copy
    /// (docs/mirror-protocol.md §6 rule 4): the pages it may walk are
    /// reused only after the next connection's ACK.
    fn release_table_pages(&mut self, mirror: &MirrorHandle) {
        if mirror.never_connected() {
            self.release_limbo();
        }
    }

    /// Reset what `kind` clears of the device (the glue clears its own
    /// part by the same table). The reset is mirrored, except a system
    /// reset's, whose records the caller sends QEMU as the answer to its
    /// SYSTEM_RESET: the journal has it either way, or a daemon restarted
    /// after it would bring the guest the old state.
    pub fn reset(&mut self, kind: Reset, mirror: &MirrorHandle) {
        let clears = kind.clears();
        if clears.answers {
            // The driver starts its rings afresh, so no request from before
            // can come again, and none may be answered from the journal (a
            // rebooted guest's first requests can have the same bytes and
            // positions as the old ones).
            self.answered = Answered::default();
            if let Some(j) = self.journal.as_mut() {
                j.forget_completions();
            }
        }
        if clears.recovery {
            self.recovered = false;
            self.qemu_instance = 0;
        }
        match clears.features {
            true => self.change(mirror, Publish::Now, |device, sink| device.reset(sink)),
            // Only the translation state (docs/mirror-protocol.md §9 rule 2):
            // a SYSTEM_RESET QEMU kept while no daemon ran arrives after the
            // rebooted driver's features were set over vhost-user; wiping
            // them would fail its every PROBE (UNSUPP), and Linux then never
            // attaches its endpoints.
            false => {
                let mut records = Vec::new();
                let mut batch = Batch::new(self.table.as_mut(), &mut records);
                self.device.reset_translation(&mut Journaled {
                    sink: &mut batch,
                    journal: self.journal.as_mut(),
                });
                let effects = batch.effects();
                self.commit();
                self.readers_after_change(effects);
            }
        }
        if clears.memory {
            self.set_memory(&NoRam);
        }
    }

    /// Whether a HELLO naming `instance` would reset a recovered state
    /// ([`Self::hello_is_foreign`]): the only HELLO whose sender must be
    /// proven the front-end's QEMU first (docs/mirror-protocol.md §6
    /// rule 7). The recovered state's own QEMU is let in at once: its
    /// random instance is its proof.
    pub fn hello_would_reset(&self, instance: u64) -> bool {
        self.recovered_for
            .is_some_and(|owner| instance != 0 && instance != owner)
    }

    /// A QEMU's mirror HELLO, before its dump is made: true if the device
    /// was recovered for another QEMU process (a QEMU started afresh on the
    /// same sockets, its guest booting): that state is not this guest's, and
    /// the caller resets the device ([`Reset::ForeignQemu`]) before
    /// [`Self::hello_names`] (docs/state-journal.md rule 6). A QEMU that
    /// sends no instance (0, mirror protocol 2.1) is taken for the recovered
    /// state's.
    pub fn hello_is_foreign(&mut self, instance: u64) -> bool {
        let Some(owner) = self.recovered_for.take() else {
            return false;
        };
        if instance != 0 && instance != owner {
            log::warn!(
                "state file: the recovered state belongs to another QEMU (instance \
                 {owner:#018x}; this one is {instance:#018x}): the device starts reset"
            );
            return true;
        }
        log::info!("state file: the QEMU of the recovered state is back");
        false
    }

    /// A QEMU's HELLO names its process: the first HELLO of a front-end
    /// session that names one makes the state file that QEMU's; a later one
    /// naming another process (some other local process on the mirror
    /// socket while QEMU's link is down) changes nothing, so that it cannot
    /// make the QEMU's own state be reset at the next restart.
    pub fn hello_names(&mut self, instance: u64) {
        if instance == 0 || instance == self.qemu_instance {
            return;
        }
        if self.qemu_instance != 0 {
            log::warn!(
                "mirror: a HELLO from QEMU process {instance:#018x} while the front-end's is \
                 {:#018x}: the state file stays the latter's",
                self.qemu_instance
            );
            return;
        }
        self.qemu_instance = instance;
        if let Some(j) = self.journal.as_mut() {
            j.set_instance(instance);
        }
    }
}

/// One batch of requests being carried out ([`Session::requests`]).
#[allow(missing_debug_implementations)]
pub struct Requests<'s, 'b> {
    device: &'s mut IommuDevice,
    journal: Option<&'s mut Journal>,
    answered: &'s mut Answered,
    answered_again: &'s mut u64,
    sink: &'s mut Batch<'b, Arc<SharedMem>>,
}

impl Requests<'_, '_> {
    /// Carry out the request at ring position `pos` (or answer it again, if
    /// a previous daemon carried it out: its status, nothing carried out
    /// twice), its reply in `reply`; the bytes of the reply.
    pub fn request(
        &mut self,
        pos: u16,
        request: &[u8],
        reply: &mut [u8],
        ram: &impl GuestRam,
    ) -> usize {
        if let Some(status) = self.answered_before(pos, request) {
            return journal::write_status(reply, status);
        }
        let written = self.device.handle_request(
            request,
            reply,
            ram,
            &mut Journaled {
                sink: &mut *self.sink,
                journal: self.journal.as_deref_mut(),
            },
        );
        if let Some(j) = self.journal.as_deref_mut() {
            if let Some(status) = journal::changing_status(request, &reply[..written]) {
                let digest = journal::digest(request);
                j.done(
                    Completion {
                        pos,
                        status,
                        digest,
                    },
                    self.device,
                );
            }
        }
        written
    }

    /// The status a previous daemon answered this request with, if it
    /// carried it out (docs/state-journal.md).
    fn answered_before(&mut self, pos: u16, request: &[u8]) -> Option<u8> {
        if self.answered.is_empty() {
            return None;
        }
        let status = self.answered.take(pos, journal::digest(request));
        *self.answered_again += u64::from(status.is_some());
        if self.answered.is_empty() {
            log::info!(
                "state file: {} requests the previous daemon carried out were answered, not \
                 carried out again",
                self.answered_again
            );
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_frontend::wire::MAX_REQ_LEN;
    use test_frontend::{Request, MAP_F_READ, MAP_F_WRITE};
    use virtio_iommu::RamRegion;

    /// One region of guest RAM at GPA 0, never dereferenced by the model.
    struct Ram;

    impl GuestRam for Ram {
        fn user_addr(&self, gpa: u64, len: u64) -> Option<u64> {
            (gpa.checked_add(len)? <= 1 << 30).then_some(0x7000_0000_0000 + gpa)
        }
        fn for_each_region(&self, f: &mut dyn FnMut(RamRegion)) {
            f(RamRegion {
                gpa: 0,
                len: 1 << 30,
                user_va: 0x7000_0000_0000,
            })
        }
    }

    fn session() -> Session {
        let config = crate::config::RawConfig::default().check().unwrap();
        let mut s = Session::new(crate::emulated::device(&config).unwrap(), None);
        s.set_memory(&Ram);
        s
    }

    /// Carry out `r` as the request at ring position `pos`; its status.
    fn request(s: &mut Session, pos: u16, r: Request) -> u8 {
        let mut buf = [0u8; MAX_REQ_LEN];
        let len = r.encode(&mut buf);
        let mut reply = [0xffu8; 4];
        let mirror = MirrorHandle::disconnected();
        let (written, ticket) = s.requests(&mirror, |reqs| {
            reqs.request(pos, &buf[..len], &mut reply, &Ram)
        });
        assert_eq!((written, ticket), (4, None));
        reply[0]
    }

    fn map(domain: u32, iova: u64) -> Request {
        Request::Map {
            domain,
            virt_start: iova,
            virt_end: iova + 0xfff,
            phys_start: 0x10_0000,
            flags: MAP_F_READ | MAP_F_WRITE,
        }
    }

    const OK: u8 = 0;

    /// Endpoint 8 into domain 1.
    const ATTACH_1_8: Request = Request::Attach {
        domain: 1,
        endpoint: 8,
        flags: 0,
    };

    /// A state file's state, taken as the daemon starts (before any
    /// control client can connect): kept for `status`, and published to a
    /// subscriber (none in the daemon so early; here one, to see the event).
    #[test]
    fn a_state_from_the_state_file_is_kept_for_status_and_published() {
        use crate::control::events::{Stamped, STATE_EVENT};
        use crate::control::{Event, Held};

        let mut previous = session();
        assert_eq!(request(&mut previous, 0, ATTACH_1_8), OK);
        assert_eq!(request(&mut previous, 1, map(1, 0x4000)), OK);
        assert_eq!(request(&mut previous, 2, map(1, 0x8000)), OK);
        let recovered = Recovered {
            state: previous.device().save_state(),
            instance: 0,
            answered: Answered::default(),
            records: 3,
        };

        let dir = test_frontend::daemon::Scratch::new("session-restored");
        let (journal, found) = Journal::open(&dir.join("state")).unwrap();
        assert!(matches!(found, Ok(None)), "a new file holds nothing");
        let telemetry = Arc::new(Telemetry::new(true));
        let rx = telemetry.events().take_receiver().unwrap();
        telemetry.events().subscriptions([STATE_EVENT].into_iter());
        assert_eq!(telemetry.last_restore(), None);
        // As the daemon's main: no guest memory yet.
        let config = crate::config::RawConfig::default().check().unwrap();
        let mut s = Session::new(crate::emulated::device(&config).unwrap(), None);
        s.watch(telemetry.clone());
        s.start_journal(journal, Some(recovered), &MirrorHandle::disconnected());

        let r = telemetry.last_restore().expect("the restore is kept");
        let held = Held {
            domains: 1,
            mappings: 2,
            attached: 1,
        };
        assert_eq!((r.source, r.held), ("state_file", held));
        assert!(r.time_us <= telemetry.events().now_us());
        let events: Vec<Stamped> = rx.try_iter().collect();
        assert_eq!(
            events,
            [Stamped {
                time_us: r.time_us,
                event: Event::StateRestored {
                    source: "state_file",
                    held
                },
            }]
        );
    }

    /// What a previous daemon left with endpoint 8 attached to domain 1,
    /// and a new state file in a scratch directory (kept while it lives).
    fn one_attachment_recovered(
        name: &str,
    ) -> (Recovered, Journal, test_frontend::daemon::Scratch) {
        let mut previous = session();
        assert_eq!(request(&mut previous, 0, ATTACH_1_8), OK);
        let recovered = Recovered {
            state: previous.device().save_state(),
            instance: 0,
            answered: Answered::default(),
            records: 1,
        };
        let dir = test_frontend::daemon::Scratch::new(name);
        let (journal, _) = Journal::open(&dir.join("state")).unwrap();
        (recovered, journal, dir)
    }

    /// The telemetry may come after the journal (the daemon's set-up order
    /// is free): the restore is told to it then, once.
    #[test]
    fn a_telemetry_given_after_the_journal_still_hears_of_the_restore() {
        use crate::control::events::STATE_EVENT;
        let (recovered, journal, _dir) = one_attachment_recovered("session-late-telemetry");
        let config = crate::config::RawConfig::default().check().unwrap();
        let mut s = Session::new(crate::emulated::device(&config).unwrap(), None);
        s.start_journal(journal, Some(recovered), &MirrorHandle::disconnected());

        let telemetry = Arc::new(Telemetry::new(true));
        let rx = telemetry.events().take_receiver().unwrap();
        telemetry.events().subscriptions([STATE_EVENT].into_iter());
        s.watch(telemetry.clone());
        let r = telemetry.last_restore().expect("told at watch");
        assert_eq!((r.source, r.held.attached), ("state_file", 1));
        // Watched again (the same telemetry): not told twice.
        s.watch(telemetry.clone());
        assert_eq!(rx.try_iter().count(), 1);
        // Once the state is handed to its front-end, a new telemetry hears
        // of no restore.
        assert!(s.take_recovered());
        let later = Arc::new(Telemetry::new(true));
        s.watch(later.clone());
        assert_eq!(later.last_restore(), None);
    }

    /// A state the device refuses leaves no restore to report.
    #[test]
    fn a_refused_state_file_state_is_no_restore() {
        let (recovered, journal, _dir) = one_attachment_recovered("session-refused");
        let telemetry = Arc::new(Telemetry::new(true));
        // A daemon started with other endpoints: 8 is not one of them.
        let config = crate::config::RawConfig {
            endpoints: Some("16".into()),
            ..Default::default()
        }
        .check()
        .unwrap();
        let mut s = Session::new(crate::emulated::device(&config).unwrap(), None);
        s.watch(telemetry.clone());
        s.start_journal(journal, Some(recovered), &MirrorHandle::disconnected());
        assert_eq!(s.device().stats().domains, 0, "the device starts reset");
        assert_eq!(telemetry.last_restore(), None);
    }

    /// A session with a shared table and its readers' registry, and a
    /// reader of endpoint 8 through the crate a back-end links, on the
    /// daemon's own files.
    fn session_with_reader(
        owns_iotlb: bool,
    ) -> (
        Session,
        Arc<crate::mirror::readers::ReaderEntry>,
        table_reader::Reader,
        Arc<Readers>,
    ) {
        let config = crate::config::RawConfig::default().check().unwrap();
        let memory = crate::mirror::MirrorMemory::new(64, (1 << 39) - 1).unwrap();
        let readers = memory.readers.clone();
        let mut s = Session::new(
            crate::emulated::device(&config).unwrap(),
            Some(memory.writer()),
        );
        s.set_readers(Some(readers.clone()));
        s.set_memory(&Ram);
        let entry = Arc::new(
            crate::mirror::readers::ReaderEntry::new(
                readers.next_id(),
                8,
                owns_iotlb,
                64,
                memory.levels,
                s.reader_state(8),
            )
            .unwrap(),
        );
        readers.add(entry.clone()).unwrap();
        let table_file = memory.table.file().try_clone().unwrap();
        let page_file = entry.page().file().try_clone().unwrap();
        let reader = table_reader::Reader::new(&table_file, &page_file).unwrap();
        (s, entry, reader, readers)
    }

    #[test]
    fn a_table_reader_follows_its_endpoint_through_attach_map_unmap_and_detach() {
        let (mut s, _entry, reader, _readers) = session_with_reader(true);
        // Boot bypass: unattached endpoints bypass.
        assert_eq!(reader.section(0).unwrap().mode(), Mode::Bypass);
        assert_eq!(request(&mut s, 0, ATTACH_1_8), OK);
        assert!(s.take_grace(), "an ATTACH may move the endpoint away");
        assert!(matches!(
            reader.section(0).unwrap().mode(),
            Mode::Translated { .. }
        ));
        assert_eq!(request(&mut s, 1, map(1, 0x4000)), OK);
        assert!(!s.take_grace(), "a MAP removes nothing: no wait");
        let seg = reader
            .section(1)
            .unwrap()
            .translate(0x4010, 0x2000, true)
            .unwrap();
        assert_eq!((seg.gpa, seg.len), (0x10_0010, 0xff0));
        let unmap = Request::Unmap {
            domain: 1,
            virt_start: 0x4000,
            virt_end: 0x4fff,
        };
        assert_eq!(request(&mut s, 2, unmap), OK);
        assert!(s.take_grace(), "an UNMAP waits for the readers");
        assert!(reader
            .section(0)
            .unwrap()
            .translate(0x4010, 8, false)
            .is_err());
        let detach = Request::Detach {
            domain: 1,
            endpoint: 8,
        };
        assert_eq!(request(&mut s, 3, detach), OK);
        assert!(s.take_grace());
        assert_eq!(reader.section(0).unwrap().mode(), Mode::Bypass);
        assert!(reader.changes() >= 2);
    }

    #[test]
    fn a_reader_that_owns_its_iotlb_takes_a_vhost_endpoints_unmaps_off_the_mirror() {
        // The effect on records is src/mirror/batch.rs's test; here the
        // session asks the registry.
        let (_s, _entry, _reader, readers) = session_with_reader(true);
        assert!(readers.owns_iotlb(8));
        let (_s, _entry, _reader, readers) = session_with_reader(false);
        assert!(!readers.owns_iotlb(8));
    }

    #[test]
    fn a_reader_that_never_leaves_its_section_delays_an_unmap_by_the_bound_only() {
        let (mut s, _entry, reader, readers) = session_with_reader(true);
        readers.set_grace(std::time::Duration::from_millis(30));
        assert_eq!(request(&mut s, 0, ATTACH_1_8), OK);
        assert_eq!(request(&mut s, 1, map(1, 0x4000)), OK);
        s.take_grace();
        // A hostile (or hung) back-end: in a section, forever.
        let stuck = reader.section(7).unwrap();
        let unmap = Request::Unmap {
            domain: 1,
            virt_start: 0x4000,
            virt_end: 0x4fff,
        };
        assert_eq!(request(&mut s, 2, unmap), OK);
        assert!(s.take_grace());
        // What the worker does before completing the batch.
        let t = std::time::Instant::now();
        assert_eq!(readers.synchronize(), 1, "revoked");
        assert!(t.elapsed() < std::time::Duration::from_secs(2));
        drop(stuck);
        assert!(matches!(
            reader.section(0),
            Err(table_reader::Error::Revoked)
        ));
        // The next removal does not wait for it.
        assert_eq!(request(&mut s, 3, map(1, 0x4000)), OK);
        let unmap = Request::Unmap {
            domain: 1,
            virt_start: 0x4000,
            virt_end: 0x4fff,
        };
        assert_eq!(request(&mut s, 4, unmap), OK);
        assert!(!s.take_grace(), "no reader left to wait for");
    }

    #[test]
    fn a_system_reset_blocks_or_bypasses_a_readers_endpoint_at_once() {
        let (mut s, _entry, reader, _readers) = session_with_reader(true);
        assert_eq!(request(&mut s, 0, ATTACH_1_8), OK);
        assert!(matches!(
            reader.section(0).unwrap().mode(),
            Mode::Translated { .. }
        ));
        s.reset(Reset::System, &MirrorHandle::disconnected());
        // Back to the boot bypass, the old tree out of the reader's reach.
        assert_eq!(reader.section(0).unwrap().mode(), Mode::Bypass);
    }

    #[test]
    fn without_readers_nothing_waits() {
        let mut s = session();
        assert_eq!(request(&mut s, 0, ATTACH_1_8), OK);
        assert_eq!(request(&mut s, 1, map(1, 0x4000)), OK);
        let unmap = Request::Unmap {
            domain: 1,
            virt_start: 0x4000,
            virt_end: 0x4fff,
        };
        assert_eq!(request(&mut s, 2, unmap), OK);
        assert!(!s.take_grace());
    }

    #[test]
    fn a_request_is_carried_out_end_to_end_without_a_socket() {
        let mut s = session();
        let attach = ATTACH_1_8;
        assert_eq!(request(&mut s, 0, attach), OK);
        assert_eq!(request(&mut s, 1, map(1, 0x1000)), OK);
        let st = s.device().stats();
        assert_eq!((st.domains, st.mappings, st.attached), (1, 1, 1));
    }

    #[test]
    fn each_reset_clears_what_its_table_says() {
        let mirror = MirrorHandle::disconnected();
        for kind in [
            Reset::FrontEnd,
            Reset::Device,
            Reset::ForeignQemu,
            Reset::System,
            Reset::RefusedState,
        ] {
            let mut s = session();
            let features = s.device().features();
            s.device_mut().set_acked_features(features);
            assert_ne!(s.device().acked_features(), 0);
            s.qemu_instance = 7;
            let attach = Request::Attach {
                domain: 1,
                endpoint: 8,
                flags: 0,
            };
            assert_eq!(request(&mut s, 0, attach), OK);
            assert_eq!(request(&mut s, 1, map(1, 0x1000)), OK);
            s.reset(kind, &mirror);
            let c = kind.clears();
            let st = s.device().stats();
            assert_eq!(
                (st.domains, st.mappings, st.attached),
                (0, 0, 0),
                "{kind:?}"
            );
            let kept = s.device().acked_features() == features;
            assert_eq!(kept, !c.features, "{kind:?}: features");
            assert_eq!(s.qemu_instance == 0, c.recovery, "{kind:?}: whose state");
            // The device serves again at once (once a front-end that left
            // has sent its memory table again).
            if c.memory {
                s.set_memory(&Ram);
            }
            assert_eq!(request(&mut s, 2, attach), OK);
            assert_eq!(request(&mut s, 3, map(1, 0x1000)), OK, "{kind:?}");
        }
    }

    #[test]
    fn the_models_pins_are_answered_from_guest_ram() {
        use iopt::{Iommufd, IoptError, MapRequest, Prot};
        let mut s = session();
        let attach = ATTACH_1_8;
        assert_eq!(request(&mut s, 0, attach), OK);
        let ioas = s.device().domain(1).unwrap().ioas.unwrap();
        let DaemonIoas::Model(m) = s.device_mut().iommufd_mut() else {
            panic!("emulated mode runs the model");
        };
        // With a device attached, iommufd pins at MAP time: memory outside
        // guest RAM (Ram: 1 GiB at 0x7000_0000_0000) is EFAULT.
        let map = |user_va| MapRequest {
            iova: None,
            user_va,
            length: 0x1000,
            prot: Prot {
                read: true,
                write: true,
            },
        };
        assert_eq!(
            m.map(ioas, map(0x7000_0000_0000 + (1 << 30))),
            Err(IoptError::Fault)
        );
        assert!(m.map(ioas, map(0x7000_0000_1000)).is_ok());
        // A front-end that left took its memory with it.
        s.reset(Reset::FrontEnd, &MirrorHandle::disconnected());
        assert_eq!(request(&mut s, 1, attach), OK);
        let ioas = s.device().domain(1).unwrap().ioas.unwrap();
        let DaemonIoas::Model(m) = s.device_mut().iommufd_mut() else {
            unreachable!()
        };
        assert_eq!(m.map(ioas, map(0x7000_0000_1000)), Err(IoptError::Fault));
    }

    #[test]
    fn the_first_qemu_to_name_itself_owns_the_state_file() {
        let mut s = session();
        assert!(
            !s.hello_is_foreign(5),
            "nothing recovered: no one is foreign"
        );
        s.hello_names(0);
        assert_eq!(s.qemu_instance, 0, "an instance of 0 names no one");
        s.hello_names(5);
        s.hello_names(9);
        assert_eq!(s.qemu_instance, 5, "a later HELLO changes nothing");
        s.recovered_for = Some(5);
        assert!(!s.hello_is_foreign(5));
        s.recovered_for = Some(5);
        assert!(
            !s.hello_is_foreign(0),
            "a QEMU without an instance is taken for it"
        );
        s.recovered_for = Some(5);
        assert!(!s.hello_would_reset(5) && !s.hello_would_reset(0));
        assert!(
            s.hello_would_reset(9),
            "only a foreign instance must be proven"
        );
        assert!(s.hello_is_foreign(9));
        assert!(!s.unconfirmed(), "asked once");
        assert!(
            !s.hello_would_reset(9),
            "nothing recovered is left to reset"
        );
    }

    #[test]
    fn every_reset_clears_answers_or_says_why_not_and_only_a_front_end_takes_memory() {
        use Reset::*;
        for kind in [FrontEnd, Device, ForeignQemu, System, RefusedState] {
            let c = kind.clears();
            assert_eq!(c.memory, kind == FrontEnd, "{kind:?}");
            assert_eq!(c.queues, kind == FrontEnd, "{kind:?}");
            assert_eq!(
                c.features,
                kind != System,
                "{kind:?}: system keeps features"
            );
            assert_eq!(c.answers, kind != RefusedState, "{kind:?}");
        }
        assert!(ForeignQemu.clears().recovery && FrontEnd.clears().recovery);
        assert!(!Device.clears().recovery && !System.clears().recovery);
    }
}
