// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The virtio-iommu device (virtio 1.2 §5.13, device ID 23) without I/O.
//!
//! - [`wire`]: every structure on the wire, with its exact layout;
//! - [`Map`] and [`Unmap`]: one MAP and one UNMAP, from the parsed request
//!   to the mirror record;
//! - [`request`]: decoding the device-readable part of a request;
//! - [`domain`]: a domain and the mappings the driver made in it;
//! - [`probe`]: PROBE property writing;
//! - [`Change`] and [`ChangeSink`]: the change stream, each change of the
//!   translation state as the device makes it;
//! - [`state`]: the migration state and its format;
//! - [`trace`]: a trace line per request (QEMU's trace events), for the
//!   daemon to call after each;
//! - [`journal`]: the state journal's records, and folding them into a
//!   state (a restarted daemon's recovery);
//! - [`device`]: the device model — endpoints, domains, mappings, bypass,
//!   translation — over one [`iopt::Iommufd`] IOAS per domain.
//!
//! The vhost-user daemon feeds it the bytes of each descriptor chain and a
//! view of guest RAM; the device answers with the reply bytes and reports
//! every change of the translation state to a [`ChangeSink`] (the
//! translation mirror).

mod change;
pub mod device;
pub mod domain;
mod entry;
pub mod journal;
pub mod map_unmap;
pub mod probe;
pub mod request;
pub mod state;
pub mod trace;
pub mod wire;

pub use change::{Change, ChangeSink, Discard};
pub use device::{
    encode_fault, ConfigError, Device, DeviceConfig, GuestRam, NoRam, RamRegion, RestoreError,
    Stats, Translation, PROBE_SIZES,
};
pub use map_unmap::{Map, Unmap};
pub use state::{DeviceState, StateError};
pub use wire::{ConfigSpace, FaultEvent, Status, VIRTIO_ID_IOMMU};
