// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
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
use std::os::fd::OwnedFd;
use std::path::Path;

use iopt::kernel::{KernelIommufd, OpenError, VfioDevice};
use iopt::{DeviceId, Errno, Iommufd, IoptError, IovaRange};
use virtio_iommu::{ChangeSink, Device, DeviceConfig, GuestRam};

use crate::config::{Config, VfioEndpoint, VfioSource};
use crate::ioas::{DaemonIoas, IommuDevice};

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
        OpenError::NotIommufd { .. } => "the file given as /dev/iommu is not an iommufd device",
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
    let mut cfg = device_config(config);
    cfg.page_size_mask &= !(align - 1);
    if cfg.page_size_mask == 0 {
        return Err(PassthroughError::PageSize {
            align,
            mask: config.device.page_size_mask,
        });
    }
    warn_about_memlock();
    Ok(Device::new(cfg, DaemonIoas::Kernel(fd), endpoints)?)
}

/// The device in pass-through mode with devices from QEMU: no endpoint
/// until QEMU forwards one ([`adopt`]).
pub fn device_for_front_end(config: &Config) -> Result<IommuDevice, PassthroughError> {
    warn_about_memlock();
    Ok(Device::new(
        device_config(config),
        DaemonIoas::Forwarded(None),
        [],
    )?)
}

/// The device configuration of pass-through mode: the command line's, with
/// bypass backed by an identity IOAS. The host IOMMU translates every DMA of
/// a bound device, so a bypassing endpoint needs real 1:1 mappings of guest
/// RAM; this is the one place that says so.
fn device_config(config: &Config) -> DeviceConfig {
    DeviceConfig {
        identity_ioas: true,
        ..config.device
    }
}

/// Why a forwarded VFIO device was not taken (it stays blocked).
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("the daemon is not in --mode iommufd without --vfio")]
    NotFromFrontEnd,
    #[error("{0}")]
    Open(#[from] OpenError),
    #[error("cannot measure the device's IOVA alignment: {0}")]
    Alignment(IoptError),
    #[error(
        "the device needs {align:#x}-byte IOVA alignment; the smallest page the guest was \
         offered is {page:#x}"
    )]
    PageSize { align: u64, page: u64 },
    #[error(transparent)]
    Endpoint(#[from] virtio_iommu::ConfigError),
}

/// The iommufd QEMU forwarded (or its empty place), if the daemon takes its
/// devices from QEMU.
fn forwarded(device: &mut IommuDevice) -> Option<&mut Option<KernelIommufd>> {
    device.iommufd_mut().forwarded()
}

/// Take a VFIO device QEMU bound to its iommufd and forwarded with it
/// (docs/mirror-protocol.md §14) as `endpoint`: the first device's iommufd
/// becomes the one every domain's IOAS is made in (QEMU puts all of them in
/// one); the device leaves QEMU's IOAS for the identity IOAS (bypass, over
/// `ram`) or for none (blocked).
pub fn adopt(
    device: &mut IommuDevice,
    endpoint: u32,
    devid: u32,
    iommufd: OwnedFd,
    file: OwnedFd,
    ram: &impl GuestRam,
) -> Result<(), AdoptError> {
    let page = 1u64 << device.device_config().page_size_mask.trailing_zeros();
    let fe = forwarded(device).ok_or(AdoptError::NotFromFrontEnd)?;
    let kernel = fe.get_or_insert_with(|| KernelIommufd::from_fd(iommufd));
    let id = DeviceId(devid);
    let added = match kernel.adopt(VfioDevice::from_fd(file), id) {
        // Nothing to undo: a device adopted twice (Exists) keeps its first
        // adoption.
        Err(e) => return Err(drop_unused_iommufd(device, e.into())),
        Ok(()) => match iova_alignment(kernel, &[id]) {
            Err(e) => Err(AdoptError::Alignment(e)),
            Ok(align) if align > page => Err(AdoptError::PageSize { align, page }),
            Ok(_) => device
                .add_endpoint(endpoint, id, ram)
                .map_err(AdoptError::from),
        },
    };
    added.map_err(|e| {
        if let Some(fe) = forwarded(device) {
            release(fe, id);
        }
        drop_unused_iommufd(device, e)
    })
}

/// After a failed [`adopt`]: an iommufd no held device came with is not
/// kept.
fn drop_unused_iommufd(device: &mut IommuDevice, e: AdoptError) -> AdoptError {
    if device.endpoint_ids().next().is_none() {
        if let Some(fe) = forwarded(device) {
            *fe = None;
        }
    }
    e
}

fn release(fe: &mut Option<KernelIommufd>, id: DeviceId) {
    if let Some(k) = fe.as_mut() {
        drop(k.release(id));
    }
}

/// QEMU took back the device of `endpoint`: it leaves its domain and is
/// blocked, and the daemon closes its files.
pub fn forget(device: &mut IommuDevice, endpoint: u32, sink: &mut impl ChangeSink) {
    let Some(id) = device.remove_endpoint(endpoint, sink) else {
        return;
    };
    if let Some(fe) = forwarded(device) {
        release(fe, id);
    }
}

/// The connection that forwarded the devices ended: all of them go, and
/// with them the iommufd (a new QEMU brings its own).
pub fn forget_all(device: &mut IommuDevice, sink: &mut impl ChangeSink) {
    let endpoints: Vec<u32> = device.endpoint_ids().collect();
    for ep in endpoints {
        forget(device, ep, sink);
    }
    if let Some(fe) = forwarded(device) {
        *fe = None;
    }
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

    fn front_end_config() -> Config {
        crate::config::RawConfig {
            mode: crate::config::Mode::Iommufd,
            ..Default::default()
        }
        .check()
        .unwrap()
    }

    fn memfd() -> OwnedFd {
        crate::mirror::SharedMem::new(c"not-vfio", 4096)
            .unwrap()
            .file()
            .try_clone()
            .unwrap()
            .into()
    }

    #[test]
    fn with_devices_from_qemu_the_device_starts_empty_and_refuses_what_is_not_vfio() {
        let mut d = device_for_front_end(&front_end_config()).unwrap();
        assert_eq!(d.endpoint_ids().count(), 0);
        assert!(
            d.device_config().identity_ioas,
            "bypass is an identity IOAS"
        );
        // No iommufd yet: every IOAS operation says so.
        assert_eq!(d.iommufd_mut().ioas_alloc(), Err(crate::ioas::NOT_YET));
        // A file that is no VFIO device: refused, and nothing is left behind.
        let e = adopt(&mut d, 0x18, 1, memfd(), memfd(), &virtio_iommu::NoRam).unwrap_err();
        assert!(
            matches!(e, AdoptError::Open(OpenError::Probe { .. })),
            "{e}"
        );
        assert_eq!(d.endpoint_ids().count(), 0);
        assert_eq!(d.iommufd_mut().ioas_alloc(), Err(crate::ioas::NOT_YET));
        forget(&mut d, 0x18, &mut virtio_iommu::Discard);
        forget_all(&mut d, &mut virtio_iommu::Discard);
        assert_eq!(
            d.iommufd_mut().ioas_alloc(),
            Err(crate::ioas::NOT_YET),
            "the iommufd went with the connection"
        );
    }

    #[test]
    fn an_emulated_device_takes_no_vfio_device() {
        let config = crate::config::RawConfig::default().check().unwrap();
        let mut d = crate::emulated::device(&config).unwrap();
        let e = adopt(&mut d, 1, 1, memfd(), memfd(), &virtio_iommu::NoRam).unwrap_err();
        assert!(matches!(e, AdoptError::NotFromFrontEnd), "{e}");
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
