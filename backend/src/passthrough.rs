//! Pass-through mode (`--mode iommufd`): each guest domain is a kernel IOAS
//! on `/dev/iommu`, each endpoint a VFIO cdev device bound to it.
//!
//! A guest MAP becomes `IOMMU_IOAS_MAP` (FIXED_IOVA) of this process's
//! mapping of the guest pages, so the device's DMA is translated by the host
//! IOMMU exactly as the guest asked; a bypassing endpoint sits in an IOAS
//! mapping all of guest RAM 1:1 ([`virtio_iommu::DeviceConfig::identity_ioas`]).
//! This module only opens, binds and measures; the request path is the same
//! device model as in emulated mode.

use std::io;
use std::path::Path;

use iopt::kernel::{KernelIommufd, OpenError, VfioDevice};
use iopt::{DeviceId, Errno, Iommufd, IoptError, IovaRange};
use virtio_iommu::Device;

use crate::config::{Config, VfioEndpoint, VfioSource};
use crate::vhu_iommu::IommuDevice;

/// Why pass-through mode could not start. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum PassthroughError {
    #[error("{source}\n  hint: {hint}")]
    Open {
        source: OpenError,
        hint: &'static str,
    },
    #[error("cannot measure the IOVA alignment of the VFIO devices: {0}")]
    Alignment(IoptError),
    #[error("the devices need {align:#x}-byte IOVA alignment, which --page-size-mask {mask:#x} does not offer")]
    PageSize { align: u64, mask: u64 },
    #[error(transparent)]
    Device(#[from] virtio_iommu::ConfigError),
}

fn io_hint(e: &io::Error) -> Option<&'static str> {
    match e.kind() {
        io::ErrorKind::PermissionDenied => Some(
            "permission denied: run as root, or give this user /dev/iommu and the VFIO device node",
        ),
        _ if e.raw_os_error() == Some(Errno::EBUSY.0) => {
            Some("device busy: another process (or QEMU) has it open")
        }
        _ => None,
    }
}

/// What to tell the user about an [`OpenError`].
fn hint(e: &OpenError) -> &'static str {
    match e {
        OpenError::Iommufd { source, .. } => io_hint(source).unwrap_or(
            "no usable /dev/iommu: the host kernel needs CONFIG_IOMMUFD (and the iommufd module loaded)",
        ),
        OpenError::Device { source, .. } => io_hint(source).unwrap_or(
            "bind the device to vfio-pci first, on a kernel with CONFIG_VFIO_DEVICE_CDEV; \
             its node is /sys/bus/pci/devices/<BDF>/vfio-dev/vfioN",
        ),
        OpenError::Bind { source, .. } => match source.errno() {
            Errno::EBUSY => "device busy: its VFIO group is in use through the legacy container",
            Errno::EINVAL => {
                "the device is already bound to an iommufd through another open file of it"
            }
            Errno::EPERM => {
                "the host has no interrupt remapping for this device (iommufd refuses it \
                 unless loaded with allow_unsafe_interrupts=1)"
            }
            _ => "the device cannot be bound to iommufd",
        },
        OpenError::Probe { .. } => "the device cannot be attached to an IOAS",
    }
}

fn open_err(source: OpenError) -> PassthroughError {
    let hint = hint(&source);
    PassthroughError::Open { source, hint }
}

/// Open a `--vfio` device.
fn open_device(v: &VfioEndpoint) -> Result<VfioDevice, PassthroughError> {
    match &v.source {
        VfioSource::Path(p) => VfioDevice::open(p).map_err(open_err),
        // SAFETY: the configuration checked that the fd is open and named
        // once, and nothing else in this process takes it: it was inherited
        // for this use.
        VfioSource::Fd(fd) => Ok(unsafe { VfioDevice::from_raw_fd(*fd) }),
    }
}

