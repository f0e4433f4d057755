// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One trace line per request, as QEMU's own virtio-iommu has one trace
//! event per request (hw/virtio/trace-events: `virtio_iommu_attach`,
//! `virtio_iommu_detach`, `virtio_iommu_map`, `virtio_iommu_unmap`,
//! `virtio_iommu_probe`), at `log` trace level with the fields that matter
//! and the status the device answered. The daemon calls it after each
//! request it carries out.
//!
//! The rule: a request costs nothing more while trace level is off — the
//! caller tests [`on`], one relaxed load of the `log` crate's maximum
//! level; no formatting, no allocation, no lock, and [`Device`]'s code is
//! not touched (the request is parsed again for its line, only when
//! traced).
//!
//! [`Device`]: crate::Device

use crate::request::{self, Request};
use crate::wire::req_type;

/// Whether requests are traced: one relaxed load.
#[inline(always)]
pub fn on() -> bool {
    log::max_level() >= log::LevelFilter::Trace
}

/// Status names as the virtio spec spells them (VIRTIO_IOMMU_S_*).
const STATUS: [&str; 9] = [
    "Ok", "IoErr", "Unsupp", "DevErr", "Inval", "Range", "NoEnt", "Fault", "NoMem",
];

/// Trace the request `req` (its device-readable bytes) the device
/// answered with `reply` (the bytes it wrote; its status is the last
/// four's first, the tail). Call only when [`on`].
#[cold]
#[inline(never)]
pub fn request(req: &[u8], reply: &[u8]) {
    let status = match reply.len().checked_sub(4).map(|at| reply[at]) {
        Some(s) => STATUS.get(usize::from(s)).copied().unwrap_or("Unknown"),
        // Nothing written: an unknown type (virtio 1.3 §5.13.6.1), or no
        // room for the tail.
        None => "None",
    };
    match request::parse(req) {
        Ok(Request::Attach {
            domain,
            endpoint,
            flags,
            ..
        }) => log::trace!(
            "virtio_iommu_attach domain={domain} endpoint={endpoint:#x} flags={flags:#x} \
             status={status}"
        ),
        Ok(Request::Detach { domain, endpoint }) => log::trace!(
            "virtio_iommu_detach domain={domain} endpoint={endpoint:#x} status={status}"
        ),
        Ok(Request::Map(m)) => log::trace!(
            "virtio_iommu_map domain={} virt_start={:#x} virt_end={:#x} phys_start={:#x} \
             flags={:#x} status={status}",
            m.domain,
            m.virt_start,
            m.virt_end,
            m.phys_start,
            m.flags
        ),
        Ok(Request::Unmap(u)) => log::trace!(
            "virtio_iommu_unmap domain={} virt_start={:#x} virt_end={:#x} status={status}",
            u.domain,
            u.virt_start,
            u.virt_end
        ),
        Ok(Request::Probe { endpoint }) => {
            log::trace!("virtio_iommu_probe endpoint={endpoint:#x} status={status}")
        }
        Err(_) => log::trace!(
            "virtio_iommu_bad_request type={} len={} status={status}",
            match req.first() {
                Some(&t @ req_type::ATTACH..=req_type::PROBE) => format!("{t}"),
                Some(t) => format!("{t} (unknown)"),
                None => "none".into(),
            },
            req.len()
        ),
    }
}
