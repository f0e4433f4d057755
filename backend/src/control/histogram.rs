// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A latency histogram the request path records into without a lock:
//! power-of-two buckets of atomic counters (bucket `i` holds durations in
//! `[2^(i-1), 2^i)` ns, bucket 0 a zero duration), plus the sum and the
//! maximum. Recording is three relaxed read-modify-writes on counters the
//! vring worker alone writes; a reader (the control socket) loads them one
//! by one, so a snapshot may be a few records out of step between buckets
//! and sum — never torn within a counter, never blocking the writer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

/// Buckets: up to `2^(BUCKETS-1)` ns (about 9 minutes); longer durations
/// land in the last.
pub const BUCKETS: usize = 40;

/// See the module doc.
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    sum_ns: AtomicU64,
    max_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
            max_ns: AtomicU64::new(0),
        }
    }
}

/// The bucket of a duration of `ns` nanoseconds: the bit length of `ns`.
fn bucket(ns: u64) -> usize {
    ((u64::BITS - ns.leading_zeros()) as usize).min(BUCKETS - 1)
}

/// The upper bound of bucket `i`, in ns (exclusive; the last is open).
fn upper(i: usize) -> u64 {
    1u64 << i
}

impl Histogram {
    /// Count one duration. Lock-free: three relaxed atomic updates.
    #[inline]
    pub fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.buckets[bucket(ns)].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.max_ns.fetch_max(ns, Ordering::Relaxed);
    }

    /// What it holds now (see the module doc for how exact).
    pub fn snapshot(&self) -> Snapshot {
        let counts: [u64; BUCKETS] =
            std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed));
        let count: u64 = counts.iter().sum();
        let sum_ns = self.sum_ns.load(Ordering::Relaxed);
        let max_ns = self.max_ns.load(Ordering::Relaxed);
        // A percentile is the upper bound of the bucket it falls in (at
        // most twice the true value), capped by the maximum seen.
        let percentile = |p: u64| {
            if count == 0 {
                return 0;
            }
            let rank = (count * p).div_ceil(100).max(1);
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return upper(i).min(max_ns);
                }
            }
            max_ns
        };
        Snapshot {
            count,
            sum_ns,
            mean_ns: sum_ns.checked_div(count).unwrap_or(0),
            max_ns,
            p50_ns: percentile(50),
            p90_ns: percentile(90),
            p99_ns: percentile(99),
            buckets: counts
                .iter()
                .enumerate()
                .filter(|(_, &c)| c > 0)
                .map(|(i, &c)| Bucket {
                    below_ns: upper(i),
                    count: c,
                })
                .collect(),
        }
    }
}

/// One non-empty bucket: `count` durations shorter than `below_ns` (and at
/// least half of it, but for the first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Bucket {
    pub below_ns: u64,
    pub count: u64,
}

/// A histogram as the control socket answers it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub count: u64,
    pub sum_ns: u64,
    pub mean_ns: u64,
    pub max_ns: u64,
    /// Upper bounds of the buckets the percentiles fall in (capped by the
    /// maximum).
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
    /// The non-empty buckets, shortest first.
    pub buckets: Vec<Bucket>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_land_in_their_power_of_two_bucket() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(1), 1);
        assert_eq!(bucket(1023), 10);
        assert_eq!(bucket(1024), 11);
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn a_snapshot_counts_sums_and_bounds_percentiles() {
        let h = Histogram::default();
        assert_eq!(h.snapshot(), Snapshot::default());
        for _ in 0..98 {
            h.record(Duration::from_nanos(1500));
        }
        h.record(Duration::from_micros(100));
        h.record(Duration::from_secs(3600));
        let s = h.snapshot();
        assert_eq!(s.count, 100);
        assert_eq!(s.max_ns, 3_600_000_000_000);
        assert_eq!(s.p50_ns, 2048, "1500 ns is in [1024, 2048)");
        assert_eq!(s.p90_ns, 2048);
        assert_eq!(s.p99_ns, 131_072, "the 99th is the 100 µs one");
        assert_eq!(s.buckets.len(), 3);
        assert_eq!(s.buckets.iter().map(|b| b.count).sum::<u64>(), 100);
        assert_eq!(s.sum_ns, 98 * 1500 + 100_000 + 3_600_000_000_000);
    }

    #[test]
    fn concurrent_records_are_all_counted() {
        let h = std::sync::Arc::new(Histogram::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let h = h.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000 {
                        h.record(Duration::from_nanos(i));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(h.snapshot().count, 40_000);
    }
}
