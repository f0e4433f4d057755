// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The kernel iommufd driver: [`Iommufd`] over `/dev/iommu`.
//!
//! This is the thin uAPI edge, the counterpart of the model: each trait
//! method fills one uAPI structure, issues one ioctl, and turns the errno
//! into the same [`IoptError`] the model returns for that failure. Devices
//! are VFIO cdev files (`/dev/vfio/devices/vfioN`) bound to this iommufd.
//! The byte-level entry point ([`crate::uapi::Ioctl`]) is `ucmd.rs`.

#[cfg(feature = "conformance")]
mod fixture;
mod uapi;
mod ucmd;
mod vfio;

#[cfg(feature = "conformance")]
pub use fixture::KernelFixture;
pub use vfio::VfioDevice;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::{
    CopyRequest, DeviceId, Errno, IoasId, IommuOption, Iommufd, IoptError, IovaRange, IovaRanges,
    MapRequest, OptionOp, Prot, Result,
};
use uapi::size_of;

/// Why the kernel driver could not start or bind a device.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open {path}: {source} (is the iommufd module loaded and CONFIG_IOMMUFD set?)")]
    Iommufd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open VFIO device {path}: {source}")]
    Device {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot bind VFIO device {what} to iommufd: {source}")]
    Bind { what: String, source: IoptError },
    #[error("cannot probe the usable IOVA ranges of VFIO device {what}: {source}")]
    Probe { what: String, source: IoptError },
    #[error("{path} does not answer as an iommufd (IOMMU_IOAS_ALLOC: {source})")]
    NotIommufd { path: PathBuf, source: IoptError },
}

/// Issue one iommufd/VFIO ioctl whose argument is a uAPI structure.
fn ioctl<F: AsRawFd, T>(fd: &F, request: std::os::raw::c_ulong, arg: &mut T) -> Result<()> {
    // SAFETY: `arg` is a live, exclusively borrowed `#[repr(C)]` uAPI structure
    // whose size field the caller set to its full size, so the kernel reads
    // and writes only inside it; any user pointers inside it were set by the
    // caller to buffers that outlive this call.
    let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(fd, request, arg) };
    if rc < 0 {
        let errno = std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(Errno::EIO.0);
        return Err(IoptError::from_errno(Errno(errno)));
    }
    Ok(())
}

fn map_flags(prot: Prot, fixed: bool) -> u32 {
    let mut flags = 0;
    if fixed {
        flags |= uapi::IOMMU_IOAS_MAP_FIXED_IOVA;
    }
    if prot.read {
        flags |= uapi::IOMMU_IOAS_MAP_READABLE;
    }
    if prot.write {
        flags |= uapi::IOMMU_IOAS_MAP_WRITEABLE;
    }
    flags
}

/// A device bound to this iommufd.
#[derive(Debug)]
struct Bound {
    device: VfioDevice,
    /// What `IOVA_RANGES` reported for an IOAS holding only this device,
    /// measured once at bind time.
    iova_ranges: Vec<IovaRange>,
}

/// An open `/dev/iommu` and the VFIO devices bound to it.
#[derive(Debug)]
pub struct KernelIommufd {
    fd: File,
    devices: BTreeMap<DeviceId, Bound>,
}

impl KernelIommufd {
    /// The iommufd character device.
    pub const DEFAULT_PATH: &'static str = "/dev/iommu";

    /// Open `/dev/iommu` (or another path to the same device).
    pub fn open(path: impl AsRef<Path>) -> std::result::Result<Self, OpenError> {
        let path = path.as_ref();
        let fd = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| OpenError::Iommufd {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self {
            fd,
            devices: BTreeMap::new(),
        })
    }

    /// Take an iommufd file another process opened and shares with this one
    /// (a VMM's `-object iommufd`, passed over a socket): object IDs are per
    /// open file, so a device that process bound is reachable only through
    /// that same file.
    pub fn from_fd(fd: OwnedFd) -> Self {
        Self {
            fd: File::from(fd),
            devices: BTreeMap::new(),
        }
    }

    /// Adopt a device that another holder of this same iommufd file already
    /// bound (it got `id` back from `VFIO_DEVICE_BIND_IOMMUFD`; a second bind
    /// of the device fails, Linux 6.12 `vfio_df_ioctl_bind_iommufd`), and
    /// measure its IOVA ranges as [`Self::bind`] does. Attaching a bound
    /// device replaces its current attachment (`VFIO_DEVICE_ATTACH_IOMMUFD_PT`
    /// on an attached device), so the device ends up detached: blocked.
    pub fn adopt(
        &mut self,
        device: VfioDevice,
        id: DeviceId,
    ) -> std::result::Result<(), OpenError> {
        let what = device.describe();
        if self.devices.contains_key(&id) {
            return Err(OpenError::Probe {
                what,
                source: IoptError::Exists,
            });
        }
        let iova_ranges = self
            .probe_ranges(&device)
            .map_err(|source| OpenError::Probe { what, source })?;
        self.devices.insert(
            id,
            Bound {
                device,
                iova_ranges,
            },
        );
        Ok(())
    }

