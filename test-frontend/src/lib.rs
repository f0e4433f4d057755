// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `test-frontend`: a stand-in for QEMU *and* the guest's virtio-iommu driver,
//! used to drive the `vhost-user-iommu` daemon from Rust without a VM.
//!
//! It plays both roles a real deployment splits between two programs:
//!
//! - **VMM** ([`TestVm::connect`]): connects to the daemon's vhost-user
//!   socket and does the handshake with `vhost::vhost_user::Frontend`
//!   (owner, features, protocol features, memory table, two vrings, config
//!   space). Guest RAM is a memfd ([`GuestRam`]) whose fd travels in
//!   SET_MEM_TABLE, so the daemon maps exactly the bytes this process sees;
//!   several regions (e.g. one at 4 GiB) can be configured.
//! - **guest driver** ([`VirtQueue`], [`Request`]): split virtqueues in that
//!   RAM (with VIRTIO_RING_F_EVENT_IDX when negotiated), virtio-iommu
//!   requests (ATTACH, DETACH, MAP, UNMAP, PROBE) encoded here from the virtio
//!   specification — deliberately *not* with the `virtio-iommu` crate, so the
//!   device's layouts are checked against an independent reading of the spec —
//!   and fault records read from the event queue.
//!
//! Users: the daemon's integration tests (including malformed chains via
//! [`TestVm::submit_raw`]), the `demo` binary, and the load generator
//! `vhost-user-iommu-bench` ([`TestVm::submit_batch`] fills the ring and
//! notifies once; [`TestVm::submit`] and [`TestVm::poll_completion`] kick
//! and busy-poll the used ring, as Linux's driver does).
//!
//! The tests start the daemon binary itself with [`daemon::DaemonProcess`],
//! their files in a [`daemon::Scratch`] directory that goes with the test.
//!
//! ```no_run
//! use test_frontend::{TestVm, VmOptions, Status, MAP_F_READ};
//! # fn main() -> Result<(), test_frontend::Error> {
//! let mut vm = TestVm::connect("/tmp/viommu.sock".as_ref(), VmOptions::default())?;
//! assert_eq!(vm.attach(1, 8, 0)?, Status::Ok);
//! assert_eq!(vm.map(1, 0x1000, 0x1fff, 0x10_0000, MAP_F_READ)?, Status::Ok);
//! # Ok(()) }
//! ```

pub mod daemon;
pub mod fds;
pub mod ram;
pub mod rng;
pub mod vm;
pub mod vring;
pub mod wire;

pub use ram::{GuestRam, RamError, RegionSpec, DEFAULT_RAM};
pub use vm::{
    Completion, Error, Negotiated, Result, TestVm, UsedLen, VmOptions, EVENT_QUEUE, NUM_QUEUES,
    REQUEST_QUEUE,
};
pub use vring::{need_event, Desc, VirtQueue, VringAddrs, VringError};
pub use wire::{
    FaultEvent, IommuConfig, Request, ResvMem, Status, ATTACH_F_BYPASS, MAP_F_MMIO, MAP_F_READ,
    MAP_F_WRITE,
};
