// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Running a plan on a leg: set-up, warm-up, the measured cycles with the
//! daemon's `/proc` counters around them, tear-down.

use std::time::{Duration, Instant};

use crate::histogram::Histogram;
use crate::leg::{Leg, LegError, MirrorCounters};
use crate::procstat::{self, ProcError, Sample};
use crate::progress::Progress;
use crate::workload::Plan;

/// Why a leg's run failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The leg failed.
    #[error(transparent)]
    Leg(#[from] LegError),
    /// The daemon's counters could not be read.
    #[error("daemon counters: {0}")]
    Proc(#[from] ProcError),
}

/// How long to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// Unmeasured cycles first (caches, allocator, the daemon's threads).
    pub warmup: Duration,
    /// Measured cycles; the run stops at the first cycle end after this.
    pub measure: Duration,
}

/// What to watch besides the leg's own latencies.
#[derive(Clone, Copy, Debug, Default)]
pub struct Watch {
    /// The process whose `/proc` counters to read (the daemon).
    pub pid: Option<u32>,
    /// This process's allocation counter (the bench binary's global
    /// allocator counts them; a library cannot).
    pub allocations: Option<fn() -> u64>,
}

/// What one leg measured.
#[derive(Clone, Debug)]
pub struct LegOutcome {
    /// Requests completed in the measured cycles.
    pub requests: u64,
    /// Wall time of the measured cycles.
    pub elapsed: Duration,
    /// Latency of each measured request.
    pub latency: Histogram,
    /// What the watched process (the daemon) spent meanwhile.
    pub cost: Option<Sample>,
    /// Notifications sent to the device meanwhile.
    pub notifications: Option<u64>,
    /// Allocations this process made meanwhile, if counted.
    pub allocations: Option<u64>,
    /// What the QEMU side saw meanwhile, if the leg has one.
    pub mirror: Option<MirrorCounters>,
}

/// Run `plan` on `leg`: set up, warm up, measure (reading `watch`'s
/// counters before and after), tear down. `progress` shows the measured
/// part under the name `leg_name`.
pub fn run_leg(
    leg: &mut impl Leg,
    plan: &Plan,
    timing: Timing,
    watch: Watch,
    progress: &mut Progress,
    leg_name: &str,
) -> Result<LegOutcome, RunError> {
    let mut scratch = Histogram::new();
    for req in &plan.setup {
        leg.kick(std::slice::from_ref(req), &mut scratch)?;
    }
    cycles(leg, plan, timing.warmup, &mut scratch, &mut |_, _, _| {})?;

    let mut latency = Histogram::new();
    let before = watch.pid.map(procstat::sample).transpose()?;
    let kicks_before = leg.notifications();
    let mirror_before = leg.mirror();
    let allocs_before = watch.allocations.map(|count| count());
    let (requests, elapsed) = cycles(
        leg,
        plan,
        timing.measure,
        &mut latency,
        &mut |now, requests, elapsed| {
            progress.update(now, leg_name, requests, elapsed, timing.measure)
        },
    )?;
    let allocations = watch
        .allocations
        .zip(allocs_before)
        .map(|(count, before)| count().saturating_sub(before));
    let mirror = mirror_before.zip(leg.mirror()).map(|(b, a)| a.since(&b));
    let after = watch.pid.map(procstat::sample).transpose()?;
    let notifications = match (kicks_before, leg.notifications()) {
        (Some(b), Some(a)) => Some(a - b),
        _ => None,
    };

    for req in &plan.teardown {
        leg.kick(std::slice::from_ref(req), &mut scratch)?;
    }
    Ok(LegOutcome {
        requests,
        elapsed,
        latency,
        cost: before.zip(after).map(|(b, a)| a.since(&b)),
        notifications,
        allocations,
        mirror,
    })
}

/// Repeat whole cycles of `plan` until `duration` has passed; returns the
/// requests completed and the time taken. `tick` sees the progress after
/// each cycle.
fn cycles(
    leg: &mut impl Leg,
    plan: &Plan,
    duration: Duration,
    hist: &mut Histogram,
    tick: &mut dyn FnMut(Instant, u64, Duration),
) -> Result<(u64, Duration), LegError> {
    let start = Instant::now();
    let per_cycle = plan.cycle_len() as u64;
    let mut requests = 0;
    loop {
        for kick in &plan.kicks {
            leg.kick(kick, hist)?;
        }
        requests += per_cycle;
        let now = Instant::now();
        let elapsed = now - start;
        tick(now, requests, elapsed);
        if elapsed >= duration {
            return Ok((requests, elapsed));
        }
    }
}
