//! The iommufd and VFIO-cdev uAPI structures and ioctl numbers of Linux 6.12
//! (`include/uapi/linux/iommufd.h`, `include/uapi/linux/vfio.h`).
//!
//! Every structure starts with its own size (`size` / `argsz`): the kernel
//! accepts any size from the first release of the structure onwards and
//! checks that bytes it does not know are zero, so these 6.12 layouts keep
//! working on newer kernels. Tests below pin each size and field offset.

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

pub const IOMMU_IOAS_MAP_FIXED_IOVA: u32 = 1 << 0;
pub const IOMMU_IOAS_MAP_WRITEABLE: u32 = 1 << 1;
pub const IOMMU_IOAS_MAP_READABLE: u32 = 1 << 2;

pub const IOMMU_OPTION_RLIMIT_MODE: u32 = 0;
pub const IOMMU_OPTION_HUGE_PAGES: u32 = 1;
pub const IOMMU_OPTION_OP_SET: u16 = 0;
pub const IOMMU_OPTION_OP_GET: u16 = 1;

/// The size of a uAPI structure as its `size`/`argsz` field wants it.
pub fn size_of<T>() -> u32 {
    // The structures here are a few dozen bytes: the cast cannot truncate.
    std::mem::size_of::<T>() as u32
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct iommu_destroy {
    pub size: u32,
    pub id: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct iommu_ioas_alloc {
    pub size: u32,
    pub flags: u32,
    pub out_ioas_id: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct iommu_iova_range {
    pub start: u64,
    pub last: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct iommu_ioas_iova_ranges {
    pub size: u32,
    pub ioas_id: u32,
    pub num_iovas: u32,
    pub __reserved: u32,
    pub allowed_iovas: u64,
    pub out_iova_alignment: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct iommu_ioas_allow_iovas {
    pub size: u32,
    pub ioas_id: u32,
    pub num_iovas: u32,
    pub __reserved: u32,
    pub allowed_iovas: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct iommu_ioas_map {
    pub size: u32,
    pub flags: u32,
    pub ioas_id: u32,
    pub __reserved: u32,
    pub user_va: u64,
    pub length: u64,
    pub iova: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct iommu_ioas_copy {
    pub size: u32,
    pub flags: u32,
    pub dst_ioas_id: u32,
    pub src_ioas_id: u32,
    pub length: u64,
    pub dst_iova: u64,
    pub src_iova: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct iommu_ioas_unmap {
    pub size: u32,
    pub ioas_id: u32,
    pub iova: u64,
    pub length: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct iommu_option {
    pub size: u32,
    pub option_id: u32,
    pub op: u16,
    pub __reserved: u16,
    pub object_id: u32,
    pub val64: u64,
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
    fn iommufd_struct_layouts_match_the_uapi() {
        assert_eq!(size_of::<iommu_destroy>(), 8);
        assert_eq!(size_of::<iommu_ioas_alloc>(), 12);
        assert_eq!(offset_of!(iommu_ioas_alloc, out_ioas_id), 8);
        assert_eq!(size_of::<iommu_iova_range>(), 16);
        assert_eq!(size_of::<iommu_ioas_iova_ranges>(), 32);
        assert_eq!(offset_of!(iommu_ioas_iova_ranges, allowed_iovas), 16);
        assert_eq!(offset_of!(iommu_ioas_iova_ranges, out_iova_alignment), 24);
        assert_eq!(size_of::<iommu_ioas_allow_iovas>(), 24);
        assert_eq!(offset_of!(iommu_ioas_allow_iovas, allowed_iovas), 16);
        assert_eq!(size_of::<iommu_ioas_map>(), 40);
        assert_eq!(offset_of!(iommu_ioas_map, user_va), 16);
        assert_eq!(offset_of!(iommu_ioas_map, length), 24);
        assert_eq!(offset_of!(iommu_ioas_map, iova), 32);
        assert_eq!(size_of::<iommu_ioas_copy>(), 40);
        assert_eq!(offset_of!(iommu_ioas_copy, src_ioas_id), 12);
        assert_eq!(offset_of!(iommu_ioas_copy, length), 16);
        assert_eq!(offset_of!(iommu_ioas_copy, dst_iova), 24);
        assert_eq!(offset_of!(iommu_ioas_copy, src_iova), 32);
        assert_eq!(size_of::<iommu_ioas_unmap>(), 24);
        assert_eq!(offset_of!(iommu_ioas_unmap, iova), 8);
        assert_eq!(offset_of!(iommu_ioas_unmap, length), 16);
        assert_eq!(size_of::<iommu_option>(), 24);
        assert_eq!(offset_of!(iommu_option, op), 8);
        assert_eq!(offset_of!(iommu_option, object_id), 12);
        assert_eq!(offset_of!(iommu_option, val64), 16);
    }

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
