// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The iommufd interface both implementations provide.

use crate::{IovaRange, Result};

/// ID of an IOAS object (`ioas_id` in the uAPI).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IoasId(pub u32);

/// ID of a device bound to the iommufd (`dev_id` in the uAPI).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId(pub u32);

/// Access permissions of an area (`IOMMU_IOAS_MAP_READABLE` /
/// `IOMMU_IOAS_MAP_WRITEABLE`). A map needs at least one of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Prot {
    pub read: bool,
    pub write: bool,
}

impl Prot {
    pub const READ: Prot = Prot {
        read: true,
        write: false,
    };
    pub const WRITE: Prot = Prot {
        read: false,
        write: true,
    };
    pub const RW: Prot = Prot {
        read: true,
        write: true,
    };
}

/// Arguments of `IOMMU_IOAS_MAP`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapRequest {
    /// `Some(iova)` maps at exactly that IOVA (`IOMMU_IOAS_MAP_FIXED_IOVA`);
    /// `None` lets the IOVA allocator choose.
    pub iova: Option<u64>,
    /// The process virtual address of the memory to map.
    pub user_va: u64,
    /// Length in bytes.
    pub length: u64,
    pub prot: Prot,
}

/// Arguments of `IOMMU_IOAS_COPY`: map in one IOAS the memory that a range of
/// another (or the same) IOAS maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyRequest {
    pub src_ioas: IoasId,
    pub src_iova: u64,
    pub dst_ioas: IoasId,
    /// As [`MapRequest::iova`].
    pub dst_iova: Option<u64>,
    pub length: u64,
    pub prot: Prot,
}

/// Answer of `IOMMU_IOAS_IOVA_RANGES`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IovaRanges {
    /// How many usable ranges there are (all were written to the buffer).
    pub num_iovas: u32,
    /// `out_iova_alignment`: the minimum alignment of a mapping's IOVA and
    /// length.
    pub out_iova_alignment: u64,
}

/// `IOMMU_OPTION` options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IommuOption {
    /// `IOMMU_OPTION_RLIMIT_MODE` (object 0): 0 = per-user, 1 = per-process
    /// accounting of pinned pages.
    RlimitMode,
    /// `IOMMU_OPTION_HUGE_PAGES` on an IOAS: 1 = allow huge IOPTEs.
    HugePages(IoasId),
}

/// `IOMMU_OPTION_OP_SET` / `IOMMU_OPTION_OP_GET`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptionOp {
    Set(u64),
    Get,
}

/// Direction of a software access through an IOAS
/// (`IOMMUFD_ACCESS_RW_WRITE` in the kernel's `iommufd_access_rw`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessFlags {
    /// The device reads memory: the area must be readable.
    Read,
    /// The device writes memory: the area must be writeable.
    Write,
}

/// The process memory an IOAS's areas point into, as seen by a software
/// access. The model never dereferences a user address itself: whoever owns
/// the memory (the daemon's view of guest RAM, or a test buffer) does.
pub trait UserMemory {
    /// Copy `buf.len()` bytes from user address `user_va` into `buf`.
    fn read(&self, user_va: u64, buf: &mut [u8]) -> Result<()>;
    /// Copy `buf` to user address `user_va`.
    fn write(&self, user_va: u64, buf: &[u8]) -> Result<()>;
}

/// The iommufd uAPI for IOAS objects: one trait, implemented by the
/// in-process model and by the kernel driver.
///
/// Every method mirrors one ioctl of `include/uapi/linux/iommufd.h` and fails
/// the way the merged kernel fails (see [`crate::IoptError`]). Values the
/// uAPI takes as `__u64` but the kernel keeps in `unsigned long` are checked
/// the way `ioas.c` checks them.
pub trait Iommufd: std::fmt::Debug {
    /// `IOMMU_IOAS_ALLOC`: a new, empty IOAS.
    fn ioas_alloc(&mut self) -> Result<IoasId>;

    /// `IOMMU_DESTROY` of an IOAS. Fails with `EBUSY` while devices are
    /// attached to it; its areas are unmapped.
    fn ioas_destroy(&mut self, ioas: IoasId) -> Result<()>;

