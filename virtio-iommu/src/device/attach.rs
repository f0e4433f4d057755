// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! ATTACH and DETACH, and the endpoints they move: endpoints coming and
//! going, domains made by their first endpoint and gone with their last, and
//! where an endpoint in no domain goes (bypass, or blocked).

use iopt::{DeviceId, IoasId, Iommufd};

use super::{status_of, ConfigError, Device, Endpoint, GuestRam};
use crate::change::{Change, ChangeSink};
use crate::domain::Domain;
use crate::map_unmap::Unmap;
use crate::wire::{feature, Status, ATTACH_F_BYPASS};

impl<F: Iommufd> Device<F> {
    /// A new endpoint, standing for IOAS device `dev`, appears (a VFIO
    /// device hot-added, or forwarded by the front-end): it starts in no
    /// domain, so it bypasses (through the identity IOAS, rebuilt over `ram`
    /// to respect the new device's reserved regions) or is blocked, as
    /// `bypass` says. On failure nothing changed.
    pub fn add_endpoint(
        &mut self,
        endpoint: u32,
        dev: DeviceId,
        ram: &impl GuestRam,
    ) -> Result<(), ConfigError> {
        if self.endpoints.contains_key(&endpoint) {
            return Err(ConfigError::DuplicateEndpoint(endpoint));
        }
        let fresh_identity = self.cfg.identity_ioas && self.identity.is_none();
        if fresh_identity {
            self.identity = Some(self.iommufd.ioas_alloc().map_err(ConfigError::Identity)?);
        }
        self.endpoints
            .insert(endpoint, Endpoint { dev, domain: None });
        if let Some(identity) = self.identity {
            self.rebuild_identity(identity, ram);
        }
        if let Err(e) = self.place(dev, self.parking()) {
            self.endpoints.remove(&endpoint);
            if fresh_identity {
                if let Some(identity) = self.identity.take() {
                    let _ = self.iommufd.ioas_destroy(identity);
                }
            }
            return Err(ConfigError::Identity(e));
        }
        Ok(())
    }

    /// An endpoint goes away (its device was unplugged, or the front-end
    /// that forwarded it left): it leaves its domain as on DETACH, and its
    /// device is detached, that is blocked. Returns its IOAS device, if the
    /// endpoint existed.
    pub fn remove_endpoint(
        &mut self,
        endpoint: u32,
        sink: &mut impl ChangeSink,
    ) -> Option<DeviceId> {
        let ep = self.endpoints.remove(&endpoint)?;
        if let Err(e) = self.iommufd.detach(ep.dev) {
            // Detaching a device in no IOAS fails; it is blocked either way.
            log::debug!("endpoint {endpoint}: detaching its device: {e}");
        }
        if let Some(domain) = ep.domain {
            sink.change(Change::Detach { endpoint, domain });
            self.leave(domain, sink);
        }
        // The identity IOAS lives while there are endpoints (it was made
        // with the first one, in the iommufd they came with).
        if self.endpoints.is_empty() {
            if let Some(identity) = self.identity.take() {
                let _ = self.iommufd.unmap(identity, 0, u64::MAX);
                if let Err(e) = self.iommufd.ioas_destroy(identity) {
                    log::warn!("destroying the identity IOAS: {e}");
                }
            }
        }
        Some(ep.dev)
    }

