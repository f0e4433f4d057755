// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Errors, each mapped to the errno the kernel returns for it.

/// A Linux errno value, as the iommufd ioctls return them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

impl Errno {
    pub const EPERM: Errno = Errno(1);
    pub const ENOENT: Errno = Errno(2);
    pub const E2BIG: Errno = Errno(7);
    pub const EINTR: Errno = Errno(4);
    pub const EIO: Errno = Errno(5);
    pub const EBADF: Errno = Errno(9);
    pub const ENOMEM: Errno = Errno(12);
    pub const EACCES: Errno = Errno(13);
    pub const EFAULT: Errno = Errno(14);
    pub const EBUSY: Errno = Errno(16);
    pub const EEXIST: Errno = Errno(17);
    pub const ENODEV: Errno = Errno(19);
    pub const EINVAL: Errno = Errno(22);
    pub const ENOSPC: Errno = Errno(28);
    pub const ENOTTY: Errno = Errno(25);
    pub const EMSGSIZE: Errno = Errno(90);
    pub const EOPNOTSUPP: Errno = Errno(95);
    pub const EADDRINUSE: Errno = Errno(98);
    pub const EOVERFLOW: Errno = Errno(75);
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", std::io::Error::from_raw_os_error(self.0))
    }
}

/// Why an IOAS operation failed.
///
/// Each variant is one failure the kernel reports; [`IoptError::errno`] is the
/// one place that decides the errno, so the model and the kernel driver agree
/// by construction. The kernel driver turns an errno it receives back into
/// the variant with [`IoptError::from_errno`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IoptError {
    /// A malformed argument: zero length, misalignment, start after last,
    /// no READ/WRITE permission, an IOVA in a reserved range. `EINVAL`.
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    /// An address or length computation would wrap, or a value does not fit
    /// `unsigned long`. `EOVERFLOW`.
    #[error("value overflows the address space")]
    Overflow,
    /// A reserved field or an unknown flag was set. `EOPNOTSUPP`.
    #[error("unsupported flag or reserved field set")]
    NotSupported,
    /// No object with that ID, nothing mapped where asked, or an unmap that
    /// would cut an area. `ENOENT`.
    #[error("not found: {0}")]
    NotFound(&'static str),
    /// The fixed IOVA range is already (partly) mapped. `EEXIST`.
    #[error("IOVA range already mapped")]
    Exists,
    /// A range collides with mapped areas or reserved/allowed ranges.
    /// `EADDRINUSE`.
    #[error("IOVA range in use")]
    AddressInUse,
    /// The IOVA allocator found no hole large enough. `ENOSPC`.
    #[error("no IOVA space left")]
    NoSpace,
    /// The object is in use (e.g. an IOAS with devices attached). `EBUSY`.
    #[error("object busy")]
    Busy,
    /// An access broke the area's permissions. `EPERM`.
    #[error("permission denied by the mapping")]
    Permission,
    /// The output buffer was too small; the count says how many entries
    /// there are. `EMSGSIZE`.
    #[error("output buffer too small: {needed} entries needed")]
    MessageSize { needed: u32 },
    /// Bytes past the uAPI structure the kernel knows were not zero
    /// (`copy_struct_from_user`). `E2BIG`.
    #[error("structure larger than the kernel's, with non-zero bytes past it")]
    TooBig,
    /// User memory could not be reached (or pinned). `EFAULT`.
    #[error("bad user address")]
    Fault,
    /// Any other errno from the kernel.
    #[error("kernel error: {0}")]
    Other(Errno),
}

impl IoptError {
    /// The errno the kernel returns for this failure.
    pub fn errno(&self) -> Errno {
        match self {
            IoptError::Invalid(_) => Errno::EINVAL,
            IoptError::Overflow => Errno::EOVERFLOW,
            IoptError::NotSupported => Errno::EOPNOTSUPP,
            IoptError::NotFound(_) => Errno::ENOENT,
            IoptError::Exists => Errno::EEXIST,
            IoptError::AddressInUse => Errno::EADDRINUSE,
            IoptError::NoSpace => Errno::ENOSPC,
            IoptError::Busy => Errno::EBUSY,
            IoptError::Permission => Errno::EPERM,
            IoptError::MessageSize { .. } => Errno::EMSGSIZE,
            IoptError::Fault => Errno::EFAULT,
            IoptError::TooBig => Errno::E2BIG,
            IoptError::Other(e) => *e,
        }
    }

    /// The variant for an errno received from the kernel.
    pub fn from_errno(errno: Errno) -> Self {
        match errno {
            Errno::EINVAL => IoptError::Invalid("kernel"),
            Errno::EOVERFLOW => IoptError::Overflow,
            Errno::EOPNOTSUPP => IoptError::NotSupported,
            Errno::ENOENT => IoptError::NotFound("kernel"),
            Errno::EEXIST => IoptError::Exists,
            Errno::EADDRINUSE => IoptError::AddressInUse,
            Errno::ENOSPC => IoptError::NoSpace,
            Errno::EBUSY => IoptError::Busy,
            Errno::EPERM => IoptError::Permission,
            Errno::EFAULT => IoptError::Fault,
            Errno::E2BIG => IoptError::TooBig,
            e => IoptError::Other(e),
        }
    }
}

/// Result of an IOAS operation.
pub type Result<T> = std::result::Result<T, IoptError>;
