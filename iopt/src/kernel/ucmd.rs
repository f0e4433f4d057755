// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The uAPI entry point on the kernel: one ioctl with the caller's bytes.

use std::os::raw::c_ulong;

use crate::uapi::{self, Cmd, Field, Ioctl};
use crate::{Errno, IoptError, Result};

use super::{uapi as nr, KernelIommufd};

/// An address in the kernel half of x86_64's address space: every user
/// copy from or to it fails `access_ok`, so the kernel answers `EFAULT`
/// when it first touches an array placed there.
const FAULTING_ADDRESS: u64 = 1 << 63;

/// Where a command keeps its user array: the offsets of its count
/// (`num_iovas`) and of its pointer (`allowed_iovas`).
fn array_fields(cmd: Cmd) -> Option<(usize, usize)> {
    match cmd {
        Cmd::IoasIovaRanges => Some((
            std::mem::offset_of!(uapi::iommu_ioas_iova_ranges, num_iovas),
            std::mem::offset_of!(uapi::iommu_ioas_iova_ranges, allowed_iovas),
        )),
        Cmd::IoasAllowIovas => Some((
            std::mem::offset_of!(uapi::iommu_ioas_allow_iovas, num_iovas),
            std::mem::offset_of!(uapi::iommu_ioas_allow_iovas, allowed_iovas),
        )),
        _ => None,
    }
}

fn request(cmd: Cmd) -> c_ulong {
    match cmd {
        Cmd::Destroy => nr::IOMMU_DESTROY(),
        Cmd::IoasAlloc => nr::IOMMU_IOAS_ALLOC(),
        Cmd::IoasAllowIovas => nr::IOMMU_IOAS_ALLOW_IOVAS(),
        Cmd::IoasCopy => nr::IOMMU_IOAS_COPY(),
        Cmd::IoasIovaRanges => nr::IOMMU_IOAS_IOVA_RANGES(),
        Cmd::IoasMap => nr::IOMMU_IOAS_MAP(),
        Cmd::IoasUnmap => nr::IOMMU_IOAS_UNMAP(),
        Cmd::Option => nr::IOMMU_OPTION(),
    }
}

impl Ioctl for KernelIommufd {
    /// The command as the caller wrote it, to `/dev/iommu`. Before the
    /// ioctl, only what keeps the kernel inside the caller's memory (see
    /// [`crate::uapi`]): a `size` past `arg` is `EFAULT` here, and an array
    /// pointer outside `user` is replaced, for the call, by an address where
    /// it faults.
    fn ioctl(&mut self, cmd: Cmd, arg: &mut [u8], user: &mut [u8]) -> Result<()> {
        let size = uapi::user_size(arg)?;
        // The array is read or written only once the kernel has checked the
        // structure's size, so only a full structure can reach it.
        let patched = array_fields(cmd)
            .filter(|_| size >= cmd.min_size())
            .and_then(|(count_at, ptr_at)| {
                let count = u32::get(&arg[count_at..]);
                let ptr = u64::get(&arg[ptr_at..]);
                uapi::user_array(user, ptr, count).is_none().then(|| {
                    FAULTING_ADDRESS.put(&mut arg[ptr_at..]);
                    (ptr_at, ptr)
                })
            });
        // SAFETY: the kernel reads `size` bytes of `arg` and writes back at
        // most that many, and `size <= arg.len()` was checked; the only user
        // pointer it dereferences besides `arg` is the array of
        // `IOVA_RANGES`/`ALLOW_IOVAS`, which lies inside `user` (exclusively
        // borrowed for the call) or was replaced by an address the kernel
        // refuses to touch. `user_va` of a MAP is only pinned, never written
        // by the kernel itself.
        let rc = unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ptr(&self.fd, request(cmd), arg.as_mut_ptr())
        };
        let errno = (rc < 0).then(|| {
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(Errno::EIO.0)
        });
        if let Some((ptr_at, ptr)) = patched {
            ptr.put(&mut arg[ptr_at..]);
        }
        match errno.map(Errno) {
            None => Ok(()),
            Some(Errno::EMSGSIZE) => Err(IoptError::MessageSize {
                needed: uapi::iommu_ioas_iova_ranges::from_bytes(arg).num_iovas,
            }),
            Some(e) => Err(IoptError::from_errno(e)),
        }
    }
}
