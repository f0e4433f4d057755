// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! [`TestVm`]: one vhost-user session with the daemon — the VMM half
//! (handshake, memory table, vrings, config space) and the guest-driver half
//! (virtio-iommu requests on the request queue, faults on the event queue).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::ram::{GuestRam, RamError, RegionSpec, DEFAULT_RAM};
use crate::vring::{Desc, VirtQueue, VringError};
use crate::wire::{
    feature, parse_probe_props, FaultEvent, IommuConfig, ProbeParseError, Request, ResvMem, Status,
    CONFIG_BYPASS_OFFSET, CONFIG_LEN, FAULT_LEN, MAX_REQ_LEN, TAIL_LEN,
};

/// Index of the request queue.
pub const REQUEST_QUEUE: usize = 0;
/// Index of the event queue.
pub const EVENT_QUEUE: usize = 1;
/// Number of queues of a virtio-iommu device.
pub const NUM_QUEUES: usize = 2;

/// Length the device reported in a used ring entry.
pub type UsedLen = u32;

/// Errors of a [`TestVm`] session.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A vhost-user message failed (socket, protocol or backend error).
    #[error("vhost-user: {0}")]
    Vhost(#[from] vhost::Error),
    /// No used entry (or fault) within the timeout.
    #[error("timed out after {0:?} waiting for the device")]
    Timeout(Duration),
    /// I/O error (eventfd, memfd, ...).
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// Guest memory set-up or access failed.
    #[error("guest memory: {0}")]
    Ram(#[from] RamError),
    /// Virtqueue driver error (including a device that misuses the used ring).
    #[error("virtqueue: {0}")]
    Vring(#[from] VringError),
    /// The device sent something that violates the spec: a wrong used length,
    /// a malformed PROBE property list, a missing mandatory feature, ...
    #[error("bad reply from the device: {0}")]
    BadReply(String),
}

/// Result alias.
pub type Result<T> = std::result::Result<T, Error>;

/// How to set the session up.
#[derive(Clone, Debug)]
pub struct VmOptions {
    /// Guest RAM layout (default: 16 MiB at GPA 0).
    pub regions: Vec<RegionSpec>,
    /// Size of both queues (default 256).
    pub queue_size: u16,
    /// virtio-iommu device features to ack; `None` = every offered bit in
    /// 0..=6 except the legacy BYPASS (3). Masked by what the device offers.
    pub device_features: Option<u64>,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX if offered (default true).
    pub event_idx: bool,
    /// Negotiate VHOST_USER_PROTOCOL_F_REPLY_ACK if offered and ask for an ack
    /// on every message that has no reply of its own (default true).
    pub reply_ack: bool,
    /// Device-writable buffers pre-posted on the event queue (default 16).
    pub event_buffers: u16,
    /// How long to wait for a used entry (default 5 s).
    pub timeout: Duration,
    /// Fail requests whose used length differs from the writable length
    /// (default true).
    pub strict_used_len: bool,
    /// Kick after every submission instead of honouring the device's
    /// notification suppression (default false).
    pub always_kick: bool,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            regions: vec![DEFAULT_RAM],
            queue_size: 256,
            device_features: None,
            event_idx: true,
            reply_ack: true,
            event_buffers: 16,
            timeout: Duration::from_secs(5),
            strict_used_len: true,
            always_kick: false,
        }
    }
}

/// What was negotiated during the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// Features the device offered (GET_FEATURES).
    pub offered: u64,
    /// Features acked (SET_FEATURES).
    pub acked: u64,
    /// Protocol features the backend offered.
    pub protocol_offered: u64,
    /// Protocol features acked.
    pub protocol_acked: u64,
}

/// Guest buffers of one in-flight request: readable part, writable part.
#[derive(Clone, Copy, Debug)]
struct Slot {
    req: u64,
    resp: u64,
}

/// One completed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Status from the tail.
    pub status: Status,
    /// Used length reported by the device.
    pub used_len: UsedLen,
}

