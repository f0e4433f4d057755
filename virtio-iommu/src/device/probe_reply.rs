// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! PROBE: the reserved regions of an endpoint, as properties in the
//! request's reply (property writing itself is [`crate::probe`]'s).

use iopt::Iommufd;

use super::{status_of, Device, TAIL_LEN};
use crate::probe::PropertyWriter;
use crate::wire::{feature, probe, Status};

impl<F: Iommufd> Device<F> {
    /// A PROBE's reply (`reply` holds at least a tail): `probe_size` bytes
    /// of properties, then the tail, where the driver reads it (virtio 1.2
    /// §5.13.6: the tail follows the properties). `endpoint` is `None` when
    /// the device-readable part is too short to hold the request: INVAL,
    /// with no property. Returns the status and where the tail goes.
    pub(super) fn probe_reply(
        &mut self,
        endpoint: Option<u32>,
        reply: &mut [u8],
    ) -> (Status, usize) {
        let props = self.cfg.probe_size as usize;
        if reply.len() < props + TAIL_LEN {
            // §5.13.6.7.2: properties shorter than probe_size → no
            // property, INVAL; the tail goes at the end of the buffer,
            // where the driver reads it.
            return (Status::Inval, reply.len() - TAIL_LEN);
        }
        let area = &mut reply[..props];
        let status = match endpoint {
            Some(endpoint) => self.probe(endpoint, area),
            None => {
                // Zeroed, as a refused PROBE's area is: a NONE property.
                area.fill(0);
                Status::Inval
            }
        };
        (status, props)
    }

