// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The model's byte-level uAPI entry point: Linux 6.12's
//! `iommufd_fops_ioctl` (`main.c`) and the `ioas.c` handlers, in their
//! order, over the typed methods of [`ModelIommufd`].
//!
//! Each handler does the checks only the structure can fail (`__reserved`,
//! unknown flags, IDs and values the typed API has no room for) where the
//! kernel does them, then calls the typed method, whose own checks follow
//! the kernel's order from there on.

use crate::uapi::{self, Cmd, Field, Ioctl};
use crate::{
    CopyRequest, IoasId, IommuOption, Iommufd, IoptError, IovaRange, MapRequest, OptionOp, Prot,
    Result,
};

use super::{load_iovas, ModelIommufd};

/// The flags `IOMMU_IOAS_MAP` and `IOMMU_IOAS_COPY` know.
const MAP_FLAGS: u32 = uapi::IOMMU_IOAS_MAP_FIXED_IOVA
    | uapi::IOMMU_IOAS_MAP_WRITEABLE
    | uapi::IOMMU_IOAS_MAP_READABLE;

fn prot_of(flags: u32) -> Prot {
    Prot {
        read: flags & uapi::IOMMU_IOAS_MAP_READABLE != 0,
        write: flags & uapi::IOMMU_IOAS_MAP_WRITEABLE != 0,
    }
}

/// `IOMMU_IOAS_MAP_FIXED_IOVA`: the IOVA the caller gave, else `None`.
fn fixed(flags: u32, iova: u64) -> Option<u64> {
    (flags & uapi::IOMMU_IOAS_MAP_FIXED_IOVA != 0).then_some(iova)
}

/// `iommufd_ucmd_respond`: the structure back to the caller, as many bytes
/// of it as the caller's `size` holds.
fn respond(arg: &mut [u8], bytes: &[u8]) {
    let n = arg.len().min(bytes.len());
    arg[..n].copy_from_slice(&bytes[..n]);
}

/// `IOMMU_IOAS_MAP`/`COPY` refuse an IOVA or length of `ULONG_MAX` before
/// anything else but flags (`EOVERFLOW`), whether or not the IOVA is fixed.
fn check_ulong(values: &[u64]) -> Result<()> {
    if values.contains(&u64::MAX) {
        return Err(IoptError::Overflow);
    }
    Ok(())
}

impl Ioctl for ModelIommufd {
    fn ioctl(&mut self, cmd: Cmd, arg: &mut [u8], user: &mut [u8]) -> Result<()> {
        let size = uapi::user_size(arg)?;
        let arg = &mut arg[..size];
        uapi::check_size(cmd, arg)?;
        match cmd {
            Cmd::Destroy => self.destroy_ucmd(arg),
            Cmd::IoasAlloc => self.alloc_ucmd(arg),
            Cmd::IoasAllowIovas => self.allow_iovas_ucmd(arg, user),
            Cmd::IoasCopy => self.copy_ucmd(arg),
            Cmd::IoasIovaRanges => self.iova_ranges_ucmd(arg, user),
            Cmd::IoasMap => self.map_ucmd(arg),
            Cmd::IoasUnmap => self.unmap_ucmd(arg),
            Cmd::Option => self.option_ucmd(arg),
        }
    }
}

impl ModelIommufd {
    /// `iommufd_destroy`: the object must exist (`ENOENT`) and be unused
    /// (`EBUSY`).
    fn destroy_ucmd(&mut self, arg: &mut [u8]) -> Result<()> {
        let c = uapi::iommu_destroy::from_bytes(arg);
        self.ioas_destroy(IoasId(c.id))
    }

    /// `iommufd_ioas_alloc_ioctl`: any flag → `EOPNOTSUPP`.
    fn alloc_ucmd(&mut self, arg: &mut [u8]) -> Result<()> {
        let mut c = uapi::iommu_ioas_alloc::from_bytes(arg);
        if c.flags != 0 {
            return Err(IoptError::NotSupported);
        }
        c.out_ioas_id = self.ioas_alloc()?.0;
        respond(arg, &c.to_bytes());
        Ok(())
    }

    /// `iommufd_ioas_iova_ranges`: `__reserved` → `EOPNOTSUPP`; the IOAS
    /// (`ENOENT`); each usable range written while `num_iovas` has room
    /// (`EFAULT` on the first that cannot be, and then nothing is written
    /// back); the count and alignment written back; more ranges than room →
    /// `EMSGSIZE`.
    fn iova_ranges_ucmd(&mut self, arg: &mut [u8], user: &mut [u8]) -> Result<()> {
        let mut c = uapi::iommu_ioas_iova_ranges::from_bytes(arg);
        if c.__reserved != 0 {
            return Err(IoptError::NotSupported);
        }
        let iopt = self.iopt(IoasId(c.ioas_id))?;
        let max = c.num_iovas;
        let array = uapi::user_array(user, c.allowed_iovas, max);
        let mut n: u32 = 0;
        let mut fault = false;
        iopt.usable_ranges(|r| {
            if fault {
                return;
            }
            if n < max {
                let at = n as usize * uapi::iommu_iova_range::SIZE;
                match array.as_ref().and_then(|a| user.get_mut(a.start + at..)) {
                    Some(slot) => {
                        let elm = uapi::iommu_iova_range {
                            start: r.start,
                            last: r.last,
                        };
                        respond(slot, &elm.to_bytes());
                    }
                    None => fault = true,
                }
            }
            n = n.wrapping_add(1);
        });
        if fault {
            return Err(IoptError::Fault);
        }
        c.num_iovas = n;
        c.out_iova_alignment = iopt.iova_alignment();
        respond(arg, &c.to_bytes());
        if n > max {
            return Err(IoptError::MessageSize { needed: n });
        }
        Ok(())
    }