/// A vhost-user session with a virtio-iommu daemon: the VMM and the guest
/// driver in one. Dropping it closes the socket.
pub struct TestVm {
    frontend: Frontend,
    ram: Arc<GuestRam>,
    reqq: VirtQueue,
    evq: VirtQueue,
    negotiated: Negotiated,
    probe_size: u32,
    opts: VmOptions,
    /// Request buffer pairs, one per possible in-flight request.
    slots: Vec<Slot>,
    free_slots: Vec<u16>,
    /// Slot used by each in-flight request, by head descriptor.
    slot_of_head: Vec<u16>,
    /// Writable buffer of each posted event-queue chain, by head descriptor.
    evbuf_of_head: Vec<u64>,
}

const NO_SLOT: u16 = u16::MAX;

impl std::fmt::Debug for TestVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // vhost's Frontend is not Debug.
        f.debug_struct("TestVm")
            .field("negotiated", &self.negotiated)
            .field("probe_size", &self.probe_size)
            .field("reqq", &self.reqq)
            .field("evq", &self.evq)
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl TestVm {
    /// Connect to the daemon at `socket` and do the whole handshake: after
    /// this, both queues are live and the event queue has buffers.
    pub fn connect(socket: &Path, opts: VmOptions) -> Result<TestVm> {
        let ram = Arc::new(GuestRam::new(&opts.regions)?);
        let mut reqq = VirtQueue::new(ram.clone(), opts.queue_size)?;
        let mut evq = VirtQueue::new(ram.clone(), opts.queue_size)?;

        // Event buffers are posted before the rings go live, like a driver
        // that fills its receive queue before DRIVER_OK.
        let mut evbuf_of_head = vec![0u64; opts.queue_size as usize];
        for _ in 0..opts.event_buffers.min(opts.queue_size) {
            let gpa = ram.alloc(FAULT_LEN as u64, 8)?;
            ram.fill(gpa, FAULT_LEN, 0)?;
            let head = evq.add_chain(&[Desc::writable(gpa, FAULT_LEN as u32)])?;
            evbuf_of_head[head as usize] = gpa;
        }
        let (fe, negotiated) = handshake(socket, &opts, &ram, [&mut reqq, &mut evq], [0, 0])?;
        let proto = VhostUserProtocolFeatures::from_bits_truncate(negotiated.protocol_acked);

        let mut vm = TestVm {
            frontend: fe,
            ram,
            reqq,
            evq,
            negotiated,
            probe_size: 0,
            slots: Vec::new(),
            free_slots: Vec::new(),
            slot_of_head: vec![NO_SLOT; opts.queue_size as usize],
            evbuf_of_head,
            opts,
        };
        if vm.evq.in_flight() > 0 {
            vm.notify_evq()?;
        }

        if proto.contains(VhostUserProtocolFeatures::CONFIG) {
            vm.probe_size = IommuConfig::decode(&vm.config()?).probe_size;
        }
        if vm.probe_size > 64 * 1024 {
            return Err(Error::BadReply(format!(
                "probe_size {} is implausibly large",
                vm.probe_size
            )));
        }
        // One buffer pair per possible in-flight request (2 descriptors each).
        let nslots = vm.opts.queue_size / 2;
        let resp_len = (vm.probe_size as usize + TAIL_LEN) as u64;
        for i in 0..nslots {
            let req = vm.ram.alloc(MAX_REQ_LEN as u64, 8)?;
            let resp = vm.ram.alloc(resp_len, 8)?;
            vm.slots.push(Slot { req, resp });
            vm.free_slots.push(nslots - 1 - i);
        }
        Ok(vm)
    }

    /// The guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The request queue.
    pub fn request_queue(&mut self) -> &mut VirtQueue {
        &mut self.reqq
    }

    /// The event queue.
    pub fn event_queue(&mut self) -> &mut VirtQueue {
        &mut self.evq
    }

    /// The vhost-user front-end, for messages this type does not wrap.
    /// The back-end at `socket` took over from one that died or stopped
    /// (a daemon restarted on its state file): connect to it and hand it
    /// the same memory and rings, each restarted at its used index — what
    /// QEMU does when its vhost-user socket reconnects — so that requests
    /// still in flight come again. The event queue keeps its buffers.
    pub fn reconnect(&mut self, socket: &Path) -> Result<()> {
        let bases = [self.reqq.used_idx()?, self.evq.used_idx()?];
        let (fe, negotiated) = handshake(
            socket,
            &self.opts,
            &self.ram,
            [&mut self.reqq, &mut self.evq],
            bases,
        )?;
        self.frontend = fe;
        self.negotiated = negotiated;
        // Requests may be waiting on the ring: kick whatever the event
        // index says (QEMU's fresh host notifier starts signalled).
        self.reqq.kick()?;
        Ok(())
    }

    /// Migration, source side: the device's state, as vhost-user
    /// `SET_DEVICE_STATE_FD(SAVE, STOPPED)` + `CHECK_DEVICE_STATE` give it.
    pub fn save_state(&mut self) -> Result<Vec<u8>> {
        use std::io::Read;
        use vhost::vhost_user::message::{VhostTransferStateDirection, VhostTransferStatePhase};
        let (mut r, w) = pipe()?;
        let other = self.frontend.set_device_state_fd(
            VhostTransferStateDirection::SAVE,
            VhostTransferStatePhase::STOPPED,
            w,
        )?;
        let mut bytes = Vec::new();
        match other {
            Some(mut f) => f.read_to_end(&mut bytes)?,
            None => r.read_to_end(&mut bytes)?,
        };
        self.frontend.check_device_state()?;
        Ok(bytes)
    }

    /// Migration, destination side: hand the device a saved state.
    pub fn load_state(&mut self, bytes: &[u8]) -> Result<()> {
        use std::io::Write;
        use vhost::vhost_user::message::{VhostTransferStateDirection, VhostTransferStatePhase};
        let (r, w) = pipe()?;
        let mut w = std::fs::File::from(w);
        let other = self.frontend.set_device_state_fd(
            VhostTransferStateDirection::LOAD,
            VhostTransferStatePhase::STOPPED,
            r.into(),
        )?;
        match other {
            Some(mut f) => f.write_all(bytes)?,
            None => w.write_all(bytes)?,
        }
        drop(w);
        self.frontend.check_device_state()?;
        Ok(())
    }

    /// Migration: hand the device a dirty log (`SET_LOG_BASE`): `len` bytes
    /// of `file`, bit `n` for guest page `n`.
    pub fn set_dirty_log(&mut self, file: &std::fs::File, len: u64) -> Result<()> {
        use std::os::fd::AsRawFd;
        let region = vhost::VhostUserDirtyLogRegion {
            mmap_size: len,
            mmap_offset: 0,
            mmap_handle: file.as_raw_fd(),
        };
        self.frontend.set_log_base(0, Some(region))?;
        Ok(())
    }

    pub fn frontend(&mut self) -> &mut Frontend {
        &mut self.frontend
    }

    /// What the handshake negotiated.
    pub fn negotiated(&self) -> Negotiated {
        self.negotiated
    }

    /// The acked virtio features.
    pub fn features(&self) -> u64 {
        self.negotiated.acked
    }

    /// `probe_size` from the config space, read at connect time.
    pub fn probe_size(&self) -> u32 {
        self.probe_size
    }

    /// The options the session was made with.
    pub fn options(&self) -> &VmOptions {
        &self.opts
    }

    /// Read the whole config space (GET_CONFIG offset 0, size 40).
    pub fn config(&mut self) -> Result<[u8; CONFIG_LEN]> {
        let (_, payload) = self.frontend.get_config(
            0,
            CONFIG_LEN as u32,
            VhostUserConfigFlags::empty(),
            &[0u8; CONFIG_LEN],
        )?;
        payload.as_slice().try_into().map_err(|_| {
            Error::BadReply(format!(
                "GET_CONFIG returned {} bytes, expected {CONFIG_LEN}",
                payload.len()
            ))
        })
    }

    /// Read and decode the config space.
    pub fn iommu_config(&mut self) -> Result<IommuConfig> {
        Ok(IommuConfig::decode(&self.config()?))
    }

    /// Write `config.bypass` (SET_CONFIG offset 36, size 1).
    pub fn set_bypass(&mut self, bypass: bool) -> Result<()> {
        self.frontend.set_config(
            CONFIG_BYPASS_OFFSET,
            VhostUserConfigFlags::empty(),
            &[bypass as u8],
        )?;
        Ok(())
    }

    /// ATTACH `endpoint` to `domain`.
    pub fn attach(&mut self, domain: u32, endpoint: u32, flags: u32) -> Result<Status> {
        self.request(&Request::Attach {
            domain,
            endpoint,
            flags,
        })
    }

    /// DETACH `endpoint` from `domain`.
    pub fn detach(&mut self, domain: u32, endpoint: u32) -> Result<Status> {
        self.request(&Request::Detach { domain, endpoint })
    }

    /// MAP `[virt_start, virt_end]` (inclusive) to `phys_start` in `domain`.
    pub fn map(
        &mut self,
        domain: u32,
        virt_start: u64,
        virt_end: u64,
        phys_start: u64,
        flags: u32,
    ) -> Result<Status> {
        self.request(&Request::Map {
            domain,
            virt_start,
            virt_end,
            phys_start,
            flags,
        })
    }

    /// UNMAP `[virt_start, virt_end]` (inclusive) in `domain`.
    pub fn unmap(&mut self, domain: u32, virt_start: u64, virt_end: u64) -> Result<Status> {
        self.request(&Request::Unmap {
            domain,
            virt_start,
            virt_end,
        })
    }

    /// PROBE `endpoint`: status and the RESV_MEM properties.
    pub fn probe(&mut self, endpoint: u32) -> Result<(Status, Vec<ResvMem>)> {
        let (slot, status) = self.request_in_slot(&Request::Probe { endpoint })?;
        let props = if status.is_ok() {
            let mut area = vec![0u8; self.probe_size as usize];
            self.ram.read(self.slots[slot as usize].resp, &mut area)?;
            parse_probe_props(&area)
                .map_err(|e: ProbeParseError| Error::BadReply(format!("PROBE properties: {e:?}")))?
        } else {
            Vec::new()
        };
        Ok((status, props))
    }

    /// Send one request and wait for its status.
    pub fn request(&mut self, req: &Request) -> Result<Status> {
        Ok(self.request_in_slot(req)?.1)
    }

    /// Send one request, wait; returns the slot (whose buffers stay valid
    /// until the next request) and the status.
    fn request_in_slot(&mut self, req: &Request) -> Result<(u16, Status)> {
        let (head, slot) = self.post(req)?;
        self.notify_reqq()?;
        let deadline = Instant::now() + self.opts.timeout;
        loop {
            let (h, len) = self.wait_req_used(deadline)?;
            let (s, st) = self.complete(h, len)?;
            if h == head {
                debug_assert_eq!(s, slot);
                return Ok((slot, st?));
            }
            // A completion of some other request (e.g. after submit_raw
            // timed out): already recycled, keep waiting for ours.
        }
    }

    /// Encode `req` into a free slot and add its chain; returns (head, slot).
    fn post(&mut self, req: &Request) -> Result<(u16, u16)> {
        let slot = self.free_slots.pop().ok_or(VringError::Full {
            need: 2,
            free: self.reqq.num_free(),
        })?;
        let bufs = self.slots[slot as usize];
        let mut b = [0u8; MAX_REQ_LEN];
        let rlen = req.encode(&mut b);
        let wlen = req.writable_len(self.probe_size);
        let res = (|| -> Result<u16> {
            self.ram.write(bufs.req, &b[..rlen])?;
            // Poison the writable part so a device that does not write the
            // status is caught (0xff is no valid status).
            self.ram.fill(bufs.resp, wlen, 0xff)?;
            Ok(self.reqq.add_chain(&[
                Desc::readable(bufs.req, rlen as u32),
                Desc::writable(bufs.resp, wlen as u32),
            ])?)
        })();
        match res {
            Ok(head) => {
                self.slot_of_head[head as usize] = slot;
                Ok((head, slot))
            }
            Err(e) => {
                self.free_slots.push(slot);
                Err(e)
            }
        }
    }

    /// Recycle the slot of a used head and decode its status. The outer
    /// result fails on a bookkeeping error; the inner one on a bad reply.
    fn complete(&mut self, head: u16, len: u32) -> Result<(u16, Result<Status>)> {
        let slot = std::mem::replace(&mut self.slot_of_head[head as usize], NO_SLOT);
        if slot == NO_SLOT {
            // A raw chain; nothing to decode.
            return Ok((NO_SLOT, Ok(Status::Other(0xff))));
        }
        self.free_slots.push(slot);
        let bufs = self.slots[slot as usize];
        // The request type decides the writable length: read it back.
        let mut ty = [0u8; 1];
        self.ram.read(bufs.req, &mut ty)?;
        let wlen = if ty[0] == crate::wire::req_type::PROBE {
            self.probe_size as usize + TAIL_LEN
        } else {
            TAIL_LEN
        };
        let mut tail = [0u8; TAIL_LEN];
        self.ram
            .read(bufs.resp + (wlen - TAIL_LEN) as u64, &mut tail)?;
        let status = Status::from(tail[0]);
        if self.opts.strict_used_len && len as usize != wlen {
            return Ok((
                slot,
                Err(Error::BadReply(format!(
                    "used len {len} for a request with {wlen} writable bytes (status {status:?})"
                ))),
            ));
        }
        Ok((slot, Ok(status)))
    }

    fn wait_req_used(&mut self, deadline: Instant) -> Result<(u16, u32)> {
        let left = deadline.saturating_duration_since(Instant::now());
        self.reqq
            .wait_used(left)?
            .ok_or(Error::Timeout(self.opts.timeout))
    }

    fn notify_reqq(&mut self) -> Result<()> {
        if self.opts.always_kick {
            self.reqq.kick()?;
        } else {
            self.reqq.kick_if_needed()?;
        }
        Ok(())
    }

    fn notify_evq(&mut self) -> Result<()> {
        if self.opts.always_kick {
            self.evq.kick()?;
        } else {
            self.evq.kick_if_needed()?;
        }
        Ok(())
    }

    /// Submit a hand-made chain on the request queue (malformed requests:
    /// short buffers, buffers outside guest RAM, ...), kick, and wait for its
    /// used entry. Returns the used length; the caller reads whatever the
    /// device wrote through [`ram`](Self::ram).
    pub fn submit_raw(&mut self, chain: &[Desc]) -> Result<UsedLen> {
        let head = self.reqq.add_chain(chain)?;
        self.slot_of_head[head as usize] = NO_SLOT;
        self.notify_reqq()?;
        let deadline = Instant::now() + self.opts.timeout;
        loop {
            let (h, len) = self.wait_req_used(deadline)?;
            let _ = self.complete(h, len)?;
            if h == head {
                return Ok(len);
            }
        }
    }

    /// Allocate a buffer in guest RAM (e.g. for [`submit_raw`](Self::submit_raw)).
    pub fn alloc(&self, len: u64) -> Result<u64> {
        Ok(self.ram.alloc(len, 8)?)
    }

    /// Put many requests in the ring, notify once per ring-full, and wait for
    /// all of them. Statuses come back in request order.
    pub fn submit_batch(&mut self, reqs: &[Request]) -> Result<Vec<Status>> {
        let mut out = vec![Status::Other(0xff); reqs.len()];
        // Position in `reqs` of the request using each slot.
        let mut index_of_slot = vec![usize::MAX; self.slots.len()];
        let mut next = 0;
        let mut pending = 0usize;
        let mut first_err: Option<Error> = None;
        while next < reqs.len() || pending > 0 {
            let mut posted = false;
            while next < reqs.len() && !self.free_slots.is_empty() && self.reqq.num_free() >= 2 {
                let (_, slot) = self.post(&reqs[next])?;
                index_of_slot[slot as usize] = next;
                next += 1;
                pending += 1;
                posted = true;
            }
            if posted {
                self.notify_reqq()?;
            }
            let deadline = Instant::now() + self.opts.timeout;
            // Wait for at least one, then drain whatever else is there.
            let (h, len) = self.wait_req_used(deadline)?;
            let mut used = Some((h, len));
            while let Some((h, len)) = used {
                let (slot, st) = self.complete(h, len)?;
                if slot != NO_SLOT {
                    let i = std::mem::replace(&mut index_of_slot[slot as usize], usize::MAX);
                    if i != usize::MAX {
                        pending -= 1;
                        match st {
                            Ok(s) => out[i] = s,
                            Err(e) => {
                                first_err.get_or_insert(e);
                            }
                        }
                    }
                }
                used = self.reqq.pop_used()?;
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Put as many of `reqs` in the request queue as there are free request
    /// buffers and descriptors (up to half the queue size), notify the device
    /// once (if it asked to be), and return how many went in, without
    /// waiting. Collect them with [`poll_completion`](Self::poll_completion).
    /// Allocates nothing.
    pub fn submit(&mut self, reqs: &[Request]) -> Result<usize> {
        let mut posted = 0;
        for req in reqs {
            if self.free_slots.is_empty() || self.reqq.num_free() < 2 {
                break;
            }
            self.post(req)?;
            posted += 1;
        }
        if posted > 0 {
            self.notify_reqq()?;
        }
        Ok(posted)
    }

    /// Look once at the used ring, as a driver that kicks then busy-polls
    /// does (Linux's virtio-iommu driver): the next completed request, or
    /// `None` if the device has used nothing new. No system call, and the
    /// device is not asked for a notification ([`VirtQueue::poll_used`]).
    /// A chain from [`submit_raw`](Self::submit_raw) completes with
    /// `Status::Other(0xff)`.
    pub fn poll_completion(&mut self) -> Result<Option<Completion>> {
        let Some((head, used_len)) = self.reqq.poll_used()? else {
            return Ok(None);
        };
        let (_, status) = self.complete(head, used_len)?;
        Ok(Some(Completion {
            status: status?,
            used_len,
        }))
    }

    /// Wait up to `timeout` for a fault record on the event queue; the buffer
    /// is reposted. `Ok(None)` if none arrived.
    pub fn next_fault(&mut self, timeout: Duration) -> Result<Option<FaultEvent>> {
        let Some((head, len)) = self.evq.wait_used(timeout)? else {
            return Ok(None);
        };
        let gpa = self.evbuf_of_head[head as usize];
        let mut rec = [0u8; FAULT_LEN];
        self.ram.read(gpa, &mut rec)?;
        // Repost the same buffer.
        self.ram.fill(gpa, FAULT_LEN, 0)?;
        let new_head = self
            .evq
            .add_chain(&[Desc::writable(gpa, FAULT_LEN as u32)])?;
        self.evbuf_of_head[new_head as usize] = gpa;
        self.notify_evq()?;
        if (len as usize) < FAULT_LEN {
            return Err(Error::BadReply(format!(
                "fault record with used len {len}, expected {FAULT_LEN}"
            )));
        }
        Ok(Some(FaultEvent::decode(&rec)))
    }
}

/// A close-on-exec pipe: (read end, write end).
fn pipe() -> std::io::Result<(std::fs::File, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [-1; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and nothing else owns them.
    let (r, w) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    };
    Ok((r, w))
}

/// The vhost-user handshake of a front-end whose guest memory is `ram` and
/// whose queues are `queues`, started at the available-ring positions
/// `bases` (0 for new rings; the used index for a front-end whose back-end
/// restarted, as QEMU does): owner, features, protocol features, memory
/// table, then each vring.
fn handshake(
    socket: &Path,
    opts: &VmOptions,
    ram: &GuestRam,
    queues: [&mut VirtQueue; NUM_QUEUES],
    bases: [u16; NUM_QUEUES],
) -> Result<(Frontend, Negotiated)> {
    let frontend = Frontend::connect(socket, NUM_QUEUES as u64)?;
    frontend.set_owner()?;
    let offered = frontend.get_features()?;
    for (bit, name) in [
        (feature::VERSION_1, "VIRTIO_F_VERSION_1"),
        (feature::PROTOCOL_FEATURES, "VHOST_USER_F_PROTOCOL_FEATURES"),
    ] {
        if offered & bit == 0 {
            return Err(Error::BadReply(format!(
                "device features {offered:#x} lack {name}"
            )));
        }
    }
    let device = opts.device_features.unwrap_or(feature::DEFAULT_WANTED) & offered & 0xff_ffff; // device-specific bits only
    let mut acked = feature::VERSION_1 | feature::PROTOCOL_FEATURES | device;
    if opts.event_idx {
        acked |= offered & feature::RING_EVENT_IDX;
    }
    frontend.set_features(acked)?;

    let mut fe = frontend;
    let protocol_offered = fe.get_protocol_features()?;
    // As QEMU: RESET_DEVICE too, so that a test can reset the device
    // (Frontend::reset_device).
    let mut proto = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::DEVICE_STATE
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::RESET_DEVICE;
    if opts.reply_ack {
        proto |= VhostUserProtocolFeatures::REPLY_ACK;
    }
    let proto = proto & protocol_offered;
    fe.set_protocol_features(proto)?;
    if proto.contains(VhostUserProtocolFeatures::REPLY_ACK) {
        // vhost's Frontend only waits for an ack when the header asks
        // for one; GET_* messages have their own reply and are not acked.
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    }

    fe.set_mem_table(&ram.vhost_regions())?;

    let event_idx = acked & feature::RING_EVENT_IDX != 0;
    for (index, (q, base)) in queues.into_iter().zip(bases).enumerate() {
        q.set_event_idx(event_idx);
        let a = q.addrs();
        let va = |gpa: u64| -> Result<u64> {
            Ok(ram.mem().get_host_address(GuestAddress(gpa)).map_err(|e| {
                Error::Ram(RamError::Access {
                    gpa,
                    len: 0,
                    msg: e.to_string(),
                })
            })? as u64)
        };
        fe.set_vring_num(index, q.size())?;
        // vhost-user ring addresses are front-end virtual addresses,
        // translated by the backend through the memory table.
        fe.set_vring_addr(
            index,
            &VringConfigData {
                queue_max_size: q.size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: va(a.desc)?,
                used_ring_addr: va(a.used)?,
                avail_ring_addr: va(a.avail)?,
                log_addr: None,
            },
        )?;
        fe.set_vring_base(index, base)?;
        fe.set_vring_call(index, q.call_fd())?;
        fe.set_vring_kick(index, q.kick_fd())?;
        fe.set_vring_err(index, q.err_fd())?;
        fe.set_vring_enable(index, true)?;
    }

    let negotiated = Negotiated {
        offered,
        acked,
        protocol_offered: protocol_offered.bits(),
        protocol_acked: proto.bits(),
    };
    Ok((fe, negotiated))
}
