// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Property tests of isolation (issue 11, "Hostile input,
//! systematically"): for random ATTACH / DETACH / MAP / UNMAP sequences
//! over three endpoints and four domains,
//! - an endpoint only ever translates through its own domain: what the
//!   device model serves for every endpoint and IOVA is exactly what a
//!   reference of the endpoint's own domain says (never another domain's
//!   mapping, nothing once detached);
//! - after an UNMAP completes no translation of the range is served
//!   anywhere: not by the device model, and not by the shared translation
//!   table QEMU walks (every domain's tree is compared with the reference
//!   after every request, as QEMU's translate() reads it).

use std::collections::BTreeMap;

use iopt::model::{MockDevice, ModelIommufd};
use iopt::DeviceId;
use proptest::prelude::*;
use vhost_user_iommu::mirror::table::{levels_for, memory_store, translate};
use vhost_user_iommu::mirror::{Batch, TranslationTable};
use virtio_iommu::{Device, DeviceConfig, GuestRam, RamRegion, Translation};

const P: u64 = 0x1000;
const EPS: [u32; 3] = [8, 9, 10];
const RAM_LEN: u64 = 16 << 20;
/// IOVA pages the checks walk.
const WINDOW: u64 = 72;

struct Ram;

impl GuestRam for Ram {
    fn user_addr(&self, gpa: u64, len: u64) -> Option<u64> {
        (gpa < RAM_LEN && len <= RAM_LEN - gpa).then(|| 0x7f00_0000_0000 + gpa)
    }
    fn for_each_region(&self, f: &mut dyn FnMut(RamRegion)) {
        f(RamRegion {
            gpa: 0,
            len: RAM_LEN,
            user_va: 0x7f00_0000_0000,
        });
    }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Attach {
        ep: usize,
        domain: u32,
    },
    Detach {
        ep: usize,
        domain: u32,
    },
    Map {
        domain: u32,
        page: u64,
        pages: u64,
        phys_page: u64,
        flags: u32,
    },
    Unmap {
        domain: u32,
        page: u64,
        pages: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0..3usize, 1..5u32).prop_map(|(ep, domain)| Op::Attach { ep, domain }),
        1 => (0..3usize, 1..5u32).prop_map(|(ep, domain)| Op::Detach { ep, domain }),
        4 => (1..5u32, 0..64u64, 1..8u64, 0..4096u64, 1..4u32).prop_map(
            |(domain, page, pages, phys_page, flags)| Op::Map { domain, page, pages, phys_page, flags }
        ),
        3 => (1..5u32, 0..64u64, 1..16u64).prop_map(|(domain, page, pages)| Op::Unmap { domain, page, pages }),
    ]
}

fn bytes(op: Op) -> Vec<u8> {
    let mut b = Vec::new();
    let le32 = |b: &mut Vec<u8>, v: u32| b.extend_from_slice(&v.to_le_bytes());
    let le64 = |b: &mut Vec<u8>, v: u64| b.extend_from_slice(&v.to_le_bytes());
    match op {
        Op::Attach { ep, domain } | Op::Detach { ep, domain } => {
            b.extend_from_slice(&[
                if matches!(op, Op::Attach { .. }) {
                    1
                } else {
                    2
                },
                0,
                0,
                0,
            ]);
            le32(&mut b, domain);
            le32(&mut b, EPS[ep]);
            le32(&mut b, 0);
            le32(&mut b, 0);
        }
        Op::Map {
            domain,
            page,
            pages,
            phys_page,
            flags,
        } => {
            b.extend_from_slice(&[3, 0, 0, 0]);
            le32(&mut b, domain);
            le64(&mut b, page * P);
            le64(&mut b, (page + pages) * P - 1);
            le64(&mut b, phys_page * P);
            le32(&mut b, flags);
        }
        Op::Unmap {
            domain,
            page,
            pages,
        } => {
            b.extend_from_slice(&[4, 0, 0, 0]);
            le32(&mut b, domain);
            le64(&mut b, page * P);
            le64(&mut b, (page + pages) * P - 1);
            le32(&mut b, 0);
        }
    }
    b
}

/// The reference: who is where, and each domain's mappings
/// (first page → (last page, first guest page, flags)).
#[derive(Default, Debug)]
struct Reference {
    domain_of: BTreeMap<u32, u32>,
    maps: BTreeMap<u32, BTreeMap<u64, (u64, u64, u32)>>,
}

