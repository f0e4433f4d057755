// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Bounded, adaptive busy-polling of the request queue, that gives way
//! when the host has no CPU to spare.
//!
//! Linux's virtio-iommu driver sends one request per notification and spins
//! until it completes (drivers/iommu/virtio-iommu.c, `viommu_sync_req`), so a
//! request's latency is the daemon's wake-up time plus its work. After a
//! batch, the worker keeps watching the available ring for a short window,
//! with the guest's notifications still suppressed (no EVENT_IDX
//! `avail_event` update, or `VRING_USED_F_NO_NOTIFY`): a request that
//! arrives meanwhile costs the guest no exit and the daemon no wake-up.
//!
//! The window adapts as KVM's halt polling does (virt/kvm/kvm_main.c,
//! `grow_halt_poll_ns` / `shrink_halt_poll_ns`): after a sleep short enough
//! that a longer window would have caught the request, it doubles (up to the
//! limit); after a long sleep it halves. An idle guest sends nothing, so it
//! costs no polling at all; a sparse one costs at most one window per batch.
//!
//! **Two limits.** With a CPU to spare ([`Regime::Spare`]) the limit is the
//! configured maximum, long enough to span a disk I/O between a strict-mode
//! MAP and its UNMAP (1000 µs by default), and the worker yields between
//! looks so QEMU's I/O threads sharing its CPU still run. When the host has
//! none ([`Regime::Busy`]) the limit is [`BURST_MAX`]: long enough to catch
//! the next request of the same guest I/O (Linux maps a virtio-blk request's
//! buffers one by one, each MAP waited for), short enough to end before the
//! scheduler takes the CPU back, and the worker never yields.
//!
//! **How a busy host shows.** A polling worker on a host whose CPUs all run
//! vCPUs is runnable without running: notifications are suppressed, so the
//! guest's next request does not wake it, and the request waits for the
//! worker's next time slice — milliseconds — while its vCPU spins for the
//! reply. `sched_yield` does not prevent it under EEVDF (Linux ≥ 6.6): the
//! yielder keeps its place as long as it is eligible. Measured with two
//! busy guests on two cores: polling windows took 2–4 ms of wall time with
//! the worker on a CPU ≤ 1 % of it, and guests ran at 1–7 % of QEMU's
//! in-process device. One guest on an idle core: half the windows ran
//! without a break, 90 % ended within 221 µs. So the worker watches the
//! gaps between its own looks at the ring: a gap longer than [`GAP_MAX`]
//! means it was off its CPU that long with the guest's requests unseen.
//! The window ends, and polling drops to the busy regime for a cool-down
//! that doubles while the host stays busy ([`COOLDOWN_MIN`] up to
//! [`COOLDOWN_MAX`]) and starts short again once a window of
//! [`CLEAN_WINDOW`] runs to its end without one. While the guest's vCPU
//! sleeps on its kicks (docs/mirror-protocol.md §15) no window probes a
//! busy host again: the busy regime lasts until the host is measured to
//! have a CPU to spare (src/spare.rs; [`AdaptivePoll::contended`]).

use std::time::{Duration, Instant};

/// The first window after polling started paying off.
const GROW_START: Duration = Duration::from_micros(4);
/// A sleep this many times the limit shrinks the window.
const SHRINK_FACTOR: u32 = 16;
/// The polling limit while the host has no CPU to spare.
pub const BURST_MAX: Duration = Duration::from_micros(20);
/// A gap between two looks at the ring longer than this: the worker was
/// off its CPU, and the host has none to spare.
pub const GAP_MAX: Duration = Duration::from_micros(200);
/// A window at least this long that ran to its end without a gap shows a
/// CPU to spare (each probe of a busy host costs its guests a stall of a
/// few milliseconds, so it takes a long clean window to end the cool-down
/// sequence).
pub const CLEAN_WINDOW: Duration = Duration::from_micros(800);
/// The busy regime lasts this long after the host was found busy ...
pub const COOLDOWN_MIN: Duration = Duration::from_millis(50);
/// ... doubling each time it is found busy again, up to this.
pub const COOLDOWN_MAX: Duration = Duration::from_secs(2);

