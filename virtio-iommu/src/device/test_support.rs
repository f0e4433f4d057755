// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the device's tests share: guest RAM, devices, and a driver that
//! sends requests as bytes.
#![allow(clippy::field_reassign_with_default)]

use iopt::model::{MockDevice, ModelIommufd};
use iopt::DeviceId;
use vm_memory::ByteValued;

use super::{Change, Device, DeviceConfig, GuestRam, RamRegion};
use crate::wire::{map_flags, req_type, ReqAttach, ReqDetach, ReqMap, ReqUnmap, Status};

pub(super) const RAM: u64 = 16 << 20;
pub(super) const USER_BASE: u64 = 0x7f00_0000_0000;
pub(super) const READ: u32 = map_flags::READ;
pub(super) const RW: u32 = map_flags::READ | map_flags::WRITE;

/// Guest RAM as a list of regions.
pub(super) struct Regions(&'static [RamRegion]);
impl GuestRam for Regions {
    fn user_addr(&self, gpa: u64, len: u64) -> Option<u64> {
        let last = gpa.checked_add(len.checked_sub(1)?)?;
        self.0
            .iter()
            .find(|r| gpa >= r.gpa && last - r.gpa < r.len)
            .map(|r| r.user_va + (gpa - r.gpa))
    }
    fn for_each_region(&self, f: &mut dyn FnMut(RamRegion)) {
        self.0.iter().copied().for_each(f);
    }
}

/// 16 MiB of guest RAM at GPA 0.
pub(super) const RAM_AT_0: Regions = Regions(&[RamRegion {
    gpa: 0,
    len: RAM,
    user_va: USER_BASE,
}]);

/// The same 16 MiB, after the front-end mapped it elsewhere, plus a
/// region straddling the MSI window.
pub(super) const MOVED_BASE: u64 = 0x7e00_0000_0000;
pub(super) const MOVED_RAM: Regions = Regions(&[
    RamRegion {
        gpa: 0,
        len: RAM,
        user_va: MOVED_BASE,
    },
    RamRegion {
        gpa: 0xfec0_0000,
        len: 0x40_0000,
        user_va: MOVED_BASE + 0x1_0000_0000,
    },
]);

pub(super) fn device_with(cfg: DeviceConfig) -> Device<ModelIommufd> {
    let mut model = ModelIommufd::new();
    for ep in [8, 16] {
        model.add_device(DeviceId(ep), MockDevice::x86()).unwrap();
    }
    let mut d = Device::new(cfg, model, [(8, DeviceId(8)), (16, DeviceId(16))]).unwrap();
    d.set_acked_features(u64::MAX);
    d
}

/// A device whose unattached endpoints are blocked (boot bypass off),
/// so that the tests see faults.
pub(super) fn device() -> Device<ModelIommufd> {
    device_with(DeviceConfig {
        bypass: false,
        ..DeviceConfig::default()
    })
}

pub(super) struct Run<'a> {
    pub(super) d: &'a mut Device<ModelIommufd>,
    pub(super) changes: Vec<Change>,
}

impl Run<'_> {
    pub(super) fn send(&mut self, req: &[u8]) -> Status {
        let mut reply = [0u8; 4];
        let n = self
            .d
            .handle_request(req, &mut reply, &RAM_AT_0, &mut self.changes);
        assert_eq!(n, 4);
        status_from(reply[0])
    }
    pub(super) fn attach(&mut self, domain: u32, endpoint: u32, flags: u32) -> Status {
        let mut r = ReqAttach::default();
        r.head.req_type = req_type::ATTACH;
        r.domain = domain.into();
        r.endpoint = endpoint.into();
        r.flags = flags.into();
        self.send(r.as_slice())
    }
    pub(super) fn detach(&mut self, domain: u32, endpoint: u32) -> Status {
        let mut r = ReqDetach::default();
        r.head.req_type = req_type::DETACH;
        r.domain = domain.into();
        r.endpoint = endpoint.into();
        self.send(r.as_slice())
    }
    pub(super) fn map(
        &mut self,
        domain: u32,
        start: u64,
        end: u64,
        phys: u64,
        flags: u32,
    ) -> Status {
        let mut r = ReqMap::default();
        r.head.req_type = req_type::MAP;
        r.domain = domain.into();
        r.virt_start = start.into();
        r.virt_end = end.into();
        r.phys_start = phys.into();
        r.flags = flags.into();
        self.send(r.as_slice())
    }
    pub(super) fn unmap(&mut self, domain: u32, start: u64, end: u64) -> Status {
        let mut r = ReqUnmap::default();
        r.head.req_type = req_type::UNMAP;
        r.domain = domain.into();
        r.virt_start = start.into();
        r.virt_end = end.into();
        self.send(r.as_slice())
    }
}

pub(super) fn status_from(b: u8) -> Status {
    [
        Status::Ok,
        Status::IoErr,
        Status::Unsupp,
        Status::DevErr,
        Status::Inval,
        Status::Range,
        Status::NoEnt,
        Status::Fault,
        Status::NoMem,
    ][b as usize]
}

pub(super) fn run(d: &mut Device<ModelIommufd>) -> Run<'_> {
    Run {
        d,
        changes: Vec::new(),
    }
}

pub(super) fn identity_device(bypass: bool) -> Device<ModelIommufd> {
    device_with(DeviceConfig {
        bypass,
        identity_ioas: true,
        ..DeviceConfig::default()
    })
}
