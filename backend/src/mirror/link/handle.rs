// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The publishing side of the mirror: what the request path calls to queue
//! records to QEMU, wait for its ACK and learn what it holds (§6–§8, §15).

use super::*;

impl MirrorHandle {
    /// A handle with no mirror behind it: publishing is a no-op.
    pub fn disconnected() -> Self {
        Self::default()
    }

    /// Queue `records` to QEMU, in batches of at most [`MAX_RECORDS`].
    /// Returns the ticket of the last batch, or `None` when no QEMU is
    /// connected (then there is nothing to wait for, §7).
    pub fn publish(&self, records: &[Record]) -> Option<Ticket> {
        if records.is_empty() {
            return None;
        }
        let mut st = self.shared.lock();
        let ticket = enqueue(dumped(&mut st)?, records, false);
        drop(st);
        self.shared.changed.notify_all();
        ticket
    }

    /// [`Self::publish`], the last batch flagged SYNC: QEMU's copy is
    /// complete with it (§4) — after a migration load, QEMU waits for that
    /// before the devices loaded after the vIOMMU translate through it.
    pub fn publish_sync(&self, records: &[Record]) -> Option<Ticket> {
        let mut st = self.shared.lock();
        let ticket = enqueue(dumped(&mut st)?, records, true);
        drop(st);
        self.shared.changed.notify_all();
        ticket
    }

