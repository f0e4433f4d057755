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

pub(super) fn read_loop(
    mut inbound: Inbound,
    shared: &Shared,
    id: u64,
    offered: Hello,
    hooks: &dyn MirrorHooks,
) -> Result<(), ReadError> {
    let mut hello = false;
    let mut payload = vec![0u8; proto::MAX_PAYLOAD_LEN];
    loop {
        let mut h = [0u8; HEADER_LEN];
        match inbound.read_exact(&mut h) {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(ReadError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(match hello {
                    false => ProtoError::NoHelloInTime,
                    true => ProtoError::NoDumpAckInTime,
                }
                .into());
            }
            Err(e) => return Err(e),
        }
        let header = Header::decode(&h);
        let len = header.payload_len()?;
        if !inbound.read_exact(&mut payload[..len])? {
            return Ok(());
        }
        let msg = proto::decode_from_qemu(&header, &payload[..len])?;
        // Files belong to a VFIO_DEVICE ADD or a COMPLETION_FD, nothing else.
        let carries_files =
            matches!(msg, FromQemu::VfioDevice(d) if d.add) || msg == FromQemu::CompletionFd;
        if !carries_files && !inbound.files.is_empty() {
            return Err(ProtoError::StrayFiles(inbound.files.len()).into());
        }
        match (hello, msg) {
            (false, FromQemu::Hello { instance }) => {
                hello = true;
                if hooks.hello_would_reset(instance) && !front_end_is_peer(shared, id) {
                    return Err(ProtoError::NotTheFrontEnd.into());
                }
                // The dump's ACK has its deadline too (§12).
                let deadline = shared.lock().dump_ack_deadline.unwrap_or(DUMP_ACK_DEADLINE);
                inbound.stream.set_read_timeout(Some(deadline))?;
                hooks.qemu_hello(instance);
                dump(shared, id, hooks);
            }
            (true, FromQemu::Hello { .. }) => return Err(ProtoError::SecondHello.into()),
            (false, _) => return Err(ProtoError::NoHello.into()),
            (true, FromQemu::Ack(seq)) => {
                let mut st = shared.lock();
                let Some(c) = st.conn.as_mut().filter(|c| c.id == id) else {
                    return Ok(());
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
                    inbound.stream.set_read_timeout(None)?;
                }
                if c.synced() {
                    // From now on this QEMU holds a copy it would keep,
                    // frozen, if the link closed (§6 rule 4).
                    st.expect_peer = true;
                }
                drop(st);
                shared.changed.notify_all();
            }
            (true, FromQemu::Fault(f)) => hooks.fault(f),
            (true, FromQemu::SystemReset(reset_id)) => {
                hooks.system_reset(reset_id, &mut |records| {
                    let mut st = shared.lock();
                    if let Some(c) = st.conn.as_mut().filter(|c| c.id == id) {
                        enqueue(c, records, true);
                    }
                });
                shared.changed.notify_all();
            }
            (true, FromQemu::VfioDevice(_)) if !offered.vfio_devices => {
                return Err(ProtoError::VfioNotOffered.into());
            }
            (true, FromQemu::VfioDevice(d)) if d.add => {
                let (Some(iommufd), Some(device)) =
                    (inbound.files.pop_front(), inbound.files.pop_front())
                else {
                    return Err(ProtoError::MissingFiles.into());
                };
                match hooks.vfio_device_added(d.endpoint, d.devid, iommufd, device) {
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
            }
            (true, FromQemu::VfioDevice(d)) => hooks.vfio_device_removed(d.endpoint),
            (true, FromQemu::CompletionFd) if !offered.completion_fd => {
                return Err(ProtoError::CompletionFdNotOffered.into());
            }
            (true, FromQemu::CompletionFd) => {
                let (Some(pipe), Some(page)) =
                    (inbound.files.pop_front(), inbound.files.pop_front())
                else {
                    return Err(ProtoError::MissingCompletionFile.into());
                };
                match shared.completion.install(pipe, page) {
                    Ok(()) => log::info!(
                        "mirror: connection {id}: QEMU's vCPUs wait for their requests (§15)"
                    ),
                    Err(e) => log::warn!(
                        "mirror: connection {id}: {e}; QEMU's vCPUs spin on their requests"
                    ),
                }
            }
        }
    }
}
