// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vhost-user-iommu`: a vhost-user back-end that gives a guest a
//! virtio-iommu device (virtio 1.2 §5.13, device ID 23) whose domains are
//! iommufd IOAS objects.
//!
//! The parts, from the socket inwards:
//! - [`serve`]: the listening socket, one front-end at a time, signals;
//! - [`listen`]: a socket path that appears only once it listens;
//! - [`vhu_iommu`]: the `VhostUserBackend`: features, config space, the
//!   request queue a batch at a time (`batch`, `polling`), fault events
//!   (`faults`), migration (`migration`), the mirror's hooks (`hooks`) and
//!   the worker thread's placement (`worker`);
//! - [`placement`]: the worker held to the CPU of a vCPU asleep on its kick;
//! - [`spare`]: how much CPU the host has to spare, measured;
//! - [`session`]: the device and what follows its changes (shared table,
//!   state file, re-answered requests, recovery); resets by one table;
//! - [`vring`]: the request queue's rings a batch at a time (claims, one
//!   used-index store);
//! - [`chain`]: a request's descriptor chain, read and written in place;
//! - [`poll`]: the adaptive busy-polling window of the request queue, which
//!   gives way when the host's CPUs are all taken;
//! - [`sched`]: the vring worker's scheduler slice, for prompt wake-ups;
//! - [`mirror`]: what QEMU needs of the state (docs/mirror-protocol.md): a
//!   shared translation table and the events QEMU acts on;
//! - [`state_file`]: the state file a restarted daemon recovers from;
//! - [`guest_ram`]: guest physical addresses → the daemon's mapping of them;
//! - [`exit_event`]: the vring workers' exit events, closed after each connection;
//! - [`ioas`]: where the domains' IOASes live (model, kernel, or the
//!   iommufd QEMU forwarded), one type;
//! - [`emulated`]: the device model over the in-process iommufd model;
//! - [`passthrough`]: the device model over the kernel's `/dev/iommu` and VFIO devices;
//! - [`config`]: command-line values, checked;
//! - [`confine`]: no new privileges and a seccomp filter of the daemon's calls;
//! - [`control`]: the control socket (status, the device's state in pages,
//!   counters, latency histograms, faults, events) and `vhost-user-iommu
//!   ctl`.
//!
//! The device model itself (requests, domains, mappings) is the
//! `virtio-iommu` crate and the IOAS model the `iopt` crate; neither knows
//! about sockets.

pub mod capabilities;
pub mod chain;
pub mod config;
pub mod confine;
pub mod control;
pub mod device_state;
pub mod dirty_log;
pub mod emulated;
pub mod exit_event;
pub mod guest_ram;
pub mod ioas;
pub mod listen;
pub mod mirror;
pub mod passthrough;
pub mod peer;
pub mod placement;
pub mod poll;
pub mod sched;
pub mod serve;
pub mod session;
pub mod spare;
pub mod state_file;
pub mod table_socket;
pub mod vhu_iommu;
pub mod vring;
