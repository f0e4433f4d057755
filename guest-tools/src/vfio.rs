// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! VFIO type1 (linux/vfio.h): a container, a group, a device, DMA maps.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ptr, ioctl_with_ref, ioctl_with_val};
use vmm_sys_util::ioctl_io_nr;

const VFIO_TYPE: u32 = b';' as u32;
const VFIO_BASE: u32 = 100;
ioctl_io_nr!(VFIO_GET_API_VERSION, VFIO_TYPE, VFIO_BASE);
ioctl_io_nr!(VFIO_CHECK_EXTENSION, VFIO_TYPE, VFIO_BASE + 1);
ioctl_io_nr!(VFIO_SET_IOMMU, VFIO_TYPE, VFIO_BASE + 2);
ioctl_io_nr!(VFIO_GROUP_GET_STATUS, VFIO_TYPE, VFIO_BASE + 3);
ioctl_io_nr!(VFIO_GROUP_SET_CONTAINER, VFIO_TYPE, VFIO_BASE + 4);
ioctl_io_nr!(VFIO_GROUP_GET_DEVICE_FD, VFIO_TYPE, VFIO_BASE + 6);
ioctl_io_nr!(VFIO_DEVICE_GET_REGION_INFO, VFIO_TYPE, VFIO_BASE + 8);
ioctl_io_nr!(VFIO_IOMMU_MAP_DMA, VFIO_TYPE, VFIO_BASE + 13);
ioctl_io_nr!(VFIO_IOMMU_UNMAP_DMA, VFIO_TYPE, VFIO_BASE + 14);

const VFIO_API_VERSION: i32 = 0;
const VFIO_TYPE1V2_IOMMU: u64 = 3;
const GROUP_FLAGS_VIABLE: u32 = 1;
const DMA_MAP_READ: u32 = 1;
const DMA_MAP_WRITE: u32 = 2;
/// `VFIO_PCI_CONFIG_REGION_INDEX`.
pub const CONFIG_REGION: u32 = 7;

#[repr(C)]
#[derive(Default)]
struct GroupStatus {
    argsz: u32,
    flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct RegionInfo {
    argsz: u32,
    flags: u32,
    index: u32,
    cap_offset: u32,
    size: u64,
    offset: u64,
}

#[repr(C)]
#[derive(Default)]
struct DmaMap {
    argsz: u32,
    flags: u32,
    vaddr: u64,
    iova: u64,
    size: u64,
}

#[repr(C)]
#[derive(Default)]
struct DmaUnmap {
    argsz: u32,
    flags: u32,
    iova: u64,
    size: u64,
}

fn check(rc: i32, what: &str) -> io::Result<i32> {
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(rc)
}

fn open_rw(path: &str) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))
}

/// A VFIO type1 container holding one group, and one device of it.
#[derive(Debug)]
pub struct Type1 {
    container: File,
    _group: File,
    device: File,
}

impl Type1 {
    /// Open the PCI device `bdf` (e.g. `0000:00:03.0`), which must be bound
    /// to vfio-pci, through its IOMMU group.
    pub fn open(bdf: &str) -> io::Result<Self> {
        let group = std::fs::read_link(format!("/sys/bus/pci/devices/{bdf}/iommu_group"))?;
        let group = group
            .file_name()
            .and_then(|g| g.to_str())
            .ok_or_else(|| io::Error::other("bad iommu_group link"))?
            .to_string();
        let container = open_rw("/dev/vfio/vfio")?;
        // SAFETY: VFIO_GET_API_VERSION takes no argument.
        let v = unsafe { vmm_sys_util::ioctl::ioctl(&container, VFIO_GET_API_VERSION()) };
        if check(v, "VFIO_GET_API_VERSION")? != VFIO_API_VERSION {
            return Err(io::Error::other(format!("VFIO API version {v}")));
        }
        // SAFETY: VFIO_CHECK_EXTENSION takes an integer by value.
        let ext = unsafe { ioctl_with_val(&container, VFIO_CHECK_EXTENSION(), VFIO_TYPE1V2_IOMMU) };
        if check(ext, "VFIO_CHECK_EXTENSION")? != 1 {
            return Err(io::Error::other("no VFIO type1v2 IOMMU"));
        }
        let group_file = open_rw(&format!("/dev/vfio/{group}"))?;
        let mut status = GroupStatus {
            argsz: std::mem::size_of::<GroupStatus>() as u32,
            flags: 0,
        };
        check(
            // SAFETY: `status` is a live vfio_group_status with its argsz set.
            unsafe { ioctl_with_mut_ref(&group_file, VFIO_GROUP_GET_STATUS(), &mut status) },
            "VFIO_GROUP_GET_STATUS",
        )?;
        if status.flags & GROUP_FLAGS_VIABLE == 0 {
            return Err(io::Error::other(format!("group {group} is not viable")));
        }
        let cfd: i32 = container.as_raw_fd();
        check(
            // SAFETY: VFIO_GROUP_SET_CONTAINER reads one int, the container fd.
            unsafe { ioctl_with_ref(&group_file, VFIO_GROUP_SET_CONTAINER(), &cfd) },
            "VFIO_GROUP_SET_CONTAINER",
        )?;
        check(
            // SAFETY: VFIO_SET_IOMMU takes the IOMMU type by value.
            unsafe { ioctl_with_val(&container, VFIO_SET_IOMMU(), VFIO_TYPE1V2_IOMMU) },
            "VFIO_SET_IOMMU",
        )?;
        let name = CString::new(bdf).map_err(io::Error::other)?;
        let fd = check(
            // SAFETY: the argument is a NUL-terminated device name that outlives
            // the call; the kernel returns a new fd we then own.
            unsafe { ioctl_with_ptr(&group_file, VFIO_GROUP_GET_DEVICE_FD(), name.as_ptr()) },
            "VFIO_GROUP_GET_DEVICE_FD",
        )?;
        // SAFETY: `fd` is a fresh descriptor the kernel just gave us.
        let device = unsafe { File::from_raw_fd(fd) };
        Ok(Self {
            container,
            _group: group_file,
            device,
        })
    }