    /// `iommufd_ioas_allow_iovas`: `__reserved` → `EOPNOTSUPP`; the IOAS
    /// (`ENOENT`); the ranges read one by one (`EFAULT`) and checked as
    /// [`load_iovas`] says; then the reserved ranges (`EADDRINUSE`).
    fn allow_iovas_ucmd(&mut self, arg: &mut [u8], user: &mut [u8]) -> Result<()> {
        let c = uapi::iommu_ioas_allow_iovas::from_bytes(arg);
        if c.__reserved != 0 {
            return Err(IoptError::NotSupported);
        }
        self.iopt(IoasId(c.ioas_id))?;
        let array = uapi::user_array(user, c.allowed_iovas, c.num_iovas);
        let loaded = load_iovas(c.num_iovas as usize, |i| {
            let at = i * uapi::iommu_iova_range::SIZE;
            let bytes = array
                .as_ref()
                .and_then(|a| user.get(a.start + at..a.end))
                .ok_or(IoptError::Fault)?;
            let r = uapi::iommu_iova_range::from_bytes(bytes);
            Ok(IovaRange {
                start: r.start,
                last: r.last,
            })
        })?;
        self.allow_iovas(IoasId(c.ioas_id), &loaded)
    }

    /// `iommufd_ioas_map`: unknown flags or `__reserved` → `EOPNOTSUPP`;
    /// IOVA or length `ULONG_MAX` → `EOVERFLOW` (also without
    /// `FIXED_IOVA`); then [`Iommufd::map`]. The IOVA is written back.
    fn map_ucmd(&mut self, arg: &mut [u8]) -> Result<()> {
        let mut c = uapi::iommu_ioas_map::from_bytes(arg);
        if c.flags & !MAP_FLAGS != 0 || c.__reserved != 0 {
            return Err(IoptError::NotSupported);
        }
        check_ulong(&[c.iova, c.length])?;
        let req = MapRequest {
            iova: fixed(c.flags, c.iova),
            user_va: c.user_va,
            length: c.length,
            prot: prot_of(c.flags),
        };
        c.iova = self.map(IoasId(c.ioas_id), req)?;
        respond(arg, &c.to_bytes());
        Ok(())
    }

    /// `iommufd_ioas_copy`: unknown flags → `EOPNOTSUPP`; length or either
    /// IOVA `ULONG_MAX` → `EOVERFLOW`; then [`Iommufd::copy`]. The
    /// destination IOVA is written back.
    fn copy_ucmd(&mut self, arg: &mut [u8]) -> Result<()> {
        let mut c = uapi::iommu_ioas_copy::from_bytes(arg);
        if c.flags & !MAP_FLAGS != 0 {
            return Err(IoptError::NotSupported);
        }
        check_ulong(&[c.length, c.src_iova, c.dst_iova])?;
        let req = CopyRequest {
            src_ioas: IoasId(c.src_ioas_id),
            src_iova: c.src_iova,
            dst_ioas: IoasId(c.dst_ioas_id),
            dst_iova: fixed(c.flags, c.dst_iova),
            length: c.length,
            prot: prot_of(c.flags),
        };
        c.dst_iova = self.copy(req)?;
        respond(arg, &c.to_bytes());
        Ok(())
    }

    /// `iommufd_ioas_unmap`: [`Iommufd::unmap`] (the IOAS is looked up
    /// before the range is checked); the length unmapped is written back.
    fn unmap_ucmd(&mut self, arg: &mut [u8]) -> Result<()> {
        let mut c = uapi::iommu_ioas_unmap::from_bytes(arg);
        c.length = self.unmap(IoasId(c.ioas_id), c.iova, c.length)?;
        respond(arg, &c.to_bytes());
        Ok(())
    }

    /// `iommufd_option`: `__reserved` → `EOPNOTSUPP`; an unknown option →
    /// `EOPNOTSUPP`; `RLIMIT_MODE` on an object → `EOPNOTSUPP`;
    /// `HUGE_PAGES` looks up its IOAS (`ENOENT`) before the operation; an
    /// operation neither GET nor SET → `EOPNOTSUPP`. Only `val64` is written
    /// back.
    fn option_ucmd(&mut self, arg: &mut [u8]) -> Result<()> {
        let c = uapi::iommu_option::from_bytes(arg);
        if c.__reserved != 0 {
            return Err(IoptError::NotSupported);
        }
        let option = match c.option_id {
            uapi::IOMMU_OPTION_RLIMIT_MODE if c.object_id != 0 => {
                return Err(IoptError::NotSupported)
            }
            uapi::IOMMU_OPTION_RLIMIT_MODE => IommuOption::RlimitMode,
            uapi::IOMMU_OPTION_HUGE_PAGES => {
                self.iopt(IoasId(c.object_id))?;
                IommuOption::HugePages(IoasId(c.object_id))
            }
            _ => return Err(IoptError::NotSupported),
        };
        let op = match c.op {
            uapi::IOMMU_OPTION_OP_GET => OptionOp::Get,
            uapi::IOMMU_OPTION_OP_SET => OptionOp::Set(c.val64),
            _ => return Err(IoptError::NotSupported),
        };
        let val64 = self.option(option, op)?;
        val64.put(&mut arg[std::mem::offset_of!(uapi::iommu_option, val64)..]);
        Ok(())
    }
}
