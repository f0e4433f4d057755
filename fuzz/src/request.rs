// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Target `request`: `Device::handle_request` over the IOAS model with
//! arbitrary request bytes and reply lengths, memory tables changing under
//! it, endpoints coming and going, resets.
//!
//! Checked after every step: the used length fits the reply and carries a
//! defined status; the model holds exactly one IOAS per translated domain
//! (plus the identity IOAS); every IOAS area is a recorded mapping at the
//! guest pages' current address (or guest RAM 1:1 in the identity IOAS), so
//! nothing outside guest RAM is ever reachable ([`check_state`]); the
//! device's counters match what it holds.

use std::collections::BTreeSet;

use iopt::model::{MockDevice, ModelIommufd};
use iopt::{DeviceId, IoasId, IovaRange};
use virtio_iommu::domain::Mapping;
use virtio_iommu::wire::map_flags;
use virtio_iommu::{Change, ChangeSink, Device, DeviceConfig, GuestRam, RamRegion};

use crate::{check, Gen, Target, Verdict};

/// Guest RAM as a list of regions at made-up process addresses (the model
/// never dereferences them).
#[derive(Clone, Debug, Default)]
pub struct FakeRam {
    pub regions: Vec<RamRegion>,
}

impl GuestRam for FakeRam {
    fn user_addr(&self, gpa: u64, len: u64) -> Option<u64> {
        self.regions.iter().find_map(|r| {
            let off = gpa.checked_sub(r.gpa)?;
            (off < r.len && len <= r.len - off).then(|| r.user_va + off)
        })
    }

    fn for_each_region(&self, f: &mut dyn FnMut(RamRegion)) {
        for r in &self.regions {
            f(*r);
        }
    }
}

impl FakeRam {
    /// Whether `[va, va + len)` lies inside the process mapping of one
    /// region.
    pub fn holds_user(&self, va: u64, len: u64) -> bool {
        self.regions.iter().any(|r| {
            va.checked_sub(r.user_va)
                .is_some_and(|off| off < r.len && len <= r.len - off)
        })
    }

    /// 0-4 regions: page-aligned, sometimes adjacent in guest physical
    /// space but never in process space (a mapping spanning two must not be
    /// taken as one), sometimes at the top of the address space.
    pub fn arbitrary(g: &mut Gen) -> Self {
        let n = g.below(5);
        let mut regions = Vec::new();
        let mut gpa = g.pick(&[0, 0x1000, 0x10_0000, 0xfee0_0000, u64::MAX - 0xf_ffff]) & !0xfff;
        for i in 0..n {
            let len = g.pick(&[0x1000, 0x2000, 0x10_000, 0x20_0000, 0x100_0000]);
            let Some(end) = gpa.checked_add(len) else {
                break;
            };
            regions.push(RamRegion {
                gpa,
                len: if end == 0 { len - 1 } else { len },
                user_va: 0x7f00_0000_0000 + (i + 1) * 0x10_0000_0000 + g.below(64) * 0x1000,
            });
            gpa = match g.below(3) {
                0 => end,
                1 => end.wrapping_add(g.below(16) << 12),
                _ => g.below(1 << 36) << 12,
            };
            if regions.iter().any(|r| r.gpa <= gpa && gpa - r.gpa < r.len) {
                gpa = end;
            }
        }
        // Overlapping guest ranges are the front-end's bug; the daemon
        // refuses such tables before the device sees them.
        regions.sort_by_key(|r| r.gpa);
        regions.dedup_by(|b, a| b.gpa < a.gpa.saturating_add(a.len));
        Self { regions }
    }

    /// A guest physical address near something interesting.
    pub fn some_gpa(&self, g: &mut Gen) -> u64 {
        if self.regions.is_empty() || g.chance(1, 6) {
            return g.edgy_u64() & !0xfff;
        }
        let r = self.regions[g.below(self.regions.len() as u64) as usize];
        match g.below(4) {
            0 => r.gpa,
            1 => r.gpa.wrapping_add(r.len).wrapping_sub(0x1000),
            2 => r.gpa.wrapping_add(r.len),
            _ => r.gpa.wrapping_add(g.below(r.len.max(1)) & !0xfff),
        }
    }
}

