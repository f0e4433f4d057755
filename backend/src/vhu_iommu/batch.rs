// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One batch of the request queue, in three steps: carried out under one
//! device lock ([`IommuBackend::carry_out`]), then QEMU waited for when it
//! must act ([`IommuBackend::wait_for_qemu`], docs/mirror-protocol.md §7–§8),
//! then completed into the used ring with one index store and, if a vCPU
//! sleeps on its kick, one write to QEMU's completion pipe
//! ([`IommuBackend::complete`], §15).

use std::io;
use std::sync::atomic::Ordering;
use std::time::Instant;

use vhost_user_backend::VringT;
use vm_memory::GuestAddressSpace;

use super::{IommuBackend, QueueStats, Vring, ACK_TIMEOUT, MAX_REPLY, MAX_REQUEST};
use crate::chain::{self, Descs};
use crate::control::Telemetry;
use crate::guest_ram::{GuestMem, GuestRamView};
use crate::mirror::{Ticket, WaitOutcome};
use crate::session::Requests;
use crate::vring::{complete_chains, Avail};

/// A batch carried out: the completions (head, bytes written), the ticket
/// of the mirror batch QEMU must acknowledge first, if any, and whether
/// table readers' sections must end first (docs/mirror-protocol.md §16.3).
type CarriedOut = (Vec<(u16, u32)>, Option<Ticket>, bool);

/// The buffers each chain's request is read into and its reply written
/// from: the worker's own, reused (4.3 KiB: zeroing them per batch was half
/// of a strict MAP's instructions). Only the reply room a chain offers is
/// cleared, per chain, so no byte of an earlier reply reaches the guest.
pub(super) struct Buffers {
    req: [u8; MAX_REQUEST],
    reply: [u8; MAX_REPLY],
}

impl Buffers {
    pub(super) fn new() -> Self {
        Self {
            req: [0; MAX_REQUEST],
            reply: [0; MAX_REPLY],
        }
    }
}

/// One chain served: the bytes written to it, and the lengths of its
/// request and reply in the [`Buffers`] (0 for a chain that could not be
/// read). Eight bytes: returned in a register.
#[derive(Clone, Copy)]
struct Served {
    used: u32,
    request: u16,
    reply: u16,
}

/// One request chain: read (every guest-supplied buffer checked once, all
/// of them: a descriptor outside guest memory, or out of order, and the
/// chain is completed with nothing written), carried out, replied to.
fn serve_chain(
    requests: &mut Requests<'_, '_>,
    pos: u16,
    chain: Descs<'_>,
    mem: &GuestMem,
    ram: &GuestRamView<'_>,
    bufs: &mut Buffers,
    stats: &mut QueueStats,
) -> Served {
    let Ok(layout) = chain::read_request(chain.clone(), mem, &mut bufs.req) else {
        stats.bad_chains += 1;
        return Served {
            used: 0,
            request: 0,
            reply: 0,
        };
    };
    let room = usize::try_from(layout.writable).map_or(MAX_REPLY, |w| w.min(MAX_REPLY));
    let reply = &mut bufs.reply[..room];
    reply.fill(0);
    let written = requests.request(pos, &bufs.req[..layout.request_len], reply, ram);
    // QEMU's trace events: one relaxed load while trace level is off.
    if virtio_iommu::trace::on() {
        virtio_iommu::trace::request(&bufs.req[..layout.request_len], &reply[..written]);
    }
    let used = match chain::write_reply(chain, mem, &reply[..written]) {
        Ok(n) => n as u32,
        Err(_) => {
            stats.bad_chains += 1;
            0
        }
    };
    // Both fit: the request is at most MAX_REQUEST bytes, the reply
    // MAX_REPLY.
    Served {
        used,
        request: layout.request_len as u16,
        reply: written as u16,
    }
}

/// What a control socket keeps of one request served: its event for the
/// subscribers, its service time since `since` (returned: the next
/// request's start). Out of the loop's way: only called with a control
/// socket.
#[inline(never)]
fn observe(telemetry: &Telemetry, bufs: &Buffers, served: Served, since: Instant) -> Instant {
    let (req, reply) = (
        &bufs.req[..served.request as usize],
        &bufs.reply[..served.reply as usize],
    );
    telemetry.request_event(req, reply);
    telemetry.request_done(req.first().copied().unwrap_or(0), since)
}

impl IommuBackend {
    /// One batch: every request the driver has made available, carried
    /// out under one device lock; then one mirror wait, and the batch's
    /// completions go into the used ring together (one index update, one
    /// notification decision: [`complete_chains`]).
    ///
    /// With `rearm`, the driver's notifications are enabled again (EVENT_IDX
    /// `avail_event` moved past the batch, or `VRING_USED_F_NO_NOTIFY`
    /// cleared; virtio 1.2 §2.7.10) before the used index moves. Linux's
    /// driver queues its next request as soon as it sees the last one
    /// used, and notifies only if the device asked for it: enabled after
    /// the used index instead, a request queued in between is announced to
    /// nobody, and its vCPU spins until the worker next runs. A worker
    /// that shares the vCPU's CPU (a vCPU asleep on its kick, woken by the
    /// completion pipe, takes the CPU back at once) runs again only when
    /// the scheduler takes the CPU from that spinning vCPU: measured as the
    /// guest's `virtqueue_get_buf` loop taking a fifth of its vCPU's time
    /// with two busy guests on two CPUs.
    pub(super) fn process_batch(&self, vring: &Vring, polled: bool, rearm: bool) -> io::Result<()> {
        let since = self.telemetry.clock();
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let done = match self.carry_out(vring, polled) {
            Some((completed, ticket, grace)) => {
                if rearm && !completed.is_empty() {
                    // Whether more came meanwhile, or the ring is bad, is
                    // the caller's next look (`serve_and_poll`).
                    let _ = vring.enable_notification();
                }
                if grace {
                    self.wait_for_readers();
                }
                let acked = self.wait_for_qemu(ticket, !completed.is_empty());
                self.complete(vring, completed, acked)
            }
            None => Ok(()),
        };
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        if let Some(t) = since {
            self.telemetry.batch_done(t);
        }
        done
    }

