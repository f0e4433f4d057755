// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the control socket reads of the device (src/control/): snapshots
//! copied out under the device lock, each bounded — a page is at most
//! [`MAX_PAGE`] entries, and an `endpoints` answer looks at most at
//! [`MAX_SCAN`] endpoints — with its buffer allocated before the lock is
//! taken, so the request path waits at most for one page's copy.

use std::sync::Arc;

use virtio_iommu::Translation as Translated;

use super::IommuBackend;
use crate::control::protocol::{
    Access, DeviceSummary, DomainRow, EndpointRow, MappingRow, Mappings, Mirror, Page,
    RequestSummary, Translation, MAX_PAGE, MAX_SCAN,
};
use crate::control::{FaultRecord, Telemetry};

/// The device's counters as `counters` gives them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CounterSnapshot {
    pub ok: [u64; 6],
    pub failed: [u64; 6],
    pub device: DeviceSummary,
    pub queue: super::QueueStats,
    pub table: Option<crate::mirror::TableStats>,
}

impl IommuBackend {
    /// What the request path records for the control socket.
    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.telemetry
    }

    /// Record for `telemetry` (a control socket reads it).
    pub fn with_telemetry(mut self, telemetry: Arc<Telemetry>) -> Self {
        self.lock().session.watch(telemetry.clone());
        self.telemetry = telemetry;
        self
    }

    /// The device in numbers, and its requests' outcomes. Under the lock:
    /// one step per domain (not per endpoint or mapping).
    pub fn summary(&self) -> (DeviceSummary, RequestSummary) {
        let st = self.lock();
        let device = st.session.device();
        let (ok, failed) = device.request_counts();
        (
            Self::device_summary(device),
            RequestSummary {
                ok: ok.iter().sum(),
                failed: failed.iter().sum(),
            },
        )
    }

    fn device_summary(device: &crate::ioas::IommuDevice) -> DeviceSummary {
        let (mut attached, mut mappings, mut domains) = (0, 0, 0);
        for (_, d) in device.domains_from(0) {
            domains += 1;
            attached += d.endpoints as usize;
            mappings += d.mapping_count();
        }
        DeviceSummary {
            bypass: device.bypass(),
            endpoints: device.endpoint_count(),
            attached,
            domains,
            mappings,
        }
    }

    /// Every counter, copied under the lock at once.
    pub fn counter_snapshot(&self) -> CounterSnapshot {
        let st = self.lock();
        let device = st.session.device();
        let (ok, failed) = device.request_counts();
        CounterSnapshot {
            ok,
            failed,
            device: Self::device_summary(device),
            queue: super::QueueStats {
                answered_again: st.session.answered_again(),
                ..st.stats
            },
            table: st.session.table().map(|t| t.stats()),
        }
    }

    /// Up to `count` endpoints from ID `start` on (only attached ones if
    /// `attached`), and the ID to go on from.
    pub fn endpoints_page(&self, start: u32, count: u32, attached: bool) -> Page<EndpointRow, u32> {
        let count = count.clamp(1, MAX_PAGE);
        let mut entries = Vec::with_capacity(count as usize);
        let st = self.lock();
        let mut next = None;
        let endpoints = st.session.device().endpoints_from(start);
        for (looked, (endpoint, domain)) in endpoints.enumerate() {
            if entries.len() == count as usize || looked == MAX_SCAN as usize {
                next = Some(endpoint);
                break;
            }
            if !attached || domain.is_some() {
                entries.push(EndpointRow { endpoint, domain });
            }
        }
        Page { entries, next }
    }

    /// Up to `count` domains from ID `start` on.
    pub fn domains_page(&self, start: u32, count: u32) -> Page<DomainRow, u32> {
        let count = count.clamp(1, MAX_PAGE) as usize;
        let mut entries = Vec::with_capacity(count);
        let st = self.lock();
        let mut next = None;
        for (domain, d) in st.session.device().domains_from(start) {
            if entries.len() == count {
                next = Some(domain);
                break;
            }
            entries.push(DomainRow {
                domain,
                bypass: d.is_bypass(),
                endpoints: d.endpoints,
                mappings: d.mapping_count(),
            });
        }
        Page { entries, next }
    }

    /// Up to `count` mappings of `domain` from the one holding IOVA
    /// `start` (or the first after it) on; `None`: no such domain.
    pub fn mappings_page(&self, domain: u32, start: u64, count: u32) -> Option<Mappings> {
        let count = count.clamp(1, MAX_PAGE) as usize;
        let mut entries = Vec::with_capacity(count);
        let st = self.lock();
        let d = st.session.device().domain(domain)?;
        let mut next = None;
        for m in d.mappings_from(start) {
            if entries.len() == count {
                next = Some(m.map.virt_start);
                break;
            }
            entries.push(MappingRow {
                virt_start: m.map.virt_start,
                virt_end: m.map.virt_end,
                phys_start: m.map.phys_start,
                flags: m.map.flags,
                in_ioas: m.in_ioas,
            });
        }
        Some(Mappings {
            domain,
            total: d.mapping_count(),
            page: Page { entries, next },
        })
    }

    /// Where an access by `endpoint` to `iova` goes now (what QEMU's
    /// translate() does with the mirrored state): with [`Access::Any`], a
    /// mapping with either permission translates.
    pub fn translate(&self, endpoint: u32, iova: u64, access: Access) -> Translation {
        let st = self.lock();
        let device = st.session.device();
        let domain = device.domain_of(endpoint);
        let t = match access {
            Access::Read => device.translate(endpoint, iova, false),
            Access::Write => device.translate(endpoint, iova, true),
            Access::Any => match device.translate(endpoint, iova, false) {
                Translated::Fault { .. } => device.translate(endpoint, iova, true),
                t => t,
            },
        };
        drop(st);
        let mut out = Translation {
            endpoint,
            iova,
            domain,
            result: String::new(),
            gpa: None,
            len: None,
            flags: None,
            reason: None,
        };
        match t {
            Translated::Mapped { gpa, len, flags } => {
                out.result = "mapped".into();
                (out.gpa, out.len, out.flags) = (Some(gpa), Some(len), Some(flags));
            }
            Translated::Bypass => out.result = "bypass".into(),
            Translated::Fault { reason } => {
                out.result = "fault".into();
                out.reason = Some(FaultRecord::new(reason, 0, endpoint, iova).reason.into());
            }
        }
        out
    }

    /// The mirror as the control socket tells it.
    pub fn mirror_status(&self) -> Mirror {
        let (connected, pid, synced) = self.mirror.peer();
        Mirror {
            configured: self.mirror.memory().is_some(),
            connected,
            pid,
            synced,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::MirrorHandle;

    /// A backend over the default device: every endpoint `0-0xffff`.
    fn backend() -> IommuBackend {
        let config = crate::config::RawConfig::default().check().unwrap();
        let device = crate::emulated::device(&config).unwrap();
        IommuBackend::new(device, MirrorHandle::disconnected())
    }

    #[test]
    fn a_page_copies_at_most_its_count_and_looks_at_most_at_max_scan_endpoints() {
        let b = backend();
        let p = b.endpoints_page(0, u32::MAX, false);
        assert_eq!(
            (p.entries.len(), p.next),
            (MAX_PAGE as usize, Some(MAX_PAGE))
        );
        // None attached: a page of nothing, after MAX_SCAN looks.
        let p = b.endpoints_page(0, 16, true);
        assert_eq!((p.entries.len(), p.next), (0, Some(MAX_SCAN)));
        let p = b.endpoints_page(0xfff0, 1024, false);
        assert_eq!((p.entries.len(), p.next), (16, None));
        let p = b.domains_page(0, 0);
        assert_eq!((p.entries.len(), p.next), (0, None));
        assert!(b.mappings_page(1, 0, 1).is_none());
        let (d, r) = b.summary();
        assert_eq!(
            (d.endpoints, d.attached, d.domains, r.ok),
            (0x1_0000, 0, 0, 0)
        );
    }

    #[test]
    fn translate_names_why_an_access_goes_nowhere() {
        let b = backend();
        let t = b.translate(0x1_0000, 0, Access::Any);
        assert_eq!(
            (t.result.as_str(), t.reason.as_deref()),
            ("fault", Some("unknown"))
        );
        let t = b.translate(8, 0x1000, Access::Write);
        assert_eq!((t.result.as_str(), t.domain), ("bypass", None));
    }
}