impl Reference {
    /// Apply a request the device completed with OK.
    fn apply(&mut self, op: Op) {
        match op {
            Op::Attach { ep, domain } => {
                let old = self.domain_of.insert(EPS[ep], domain);
                self.maps.entry(domain).or_default();
                if let Some(old) = old.filter(|&o| o != domain) {
                    self.leave(old);
                }
            }
            Op::Detach { ep, domain } => {
                self.domain_of.remove(&EPS[ep]);
                self.leave(domain);
            }
            Op::Map {
                domain,
                page,
                pages,
                phys_page,
                flags,
            } => {
                self.maps
                    .entry(domain)
                    .or_default()
                    .insert(page, (page + pages - 1, phys_page, flags));
            }
            Op::Unmap {
                domain,
                page,
                pages,
            } => {
                if let Some(m) = self.maps.get_mut(&domain) {
                    m.retain(|&s, &mut (e, _, _)| !(s >= page && e < page + pages));
                }
            }
        }
    }

    fn leave(&mut self, domain: u32) {
        if !self.domain_of.values().any(|&d| d == domain) {
            self.maps.remove(&domain);
        }
    }

    /// The guest page `page` of `domain` translates to, with flags.
    fn lookup(&self, domain: u32, page: u64) -> Option<(u64, u32)> {
        let (&s, &(e, phys, flags)) = self.maps.get(&domain)?.range(..=page).next_back()?;
        (page <= e).then_some((phys + (page - s), flags))
    }
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let cfg = DeviceConfig::default();
    let mut model = ModelIommufd::new();
    for &ep in &EPS {
        model.add_device(DeviceId(ep), MockDevice::x86()).unwrap();
    }
    let mut dev = Device::new(cfg, model, EPS.iter().map(|&e| (e, DeviceId(e)))).unwrap();
    dev.set_acked_features(!0);
    dev.set_memory(&Ram);
    let levels = levels_for(cfg.input_range.1);
    let mut table = TranslationTable::new(memory_store(512), levels);
    let mut records = Vec::new();
    let mut r = Reference::default();

    for (i, &op) in ops.iter().enumerate() {
        let mut reply = [0xffu8; 4];
        {
            let mut batch = Batch::new(Some(&mut table), &mut records);
            dev.handle_request(&bytes(op), &mut reply, &Ram, &mut batch);
            let _ = batch.finish(None, |_| false);
        }
        if reply[0] == 0 {
            r.apply(op);
        }
        for &ep in &EPS {
            let own = r.domain_of.get(&ep).copied();
            for page in 0..WINDOW {
                let iova = page * P + 0x10;
                let want = own.and_then(|d| r.lookup(d, page));
                for write in [false, true] {
                    let got = dev.translate(ep, iova, write);
                    let expect = match want {
                        Some((gp, flags)) if flags & if write { 2 } else { 1 } != 0 => {
                            Some(gp * P + 0x10)
                        }
                        _ => None,
                    };
                    match (got, expect) {
                        (Translation::Mapped { gpa, .. }, Some(e)) if gpa == e => {}
                        (Translation::Fault { .. }, None) => {}
                        // Unattached, with the device's global bypass on.
                        (Translation::Bypass, None) if own.is_none() && dev.config().bypass == 1 => {}
                        _ => prop_assert!(
                            false,
                            "after request {i} {op:?}: endpoint {ep} (domain {own:?}) translates {iova:#x} ({}) to {got:?}, its own domain says {expect:#x?}",
                            if write { "write" } else { "read" }
                        ),
                    }
                }
            }
        }
        // The shared table, every domain that ever was, as QEMU walks it.
        for domain in 1..5u32 {
            let root = table.root(domain);
            let alive = r.maps.contains_key(&domain);
            prop_assert!(
                alive || root == 0,
                "after request {i} {op:?}: domain {domain} is gone but has root {root}"
            );
            for page in 0..WINDOW {
                let leaf = translate(table.words(), levels, root, page * P);
                let want = r.lookup(domain, page);
                let got = leaf.map(|l| (l.phys, l.read, l.write));
                let expect = want.map(|(gp, f)| (gp * P, f & 1 != 0, f & 2 != 0));
                prop_assert_eq!(
                    got,
                    expect,
                    "after request {} {:?}: shared table of domain {} at {:#x}",
                    i,
                    op,
                    domain,
                    page * P
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn endpoints_translate_only_through_their_own_domain_and_unmapped_ranges_are_gone_everywhere(
        ops in proptest::collection::vec(op(), 1..48)
    ) {
        run(&ops)?;
    }
}
