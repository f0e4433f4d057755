// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The reader handshake (docs/mirror-protocol.md §16.3): per-thread
//! counters, the reader's to write, the daemon's to wait on.
//!
//! A reader thread owns one slot, a 64-bit counter in its reader page. It
//! makes it odd when it starts a *section* — the span in which it reads the
//! endpoint's state, walks the table and uses what it found for DMA — and
//! even again when the section ends:
//!
//! ```text
//! reader                                 daemon (a guest UNMAP)
//! slot := slot + 1   (odd)               clear the entries   (release stores)
//! fence(SeqCst)                          fence(SeqCst)
//! load state, walk   (acquire loads)     load every slot
//! … DMA …                                wait while a slot is the odd value
//! slot := slot + 1   (even, release)       it had, then complete the UNMAP
//! ```
//!
//! The two full fences make the classic store-buffer outcome impossible:
//! either the daemon's load sees the odd slot (it waits for that section to
//! end), or the reader's walk, which comes after its fence, sees the cleared
//! entries. A slot the daemon finds even is idle or between sections; a
//! section it finds open it waits for until the slot has changed at all, so
//! sections that start meanwhile never prolong the wait (they see the new
//! table). The release store that ends a section orders the section's DMA
//! before it; the daemon's acquire load that sees it orders the guest's
//! completion after.
//!
//! A reader is a separate, untrusted process: [`synchronize`] waits for it
//! at most until a deadline and reports who was late, so the daemon can
//! revoke it instead of stalling the guest.

use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// An open section on one slot: the slot is odd while it lives, and even
/// again when it is dropped.
#[derive(Debug)]
pub struct SlotGuard<'a> {
    slot: &'a AtomicU64,
    open: u64,
}

impl<'a> SlotGuard<'a> {
    /// Open a section on `slot` (which only this thread writes). `None` if
    /// it is already odd (a section is open on it: slots are per thread, and
    /// sections do not nest). On return the full fence is done: loads made
    /// after this call see every table store the daemon made before it
    /// last found the slot even.
    pub fn enter(slot: &'a AtomicU64) -> Option<Self> {
        let v = slot.load(Ordering::Relaxed);
        if v & 1 == 1 {
            return None;
        }
        let open = v.wrapping_add(1);
        slot.store(open, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        Some(Self { slot, open })
    }
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        // Release: every access of the section happens before the daemon's
        // acquire load that sees the slot even.
        self.slot
            .store(self.open.wrapping_add(1), Ordering::Release);
    }
}

/// How a [`synchronize`] ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GraceOutcome {
    /// Every section open at the start has ended.
    Quiet,
    /// The deadline passed: these slots (indexes into the list given) were
    /// still in the section they were in at the start.
    Late(Vec<usize>),
}