    /// The file offset of region `index` of the device.
    pub fn region_offset(&self, index: u32) -> io::Result<u64> {
        region_offset(&self.device, index)
    }

    /// The device file (regions are read and written at their offsets).
    pub fn device(&self) -> &File {
        &self.device
    }

    /// Turn on bus mastering in the PCI command register.
    pub fn enable_bus_master(&self) -> io::Result<()> {
        enable_bus_master(&self.device)
    }

    /// `VFIO_IOMMU_MAP_DMA`: map `len` bytes of this process at `vaddr` to
    /// `iova`, readable and (if `write`) writable by the device.
    pub fn map_dma(&self, vaddr: u64, iova: u64, len: u64, write: bool) -> io::Result<()> {
        let m = DmaMap {
            argsz: std::mem::size_of::<DmaMap>() as u32,
            flags: DMA_MAP_READ | if write { DMA_MAP_WRITE } else { 0 },
            vaddr,
            iova,
            size: len,
        };
        check(
            // SAFETY: `m` is a live vfio_iommu_type1_dma_map; the memory it names
            // is the caller's buffer, which outlives the mapping.
            unsafe { ioctl_with_ref(&self.container, VFIO_IOMMU_MAP_DMA(), &m) },
            "VFIO_IOMMU_MAP_DMA",
        )
        .map(|_| ())
    }

    /// `VFIO_IOMMU_UNMAP_DMA`.
    pub fn unmap_dma(&self, iova: u64, len: u64) -> io::Result<()> {
        let mut u = DmaUnmap {
            argsz: std::mem::size_of::<DmaUnmap>() as u32,
            flags: 0,
            iova,
            size: len,
        };
        check(
            // SAFETY: `u` is a live vfio_iommu_type1_dma_unmap with argsz set.
            unsafe { ioctl_with_mut_ref(&self.container, VFIO_IOMMU_UNMAP_DMA(), &mut u) },
            "VFIO_IOMMU_UNMAP_DMA",
        )
        .map(|_| ())
    }
}

/// The file offset of region `index` of an open VFIO device (group or cdev;
/// a cdev must be bound to an iommufd first).
pub fn region_offset(device: &File, index: u32) -> io::Result<u64> {
    let mut info = RegionInfo {
        argsz: std::mem::size_of::<RegionInfo>() as u32,
        index,
        ..Default::default()
    };
    check(
        // SAFETY: `info` is a live vfio_region_info with argsz and index set.
        unsafe { ioctl_with_mut_ref(device, VFIO_DEVICE_GET_REGION_INFO(), &mut info) },
        "VFIO_DEVICE_GET_REGION_INFO",
    )?;
    Ok(info.offset)
}

/// Turn on memory decoding and bus mastering in the PCI command register.
pub fn enable_bus_master(device: &File) -> io::Result<()> {
    let off = region_offset(device, CONFIG_REGION)? + 4;
    let mut cmd = [0u8; 2];
    device.read_exact_at(&mut cmd, off)?;
    let v = u16::from_le_bytes(cmd) | 0x6;
    device.write_all_at(&v.to_le_bytes(), off)
}

/// BAR access through the device file at the region's offset.
#[derive(Debug)]
pub struct FileBar<'a> {
    pub file: &'a File,
    pub base: u64,
}

impl crate::edu::Bar for FileBar<'_> {
    fn read32(&self, off: u64) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.file.read_exact_at(&mut b, self.base + off)?;
        Ok(u32::from_le_bytes(b))
    }
    fn write64(&self, off: u64, v: u64) -> io::Result<()> {
        self.file.write_all_at(&v.to_le_bytes(), self.base + off)
    }
    fn read64(&self, off: u64) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.file.read_exact_at(&mut b, self.base + off)?;
        Ok(u64::from_le_bytes(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_and_struct_sizes_match_linux_vfio_h() {
        assert_eq!(VFIO_GET_API_VERSION(), 0x3b64);
        assert_eq!(VFIO_GROUP_GET_DEVICE_FD(), 0x3b6a);
        assert_eq!(VFIO_IOMMU_MAP_DMA(), 0x3b71);
        assert_eq!(VFIO_IOMMU_UNMAP_DMA(), 0x3b72);
        assert_eq!(std::mem::size_of::<RegionInfo>(), 32);
        assert_eq!(std::mem::size_of::<DmaMap>(), 32);
        assert_eq!(std::mem::size_of::<DmaUnmap>(), 24);
    }
}