    /// Wait until the batch of `ticket` is acknowledged, the connection
    /// closes, waiters are released, or `timeout` passes (then the
    /// connection is closed: QEMU reconnects and gets the whole state again,
    /// and the requests wait for that, §6 rule 4).
    pub fn wait(&self, ticket: Ticket, timeout: Duration) -> WaitOutcome {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        let epoch = st.release_epoch;
        loop {
            match st.conn.as_ref() {
                Some(c) if c.id == ticket.conn && !c.closed => {
                    if c.acked >= ticket.seq {
                        return WaitOutcome::Acked;
                    }
                }
                _ => return WaitOutcome::Disconnected,
            }
            if st.release_epoch != epoch || st.stop {
                return WaitOutcome::Released;
            }
            let now = Instant::now();
            if now >= deadline {
                log::error!(
                    "mirror: no ACK for batch {} in {timeout:?}; closing the mirror connection",
                    ticket.seq
                );
                if let Some(c) = st.conn.as_mut() {
                    close(c, &self.shared.gate);
                }
                drop(st);
                self.shared.changed.notify_all();
                return WaitOutcome::TimedOut;
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Whether a QEMU may be holding a copy of the state that it keeps,
    /// frozen, while it has no connection (§6 rule 4, QEMU keeps only a
    /// synced copy): set when a connection acknowledges its dump, and by a
    /// daemon that recovered its state file under a running QEMU; cleared
    /// when the front-end leaves (its QEMU is gone). A new front-end
    /// expects one only if a synced QEMU is connected now.
    pub fn expect_peer(&self, expect: bool) {
        let mut st = self.shared.lock();
        st.expect_peer = expect;
        self.shared.gate.store(true, Ordering::Release);
        drop(st);
        self.shared.changed.notify_all();
    }

    /// A new front-end came: a copy held from before belongs to a QEMU that
    /// is gone, unless the QEMU connected now is synced (then it is this
    /// front-end's, connected first).
    pub fn new_front_end(&self) {
        let mut st = self.shared.lock();
        // A peer that has hung up (its reader may not have seen the EOF
        // yet) is not connected.
        close_if_hung_up(&mut st, &self.shared.gate);
        st.expect_peer = st.conn.as_ref().is_some_and(Conn::synced);
        self.shared.gate.store(true, Ordering::Release);
    }

    /// Before requests complete: if a QEMU may be translating with a frozen
    /// copy and no connection has the current state, wait until a QEMU
    /// connects and acknowledges its dump (§6 rule 4: a request completed
    /// meanwhile — an UNMAP, a DETACH — would leave QEMU's copy stale). Ends
    /// at once without a mirror or a QEMU to wait for; with
    /// [`WaitOutcome::Released`] when the vring stops.
    pub fn wait_synced(&self) -> WaitOutcome {
        // The request path: one load, no lock, while QEMU is synced.
        if self.memory.is_none() || !self.shared.gate.load(Ordering::Acquire) {
            return WaitOutcome::Acked;
        }
        let mut st = self.shared.lock();
        let epoch = st.release_epoch;
        let mut waited = Duration::ZERO;
        loop {
            if !st.expect_peer || st.conn.as_ref().is_some_and(Conn::synced) {
                self.shared.gate.store(false, Ordering::Release);
                return WaitOutcome::Acked;
            }
            if st.release_epoch != epoch || st.stop {
                return WaitOutcome::Released;
            }
            if waited == Duration::from_secs(10) {
                log::warn!(
                    "mirror: requests wait for QEMU's mirror to reconnect (its copy of the \
                     state is frozen until then)"
                );
            }
            let step = Duration::from_secs(1);
            st = self
                .shared
                .changed
                .wait_timeout(st, step)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            waited += step;
        }
    }

    /// End every current wait with [`WaitOutcome::Released`] (§8 rule 2: at
    /// `GET_VRING_BASE` parked requests complete without their ACK).
    pub fn release_waiters(&self) {
        self.shared.lock().release_epoch += 1;
        self.shared.changed.notify_all();
    }

    /// The memory shared with QEMU (none for a handle without a mirror).
    pub fn memory(&self) -> Option<&Arc<MirrorMemory>> {
        self.memory.as_ref()
    }

    /// The notifier flags QEMU writes (§11), if there is a mirror.
    pub fn notifier_flags(&self) -> Option<&[AtomicU8]> {
        self.memory.as_ref().map(|m| m.flags.as_u8s())
    }

    /// Tell the connected QEMU that the request queue's used ring moved
    /// (§15), if a vCPU sleeps on its kick. Lock-free; `true` if told.
    pub fn signal_completions(&self) -> bool {
        self.shared.completion.signal()
    }

    /// Whether QEMU's vCPUs sleep on their kicks of the request queue (a
    /// QEMU gave its completion files, §15).
    pub fn vcpus_sleep(&self) -> bool {
        self.shared.completion.armed()
    }

    /// The CPU QEMU's vCPU last kicked the request queue from (§15).
    pub fn vcpu_cpu(&self) -> Option<usize> {
        self.shared.completion.vcpu_cpu()
    }

    /// The vhost-user front-end's process (`None`: none is connected).
    /// Only that process's mirror connection is served (§6 rule 7): one
    /// from another process is closed, now or when it connects.
    pub fn set_front_end(&self, pid: Option<u32>) {
        let mut st = self.shared.lock();
        st.front_end = pid;
        st.front_end_unknown = false;
        if let (Some(pid), Some(c)) = (pid, st.conn.as_mut()) {
            if !c.closed && c.peer != Some(pid) {
                log::warn!(
                    "mirror: connection {} is from process {}, not the front-end's QEMU \
                     (process {pid}): closing it",
                    c.id,
                    c.peer.map_or("?".into(), |p| p.to_string())
                );
                close(c, &self.shared.gate);
            }
        }
        drop(st);
        self.shared.changed.notify_all();
    }

    /// A front-end is connected whose process could not be found: any
    /// process is served (logged by the caller).
    pub fn set_front_end_unknown(&self) {
        let mut st = self.shared.lock();
        st.front_end = None;
        st.front_end_unknown = true;
        drop(st);
        self.shared.changed.notify_all();
    }

    /// How long new connections have to send their HELLO (tests; default
    /// `HELLO_DEADLINE`).
    pub fn set_hello_deadline(&self, deadline: Duration) {
        self.shared.lock().hello_deadline = Some(deadline);
    }

    /// How long QEMU has to acknowledge its dump (tests; default
    /// `DUMP_ACK_DEADLINE`).
    pub fn set_dump_ack_deadline(&self, deadline: Duration) {
        self.shared.lock().dump_ack_deadline = Some(deadline);
    }

    /// How long writes to new connections may wait for the peer to read
    /// (tests; default `WRITE_DEADLINE`).
    pub fn set_write_deadline(&self, deadline: Duration) {
        self.shared.lock().write_deadline = Some(deadline);
    }

    /// Whether a QEMU is connected.
    pub fn is_connected(&self) -> bool {
        self.shared.lock().conn.as_ref().is_some_and(|c| !c.closed)
    }

    /// Whether a QEMU is connected, its process, and whether it has
    /// acknowledged its dump (its copy is the daemon's state).
    pub fn peer(&self) -> (bool, Option<u32>, bool) {
        let st = self.shared.lock();
        match st.conn.as_ref().filter(|c| !c.closed) {
            Some(c) => (true, c.peer, c.synced()),
            None => (false, None, false),
        }
    }

    /// Whether no QEMU is connected and none ever was: then no QEMU can be
    /// holding a frozen copy of the state (§6 rule 4) whose walks could
    /// reach table pages of destroyed domains.
    pub fn never_connected(&self) -> bool {
        self.shared.lock().next_conn_id == 0
    }
}
