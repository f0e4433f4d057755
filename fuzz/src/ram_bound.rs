// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Target `ram-bound`: the pass-through shape of the device (bypass through
//! an identity IOAS, as `--mode iommufd` runs it) over the IOAS model, fed
//! well-formed MAP / UNMAP / ATTACH / DETACH aimed at the edges of guest
//! RAM, with memory tables replaced and endpoints hot-plugged in between.
//!
//! The property: no IOAS area ever points outside the daemon's mapping of
//! guest RAM (in pass-through mode an area is what the host IOMMU lets a
//! real device reach), and each area is exactly a mapping the guest made
//! at its guest pages' current address ([`crate::request::check_state`]).

use crate::request::{check_state, FakeRam, Rig};
use crate::{Gen, Target, Verdict};

fn le32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn le64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}

/// A MAP aimed at the edges of guest RAM: ranges that start inside a region
/// and end past it, span two regions adjacent in guest physical space, or
/// wrap.
fn map_request(g: &mut Gen, rig: &Rig) -> Vec<u8> {
    let mut b = vec![3, 0, 0, 0];
    le32(&mut b, rig.some_domain(g));
    let iova = g.below(512) << 12;
    let phys = rig.ram.some_gpa(g);
    let len = match g.below(6) {
        0 => g.edgy_u64(),
        1 => rig
            .ram
            .regions
            .iter()
            .find(|r| r.gpa <= phys && phys - r.gpa < r.len)
            .map_or(0x1000, |r| r.len - (phys - r.gpa) + 0x1000),
        _ => (g.below(32) + 1) << 12,
    };
    le64(&mut b, iova);
    le64(&mut b, iova.wrapping_add(len).wrapping_sub(1));
    le64(&mut b, phys);
    le32(&mut b, g.pick(&[1, 2, 3, 3, 3, 4, 5, 7]));
    b
}

fn unmap_request(g: &mut Gen, rig: &Rig) -> Vec<u8> {
    let mut b = vec![4, 0, 0, 0];
    le32(&mut b, rig.some_domain(g));
    let (start, end) = match g.below(4) {
        0 => (0, u64::MAX),
        _ => {
            let s = g.below(512) << 12;
            (s, s + ((g.below(64) + 1) << 12) - 1)
        }
    };
    le64(&mut b, start);
    le64(&mut b, end);
    le32(&mut b, 0);
    b
}

fn attach_request(g: &mut Gen, rig: &Rig, t: u8) -> Vec<u8> {
    let mut b = vec![t, 0, 0, 0];
    le32(&mut b, rig.some_domain(g));
    le32(&mut b, rig.some_endpoint(g));
    le32(&mut b, u32::from(g.chance(1, 5)));
    le32(&mut b, 0);
    b
}

/// See the module doc.
#[derive(Debug, Default)]
pub struct RamBoundTarget {
    requests: u64,
    tables: u64,
    refused_configs: u64,
}

impl Target for RamBoundTarget {
    fn one(&mut self, g: &mut Gen) -> Verdict {
        let Some(mut rig) = Rig::arbitrary(g, true) else {
            self.refused_configs += 1;
            return Ok(());
        };
        for _ in 0..g.range(1, 64) {
            match g.below(24) {
                0..=1 => {
                    self.tables += 1;
                    rig.set_memory(FakeRam::arbitrary(g));
                }
                2 => rig.add_endpoint(g),
                3 => rig.remove_endpoint(g),
                4 => rig.reset(),
                5 => {
                    let on = [g.below(2) as u8];
                    let mut sink = virtio_iommu::Discard;
                    let _ = rig.dev.write_config(36, &on, &mut sink);
                }
                k => {
                    let req = match k {
                        6..=8 => attach_request(g, &rig, 1),
                        9 => attach_request(g, &rig, 2),
                        10..=13 => unmap_request(g, &rig),
                        _ => map_request(g, &rig),
                    };
                    self.requests += 1;
                    rig.request(&req, 4)?;
                }
            }
            check_state(&rig)?;
        }
        Ok(())
    }

    fn notes(&self) -> Vec<String> {
        vec![format!(
            "{} requests, {} memory tables; {} configurations refused",
            self.requests, self.tables, self.refused_configs
        )]
    }
}
