// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The device model: endpoints, domains and their mappings; each
//! translated domain over an IOAS of its own, bypassing endpoints over an
//! identity IOAS or none ([`DeviceConfig::identity_ioas`]).
//!
//! [`Device::handle_request`] carries out one request: its device-readable
//! bytes in, the reply (the tail, after the properties for PROBE) out, each
//! change of the translation state reported to a [`ChangeSink`]. The caller
//! owns the buffers and does the I/O; the device reaches the outside only
//! through its [`Iommufd`] (the in-process model, or the kernel's).
//!
//! By concern, each in the file named after what it answers:
//! - this file: the configuration, construction, the config space and the
//!   features, request dispatch, counters and reset;
//! - `attach.rs`: ATTACH and DETACH, endpoints coming and going, where an
//!   endpoint in no domain goes (bypass or blocked);
//! - `map.rs`: MAP and UNMAP;
//! - `probe_reply.rs`: PROBE;
//! - `translate.rs`: where an endpoint's access goes, and fault events;
//! - `memory.rs`: guest RAM as the device sees it, and moves of the
//!   front-end's memory table;
//! - `save_restore.rs`: the whole state as changes (a mirror's replay, the
//!   migration state), and restoring one.
//!
//! The change stream itself ([`Change`], [`ChangeSink`]) is the crate's
//! `change.rs`: the migration state and the journal are written in it too.

use std::collections::BTreeMap;

use iopt::{DeviceId, IoasId, Iommufd, IoptError, Prot};
use vm_memory::ByteValued;

use crate::domain::Domain;
use crate::request::{self, Request};
use crate::wire::{feature, map_flags, req_type, ConfigSpace, ReqTail, Status};

mod attach;
mod map;
mod memory;
mod probe_reply;
mod save_restore;
#[cfg(test)]
mod test_support;
mod translate;

pub use crate::change::{Change, ChangeSink, Discard};
pub use memory::{GuestRam, NoRam, RamRegion};
pub use save_restore::RestoreError;
pub use translate::{encode_fault, Translation};

use map::MissingRam;

/// The device's configuration: what the config space advertises, plus the
/// MSI doorbell window PROBE reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Supported page sizes; the smallest is the mapping granule.
    pub page_size_mask: u64,
    /// Inclusive IOVA range domains can map.
    pub input_range: (u64, u64),
    /// Inclusive range of domain IDs.
    pub domain_range: (u32, u32),
    /// Bytes of PROBE properties per request.
    pub probe_size: u32,
    /// `bypass` at power-on: unattached endpoints bypass translation.
    pub bypass: bool,
    /// Inclusive MSI doorbell window, reported as RESV_MEM MSI.
    pub msi_window: (u64, u64),
    /// How a bypassing endpoint (bypass domain, or unattached with `bypass`
    /// set) is backed. `false`: its device is detached from every IOAS and
    /// whoever moves its data bypasses translation itself (emulated mode:
    /// QEMU, told through the mirror). `true`: its device is attached to an
    /// identity IOAS that maps all of guest RAM 1:1 (pass-through mode: the
    /// hardware IOMMU must be given those mappings).
    pub identity_ioas: bool,
}

/// The PROBE property area sizes a device may offer: room for at least one
/// RESV_MEM property (24 bytes), at most a page (the driver allocates
/// `probe_size` + the tail for every PROBE). A multiple of 4 (properties
/// are 4-byte aligned, virtio 1.3 §5.13.6.8).
pub const PROBE_SIZES: std::ops::RangeInclusive<u32> = 24..=4096;

impl DeviceConfig {
    /// Whether `probe_size` is one a device may offer ([`PROBE_SIZES`]).
    pub fn probe_size_ok(probe_size: u32) -> bool {
        PROBE_SIZES.contains(&probe_size) && probe_size.is_multiple_of(4)
    }
}

impl Default for DeviceConfig {
    /// 4 KiB and larger pages, 48-bit IOVAs, any 32-bit domain ID, 512 bytes
    /// of PROBE properties, boot bypass on (as the CLI and QEMU's own
    /// virtio-iommu), the x86 MSI window.
    fn default() -> Self {
        Self {
            page_size_mask: !0xfff,
            input_range: (0, (1 << 48) - 1),
            domain_range: (0, u32::MAX),
            probe_size: 512,
            bypass: true,
            msi_window: (0xfee0_0000, 0xfeef_ffff),
            identity_ioas: false,
        }
    }
}