    /// Carry out every available request under one device lock. `None`
    /// without guest memory.
    fn carry_out(&self, vring: &Vring, polled: bool) -> Option<CarriedOut> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let mem = st.mem.as_ref().map(|m| m.memory())?;
        st.stats.batches += 1;
        st.stats.polled_batches += u64::from(polled);
        let ram = GuestRamView::new(&mem);
        st.completed.clear();
        let super::State {
            session,
            completed,
            stats,
            bufs,
            ..
        } = st;
        let mut avail = Avail::new(vring, &mem);
        // Without a control socket: one test of a local per request, no
        // clock read, no event (src/control/).
        let telemetry = &*self.telemetry;
        let mut since = telemetry.clock();
        let ((), ticket) = session.requests(&self.mirror, |requests| {
            while let Some((pos, head, chain)) = avail.next_chain() {
                let served = serve_chain(requests, pos, chain, &mem, &ram, bufs, stats);
                if let Some(t) = since {
                    since = Some(observe(telemetry, bufs, served, t));
                }
                completed.push((head, served.used));
            }
        });
        stats.requests += completed.len() as u64;
        stats.acked_batches += u64::from(ticket.is_some());
        let grace = session.take_grace();
        Some((std::mem::take(completed), ticket, grace))
    }

    /// The batch removed translations while back-ends read the table: wait
    /// until no reader section that may have seen them is open, at most
    /// the readers' bound (late readers are revoked), holding no lock
    /// (docs/mirror-protocol.md §16.3).
    fn wait_for_readers(&self) {
        if let Some(m) = self.mirror.memory() {
            m.readers.synchronize();
        }
    }

    /// Wait for QEMU's ACK of `ticket`, holding neither the device lock nor
    /// a vring lock (docs/mirror-protocol.md §8 rules 1-2; stop_vring
    /// releases us). Returns whether QEMU acknowledged it.
    fn wait_for_qemu(&self, ticket: Option<Ticket>, any_completed: bool) -> bool {
        let outcome = ticket.map(|t| self.mirror.wait(t, ACK_TIMEOUT));
        if outcome == Some(WaitOutcome::TimedOut) {
            log::error!("mirror: no ACK in {ACK_TIMEOUT:?}: link closed, requests wait for QEMU");
        }
        let acked = outcome == Some(WaitOutcome::Acked);
        if !acked && outcome != Some(WaitOutcome::Released) && any_completed {
            // No QEMU has these changes: one whose link closed (or whose
            // daemon was restarted) translates with its frozen copy until it
            // connects again, so nothing completes before a QEMU has the
            // current state (docs/mirror-protocol.md §6 rule 4). A batch
            // that found no request has nothing to complete and holds the
            // worker for nothing.
            self.mirror.wait_synced();
        }
        acked
    }

    /// Put `completed` in the used ring, tell a vCPU asleep on its kick,
    /// and notify the driver if it asks.
    fn complete(&self, vring: &Vring, completed: Vec<(u16, u32)>, acked: bool) -> io::Result<()> {
        let notify = {
            let mut st = self.lock();
            // Through the memory table as it is now, as virtio-queue's
            // add_used did: a new one may have come meanwhile; none if the
            // front-end has gone, its rings with it.
            let notify = match st.mem.as_ref().map(|m| m.memory()) {
                Some(mem) if !completed.is_empty() => {
                    let notify = complete_chains(vring, &mem, &completed);
                    #[cfg(test)]
                    probe::used_published();
                    // The kicking vCPU sleeps in QEMU until the used index
                    // moves (docs/mirror-protocol.md §15).
                    if self.mirror.signal_completions() {
                        st.stats.completion_signals += 1;
                    }
                    notify
                }
                _ => Ok(false),
            };
            // Hand the buffer back for the next batch.
            st.completed = completed;
            if acked {
                st.session.acked();
            }
            notify?
        };
        if notify {
            vring.signal_used_queue()?;
            self.lock().stats.used_signals += 1;
        }
        Ok(())
    }
}

/// What the tests see at the instant a batch's used index is published
/// (src/vhu_iommu/tests.rs): the order of the worker's stores to the rings
/// is invisible once `handle_event` has returned.
#[cfg(test)]
pub(super) mod probe {
    use std::cell::RefCell;

    thread_local! {
        static AFTER_USED: RefCell<Option<Box<dyn FnMut()>>> = RefCell::new(None);
    }

    /// Run `f` on this thread right after each used-index store.
    pub(in crate::vhu_iommu) fn after_used(f: impl FnMut() + 'static) {
        AFTER_USED.with(|a| *a.borrow_mut() = Some(Box::new(f)));
    }

    pub(super) fn used_published() {
        AFTER_USED.with(|a| {
            if let Some(f) = a.borrow_mut().as_mut() {
                f();
            }
        });
    }
}
