// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Writing PROBE properties (virtio 1.2 §5.13.6.8).

use vm_memory::ByteValued;

use crate::wire::{probe, ProbeProperty, ProbeResvMem};

/// Fills a `probe_size`-byte property area, one RESV_MEM at a time.
///
/// The area starts zeroed, so the list ends with a NONE header wherever the
/// writer stops (§5.13.6.8.1: the driver stops at NONE or at the end).
#[derive(Debug)]
pub struct PropertyWriter<'a> {
    area: &'a mut [u8],
    at: usize,
    /// Properties that did not fit.
    pub dropped: usize,
}

impl<'a> PropertyWriter<'a> {
    /// Write into `area` (zeroed here).
    pub fn new(area: &'a mut [u8]) -> Self {
        area.fill(0);
        Self {
            area,
            at: 0,
            dropped: 0,
        }
    }

    /// Append a `VIRTIO_IOMMU_PROBE_T_RESV_MEM` property for `[start, end]`.
    pub fn resv_mem(&mut self, subtype: u8, start: u64, end: u64) {
        let p = ProbeResvMem {
            head: ProbeProperty {
                prop_type: probe::T_RESV_MEM.into(),
                length: ((std::mem::size_of::<ProbeResvMem>()
                    - std::mem::size_of::<ProbeProperty>()) as u16)
                    .into(),
            },
            subtype,
            reserved: [0; 3],
            start: start.into(),
            end: end.into(),
        };
        let bytes = p.as_slice();
        match self.area.get_mut(self.at..self.at + bytes.len()) {
            Some(dst) => {
                dst.copy_from_slice(bytes);
                self.at += bytes.len();
            }
            None => self.dropped += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resv_mem_properties_are_24_bytes_with_length_20() {
        let mut area = [0xffu8; 64];
        let mut w = PropertyWriter::new(&mut area);
        w.resv_mem(probe::RESV_MEM_T_MSI, 0xfee0_0000, 0xfeef_ffff);
        w.resv_mem(probe::RESV_MEM_T_RESERVED, 0, 0xfff);
        w.resv_mem(probe::RESV_MEM_T_RESERVED, 0x2000, 0x2fff);
        assert_eq!(w.dropped, 1);
        assert_eq!(&area[0..4], &[1, 0, 20, 0]);
        assert_eq!(area[4], 1);
        assert_eq!(&area[8..16], &0xfee0_0000u64.to_le_bytes());
        assert_eq!(&area[16..24], &0xfeef_ffffu64.to_le_bytes());
        assert_eq!(area[24..28], [1, 0, 20, 0]);
        // The rest is a NONE terminator.
        assert!(area[48..].iter().all(|&b| b == 0));
    }
}
