// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The reading side of a mirror connection: QEMU's messages and the
//! files that come with them (`SCM_RIGHTS`), the HELLO that starts the
//! dump, ACKs, faults, system resets, forwarded devices and the completion
//! files (docs/mirror-protocol.md §4–§15).

use super::*;

/// Why a connection ended other than by a clean close.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtoError),
}

/// Most files QEMU may have in flight: one VFIO_DEVICE ADD carries two.
const MAX_PENDING_FILES: usize = 8;

/// The reading end of a connection: bytes, and the files that come with
/// them (`SCM_RIGHTS`), kept in arrival order until a message claims them.
/// The kernel hands files over with the first byte of the `sendmsg` that
/// carried them, so a message's files are here once its header is read.
pub(super) struct Inbound {
    pub(super) stream: UnixStream,
    pub(super) files: VecDeque<OwnedFd>,
}

impl Inbound {
    /// Fill `buf`. `Ok(false)`: the peer closed, even mid-message (§12).
    fn read_exact(&mut self, buf: &mut [u8]) -> Result<bool, ReadError> {
        let mut got = 0;
        while got < buf.len() {
            let rest = &mut buf[got..];
            let mut iov = [libc::iovec {
                iov_base: rest.as_mut_ptr().cast(),
                iov_len: rest.len(),
            }];
            let mut fds = [-1; MAX_PENDING_FILES];
            // SAFETY: the iovec covers `rest`, a live, exclusively borrowed
            // byte slice any data may be written to.
            let received = unsafe { self.stream.recv_with_fds(&mut iov, &mut fds) };
            let (n, nfds) = match received {
                Ok(r) => r,
                Err(e) if e.errno() == libc::EINTR => continue,
                Err(e) => return Err(io::Error::from_raw_os_error(e.errno()).into()),
            };
            for &fd in &fds[..nfds] {
                // SAFETY: recvmsg installed `fd` in this process for us;
                // nothing else knows of it.
                self.files.push_back(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            if self.files.len() > MAX_PENDING_FILES {
                return Err(ProtoError::StrayFiles(self.files.len()).into());
            }
            if n == 0 {
                return Ok(false);
            }
            got += n;
        }
        Ok(true)
    }
}

/// Wait until the front-end's process is known, and say whether it is
/// connection `id`'s peer (§6 rule 7). `false` too if the connection
/// closes meanwhile, or no front-end comes within [`FRONT_END_WAIT`].
fn front_end_is_peer(shared: &Shared, id: u64) -> bool {
    let t0 = Instant::now();
    let mut st = shared.lock();
    loop {
        let Some(c) = st.conn.as_ref().filter(|c| c.id == id && !c.closed) else {
            return false;
        };
        if let Some(front_end) = st.front_end {
            return c.peer == Some(front_end);
        }
        if st.front_end_unknown {
            return true;
        }
        let Some(left) = FRONT_END_WAIT.checked_sub(t0.elapsed()) else {
            return false;
        };
        st = shared
            .changed
            .wait_timeout(st, left)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// The full-state dump of connection `id` (§6 step 2), made once QEMU's
/// HELLO has been read; ordered with every later publish by the hooks'
/// lock.
fn dump(shared: &Shared, id: u64, hooks: &dyn MirrorHooks) {
    hooks.snapshot(&mut |records| {
        let mut st = shared.lock();
        if let Some(c) = st.conn.as_mut().filter(|c| c.id == id) {
            // An empty state still ends in a SYNC batch: the RESET record.
            if let Some(t) = enqueue(c, records, true) {
                c.dump_seq = t.seq;
            }
        }
    });
    shared.changed.notify_all();
}

/// Read connection `id`'s messages until QEMU closes it (`Ok`) or breaks
/// the protocol or a deadline (`Err`: the caller closes it).
pub(super) fn read_loop(
    inbound: Inbound,
    shared: &Shared,
    id: u64,
    offered: Hello,
    hooks: &dyn MirrorHooks,
) -> Result<(), ReadError> {
    let mut r = Reader {
        inbound,
        shared,
        id,
        offered,
        hooks,
        hello: false,
    };
    let mut payload = vec![0u8; proto::MAX_PAYLOAD_LEN];
    while let Some(msg) = r.next_message(&mut payload)? {
        if log::max_level() >= log::LevelFilter::Trace {
            log::trace!("mirror_recv connection={id} {msg:?}");
        }
        match (r.hello, msg) {
            (
                false,
                FromQemu::Hello {
                    instance,
                    msi_window,
                },
            ) => {
                if let Some(ours) = offered.msi_window {
                    msi_window.check(ours)?;
                }
                r.on_hello(instance)?
            }
            (true, FromQemu::Hello { .. }) => return Err(ProtoError::SecondHello.into()),
            (false, _) => return Err(ProtoError::NoHello.into()),
            (true, FromQemu::Ack(seq)) => {
                if !r.on_ack(seq)? {
                    return Ok(());
                }
            }
            (true, FromQemu::Fault(f)) => hooks.fault(f),
            (true, FromQemu::SystemReset(reset_id)) => r.on_system_reset(reset_id),
            (true, FromQemu::VfioDevice(d)) => r.on_vfio_device(d)?,
            (true, FromQemu::CompletionFd) => r.on_completion_fd()?,
        }
    }
    Ok(())
}

/// One connection's reading side, a message at a time.
struct Reader<'a> {
    inbound: Inbound,
    shared: &'a Shared,
    id: u64,
    offered: Hello,
    hooks: &'a dyn MirrorHooks,
    /// QEMU's HELLO has come.
    hello: bool,
}

impl Reader<'_> {
    /// The next message, its payload in `payload`; `None` once the peer
    /// closed. A read that times out is a missed deadline (§12): HELLO's,
    /// then the dump ACK's.
    fn next_message(&mut self, payload: &mut [u8]) -> Result<Option<FromQemu>, ReadError> {
        let mut h = [0u8; HEADER_LEN];
        match self.inbound.read_exact(&mut h) {
            Ok(true) => {}
            Ok(false) => return Ok(None),
            Err(ReadError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(match self.hello {
                    false => ProtoError::NoHelloInTime,
                    true => ProtoError::NoDumpAckInTime,
                }
                .into());
            }
            Err(e) => return Err(e),
        }
        let header = Header::decode(&h);
        let len = header.payload_len()?;
        if !self.inbound.read_exact(&mut payload[..len])? {
            return Ok(None);
        }
        let msg = proto::decode_from_qemu(&header, &payload[..len])?;
        // Files belong to a VFIO_DEVICE ADD or a COMPLETION_FD, nothing else.
        let carries_files =
            matches!(msg, FromQemu::VfioDevice(d) if d.add) || msg == FromQemu::CompletionFd;
        if !carries_files && !self.inbound.files.is_empty() {
            return Err(ProtoError::StrayFiles(self.inbound.files.len()).into());
        }
        Ok(Some(msg))
    }

    /// HELLO (§4): a HELLO that would reset a recovered state must come
    /// from the front-end's process (§6 rule 7); then the dump, whose ACK
    /// has a deadline too (§12).
    fn on_hello(&mut self, instance: u64) -> Result<(), ReadError> {
        self.hello = true;
        if self.hooks.hello_would_reset(instance) && !front_end_is_peer(self.shared, self.id) {
            return Err(ProtoError::NotTheFrontEnd.into());
        }
        let deadline = self
            .shared
            .lock()
            .dump_ack_deadline
            .unwrap_or(DUMP_ACK_DEADLINE);
        self.inbound.stream.set_read_timeout(Some(deadline))?;
        self.hooks.qemu_hello(instance);
        dump(self.shared, self.id, self.hooks);
        Ok(())
    }

    /// ACK `seq` (§7): batches are acknowledged in order, and only those
    /// sent. `false`: the connection is no longer the current one.
    fn on_ack(&mut self, seq: u64) -> Result<bool, ReadError> {
        let mut st = self.shared.lock();
        let Some(c) = st.conn.as_mut().filter(|c| c.id == self.id) else {
            return Ok(false);
        };
        if seq > c.next_seq {
            return Err(ProtoError::AckUnsent {
                got: seq,
                sent: c.next_seq,
            }
            .into());
        }
        if seq != c.acked + 1 {
            return Err(ProtoError::AckOutOfOrder {
                got: seq,
                expected: c.acked + 1,
            }
            .into());
        }
        c.acked = seq;
        if seq == c.dump_seq {
            self.inbound.stream.set_read_timeout(None)?;
        }
        if c.synced() {
            // From now on this QEMU holds a copy it would keep, frozen, if
            // the link closed (§6 rule 4).
            st.expect_peer = true;
        }
        drop(st);
        self.shared.changed.notify_all();
        Ok(true)
    }

    /// SYSTEM_RESET (§9): the device's answer goes out as one SYNC batch.
    fn on_system_reset(&mut self, reset_id: u32) {
        let (shared, id) = (self.shared, self.id);
        self.hooks.system_reset(reset_id, &mut |records| {
            let mut st = shared.lock();
            if let Some(c) = st.conn.as_mut().filter(|c| c.id == id) {
                enqueue(c, records, true);
            }
        });
        shared.changed.notify_all();
    }

    /// VFIO_DEVICE (§14): an ADD carries QEMU's iommufd and the device's
    /// file; a device the daemon cannot take stays blocked.
    fn on_vfio_device(&mut self, d: proto::VfioDeviceMsg) -> Result<(), ReadError> {
        if !self.offered.vfio_devices {
            return Err(ProtoError::VfioNotOffered.into());
        }
        if !d.add {
            self.hooks.vfio_device_removed(d.endpoint);
            return Ok(());
        }
        let files = &mut self.inbound.files;
        let (Some(iommufd), Some(device)) = (files.pop_front(), files.pop_front()) else {
            return Err(ProtoError::MissingFiles.into());
        };
        match self
            .hooks
            .vfio_device_added(d.endpoint, d.devid, iommufd, device)
        {
            Ok(()) => log::info!(
                "mirror: endpoint {:#x}: QEMU's VFIO device (iommufd device {}) is ours",
                d.endpoint,
                d.devid
            ),
            Err(e) => log::error!(
                "mirror: endpoint {:#x}: cannot take QEMU's VFIO device: {e}; \
                 its DMA stays blocked",
                d.endpoint
            ),
        }
        Ok(())
    }

    /// COMPLETION_FD (§15): the pipe and kick page vCPUs sleep on.
    fn on_completion_fd(&mut self) -> Result<(), ReadError> {
        if !self.offered.completion_fd {
            return Err(ProtoError::CompletionFdNotOffered.into());
        }
        let files = &mut self.inbound.files;
        let (Some(pipe), Some(page)) = (files.pop_front(), files.pop_front()) else {
            return Err(ProtoError::MissingCompletionFile.into());
        };
        let id = self.id;
        match self.shared.completion.install(pipe, page) {
            Ok(()) => {
                log::info!("mirror: connection {id}: QEMU's vCPUs wait for their requests (§15)")
            }
            Err(e) => {
                log::warn!("mirror: connection {id}: {e}; QEMU's vCPUs spin on their requests")
            }
        }
        Ok(())
    }
}
