// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The vring worker thread's own state: where it runs (beside a vCPU
//! asleep on its kick, src/placement.rs), its scheduler slice
//! (src/sched.rs), and its meter of the host's spare CPU (src/spare.rs,
//! whose figure includes the thread's own CPU time).

use std::time::{Duration, Instant};

use super::IommuBackend;
use crate::placement::Placement;
use crate::spare::{SpareCpu, SPARE_MIN};

/// How often the busy regime looks whether the host has a CPU to spare.
pub(super) const SPARE_LOOK_BUSY: Duration = Duration::from_millis(20);

/// What the vring worker thread keeps of its own: where it runs, and the
/// meter of the host's spare CPU (its own CPU time is part of it).
#[derive(Debug)]
struct WorkerThread {
    /// `None` once placing failed (then the worker stays where it is).
    placement: Option<Placement>,
    spare: Option<SpareCpu>,
    spare_looked: Option<Instant>,
}

impl WorkerThread {
    fn new() -> Self {
        let placement = Placement::current().ok();
        let cpus = placement
            .as_ref()
            .map(Placement::home_cpus)
            .unwrap_or_default();
        Self {
            placement,
            spare: SpareCpu::open(&cpus).ok(),
            spare_looked: None,
        }
    }
}

thread_local! {
    static WORKER: std::cell::RefCell<WorkerThread> = std::cell::RefCell::new(WorkerThread::new());
}

impl IommuBackend {
    /// Put the worker beside the vCPU that kicked (`beside`), or give it
    /// all its CPUs again (src/placement.rs). A failure is logged once per
    /// thread and the worker stays where it is.
    pub(super) fn place_worker(&self, beside: bool) {
        WORKER.with(|w| {
            let mut w = w.borrow_mut();
            let Some(p) = w.placement.as_mut() else {
                return;
            };
            let outcome = match beside {
                true => p.follow(self.mirror.vcpu_cpu()),
                false => p.release(),
            };
            if let Err(e) = outcome {
                w.placement = None;
                log::warn!("vring worker: cannot place it beside the vCPU: {e}");
            }
        });
    }

    /// Whether the host has a CPU to spare, measured (src/spare.rs) if the
    /// last measure is at least `every` old; `None` when unknown.
    pub(super) fn cpu_to_spare(now: Instant, every: Duration) -> Option<bool> {
        WORKER.with(|w| {
            let mut w = w.borrow_mut();
            if w.spare_looked
                .is_some_and(|t| now.saturating_duration_since(t) < every)
            {
                return None;
            }
            w.spare_looked = Some(now);
            let spare = w.spare.as_mut()?.look(now)?;
            Some(spare >= SPARE_MIN)
        })
    }

    /// Whether this thread can measure the host's spare CPU (src/spare.rs
    /// found counters to read).
    pub(super) fn spare_measurable() -> bool {
        WORKER.with(|w| w.borrow().spare.is_some())
    }

    /// The worker thread's scheduling, once per thread (a connection's
    /// worker is a new thread).
    pub(super) fn tune_worker_thread(&self) {
        thread_local! {
            static TUNED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        }
        let Some(slice) = self.worker_slice else {
            return;
        };
        if TUNED.with(|t| t.replace(true)) {
            return;
        }
        match crate::sched::set_thread_slice(slice) {
            Ok(()) => log::debug!("vring worker: scheduler slice {slice:?}"),
            Err(e) => log::warn!("vring worker: cannot ask for a {slice:?} slice: {e}"),
        }
    }
}
