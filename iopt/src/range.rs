// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Inclusive IOVA ranges, as the kernel's interval trees hold them.

/// An inclusive range of IOVAs `[start, last]`, the form of
/// `struct iommu_iova_range` and of the kernel's interval tree nodes.
///
/// Inclusive ends let a range reach `u64::MAX` without overflow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct IovaRange {
    /// First IOVA in the range.
    pub start: u64,
    /// Last IOVA in the range (inclusive).
    pub last: u64,
}

impl IovaRange {
    /// The range `[start, last]`; `None` when `start > last`.
    pub fn new(start: u64, last: u64) -> Option<Self> {
        (start <= last).then_some(Self { start, last })
    }

    /// The range of `length` bytes from `start`; `None` when `length` is 0 or
    /// the range would wrap past `u64::MAX`.
    pub fn from_len(start: u64, length: u64) -> Option<Self> {
        let last = start.checked_add(length.checked_sub(1)?)?;
        Some(Self { start, last })
    }

    /// Number of bytes in the range, or `None` for the whole 2^64 space.
    pub fn size(&self) -> Option<u64> {
        (self.last - self.start).checked_add(1)
    }

    /// Whether the two ranges share at least one IOVA.
    pub fn overlaps(&self, other: &IovaRange) -> bool {
        self.start <= other.last && other.start <= self.last
    }

    /// Whether `other` lies entirely inside `self`.
    pub fn contains_range(&self, other: &IovaRange) -> bool {
        self.start <= other.start && other.last <= self.last
    }

    /// Whether `iova` lies inside the range.
    pub fn contains(&self, iova: u64) -> bool {
        self.start <= iova && iova <= self.last
    }
}
