// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Batches of a notification, and the polling window after each
//! (src/poll.rs decides how long; this is the loop and the look at the
//! ring).

use std::io;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend, VolatileMemory};

use super::{IommuBackend, Vring};
use crate::guest_ram::GuestMem;
use crate::poll::{GapWatch, Window, CLEAN_WINDOW};

/// Spins of the polling loop between two readings of the clock.
const POLL_SPINS_PER_CLOCK: u32 = 64;

/// What a polling window ended on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Looked {
    /// The driver made a request available.
    Request,
    /// The window passed.
    Expired,
    /// The worker was off its CPU between two looks: the host has none to
    /// spare, and the worker sleeps instead.
    Contended,
}

/// The polling of one notification's batches.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Polled {
    /// Time spent polling.
    pub(super) time: Duration,
    /// A window found the worker had been off its CPU.
    pub(super) contended: bool,
    /// A window of [`CLEAN_WINDOW`] ran to its end without a gap.
    pub(super) spare: bool,
}

impl IommuBackend {
    /// Batches until the ring is empty with notifications enabled, polling
    /// for up to `window` after each (src/poll.rs).
    pub(super) fn serve_and_poll(
        &self,
        vring: &Vring,
        mem: &GuestMem,
        window: Window,
    ) -> io::Result<Polled> {
        let mut out = Polled::default();
        let mut polled = false;
        // The ring said more requests are there (polling saw its index move,
        // or re-enabling notifications found some).
        let mut told_more = false;
        loop {
            vring.disable_notification().map_err(io::Error::other)?;
            let before = Self::next_avail(vring);
            // No window after this batch: the driver's next request must
            // notify, so notifications are re-enabled before the driver
            // can see this batch's completions (`process_batch`).
            let rearm = window.length.is_zero() || out.contended;
            self.process_batch(vring, polled, rearm)?;
            if told_more && Self::next_avail(vring) == before {
                // Work announced that no chain could be taken from: the
                // front-end is gone (its memory with it), or its available
                // index is bogus. Sleep until the next kick rather than spin
                // on it — a spinning worker never sees its exit event, and
                // the next front-end would wait for ever.
                let _ = vring.enable_notification();
                break;
            }
            polled = false;
            if !window.length.is_zero() && !out.contended {
                let t0 = Instant::now();
                let looked = Self::poll_ring(vring, mem, t0, window);
                out.time += t0.elapsed();
                match looked {
                    Looked::Request => {
                        polled = true;
                        told_more = true;
                        continue;
                    }
                    Looked::Contended => out.contended = true,
                    Looked::Expired => out.spare |= window.length >= CLEAN_WINDOW,
                }
            }
            if !vring.enable_notification().map_err(io::Error::other)? {
                break;
            }
            told_more = true;
        }
        Ok(out)
    }

    /// The ring's next available position, as the queue knows it.
    pub(super) fn next_avail(vring: &Vring) -> u16 {
        vring.get_ref().get_queue().next_avail()
    }

    /// Spin until the driver makes a request available or the window
    /// passes ([`Looked::Request`], [`Looked::Expired`]), or the worker
    /// finds it was off its CPU ([`Looked::Contended`], src/poll.rs). The
    /// available index is found once and then read directly (the guard on
    /// `mem` keeps the mapping alive even if a new memory table arrives
    /// meanwhile). Every few spins the clock is read and the CPU offered to
    /// any other runnable thread (`sched_yield`): the core never idles — on
    /// a virtual machine a halted vCPU wakes slowly, tens to hundreds of
    /// microseconds — yet QEMU's threads sharing it still run (measured
    /// under TCG on 2 cores: the yield lifted the guest's 128 KiB reads by
    /// 40 %); only with a CPU to spare: on a busy host a yield gives the
    /// CPU away for a whole slice.
    pub(super) fn poll_ring(
        vring: &Vring,
        mem: &GuestMem,
        start: Instant,
        window: Window,
    ) -> Looked {
        let (avail_idx_at, next_avail) = {
            let state = vring.get_ref();
            let q = state.get_queue();
            (q.avail_ring().wrapping_add(2), q.next_avail())
        };
        let Ok(slice) = mem.get_slice(GuestAddress(avail_idx_at), 2) else {
            return Looked::Expired;
        };
        let Ok(idx) = slice.get_atomic_ref::<AtomicU16>(0) else {
            return Looked::Expired;
        };
        let deadline = start + window.length;
        let mut gaps = GapWatch::start(start);
        loop {
            for _ in 0..POLL_SPINS_PER_CLOCK {
                if u16::from_le(idx.load(Ordering::Acquire)) != next_avail {
                    return Looked::Request;
                }
                std::hint::spin_loop();
            }
            let now = Instant::now();
            if gaps.look(now) {
                return Looked::Contended;
            }
            if now >= deadline {
                return Looked::Expired;
            }
            if window.yields() {
                std::thread::yield_now();
            }
        }
    }
}