/// Whether the host had a CPU to spare when last looked at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Regime {
    /// Poll up to the configured maximum, yielding between looks.
    Spare,
    /// Poll up to [`BURST_MAX`], never yielding.
    Busy,
}

/// One polling window: how long, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub length: Duration,
    pub regime: Regime,
}

impl Window {
    /// Offer the CPU to other threads between looks (only with CPUs to
    /// spare: on a busy host a yield hands the CPU away for a whole slice).
    pub fn yields(&self) -> bool {
        self.regime == Regime::Spare
    }
}

/// How a busy regime ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BusyUntil {
    /// At this instant: then a window probes the host again.
    Cooldown(Instant),
    /// When the host is measured to have a CPU to spare (src/spare.rs),
    /// not by probing: see [`AdaptivePoll::contended`].
    SpareFound,
}

/// The polling window and how it adapts.
#[derive(Clone, Copy, Debug)]
pub struct AdaptivePoll {
    max: Duration,
    window: Duration,
    asleep_since: Option<Instant>,
    /// The busy regime, if the host was found busy.
    busy: Option<BusyUntil>,
    /// The next cool-down, should the host be found busy again.
    cooldown: Duration,
}

impl AdaptivePoll {
    /// Polling of at most `max` per batch (zero: never poll).
    pub fn new(max: Duration) -> Self {
        Self {
            max,
            window: Duration::ZERO,
            asleep_since: None,
            busy: None,
            cooldown: COOLDOWN_MIN,
        }
    }

    /// The regime at `now`.
    pub fn regime(&self, now: Instant) -> Regime {
        match self.busy {
            Some(BusyUntil::Cooldown(t)) if now < t => Regime::Busy,
            Some(BusyUntil::SpareFound) => Regime::Busy,
            _ => Regime::Spare,
        }
    }

    fn limit(&self, regime: Regime) -> Duration {
        match regime {
            Regime::Spare => self.max,
            Regime::Busy => self.max.min(BURST_MAX),
        }
    }

    /// How to poll after the current batch, at `now`.
    pub fn window(&self, now: Instant) -> Window {
        let regime = self.regime(now);
        Window {
            length: self.window.min(self.limit(regime)),
            regime,
        }
    }

    /// The window ended with no new request: the worker sleeps from `now`.
    pub fn sleeping(&mut self, now: Instant) {
        self.asleep_since = Some(now);
    }

    /// A notification woke the worker at `now`: adapt the window to how long
    /// it slept, against the limit of the regime it is in.
    pub fn woken(&mut self, now: Instant) {
        let Some(since) = self.asleep_since.take() else {
            return;
        };
        let limit = self.limit(self.regime(now));
        if limit.is_zero() {
            return;
        }
        let slept = now.saturating_duration_since(since);
        if slept <= limit {
            self.window = (self.window.min(limit) * 2).max(GROW_START).min(limit);
        } else if slept > limit * SHRINK_FACTOR {
            self.window = self.window.min(limit) / 2;
            if self.window < GROW_START {
                self.window = Duration::ZERO;
            }
        }
    }

    /// A window found the host busy at `now`: the busy regime for the
    /// cool-down, and the next one twice as long.
    ///
    /// With `until_spare` (the guest's vCPU sleeps on its kick,
    /// docs/mirror-protocol.md §15, and the host's spare CPU can be
    /// measured) the busy regime lasts instead until the host is measured
    /// to have a CPU to spare ([`Self::spare_found`]):
    /// a probing window there costs more than it can find. While the worker
    /// polls, the guest's notifications stay suppressed, so the guest does
    /// not kick and its vCPU spins for each reply instead of sleeping; a
    /// worker and its spinning vCPU then hold both CPUs of a 2-CPU host,
    /// and every other guest waits. Measured with two and three busy
    /// guests on two CPUs: polling off altogether (`--poll-us 0`) served
    /// 25–50 % more I/O than probes every 50 ms–2 s (docs/shared-host.md).
    pub fn contended(&mut self, now: Instant, until_spare: bool) {
        self.busy = Some(match until_spare {
            true => BusyUntil::SpareFound,
            false => BusyUntil::Cooldown(now + self.cooldown),
        });
        self.cooldown = (self.cooldown * 2).min(COOLDOWN_MAX);
    }

