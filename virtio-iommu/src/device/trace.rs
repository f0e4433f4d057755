//! One trace line per request, as QEMU's own virtio-iommu has one trace
//! event per request (hw/virtio/trace-events: `virtio_iommu_attach`,
//! `virtio_iommu_detach`, `virtio_iommu_map`, `virtio_iommu_unmap`,
//! `virtio_iommu_probe`), at `log` trace level with the fields that matter
//! and the status the device answered.
//!
//! The rule: a request costs nothing more while trace level is off — one
//! relaxed load of the `log` crate's maximum level; no formatting, no
//! allocation, no lock. The formatting is out of line, behind that check.

use crate::request::Request;
use crate::wire::{req_type, Status};

/// Trace the request `parsed` (or the failure to parse one, whose type
/// byte was `type_byte`) answered with `status`.
#[inline]
pub(super) fn request(parsed: &Result<Request, Status>, type_byte: Option<u8>, status: Status) {
    if log::max_level() >= log::LevelFilter::Trace {
        request_line(parsed, type_byte, status);
    }
}

#[cold]
#[inline(never)]
fn request_line(parsed: &Result<Request, Status>, type_byte: Option<u8>, status: Status) {
    match *parsed {
        Ok(Request::Attach {
            domain,
            endpoint,
            flags,
            ..
        }) => log::trace!(
            "virtio_iommu_attach domain={domain} endpoint={endpoint:#x} flags={flags:#x} \
             status={status:?}"
        ),
        Ok(Request::Detach { domain, endpoint }) => log::trace!(
            "virtio_iommu_detach domain={domain} endpoint={endpoint:#x} status={status:?}"
        ),
        Ok(Request::Map(m)) => log::trace!(
            "virtio_iommu_map domain={} virt_start={:#x} virt_end={:#x} phys_start={:#x} \
             flags={:#x} status={status:?}",
            m.domain,
            m.virt_start,
            m.virt_end,
            m.phys_start,
            m.flags
        ),
        Ok(Request::Unmap(u)) => log::trace!(
            "virtio_iommu_unmap domain={} virt_start={:#x} virt_end={:#x} status={status:?}",
            u.domain,
            u.virt_start,
            u.virt_end
        ),
        Ok(Request::Probe { endpoint }) => {
            log::trace!("virtio_iommu_probe endpoint={endpoint:#x} status={status:?}")
        }
        Err(_) => log::trace!(
            "virtio_iommu_bad_request type={} status={status:?}",
            match type_byte {
                Some(t @ req_type::ATTACH..=req_type::PROBE) => format!("{t}"),
                Some(t) => format!("{t} (unknown)"),
                None => "none (empty request)".into(),
            }
        ),
    }
}
