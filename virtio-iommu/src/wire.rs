// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The virtio-iommu wire format (virtio 1.2 §5.13): every structure the
//! driver and the device exchange, little-endian, with its exact size.

use vm_memory::{ByteValued, Le16, Le32, Le64};

/// Virtio device ID of the IOMMU device (virtio 1.2 §5).
pub const VIRTIO_ID_IOMMU: u32 = 23;

/// Feature bits (virtio 1.2 §5.13.3).
pub mod feature {
    pub const INPUT_RANGE: u32 = 0;
    pub const DOMAIN_RANGE: u32 = 1;
    pub const MAP_UNMAP: u32 = 2;
    /// Legacy global bypass; superseded by BYPASS_CONFIG, never offered.
    pub const BYPASS: u32 = 3;
    pub const PROBE: u32 = 4;
    pub const MMIO: u32 = 5;
    pub const BYPASS_CONFIG: u32 = 6;
}

/// Request types (virtio 1.2 §5.13.6).
pub mod req_type {
    pub const ATTACH: u8 = 1;
    pub const DETACH: u8 = 2;
    pub const MAP: u8 = 3;
    pub const UNMAP: u8 = 4;
    pub const PROBE: u8 = 5;
}

/// `ATTACH` flags (virtio 1.2 §5.13.6.3).
pub const ATTACH_F_BYPASS: u32 = 1;

/// `MAP` flags (virtio 1.2 §5.13.6.5).
pub mod map_flags {
    pub const READ: u32 = 1;
    pub const WRITE: u32 = 2;
    pub const MMIO: u32 = 4;
    pub const MASK: u32 = READ | WRITE | MMIO;
}

/// PROBE property types (virtio 1.2 §5.13.6.8).
pub mod probe {
    pub const T_NONE: u16 = 0;
    pub const T_RESV_MEM: u16 = 1;
    pub const RESV_MEM_T_RESERVED: u8 = 0;
    pub const RESV_MEM_T_MSI: u8 = 1;
}

/// Fault reasons and flags (virtio 1.2 §5.13.6.9).
pub mod fault {
    pub const R_UNKNOWN: u8 = 0;
    pub const R_DOMAIN: u8 = 1;
    pub const R_MAPPING: u8 = 2;
    pub const F_READ: u32 = 1;
    pub const F_WRITE: u32 = 2;
    pub const F_EXEC: u32 = 4;
    pub const F_ADDRESS: u32 = 0x100;
}

/// Request status, written in the tail (virtio 1.2 §5.13.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    IoErr = 1,
    Unsupp = 2,
    DevErr = 3,
    Inval = 4,
    Range = 5,
    NoEnt = 6,
    Fault = 7,
    NoMem = 8,
}

/// `struct virtio_iommu_config` (virtio 1.2 §5.13.4), 40 bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct ConfigSpace {
    pub page_size_mask: Le64,
    pub input_start: Le64,
    pub input_end: Le64,
    pub domain_start: Le32,
    pub domain_end: Le32,
    pub probe_size: Le32,
    pub bypass: u8,
    pub reserved: [u8; 3],
}

/// `struct virtio_iommu_req_head`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct ReqHead {
    pub req_type: u8,
    pub reserved: [u8; 3],
}

/// `struct virtio_iommu_req_tail`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct ReqTail {
    pub status: u8,
    pub reserved: [u8; 3],
}

/// The device-readable part of `struct virtio_iommu_req_attach`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct ReqAttach {
    pub head: ReqHead,
    pub domain: Le32,
    pub endpoint: Le32,
    pub flags: Le32,
    pub reserved: [u8; 4],
}

/// The device-readable part of `struct virtio_iommu_req_detach`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct ReqDetach {
    pub head: ReqHead,
    pub domain: Le32,
    pub endpoint: Le32,
    pub reserved: [u8; 8],
}

/// The device-readable part of `struct virtio_iommu_req_map`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, packed)]
pub struct ReqMap {
    pub head: ReqHead,
    pub domain: Le32,
    pub virt_start: Le64,
    pub virt_end: Le64,
    pub phys_start: Le64,
    pub flags: Le32,
}

/// The device-readable part of `struct virtio_iommu_req_unmap`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, packed)]
pub struct ReqUnmap {
    pub head: ReqHead,
    pub domain: Le32,
    pub virt_start: Le64,
    pub virt_end: Le64,
    pub reserved: [u8; 4],
}

/// The device-readable part of `struct virtio_iommu_req_probe`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct ReqProbe {
    pub head: ReqHead,
    pub endpoint: Le32,
    pub reserved: [u8; 64],
}

impl Default for ReqProbe {
    fn default() -> Self {
        Self {
            head: ReqHead::default(),
            endpoint: Le32::default(),
            reserved: [0; 64],
        }
    }
}

/// `struct virtio_iommu_probe_property` header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct ProbeProperty {
    pub prop_type: Le16,
    pub length: Le16,
}

/// `struct virtio_iommu_probe_resv_mem`, header included (24 bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, packed)]
pub struct ProbeResvMem {
    pub head: ProbeProperty,
    pub subtype: u8,
    pub reserved: [u8; 3],
    pub start: Le64,
    pub end: Le64,
}

