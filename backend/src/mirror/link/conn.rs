// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One connection's bookkeeping: its outgoing batches, whether its peer is
//! still there, and closing it (§6–§8, §12).

use super::*;

/// The connection changes are published to: one whose dump is on its way.
/// Before that (QEMU's HELLO not read yet) a change goes nowhere: the dump,
/// made later under the same lock as the change, has it — and a batch
/// flagged SYNC ahead of the dump would tell QEMU a copy is whole that is
/// not (§6 step 2).
pub(super) fn dumped(st: &mut Link) -> Option<&mut Conn> {
    st.conn.as_mut().filter(|c| c.dump_seq > 0)
}

pub(super) fn enqueue(conn: &mut Conn, records: &[Record], sync_last: bool) -> Option<Ticket> {
    if conn.closed {
        return None;
    }
    let mut chunks = records.chunks(MAX_RECORDS).peekable();
    if chunks.peek().is_none() {
        // A SYNC batch is sent even with no records: it still ends a dump.
        if sync_last {
            conn.next_seq += 1;
            proto::encode_events(conn.next_seq, true, &[], &mut conn.out);
        }
    }
    while let Some(chunk) = chunks.next() {
        conn.next_seq += 1;
        let sync = sync_last && chunks.peek().is_none();
        proto::encode_events(conn.next_seq, sync, chunk, &mut conn.out);
        if log::max_level() >= log::LevelFilter::Trace {
            trace_records(conn.id, conn.next_seq, sync, chunk);
        }
    }
    Some(Ticket {
        conn: conn.id,
        seq: conn.next_seq,
    })
}

/// One trace line per record sent to QEMU (and one per batch), as QEMU's
/// trace events: only called with trace level on, nothing formatted
/// otherwise.
#[cold]
#[inline(never)]
fn trace_records(conn: u64, seq: u64, sync: bool, records: &[Record]) {
    log::trace!(
        "mirror_events connection={conn} seq={seq} records={} sync={sync}",
        records.len()
    );
    for r in records {
        match *r {
            Record::Attach {
                endpoint,
                domain,
                bypass,
                root,
            } => log::trace!(
                "mirror_record seq={seq} attach endpoint={endpoint:#x} domain={domain} \
                 bypass={bypass} root={root}"
            ),
            Record::Detach { endpoint, domain } => {
                log::trace!("mirror_record seq={seq} detach endpoint={endpoint:#x} domain={domain}")
            }
            Record::Map(m) => log::trace!(
                "mirror_record seq={seq} map domain={} virt_start={:#x} virt_end={:#x} \
                 phys_start={:#x} flags={:#x}",
                m.domain,
                m.virt_start,
                m.virt_end,
                m.phys_start,
                m.flags
            ),
            Record::Unmap(u) => log::trace!(
                "mirror_record seq={seq} unmap domain={} virt_start={:#x} virt_end={:#x}",
                u.domain,
                u.virt_start,
                u.virt_end
            ),
            Record::GlobalBypass(on) => {
                log::trace!("mirror_record seq={seq} global_bypass on={on}")
            }
            Record::Reset { system, reset_id } => {
                log::trace!("mirror_record seq={seq} reset system={system} reset_id={reset_id}")
            }
        }
    }
}

/// Whether the peer of `conn` has closed its end (or the socket failed),
/// without reading from it.
fn peer_gone(conn: &Conn) -> bool {
    let Some(stream) = conn.stream.as_ref() else {
        return true;
    };
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, a zero timeout; the fd is open while `conn`
    // holds the stream.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// Close the connection if its peer has hung up (its reader may not have
/// seen the EOF yet): it is no longer connected.
pub(super) fn close_if_hung_up(st: &mut Link, gate: &AtomicBool) {
    if let Some(c) = st.conn.as_mut().filter(|c| !c.closed && peer_gone(c)) {
        let id = c.id;
        close(c, gate);
        st.hung_up = Some(id);
    }
}

pub(super) fn close(conn: &mut Conn, gate: &AtomicBool) {
    gate.store(true, Ordering::Release);
    conn.closed = true;
    if let Some(s) = conn.stream.take() {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
}