    /// The endpoint IDs the device manages.
    pub fn endpoint_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.endpoints.keys().copied()
    }

    /// Where an endpoint in no domain goes: the identity IOAS when `bypass`
    /// is set and there is one, else nowhere (detached: DMA blocked, or
    /// bypassed by QEMU in emulated mode).
    pub(super) fn parking(&self) -> Option<IoasId> {
        self.identity.filter(|_| self.bypass)
    }

    /// Put a device in `ioas`, or detach it.
    pub(super) fn place(&mut self, dev: DeviceId, ioas: Option<IoasId>) -> iopt::Result<()> {
        match ioas {
            Some(ioas) => self.iommufd.attach(dev, ioas),
            None => self.iommufd.detach(dev),
        }
    }

    /// Move every unattached endpoint's device to [`Self::parking`]; the
    /// first failure is returned after trying them all.
    pub(super) fn park_unattached(&mut self) -> iopt::Result<()> {
        if self.identity.is_none() {
            // Detached already: devices only leave an IOAS through `place`.
            return Ok(());
        }
        let target = self.parking();
        let devs: Vec<DeviceId> = self
            .endpoints
            .values()
            .filter(|e| e.domain.is_none())
            .map(|e| e.dev)
            .collect();
        let mut first = Ok(());
        for dev in devs {
            if let Err(e) = self.place(dev, target) {
                log::warn!("device {dev:?}: moving it for bypass={}: {e}", self.bypass);
                first = first.and(Err(e));
            }
        }
        first
    }

    /// ATTACH (virtio 1.2 §5.13.6.3):
    /// - reserved bytes set, unknown flags, or ATTACH_F_BYPASS without
    ///   BYPASS_CONFIG negotiated → INVAL;
    /// - unknown endpoint → NOENT; domain ID outside `domain_range` → RANGE;
    /// - an existing domain of the other kind (bypass vs translated) → INVAL;
    /// - an endpoint attached elsewhere is moved; the old domain goes with its
    ///   last endpoint.
    pub(super) fn attach(
        &mut self,
        domain: u32,
        endpoint: u32,
        flags: u32,
        reserved_clear: bool,
        sink: &mut impl ChangeSink,
    ) -> Status {
        let (ep, want_bypass) = match self.check_attach(domain, endpoint, flags, reserved_clear) {
            Ok(checked) => checked,
            Err(status) => return status,
        };
        if ep.domain == Some(domain) {
            return Status::Ok;
        }
        let created = !self.domains.contains_key(&domain);
        if created {
            let d = if want_bypass {
                Domain::bypass()
            } else {
                match self.iommufd.ioas_alloc() {
                    Ok(ioas) => Domain::translated(ioas),
                    Err(e) => return status_of(&e),
                }
            };
            self.domains.insert(domain, d);
        }
        // Move the device first: on failure the endpoint stays where it was.
        // A bypass domain's devices share the identity IOAS, if any.
        let target = self.domains[&domain].ioas.or(self.identity);
        let moved = self.place(ep.dev, target);
        if let Err(e) = moved {
            if created {
                self.destroy_domain(domain, sink);
            }
            return status_of(&e);
        }
        if let Some(old) = ep.domain {
            sink.change(Change::Detach {
                endpoint,
                domain: old,
            });
            self.leave(old, sink);
        }
        if let Some(d) = self.domains.get_mut(&domain) {
            d.endpoints += 1;
        }
        if let Some(e) = self.endpoints.get_mut(&endpoint) {
            e.domain = Some(domain);
        }
        sink.change(Change::Attach {
            endpoint,
            domain,
            bypass: want_bypass,
        });
        Status::Ok
    }

    /// The rules of [`Self::attach`] that come before anything changes, in
    /// their order: the endpoint and whether a bypass domain is asked for,
    /// or the status.
    fn check_attach(
        &self,
        domain: u32,
        endpoint: u32,
        flags: u32,
        reserved_clear: bool,
    ) -> Result<(Endpoint, bool), Status> {
        if !reserved_clear || flags & !ATTACH_F_BYPASS != 0 {
            return Err(Status::Inval);
        }
        let want_bypass = flags & ATTACH_F_BYPASS != 0;
        if want_bypass && !self.acked(feature::BYPASS_CONFIG) {
            return Err(Status::Inval);
        }
        let Some(&ep) = self.endpoints.get(&endpoint) else {
            return Err(Status::NoEnt);
        };
        let (lo, hi) = self.cfg.domain_range;
        if domain < lo || domain > hi {
            return Err(Status::Range);
        }
        if let Some(d) = self.domains.get(&domain) {
            if d.is_bypass() != want_bypass {
                return Err(Status::Inval);
            }
        }
        Ok((ep, want_bypass))
    }

    /// An endpoint left `domain`; destroy it if it was the last one.
    pub(super) fn leave(&mut self, domain: u32, sink: &mut impl ChangeSink) {
        let Some(d) = self.domains.get_mut(&domain) else {
            return;
        };
        d.endpoints = d.endpoints.saturating_sub(1);
        if d.endpoints == 0 {
            self.destroy_domain(domain, sink);
        }
    }

    /// Drop a domain with its mappings and its IOAS.
    pub(super) fn destroy_domain(&mut self, domain: u32, sink: &mut impl ChangeSink) {
        let Some(d) = self.domains.remove(&domain) else {
            return;
        };
        if let Some(ioas) = d.ioas {
            if let Err(e) = self.iommufd.unmap(ioas, 0, u64::MAX) {
                log::warn!("domain {domain}: unmapping its IOAS failed: {e}");
            }
            if let Err(e) = self.iommufd.ioas_destroy(ioas) {
                log::warn!("domain {domain}: destroying its IOAS failed: {e}");
            }
        }
        if d.mapping_count() > 0 {
            sink.change(Change::Unmap(Unmap::all(domain)));
        }
    }

    /// DETACH (virtio 1.3 §5.13.6.4): reserved bytes are ignored (the
    /// device MUST ignore them, unlike ATTACH's); unknown endpoint or domain
    /// → NOENT; endpoint not in that domain → INVAL.
    pub(super) fn detach(
        &mut self,
        domain: u32,
        endpoint: u32,
        sink: &mut impl ChangeSink,
    ) -> Status {
        let Some(&ep) = self.endpoints.get(&endpoint) else {
            return Status::NoEnt;
        };
        if !self.domains.contains_key(&domain) {
            return Status::NoEnt;
        }
        if ep.domain != Some(domain) {
            return Status::Inval;
        }
        if let Err(e) = self.place(ep.dev, self.parking()) {
            return status_of(&e);
        }
        if let Some(e) = self.endpoints.get_mut(&endpoint) {
            e.domain = None;
        }
        sink.change(Change::Detach { endpoint, domain });
        self.leave(domain, sink);
        Status::Ok
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::field_reassign_with_default)]
    use super::*;
    use crate::device::test_support::{
        device, device_with, identity_device, run, RAM, RAM_AT_0, READ, USER_BASE,
    };
    use crate::wire::{map_flags, req_type, ReqAttach, ReqDetach};
    use crate::{DeviceConfig, Discard, Translation};
    use iopt::model::{MockDevice, ModelIommufd};
    use iopt::Prot;
    use vm_memory::ByteValued;

    #[test]
    fn attach_creates_the_domain_and_its_ioas() {
        let mut d = device();
        let mut r = run(&mut d);
        assert_eq!(r.attach(1, 8, 0), Status::Ok);
        assert_eq!(
            r.changes,
            vec![Change::Attach {
                endpoint: 8,
                domain: 1,
                bypass: false
            }]
        );
        let ioas = d.domain(1).unwrap().ioas.unwrap();
        assert_eq!(d.iommufd().attached_to(DeviceId(8)), Some(ioas));
    }

    #[test]
    fn attach_rejects_unknown_endpoints_bad_flags_reserved_bytes_and_out_of_range_domains() {
        let mut d = device_with(DeviceConfig {
            domain_range: (1, 10),
            ..Default::default()
        });
        let mut r = run(&mut d);
        assert_eq!(r.attach(1, 9, 0), Status::NoEnt);
        assert_eq!(r.attach(1, 8, 2), Status::Inval);
        assert_eq!(r.attach(11, 8, 0), Status::Range);
        let mut raw = ReqAttach::default();
        raw.head.req_type = req_type::ATTACH;
        raw.domain = 1.into();
        raw.endpoint = 8.into();
        raw.reserved[0] = 1;
        assert_eq!(r.send(raw.as_slice()), Status::Inval);
        assert!(r.changes.is_empty());
    }

    #[test]
    fn attaching_elsewhere_moves_the_endpoint_and_the_old_domain_dies() {
        let mut d = device();
        let mut r = run(&mut d);
        assert_eq!(r.attach(1, 8, 0), Status::Ok);
        assert_eq!(r.map(1, 0x1000, 0x1fff, 0x1000, READ), Status::Ok);
        assert_eq!(r.attach(2, 8, 0), Status::Ok);
        assert!(r.changes.contains(&Change::Detach {
            endpoint: 8,
            domain: 1
        }));
        assert!(r.changes.contains(&Change::Unmap(Unmap::all(1))));
        assert!(d.domain(1).is_none());
        assert_eq!(d.domain_of(8), Some(2));
    }

    #[test]
    fn a_domain_lives_while_any_endpoint_is_attached() {
        let mut d = device();
        let mut r = run(&mut d);
        assert_eq!(r.attach(1, 8, 0), Status::Ok);
        assert_eq!(r.attach(1, 16, 0), Status::Ok);
        assert_eq!(r.detach(1, 8), Status::Ok);
        assert!(r.d.domain(1).is_some());
        assert_eq!(r.detach(1, 16), Status::Ok);
        assert!(d.domain(1).is_none());
    }

    #[test]
    fn detach_checks_domain_and_membership() {
        let mut d = device();
        let mut r = run(&mut d);
        assert_eq!(r.detach(1, 8), Status::NoEnt);
        assert_eq!(r.attach(1, 8, 0), Status::Ok);
        assert_eq!(r.attach(2, 16, 0), Status::Ok);
        assert_eq!(r.detach(2, 8), Status::Inval);
        assert_eq!(r.detach(1, 99), Status::NoEnt);
        // Reserved bytes are ignored (virtio 1.3 §5.13.6.4.2).
        let mut req = ReqDetach::default();
        req.head.req_type = req_type::DETACH;
        req.domain = 1.into();
        req.endpoint = 8.into();
        req.reserved = [0xff; 8];
        assert_eq!(r.send(req.as_slice()), Status::Ok);
    }

    #[test]
    fn bypass_domains_need_the_feature_and_take_no_mappings() {
        let mut d = device();
        d.set_acked_features(d.features() & !(1 << feature::BYPASS_CONFIG));
        let mut r = run(&mut d);
        assert_eq!(r.attach(1, 8, ATTACH_F_BYPASS), Status::Inval);
        r.d.set_acked_features(u64::MAX);
        assert_eq!(r.attach(1, 8, ATTACH_F_BYPASS), Status::Ok);
        assert_eq!(
            r.attach(1, 16, 0),
            Status::Inval,
            "a bypass domain cannot become translated"
        );
        assert_eq!(r.map(1, 0x1000, 0x1fff, 0, READ), Status::Inval);
        assert_eq!(r.unmap(1, 0x1000, 0x1fff), Status::Inval);
        assert_eq!(d.translate(8, 0x1234, true), Translation::Bypass);
    }

    #[test]
    fn with_an_identity_ioas_bypassing_endpoints_reach_all_of_guest_ram_one_to_one() {
        let mut d = identity_device(true);
        let identity = d
            .iommufd()
            .attached_to(DeviceId(8))
            .expect("parked at power-on");
        assert_eq!(d.iommufd().attached_to(DeviceId(16)), Some(identity));
        d.set_memory(&RAM_AT_0);
        let area = *d.iommufd().iopt(identity).unwrap().area_at(0x1234).unwrap();
        assert_eq!(
            (area.iova, area.last, area.user_va),
            (0, RAM - 1, USER_BASE)
        );
        assert_eq!(area.prot, Prot::RW);

        // A translated domain takes the device out; DETACH parks it again.
        let mut r = run(&mut d);
        r.attach(1, 8, 0);
        let ioas = d.domain(1).unwrap().ioas.unwrap();
        assert_eq!(d.iommufd().attached_to(DeviceId(8)), Some(ioas));
        let mut r = run(&mut d);
        assert_eq!(r.detach(1, 8), Status::Ok);
        assert_eq!(d.iommufd().attached_to(DeviceId(8)), Some(identity));

        // A bypass domain is the identity IOAS too.
        let mut r = run(&mut d);
        assert_eq!(r.attach(2, 16, ATTACH_F_BYPASS), Status::Ok);
        assert_eq!(d.iommufd().attached_to(DeviceId(16)), Some(identity));
    }

    #[test]
    fn endpoints_added_later_bypass_or_block_and_removal_takes_them_out_of_their_domain() {
        let mut model = ModelIommufd::new();
        for dev in [1, 2] {
            model.add_device(DeviceId(dev), MockDevice::x86()).unwrap();
        }
        let cfg = DeviceConfig {
            bypass: true,
            identity_ioas: true,
            ..DeviceConfig::default()
        };
        // No endpoint yet: no IOAS is allocated (the iommufd may not exist).
        let mut d = Device::new(cfg, model, []).unwrap();
        d.set_acked_features(u64::MAX);
        assert_eq!(d.iommufd().ioas_count(), 0);

        d.add_endpoint(0x18, DeviceId(1), &RAM_AT_0).unwrap();
        let identity = d.iommufd().attached_to(DeviceId(1)).expect("bypassing");
        let area = *d.iommufd().iopt(identity).unwrap().area_at(0).unwrap();
        assert_eq!((area.iova, area.user_va), (0, USER_BASE));
        assert_eq!(
            d.add_endpoint(0x18, DeviceId(2), &RAM_AT_0),
            Err(ConfigError::DuplicateEndpoint(0x18))
        );

        let mut r = run(&mut d);
        assert_eq!(r.attach(3, 0x18, 0), Status::Ok);
        assert_eq!(
            r.map(3, 0x1000, 0x1fff, 0x4000, map_flags::READ),
            Status::Ok
        );
        let mut changes = Vec::new();
        assert_eq!(d.remove_endpoint(0x18, &mut changes), Some(DeviceId(1)));
        assert_eq!(d.iommufd().attached_to(DeviceId(1)), None, "blocked");
        assert!(d.domain(3).is_none(), "its last endpoint left");
        assert!(matches!(
            changes[0],
            Change::Detach {
                endpoint: 0x18,
                domain: 3
            }
        ));
        assert_eq!(d.remove_endpoint(0x18, &mut changes), None);
        assert_eq!(d.iommufd().ioas_count(), 0, "the identity IOAS went too");
        assert_eq!(d.endpoint_ids().count(), 0);
        let mut r = run(&mut d);
        assert_eq!(r.attach(3, 0x18, 0), Status::NoEnt);
    }

    #[test]
    fn with_bypass_off_unattached_devices_are_blocked_and_the_config_write_moves_them() {
        let mut d = identity_device(false);
        d.set_memory(&RAM_AT_0);
        assert_eq!(d.iommufd().attached_to(DeviceId(8)), None);
        d.write_config(36, &[1], &mut Discard).unwrap();
        assert!(d.iommufd().attached_to(DeviceId(8)).is_some());
        d.write_config(36, &[0], &mut Discard).unwrap();
        assert_eq!(d.iommufd().attached_to(DeviceId(8)), None);
        // Reset returns to the boot value: blocked.
        d.write_config(36, &[1], &mut Discard).unwrap();
        d.reset(&mut Discard);
        assert_eq!(d.iommufd().attached_to(DeviceId(8)), None);
    }
}