/// Wait until every slot of `slots` that was odd at the start has changed
/// (its section ended), or until `bound` has passed.
///
/// Call it after the table stores that removed a translation. It starts
/// with a full fence (the daemon's half of the handshake), spins briefly,
/// then sleeps in steps of at most 50 µs: a section is one batch of a
/// back-end's requests, microseconds long.
pub fn synchronize<'a>(
    slots: impl IntoIterator<Item = &'a AtomicU64>,
    bound: Duration,
) -> GraceOutcome {
    fence(Ordering::SeqCst);
    let mut open: Vec<(usize, &AtomicU64, u64)> = slots
        .into_iter()
        .enumerate()
        .filter_map(|(i, s)| {
            let v = s.load(Ordering::Acquire);
            (v & 1 == 1).then_some((i, s, v))
        })
        .collect();
    if open.is_empty() {
        return GraceOutcome::Quiet;
    }
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        open.retain(|&(_, s, v)| s.load(Ordering::Acquire) == v);
        if open.is_empty() {
            return GraceOutcome::Quiet;
        }
        let waited = start.elapsed();
        if waited >= bound {
            return GraceOutcome::Late(open.iter().map(|&(i, _, _)| i).collect());
        }
        if spins < 200 {
            spins += 1;
            std::hint::spin_loop();
        } else {
            std::thread::sleep((bound - waited).min(Duration::from_micros(50)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[test]
    fn a_slot_is_odd_inside_a_section_and_sections_do_not_nest() {
        let s = AtomicU64::new(0);
        {
            let g = SlotGuard::enter(&s).unwrap();
            assert_eq!(s.load(Ordering::Relaxed), 1);
            assert!(SlotGuard::enter(&s).is_none());
            drop(g);
        }
        assert_eq!(s.load(Ordering::Relaxed), 2);
        let s = AtomicU64::new(u64::MAX);
        assert!(SlotGuard::enter(&s).is_none(), "odd: open");
        let s = AtomicU64::new(u64::MAX - 1);
        drop(SlotGuard::enter(&s).unwrap());
        assert_eq!(s.load(Ordering::Relaxed), 0, "wraps");
    }

    #[test]
    fn idle_slots_cost_no_wait_and_a_stuck_one_is_reported_at_the_bound() {
        let slots: Vec<AtomicU64> = (0..4).map(|_| AtomicU64::new(0)).collect();
        assert_eq!(
            synchronize(&slots, Duration::from_secs(10)),
            GraceOutcome::Quiet
        );
        // Slot 2 of a hostile reader never leaves its section.
        slots[2].store(7, Ordering::Relaxed);
        let t = Instant::now();
        assert_eq!(
            synchronize(&slots, Duration::from_millis(30)),
            GraceOutcome::Late(vec![2])
        );
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(30) && took < Duration::from_secs(2));
    }

    #[test]
    fn a_new_section_does_not_prolong_the_wait() {
        let slot = Arc::new(AtomicU64::new(1));
        let s2 = slot.clone();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            // Leaves and enters again at once, and stays.
            s2.store(3, Ordering::Release);
        });
        assert_eq!(
            synchronize([&*slot], Duration::from_secs(10)),
            GraceOutcome::Quiet
        );
        h.join().unwrap();
    }

    /// The handshake itself, with threads: a writer publishes a value,
    /// waits until a reader has picked it up, "unmaps" it (stores 0) and
    /// synchronizes, then poisons what the value pointed at. A reader that
    /// found the value inside its section must never see the poison before
    /// its section ends. (With `synchronize` made to return at once, this
    /// test fails within a few rounds.)
    #[test]
    fn no_reader_sees_a_retired_value_after_synchronize() {
        const ROUNDS: u64 = 3_000;
        let entry = Arc::new(AtomicU64::new(0));
        let picked = Arc::new(AtomicU64::new(0));
        // What an entry "points at": data[e % 4] must stay e while any
        // section that found entry == e is open.
        let data: Arc<Vec<AtomicU64>> = Arc::new((0..4).map(|_| AtomicU64::new(0)).collect());
        let slots: Arc<Vec<AtomicU64>> = Arc::new((0..3).map(|_| AtomicU64::new(0)).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..3)
            .map(|r| {
                let (entry, picked, data, slots, stop) = (
                    entry.clone(),
                    picked.clone(),
                    data.clone(),
                    slots.clone(),
                    stop.clone(),
                );
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let _g = SlotGuard::enter(&slots[r]).unwrap();
                        let e = entry.load(Ordering::Acquire);
                        if e == 0 {
                            continue;
                        }
                        picked.store(e, Ordering::Relaxed);
                        for _ in 0..64 {
                            // The "DMA": what the translation points at
                            // must still be what it was.
                            assert_eq!(data[(e % 4) as usize].load(Ordering::Acquire), e);
                            std::hint::spin_loop();
                        }
                    }
                })
            })
            .collect();
        for v in 1..=ROUNDS {
            let slot = (v % 4) as usize;
            data[slot].store(v, Ordering::Release);
            entry.store(v, Ordering::Release);
            let t = Instant::now();
            while picked.load(Ordering::Relaxed) != v && t.elapsed() < Duration::from_secs(5) {
                if readers.iter().any(|h| h.is_finished()) {
                    break;
                }
                std::hint::spin_loop();
            }
            entry.store(0, Ordering::Release);
            assert_eq!(
                synchronize(slots.iter(), Duration::from_secs(10)),
                GraceOutcome::Quiet
            );
            // Reuse: no reader may still be using `v`.
            data[slot].store(u64::MAX, Ordering::Release);
        }
        stop.store(true, Ordering::Relaxed);
        for h in readers {
            h.join().expect("a reader saw a retired value");
        }
    }
}
