//! The device model: endpoints, domains, mappings, over one IOAS per domain.
//!
//! [`Device::handle_request`] is the whole request path: bytes in, status
//! (and PROBE properties) out, changes reported to a [`ChangeSink`]. It does
//! no I/O and no allocation on the MAP/UNMAP/ATTACH/DETACH path; the caller
//! owns the buffers.

use std::collections::BTreeMap;

use iopt::{DeviceId, IoasId, Iommufd, IoptError, IovaRange, MapRequest, Prot};
use vm_memory::ByteValued;

use crate::domain::{Domain, Mapping};
use crate::probe::PropertyWriter;
use crate::request::{self, Request};
use crate::state::DeviceState;
use crate::wire::{
    fault, feature, map_flags, probe, ConfigSpace, FaultEvent, ReqTail, Status, ATTACH_F_BYPASS,
};

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

/// One region of guest RAM: `len` bytes at guest physical address `gpa`,
/// mapped at `user_va` in this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    pub gpa: u64,
    pub len: u64,
    pub user_va: u64,
}

/// Guest RAM as the device sees it. Every guest physical address a request
/// carries is validated here, once.
pub trait GuestRam {
    /// The process address of `[gpa, gpa + len)`, if the whole range lies
    /// inside one region of guest RAM.
    fn user_addr(&self, gpa: u64, len: u64) -> Option<u64>;

    /// Call `f` for every region.
    fn for_each_region(&self, f: &mut dyn FnMut(RamRegion));
}

/// No guest RAM: before the front-end's memory table, and after it left.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoRam;

impl GuestRam for NoRam {
    fn user_addr(&self, _gpa: u64, _len: u64) -> Option<u64> {
        None
    }

    fn for_each_region(&self, _f: &mut dyn FnMut(RamRegion)) {}
}

/// A change of the translation state, for whoever mirrors it (QEMU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Attach {
        endpoint: u32,
        domain: u32,
        bypass: bool,
    },
    Detach {
        endpoint: u32,
        domain: u32,
    },
    Map {
        domain: u32,
        virt_start: u64,
        virt_end: u64,
        phys_start: u64,
        flags: u32,
    },
    Unmap {
        domain: u32,
        virt_start: u64,
        virt_end: u64,
    },
    GlobalBypass(bool),
    /// Everything is gone: no domains, no attachments.
    Reset,
}

/// What MAP does when the guest memory of a mapping is not (yet) known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MissingRam {
    /// A request: INVAL (unless MMIO).
    Refuse,
    /// A restored state: record it; [`Device::set_memory`] maps it later.
    Defer,
}

/// A migrated state the device refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("state entry {index} refused with status {status:?}")]
pub struct RestoreError {
    pub index: usize,
    pub status: Status,
}

/// Receives changes as the device makes them.
pub trait ChangeSink {
    fn change(&mut self, c: Change);
}

impl ChangeSink for Vec<Change> {
    fn change(&mut self, c: Change) {
        self.push(c);
    }
}

/// A sink that drops every change.
#[derive(Clone, Copy, Debug, Default)]
pub struct Discard;

impl ChangeSink for Discard {
    fn change(&mut self, _: Change) {}
}

/// Where an access by an endpoint goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Translation {
    /// To `gpa`; `len` bytes from there are contiguous in the mapping.
    Mapped { gpa: u64, len: u64, flags: u32 },
    /// Untranslated (bypass domain, or global bypass of an unattached
    /// endpoint).
    Bypass,
    /// Refused; `reason` is a `VIRTIO_IOMMU_FAULT_R_*`.
    Fault { reason: u8 },
}

impl std::fmt::Display for Translation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Translation::Mapped { gpa, len, flags } => {
                write!(
                    f,
                    "gpa {gpa:#x} ({len:#x} contiguous bytes, flags {flags:#x})"
                )
            }
            Translation::Bypass => write!(f, "bypass (untranslated)"),
            Translation::Fault { reason } => {
                let why = match reason {
                    fault::R_DOMAIN => "DOMAIN",
                    fault::R_MAPPING => "MAPPING",
                    _ => "UNKNOWN",
                };
                write!(f, "fault, reason {why}")
            }
        }
    }
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

