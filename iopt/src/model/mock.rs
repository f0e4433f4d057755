// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The model's devices: what the kernel learns from the IOMMU driver when a
//! device attaches, like the kernel's `selftest.c` mock domain.

use crate::{IovaRange, PAGE_SIZE};

/// A device the model can attach: what the kernel learns from the IOMMU
/// driver at attach time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MockDevice {
    /// The IOVA window the device's domain can translate
    /// (`iommu_domain_geometry`); everything outside is reserved on attach.
    pub aperture: IovaRange,
    /// Reserved regions (`iommu_get_resv_regions`), e.g. the MSI window.
    pub reserved: Vec<IovaRange>,
    /// The domain's smallest page size (`pgsize_bitmap`'s lowest bit); the
    /// IOAS alignment rises to it while the device is attached.
    pub page_size: u64,
}

impl MockDevice {
    /// A device behind an x86 IOMMU: 48-bit aperture, 4 KiB pages, the MSI
    /// window `0xfee00000..=0xfeefffff` reserved.
    pub fn x86() -> Self {
        Self {
            aperture: IovaRange {
                start: 0,
                last: (1 << 48) - 1,
            },
            reserved: vec![IovaRange {
                start: 0xfee0_0000,
                last: 0xfeef_ffff,
            }],
            page_size: PAGE_SIZE,
        }
    }

    /// The ranges the device reserves in any IOAS it is attached to.
    pub(super) fn reservations(&self) -> Vec<IovaRange> {
        let mut v = self.reserved.clone();
        if self.aperture.start > 0 {
            v.push(IovaRange {
                start: 0,
                last: self.aperture.start - 1,
            });
        }
        if self.aperture.last < u64::MAX {
            v.push(IovaRange {
                start: self.aperture.last + 1,
                last: u64::MAX,
            });
        }
        v
    }
}
