// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The iommufd uAPI at the byte level: the kernel's structures in, the
//! kernel's errno out.
//!
//! [`Ioctl`] is the entry point a front-end that forwards raw iommufd
//! commands uses (as a real iommufd user does), implemented by the model
//! (`model/ucmd.rs`, the glue of Linux 6.12 `main.c`'s
//! `iommufd_fops_ioctl` and `ioas.c`) and by the kernel driver (one ioctl).
//! What the typed [`crate::Iommufd`] cannot express is answered here: the
//! structure's `size`, `__reserved` fields, unknown flags, `IOMMU_OPTION`'s
//! operations, and the user arrays of `IOVA_RANGES` and `ALLOW_IOVAS`.
//!
//! # The caller's memory
//!
//! `arg` is the structure as the caller holds it; its first four bytes are
//! `size`. A `size` (or an `arg` too short to hold one) that reaches past
//! `arg` would have the kernel read and write memory the caller does not
//! own: both implementations answer `EFAULT` instead. An array pointer
//! (`allowed_iovas`) may point only into `user`; an array not wholly inside
//! it faults (`EFAULT`) when the kernel first touches it, which the kernel
//! driver ensures by handing the kernel an address in the kernel half in its
//! place. `user_va` of `IOMMU_IOAS_MAP` is not touched by either: the kernel
//! pins it (with a device attached), the model asks its
//! [`Backing`](crate::Backing).

mod layout;

pub use layout::*;

use crate::{IoptError, Result};

/// The iommufd commands of the entry point (`IOMMUFD_CMD_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cmd {
    Destroy,
    IoasAlloc,
    IoasAllowIovas,
    IoasCopy,
    IoasIovaRanges,
    IoasMap,
    IoasUnmap,
    Option,
}

impl Cmd {
    /// Every command, in `IOMMUFD_CMD_*` order.
    pub const ALL: [Cmd; 8] = [
        Cmd::Destroy,
        Cmd::IoasAlloc,
        Cmd::IoasAllowIovas,
        Cmd::IoasCopy,
        Cmd::IoasIovaRanges,
        Cmd::IoasMap,
        Cmd::IoasUnmap,
        Cmd::Option,
    ];

    /// The size of the command's structure in Linux 6.12 (`op->size`).
    pub fn size(self) -> usize {
        match self {
            Cmd::Destroy => iommu_destroy::SIZE,
            Cmd::IoasAlloc => iommu_ioas_alloc::SIZE,
            Cmd::IoasAllowIovas => iommu_ioas_allow_iovas::SIZE,
            Cmd::IoasCopy => iommu_ioas_copy::SIZE,
            Cmd::IoasIovaRanges => iommu_ioas_iova_ranges::SIZE,
            Cmd::IoasMap => iommu_ioas_map::SIZE,
            Cmd::IoasUnmap => iommu_ioas_unmap::SIZE,
            Cmd::Option => iommu_option::SIZE,
        }
    }

    /// The smallest `size` the kernel takes (`op->min_size`, the end of the
    /// field the command was first released with): in Linux 6.12 every
    /// structure is still its first release, so it is [`Self::size`].
    pub fn min_size(self) -> usize {
        self.size()
    }
}

/// Issue one iommufd command with its structure's bytes.
pub trait Ioctl {
    /// Run `cmd` on `arg` (the structure, `size` first; what the kernel
    /// writes back lands there), with `user` the memory its array pointer
    /// may point into. Fails with the errno the kernel returns.
    fn ioctl(&mut self, cmd: Cmd, arg: &mut [u8], user: &mut [u8]) -> Result<()>;
}

impl<T: Ioctl + ?Sized> Ioctl for Box<T> {
    fn ioctl(&mut self, cmd: Cmd, arg: &mut [u8], user: &mut [u8]) -> Result<()> {
        (**self).ioctl(cmd, arg, user)
    }
}

/// The `size` of the structure in `arg` (`get_user(ucmd.user_size)`): an
/// `arg` too short for it, or a size reaching past `arg`, is `EFAULT`.
pub fn user_size(arg: &[u8]) -> Result<usize> {
    let size = arg.get(..4).map(u32::get).ok_or(IoptError::Fault)? as usize;
    if size > arg.len() {
        return Err(IoptError::Fault);
    }
    Ok(size)
}

/// The checks of `iommufd_fops_ioctl` before the command runs: `size`
/// below the command's minimum → `EINVAL`; bytes past the structure the
/// kernel knows not all zero → `E2BIG` (`copy_struct_from_user`).
pub fn check_size(cmd: Cmd, arg: &[u8]) -> Result<()> {
    if arg.len() < cmd.min_size() {
        return Err(IoptError::Invalid(
            "size below the structure's first release",
        ));
    }
    if arg[cmd.size()..].iter().any(|&b| b != 0) {
        return Err(IoptError::TooBig);
    }
    Ok(())
}

/// The bytes of `user` that an array of `count` [`iommu_iova_range`] at
/// address `ptr` covers, if it lies wholly inside `user`; an empty array
/// lies anywhere.
pub fn user_array(user: &[u8], ptr: u64, count: u32) -> Option<std::ops::Range<usize>> {
    if count == 0 {
        return Some(0..0);
    }
    let len = u64::from(count).checked_mul(iommu_iova_range::SIZE as u64)?;
    let start = ptr.checked_sub(user.as_ptr() as u64)?;
    let end = start.checked_add(len)?;
    (end <= user.len() as u64).then_some(start as usize..end as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_size_must_fit_the_buffer() {
        assert_eq!(user_size(&[8, 0, 0]), Err(IoptError::Fault));
        assert_eq!(user_size(&[8, 0, 0, 0, 0, 0, 0]), Err(IoptError::Fault));
        assert_eq!(user_size(&[8, 0, 0, 0, 0, 0, 0, 0]), Ok(8));
        assert_eq!(user_size(&[2, 0, 0, 0]), Ok(2));
    }

    #[test]
    fn short_structs_are_einval_and_a_nonzero_tail_is_e2big() {
        for cmd in Cmd::ALL {
            let mut b = vec![0u8; cmd.size() + 8];
            assert!(check_size(cmd, &b[..cmd.size() - 1]).is_err());
            assert_eq!(check_size(cmd, &b), Ok(()));
            b[cmd.size() + 7] = 1;
            assert_eq!(check_size(cmd, &b), Err(IoptError::TooBig));
        }
    }

    #[test]
    fn arrays_must_lie_wholly_inside_the_user_buffer() {
        let user = [0u8; 64];
        let base = user.as_ptr() as u64;
        assert_eq!(user_array(&user, base, 4), Some(0..64));
        assert_eq!(user_array(&user, base + 16, 3), Some(16..64));
        assert_eq!(user_array(&user, base + 16, 4), None);
        assert_eq!(user_array(&user, base - 1, 1), None);
        assert_eq!(user_array(&user, 0, 0), Some(0..0));
        assert_eq!(user_array(&user, u64::MAX, u32::MAX), None);
    }
}
