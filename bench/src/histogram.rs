// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A latency histogram that never allocates after it is made.
//!
//! Log-linear buckets, as HdrHistogram lays them out: values below 64 ns
//! have a bucket each; above, every power of two is split into 64 equal
//! buckets, so a bucket is at most 1/64 (1.6 %) of its values wide. Values
//! up to 2^41 ns (about 36 minutes) are kept apart; longer ones count in the
//! last bucket. Recording is an index computation and an increment.

use std::time::Duration;

use serde::Serialize;

/// log2 of the number of buckets per power of two.
const SUB_BITS: u32 = 6;
/// Buckets per power of two (and values with a bucket of their own).
const SUB: usize = 1 << SUB_BITS;
/// The largest power of two that has buckets of its own.
const MAX_EXP: u32 = 40;
/// Number of buckets.
const BUCKETS: usize = SUB * (MAX_EXP - SUB_BITS + 2) as usize;
/// The largest value told apart from larger ones.
pub const MAX_VALUE: u64 = (1 << (MAX_EXP + 1)) - 1;

/// Counts of nanosecond values in log-linear buckets, plus the exact
/// count, sum, minimum and maximum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Histogram {
    counts: Box<[u64]>,
    total: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

/// The bucket of `v` (at most [`MAX_VALUE`]).
fn index_of(v: u64) -> usize {
    if v < SUB as u64 {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros();
    let shift = exp - SUB_BITS;
    (shift as usize + 1) * SUB + ((v >> shift) as usize - SUB)
}

/// The values bucket `i` holds: `(lowest, highest)`, inclusive.
fn bounds_of(i: usize) -> (u64, u64) {
    if i < SUB {
        return (i as u64, i as u64);
    }
    let shift = (i / SUB - 1) as u32;
    let low = ((SUB + i % SUB) as u64) << shift;
    (low, low + (1 << shift) - 1)
}

impl Histogram {
    /// An empty histogram (the only allocation it makes).
    pub fn new() -> Self {
        Histogram {
            counts: vec![0; BUCKETS].into_boxed_slice(),
            total: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    /// Count one value, in nanoseconds.
    pub fn record(&mut self, ns: u64) {
        self.counts[index_of(ns.min(MAX_VALUE))] += 1;
        self.total += 1;
        self.sum += u128::from(ns);
        self.min = self.min.min(ns);
        self.max = self.max.max(ns);
    }

    /// Count one duration.
    pub fn record_duration(&mut self, d: Duration) {
        self.record(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Forget every value.
    pub fn reset(&mut self) {
        self.counts.fill(0);
        self.total = 0;
        self.sum = 0;
        self.min = u64::MAX;
        self.max = 0;
    }

    /// Number of values.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// Smallest value (0 if empty).
    pub fn min(&self) -> u64 {
        if self.total == 0 {
            0
        } else {
            self.min
        }
    }

    /// Largest value.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Mean value (0 if empty).
    pub fn mean(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum as f64 / self.total as f64
        }
    }

    /// The value at quantile `q` (0.5 = median): the highest value of the
    /// bucket holding the `ceil(q * count)`-th smallest value, at most the
    /// maximum seen; 0 if empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bounds_of(i).1.min(self.max);
            }
        }
        self.max
    }

    /// The non-empty buckets: `(lowest, highest, count)`, in value order.
    pub fn buckets(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(|(i, &c)| {
                let (lo, hi) = bounds_of(i);
                (lo, hi, c)
            })
    }
}

/// Latency statistics, nanoseconds.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Latency {
    /// Fastest.
    pub min: u64,
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p99_9: u64,
    /// Slowest.
    pub max: u64,
    /// Mean.
    pub mean: f64,
}

impl Latency {
    /// The statistics of `h`.
    pub fn of(h: &Histogram) -> Self {
        Latency {
            min: h.min(),
            p50: h.quantile(0.5),
            p99: h.quantile(0.99),
            p99_9: h.quantile(0.999),
            max: h.max(),
            mean: h.mean(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_tile_the_value_range() {
        let mut next = 0;
        for i in 0..BUCKETS {
            let (lo, hi) = bounds_of(i);
            assert_eq!(lo, next, "bucket {i}");
            assert!(hi >= lo);
            assert_eq!(index_of(lo), i);
            assert_eq!(index_of(hi), i);
            next = hi + 1;
        }
        assert_eq!(next - 1, MAX_VALUE);
    }

    #[test]
    fn buckets_are_at_most_a_64th_of_their_values_wide() {
        for i in SUB..BUCKETS {
            let (lo, hi) = bounds_of(i);
            assert!((hi - lo + 1) * 64 <= lo, "bucket {i}: {lo}-{hi}");
        }
    }

    #[test]
    fn small_values_are_exact() {
        let mut h = Histogram::new();
        for v in [3, 1, 2, 63] {
            h.record(v);
        }
        assert_eq!(h.count(), 4);
        assert_eq!((h.min(), h.max()), (1, 63));
        assert_eq!(h.quantile(0.5), 2);
        assert_eq!(h.quantile(0.75), 3);
        assert_eq!(h.quantile(1.0), 63);
        assert_eq!(h.mean(), 17.25);
    }

    #[test]
    fn quantiles_are_within_the_bucket_width() {
        let mut h = Histogram::new();
        for v in 1..=100_000u64 {
            h.record(v * 10);
        }
        for (q, exact) in [(0.5, 500_000.0), (0.99, 990_000.0), (0.999, 999_000.0)] {
            let got = h.quantile(q) as f64;
            assert!(
                got >= exact && got <= exact * (1.0 + 1.0 / 64.0),
                "{q}: {got}"
            );
        }
        assert_eq!(h.quantile(1.0), 1_000_000);
    }

    #[test]
    fn huge_values_land_in_the_last_bucket() {
        let mut h = Histogram::new();
        h.record(u64::MAX);
        h.record_duration(Duration::from_secs(1 << 40));
        assert_eq!(h.count(), 2);
        assert_eq!(h.max(), u64::MAX);
        assert_eq!(h.buckets().count(), 1);
        assert_eq!(h.buckets().next().map(|b| b.1), Some(MAX_VALUE));
    }

    #[test]
    fn reset_empties() {
        let mut h = Histogram::new();
        h.record(1000);
        h.reset();
        assert_eq!(h, Histogram::new());
        assert_eq!(h.quantile(0.5), 0);
        assert_eq!(h.min(), 0);
    }
}
