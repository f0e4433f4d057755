// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Where an endpoint's access goes (what QEMU's translate() does with the
//! mirrored state), and the fault event when it goes nowhere.

use iopt::Iommufd;

use super::Device;
use crate::wire::{fault, map_flags, FaultEvent};

/// Where an access by an endpoint goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Translation {
    /// To `gpa`; `len` bytes from there are contiguous in the mapping.
    Mapped { gpa: u64, len: u64, flags: u32 },
    /// Untranslated (bypass domain, or global bypass of an unattached
    /// endpoint).
    Bypass,
    /// Refused; `reason` is a `VIRTIO_IOMMU_FAULT_R_*`.
    Fault { reason: u8 },
}

impl std::fmt::Display for Translation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Translation::Mapped { gpa, len, flags } => {
                write!(
                    f,
                    "gpa {gpa:#x} ({len:#x} contiguous bytes, flags {flags:#x})"
                )
            }
            Translation::Bypass => write!(f, "bypass (untranslated)"),
            Translation::Fault { reason } => {
                let why = match reason {
                    fault::R_DOMAIN => "DOMAIN",
                    fault::R_MAPPING => "MAPPING",
                    _ => "UNKNOWN",
                };
                write!(f, "fault, reason {why}")
            }
        }
    }
}

impl<F: Iommufd> Device<F> {
    /// Where an access by `endpoint` to `iova` goes (what QEMU's translate()
    /// does with the mirrored state; virtio 1.2 §5.13.6.9 for the fault
    /// reasons): an unattached endpoint bypasses if `bypass` is set, else
    /// faults with DOMAIN; no mapping or a missing permission faults with
    /// MAPPING.
    pub fn translate(&self, endpoint: u32, iova: u64, write: bool) -> Translation {
        let Some(ep) = self.endpoints.get(&endpoint) else {
            return Translation::Fault {
                reason: fault::R_UNKNOWN,
            };
        };
        let Some(d) = ep.domain.and_then(|id| self.domains.get(&id)) else {
            return if self.bypass {
                Translation::Bypass
            } else {
                Translation::Fault {
                    reason: fault::R_DOMAIN,
                }
            };
        };
        if d.is_bypass() {
            return Translation::Bypass;
        }
        let need = if write {
            map_flags::WRITE
        } else {
            map_flags::READ
        };
        match d.lookup(iova) {
            Some(m) if m.map.flags & need != 0 => Translation::Mapped {
                gpa: m.map.phys_start + (iova - m.map.virt_start),
                len: m.map.virt_end - iova + 1,
                flags: m.map.flags,
            },
            _ => Translation::Fault {
                reason: fault::R_MAPPING,
            },
        }
    }
}

/// A fault event for the event queue (virtio 1.2 §5.13.6.9): `flags` are
/// READ/WRITE/EXEC; the address is always given (F_ADDRESS).
pub fn encode_fault(reason: u8, flags: u32, endpoint: u32, address: u64) -> FaultEvent {
    FaultEvent {
        reason,
        reserved: [0; 3],
        flags: ((flags & (fault::F_READ | fault::F_WRITE | fault::F_EXEC)) | fault::F_ADDRESS)
            .into(),
        endpoint: endpoint.into(),
        reserved2: [0; 4],
        address: address.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::test_support::{device, run, READ};
    use crate::Discard;

    #[test]
    fn translate_follows_mappings_permissions_and_global_bypass() {
        let mut d = device();
        assert_eq!(
            d.translate(8, 0x1000, false),
            Translation::Fault {
                reason: fault::R_DOMAIN
            }
        );
        d.write_config(36, &[1], &mut Discard).unwrap();
        assert_eq!(d.translate(8, 0x1000, false), Translation::Bypass);
        let mut r = run(&mut d);
        r.attach(1, 8, 0);
        r.map(1, 0x1000, 0x2fff, 0x8000, READ);
        assert_eq!(
            d.translate(8, 0x1800, false),
            Translation::Mapped {
                gpa: 0x8800,
                len: 0x1800,
                flags: READ
            }
        );
        assert_eq!(
            d.translate(8, 0x1800, true),
            Translation::Fault {
                reason: fault::R_MAPPING
            }
        );
        assert_eq!(
            d.translate(8, 0x3000, false),
            Translation::Fault {
                reason: fault::R_MAPPING
            }
        );
        assert_eq!(
            d.translate(99, 0, false),
            Translation::Fault {
                reason: fault::R_UNKNOWN
            }
        );
    }
}
