// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The iommufd ioctl numbers and the VFIO-cdev uAPI structures of Linux 6.12
//! (`include/uapi/linux/iommufd.h`, `include/uapi/linux/vfio.h`); the
//! iommufd structures themselves are [`crate::uapi`]'s, shared with the
//! model.
//!
//! Every structure starts with its own size (`size` / `argsz`): the kernel
//! accepts any size from the first release of the structure onwards and
//! checks that bytes it does not know are zero, so these 6.12 layouts keep
//! working on newer kernels. Tests below pin each size and ioctl number.

#![allow(non_camel_case_types)]

use vmm_sys_util::ioctl_io_nr;

/// `IOMMUFD_TYPE` and `VFIO_TYPE` are both `';'`.
const IOMMUFD_TYPE: u32 = b';' as u32;
const IOMMUFD_CMD_BASE: u32 = 0x80;
const VFIO_TYPE: u32 = b';' as u32;
const VFIO_BASE: u32 = 100;

ioctl_io_nr!(IOMMU_DESTROY, IOMMUFD_TYPE, IOMMUFD_CMD_BASE);
ioctl_io_nr!(IOMMU_IOAS_ALLOC, IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 1);
ioctl_io_nr!(IOMMU_IOAS_ALLOW_IOVAS, IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 2);
ioctl_io_nr!(IOMMU_IOAS_COPY, IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 3);
ioctl_io_nr!(IOMMU_IOAS_IOVA_RANGES, IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 4);
ioctl_io_nr!(IOMMU_IOAS_MAP, IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 5);
ioctl_io_nr!(IOMMU_IOAS_UNMAP, IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 6);
ioctl_io_nr!(IOMMU_OPTION, IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 7);

ioctl_io_nr!(VFIO_DEVICE_BIND_IOMMUFD, VFIO_TYPE, VFIO_BASE + 18);
ioctl_io_nr!(VFIO_DEVICE_ATTACH_IOMMUFD_PT, VFIO_TYPE, VFIO_BASE + 19);
ioctl_io_nr!(VFIO_DEVICE_DETACH_IOMMUFD_PT, VFIO_TYPE, VFIO_BASE + 20);

pub use crate::uapi::{
    iommu_destroy, iommu_ioas_alloc, iommu_ioas_allow_iovas, iommu_ioas_copy,
    iommu_ioas_iova_ranges, iommu_ioas_map, iommu_ioas_unmap, iommu_iova_range, iommu_option,
    IOMMU_IOAS_MAP_FIXED_IOVA, IOMMU_IOAS_MAP_READABLE, IOMMU_IOAS_MAP_WRITEABLE,
    IOMMU_OPTION_HUGE_PAGES, IOMMU_OPTION_OP_GET, IOMMU_OPTION_OP_SET, IOMMU_OPTION_RLIMIT_MODE,
};

/// The size of a uAPI structure as its `size`/`argsz` field wants it.
pub fn size_of<T>() -> u32 {
    // The structures here are a few dozen bytes: the cast cannot truncate.
    std::mem::size_of::<T>() as u32
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct vfio_device_bind_iommufd {
    pub argsz: u32,
    pub flags: u32,
    pub iommufd: i32,
    pub out_devid: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct vfio_device_attach_iommufd_pt {
    pub argsz: u32,
    pub flags: u32,
    pub pt_id: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct vfio_device_detach_iommufd_pt {
    pub argsz: u32,
    pub flags: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn vfio_cdev_struct_layouts_match_the_6_12_uapi() {
        assert_eq!(size_of::<vfio_device_bind_iommufd>(), 16);
        assert_eq!(offset_of!(vfio_device_bind_iommufd, out_devid), 12);
        assert_eq!(size_of::<vfio_device_attach_iommufd_pt>(), 12);
        assert_eq!(size_of::<vfio_device_detach_iommufd_pt>(), 8);
    }

    #[test]
    fn ioctl_numbers_match_the_uapi() {
        // _IO(';', nr) = (';' << 8) | nr with no direction and no size.
        assert_eq!(IOMMU_DESTROY(), 0x3b80);
        assert_eq!(IOMMU_IOAS_ALLOC(), 0x3b81);
        assert_eq!(IOMMU_IOAS_ALLOW_IOVAS(), 0x3b82);
        assert_eq!(IOMMU_IOAS_COPY(), 0x3b83);
        assert_eq!(IOMMU_IOAS_IOVA_RANGES(), 0x3b84);
        assert_eq!(IOMMU_IOAS_MAP(), 0x3b85);
        assert_eq!(IOMMU_IOAS_UNMAP(), 0x3b86);
        assert_eq!(IOMMU_OPTION(), 0x3b87);
        assert_eq!(VFIO_DEVICE_BIND_IOMMUFD(), 0x3b76);
        assert_eq!(VFIO_DEVICE_ATTACH_IOMMUFD_PT(), 0x3b77);
        assert_eq!(VFIO_DEVICE_DETACH_IOMMUFD_PT(), 0x3b78);
    }
}
