// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vhost-user-iommu-bench`: host-side performance runs of the
//! `vhost-user-iommu` daemon.
//!
//! The bench plays VMM and guest driver with the `test-frontend` crate and
//! sends the daemon named MAP/UNMAP [`workload`]s the way guest drivers do.
//! Every workload runs on two [`leg`]s:
//! - [`daemon_leg`]: over the vhost-user socket, kicking then busy-polling
//!   the used ring (Linux's virtio-iommu driver);
//! - [`direct_leg`]: the daemon's own device model called in-process,
//!   the same requests without the transport;
//!
//! and with `--qemu-leg` on a third, [`qemu_leg`]: the daemon leg with a
//! QEMU stand-in ([`qemu_standin`], the shared memory through
//! [`mapped_file`]) on the daemon's translation mirror, every MAP/UNMAP
//! checked in the shared table. [`scaling`] measures how request costs grow
//! with the mappings a domain holds.
//!
//! [`run`] measures a leg: latency per request into a preallocated
//! [`histogram`], throughput, and (through [`procstat`]) the daemon's CPU
//! time and context switches. [`daemon`] starts and stops the daemon,
//! [`progress`] shows the run on stderr, [`report`] makes the table and the
//! JSON, [`plot`] the SVG.

pub mod daemon;
pub mod daemon_leg;
pub mod direct_leg;
pub mod histogram;
pub mod leg;
pub mod mapped_file;
pub mod plot;
pub mod procstat;
pub mod progress;
pub mod qemu_leg;
pub mod qemu_standin;
pub mod report;
pub mod run;
pub mod scaling;
pub mod workload;
