// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The direct leg: the daemon's own device model, called in this process
//! with the encoded request bytes — what the daemon does per request, minus
//! the vhost-user transport (rings, notifications, threads).

use std::time::Instant;

use test_frontend::wire::{MAX_REQ_LEN, TAIL_LEN};
use test_frontend::{Request, Status};
use vhost_user_iommu::config::Config;
use vhost_user_iommu::emulated;
use vhost_user_iommu::guest_ram::{GuestMem, GuestRamView};
use vhost_user_iommu::ioas::IommuDevice;
use virtio_iommu::Discard;
use vm_memory::GuestAddress;

use crate::histogram::Histogram;
use crate::leg::{Leg, LegError};

/// The emulated-mode device over anonymous guest RAM.
#[derive(Debug)]
pub struct DirectLeg {
    device: IommuDevice,
    mem: GuestMem,
    req: [u8; MAX_REQ_LEN],
    /// The request tail: all the device writes for MAP/UNMAP/ATTACH/DETACH.
    reply: [u8; TAIL_LEN],
}

impl DirectLeg {
    /// The device the daemon builds from `config`, at power-on, with the
    /// features a driver acks and `ram` bytes of guest RAM at GPA 0.
    pub fn new(config: &Config, ram: u64) -> Result<Self, LegError> {
        let mut device = emulated::device(config)?;
        let len = usize::try_from(ram).map_err(|e| LegError::Ram(e.to_string()))?;
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), len)])
            .map_err(|e| LegError::Ram(e.to_string()))?;
        device.set_acked_features(device.features());
        device.set_memory(&GuestRamView::new(&mem));
        Ok(DirectLeg {
            device,
            mem,
            req: [0; MAX_REQ_LEN],
            reply: [0; TAIL_LEN],
        })
    }
}

impl DirectLeg {
    /// Run one request on the device; its status.
    pub fn request(&mut self, r: &Request) -> Status {
        let ram = GuestRamView::new(&self.mem);
        let n = r.encode(&mut self.req);
        // With a mirror the daemon writes these changes into the shared
        // translation table (and, for notified endpoints, sends them to
        // QEMU); here they are dropped, as in a daemon without
        // --mirror-socket.
        let written =
            self.device
                .handle_request(&self.req[..n], &mut self.reply, &ram, &mut Discard);
        match written.checked_sub(TAIL_LEN) {
            Some(at) => Status::from(self.reply[at]),
            None => Status::Other(0xff),
        }
    }

    /// The device model.
    pub fn device(&self) -> &IommuDevice {
        &self.device
    }
}

impl Leg for DirectLeg {
    fn kick(&mut self, reqs: &[Request], hist: &mut Histogram) -> Result<(), LegError> {
        let start = Instant::now();
        for r in reqs {
            let status = self.request(r);
            hist.record_duration(start.elapsed());
            if !status.is_ok() {
                return Err(LegError::status(status, reqs));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{Params, Workload};
    use vhost_user_iommu::config::RawConfig;

    #[test]
    fn every_workload_runs_cleanly_on_the_device_model() {
        let params = Params {
            qd: 16,
            domains: 5,
            size: 8 << 10,
            first_endpoint: 0x20,
        };
        let config = RawConfig {
            endpoints: Some(params.endpoint_list()),
            ..RawConfig::default()
        }
        .check()
        .unwrap();
        for w in Workload::ALL {
            let mut leg = DirectLeg::new(&config, 16 << 20).unwrap();
            let plan = w.plan(&params, 2 << 20);
            let mut hist = Histogram::new();
            for req in &plan.setup {
                leg.kick(std::slice::from_ref(req), &mut hist).unwrap();
            }
            // Twice: a cycle leaves the domains empty again.
            for _ in 0..2 {
                for kick in &plan.kicks {
                    leg.kick(kick, &mut hist).unwrap();
                }
            }
            assert_eq!(
                hist.count(),
                (plan.setup.len() + 2 * plan.cycle_len()) as u64
            );
            assert_eq!(leg.device.stats().mappings, 0, "{}", w.name());
        }
    }

    #[test]
    fn a_refused_request_is_an_error_naming_its_status() {
        let config = RawConfig {
            endpoints: Some("8".into()),
            ..RawConfig::default()
        }
        .check()
        .unwrap();
        let mut leg = DirectLeg::new(&config, 16 << 20).unwrap();
        let unmap = Request::Unmap {
            domain: 1,
            virt_start: 0,
            virt_end: 0xfff,
        };
        let err = leg.kick(&[unmap], &mut Histogram::new()).unwrap_err();
        assert!(matches!(
            err,
            LegError::Status {
                status: Status::NoEnt,
                kick_len: 1,
                ..
            }
        ));
    }
}