/// The endpoints' devices, as the daemon makes them (emulated.rs) or with
/// odd apertures and reserved regions.
fn mock_for(g: &mut Gen, cfg: &DeviceConfig) -> MockDevice {
    let page_size = 1u64 << cfg.page_size_mask.trailing_zeros();
    if g.chance(3, 4) {
        MockDevice {
            aperture: IovaRange {
                start: cfg.input_range.0,
                last: cfg.input_range.1,
            },
            reserved: vec![IovaRange {
                start: cfg.msi_window.0,
                last: cfg.msi_window.1,
            }],
            page_size,
        }
    } else {
        let a = g.edgy_u64() & !0xfff;
        let b = a.saturating_add(g.edgy_u64() | 0xfff);
        MockDevice {
            aperture: IovaRange { start: a, last: b },
            reserved: vec![IovaRange {
                start: 0x10_0000,
                last: 0x1f_ffff,
            }],
            page_size: g.pick(&[0x1000, 0x1000, 0x10_000, 1]),
        }
    }
}

/// A device configuration the device model accepts (or, rarely, one it
/// refuses: then the input ends there).
#[allow(clippy::field_reassign_with_default)]
pub fn arbitrary_config(g: &mut Gen, identity: bool) -> DeviceConfig {
    let mut cfg = DeviceConfig::default();
    cfg.page_size_mask = match g.below(6) {
        0 => !0xffff,
        1 => 0x1000 | 0x20_0000,
        2 => g.next_u64(),
        _ => !0xfff,
    };
    if g.chance(1, 3) {
        let a = g.edgy_u64();
        cfg.input_range = (a, a.saturating_add(g.edgy_u64()));
    }
    if g.chance(1, 3) {
        let a = g.edgy_u32();
        cfg.domain_range = (a, a.saturating_add(g.edgy_u32()));
    }
    cfg.probe_size = g.pick(&[24, 64, 512, 4096]);
    cfg.bypass = g.bool();
    if g.chance(1, 4) {
        cfg.msi_window = (0x1000, 0x1fff);
    }
    cfg.identity_ioas = identity;
    cfg
}

/// A device under test with what it was made from.
#[derive(Debug)]
pub struct Rig {
    pub dev: Device<ModelIommufd>,
    pub ram: FakeRam,
    pub endpoints: Vec<u32>,
    pub next_dev: u32,
    /// Every domain ID a request named.
    pub domains: BTreeSet<u32>,
    pub changes: Vec<Change>,
}

impl Rig {
    /// A fresh device, or `None` for a configuration it refuses.
    pub fn arbitrary(g: &mut Gen, identity: bool) -> Option<Self> {
        let cfg = arbitrary_config(g, identity);
        let mut model = ModelIommufd::new();
        let n = g.range(0, 4);
        let mut endpoints = Vec::new();
        for i in 0..n {
            let ep = if i == 0 {
                8
            } else {
                g.pick(&[0, 9, 0x10, 0xffff, u32::MAX])
            };
            if endpoints.contains(&ep) {
                continue;
            }
            let _ = model.add_device(DeviceId(100 + i as u32), mock_for(g, &cfg));
            endpoints.push(ep);
        }
        let devs: Vec<(u32, DeviceId)> = endpoints
            .iter()
            .enumerate()
            .map(|(i, &ep)| (ep, DeviceId(100 + i as u32)))
            .collect();
        let mut dev = Device::new(cfg, model, devs).ok()?;
        dev.set_acked_features(if g.chance(3, 4) { !0 } else { g.next_u64() });
        let ram = FakeRam::arbitrary(g);
        dev.set_memory(&ram);
        Some(Self {
            dev,
            ram,
            endpoints,
            next_dev: 200,
            domains: BTreeSet::new(),
            changes: Vec::new(),
        })
    }

    pub fn some_endpoint(&self, g: &mut Gen) -> u32 {
        if self.endpoints.is_empty() || g.chance(1, 8) {
            g.edgy_u32()
        } else {
            self.endpoints[g.below(self.endpoints.len() as u64) as usize]
        }
    }

