// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Whether the kernel the model stands for was built with transparent huge
//! pages: the one build option of the host that changes what iommufd answers.

use std::path::Path;

use crate::{HPAGE_SIZE, PAGE_SIZE};

/// `CONFIG_TRANSPARENT_HUGEPAGE` of the kernel being modelled.
///
/// `iopt_alloc_iova` (Linux 6.12 `io_pagetable.c`) caps the alignment it
/// gives an allocated IOVA at `HPAGE_SIZE` when the kernel has transparent
/// huge pages and at `PAGE_SIZE` when it has not, so the IOVAs the allocator
/// chooses differ between the two builds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Thp {
    /// Built with transparent huge pages (Debian's kernels, and the
    /// pass-through test bed's).
    #[default]
    Enabled,
    /// Built without (`allnoconfig`-like kernels).
    Disabled,
}

impl Thp {
    /// The directory a kernel with transparent huge pages has in sysfs
    /// (`mm/huge_memory.c`'s `hugepage_init_sysfs`).
    pub const SYSFS: &'static str = "/sys/kernel/mm/transparent_hugepage";

    /// What the running kernel was built with, from [`Self::SYSFS`].
    ///
    /// The directory is missing also on a kernel whose CPU cannot map huge
    /// pages (`has_transparent_hugepage()` false) or when sysfs is not
    /// mounted, where iommufd still caps at `HPAGE_SIZE`: neither happens on
    /// the x86_64 hosts and guests this project runs on.
    pub fn of_host() -> Self {
        Self::of_sysfs(Path::new(Self::SYSFS))
    }

    /// As [`Self::of_host`], with the sysfs directory at `dir`.
    pub fn of_sysfs(dir: &Path) -> Self {
        if dir.is_dir() {
            Thp::Enabled
        } else {
            Thp::Disabled
        }
    }

    /// The largest alignment `iopt_alloc_iova` gives an allocated IOVA
    /// (`max_alignment`).
    pub fn max_alloc_alignment(self) -> u64 {
        match self {
            Thp::Enabled => HPAGE_SIZE,
            Thp::Disabled => PAGE_SIZE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sysfs_directory_says_whether_the_kernel_has_thp() {
        let dir = std::env::temp_dir().join(format!("iopt-thp-{}", std::process::id()));
        assert_eq!(Thp::of_sysfs(&dir), Thp::Disabled);
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(Thp::of_sysfs(&dir), Thp::Enabled);
        std::fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn without_thp_the_allocator_aligns_to_a_page_at_most() {
        assert_eq!(Thp::Enabled.max_alloc_alignment(), HPAGE_SIZE);
        assert_eq!(Thp::Disabled.max_alloc_alignment(), PAGE_SIZE);
    }
}
