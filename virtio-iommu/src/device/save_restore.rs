// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The whole state out and back in: as changes, for a mirror that just
//! connected ([`Device::replay`]); as the migration state
//! ([`Device::save_state`], docs/device-state.md); and restored from one,
//! through the rules a request gets ([`Device::restore_state`]).

use iopt::Iommufd;

use super::map::MissingRam;
use super::{Device, GuestRam};
use crate::change::{Change, ChangeSink};
use crate::domain::Domain;
use crate::state::DeviceState;
use crate::wire::{Status, ATTACH_F_BYPASS};

/// A migrated state the device refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("state entry {index} refused with status {status:?}")]
pub struct RestoreError {
    pub index: usize,
    pub status: Status,
}

impl<F: Iommufd> Device<F> {
    /// The whole state as changes, for a mirror that just connected:
    /// `GlobalBypass`, then each attachment, then each domain's mappings.
    pub fn replay(&self, sink: &mut impl ChangeSink) {
        sink.change(Change::GlobalBypass(self.bypass));
        for (&endpoint, ep) in &self.endpoints {
            if let Some(domain) = ep.domain {
                let bypass = self.domains.get(&domain).is_some_and(Domain::is_bypass);
                sink.change(Change::Attach {
                    endpoint,
                    domain,
                    bypass,
                });
            }
        }
        for d in self.domains.values() {
            for m in d.mappings() {
                sink.change(Change::Map(m.map));
            }
        }
    }

    /// The state to migrate (docs/device-state.md): features, `bypass`,
    /// attachments and mappings, by guest-physical address.
    pub fn save_state(&self) -> DeviceState {
        let mut entries = Vec::new();
        self.replay(&mut entries);
        entries.retain(|c| !matches!(c, Change::GlobalBypass(_)));
        DeviceState {
            acked_features: self.acked,
            bypass: self.bypass,
            entries,
        }
    }

