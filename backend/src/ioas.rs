// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The IOAS implementation the daemon runs, chosen at start: one concrete
//! type over the three ways a daemon gets its domains' address spaces.
//!
//! Every variant answers the iommufd uAPI ([`iopt::Iommufd`]); what differs
//! is where the IOASes live. Pass-through code that needs the kernel
//! driver's own operations (adopting a device QEMU bound) matches on the
//! variant rather than downcasting a trait object.

use iopt::kernel::KernelIommufd;
use iopt::model::ModelIommufd;
use iopt::{
    CopyRequest, DeviceId, IoasId, IommuOption, Iommufd, IoptError, IovaRange, IovaRanges,
    MapRequest, OptionOp,
};
use virtio_iommu::Device;

/// The device model the daemon serves.
pub type IommuDevice = Device<DaemonIoas>;

/// Where the daemon's IOASes live.
#[derive(Debug)]
pub enum DaemonIoas {
    /// Emulated mode: the in-process model of iommufd (src/emulated.rs).
    Model(ModelIommufd),
    /// Pass-through mode with `--vfio` devices: the daemon's own
    /// `/dev/iommu` (src/passthrough.rs).
    Kernel(KernelIommufd),
    /// Pass-through mode with VFIO devices from QEMU (docs/mirror-protocol.md
    /// §14): nothing until QEMU forwards its first device with its iommufd,
    /// then the kernel driver over that same open file (iommufd object IDs
    /// are per open file, and QEMU bound the devices through it).
    Forwarded(Option<KernelIommufd>),
}

/// What an operation on [`DaemonIoas::Forwarded`] answers before QEMU has
/// forwarded an iommufd.
pub const NOT_YET: IoptError = IoptError::NotFound("QEMU has not forwarded an iommufd yet");

impl DaemonIoas {
    fn get(&self) -> iopt::Result<&dyn Iommufd> {
        match self {
            Self::Model(m) => Ok(m),
            Self::Kernel(k) => Ok(k),
            Self::Forwarded(k) => k.as_ref().map(|k| k as &dyn Iommufd).ok_or(NOT_YET),
        }
    }

    fn get_mut(&mut self) -> iopt::Result<&mut dyn Iommufd> {
        match self {
            Self::Model(m) => Ok(m),
            Self::Kernel(k) => Ok(k),
            Self::Forwarded(k) => k.as_mut().map(|k| k as &mut dyn Iommufd).ok_or(NOT_YET),
        }
    }

    /// The iommufd QEMU forwarded, if the daemon takes its devices from
    /// QEMU (`None` in the other modes).
    pub fn forwarded(&mut self) -> Option<&mut Option<KernelIommufd>> {
        match self {
            Self::Forwarded(k) => Some(k),
            _ => None,
        }
    }
}

impl Iommufd for DaemonIoas {
    fn ioas_alloc(&mut self) -> iopt::Result<IoasId> {
        self.get_mut()?.ioas_alloc()
    }
    fn ioas_destroy(&mut self, ioas: IoasId) -> iopt::Result<()> {
        self.get_mut()?.ioas_destroy(ioas)
    }
    fn iova_ranges(&self, ioas: IoasId, out: &mut [IovaRange]) -> iopt::Result<IovaRanges> {
        self.get()?.iova_ranges(ioas, out)
    }
    fn allow_iovas(&mut self, ioas: IoasId, allowed: &[IovaRange]) -> iopt::Result<()> {
        self.get_mut()?.allow_iovas(ioas, allowed)
    }
    fn map(&mut self, ioas: IoasId, req: MapRequest) -> iopt::Result<u64> {
        self.get_mut()?.map(ioas, req)
    }
    fn copy(&mut self, req: CopyRequest) -> iopt::Result<u64> {
        self.get_mut()?.copy(req)
    }
    fn unmap(&mut self, ioas: IoasId, iova: u64, length: u64) -> iopt::Result<u64> {
        self.get_mut()?.unmap(ioas, iova, length)
    }
    fn option(&mut self, option: IommuOption, op: OptionOp) -> iopt::Result<u64> {
        self.get_mut()?.option(option, op)
    }
    fn attach(&mut self, dev: DeviceId, ioas: IoasId) -> iopt::Result<()> {
        self.get_mut()?.attach(dev, ioas)
    }
    fn detach(&mut self, dev: DeviceId) -> iopt::Result<()> {
        self.get_mut()?.detach(dev)
    }
    fn device_iova_ranges(&mut self, dev: DeviceId) -> iopt::Result<Vec<IovaRange>> {
        self.get_mut()?.device_iova_ranges(dev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_answers_not_yet_until_qemu_forwards_an_iommufd() {
        let mut fd = DaemonIoas::Forwarded(None);
        assert_eq!(fd.ioas_alloc(), Err(NOT_YET));
        let mut out = [IovaRange::default(); 1];
        assert_eq!(fd.iova_ranges(IoasId(1), &mut out).unwrap_err(), NOT_YET);
        assert!(fd.forwarded().is_some_and(|k| k.is_none()));
    }

    #[test]
    fn the_model_answers_through_it_and_has_no_forwarded_iommufd() {
        let mut fd = DaemonIoas::Model(ModelIommufd::new());
        let ioas = fd.ioas_alloc().unwrap();
        assert!(fd.ioas_destroy(ioas).is_ok());
        assert!(fd.forwarded().is_none());
    }
}