    /// The host was measured to have a CPU to spare (src/spare.rs): the
    /// busy regime, if any, ends now, and the next cool-down starts short.
    pub fn spare_found(&mut self) {
        self.busy = None;
        self.cooldown = COOLDOWN_MIN;
    }

    /// A window of [`CLEAN_WINDOW`] or more ran to its end without a gap
    /// (a window that found a request at once shows nothing): the next
    /// cool-down, if any, starts short again.
    pub fn uncontended(&mut self) {
        self.cooldown = COOLDOWN_MIN;
    }
}

/// Watches the gaps between a polling worker's looks at the ring.
#[derive(Clone, Copy, Debug)]
pub struct GapWatch {
    last: Instant,
}

impl GapWatch {
    /// A window starts at `now`.
    pub fn start(now: Instant) -> Self {
        Self { last: now }
    }

    /// A look at `now`: true if the worker was off its CPU for longer than
    /// [`GAP_MAX`] since the last one.
    pub fn look(&mut self, now: Instant) -> bool {
        let gap = now.saturating_duration_since(self.last);
        self.last = now;
        gap > GAP_MAX
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_micros(500);

    fn after(p: &mut AdaptivePoll, now: Instant, slept: Duration) {
        p.sleeping(now);
        p.woken(now + slept);
    }

    #[test]
    fn short_sleeps_grow_the_window_up_to_the_maximum() {
        let mut p = AdaptivePoll::new(MAX);
        let now = Instant::now();
        assert_eq!(
            p.window(now).length,
            Duration::ZERO,
            "no polling before it pays off"
        );
        after(&mut p, now, Duration::from_micros(20));
        assert_eq!(p.window(now).length, GROW_START);
        for _ in 0..10 {
            after(&mut p, now, Duration::from_micros(20));
        }
        assert_eq!(
            p.window(now),
            Window {
                length: MAX,
                regime: Regime::Spare
            }
        );
        assert!(p.window(now).yields());
    }

    #[test]
    fn long_sleeps_shrink_it_to_nothing_and_middling_ones_keep_it() {
        let mut p = AdaptivePoll::new(MAX);
        let now = Instant::now();
        for _ in 0..10 {
            after(&mut p, now, Duration::from_micros(10));
        }
        after(&mut p, now, MAX * 4);
        assert_eq!(
            p.window(now).length,
            MAX,
            "a sleep a bit longer than the window"
        );
        for _ in 0..10 {
            after(&mut p, now, Duration::from_millis(100));
        }
        assert_eq!(p.window(now).length, Duration::ZERO);
    }

    #[test]
    fn a_zero_maximum_never_polls_and_a_wake_without_sleep_changes_nothing() {
        let now = Instant::now();
        let mut p = AdaptivePoll::new(Duration::ZERO);
        after(&mut p, now, Duration::from_micros(1));
        assert_eq!(p.window(now).length, Duration::ZERO);
        p.contended(now, false);
        after(&mut p, now, Duration::from_micros(1));
        assert_eq!(p.window(now).length, Duration::ZERO);
        let mut p = AdaptivePoll::new(MAX);
        p.woken(now);
        assert_eq!(p.window(now).length, Duration::ZERO);
    }

    #[test]
    fn a_busy_host_cuts_the_window_to_a_burst_without_yields_for_a_cooldown() {
        let mut p = AdaptivePoll::new(MAX);
        let t0 = Instant::now();
        for _ in 0..10 {
            after(&mut p, t0, Duration::from_micros(10));
        }
        p.contended(t0, false);
        let w = p.window(t0);
        assert_eq!((w.length, w.regime), (BURST_MAX, Regime::Busy));
        assert!(!w.yields());
        assert_eq!(p.window(t0 + COOLDOWN_MIN / 2).length, BURST_MAX);
        // The window kept its size under the burst limit: back to it after.
        assert_eq!(p.window(t0 + COOLDOWN_MIN).length, MAX);
        assert_eq!(p.regime(t0 + COOLDOWN_MIN), Regime::Spare);
    }

    #[test]
    fn cooldowns_double_up_to_their_maximum_and_start_short_after_a_clean_window() {
        let mut p = AdaptivePoll::new(MAX);
        let t0 = Instant::now();
        p.contended(t0, false);
        let t1 = t0 + COOLDOWN_MIN;
        assert_eq!(p.regime(t1), Regime::Spare);
        p.contended(t1, false);
        assert_eq!(p.regime(t1 + COOLDOWN_MIN), Regime::Busy);
        assert_eq!(p.regime(t1 + COOLDOWN_MIN * 2), Regime::Spare);
        for _ in 0..20 {
            p.contended(t1, false);
        }
        assert_eq!(p.regime(t1 + COOLDOWN_MAX - GROW_START), Regime::Busy);
        assert_eq!(p.regime(t1 + COOLDOWN_MAX), Regime::Spare);
        p.uncontended();
        let t2 = t1 + COOLDOWN_MAX;
        p.contended(t2, false);
        assert_eq!(p.regime(t2 + COOLDOWN_MIN), Regime::Spare);
    }

    #[test]
    fn in_the_busy_regime_the_window_adapts_against_the_burst_limit() {
        let mut p = AdaptivePoll::new(MAX);
        let t0 = Instant::now();
        p.contended(t0, false);
        // Sleeps longer than a burst but short for the spare limit: they
        // do not grow a window that could not have caught them.
        for _ in 0..10 {
            after(&mut p, t0, Duration::from_micros(100));
        }
        assert_eq!(p.window(t0).length, Duration::ZERO);
        for _ in 0..10 {
            after(&mut p, t0, Duration::from_micros(5));
        }
        assert_eq!(p.window(t0).length, BURST_MAX);
        for _ in 0..10 {
            after(&mut p, t0, BURST_MAX * (SHRINK_FACTOR + 1));
        }
        assert_eq!(p.window(t0).length, Duration::ZERO);
    }

    #[test]
    fn a_cpu_found_to_spare_ends_the_busy_regime_and_its_cooldown_sequence() {
        let mut p = AdaptivePoll::new(MAX);
        let now = Instant::now();
        p.contended(now, false);
        p.contended(now, false);
        assert_eq!(p.regime(now), Regime::Busy);
        p.spare_found();
        assert_eq!(p.regime(now), Regime::Spare);
        p.contended(now, false);
        assert_eq!(p.regime(now + COOLDOWN_MIN), Regime::Spare, "short again");
    }

    #[test]
    fn with_vcpus_that_sleep_the_busy_regime_lasts_until_a_cpu_is_found_to_spare() {
        let mut p = AdaptivePoll::new(MAX);
        let t0 = Instant::now();
        for _ in 0..10 {
            after(&mut p, t0, Duration::from_micros(10));
        }
        p.contended(t0, true);
        assert_eq!(p.regime(t0), Regime::Busy);
        assert_eq!(p.regime(t0 + COOLDOWN_MAX * 10), Regime::Busy, "no probe");
        assert_eq!(p.window(t0 + COOLDOWN_MAX * 10).length, BURST_MAX);
        p.spare_found();
        assert_eq!(p.regime(t0), Regime::Spare);
        assert_eq!(p.window(t0).length, MAX);
        // Without sleeping vCPUs, the cool-down again.
        p.contended(t0, false);
        assert_eq!(p.regime(t0 + COOLDOWN_MIN), Regime::Spare);
    }

    #[test]
    fn a_gap_longer_than_the_limit_between_looks_is_a_busy_host() {
        let t0 = Instant::now();
        let mut g = GapWatch::start(t0);
        assert!(!g.look(t0 + Duration::from_micros(3)));
        assert!(!g.look(t0 + Duration::from_micros(3) + GAP_MAX));
        assert!(g.look(t0 + Duration::from_micros(4) + GAP_MAX * 2));
        assert!(!g.look(t0), "a clock that went back is no gap");
    }
}