    /// Give up a device: it is detached (blocked) and its file returned.
    pub fn release(&mut self, id: DeviceId) -> Option<VfioDevice> {
        let bound = self.devices.remove(&id)?;
        // Detaching a device that is in no IOAS fails: nothing to undo then.
        let _ = detach_device(bound.device.file());
        Some(bound.device)
    }

    /// Bind a VFIO cdev device (`VFIO_DEVICE_BIND_IOMMUFD`) and measure the
    /// IOVA ranges it can use by attaching it to a scratch IOAS. The device
    /// is left detached, that is blocked from DMA.
    pub fn bind(&mut self, device: VfioDevice) -> std::result::Result<DeviceId, OpenError> {
        let what = device.describe();
        let mut bind = uapi::vfio_device_bind_iommufd {
            argsz: size_of::<uapi::vfio_device_bind_iommufd>(),
            iommufd: self.fd.as_raw_fd(),
            ..Default::default()
        };
        ioctl(device.file(), uapi::VFIO_DEVICE_BIND_IOMMUFD(), &mut bind).map_err(|source| {
            OpenError::Bind {
                what: what.clone(),
                source,
            }
        })?;
        let id = DeviceId(bind.out_devid);
        let iova_ranges = self
            .probe_ranges(&device)
            .map_err(|source| OpenError::Probe { what, source })?;
        self.devices.insert(
            id,
            Bound {
                device,
                iova_ranges,
            },
        );
        Ok(id)
    }

    fn probe_ranges(&mut self, device: &VfioDevice) -> Result<Vec<IovaRange>> {
        let scratch = self.ioas_alloc()?;
        let measured = attach_device(device.file(), scratch)
            .and_then(|()| self.all_iova_ranges(scratch))
            .and_then(|ranges| detach_device(device.file()).map(|()| ranges));
        // Best effort: the scratch IOAS is empty, so destroying it can only
        // fail if the detach above failed, which is the error reported.
        let _ = self.ioas_destroy(scratch);
        measured
    }