/// The parts of `a` that are also in `b` (both sorted, disjoint).
fn intersect(a: &[IovaRange], b: &[IovaRange]) -> Vec<IovaRange> {
    let mut out = Vec::new();
    for x in a {
        for y in b {
            let start = x.start.max(y.start);
            let last = x.last.min(y.last);
            if start <= last {
                out.push(IovaRange { start, last });
            }
        }
    }
    out
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

    /// A new endpoint, standing for IOAS device `dev`, appears (a VFIO
    /// device hot-added, or forwarded by the front-end): it starts in no
    /// domain, so it bypasses (through the identity IOAS, rebuilt over `ram`
    /// to respect the new device's reserved regions) or is blocked, as
    /// `bypass` says. On failure nothing changed.
    pub fn add_endpoint(
        &mut self,
        endpoint: u32,
        dev: DeviceId,
        ram: &impl GuestRam,
    ) -> Result<(), ConfigError> {
        if self.endpoints.contains_key(&endpoint) {
            return Err(ConfigError::DuplicateEndpoint(endpoint));
        }
        let fresh_identity = self.cfg.identity_ioas && self.identity.is_none();
        if fresh_identity {
            self.identity = Some(self.iommufd.ioas_alloc().map_err(ConfigError::Identity)?);
        }
        self.endpoints
            .insert(endpoint, Endpoint { dev, domain: None });
        if let Some(identity) = self.identity {
            self.rebuild_identity(identity, ram);
        }
        if let Err(e) = self.place(dev, self.parking()) {
            self.endpoints.remove(&endpoint);
            if fresh_identity {
                if let Some(identity) = self.identity.take() {
                    let _ = self.iommufd.ioas_destroy(identity);
                }
            }
            return Err(ConfigError::Identity(e));
        }
        Ok(())
    }

    /// An endpoint goes away (its device was unplugged, or the front-end
    /// that forwarded it left): it leaves its domain as on DETACH, and its
    /// device is detached, that is blocked. Returns its IOAS device, if the
    /// endpoint existed.
    pub fn remove_endpoint(
        &mut self,
        endpoint: u32,
        sink: &mut impl ChangeSink,
    ) -> Option<DeviceId> {
        let ep = self.endpoints.remove(&endpoint)?;
        if let Err(e) = self.iommufd.detach(ep.dev) {
            // Detaching a device in no IOAS fails; it is blocked either way.
            log::debug!("endpoint {endpoint}: detaching its device: {e}");
        }
        if let Some(domain) = ep.domain {
            sink.change(Change::Detach { endpoint, domain });
            self.leave(domain, sink);
        }
        // The identity IOAS lives while there are endpoints (it was made
        // with the first one, in the iommufd they came with).
        if self.endpoints.is_empty() {
            if let Some(identity) = self.identity.take() {
                let _ = self.iommufd.unmap(identity, 0, u64::MAX);
                if let Err(e) = self.iommufd.ioas_destroy(identity) {
                    log::warn!("destroying the identity IOAS: {e}");
                }
            }
        }
        Some(ep.dev)
    }

    /// The endpoint IDs the device manages.
    pub fn endpoint_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.endpoints.keys().copied()
    }

    /// Where an endpoint in no domain goes: the identity IOAS when `bypass`
    /// is set and there is one, else nowhere (detached: DMA blocked, or
    /// bypassed by QEMU in emulated mode).
    fn parking(&self) -> Option<IoasId> {
        self.identity.filter(|_| self.bypass)
    }

    /// Put a device in `ioas`, or detach it.
    fn place(&mut self, dev: DeviceId, ioas: Option<IoasId>) -> iopt::Result<()> {
        match ioas {
            Some(ioas) => self.iommufd.attach(dev, ioas),
            None => self.iommufd.detach(dev),
        }
    }

    /// Move every unattached endpoint's device to [`Self::parking`]; the
    /// first failure is returned after trying them all.
    fn park_unattached(&mut self) -> iopt::Result<()> {
        if self.identity.is_none() {
            // Detached already: devices only leave an IOAS through `place`.
            return Ok(());
        }
        let target = self.parking();
        let devs: Vec<DeviceId> = self
            .endpoints
            .values()
            .filter(|e| e.domain.is_none())
            .map(|e| e.dev)
            .collect();
        let mut first = Ok(());
        for dev in devs {
            if let Err(e) = self.place(dev, target) {
                log::warn!("device {dev:?}: moving it for bypass={}: {e}", self.bypass);
                first = first.and(Err(e));
            }
        }
        first
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

    fn acked(&self, bit: u32) -> bool {
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

    /// Handle one request: `req` is the device-readable part of the chain,
    /// `reply` its device-writable part. Returns the bytes written to
    /// `reply` (the used length): the tail, after `probe_size` property
    /// bytes for PROBE; 0 when `reply` cannot hold a tail, and for a request
    /// type the device does not recognise (then `reply` is not written).
    pub fn handle_request(
        &mut self,
        req: &[u8],
        reply: &mut [u8],
        ram: &impl GuestRam,
        sink: &mut impl ChangeSink,
    ) -> usize {
        let tail_len = std::mem::size_of::<ReqTail>();
        if reply.len() < tail_len {
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
            Err(status) => (status, 0),
            Ok(Request::Probe { endpoint }) => {
                let props = self.cfg.probe_size as usize;
                if reply.len() < props + tail_len {
                    // §5.13.6.7.2: properties shorter than probe_size → no
                    // property, INVAL; the tail goes at the end of the
                    // buffer, where the driver reads it.
                    (Status::Inval, reply.len() - tail_len)
                } else {
                    (self.probe(endpoint, &mut reply[..props]), props)
                }
            }
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
        reply[tail_at..tail_at + tail_len].copy_from_slice(tail.as_slice());
        tail_at + tail_len
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
            Request::Map {
                domain,
                virt_start,
                virt_end,
                phys_start,
                flags,
            } => self.map(
                domain,
                virt_start,
                virt_end,
                phys_start,
                flags,
                (ram, MissingRam::Refuse),
                sink,
            ),
            Request::Unmap {
                domain,
                virt_start,
                virt_end,
            } => self.unmap(domain, virt_start, virt_end, sink),
            Request::Probe { .. } => unreachable!("PROBE is handled with its reply area"),
        }
    }

    /// ATTACH (virtio 1.2 §5.13.6.3):
    /// - reserved bytes set, unknown flags, or ATTACH_F_BYPASS without
    ///   BYPASS_CONFIG negotiated → INVAL;
    /// - unknown endpoint → NOENT; domain ID outside `domain_range` → RANGE;
    /// - an existing domain of the other kind (bypass vs translated) → INVAL;
    /// - an endpoint attached elsewhere is moved; the old domain goes with its
    ///   last endpoint.
    fn attach(
        &mut self,
        domain: u32,
        endpoint: u32,
        flags: u32,
        reserved_clear: bool,
        sink: &mut impl ChangeSink,
    ) -> Status {
        if !reserved_clear || flags & !ATTACH_F_BYPASS != 0 {
            return Status::Inval;
        }
        let want_bypass = flags & ATTACH_F_BYPASS != 0;
        if want_bypass && !self.acked(feature::BYPASS_CONFIG) {
            return Status::Inval;
        }
        let Some(&ep) = self.endpoints.get(&endpoint) else {
            return Status::NoEnt;
        };
        let (lo, hi) = self.cfg.domain_range;
        if domain < lo || domain > hi {
            return Status::Range;
        }
        if let Some(d) = self.domains.get(&domain) {
            if d.is_bypass() != want_bypass {
                return Status::Inval;
            }
        }
        if ep.domain == Some(domain) {
            return Status::Ok;
        }
        let created = !self.domains.contains_key(&domain);
        if created {
            let d = if want_bypass {
                Domain::bypass()
            } else {
                match self.iommufd.ioas_alloc() {
                    Ok(ioas) => Domain::translated(ioas),
                    Err(e) => return status_of(&e),
                }
            };
            self.domains.insert(domain, d);
        }
        // Move the device first: on failure the endpoint stays where it was.
        // A bypass domain's devices share the identity IOAS, if any.
        let target = self.domains[&domain].ioas.or(self.identity);
        let moved = self.place(ep.dev, target);
        if let Err(e) = moved {
            if created {
                self.destroy_domain(domain, sink);
            }
            return status_of(&e);
        }
        if let Some(old) = ep.domain {
            sink.change(Change::Detach {
                endpoint,
                domain: old,
            });
            self.leave(old, sink);
        }
        if let Some(d) = self.domains.get_mut(&domain) {
            d.endpoints += 1;
        }
        if let Some(e) = self.endpoints.get_mut(&endpoint) {
            e.domain = Some(domain);
        }
        sink.change(Change::Attach {
            endpoint,
            domain,
            bypass: want_bypass,
        });
        Status::Ok
    }

    /// An endpoint left `domain`; destroy it if it was the last one.
    fn leave(&mut self, domain: u32, sink: &mut impl ChangeSink) {
        let Some(d) = self.domains.get_mut(&domain) else {
            return;
        };
        d.endpoints = d.endpoints.saturating_sub(1);
        if d.endpoints == 0 {
            self.destroy_domain(domain, sink);
        }
    }

    /// Drop a domain with its mappings and its IOAS.
    fn destroy_domain(&mut self, domain: u32, sink: &mut impl ChangeSink) {
        let Some(d) = self.domains.remove(&domain) else {
            return;
        };
        if let Some(ioas) = d.ioas {
            if let Err(e) = self.iommufd.unmap(ioas, 0, u64::MAX) {
                log::warn!("domain {domain}: unmapping its IOAS failed: {e}");
            }
            if let Err(e) = self.iommufd.ioas_destroy(ioas) {
                log::warn!("domain {domain}: destroying its IOAS failed: {e}");
            }
        }
        if d.mapping_count() > 0 {
            sink.change(Change::Unmap {
                domain,
                virt_start: 0,
                virt_end: u64::MAX,
            });
        }
    }

    /// DETACH (virtio 1.3 §5.13.6.4): reserved bytes are ignored (the
    /// device MUST ignore them, unlike ATTACH's); unknown endpoint or domain
    /// → NOENT; endpoint not in that domain → INVAL.
    fn detach(&mut self, domain: u32, endpoint: u32, sink: &mut impl ChangeSink) -> Status {
        let Some(&ep) = self.endpoints.get(&endpoint) else {
            return Status::NoEnt;
        };
        if !self.domains.contains_key(&domain) {
            return Status::NoEnt;
        }
        if ep.domain != Some(domain) {
            return Status::Inval;
        }
        if let Err(e) = self.place(ep.dev, self.parking()) {
            return status_of(&e);
        }
        if let Some(e) = self.endpoints.get_mut(&endpoint) {
            e.domain = None;
        }
        sink.change(Change::Detach { endpoint, domain });
        self.leave(domain, sink);
        Status::Ok
    }

    /// MAP (virtio 1.2 §5.13.6.5):
    /// - unknown domain → NOENT; a bypass domain → INVAL;
    /// - unknown flags, or MMIO without the MMIO feature → INVAL;
    /// - `virt_start > virt_end` → INVAL; a physical range past 2^64 → RANGE;
    /// - `virt_start`, `virt_end + 1` or `phys_start` not aligned to the
    ///   page granule → RANGE; outside `input_range` → RANGE;
    /// - overlapping an existing mapping, or the MSI window (reserved,
    ///   §5.13.6.7: RESV_MEM MSI), → INVAL, nothing changes;
    /// - guest memory not entirely inside guest RAM → INVAL (the spec leaves
    ///   this to the device; a mapping of nothing would fault later) unless
    ///   the mapping is MMIO;
    /// - the IOAS refusing the area (e.g. the MSI window is reserved in it)
    ///   → the status of its error; nothing is recorded then.
    #[allow(clippy::too_many_arguments)]
    fn map(
        &mut self,
        domain: u32,
        virt_start: u64,
        virt_end: u64,
        phys_start: u64,
        flags: u32,
        (ram, missing): (&impl GuestRam, MissingRam),
        sink: &mut impl ChangeSink,
    ) -> Status {
        let granule = 1u64 << self.cfg.page_size_mask.trailing_zeros();
        let mmio_ok = self.acked(feature::MMIO);
        let Some(d) = self.domains.get_mut(&domain) else {
            return Status::NoEnt;
        };
        let Some(ioas) = d.ioas else {
            return Status::Inval;
        };
        if flags & !map_flags::MASK != 0 || (flags & map_flags::MMIO != 0 && !mmio_ok) {
            return Status::Inval;
        }
        if virt_start > virt_end {
            return Status::Inval;
        }
        let end_plus_one = virt_end.wrapping_add(1);
        if !virt_start.is_multiple_of(granule)
            || !end_plus_one.is_multiple_of(granule)
            || !phys_start.is_multiple_of(granule)
        {
            return Status::Range;
        }
        let (lo, hi) = self.cfg.input_range;
        if virt_start < lo || virt_end > hi {
            return Status::Range;
        }
        let Some(length) = (virt_end - virt_start).checked_add(1) else {
            return Status::Range;
        };
        // A physical range past 2^64 exists nowhere (an MMIO mapping is not
        // checked against RAM, so it would get through otherwise).
        if phys_start.checked_add(length - 1).is_none() {
            return Status::Range;
        }
        if d.overlaps(virt_start, virt_end) {
            return Status::Inval;
        }
        // The MSI window PROBE reports is reserved whatever the flags: a
        // mapping the IOAS never sees (no access flag, or MMIO outside RAM)
        // must not claim it either.
        let (msi_start, msi_end) = self.cfg.msi_window;
        if virt_start <= msi_end && virt_end >= msi_start {
            return Status::Inval;
        }
        let prot = prot_of(flags);
        let in_ioas = prot.read || prot.write;
        if in_ioas {
            let user_va = match ram.user_addr(phys_start, length) {
                Some(va) => va,
                None if flags & map_flags::MMIO != 0 || missing == MissingRam::Defer => {
                    return self
                        .record_map(domain, virt_start, virt_end, phys_start, flags, false, sink)
                }
                None => return Status::Inval,
            };
            let req = MapRequest {
                iova: Some(virt_start),
                user_va,
                length,
                prot,
            };
            if let Err(e) = self.iommufd.map(ioas, req) {
                return status_of(&e);
            }
        }
        self.record_map(
            domain, virt_start, virt_end, phys_start, flags, in_ioas, sink,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn record_map(
        &mut self,
        domain: u32,
        virt_start: u64,
        virt_end: u64,
        phys_start: u64,
        flags: u32,
        in_ioas: bool,
        sink: &mut impl ChangeSink,
    ) -> Status {
        if let Some(d) = self.domains.get_mut(&domain) {
            d.insert(Mapping {
                virt_start,
                virt_end,
                phys_start,
                flags,
                in_ioas,
            });
        }
        sink.change(Change::Map {
            domain,
            virt_start,
            virt_end,
            phys_start,
            flags,
        });
        Status::Ok
    }

    /// UNMAP (virtio 1.2 §5.13.6.6): unknown domain → NOENT; a bypass domain
    /// or `virt_start > virt_end` → INVAL; a mapping reaching outside the
    /// range would be split → RANGE and nothing is removed (checked before
    /// anything changes); removing nothing is OK.
    fn unmap(
        &mut self,
        domain: u32,
        virt_start: u64,
        virt_end: u64,
        sink: &mut impl ChangeSink,
    ) -> Status {
        let Some(d) = self.domains.get_mut(&domain) else {
            return Status::NoEnt;
        };
        let Some(ioas) = d.ioas else {
            return Status::Inval;
        };
        if virt_start > virt_end {
            return Status::Inval;
        }
        if d.unmap_would_split(virt_start, virt_end) {
            return Status::Range;
        }
        let mut status = Status::Ok;
        while let Some(m) = d.pop_in(virt_start, virt_end) {
            if m.in_ioas {
                let len = m.virt_end - m.virt_start + 1;
                if let Err(e) = self.iommufd.unmap(ioas, m.virt_start, len) {
                    log::warn!(
                        "domain {domain}: IOAS unmap {:#x}+{len:#x}: {e}",
                        m.virt_start
                    );
                    status = Status::DevErr;
                }
            }
            sink.change(Change::Unmap {
                domain,
                virt_start: m.virt_start,
                virt_end: m.virt_end,
            });
        }
        status
    }

    /// PROBE (virtio 1.2 §5.13.6.8): needs the PROBE feature (else UNSUPP);
    /// unknown endpoint → NOENT. Writes RESV_MEM MSI for the MSI window, then
    /// RESV_MEM RESERVED for every part of the input range the endpoint's
    /// IOAS device cannot use (its reserved regions and aperture), except
    /// the MSI window itself. Properties that do not fit are left out.
    fn probe(&mut self, endpoint: u32, area: &mut [u8]) -> Status {
        let mut w = PropertyWriter::new(area);
        if !self.acked(feature::PROBE) {
            return Status::Unsupp;
        }
        let Some(&ep) = self.endpoints.get(&endpoint) else {
            return Status::NoEnt;
        };
        let (msi_start, msi_end) = self.cfg.msi_window;
        w.resv_mem(probe::RESV_MEM_T_MSI, msi_start, msi_end);
        let usable = match self.iommufd.device_iova_ranges(ep.dev) {
            Ok(u) => u,
            Err(e) => return status_of(&e),
        };
        let (lo, hi) = self.cfg.input_range;
        let mut report = |start: u64, end: u64| {
            // Split around the MSI window, which is already reported.
            if end < msi_start || start > msi_end {
                w.resv_mem(probe::RESV_MEM_T_RESERVED, start, end);
                return;
            }
            if start < msi_start {
                w.resv_mem(probe::RESV_MEM_T_RESERVED, start, msi_start - 1);
            }
            if end > msi_end {
                w.resv_mem(probe::RESV_MEM_T_RESERVED, msi_end + 1, end);
            }
        };
        let mut next = Some(lo);
        for r in usable.iter().filter(|r| r.last >= lo && r.start <= hi) {
            if let Some(cur) = next {
                if r.start > cur {
                    report(cur, r.start - 1);
                }
            }
            next = r.last.checked_add(1);
        }
        if let Some(cur) = next {
            if cur <= hi {
                report(cur, hi);
            }
        }
        Status::Ok
    }

    /// Where an access by `endpoint` to `iova` goes (what QEMU's translate()
    /// does with the mirrored state; virtio 1.2 §5.13.6.9 for the fault
    /// reasons): an unattached endpoint bypasses if `bypass` is set, else
    /// faults with DOMAIN; no mapping or a missing permission faults with
    /// MAPPING.
    pub fn translate(&self, endpoint: u32, iova: u64, write: bool) -> Translation {
        let Some(ep) = self.endpoints.get(&endpoint) else {
            return Translation::Fault {
                reason: fault::R_UNKNOWN,
            };
        };
        let Some(d) = ep.domain.and_then(|id| self.domains.get(&id)) else {
            return if self.bypass {
                Translation::Bypass
            } else {
                Translation::Fault {
                    reason: fault::R_DOMAIN,
                }
            };
        };
        if d.is_bypass() {
            return Translation::Bypass;
        }
        let need = if write {
            map_flags::WRITE
        } else {
            map_flags::READ
        };
        match d.lookup(iova) {
            Some(m) if m.flags & need != 0 => Translation::Mapped {
                gpa: m.phys_start + (iova - m.virt_start),
                len: m.virt_end - iova + 1,
                flags: m.flags,
            },
            _ => Translation::Fault {
                reason: fault::R_MAPPING,
            },
        }
    }

    /// The whole state as changes, for a mirror that just connected:
    /// `GlobalBypass`, then each attachment, then each domain's mappings.
    pub fn replay(&self, sink: &mut impl ChangeSink) {
        sink.change(Change::GlobalBypass(self.bypass));
        for (&endpoint, ep) in &self.endpoints {
            if let Some(domain) = ep.domain {
                let bypass = self.domains.get(&domain).is_some_and(Domain::is_bypass);
                sink.change(Change::Attach {
                    endpoint,
                    domain,
                    bypass,
                });
            }
        }
        for (&domain, d) in &self.domains {
            for m in d.mappings() {
                sink.change(Change::Map {
                    domain,
                    virt_start: m.virt_start,
                    virt_end: m.virt_end,
                    phys_start: m.phys_start,
                    flags: m.flags,
                });
            }
        }
    }

    /// The state to migrate (docs/device-state.md): features, `bypass`,
    /// attachments and mappings, by guest-physical address.
    pub fn save_state(&self) -> DeviceState {
        let mut entries = Vec::new();
        self.replay(&mut entries);
        entries.retain(|c| !matches!(c, Change::GlobalBypass(_)));
        DeviceState {
            acked_features: self.acked,
            bypass: self.bypass,
            entries,
        }
    }

    /// Become the device `state` describes, from a reset: each attachment
    /// and mapping goes through the checks a request gets (the stream is as
    /// untrusted as the guest). A mapping of guest memory this process does
    /// not have yet (`ram` before the front-end's memory table) is recorded
    /// and enters the IOAS with [`Self::set_memory`]. On the first refused
    /// entry the device is reset again and the entry's index and status
    /// are returned.
    pub fn restore_state(
        &mut self,
        state: &DeviceState,
        ram: &impl GuestRam,
        sink: &mut impl ChangeSink,
    ) -> Result<(), RestoreError> {
        self.reset(sink);
        self.set_acked_features(state.acked_features);
        if state.bypass != self.bypass {
            self.bypass = state.bypass;
            sink.change(Change::GlobalBypass(self.bypass));
            let _ = self.park_unattached();
        }
        for (index, entry) in state.entries.iter().enumerate() {
            let status = match *entry {
                Change::Attach {
                    endpoint,
                    domain,
                    bypass,
                } => {
                    let flags = if bypass { ATTACH_F_BYPASS } else { 0 };
                    self.attach(domain, endpoint, flags, true, sink)
                }
                Change::Map {
                    domain,
                    virt_start,
                    virt_end,
                    phys_start,
                    flags,
                } => self.map(
                    domain,
                    virt_start,
                    virt_end,
                    phys_start,
                    flags,
                    (ram, MissingRam::Defer),
                    sink,
                ),
                _ => Status::Inval,
            };
            if status != Status::Ok {
                self.reset(sink);
                return Err(RestoreError { index, status });
            }
        }
        Ok(())
    }

    /// The front-end's guest memory table changed, or went away ([`NoRam`]).
    ///
    /// IOAS areas hold this process's addresses of guest pages, and a kernel
    /// IOAS pins those pages: left alone, a device would keep reaching the
    /// old memory. So every area is unmapped first; then each mapping is
    /// mapped again at the new address of its guest pages (one whose pages
    /// are no longer guest RAM stays recorded, out of the IOAS, and faults),
    /// and the identity IOAS is rebuilt to map all of guest RAM 1:1, minus
    /// what the endpoints' devices reserve. Domains and mappings as the
    /// driver sees them do not change, so nothing is mirrored.
    pub fn set_memory(&mut self, ram: &impl GuestRam) {
        let Self {
            domains, iommufd, ..
        } = self;
        for (id, d) in domains.iter_mut() {
            let Some(ioas) = d.ioas else { continue };
            if d.mappings().any(|m| m.in_ioas) {
                if let Err(e) = iommufd.unmap(ioas, 0, u64::MAX) {
                    log::warn!("domain {id}: unmapping its IOAS: {e}");
                }
            }
            let mut lost = 0u64;
            for m in d.mappings_mut() {
                m.in_ioas = false;
                if m.flags & (map_flags::READ | map_flags::WRITE) == 0 {
                    continue;
                }
                let length = m.virt_end - m.virt_start + 1;
                let Some(user_va) = ram.user_addr(m.phys_start, length) else {
                    lost += u64::from(m.flags & map_flags::MMIO == 0);
                    continue;
                };
                let req = MapRequest {
                    iova: Some(m.virt_start),
                    user_va,
                    length,
                    prot: prot_of(m.flags),
                };
                match iommufd.map(ioas, req) {
                    Ok(_) => m.in_ioas = true,
                    Err(e) => {
                        log::warn!("domain {id}: remapping {:#x}: {e}", m.virt_start);
                        lost += 1;
                    }
                }
            }
            if lost > 0 {
                log::warn!("domain {id}: {lost} mappings point outside the new guest RAM");
            }
        }
        if let Some(identity) = self.identity {
            self.rebuild_identity(identity, ram);
        }
    }

    /// Map guest RAM 1:1 (IOVA = guest physical address) in the identity
    /// IOAS, clipped to the IOVA ranges every endpoint's device can use.
    fn rebuild_identity(&mut self, identity: IoasId, ram: &impl GuestRam) {
        // Unmapping an empty IOAS fails with ENOENT: nothing to do then.
        let _ = self.iommufd.unmap(identity, 0, u64::MAX);
        let mut usable = vec![IovaRange {
            start: 0,
            last: u64::MAX,
        }];
        let devs: Vec<DeviceId> = self.endpoints.values().map(|e| e.dev).collect();
        for dev in devs {
            match self.iommufd.device_iova_ranges(dev) {
                Ok(r) => usable = intersect(&usable, &r),
                Err(e) => log::warn!("device {dev:?}: its usable IOVA ranges: {e}"),
            }
        }
        let mut regions = Vec::new();
        ram.for_each_region(&mut |r| regions.push(r));
        for r in regions.iter().filter(|r| r.len > 0) {
            let ram_range = [IovaRange {
                start: r.gpa,
                last: r.gpa.saturating_add(r.len - 1),
            }];
            for part in intersect(&ram_range, &usable) {
                let req = MapRequest {
                    iova: Some(part.start),
                    user_va: r.user_va + (part.start - r.gpa),
                    length: part.last - part.start + 1,
                    prot: Prot::RW,
                };
                if let Err(e) = self.iommufd.map(identity, req) {
                    log::warn!(
                        "identity IOAS: mapping guest RAM {:#x}-{:#x}: {e}",
                        part.start,
                        part.last
                    );
                }
            }
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

/// A fault event for the event queue (virtio 1.2 §5.13.6.9): `flags` are
/// READ/WRITE/EXEC; the address is always given (F_ADDRESS).
pub fn encode_fault(reason: u8, flags: u32, endpoint: u32, address: u64) -> FaultEvent {
    FaultEvent {
        reason,
        reserved: [0; 3],
        flags: ((flags & (fault::F_READ | fault::F_WRITE | fault::F_EXEC)) | fault::F_ADDRESS)
            .into(),
        endpoint: endpoint.into(),
        reserved2: [0; 4],
        address: address.into(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::field_reassign_with_default)]
    use super::*;
    use crate::wire::{req_type, ReqAttach, ReqDetach, ReqMap, ReqProbe, ReqUnmap};
    use iopt::model::{MockDevice, ModelIommufd};

    const RAM: u64 = 16 << 20;
    const USER_BASE: u64 = 0x7f00_0000_0000;
    const READ: u32 = map_flags::READ;
    const RW: u32 = map_flags::READ | map_flags::WRITE;

    /// Guest RAM as a list of regions.
    struct Regions(&'static [RamRegion]);
    impl GuestRam for Regions {
        fn user_addr(&self, gpa: u64, len: u64) -> Option<u64> {
            let last = gpa.checked_add(len.checked_sub(1)?)?;
            self.0
                .iter()
                .find(|r| gpa >= r.gpa && last - r.gpa < r.len)
                .map(|r| r.user_va + (gpa - r.gpa))
        }
        fn for_each_region(&self, f: &mut dyn FnMut(RamRegion)) {
            self.0.iter().copied().for_each(f);
        }
    }

    /// 16 MiB of guest RAM at GPA 0.
    const RAM_AT_0: Regions = Regions(&[RamRegion {
        gpa: 0,
        len: RAM,
        user_va: USER_BASE,
    }]);

    /// The same 16 MiB, after the front-end mapped it elsewhere, plus a
    /// region straddling the MSI window.
    const MOVED_BASE: u64 = 0x7e00_0000_0000;
    const MOVED_RAM: Regions = Regions(&[
        RamRegion {
            gpa: 0,
            len: RAM,
            user_va: MOVED_BASE,
        },
        RamRegion {
            gpa: 0xfec0_0000,
            len: 0x40_0000,
            user_va: MOVED_BASE + 0x1_0000_0000,
        },
    ]);

    fn device_with(cfg: DeviceConfig) -> Device<ModelIommufd> {
        let mut model = ModelIommufd::new();
        for ep in [8, 16] {
            model.add_device(DeviceId(ep), MockDevice::x86()).unwrap();
        }
        let mut d = Device::new(cfg, model, [(8, DeviceId(8)), (16, DeviceId(16))]).unwrap();
        d.set_acked_features(u64::MAX);
        d
    }

    /// A device whose unattached endpoints are blocked (boot bypass off),
    /// so that the tests see faults.
    fn device() -> Device<ModelIommufd> {
        device_with(DeviceConfig {
            bypass: false,
            ..DeviceConfig::default()
        })
    }

    struct Run<'a> {
        d: &'a mut Device<ModelIommufd>,
        changes: Vec<Change>,
    }

    impl Run<'_> {
        fn send(&mut self, req: &[u8]) -> Status {
            let mut reply = [0u8; 4];
            let n = self
                .d
                .handle_request(req, &mut reply, &RAM_AT_0, &mut self.changes);
            assert_eq!(n, 4);
            status_from(reply[0])
        }
        fn attach(&mut self, domain: u32, endpoint: u32, flags: u32) -> Status {
            let mut r = ReqAttach::default();
            r.head.req_type = req_type::ATTACH;
            r.domain = domain.into();
            r.endpoint = endpoint.into();
            r.flags = flags.into();
            self.send(r.as_slice())
        }
        fn detach(&mut self, domain: u32, endpoint: u32) -> Status {
            let mut r = ReqDetach::default();
            r.head.req_type = req_type::DETACH;
            r.domain = domain.into();
            r.endpoint = endpoint.into();
            self.send(r.as_slice())
        }
        fn map(&mut self, domain: u32, start: u64, end: u64, phys: u64, flags: u32) -> Status {
            let mut r = ReqMap::default();
            r.head.req_type = req_type::MAP;
            r.domain = domain.into();
            r.virt_start = start.into();
            r.virt_end = end.into();
            r.phys_start = phys.into();
            r.flags = flags.into();
            self.send(r.as_slice())
        }
        fn unmap(&mut self, domain: u32, start: u64, end: u64) -> Status {
            let mut r = ReqUnmap::default();
            r.head.req_type = req_type::UNMAP;
            r.domain = domain.into();
            r.virt_start = start.into();
            r.virt_end = end.into();
            self.send(r.as_slice())
        }
    }

    fn status_from(b: u8) -> Status {
        [
            Status::Ok,
            Status::IoErr,
            Status::Unsupp,
            Status::DevErr,
            Status::Inval,
            Status::Range,
            Status::NoEnt,
            Status::Fault,
            Status::NoMem,
        ][b as usize]
    }

    fn run(d: &mut Device<ModelIommufd>) -> Run<'_> {
        Run {
            d,
            changes: Vec::new(),
        }
    }

    #[test]
    fn attach_creates_the_domain_and_its_ioas() {
        let mut d = device();
        let mut r = run(&mut d);
        assert_eq!(r.attach(1, 8, 0), Status::Ok);
        assert_eq!(
            r.changes,
            vec![Change::Attach {
                endpoint: 8,
                domain: 1,
                bypass: false
            }]
        );
        let ioas = d.domain(1).unwrap().ioas.unwrap();
        assert_eq!(d.iommufd().attached_to(DeviceId(8)), Some(ioas));
    }

    #[test]
    fn attach_rejects_unknown_endpoints_bad_flags_reserved_bytes_and_out_of_range_domains() {
        let mut d = device_with(DeviceConfig {
            domain_range: (1, 10),
            ..Default::default()
        });
        let mut r = run(&mut d);
        assert_eq!(r.attach(1, 9, 0), Status::NoEnt);
        assert_eq!(r.attach(1, 8, 2), Status::Inval);
        assert_eq!(r.attach(11, 8, 0), Status::Range);
        let mut raw = ReqAttach::default();
        raw.head.req_type = req_type::ATTACH;
        raw.domain = 1.into();
        raw.endpoint = 8.into();
        raw.reserved[0] = 1;
        assert_eq!(r.send(raw.as_slice()), Status::Inval);
        assert!(r.changes.is_empty());
    }

    #[test]
    fn attaching_elsewhere_moves_the_endpoint_and_the_old_domain_dies() {
        let mut d = device();
        let mut r = run(&mut d);
        assert_eq!(r.attach(1, 8, 0), Status::Ok);
        assert_eq!(r.map(1, 0x1000, 0x1fff, 0x1000, READ), Status::Ok);
        assert_eq!(r.attach(2, 8, 0), Status::Ok);
        assert!(r.changes.contains(&Change::Detach {
            endpoint: 8,
            domain: 1
        }));
        assert!(r.changes.contains(&Change::Unmap {
            domain: 1,
            virt_start: 0,
            virt_end: u64::MAX
        }));
        assert!(d.domain(1).is_none());
        assert_eq!(d.domain_of(8), Some(2));
    }

    #[test]
    fn a_domain_lives_while_any_endpoint_is_attached() {
        let mut d = device();
        let mut r = run(&mut d);
        assert_eq!(r.attach(1, 8, 0), Status::Ok);
        assert_eq!(r.attach(1, 16, 0), Status::Ok);
        assert_eq!(r.detach(1, 8), Status::Ok);
        assert!(r.d.domain(1).is_some());
        assert_eq!(r.detach(1, 16), Status::Ok);
        assert!(d.domain(1).is_none());
    }

    #[test]
    fn detach_checks_domain_and_membership() {
        let mut d = device();
        let mut r = run(&mut d);
        assert_eq!(r.detach(1, 8), Status::NoEnt);
        assert_eq!(r.attach(1, 8, 0), Status::Ok);
        assert_eq!(r.attach(2, 16, 0), Status::Ok);
        assert_eq!(r.detach(2, 8), Status::Inval);
        assert_eq!(r.detach(1, 99), Status::NoEnt);
        // Reserved bytes are ignored (virtio 1.3 §5.13.6.4.2).
        let mut req = ReqDetach::default();
        req.head.req_type = req_type::DETACH;
        req.domain = 1.into();
        req.endpoint = 8.into();
        req.reserved = [0xff; 8];
        assert_eq!(r.send(req.as_slice()), Status::Ok);
    }

    #[test]
    fn map_lands_in_the_ioas_at_the_guest_pages_user_address() {
        let mut d = device();
        let mut r = run(&mut d);
        r.attach(1, 8, 0);
        assert_eq!(r.map(1, 0x10_0000, 0x10_3fff, 0x2000, RW), Status::Ok);
        let ioas = d.domain(1).unwrap().ioas.unwrap();
        let area = *d.iommufd().iopt(ioas).unwrap().area_at(0x10_1000).unwrap();
        assert_eq!((area.iova, area.last), (0x10_0000, 0x10_3fff));
        assert_eq!(area.user_va, USER_BASE + 0x2000);
        assert_eq!(area.prot, Prot::RW);
    }

    #[test]
    fn map_rules_give_the_spec_statuses_and_change_nothing() {
        let mut d = device_with(DeviceConfig {
            input_range: (0, 0xffff_ffff),
            ..Default::default()
        });
        let mut r = run(&mut d);
        assert_eq!(r.map(1, 0x1000, 0x1fff, 0, READ), Status::NoEnt);
        r.attach(1, 8, 0);
        r.changes.clear();
        assert_eq!(r.map(1, 0x1000, 0x1fff, 0, 0x10), Status::Inval);
        assert_eq!(r.map(1, 0x2000, 0x1fff, 0, READ), Status::Inval);
        assert_eq!(r.map(1, 0x1800, 0x27ff, 0, READ), Status::Range);
        assert_eq!(r.map(1, 0x1000, 0x17ff, 0, READ), Status::Range);
        assert_eq!(r.map(1, 0x1000, 0x1fff, 0x800, READ), Status::Range);
        assert_eq!(
            r.map(1, 0x1_0000_0000, 0x1_0000_0fff, 0, READ),
            Status::Range
        );
        assert_eq!(r.map(1, 0x1000, 0x1fff, RAM, READ), Status::Inval);
        // The MSI window is reserved in the IOAS.
        assert_eq!(r.map(1, 0xfee0_0000, 0xfee0_0fff, 0, READ), Status::Inval);
        assert!(r.changes.is_empty());
        assert_eq!(r.map(1, 0x1000, 0x2fff, 0, READ), Status::Ok);
        assert_eq!(r.map(1, 0x2000, 0x3fff, 0, READ), Status::Inval);
        assert_eq!(r.map(1, 0x0, 0x1fff, 0, READ), Status::Inval);
        assert_eq!(d.stats().mappings, 1);
    }

    #[test]
    fn a_saved_state_restores_into_a_fresh_device_and_maps_once_ram_arrives() {
        let mut src = device();
        let mut r = run(&mut src);
        assert_eq!(r.attach(1, 8, 0), Status::Ok);
        assert_eq!(r.attach(2, 16, ATTACH_F_BYPASS), Status::Ok);
        assert_eq!(r.map(1, 0x1000, 0x2fff, 0x3000, RW), Status::Ok);
        assert_eq!(r.map(1, 0x10_0000, 0x10_0fff, 0x8000, READ), Status::Ok);
        src.write_config(36, &[1], &mut Discard).unwrap();
        let bytes = src.save_state().encode();

        // The destination: same endpoints, no guest memory yet.
        let mut dst = device();
        dst.set_acked_features(0);
        let state = DeviceState::decode(&bytes).unwrap();
        let mut changes = Vec::new();
        dst.restore_state(&state, &NoRam, &mut changes).unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        src.replay(&mut a);
        dst.replay(&mut b);
        assert_eq!(a, b, "the driver's view is the same");
        assert_eq!(dst.features(), src.features());
        assert!(changes.contains(&Change::Map {
            domain: 1,
            virt_start: 0x1000,
            virt_end: 0x2fff,
            phys_start: 0x3000,
            flags: RW
        }));
        let ioas = dst.domain(1).unwrap().ioas.unwrap();
        assert!(dst.iommufd().iopt(ioas).unwrap().area_at(0x1000).is_none());
        // Guest memory arrives (SET_MEM_TABLE): the mappings enter the IOAS.
        dst.set_memory(&RAM_AT_0);
        let area = *dst.iommufd().iopt(ioas).unwrap().area_at(0x1000).unwrap();
        assert_eq!(area.user_va, USER_BASE + 0x3000);
        assert!(matches!(
            dst.translate(8, 0x1234, true),
            Translation::Mapped { gpa: 0x3234, .. }
        ));
        assert_eq!(dst.translate(16, 0x1234, true), Translation::Bypass);
    }

    #[test]
    fn a_state_that_breaks_the_rules_is_refused_and_leaves_a_reset_device() {
        let mut d = device();
        let mut changes = Vec::new();
        let bad = DeviceState {
            acked_features: u64::MAX,
            bypass: false,
            entries: vec![
                Change::Attach {
                    endpoint: 8,
                    domain: 1,
                    bypass: false,
                },
                Change::Map {
                    domain: 1,
                    virt_start: 0x1000,
                    virt_end: 0x1fff,
                    phys_start: 0,
                    flags: READ,
                },
                // Overlaps the mapping before it.
                Change::Map {
                    domain: 1,
                    virt_start: 0x1000,
                    virt_end: 0x1fff,
                    phys_start: 0x5000,
                    flags: READ,
                },
            ],
        };
        let e = d.restore_state(&bad, &RAM_AT_0, &mut changes).unwrap_err();
        assert_eq!((e.index, e.status), (2, Status::Inval));
        assert_eq!(d.stats().domains, 0);
        assert_eq!(d.iommufd().attached_to(DeviceId(8)), None);
        let unknown = DeviceState {
            entries: vec![Change::Attach {
                endpoint: 99,
                domain: 1,
                bypass: false,
            }],
            ..bad
        };
        let e = d
            .restore_state(&unknown, &RAM_AT_0, &mut changes)
            .unwrap_err();
        assert_eq!((e.index, e.status), (0, Status::NoEnt));
    }

    #[test]
    fn the_msi_window_cannot_be_mapped_whatever_the_flags() {
        let mut d = device();
        assert_eq!(run(&mut d).attach(1, 8, 0), Status::Ok);
        let mut r = run(&mut d);
        let (msi, _) = DeviceConfig::default().msi_window;
        // As READ/WRITE already are: a mapping that records nothing in the
        // IOAS (no access flag, or MMIO outside RAM) must not claim it either.
        assert_eq!(r.map(1, msi, msi + 0xfff, 0, 0), Status::Inval);
        assert_eq!(
            r.map(1, msi, msi + 0xfff, 0x1_0000_0000, map_flags::MMIO),
            Status::Inval
        );
        assert_eq!(
            r.map(1, msi - 0x1000, msi + 0xfff, 0, map_flags::MMIO),
            Status::Inval,
            "straddling"
        );
        assert!(r.changes.is_empty());
        assert_eq!(d.stats().mappings, 0);
        // Next to it is fine.
        let mut r = run(&mut d);
        assert_eq!(r.map(1, msi - 0x1000, msi - 1, 0, 0), Status::Ok);
    }

    #[test]
    fn the_last_page_of_a_full_64_bit_input_range_can_be_mapped_and_unmapped() {
        // A device that can address all of it (as emulated mode's are).
        let mut model = ModelIommufd::new();
        let full = MockDevice {
            aperture: IovaRange {
                start: 0,
                last: u64::MAX,
            },
            ..MockDevice::x86()
        };
        model.add_device(DeviceId(8), full).unwrap();
        let cfg = DeviceConfig {
            input_range: (0, u64::MAX),
            ..DeviceConfig::default()
        };
        let mut d = Device::new(cfg, model, [(8, DeviceId(8))]).unwrap();
        d.set_acked_features(u64::MAX);
        let mut r = run(&mut d);
        assert_eq!(r.attach(1, 8, 0), Status::Ok);
        let last = u64::MAX - 0xfff;
        assert_eq!(r.map(1, last, u64::MAX, 0x1000, READ), Status::Ok);
        assert!(matches!(
            d.translate(8, u64::MAX, false),
            Translation::Mapped { gpa: 0x1fff, .. }
        ));
        let mut r = run(&mut d);
        assert_eq!(r.unmap(1, last, u64::MAX), Status::Ok);
        assert_eq!(d.stats().mappings, 0);
    }

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
    fn a_probe_buffer_shorter_than_probe_size_gets_inval_at_its_end() {
        let mut d = device();
        let mut r = ReqProbe::default();
        r.head.req_type = req_type::PROBE;
        r.endpoint = 8u32.into();
        let size = d.device_config().probe_size as usize;
        let mut reply = vec![0xaau8; size];
        let n = d.handle_request(r.as_slice(), &mut reply, &RAM_AT_0, &mut Discard);
        assert_eq!(n, size, "the tail is where the driver reads it: at the end");
        assert_eq!(reply[size - 4], Status::Inval as u8);
        assert!(reply[..size - 4].iter().all(|&b| b == 0xaa), "no property");
    }

    #[test]
    fn the_default_config_bypasses_at_boot_as_the_cli_and_qemu_do() {
        assert!(DeviceConfig::default().bypass);
    }

    #[test]
    fn mmio_mappings_need_the_feature_and_may_point_outside_ram() {
        let mut d = device();
        d.set_acked_features(d.features() & !(1 << feature::MMIO));
        let mut r = run(&mut d);
        r.attach(1, 8, 0);
        let f = map_flags::MMIO | RW;
        assert_eq!(r.map(1, 0x1000, 0x1fff, 0xfe00_0000, f), Status::Inval);
        r.d.set_acked_features(u64::MAX);
        assert_eq!(r.map(1, 0x1000, 0x1fff, 0xfe00_0000, f), Status::Ok);
        // A physical range that wraps past 2^64 is refused.
        assert_eq!(r.map(1, 0x4000, 0x5fff, u64::MAX - 0xfff, f), Status::Range);
    }

    #[test]
    fn unmap_removes_whole_mappings_and_refuses_splits_atomically() {
        let mut d = device();
        let mut r = run(&mut d);
        r.attach(1, 8, 0);
        r.map(1, 0x1000, 0x1fff, 0, READ);
        r.map(1, 0x2000, 0x3fff, 0, READ);
        r.changes.clear();
        assert_eq!(r.unmap(1, 0x1000, 0x2fff), Status::Range);
        assert!(r.changes.is_empty());
        assert_eq!(r.d.stats().mappings, 2);
        assert_eq!(r.unmap(1, 0x0, 0xffff), Status::Ok);
        assert_eq!(r.changes.len(), 2);
        assert_eq!(
            r.unmap(1, 0x0, 0xffff),
            Status::Ok,
            "unmapping nothing is OK"
        );
        assert_eq!(r.unmap(2, 0x0, 0xffff), Status::NoEnt);
        let ioas = d.domain(1).unwrap().ioas.unwrap();
        assert_eq!(d.iommufd().iopt(ioas).unwrap().areas().count(), 0);
    }

    #[test]
    fn bypass_domains_need_the_feature_and_take_no_mappings() {
        let mut d = device();
        d.set_acked_features(d.features() & !(1 << feature::BYPASS_CONFIG));
        let mut r = run(&mut d);
        assert_eq!(r.attach(1, 8, ATTACH_F_BYPASS), Status::Inval);
        r.d.set_acked_features(u64::MAX);
        assert_eq!(r.attach(1, 8, ATTACH_F_BYPASS), Status::Ok);
        assert_eq!(
            r.attach(1, 16, 0),
            Status::Inval,
            "a bypass domain cannot become translated"
        );
        assert_eq!(r.map(1, 0x1000, 0x1fff, 0, READ), Status::Inval);
        assert_eq!(r.unmap(1, 0x1000, 0x1fff), Status::Inval);
        assert_eq!(d.translate(8, 0x1234, true), Translation::Bypass);
    }

    #[test]
    fn translate_follows_mappings_permissions_and_global_bypass() {
        let mut d = device();
        assert_eq!(
            d.translate(8, 0x1000, false),
            Translation::Fault {
                reason: fault::R_DOMAIN
            }
        );
        d.write_config(36, &[1], &mut Discard).unwrap();
        assert_eq!(d.translate(8, 0x1000, false), Translation::Bypass);
        let mut r = run(&mut d);
        r.attach(1, 8, 0);
        r.map(1, 0x1000, 0x2fff, 0x8000, READ);
        assert_eq!(
            d.translate(8, 0x1800, false),
            Translation::Mapped {
                gpa: 0x8800,
                len: 0x1800,
                flags: READ
            }
        );
        assert_eq!(
            d.translate(8, 0x1800, true),
            Translation::Fault {
                reason: fault::R_MAPPING
            }
        );
        assert_eq!(
            d.translate(8, 0x3000, false),
            Translation::Fault {
                reason: fault::R_MAPPING
            }
        );
        assert_eq!(
            d.translate(99, 0, false),
            Translation::Fault {
                reason: fault::R_UNKNOWN
            }
        );
    }

    fn probe(d: &mut Device<ModelIommufd>, endpoint: u32) -> (Status, Vec<(u8, u64, u64)>) {
        let mut r = ReqProbe::default();
        r.head.req_type = req_type::PROBE;
        r.endpoint = endpoint.into();
        let size = d.device_config().probe_size as usize;
        let mut reply = vec![0xaau8; size + 4];
        let n = d.handle_request(r.as_slice(), &mut reply, &RAM_AT_0, &mut Discard);
        assert_eq!(n, size + 4);
        let mut props = vec![];
        let mut at = 0;
        while at + 4 <= size {
            let t = u16::from_le_bytes([reply[at], reply[at + 1]]);
            if t == 0 {
                break;
            }
            let start = u64::from_le_bytes(reply[at + 8..at + 16].try_into().unwrap());
            let end = u64::from_le_bytes(reply[at + 16..at + 24].try_into().unwrap());
            props.push((reply[at + 4], start, end));
            at += 24;
        }
        (status_from(reply[size]), props)
    }

    #[test]
    fn probe_reports_the_msi_window_and_the_holes_of_the_ioas_device() {
        let mut d = device_with(DeviceConfig {
            input_range: (0, u64::MAX),
            ..Default::default()
        });
        let (status, props) = probe(&mut d, 8);
        assert_eq!(status, Status::Ok);
        assert_eq!(
            props,
            vec![
                (probe::RESV_MEM_T_MSI, 0xfee0_0000, 0xfeef_ffff),
                // Above the mock device's 48-bit aperture.
                (probe::RESV_MEM_T_RESERVED, 1 << 48, u64::MAX),
            ]
        );
        assert_eq!(probe(&mut d, 9).0, Status::NoEnt);
    }

    #[test]
    fn probe_without_the_feature_or_room_fails() {
        let mut d = device();
        let mut r = ReqProbe::default();
        r.head.req_type = req_type::PROBE;
        r.endpoint = 8.into();
        let mut small = [0u8; 8];
        let n = d.handle_request(r.as_slice(), &mut small, &RAM_AT_0, &mut Discard);
        assert_eq!((n, small[4]), (8, Status::Inval as u8));
        d.set_acked_features(0);
        assert_eq!(probe(&mut d, 8).0, Status::Unsupp);
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
    fn replay_describes_the_state_and_reset_clears_it() {
        let mut d = device();
        let mut r = run(&mut d);
        r.attach(1, 8, 0);
        r.attach(2, 16, ATTACH_F_BYPASS);
        r.map(1, 0x1000, 0x1fff, 0x3000, RW);
        let made = r.changes.clone();
        let mut replay = vec![];
        d.replay(&mut replay);
        assert_eq!(replay[0], Change::GlobalBypass(false));
        for c in &made {
            assert!(replay.contains(c), "{c:?} missing from the replay");
        }
        let mut changes = vec![];
        d.reset(&mut changes);
        assert_eq!(changes, vec![Change::Reset, Change::GlobalBypass(false)]);
        assert_eq!(d.stats().domains, 0);
        assert_eq!(d.iommufd().attached_to(DeviceId(8)), None);
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

    fn identity_device(bypass: bool) -> Device<ModelIommufd> {
        device_with(DeviceConfig {
            bypass,
            identity_ioas: true,
            ..DeviceConfig::default()
        })
    }

    #[test]
    fn with_an_identity_ioas_bypassing_endpoints_reach_all_of_guest_ram_one_to_one() {
        let mut d = identity_device(true);
        let identity = d
            .iommufd()
            .attached_to(DeviceId(8))
            .expect("parked at power-on");
        assert_eq!(d.iommufd().attached_to(DeviceId(16)), Some(identity));
        d.set_memory(&RAM_AT_0);
        let area = *d.iommufd().iopt(identity).unwrap().area_at(0x1234).unwrap();
        assert_eq!(
            (area.iova, area.last, area.user_va),
            (0, RAM - 1, USER_BASE)
        );
        assert_eq!(area.prot, Prot::RW);

        // A translated domain takes the device out; DETACH parks it again.
        let mut r = run(&mut d);
        r.attach(1, 8, 0);
        let ioas = d.domain(1).unwrap().ioas.unwrap();
        assert_eq!(d.iommufd().attached_to(DeviceId(8)), Some(ioas));
        let mut r = run(&mut d);
        assert_eq!(r.detach(1, 8), Status::Ok);
        assert_eq!(d.iommufd().attached_to(DeviceId(8)), Some(identity));

        // A bypass domain is the identity IOAS too.
        let mut r = run(&mut d);
        assert_eq!(r.attach(2, 16, ATTACH_F_BYPASS), Status::Ok);
        assert_eq!(d.iommufd().attached_to(DeviceId(16)), Some(identity));
    }

    #[test]
    fn endpoints_added_later_bypass_or_block_and_removal_takes_them_out_of_their_domain() {
        let mut model = ModelIommufd::new();
        for dev in [1, 2] {
            model.add_device(DeviceId(dev), MockDevice::x86()).unwrap();
        }
        let cfg = DeviceConfig {
            bypass: true,
            identity_ioas: true,
            ..DeviceConfig::default()
        };
        // No endpoint yet: no IOAS is allocated (the iommufd may not exist).
        let mut d = Device::new(cfg, model, []).unwrap();
        d.set_acked_features(u64::MAX);
        assert_eq!(d.iommufd().ioas_count(), 0);

        d.add_endpoint(0x18, DeviceId(1), &RAM_AT_0).unwrap();
        let identity = d.iommufd().attached_to(DeviceId(1)).expect("bypassing");
        let area = *d.iommufd().iopt(identity).unwrap().area_at(0).unwrap();
        assert_eq!((area.iova, area.user_va), (0, USER_BASE));
        assert_eq!(
            d.add_endpoint(0x18, DeviceId(2), &RAM_AT_0),
            Err(ConfigError::DuplicateEndpoint(0x18))
        );

        let mut r = run(&mut d);
        assert_eq!(r.attach(3, 0x18, 0), Status::Ok);
        assert_eq!(
            r.map(3, 0x1000, 0x1fff, 0x4000, map_flags::READ),
            Status::Ok
        );
        let mut changes = Vec::new();
        assert_eq!(d.remove_endpoint(0x18, &mut changes), Some(DeviceId(1)));
        assert_eq!(d.iommufd().attached_to(DeviceId(1)), None, "blocked");
        assert!(d.domain(3).is_none(), "its last endpoint left");
        assert!(matches!(
            changes[0],
            Change::Detach {
                endpoint: 0x18,
                domain: 3
            }
        ));
        assert_eq!(d.remove_endpoint(0x18, &mut changes), None);
        assert_eq!(d.iommufd().ioas_count(), 0, "the identity IOAS went too");
        assert_eq!(d.endpoint_ids().count(), 0);
        let mut r = run(&mut d);
        assert_eq!(r.attach(3, 0x18, 0), Status::NoEnt);
    }

    #[test]
    fn with_bypass_off_unattached_devices_are_blocked_and_the_config_write_moves_them() {
        let mut d = identity_device(false);
        d.set_memory(&RAM_AT_0);
        assert_eq!(d.iommufd().attached_to(DeviceId(8)), None);
        d.write_config(36, &[1], &mut Discard).unwrap();
        assert!(d.iommufd().attached_to(DeviceId(8)).is_some());
        d.write_config(36, &[0], &mut Discard).unwrap();
        assert_eq!(d.iommufd().attached_to(DeviceId(8)), None);
        // Reset returns to the boot value: blocked.
        d.write_config(36, &[1], &mut Discard).unwrap();
        d.reset(&mut Discard);
        assert_eq!(d.iommufd().attached_to(DeviceId(8)), None);
    }

    #[test]
    fn the_identity_ioas_leaves_out_what_the_devices_reserve() {
        let mut d = identity_device(true);
        d.set_memory(&MOVED_RAM);
        let identity = d.iommufd().attached_to(DeviceId(8)).unwrap();
        let areas: Vec<(u64, u64)> = d
            .iommufd()
            .iopt(identity)
            .unwrap()
            .areas()
            .map(|a| (a.iova, a.last))
            .collect();
        assert_eq!(
            areas,
            [
                (0, RAM - 1),
                (0xfec0_0000, 0xfedf_ffff),
                (0xfef0_0000, 0xfeff_ffff)
            ],
            "the MSI window 0xfee00000-0xfeefffff is not mapped"
        );
    }

    #[test]
    fn a_new_memory_table_moves_every_area_to_the_new_addresses() {
        let mut d = device();
        let mut r = run(&mut d);
        r.attach(1, 8, 0);
        assert_eq!(r.map(1, 0x10_0000, 0x10_3fff, 0x2000, RW), Status::Ok);
        assert_eq!(
            r.map(1, 0x20_0000, 0x20_0fff, 0x1_0000_0000, RW | map_flags::MMIO),
            Status::Ok
        );
        d.set_memory(&MOVED_RAM);
        let ioas = d.domain(1).unwrap().ioas.unwrap();
        let area = *d.iommufd().iopt(ioas).unwrap().area_at(0x10_0000).unwrap();
        assert_eq!(area.user_va, MOVED_BASE + 0x2000);
        assert_eq!(d.iommufd().iopt(ioas).unwrap().areas().count(), 1);

        // The memory goes away: no area is left pointing into it, but the
        // driver's mappings stand (and come back with memory).
        d.set_memory(&NoRam);
        assert_eq!(d.iommufd().iopt(ioas).unwrap().areas().count(), 0);
        assert_eq!(d.domain(1).unwrap().mapping_count(), 2);
        assert!(matches!(
            d.translate(8, 0x10_0000, true),
            Translation::Mapped { .. }
        ));
        d.set_memory(&RAM_AT_0);
        let area = *d.iommufd().iopt(ioas).unwrap().area_at(0x10_0000).unwrap();
        assert_eq!(area.user_va, USER_BASE + 0x2000);
    }
}