/// A configuration the device refuses, or a refused config-space write.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("page_size_mask must not be zero")]
    NoPageSize,
    #[error("{0} range is empty (start > end)")]
    EmptyRange(&'static str),
    #[error("probe_size {0} is not a multiple of 4 between 24 and 4096")]
    BadProbeSize(u32),
    #[error("endpoint {0} is listed twice")]
    DuplicateEndpoint(u32),
    #[error("config offset {offset} (length {len}) is read-only")]
    ReadOnly { offset: u32, len: usize },
    #[error("bypass must be 0 or 1, not {0}")]
    BadBypass(u8),
    #[error("bypass is writable only with VIRTIO_IOMMU_F_BYPASS_CONFIG negotiated")]
    BypassNotNegotiated,
    #[error("cannot set up the identity IOAS for bypassing endpoints: {0}")]
    Identity(IoptError),
}

/// Counts per request type (index = type byte; 0 collects unknown types).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub ok: [u64; 6],
    pub failed: [u64; 6],
    pub domains: usize,
    pub mappings: usize,
    pub attached: usize,
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = ["other", "attach", "detach", "map", "unmap", "probe"];
        for (i, n) in names.iter().enumerate() {
            write!(f, "{n} {}/{} ", self.ok[i], self.failed[i])?;
        }
        write!(
            f,
            "(ok/failed); {} domains, {} mappings, {} endpoints attached",
            self.domains, self.mappings, self.attached
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Endpoint {
    dev: DeviceId,
    domain: Option<u32>,
}

/// The virtio-iommu device over an [`Iommufd`].
#[derive(Debug)]
pub struct Device<F: Iommufd> {
    cfg: DeviceConfig,
    iommufd: F,
    endpoints: BTreeMap<u32, Endpoint>,
    domains: BTreeMap<u32, Domain>,
    acked: u64,
    bypass: bool,
    /// The IOAS bypassing endpoints are attached to, with
    /// [`DeviceConfig::identity_ioas`].
    identity: Option<IoasId>,
    stats: Stats,
}

/// Bytes of a request's tail (`struct virtio_iommu_req_tail`).
const TAIL_LEN: usize = std::mem::size_of::<ReqTail>();

/// The status an IOAS failure becomes.
fn status_of(e: &IoptError) -> Status {
    match e {
        // ENOMEM from the kernel: pinning the pages went over RLIMIT_MEMLOCK.
        IoptError::NoSpace | IoptError::Other(iopt::Errno::ENOMEM) => Status::NoMem,
        IoptError::Overflow => Status::Range,
        IoptError::Invalid(_) | IoptError::AddressInUse | IoptError::Exists => Status::Inval,
        _ => Status::DevErr,
    }
}

fn has(features: u64, bit: u32) -> bool {
    features & (1 << bit) != 0
}

fn prot_of(flags: u32) -> Prot {
    Prot {
        read: flags & map_flags::READ != 0,
        write: flags & map_flags::WRITE != 0,
    }
}

impl<F: Iommufd> Device<F> {
    /// A device managing `endpoints` (endpoint ID, and the IOAS device that
    /// stands for it).
    pub fn new(
        cfg: DeviceConfig,
        iommufd: F,
        endpoints: impl IntoIterator<Item = (u32, DeviceId)>,
    ) -> Result<Self, ConfigError> {
        if cfg.page_size_mask == 0 {
            return Err(ConfigError::NoPageSize);
        }
        if cfg.input_range.0 > cfg.input_range.1 {
            return Err(ConfigError::EmptyRange("input"));
        }
        if cfg.domain_range.0 > cfg.domain_range.1 {
            return Err(ConfigError::EmptyRange("domain"));
        }
        if cfg.msi_window.0 > cfg.msi_window.1 {
            return Err(ConfigError::EmptyRange("MSI"));
        }
        if !DeviceConfig::probe_size_ok(cfg.probe_size) {
            return Err(ConfigError::BadProbeSize(cfg.probe_size));
        }
        let mut map = BTreeMap::new();
        for (ep, dev) in endpoints {
            if map.insert(ep, Endpoint { dev, domain: None }).is_some() {
                return Err(ConfigError::DuplicateEndpoint(ep));
            }
        }
        let mut d = Self {
            cfg,
            iommufd,
            endpoints: map,
            domains: BTreeMap::new(),
            acked: 0,
            bypass: cfg.bypass,
            identity: None,
            stats: Stats::default(),
        };
        // With no endpoint yet (they arrive with the front-end), the identity
        // IOAS waits for the first one: its iommufd may not exist before.
        if cfg.identity_ioas && !d.endpoints.is_empty() {
            d.identity = Some(d.iommufd.ioas_alloc().map_err(ConfigError::Identity)?);
            d.park_unattached().map_err(ConfigError::Identity)?;
        }
        Ok(d)
    }

    /// The configuration.
    pub fn device_config(&self) -> &DeviceConfig {
        &self.cfg
    }

    /// The feature bits offered (virtio 1.2 §5.13.3): INPUT_RANGE,
    /// DOMAIN_RANGE, MAP_UNMAP, PROBE, MMIO, BYPASS_CONFIG. The legacy
    /// BYPASS bit is not offered.
    pub fn features(&self) -> u64 {
        [
            feature::INPUT_RANGE,
            feature::DOMAIN_RANGE,
            feature::MAP_UNMAP,
            feature::PROBE,
            feature::MMIO,
            feature::BYPASS_CONFIG,
        ]
        .iter()
        .fold(0, |f, b| f | 1 << b)
    }

    /// The features the driver accepted; only offered ones count.
    pub fn set_acked_features(&mut self, features: u64) {
        self.acked = features & self.features();
    }

    /// The features the driver acknowledged (offered ones only).
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    pub(super) fn acked(&self, bit: u32) -> bool {
        has(self.acked, bit)
    }

    /// The config space (virtio 1.2 §5.13.4), `bypass` as it is now.
    pub fn config(&self) -> ConfigSpace {
        ConfigSpace {
            page_size_mask: self.cfg.page_size_mask.into(),
            input_start: self.cfg.input_range.0.into(),
            input_end: self.cfg.input_range.1.into(),
            domain_start: self.cfg.domain_range.0.into(),
            domain_end: self.cfg.domain_range.1.into(),
            probe_size: self.cfg.probe_size.into(),
            bypass: u8::from(self.bypass),
            reserved: [0; 3],
        }
    }

    /// A driver write to the config space. Only `bypass` (offset 36) is
    /// writable, with BYPASS_CONFIG negotiated (virtio 1.2 §5.13.4.2).
    pub fn write_config(
        &mut self,
        offset: u32,
        data: &[u8],
        sink: &mut impl ChangeSink,
    ) -> Result<(), ConfigError> {
        if offset != 36 || data.len() != 1 {
            return Err(ConfigError::ReadOnly {
                offset,
                len: data.len(),
            });
        }
        if !self.acked(feature::BYPASS_CONFIG) {
            return Err(ConfigError::BypassNotNegotiated);
        }
        let on = match data[0] {
            0 => false,
            1 => true,
            v => return Err(ConfigError::BadBypass(v)),
        };
        if on != self.bypass {
            self.bypass = on;
            // Failures are logged; a device left detached has its DMA
            // blocked, never more access than asked for.
            let _ = self.park_unattached();
            sink.change(Change::GlobalBypass(on));
        }
        Ok(())
    }

    /// The IOAS implementation.
    pub fn iommufd(&self) -> &F {
        &self.iommufd
    }

    /// The IOAS implementation, mutably.
    pub fn iommufd_mut(&mut self) -> &mut F {
        &mut self.iommufd
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        let mut s = self.stats;
        s.domains = self.domains.len();
        s.mappings = self.domains.values().map(Domain::mapping_count).sum();
        s.attached = self
            .endpoints
            .values()
            .filter(|e| e.domain.is_some())
            .count();
        s
    }

    /// The domain an endpoint is attached to.
    pub fn domain_of(&self, endpoint: u32) -> Option<u32> {
        self.endpoints.get(&endpoint).and_then(|e| e.domain)
    }

    /// The domain with this ID.
    pub fn domain(&self, id: u32) -> Option<&Domain> {
        self.domains.get(&id)
    }

    /// The domains from ID `first` on, in ID order (a page of them is
    /// copied out under the caller's lock: each step is one tree step).
    pub fn domains_from(&self, first: u32) -> impl Iterator<Item = (u32, &Domain)> + '_ {
        self.domains.range(first..).map(|(&id, d)| (id, d))
    }

    /// The endpoints from ID `first` on, in ID order, with the domain each
    /// is attached to.
    pub fn endpoints_from(&self, first: u32) -> impl Iterator<Item = (u32, Option<u32>)> + '_ {
        self.endpoints.range(first..).map(|(&id, e)| (id, e.domain))
    }

    /// The number of endpoints the device manages.
    pub fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }

    /// Requests carried out and failed, per type byte (index 0: unknown
    /// types), without the walks [`Self::stats`] makes.
    pub fn request_counts(&self) -> ([u64; 6], [u64; 6]) {
        (self.stats.ok, self.stats.failed)
    }

    /// Whether unattached endpoints bypass translation now (the config
    /// space's `bypass`).
    pub fn bypass(&self) -> bool {
        self.bypass
    }

    /// Handle one request: `req` is the device-readable part of the chain,
    /// `reply` its device-writable part. Returns the bytes written to
    /// `reply` (the used length): the tail, after `probe_size` property
    /// bytes for PROBE (one whose `req` is cut short too); 0 when `reply`
    /// cannot hold a tail, and for a request type the device does not
    /// recognise (then `reply` is not written).
    pub fn handle_request(
        &mut self,
        req: &[u8],
        reply: &mut [u8],
        ram: &impl GuestRam,
        sink: &mut impl ChangeSink,
    ) -> usize {
        if reply.len() < TAIL_LEN {
            return 0;
        }
        let parsed = request::parse(req);
        let (status, tail_at) = match parsed {
            // virtio 1.3 §5.13.6.1: an unrecognised type leaves the buffer
            // unwritten, used length 0.
            Err(Status::Unsupp) => {
                self.stats.failed[0] += 1;
                return 0;
            }
            // A PROBE too short to name its endpoint: the tail still goes
            // where the driver reads a PROBE's, after the properties.
            Err(Status::IoErr) if req.first() == Some(&req_type::PROBE) => {
                self.probe_reply(None, reply)
            }
            Err(status) => (status, 0),
            Ok(Request::Probe { endpoint }) => self.probe_reply(Some(endpoint), reply),
            Ok(r) => (self.dispatch(r, ram, sink), 0),
        };
        let kind = parsed.map(|r| r.type_byte() as usize).unwrap_or(0).min(5);
        if status == Status::Ok {
            self.stats.ok[kind] += 1;
        } else {
            self.stats.failed[kind] += 1;
        }
        let tail = ReqTail {
            status: status as u8,
            reserved: [0; 3],
        };
        reply[tail_at..tail_at + TAIL_LEN].copy_from_slice(tail.as_slice());
        tail_at + TAIL_LEN
    }

    fn dispatch(&mut self, r: Request, ram: &impl GuestRam, sink: &mut impl ChangeSink) -> Status {
        match r {
            Request::Attach {
                domain,
                endpoint,
                flags,
                reserved_clear,
            } => self.attach(domain, endpoint, flags, reserved_clear, sink),
            Request::Detach { domain, endpoint } => self.detach(domain, endpoint, sink),
            Request::Map(m) => self.map(m, ram, MissingRam::Refuse, sink),
            Request::Unmap(u) => self.unmap(u, sink),
            Request::Probe { .. } => unreachable!("PROBE is handled with its reply area"),
        }
    }

    /// Device reset (virtio 1.2 §2.4): the translation state goes back to
    /// power-on ([`Self::reset_translation`]) and the features are
    /// forgotten.
    pub fn reset(&mut self, sink: &mut impl ChangeSink) {
        self.reset_translation(sink);
        self.acked = 0;
    }

    /// The translation state back to power-on, as a system reset QEMU
    /// reports over the mirror does (docs/mirror-protocol.md §9 rule 2):
    /// every domain goes with its mappings and IOAS, every endpoint is
    /// detached, `bypass` returns to its boot value. The acknowledged
    /// features are the transport's and stay: a system reset reported late
    /// can come after the next driver acknowledged its own.
    pub fn reset_translation(&mut self, sink: &mut impl ChangeSink) {
        self.bypass = self.cfg.bypass;
        let target = self.parking();
        let attached: Vec<DeviceId> = self
            .endpoints
            .values_mut()
            .filter_map(|ep| ep.domain.take().map(|_| ep.dev))
            .collect();
        for dev in attached {
            if let Err(e) = self.place(dev, target) {
                // Blocked rather than left in a domain IOAS that could then
                // not be destroyed (found by vui-fuzz: a device whose page is
                // larger than the identity IOAS's areas' alignment).
                log::warn!("reset: moving device {dev:?} out of its domain: {e}; blocking it");
                let _ = self.iommufd.detach(dev);
            }
        }
        let ids: Vec<u32> = self.domains.keys().copied().collect();
        for id in ids {
            self.destroy_domain(id, &mut Discard);
        }
        let _ = self.park_unattached();
        sink.change(Change::Reset);
        sink.change(Change::GlobalBypass(self.bypass));
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{device, run, RAM_AT_0};
    use super::*;
    use iopt::model::ModelIommufd;

    #[test]
    fn an_unknown_request_type_leaves_the_buffer_unwritten_with_used_length_0() {
        let mut d = device();
        for t in [0u8, 6, 0x7f, 0xff] {
            let mut req = [0u8; 64];
            req[0] = t;
            let mut reply = [0xaau8; 8];
            let n = d.handle_request(&req, &mut reply, &RAM_AT_0, &mut Discard);
            assert_eq!(n, 0, "type {t}");
            assert_eq!(reply, [0xaa; 8], "type {t}: nothing written");
        }
    }

    #[test]
    fn the_default_config_bypasses_at_boot_as_the_cli_and_qemu_do() {
        assert!(DeviceConfig::default().bypass);
    }

    #[test]
    fn short_replies_get_nothing_and_short_requests_an_error() {
        let mut d = device();
        let mut reply = [0u8; 3];
        assert_eq!(
            d.handle_request(&[1, 0, 0, 0], &mut reply, &RAM_AT_0, &mut Discard),
            0
        );
        let mut reply = [0xffu8; 4];
        assert_eq!(
            d.handle_request(&[1, 0, 0, 0], &mut reply, &RAM_AT_0, &mut Discard),
            4
        );
        assert_eq!(reply[0], Status::IoErr as u8);
        assert_eq!(
            d.handle_request(&[], &mut reply, &RAM_AT_0, &mut Discard),
            4
        );
        assert_eq!(reply[0], Status::DevErr as u8);
        let mut reply = [0xaau8; 4];
        assert_eq!(
            d.handle_request(&[0x77, 0, 0, 0], &mut reply, &RAM_AT_0, &mut Discard),
            0,
            "unknown type: used length 0"
        );
        assert_eq!(reply, [0xaa; 4]);
    }

    #[test]
    fn bypass_is_writable_only_with_the_feature_and_is_mirrored() {
        let mut d = device();
        let mut changes = vec![];
        assert!(d.write_config(36, &[2], &mut changes).is_err());
        assert!(d.write_config(0, &[1], &mut changes).is_err());
        d.write_config(36, &[1], &mut changes).unwrap();
        assert_eq!(changes, vec![Change::GlobalBypass(true)]);
        assert_eq!(d.config().bypass, 1);
        d.set_acked_features(0);
        assert_eq!(
            d.write_config(36, &[0], &mut changes),
            Err(ConfigError::BypassNotNegotiated)
        );
    }

    #[test]
    fn a_translation_reset_keeps_the_features_a_device_reset_forgets_them() {
        let mut d = device();
        d.set_acked_features(u64::MAX);
        let offered = d.features();
        let mut r = run(&mut d);
        r.attach(1, 8, 0);
        let mut changes = vec![];
        d.reset_translation(&mut changes);
        assert_eq!(changes, vec![Change::Reset, Change::GlobalBypass(false)]);
        assert_eq!((d.stats().domains, d.acked_features()), (0, offered));
        d.reset(&mut Discard);
        assert_eq!(d.acked_features(), 0);
    }

    #[test]
    fn configs_the_device_cannot_serve_are_refused() {
        let bad = [
            DeviceConfig {
                page_size_mask: 0,
                ..Default::default()
            },
            DeviceConfig {
                input_range: (2, 1),
                ..Default::default()
            },
            DeviceConfig {
                probe_size: 10,
                ..Default::default()
            },
        ];
        for cfg in bad {
            assert!(
                Device::new(cfg, ModelIommufd::new(), []).is_err(),
                "{cfg:?}"
            );
        }
        let dup = Device::new(
            DeviceConfig::default(),
            ModelIommufd::new(),
            [(1, DeviceId(1)), (1, DeviceId(2))],
        );
        assert_eq!(dup.err(), Some(ConfigError::DuplicateEndpoint(1)));
    }

    proptest::proptest! {
        #[test]
        fn no_input_panics_or_overruns_the_reply(
            req in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..100),
            reply_len in 0usize..600,
            kind in 0u8..7,
        ) {
            let mut d = device();
            let mut req = req;
            if let Some(b) = req.first_mut() {
                *b = kind;
            }
            let mut reply = vec![0u8; reply_len];
            let n = d.handle_request(&req, &mut reply, &RAM_AT_0, &mut Discard);
            proptest::prop_assert!(n <= reply_len);
        }
    }
}