    /// `IOMMU_IOAS_IOVA_RANGES`: the usable IOVA ranges (the holes in the
    /// reserved ranges), written to `out` up to its length. When `out` is too
    /// short, the ranges that fit are written and `MessageSize { needed }` is
    /// returned.
    fn iova_ranges(&self, ioas: IoasId, out: &mut [IovaRange]) -> Result<IovaRanges>;

    /// `IOMMU_IOAS_ALLOW_IOVAS`: replace the allowed ranges the allocator may
    /// choose IOVAs from (empty = anywhere not reserved).
    fn allow_iovas(&mut self, ioas: IoasId, allowed: &[IovaRange]) -> Result<()>;

    /// `IOMMU_IOAS_MAP`: returns the IOVA the memory was mapped at.
    fn map(&mut self, ioas: IoasId, req: MapRequest) -> Result<u64>;

    /// `IOMMU_IOAS_COPY`: returns the destination IOVA.
    fn copy(&mut self, req: CopyRequest) -> Result<u64>;

    /// `IOMMU_IOAS_UNMAP` of `[iova, iova + length)`: every area in the range
    /// must lie wholly inside it. `iova = 0, length = u64::MAX` unmaps
    /// everything. Returns the number of bytes unmapped.
    fn unmap(&mut self, ioas: IoasId, iova: u64, length: u64) -> Result<u64>;

    /// `IOMMU_OPTION`: set or get an option; returns the (new) value.
    fn option(&mut self, option: IommuOption, op: OptionOp) -> Result<u64>;

    /// Attach a device to an IOAS (`VFIO_DEVICE_ATTACH_IOMMUFD_PT` for a
    /// real device; a mock device for the model). The device's reserved
    /// regions and aperture become reserved ranges of the IOAS; attaching
    /// to another IOAS moves it. Fails if those collide with mapped areas or
    /// allowed ranges.
    fn attach(&mut self, dev: DeviceId, ioas: IoasId) -> Result<()>;

    /// Detach a device from its IOAS; its reserved ranges leave the IOAS.
    fn detach(&mut self, dev: DeviceId) -> Result<()>;

    /// The IOVA ranges a device can use on its own: its aperture less its
    /// reserved regions (what `IOVA_RANGES` reports for an IOAS holding
    /// just this device).
    fn device_iova_ranges(&mut self, dev: DeviceId) -> Result<Vec<IovaRange>>;
}

/// A boxed implementation is one too, so a daemon can choose the model or
/// the kernel at run time.
impl<T: Iommufd + ?Sized> Iommufd for Box<T> {
    fn ioas_alloc(&mut self) -> Result<IoasId> {
        (**self).ioas_alloc()
    }
    fn ioas_destroy(&mut self, ioas: IoasId) -> Result<()> {
        (**self).ioas_destroy(ioas)
    }
    fn iova_ranges(&self, ioas: IoasId, out: &mut [IovaRange]) -> Result<IovaRanges> {
        (**self).iova_ranges(ioas, out)
    }
    fn allow_iovas(&mut self, ioas: IoasId, allowed: &[IovaRange]) -> Result<()> {
        (**self).allow_iovas(ioas, allowed)
    }
    fn map(&mut self, ioas: IoasId, req: MapRequest) -> Result<u64> {
        (**self).map(ioas, req)
    }
    fn copy(&mut self, req: CopyRequest) -> Result<u64> {
        (**self).copy(req)
    }
    fn unmap(&mut self, ioas: IoasId, iova: u64, length: u64) -> Result<u64> {
        (**self).unmap(ioas, iova, length)
    }
    fn option(&mut self, option: IommuOption, op: OptionOp) -> Result<u64> {
        (**self).option(option, op)
    }
    fn attach(&mut self, dev: DeviceId, ioas: IoasId) -> Result<()> {
        (**self).attach(dev, ioas)
    }
    fn detach(&mut self, dev: DeviceId) -> Result<()> {
        (**self).detach(dev)
    }
    fn device_iova_ranges(&mut self, dev: DeviceId) -> Result<Vec<IovaRange>> {
        (**self).device_iova_ranges(dev)
    }
}