    fn all_iova_ranges(&self, ioas: IoasId) -> Result<Vec<IovaRange>> {
        let mut ranges = vec![IovaRange::default(); 8];
        loop {
            match self.iova_ranges(ioas, &mut ranges) {
                Ok(answer) => {
                    ranges.truncate(answer.num_iovas as usize);
                    return Ok(ranges);
                }
                Err(IoptError::MessageSize { needed }) => {
                    ranges.resize(needed as usize, IovaRange::default());
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn bound(&self, dev: DeviceId) -> Result<&Bound> {
        self.devices
            .get(&dev)
            .ok_or(IoptError::NotFound("no such device"))
    }
}

fn attach_device(file: &File, ioas: IoasId) -> Result<()> {
    let mut attach = uapi::vfio_device_attach_iommufd_pt {
        argsz: size_of::<uapi::vfio_device_attach_iommufd_pt>(),
        flags: 0,
        pt_id: ioas.0,
    };
    ioctl(file, uapi::VFIO_DEVICE_ATTACH_IOMMUFD_PT(), &mut attach)
}

fn detach_device(file: &File) -> Result<()> {
    let mut detach = uapi::vfio_device_detach_iommufd_pt {
        argsz: size_of::<uapi::vfio_device_detach_iommufd_pt>(),
        flags: 0,
    };
    ioctl(file, uapi::VFIO_DEVICE_DETACH_IOMMUFD_PT(), &mut detach)
}

impl Iommufd for KernelIommufd {
    fn ioas_alloc(&mut self) -> Result<IoasId> {
        let mut cmd = uapi::iommu_ioas_alloc {
            size: size_of::<uapi::iommu_ioas_alloc>(),
            ..Default::default()
        };
        ioctl(&self.fd, uapi::IOMMU_IOAS_ALLOC(), &mut cmd)?;
        Ok(IoasId(cmd.out_ioas_id))
    }

    fn ioas_destroy(&mut self, ioas: IoasId) -> Result<()> {
        let mut cmd = uapi::iommu_destroy {
            size: size_of::<uapi::iommu_destroy>(),
            id: ioas.0,
        };
        ioctl(&self.fd, uapi::IOMMU_DESTROY(), &mut cmd)
    }

    fn iova_ranges(&self, ioas: IoasId, out: &mut [IovaRange]) -> Result<IovaRanges> {
        let mut buf: Vec<uapi::iommu_iova_range> =
            vec![uapi::iommu_iova_range::default(); out.len()];
        let mut cmd = uapi::iommu_ioas_iova_ranges {
            size: size_of::<uapi::iommu_ioas_iova_ranges>(),
            ioas_id: ioas.0,
            num_iovas: u32::try_from(out.len()).unwrap_or(u32::MAX),
            allowed_iovas: buf.as_mut_ptr() as u64,
            ..Default::default()
        };
        let result = ioctl(&self.fd, uapi::IOMMU_IOAS_IOVA_RANGES(), &mut cmd);
        // The kernel fills what fits even when it answers EMSGSIZE.
        for (dst, src) in out.iter_mut().zip(&buf).take(cmd.num_iovas as usize) {
            *dst = IovaRange {
                start: src.start,
                last: src.last,
            };
        }
        match result {
            Ok(()) => Ok(IovaRanges {
                num_iovas: cmd.num_iovas,
                out_iova_alignment: cmd.out_iova_alignment,
            }),
            Err(IoptError::Other(Errno::EMSGSIZE)) => Err(IoptError::MessageSize {
                needed: cmd.num_iovas,
            }),
            Err(e) => Err(e),
        }
    }

    fn allow_iovas(&mut self, ioas: IoasId, allowed: &[IovaRange]) -> Result<()> {
        let mut buf: Vec<uapi::iommu_iova_range> = allowed
            .iter()
            .map(|r| uapi::iommu_iova_range {
                start: r.start,
                last: r.last,
            })
            .collect();
        let mut cmd = uapi::iommu_ioas_allow_iovas {
            size: size_of::<uapi::iommu_ioas_allow_iovas>(),
            ioas_id: ioas.0,
            num_iovas: u32::try_from(buf.len()).map_err(|_| IoptError::Overflow)?,
            allowed_iovas: buf.as_mut_ptr() as u64,
            ..Default::default()
        };
        ioctl(&self.fd, uapi::IOMMU_IOAS_ALLOW_IOVAS(), &mut cmd)
    }

    fn map(&mut self, ioas: IoasId, req: MapRequest) -> Result<u64> {
        let mut cmd = uapi::iommu_ioas_map {
            size: size_of::<uapi::iommu_ioas_map>(),
            flags: map_flags(req.prot, req.iova.is_some()),
            ioas_id: ioas.0,
            user_va: req.user_va,
            length: req.length,
            iova: req.iova.unwrap_or(0),
            ..Default::default()
        };
        ioctl(&self.fd, uapi::IOMMU_IOAS_MAP(), &mut cmd)?;
        Ok(cmd.iova)
    }

    fn copy(&mut self, req: CopyRequest) -> Result<u64> {
        let mut cmd = uapi::iommu_ioas_copy {
            size: size_of::<uapi::iommu_ioas_copy>(),
            flags: map_flags(req.prot, req.dst_iova.is_some()),
            dst_ioas_id: req.dst_ioas.0,
            src_ioas_id: req.src_ioas.0,
            length: req.length,
            dst_iova: req.dst_iova.unwrap_or(0),
            src_iova: req.src_iova,
        };
        ioctl(&self.fd, uapi::IOMMU_IOAS_COPY(), &mut cmd)?;
        Ok(cmd.dst_iova)
    }

    fn unmap(&mut self, ioas: IoasId, iova: u64, length: u64) -> Result<u64> {
        let mut cmd = uapi::iommu_ioas_unmap {
            size: size_of::<uapi::iommu_ioas_unmap>(),
            ioas_id: ioas.0,
            iova,
            length,
        };
        ioctl(&self.fd, uapi::IOMMU_IOAS_UNMAP(), &mut cmd)?;
        Ok(cmd.length)
    }

    fn option(&mut self, option: IommuOption, op: OptionOp) -> Result<u64> {
        let (option_id, object_id) = match option {
            IommuOption::RlimitMode => (uapi::IOMMU_OPTION_RLIMIT_MODE, 0),
            IommuOption::HugePages(ioas) => (uapi::IOMMU_OPTION_HUGE_PAGES, ioas.0),
        };
        let (op, val64) = match op {
            OptionOp::Set(value) => (uapi::IOMMU_OPTION_OP_SET, value),
            OptionOp::Get => (uapi::IOMMU_OPTION_OP_GET, 0),
        };
        let mut cmd = uapi::iommu_option {
            size: size_of::<uapi::iommu_option>(),
            option_id,
            op,
            object_id,
            val64,
            ..Default::default()
        };
        ioctl(&self.fd, uapi::IOMMU_OPTION(), &mut cmd)?;
        Ok(cmd.val64)
    }

    fn attach(&mut self, dev: DeviceId, ioas: IoasId) -> Result<()> {
        attach_device(self.bound(dev)?.device.file(), ioas)
    }

    fn detach(&mut self, dev: DeviceId) -> Result<()> {
        detach_device(self.bound(dev)?.device.file())
    }

    fn device_iova_ranges(&mut self, dev: DeviceId) -> Result<Vec<IovaRange>> {
        Ok(self.bound(dev)?.iova_ranges.clone())
    }
}