    pub fn some_domain(&self, g: &mut Gen) -> u32 {
        let (lo, hi) = self.dev.device_config().domain_range;
        match g.below(6) {
            0 => g.edgy_u32(),
            1 => hi,
            2 => lo.wrapping_add(1),
            _ => lo,
        }
    }

    /// Send one request; checks the used length and status.
    pub fn request(&mut self, req: &[u8], reply_len: usize) -> Verdict {
        if req.len() >= 8 {
            self.domains
                .insert(u32::from_le_bytes([req[4], req[5], req[6], req[7]]));
        }
        let mut reply = vec![0xa5u8; reply_len];
        let mut sink = Collect(&mut self.changes);
        let used = self
            .dev
            .handle_request(req, &mut reply, &self.ram, &mut sink);
        check(used <= reply_len, || {
            format!("used length {used} > reply {reply_len} for {req:02x?}")
        })?;
        check(reply_len < 4 || used >= 4 || used == 0, || {
            format!("used length {used} cuts the tail; request {req:02x?}")
        })?;
        if used >= 4 {
            let status = reply[used - 4];
            check(status <= 8, || {
                format!("status {status} undefined; request {req:02x?}")
            })?;
        }
        Ok(())
    }

    /// A new endpoint with a new device (a VFIO device arriving).
    pub fn add_endpoint(&mut self, g: &mut Gen) {
        let ep = self.some_endpoint(g);
        let dev = DeviceId(self.next_dev);
        self.next_dev += 1;
        let cfg = *self.dev.device_config();
        let mock = mock_for(g, &cfg);
        if self.dev.iommufd_mut().add_device(dev, mock).is_ok()
            && self.dev.add_endpoint(ep, dev, &self.ram).is_ok()
        {
            self.endpoints.push(ep);
        }
    }

    pub fn remove_endpoint(&mut self, g: &mut Gen) {
        let ep = self.some_endpoint(g);
        let mut sink = Collect(&mut self.changes);
        if self.dev.remove_endpoint(ep, &mut sink).is_some() {
            self.endpoints.retain(|&e| e != ep);
        }
    }

    pub fn set_memory(&mut self, ram: FakeRam) {
        self.ram = ram;
        self.dev.set_memory(&self.ram);
    }

    pub fn reset(&mut self) {
        let mut sink = Collect(&mut self.changes);
        self.dev.reset(&mut sink);
    }
}

struct Collect<'a>(&'a mut Vec<Change>);

impl ChangeSink for Collect<'_> {
    fn change(&mut self, c: Change) {
        // Keep the last few only: enough to show what led to a finding.
        if self.0.len() > 64 {
            self.0.drain(..32);
        }
        self.0.push(c);
    }
}

/// Every IOAS the model holds.
fn all_ioas(model: &ModelIommufd) -> Vec<IoasId> {
    let mut out = Vec::new();
    let mut id = 1u32;
    while out.len() < model.ioas_count() && id < 1_000_000 {
        if model.iopt(IoasId(id)).is_ok() {
            out.push(IoasId(id));
        }
        id += 1;
    }
    out
}