    /// Become the device `state` describes, from a reset: each attachment
    /// and mapping goes through the checks a request gets (the stream is as
    /// untrusted as the guest). A mapping of guest memory this process does
    /// not have yet (`ram` before the front-end's memory table) is recorded
    /// and enters the IOAS with [`Self::set_memory`]. On the first refused
    /// entry the device is reset again and the entry's index and status
    /// are returned.
    pub fn restore_state(
        &mut self,
        state: &DeviceState,
        ram: &impl GuestRam,
        sink: &mut impl ChangeSink,
    ) -> Result<(), RestoreError> {
        self.reset(sink);
        self.set_acked_features(state.acked_features);
        if state.bypass != self.bypass {
            self.bypass = state.bypass;
            sink.change(Change::GlobalBypass(self.bypass));
            let _ = self.park_unattached();
        }
        for (index, entry) in state.entries.iter().enumerate() {
            let status = match *entry {
                Change::Attach {
                    endpoint,
                    domain,
                    bypass,
                } => {
                    let flags = if bypass { ATTACH_F_BYPASS } else { 0 };
                    self.attach(domain, endpoint, flags, true, sink)
                }
                Change::Map(m) => self.map(m, ram, MissingRam::Defer, sink),
                _ => Status::Inval,
            };
            if status != Status::Ok {
                self.reset(sink);
                return Err(RestoreError { index, status });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::test_support::{device, run, RAM_AT_0, READ, RW, USER_BASE};
    use crate::map_unmap::Map;
    use crate::{Discard, NoRam, Translation};
    use iopt::DeviceId;

    #[test]
    fn a_saved_state_restores_into_a_fresh_device_and_maps_once_ram_arrives() {
        let mut src = device();
        let mut r = run(&mut src);
        assert_eq!(r.attach(1, 8, 0), Status::Ok);
        assert_eq!(r.attach(2, 16, ATTACH_F_BYPASS), Status::Ok);
        assert_eq!(r.map(1, 0x1000, 0x2fff, 0x3000, RW), Status::Ok);
        assert_eq!(r.map(1, 0x10_0000, 0x10_0fff, 0x8000, READ), Status::Ok);
        src.write_config(36, &[1], &mut Discard).unwrap();
        let bytes = src.save_state().encode();

        // The destination: same endpoints, no guest memory yet.
        let mut dst = device();
        dst.set_acked_features(0);
        let state = DeviceState::decode(&bytes).unwrap();
        let mut changes = Vec::new();
        dst.restore_state(&state, &NoRam, &mut changes).unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        src.replay(&mut a);
        dst.replay(&mut b);
        assert_eq!(a, b, "the driver's view is the same");
        assert_eq!(dst.features(), src.features());
        assert!(changes.contains(&Change::Map(Map {
            domain: 1,
            virt_start: 0x1000,
            virt_end: 0x2fff,
            phys_start: 0x3000,
            flags: RW
        })));
        let ioas = dst.domain(1).unwrap().ioas.unwrap();
        assert!(dst.iommufd().iopt(ioas).unwrap().area_at(0x1000).is_none());
        // Guest memory arrives (SET_MEM_TABLE): the mappings enter the IOAS.
        dst.set_memory(&RAM_AT_0);
        let area = *dst.iommufd().iopt(ioas).unwrap().area_at(0x1000).unwrap();
        assert_eq!(area.user_va, USER_BASE + 0x3000);
        assert!(matches!(
            dst.translate(8, 0x1234, true),
            Translation::Mapped { gpa: 0x3234, .. }
        ));
        assert_eq!(dst.translate(16, 0x1234, true), Translation::Bypass);
    }

    #[test]
    fn a_state_that_breaks_the_rules_is_refused_and_leaves_a_reset_device() {
        let mut d = device();
        let mut changes = Vec::new();
        let bad = DeviceState {
            acked_features: u64::MAX,
            bypass: false,
            entries: vec![
                Change::Attach {
                    endpoint: 8,
                    domain: 1,
                    bypass: false,
                },
                Change::Map(Map {
                    domain: 1,
                    virt_start: 0x1000,
                    virt_end: 0x1fff,
                    phys_start: 0,
                    flags: READ,
                }),
                // Overlaps the mapping before it.
                Change::Map(Map {
                    domain: 1,
                    virt_start: 0x1000,
                    virt_end: 0x1fff,
                    phys_start: 0x5000,
                    flags: READ,
                }),
            ],
        };
        let e = d.restore_state(&bad, &RAM_AT_0, &mut changes).unwrap_err();
        assert_eq!((e.index, e.status), (2, Status::Inval));
        assert_eq!(d.stats().domains, 0);
        assert_eq!(d.iommufd().attached_to(DeviceId(8)), None);
        let unknown = DeviceState {
            entries: vec![Change::Attach {
                endpoint: 99,
                domain: 1,
                bypass: false,
            }],
            ..bad
        };
        let e = d
            .restore_state(&unknown, &RAM_AT_0, &mut changes)
            .unwrap_err();
        assert_eq!((e.index, e.status), (0, Status::NoEnt));
    }

    #[test]
    fn replay_describes_the_state_and_reset_clears_it() {
        let mut d = device();
        let mut r = run(&mut d);
        r.attach(1, 8, 0);
        r.attach(2, 16, ATTACH_F_BYPASS);
        r.map(1, 0x1000, 0x1fff, 0x3000, RW);
        let made = r.changes.clone();
        let mut replay = vec![];
        d.replay(&mut replay);
        assert_eq!(replay[0], Change::GlobalBypass(false));
        for c in &made {
            assert!(replay.contains(c), "{c:?} missing from the replay");
        }
        let mut changes = vec![];
        d.reset(&mut changes);
        assert_eq!(changes, vec![Change::Reset, Change::GlobalBypass(false)]);
        assert_eq!(d.stats().domains, 0);
        assert_eq!(d.iommufd().attached_to(DeviceId(8)), None);
    }
}