/// The IOVA alignment (`out_iova_alignment` of `IOMMU_IOAS_IOVA_RANGES`)
/// an IOAS holding all of `devs` demands: the hardware's smallest page. The
/// devices are attached to a scratch IOAS to ask, and detached again.
pub fn iova_alignment(fd: &mut dyn Iommufd, devs: &[DeviceId]) -> iopt::Result<u64> {
    let scratch = fd.ioas_alloc()?;
    let answer = devs
        .iter()
        .try_for_each(|&d| fd.attach(d, scratch))
        .and_then(|()| {
            let mut one = [IovaRange::default(); 1];
            match fd.iova_ranges(scratch, &mut one) {
                Err(IoptError::MessageSize { needed }) => {
                    let mut all = vec![IovaRange::default(); needed as usize];
                    fd.iova_ranges(scratch, &mut all)
                }
                r => r,
            }
        })
        .map(|r| r.out_iova_alignment);
    for &d in devs {
        let _ = fd.detach(d);
    }
    let _ = fd.ioas_destroy(scratch);
    answer
}

/// The device in pass-through mode: `/dev/iommu` (at `iommufd`) opened,
/// every `--vfio` device bound to it, the page size mask narrowed to what
/// the hardware can map, bypass backed by an identity IOAS.
pub fn device(config: &Config, iommufd: &Path) -> Result<IommuDevice, PassthroughError> {
    let mut fd = KernelIommufd::open(iommufd).map_err(open_err)?;
    let mut endpoints = Vec::with_capacity(config.vfio.len());
    for v in &config.vfio {
        let dev = open_device(v)?;
        let what = dev.describe();
        let id = fd.bind(dev).map_err(open_err)?;
        log::info!(
            "endpoint {}: VFIO device {what} bound to iommufd as device {}",
            v.endpoint,
            id.0
        );
        endpoints.push((v.endpoint, id));
    }
    let ids: Vec<DeviceId> = endpoints.iter().map(|&(_, id)| id).collect();
    let align = iova_alignment(&mut fd, &ids)
        .map_err(PassthroughError::Alignment)?
        .max(1);
    let mut cfg = config.device;
    cfg.page_size_mask &= !(align - 1);
    if cfg.page_size_mask == 0 {
        return Err(PassthroughError::PageSize {
            align,
            mask: config.device.page_size_mask,
        });
    }
    cfg.identity_ioas = true;
    warn_about_memlock();
    let fd: Box<dyn Iommufd + Send> = Box::new(fd);
    Ok(Device::new(cfg, fd, endpoints)?)
}

/// Every guest MAP pins its pages against RLIMIT_MEMLOCK (iommufd's default
/// accounting, per user; none for a process with CAP_IPC_LOCK); a MAP beyond
/// the limit fails with NOMEM. Say so up front when the limit applies and is
/// not unlimited.
fn warn_about_memlock() {
    const CAP_IPC_LOCK: u32 = 14;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    if effective & (1 << CAP_IPC_LOCK) != 0 {
        // The limit does not apply.
        return;
    }
    let Ok(limits) = std::fs::read_to_string("/proc/self/limits") else {
        return;
    };
    if let Some(line) = limits.lines().find(|l| l.starts_with("Max locked memory")) {
        let soft = line.split_whitespace().nth(3).unwrap_or("?");
        if soft != "unlimited" {
            log::warn!(
                "RLIMIT_MEMLOCK is {soft} bytes and this process lacks CAP_IPC_LOCK: guest \
                 mappings pin memory against it; MAPs beyond it fail with NOMEM"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iopt::model::{MockDevice, ModelIommufd};

    #[test]
    fn the_alignment_is_the_largest_page_of_the_devices_and_they_are_left_detached() {
        let mut model = ModelIommufd::new();
        let small = MockDevice::x86();
        let big = MockDevice {
            page_size: 0x1_0000,
            ..MockDevice::x86()
        };
        model.add_device(DeviceId(1), small).unwrap();
        model.add_device(DeviceId(2), big).unwrap();
        assert_eq!(iova_alignment(&mut model, &[DeviceId(1)]), Ok(0x1000));
        assert_eq!(
            iova_alignment(&mut model, &[DeviceId(1), DeviceId(2)]),
            Ok(0x1_0000)
        );
        assert_eq!(model.attached_to(DeviceId(1)), None);
        assert_eq!(model.attached_to(DeviceId(2)), None);
    }

    #[test]
    fn a_missing_iommufd_says_what_the_kernel_needs() {
        let config = crate::config::RawConfig {
            mode: crate::config::Mode::Iommufd,
            vfio: vec!["8=/nonexistent/vfio0".into()],
            ..Default::default()
        }
        .check()
        .unwrap();
        let e = device(&config, Path::new("/nonexistent/iommu")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("CONFIG_IOMMUFD"), "{msg}");
    }
}