/// The invariants of the device's state over the model (see the module
/// doc). The heart of the pass-through guarantee: every area of every IOAS
/// lies inside the process mapping of guest RAM.
pub fn check_state(rig: &Rig) -> Verdict {
    let model = rig.dev.iommufd();
    let ram = &rig.ram;
    let all = all_ioas(model);
    // Areas inside guest RAM, in every IOAS.
    for &ioas in &all {
        for a in model.iopt(ioas).map_err(|e| e.to_string())?.areas() {
            check(ram.holds_user(a.user_va, a.length()), || {
                format!(
                    "IOAS {} area {:#x}-{:#x} -> user {:#x} (+{:#x}) lies outside guest RAM {:x?}",
                    ioas.0,
                    a.iova,
                    a.last,
                    a.user_va,
                    a.length(),
                    ram.regions
                )
            })?;
        }
    }
    // One IOAS per translated domain; each area a mapping at its pages'
    // current address; each mapping flagged in the IOAS really there.
    let stats = rig.dev.stats();
    let mut found = 0;
    let mut owned = BTreeSet::new();
    let mut mappings = 0;
    for &id in &rig.domains {
        let Some(d) = rig.dev.domain(id) else {
            continue;
        };
        found += 1;
        mappings += d.mapping_count();
        let Some(ioas) = d.ioas else { continue };
        check(owned.insert(ioas), || {
            format!("IOAS {} shared by two domains", ioas.0)
        })?;
        let iopt = model
            .iopt(ioas)
            .map_err(|e| format!("domain {id}: its IOAS {}: {e}", ioas.0))?;
        for &Mapping { map: m, in_ioas } in d.mappings() {
            let len = m.virt_end - m.virt_start + 1;
            let area = iopt.area_at(m.virt_start);
            if in_ioas {
                let want = ram.user_addr(m.phys_start, len);
                check(
                    area.is_some_and(|a| {
                        a.iova == m.virt_start
                            && a.last == m.virt_end
                            && Some(a.user_va) == want
                            && a.prot.read == (m.flags & map_flags::READ != 0)
                            && a.prot.write == (m.flags & map_flags::WRITE != 0)
                    }),
                    || {
                        format!("domain {id}: mapping {m:x?} vs its IOAS area {area:x?} (RAM says {want:x?})")
                    },
                )?;
            } else {
                check(area.is_none(), || {
                    format!("domain {id}: mapping {m:x?} out of the IOAS, but area {area:x?}")
                })?;
            }
        }
        let in_ioas = d.mappings().filter(|m| m.in_ioas).count();
        check(iopt.areas().count() == in_ioas, || {
            format!(
                "domain {id}: IOAS {} holds {} areas for {in_ioas} mappings",
                ioas.0,
                iopt.areas().count()
            )
        })?;
    }
    check(found == stats.domains, || {
        format!("stats say {} domains, {found} found", stats.domains)
    })?;
    check(mappings == stats.mappings, || {
        format!("stats say {} mappings, {mappings} found", stats.mappings)
    })?;
    // What remains is the identity IOAS (at most one), mapping RAM 1:1.
    let spare: Vec<IoasId> = all.iter().copied().filter(|i| !owned.contains(i)).collect();
    let identity = rig.dev.device_config().identity_ioas && !rig.endpoints.is_empty();
    if spare.len() > usize::from(identity) {
        // Known (reported): a device that cannot be moved to its parking
        // place (the identity IOAS refuses it, e.g. its page size exceeds
        // the alignment of the RAM areas there) stays attached to its old
        // domain's IOAS, which then cannot be destroyed. Recognised by that
        // shape: a leaked IOAS holding a device whose endpoint is in no
        // domain.
        let stuck = spare.iter().any(|&ioas| {
            rig.endpoints.iter().any(|&ep| {
                rig.dev.domain_of(ep).is_none()
                    && (100..rig.next_dev).any(|d| model.attached_to(DeviceId(d)) == Some(ioas))
            })
        });
        if stuck {
            return Err(format!(
                "known: reset/detach left a device attached to a leaked IOAS ({spare:?}); changes {:x?}",
                rig.changes
            ));
        }
    }
    check(spare.len() <= usize::from(identity), || {
        format!(
            "IOAS {spare:?} belong to no domain (identity IOAS expected: {identity}); changes {:x?}{}",
            rig.changes,
            if std::env::var_os("VUI_FUZZ_DEBUG").is_some() { format!("\n{:#x?}", rig.dev) } else { String::new() }
        )
    })?;
    for &ioas in &spare {
        for a in model.iopt(ioas).map_err(|e| e.to_string())?.areas() {
            check(ram.user_addr(a.iova, a.length()) == Some(a.user_va), || {
                format!("identity IOAS area {a:x?} is not guest RAM 1:1")
            })?;
        }
    }
    Ok(())
}