/// `struct virtio_iommu_fault` (24 bytes), written to the event queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct FaultEvent {
    pub reason: u8,
    pub reserved: [u8; 3],
    pub flags: Le32,
    pub endpoint: Le32,
    pub reserved2: [u8; 4],
    pub address: Le64,
}

// SAFETY (all impls below): each type is `repr(C)` or `repr(C, packed)`,
// made only of integers and byte arrays, with no padding (the size tests
// below pin that), so every byte pattern is a valid value.
// SAFETY: see above.
unsafe impl ByteValued for ConfigSpace {}
// SAFETY: see above.
unsafe impl ByteValued for ReqHead {}
// SAFETY: see above.
unsafe impl ByteValued for ReqTail {}
// SAFETY: see above.
unsafe impl ByteValued for ReqAttach {}
// SAFETY: see above.
unsafe impl ByteValued for ReqDetach {}
// SAFETY: see above.
unsafe impl ByteValued for ReqMap {}
// SAFETY: see above.
unsafe impl ByteValued for ReqUnmap {}
// SAFETY: see above.
unsafe impl ByteValued for ReqProbe {}
// SAFETY: see above.
unsafe impl ByteValued for ProbeProperty {}
// SAFETY: see above.
unsafe impl ByteValued for ProbeResvMem {}
// SAFETY: see above.
unsafe impl ByteValued for FaultEvent {}

#[cfg(test)]
mod tests {
    #![allow(clippy::field_reassign_with_default)]
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn sizes_match_the_spec() {
        assert_eq!(size_of::<ConfigSpace>(), 40);
        assert_eq!(size_of::<ReqHead>(), 4);
        assert_eq!(size_of::<ReqTail>(), 4);
        assert_eq!(size_of::<ReqAttach>(), 20);
        assert_eq!(size_of::<ReqDetach>(), 20);
        assert_eq!(size_of::<ReqMap>(), 36);
        assert_eq!(size_of::<ReqUnmap>(), 28);
        assert_eq!(size_of::<ReqProbe>(), 72);
        assert_eq!(size_of::<ProbeProperty>(), 4);
        assert_eq!(size_of::<ProbeResvMem>(), 24);
        assert_eq!(size_of::<FaultEvent>(), 24);
    }

    #[test]
    fn config_offsets_match_the_spec() {
        assert_eq!(offset_of!(ConfigSpace, page_size_mask), 0);
        assert_eq!(offset_of!(ConfigSpace, input_start), 8);
        assert_eq!(offset_of!(ConfigSpace, input_end), 16);
        assert_eq!(offset_of!(ConfigSpace, domain_start), 24);
        assert_eq!(offset_of!(ConfigSpace, domain_end), 28);
        assert_eq!(offset_of!(ConfigSpace, probe_size), 32);
        assert_eq!(offset_of!(ConfigSpace, bypass), 36);
    }

    #[test]
    fn request_offsets_match_the_spec() {
        assert_eq!(offset_of!(ReqAttach, domain), 4);
        assert_eq!(offset_of!(ReqAttach, endpoint), 8);
        assert_eq!(offset_of!(ReqAttach, flags), 12);
        assert_eq!(offset_of!(ReqAttach, reserved), 16);
        assert_eq!(offset_of!(ReqDetach, endpoint), 8);
        assert_eq!(offset_of!(ReqDetach, reserved), 12);
        assert_eq!(offset_of!(ReqMap, domain), 4);
        assert_eq!(offset_of!(ReqMap, virt_start), 8);
        assert_eq!(offset_of!(ReqMap, virt_end), 16);
        assert_eq!(offset_of!(ReqMap, phys_start), 24);
        assert_eq!(offset_of!(ReqMap, flags), 32);
        assert_eq!(offset_of!(ReqUnmap, virt_start), 8);
        assert_eq!(offset_of!(ReqUnmap, virt_end), 16);
        assert_eq!(offset_of!(ReqUnmap, reserved), 24);
        assert_eq!(offset_of!(ReqProbe, endpoint), 4);
        assert_eq!(offset_of!(ReqProbe, reserved), 8);
    }

    #[test]
    fn property_and_fault_offsets_match_the_spec() {
        assert_eq!(offset_of!(ProbeProperty, length), 2);
        assert_eq!(offset_of!(ProbeResvMem, subtype), 4);
        assert_eq!(offset_of!(ProbeResvMem, start), 8);
        assert_eq!(offset_of!(ProbeResvMem, end), 16);
        assert_eq!(offset_of!(FaultEvent, flags), 4);
        assert_eq!(offset_of!(FaultEvent, endpoint), 8);
        assert_eq!(offset_of!(FaultEvent, address), 16);
    }

    #[test]
    fn fields_are_little_endian() {
        let mut m = ReqMap::default();
        m.virt_start = 0x0102_0304_0506_0708u64.into();
        assert_eq!(&m.as_slice()[8..16], &[8, 7, 6, 5, 4, 3, 2, 1]);
    }
}
