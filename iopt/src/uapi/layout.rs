// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The iommufd uAPI structures of Linux 6.12 (`include/uapi/linux/iommufd.h`)
//! and their bytes.
//!
//! Every structure starts with its own `size`: the kernel copies that many
//! bytes in (`copy_struct_from_user`: what the caller did not send reads as
//! zero, what it sent past the structure the kernel knows must be zero) and
//! writes at most that many back. [`from_bytes`](iommu_ioas_map::from_bytes)
//! and [`to_bytes`](iommu_ioas_map::to_bytes) are the model's side of those
//! copies, field by field in little-endian order, with no `unsafe`.

#![allow(non_camel_case_types)]

/// A field of a uAPI structure: a little-endian integer.
pub trait Field: Copy {
    /// Read the field from the start of `b` (at least as long as the field).
    fn get(b: &[u8]) -> Self;
    /// Write the field to the start of `b`.
    fn put(self, b: &mut [u8]);
}

macro_rules! field {
    ($($t:ty),*) => {$(
        impl Field for $t {
            fn get(b: &[u8]) -> Self {
                let mut a = [0u8; std::mem::size_of::<$t>()];
                a.copy_from_slice(&b[..std::mem::size_of::<$t>()]);
                <$t>::from_le_bytes(a)
            }
            fn put(self, b: &mut [u8]) {
                b[..std::mem::size_of::<$t>()].copy_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
field!(u16, u32, u64, i32);

/// A uAPI structure with no padding (every field is placed at the next
/// multiple of its size), so its bytes are its fields' bytes.
macro_rules! uapi_struct {
    ($(#[$m:meta])* pub struct $name:ident { $(pub $f:ident: $t:ty,)* }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct $name {
            $(pub $f: $t,)*
        }

        impl $name {
            /// The structure's size in Linux 6.12, what its `size` says.
            pub const SIZE: usize = std::mem::size_of::<Self>();

            /// The structure as the kernel sees it after copying in
            /// `bytes` (those past [`Self::SIZE`] are ignored, those missing
            /// read as zero).
            pub fn from_bytes(bytes: &[u8]) -> Self {
                let mut buf = [0u8; Self::SIZE];
                let n = bytes.len().min(Self::SIZE);
                buf[..n].copy_from_slice(&bytes[..n]);
                Self {
                    $($f: Field::get(&buf[std::mem::offset_of!(Self, $f)..]),)*
                }
            }

            /// The structure's bytes.
            pub fn to_bytes(&self) -> [u8; Self::SIZE] {
                let mut buf = [0u8; Self::SIZE];
                $(Field::put(self.$f, &mut buf[std::mem::offset_of!(Self, $f)..]);)*
                buf
            }
        }
    };
}

pub const IOMMU_IOAS_MAP_FIXED_IOVA: u32 = 1 << 0;
pub const IOMMU_IOAS_MAP_WRITEABLE: u32 = 1 << 1;
pub const IOMMU_IOAS_MAP_READABLE: u32 = 1 << 2;

pub const IOMMU_OPTION_RLIMIT_MODE: u32 = 0;
pub const IOMMU_OPTION_HUGE_PAGES: u32 = 1;
pub const IOMMU_OPTION_OP_SET: u16 = 0;
pub const IOMMU_OPTION_OP_GET: u16 = 1;

uapi_struct! {
    pub struct iommu_destroy {
        pub size: u32,
        pub id: u32,
    }
}

uapi_struct! {
    pub struct iommu_ioas_alloc {
        pub size: u32,
        pub flags: u32,
        pub out_ioas_id: u32,
    }
}

uapi_struct! {
    pub struct iommu_iova_range {
        pub start: u64,
        pub last: u64,
    }
}

uapi_struct! {
    pub struct iommu_ioas_iova_ranges {
        pub size: u32,
        pub ioas_id: u32,
        pub num_iovas: u32,
        pub __reserved: u32,
        pub allowed_iovas: u64,
        pub out_iova_alignment: u64,
    }
}

uapi_struct! {
    pub struct iommu_ioas_allow_iovas {
        pub size: u32,
        pub ioas_id: u32,
        pub num_iovas: u32,
        pub __reserved: u32,
        pub allowed_iovas: u64,
    }
}

uapi_struct! {
    pub struct iommu_ioas_map {
        pub size: u32,
        pub flags: u32,
        pub ioas_id: u32,
        pub __reserved: u32,
        pub user_va: u64,
        pub length: u64,
        pub iova: u64,
    }
}

uapi_struct! {
    pub struct iommu_ioas_copy {
        pub size: u32,
        pub flags: u32,
        pub dst_ioas_id: u32,
        pub src_ioas_id: u32,
        pub length: u64,
        pub dst_iova: u64,
        pub src_iova: u64,
    }
}

uapi_struct! {
    pub struct iommu_ioas_unmap {
        pub size: u32,
        pub ioas_id: u32,
        pub iova: u64,
        pub length: u64,
    }
}

uapi_struct! {
    pub struct iommu_option {
        pub size: u32,
        pub option_id: u32,
        pub op: u16,
        pub __reserved: u16,
        pub object_id: u32,
        pub val64: u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn struct_layouts_match_the_uapi() {
        assert_eq!(size_of::<iommu_destroy>(), 8);
        assert_eq!(size_of::<iommu_ioas_alloc>(), 12);
        assert_eq!(offset_of!(iommu_ioas_alloc, out_ioas_id), 8);
        assert_eq!(size_of::<iommu_iova_range>(), 16);
        assert_eq!(size_of::<iommu_ioas_iova_ranges>(), 32);
        assert_eq!(offset_of!(iommu_ioas_iova_ranges, allowed_iovas), 16);
        assert_eq!(offset_of!(iommu_ioas_iova_ranges, out_iova_alignment), 24);
        assert_eq!(size_of::<iommu_ioas_allow_iovas>(), 24);
        assert_eq!(offset_of!(iommu_ioas_allow_iovas, allowed_iovas), 16);
        assert_eq!(size_of::<iommu_ioas_map>(), 40);
        assert_eq!(offset_of!(iommu_ioas_map, user_va), 16);
        assert_eq!(offset_of!(iommu_ioas_map, length), 24);
        assert_eq!(offset_of!(iommu_ioas_map, iova), 32);
        assert_eq!(size_of::<iommu_ioas_copy>(), 40);
        assert_eq!(offset_of!(iommu_ioas_copy, src_ioas_id), 12);
        assert_eq!(offset_of!(iommu_ioas_copy, length), 16);
        assert_eq!(offset_of!(iommu_ioas_copy, dst_iova), 24);
        assert_eq!(offset_of!(iommu_ioas_copy, src_iova), 32);
        assert_eq!(size_of::<iommu_ioas_unmap>(), 24);
        assert_eq!(offset_of!(iommu_ioas_unmap, iova), 8);
        assert_eq!(offset_of!(iommu_ioas_unmap, length), 16);
        assert_eq!(size_of::<iommu_option>(), 24);
        assert_eq!(offset_of!(iommu_option, op), 8);
        assert_eq!(offset_of!(iommu_option, object_id), 12);
        assert_eq!(offset_of!(iommu_option, val64), 16);
    }

    #[test]
    fn bytes_round_trip_little_endian_and_short_input_reads_as_zero() {
        let m = iommu_ioas_map {
            size: 40,
            flags: 7,
            ioas_id: 3,
            __reserved: 0,
            user_va: 0x1122_3344_5566_7788,
            length: 0x1000,
            iova: 0xdead_0000,
        };
        let b = m.to_bytes();
        assert_eq!(&b[..4], &[40, 0, 0, 0]);
        assert_eq!(&b[16..24], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(iommu_ioas_map::from_bytes(&b), m);
        let short = iommu_ioas_map::from_bytes(&b[..24]);
        assert_eq!((short.user_va, short.length, short.iova), (m.user_va, 0, 0));
    }
}