/// The bytes of a request, well-formed or not.
pub fn arbitrary_request(g: &mut Gen, rig: &Rig) -> Vec<u8> {
    let mut b = Vec::with_capacity(80);
    let kind = g.below(12);
    let t = match kind {
        0..=1 => 1,
        2 => 2,
        3..=6 => 3,
        7..=8 => 4,
        9 => 5,
        10 => g.u8(),
        _ => return g.bytes_upto(100),
    };
    b.extend_from_slice(&[t, 0, 0, 0]);
    if g.chance(1, 16) {
        b[1 + g.below(3) as usize] = g.u8();
    }
    let page = 1u64
        << rig
            .dev
            .device_config()
            .page_size_mask
            .trailing_zeros()
            .min(63);
    match t {
        1 | 2 => {
            b.extend_from_slice(&rig.some_domain(g).to_le_bytes());
            b.extend_from_slice(&rig.some_endpoint(g).to_le_bytes());
            let flags = if g.chance(3, 4) {
                g.below(2) as u32
            } else {
                g.edgy_u32()
            };
            b.extend_from_slice(&flags.to_le_bytes());
            b.extend_from_slice(&[0; 4]);
        }
        3 | 4 => {
            b.extend_from_slice(&rig.some_domain(g).to_le_bytes());
            let start = match g.below(4) {
                0 => g.edgy_u64(),
                1 => rig.ram.some_gpa(g),
                _ => g.below(64) * page,
            };
            let len = match g.below(4) {
                0 => g.edgy_u64(),
                _ => (g.below(16) + 1) * page,
            };
            b.extend_from_slice(&start.to_le_bytes());
            b.extend_from_slice(&start.wrapping_add(len).wrapping_sub(1).to_le_bytes());
            if t == 3 {
                b.extend_from_slice(&rig.ram.some_gpa(g).to_le_bytes());
                let flags = if g.chance(7, 8) {
                    g.range(0, 7) as u32
                } else {
                    g.edgy_u32()
                };
                b.extend_from_slice(&flags.to_le_bytes());
            } else {
                b.extend_from_slice(&[0; 4]);
            }
        }
        _ => {
            b.extend_from_slice(&rig.some_endpoint(g).to_le_bytes());
            b.extend_from_slice(&[0; 64]);
        }
    }
    // Truncate, extend or flip a byte now and then.
    match g.below(12) {
        0 => b.truncate(g.below(b.len() as u64 + 1) as usize),
        1 => b.extend(g.bytes_upto(64)),
        2 => {
            let i = g.below(b.len() as u64) as usize;
            b[i] ^= 1 << g.below(8);
        }
        _ => {}
    }
    b
}

/// A reply buffer length: usually what the driver gives, sometimes not.
pub fn arbitrary_reply_len(g: &mut Gen, rig: &Rig) -> usize {
    let probe = rig.dev.device_config().probe_size as usize;
    match g.below(8) {
        0 => g.below(8) as usize,
        1 => probe + g.below(8) as usize,
        2 => g.below(5000) as usize,
        3 => probe + 4,
        _ => 4,
    }
}

/// See the module doc.
#[derive(Debug, Default)]
pub struct RequestTarget {
    requests: u64,
    refused_configs: u64,
}

impl Target for RequestTarget {
    fn one(&mut self, g: &mut Gen) -> Verdict {
        let identity = g.chance(1, 3);
        let Some(mut rig) = Rig::arbitrary(g, identity) else {
            self.refused_configs += 1;
            return Ok(());
        };
        for _ in 0..g.range(1, 48) {
            match g.below(40) {
                0 => rig.set_memory(FakeRam::arbitrary(g)),
                1 => rig.reset(),
                2 => rig.add_endpoint(g),
                3 => rig.remove_endpoint(g),
                4 => {
                    let on = [g.below(3) as u8];
                    let mut sink = Collect(&mut rig.changes);
                    let _ = rig.dev.write_config(36, &on, &mut sink);
                }
                _ => {
                    let req = arbitrary_request(g, &rig);
                    let len = arbitrary_reply_len(g, &rig);
                    self.requests += 1;
                    rig.request(&req, len)?;
                }
            }
            check_state(&rig)?;
        }
        Ok(())
    }

    fn notes(&self) -> Vec<String> {
        vec![format!(
            "{} requests; {} configurations refused by Device::new",
            self.requests, self.refused_configs
        )]
    }
}
