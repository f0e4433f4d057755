// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The conformance suite's fixture for the kernel: a fresh `/dev/iommu`
//! file per case, with the VFIO device bound to it when one is given.

use std::path::PathBuf;
use std::sync::Arc;

use crate::conformance::{Fixture, Session, SuiteMemory};
use crate::{Iommufd, Thp};

use super::{KernelIommufd, VfioDevice};

/// Runs the cases on the real kernel.
#[derive(Clone, Debug)]
pub struct KernelFixture {
    /// `/dev/iommu`.
    pub iommufd: PathBuf,
    /// A VFIO cdev (`/dev/vfio/devices/vfioN`) for the device cases; each
    /// case opens and binds it anew (a cdev can be bound through one open
    /// file at a time, so the previous case's file must be closed first,
    /// which dropping its session does).
    pub device: Option<PathBuf>,
}

impl KernelFixture {
    /// Whether the cases can run: `/dev/iommu` opens and answers
    /// IOMMU_IOAS_ALLOC and, if given, the VFIO device opens and binds to
    /// it (then all is closed again). The cases themselves treat a failure
    /// here as a broken host and panic; a command line naming the wrong
    /// file gets this error instead.
    pub fn check(&self) -> Result<(), super::OpenError> {
        let mut fd = KernelIommufd::open(&self.iommufd)?;
        let probe = |source| super::OpenError::NotIommufd {
            path: self.iommufd.clone(),
            source,
        };
        let ioas = fd.ioas_alloc().map_err(probe)?;
        fd.ioas_destroy(ioas).map_err(probe)?;
        if let Some(p) = &self.device {
            fd.bind(VfioDevice::open(p)?)?;
        }
        Ok(())
    }
}

impl Fixture for KernelFixture {
    fn name(&self) -> &str {
        "kernel"
    }

    /// The kernel finds the suite's memory by itself.
    fn open(&self, _memory: Arc<SuiteMemory>) -> Session {
        let mut fd = KernelIommufd::open(&self.iommufd).expect("open /dev/iommu");
        let device = self.device.as_ref().map(|p| {
            let dev = VfioDevice::open(p).expect("open the VFIO device");
            fd.bind(dev).expect("bind the VFIO device")
        });
        Session {
            fd: Box::new(fd),
            device,
            thp: Thp::of_host(),
        }
    }
}
