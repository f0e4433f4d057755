// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Programs for the test guests: they run inside a Linux guest behind the
//! vIOMMU and drive QEMU's `edu` device (PCI 1234:11e8), whose DMA engine is
//! the simplest real DMA there is.
//!
//! - [`vfio`]: VFIO type1 (container + group) in a few ioctls;
//! - [`edu`]: the edu device's registers and its DMA engine.

pub mod edu;
pub mod vfio;