    /// PROBE (virtio 1.2 §5.13.6.8): needs the PROBE feature (else UNSUPP);
    /// unknown endpoint → NOENT. Writes RESV_MEM MSI for the MSI window, then
    /// RESV_MEM RESERVED for every part of the input range the endpoint's
    /// IOAS device cannot use (its reserved regions and aperture), except
    /// the MSI window itself. Properties that do not fit are left out.
    fn probe(&mut self, endpoint: u32, area: &mut [u8]) -> Status {
        let mut w = PropertyWriter::new(area);
        if !self.acked(feature::PROBE) {
            return Status::Unsupp;
        }
        let Some(&ep) = self.endpoints.get(&endpoint) else {
            return Status::NoEnt;
        };
        let (msi_start, msi_end) = self.cfg.msi_window;
        w.resv_mem(probe::RESV_MEM_T_MSI, msi_start, msi_end);
        let usable = match self.iommufd.device_iova_ranges(ep.dev) {
            Ok(u) => u,
            Err(e) => return status_of(&e),
        };
        let (lo, hi) = self.cfg.input_range;
        let mut report = |start: u64, end: u64| {
            // Split around the MSI window, which is already reported.
            if end < msi_start || start > msi_end {
                w.resv_mem(probe::RESV_MEM_T_RESERVED, start, end);
                return;
            }
            if start < msi_start {
                w.resv_mem(probe::RESV_MEM_T_RESERVED, start, msi_start - 1);
            }
            if end > msi_end {
                w.resv_mem(probe::RESV_MEM_T_RESERVED, msi_end + 1, end);
            }
        };
        let mut next = Some(lo);
        for r in usable.iter().filter(|r| r.last >= lo && r.start <= hi) {
            if let Some(cur) = next {
                if r.start > cur {
                    report(cur, r.start - 1);
                }
            }
            next = r.last.checked_add(1);
        }
        if let Some(cur) = next {
            if cur <= hi {
                report(cur, hi);
            }
        }
        Status::Ok
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::field_reassign_with_default)]
    use super::*;
    use crate::device::test_support::{device, device_with, status_from, RAM_AT_0};
    use crate::wire::{req_type, ReqProbe};
    use crate::{DeviceConfig, Discard};
    use iopt::model::ModelIommufd;
    use vm_memory::ByteValued;

    fn probe_request(endpoint: u32) -> ReqProbe {
        let mut r = ReqProbe::default();
        r.head.req_type = req_type::PROBE;
        r.endpoint = endpoint.into();
        r
    }

    fn probe(d: &mut Device<ModelIommufd>, endpoint: u32) -> (Status, Vec<(u8, u64, u64)>) {
        let r = probe_request(endpoint);
        let size = d.device_config().probe_size as usize;
        let mut reply = vec![0xaau8; size + 4];
        let n = d.handle_request(r.as_slice(), &mut reply, &RAM_AT_0, &mut Discard);
        assert_eq!(n, size + 4);
        let mut props = vec![];
        let mut at = 0;
        while at + 4 <= size {
            let t = u16::from_le_bytes([reply[at], reply[at + 1]]);
            if t == 0 {
                break;
            }
            let start = u64::from_le_bytes(reply[at + 8..at + 16].try_into().unwrap());
            let end = u64::from_le_bytes(reply[at + 16..at + 24].try_into().unwrap());
            props.push((reply[at + 4], start, end));
            at += 24;
        }
        (status_from(reply[size]), props)
    }

    #[test]
    fn probe_reports_the_msi_window_and_the_holes_of_the_ioas_device() {
        let mut d = device_with(DeviceConfig {
            input_range: (0, u64::MAX),
            ..Default::default()
        });
        let (status, props) = probe(&mut d, 8);
        assert_eq!(status, Status::Ok);
        assert_eq!(
            props,
            vec![
                (probe::RESV_MEM_T_MSI, 0xfee0_0000, 0xfeef_ffff),
                // Above the mock device's 48-bit aperture.
                (probe::RESV_MEM_T_RESERVED, 1 << 48, u64::MAX),
            ]
        );
        assert_eq!(probe(&mut d, 9).0, Status::NoEnt);
    }

    #[test]
    fn probe_without_the_feature_or_room_fails() {
        let mut d = device();
        let r = probe_request(8);
        let mut small = [0u8; 8];
        let n = d.handle_request(r.as_slice(), &mut small, &RAM_AT_0, &mut Discard);
        assert_eq!((n, small[4]), (8, Status::Inval as u8));
        d.set_acked_features(0);
        assert_eq!(probe(&mut d, 8).0, Status::Unsupp);
    }

    #[test]
    fn a_probe_request_cut_short_gets_inval_where_the_driver_reads_the_tail() {
        // Found sending requests as a hostile front-end would: the tail went
        // to offset 0 of the reply with IOERR, so the driver, which reads a
        // PROBE's tail after probe_size bytes of properties, saw OK and no
        // property.
        let mut d = device();
        let r = probe_request(8);
        let size = d.device_config().probe_size as usize;
        let whole = r.as_slice();
        for cut in [4, 8, whole.len() - 1] {
            let mut reply = vec![0xaau8; size + 4];
            let n = d.handle_request(&whole[..cut], &mut reply, &RAM_AT_0, &mut Discard);
            assert_eq!(n, size + 4, "{cut} bytes: the used length covers the tail");
            assert_eq!(reply[size..], [Status::Inval as u8, 0, 0, 0], "{cut} bytes");
            assert!(
                reply[..size].iter().all(|&b| b == 0),
                "{cut} bytes: no property"
            );
        }
        // With no room for the properties either, the tail still ends the
        // buffer; a request shorter than a head names no type: DEVERR.
        let mut small = [0xaau8; 8];
        let n = d.handle_request(&whole[..4], &mut small, &RAM_AT_0, &mut Discard);
        assert_eq!((n, small[4]), (8, Status::Inval as u8));
        let n = d.handle_request(&whole[..3], &mut small, &RAM_AT_0, &mut Discard);
        assert_eq!((n, small[0]), (4, Status::DevErr as u8));
    }

    #[test]
    fn a_probe_buffer_shorter_than_probe_size_gets_inval_at_its_end() {
        let mut d = device();
        let r = probe_request(8);
        let size = d.device_config().probe_size as usize;
        let mut reply = vec![0xaau8; size];
        let n = d.handle_request(r.as_slice(), &mut reply, &RAM_AT_0, &mut Discard);
        assert_eq!(n, size, "the tail is where the driver reads it: at the end");
        assert_eq!(reply[size - 4], Status::Inval as u8);
        assert!(reply[..size - 4].iter().all(|&b| b == 0xaa), "no property");
    }
}
