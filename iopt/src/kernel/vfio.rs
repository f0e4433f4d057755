// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! VFIO cdev devices (`/dev/vfio/devices/vfioN`), the devices a kernel IOAS
//! translates for.

use std::fs::{File, OpenOptions};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use super::OpenError;

/// An open VFIO cdev device file, not yet bound to an iommufd.
///
/// VFIO grants register and DMA access per open file after its bind (Linux
/// 6.12 `vfio_df_open`: a cdev device can be bound through only one open file
/// at a time), so a process that drives the device and the daemon that owns
/// its translation must share one open file: hence [`VfioDevice::from_fd`].
#[derive(Debug)]
pub struct VfioDevice {
    file: File,
    origin: Origin,
}

#[derive(Debug)]
enum Origin {
    Path(PathBuf),
    Fd(RawFd),
}

impl VfioDevice {
    /// Open a VFIO cdev device node.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, OpenError> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| OpenError::Device {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self {
            file,
            origin: Origin::Path(path.to_owned()),
        })
    }

    /// Take an already open device file (e.g. inherited from a launcher).
    pub fn from_fd(fd: OwnedFd) -> Self {
        use std::os::fd::AsRawFd;
        let raw = fd.as_raw_fd();
        Self {
            file: File::from(fd),
            origin: Origin::Fd(raw),
        }
    }

    /// Take ownership of inherited file descriptor `fd`.
    ///
    /// # Safety
    /// `fd` must be an open file descriptor that nothing else in this
    /// process owns or will close.
    pub unsafe fn from_raw_fd(fd: RawFd) -> Self {
        // SAFETY: the caller guarantees `fd` is open and owned by no one else.
        Self::from_fd(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    pub(super) fn file(&self) -> &File {
        &self.file
    }

    /// Where the device came from, for messages.
    pub fn describe(&self) -> String {
        match &self.origin {
            Origin::Path(p) => p.display().to_string(),
            Origin::Fd(fd) => format!("fd:{fd}"),
        }
    }
}
