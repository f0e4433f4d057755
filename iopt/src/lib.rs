// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The iommufd IOAS model.
//!
//! This crate models the I/O address space (IOAS) objects of Linux iommufd
//! (`include/uapi/linux/iommufd.h`, `drivers/iommu/iommufd/`), and drives
//! the real kernel `/dev/iommu` behind the same interface.
//!
//! The layering follows the kernel's:
//! - [`IoPagetable`] is the data structure of `io_pagetable.c`: areas, allowed
//!   and reserved IOVA ranges, and the IOVA allocator. It knows nothing of
//!   object IDs or of the uAPI.
//! - [`Iommufd`] is the uAPI: IOAS objects addressed by ID, with the ioctls
//!   `IOMMU_IOAS_ALLOC`, `IOMMU_DESTROY`, `IOMMU_IOAS_IOVA_RANGES`,
//!   `IOMMU_IOAS_ALLOW_IOVAS`, `IOMMU_IOAS_MAP`, `IOMMU_IOAS_COPY`,
//!   `IOMMU_IOAS_UNMAP` and `IOMMU_OPTION`, plus device attach/detach.
//! - [`model::ModelIommufd`] implements [`Iommufd`] in process (the `ioas.c`
//!   glue over [`IoPagetable`]); [`kernel::KernelIommufd`] is the other
//!   implementation, over `/dev/iommu` and VFIO cdev devices.
//! - [`uapi`] is the same uAPI at the byte level ([`uapi::Ioctl`]): the
//!   kernel's structures in, with their `size`, the kernel's errno out. Both
//!   implementations provide it too.
//! - Two facts of the host change what the kernel answers, and are options
//!   of the model: [`Thp`] (the IOVA allocator's alignment cap) and
//!   [`Backing`] (which user memory a pin reaches).
//! - `conformance` (with the `conformance` feature, off by default) is the
//!   behaviour both implementations must show, written once as functions
//!   over [`Iommufd`]; this crate's tests and the `iopt-conformance` binary
//!   run it.

#[cfg(feature = "conformance")]
pub mod conformance;
mod error;
pub mod io_pagetable;
mod iommufd;
pub mod kernel;
pub mod model;
pub mod pinning;
mod range;
mod thp;
pub mod uapi;

pub use error::{Errno, IoptError, Result};
pub use io_pagetable::{Area, IoPagetable, Reserved, Segment};
pub use iommufd::{
    AccessFlags, CopyRequest, DeviceId, IoasId, IommuOption, Iommufd, IovaRanges, MapRequest,
    OptionOp, Prot, UserMemory,
};
pub use pinning::{AllBacked, Backing};
pub use range::IovaRange;
pub use thp::Thp;

/// The CPU page size the kernel pins user memory in (`PAGE_SIZE` on x86_64).
pub const PAGE_SIZE: u64 = 4096;
/// The largest alignment the IOVA allocator asks for on a kernel with
/// transparent huge pages (`HPAGE_SIZE` on x86_64; see [`Thp`]).
pub const HPAGE_SIZE: u64 = 2 << 20;
