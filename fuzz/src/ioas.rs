// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Target `ioas`: arbitrary sequences of `Iommufd` operations on the model
//! (`ModelIommufd`) against a reference written here page by page: each
//! IOAS is a `BTreeMap` from IOVA page to (first IOVA of its area, user
//! address, prot, writable pages), plus its allowed ranges; each device
//! knows the IOAS it is attached to and the ranges it reserves there.
//!
//! The reference predicts, from the rules of `drivers/iommu/iommufd/` as
//! the conformance suite pins them down, whether each operation succeeds,
//! with which errno when the rule is plain, and its effect: MAP and COPY at
//! a fixed IOVA, MAP at an allocated one (any free, allowed, unreserved
//! place), UNMAP walking areas lowest first and stopping (not rolling back)
//! at one it would split, attach refused over areas or allowed ranges,
//! DESTROY refused while attached. After every operation the model's areas,
//! expanded to pages, must equal the reference, and no area may touch a
//! reserved range.
//!
//! Operations with arbitrary 64-bit values go to IOASes kept apart from
//! the compared ones ("wild" IOASes): there a refused operation must change
//! nothing and the structural invariants must hold.

use std::collections::BTreeMap;

use iopt::model::{MockDevice, ModelIommufd};
use iopt::{CopyRequest, DeviceId, IoasId, Iommufd, IoptError, IovaRange, MapRequest, Prot};

use crate::{check, Gen, Target, Verdict};

const P: u64 = iopt::PAGE_SIZE;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Page {
    area: u64,
    user_va: u64,
    prot: Prot,
    writable: bool,
}

#[derive(Clone, Debug, Default)]
struct RefIoas {
    pages: BTreeMap<u64, Page>,
    allowed: Vec<IovaRange>,
    wild: bool,
}

#[derive(Clone, Debug, Default)]
struct Reference {
    ioas: BTreeMap<u32, RefIoas>,
    /// Device → IOAS it is attached to.
    attached: BTreeMap<u32, u32>,
    /// Device → the ranges it reserves in its IOAS.
    reservations: BTreeMap<u32, Vec<IovaRange>>,
}

fn overlaps(a: IovaRange, b: IovaRange) -> bool {
    a.start <= b.last && b.start <= a.last
}

impl Reference {
    fn reserved(&self, ioas: u32) -> Vec<IovaRange> {
        self.attached
            .iter()
            .filter(|&(_, &i)| i == ioas)
            .flat_map(|(d, _)| self.reservations[d].clone())
            .collect()
    }

    fn reserved_hit(&self, ioas: u32, r: IovaRange) -> bool {
        self.reserved(ioas).iter().any(|&x| overlaps(x, r))
    }

    /// Why placing `npages` at `iova` must fail: EINVAL if reserved, EEXIST
    /// if mapped (the kernel's order).
    fn place_error(&self, ioas: u32, iova: u64, npages: u64) -> Option<&'static str> {
        let r = IovaRange {
            start: iova,
            last: iova + npages * P - 1,
        };
        if self.reserved_hit(ioas, r) {
            return Some("EINVAL");
        }
        let pages = &self.ioas[&ioas].pages;
        if pages.range(iova / P..iova / P + npages).next().is_some() {
            return Some("EEXIST");
        }
        None
    }

    /// Areas of an IOAS: first page → (last page, first page's entry).
    fn areas(&self, ioas: u32) -> BTreeMap<u64, u64> {
        let mut out: BTreeMap<u64, u64> = BTreeMap::new();
        for (&p, e) in &self.ioas[&ioas].pages {
            out.entry(e.area / P)
                .and_modify(|last| *last = (*last).max(p))
                .or_insert(p);
        }
        out
    }
}

fn errno(e: &IoptError) -> &'static str {
    match e {
        IoptError::Invalid(_) => "EINVAL",
        IoptError::Exists => "EEXIST",
        IoptError::NotFound(_) => "ENOENT",
        IoptError::AddressInUse => "EADDRINUSE",
        IoptError::Busy => "EBUSY",
        IoptError::NoSpace => "ENOSPC",
        IoptError::Permission => "EPERM",
        IoptError::Overflow => "EOVERFLOW",
        _ => "other",
    }
}

fn prot(g: &mut Gen) -> Prot {
    match g.below(8) {
        0 => Prot::default(),
        1 => Prot::READ,
        2 => Prot::WRITE,
        _ => Prot::RW,
    }
}

/// The devices: an x86 one; one with a narrow aperture and a reserved hole
/// inside the compared window; one reserving a few low pages.
fn devices() -> Vec<(u32, MockDevice)> {
    vec![
        (1, MockDevice::x86()),
        (
            2,
            MockDevice {
                aperture: IovaRange {
                    start: 16 * P,
                    last: 0xffff_ffff,
                },
                reserved: vec![IovaRange {
                    start: 64 * P,
                    last: 72 * P - 1,
                }],
                page_size: P,
            },
        ),
        (
            3,
            MockDevice {
                aperture: IovaRange {
                    start: 0,
                    last: u64::MAX,
                },
                reserved: vec![IovaRange {
                    start: 100 * P,
                    last: 101 * P - 1,
                }],
                page_size: P,
            },
        ),
    ]
}

fn reservations(m: &MockDevice) -> Vec<IovaRange> {
    let mut v = m.reserved.clone();
    if m.aperture.start > 0 {
        v.push(IovaRange {
            start: 0,
            last: m.aperture.start - 1,
        });
    }
    if m.aperture.last < u64::MAX {
        v.push(IovaRange {
            start: m.aperture.last + 1,
            last: u64::MAX,
        });
    }
    v
}

/// One run: the model and the reference side by side.
struct Pair {
    model: ModelIommufd,
    r: Reference,
    log: Vec<String>,
}

impl Pair {
    fn new() -> Self {
        let mut model = ModelIommufd::new();
        let mut r = Reference::default();
        for (id, m) in devices() {
            r.reservations.insert(id, reservations(&m));
            let _ = model.add_device(DeviceId(id), m);
        }
        Self {
            model,
            r,
            log: Vec::new(),
        }
    }

    fn some_ioas(&self, g: &mut Gen, wild: bool) -> u32 {
        let ids: Vec<u32> = self
            .r
            .ioas
            .iter()
            .filter(|(_, i)| i.wild == wild)
            .map(|(&id, _)| id)
            .collect();
        if ids.is_empty() || g.chance(1, 20) {
            // Any ID, but never one of the other kind.
            let id = g.range(0, 6) as u32;
            match self.r.ioas.get(&id) {
                Some(i) if i.wild != wild => 1000,
                _ => id,
            }
        } else {
            ids[g.below(ids.len() as u64) as usize]
        }
    }

    /// An IOVA page in the compared window (pages 0..128, and a few next to
    /// the x86 MSI window).
    fn some_page(g: &mut Gen) -> u64 {
        if g.chance(1, 10) {
            0xfee0_0000 / P - 8 + g.below(16)
        } else {
            g.below(128)
        }
    }

    fn fail(&self, what: String) -> String {
        let tail = self.log.len().saturating_sub(12);
        format!("{what}\n      after: {}", self.log[tail..].join("; "))
    }

    fn step(&mut self, g: &mut Gen) -> Verdict {
        match g.below(40) {
            0..=2 => self.alloc(g.chance(1, 4)),
            3 => self.destroy(g),
            4..=15 => self.map(g),
            16..=21 => self.unmap(g),
            22..=27 => self.copy(g),
            28..=30 => self.attach(g),
            31 => self.detach(g),
            32 => self.allow(g),
            _ => self.wild(g),
        }?;
        self.compare()
    }

    fn alloc(&mut self, wild: bool) -> Verdict {
        let got = self.model.ioas_alloc();
        let want = (1..).find(|id| !self.r.ioas.contains_key(id)).unwrap_or(0);
        self.log.push(format!("alloc -> {got:?}"));
        check(got == Ok(IoasId(want)), || {
            self.fail(format!("ioas_alloc gave {got:?}, the reference {want}"))
        })?;
        self.r.ioas.insert(
            want,
            RefIoas {
                wild,
                ..RefIoas::default()
            },
        );
        Ok(())
    }

    fn destroy(&mut self, g: &mut Gen) -> Verdict {
        let wild = g.bool();
        let id = self.some_ioas(g, wild);
        let got = self.model.ioas_destroy(IoasId(id));
        self.log.push(format!("destroy {id} -> {got:?}"));
        let want = if !self.r.ioas.contains_key(&id) {
            Err("ENOENT")
        } else if self.r.attached.values().any(|&i| i == id) {
            Err("EBUSY")
        } else {
            Ok(())
        };
        check(got.as_ref().map_err(errno).copied() == want, || {
            self.fail(format!("destroy {id}: {got:?}, the reference {want:?}"))
        })?;
        if want.is_ok() {
            self.r.ioas.remove(&id);
        }
        Ok(())
    }

    fn map(&mut self, g: &mut Gen) -> Verdict {
        let id = self.some_ioas(g, false);
        let fixed = g.chance(3, 4).then(|| Self::some_page(g) * P);
        let npages = if g.chance(1, 20) { 0 } else { g.range(1, 16) };
        let user_va = (0x1000 + g.below(1 << 20)) * P;
        let prot = prot(g);
        let req = MapRequest {
            iova: fixed,
            user_va,
            length: npages * P,
            prot,
        };
        let got = self.model.map(IoasId(id), req);
        self.log.push(format!("map {id} {req:x?} -> {got:x?}"));
        let Some(rio) = self.r.ioas.get(&id) else {
            return check(got.is_err(), || {
                self.fail(format!("map on missing IOAS {id}: {got:?}"))
            });
        };
        if npages == 0 || (!prot.read && !prot.write) {
            return check(got.as_ref().map_err(errno) == Err("EINVAL"), || {
                self.fail(format!("map {req:x?}: {got:?}, the reference EINVAL"))
            });
        }
        let iova = match (fixed, got) {
            (Some(iova), got) => {
                let want = self.r.place_error(id, iova, npages);
                check(got.as_ref().err().map(errno) == want, || {
                    self.fail(format!("map {req:x?}: {got:x?}, the reference {want:?}"))
                })?;
                if want.is_some() {
                    return Ok(());
                }
                check(got == Ok(iova), || {
                    self.fail(format!("fixed map at {iova:#x} returned {got:x?}"))
                })?;
                iova
            }
            (None, Err(e)) => {
                // Nothing fits only when allowed ranges confine it.
                return check(
                    matches!(e, IoptError::NoSpace) && !rio.allowed.is_empty(),
                    || self.fail(format!("map {req:x?} with the allocator: {e:?}")),
                );
            }
            (None, Ok(iova)) => {
                let r = IovaRange {
                    start: iova,
                    last: iova.wrapping_add(npages * P - 1),
                };
                check(
                    iova % P == 0
                        && iova >= P
                        && r.last > iova
                        && self.r.place_error(id, iova, npages).is_none()
                        && (rio.allowed.is_empty()
                            || rio
                                .allowed
                                .iter()
                                .any(|a| a.start <= r.start && r.last <= a.last)),
                    || {
                        self.fail(format!("allocated IOVA {iova:#x} for {npages} pages is not free, allowed and unreserved"))
                    },
                )?;
                iova
            }
        };
        let pages = &mut self.r.ioas.get_mut(&id).expect("checked").pages;
        for k in 0..npages {
            pages.insert(
                iova / P + k,
                Page {
                    area: iova,
                    user_va: user_va + k * P,
                    prot,
                    writable: prot.write,
                },
            );
        }
        Ok(())
    }

    fn unmap(&mut self, g: &mut Gen) -> Verdict {
        let id = self.some_ioas(g, false);
        let all = g.chance(1, 8);
        let (iova, length) = if all {
            (0, u64::MAX)
        } else {
            (Self::some_page(g) * P, g.below(24) * P)
        };
        let got = self.model.unmap(IoasId(id), iova, length);
        self.log
            .push(format!("unmap {id} {iova:#x}+{length:#x} -> {got:x?}"));
        if !self.r.ioas.contains_key(&id) {
            return check(got.is_err(), || {
                self.fail(format!("unmap on missing IOAS {id}: {got:?}"))
            });
        }
        if all {
            let n = self.r.ioas[&id].pages.len() as u64 * P;
            self.r.ioas.get_mut(&id).expect("checked").pages.clear();
            return check(got == Ok(n), || {
                self.fail(format!("unmap all: {got:?}, the reference Ok({n:#x})"))
            });
        }
        if length == 0 {
            return check(got.as_ref().map_err(errno) == Err("EINVAL"), || {
                self.fail(format!("unmap of length 0: {got:?}"))
            });
        }
        let (first, last) = (iova / P, (iova + length) / P - 1);
        let mut removed = 0;
        let mut split = false;
        for (start, end) in self.r.areas(id) {
            if end < first || start > last {
                continue;
            }
            if start < first || end > last {
                split = true;
                break;
            }
            let pages = &mut self.r.ioas.get_mut(&id).expect("checked").pages;
            for p in start..=end {
                pages.remove(&p);
            }
            removed += (end - start + 1) * P;
        }
        let want = if split || removed == 0 {
            Err("ENOENT")
        } else {
            Ok(removed)
        };
        check(got.as_ref().map_err(errno).copied() == want, || {
            self.fail(format!(
                "unmap {iova:#x}+{length:#x}: {got:x?}, the reference {want:x?}"
            ))
        })
    }

    fn copy(&mut self, g: &mut Gen) -> Verdict {
        let src = self.some_ioas(g, false);
        let dst = if g.chance(1, 4) {
            src
        } else {
            self.some_ioas(g, false)
        };
        let npages = if g.chance(1, 20) { 0 } else { g.range(1, 12) };
        let src_iova = self
            .r
            .ioas
            .get(&src)
            .and_then(|i| {
                let keys: Vec<u64> = i.pages.keys().copied().collect();
                (!keys.is_empty() && g.chance(3, 4))
                    .then(|| keys[g.below(keys.len() as u64) as usize] * P)
            })
            .unwrap_or_else(|| Self::some_page(g) * P);
        let dst_iova = g.chance(3, 4).then(|| Self::some_page(g) * P);
        let prot = prot(g);
        let req = CopyRequest {
            src_ioas: IoasId(src),
            src_iova,
            dst_ioas: IoasId(dst),
            dst_iova,
            length: npages * P,
            prot,
        };
        let got = self.model.copy(req);
        self.log.push(format!("copy {req:x?} -> {got:x?}"));
        let (Some(s), Some(_)) = (self.r.ioas.get(&src), self.r.ioas.get(&dst)) else {
            return check(got.is_err(), || {
                self.fail(format!("copy with a missing IOAS: {got:?}"))
            });
        };
        if npages == 0 || (!prot.read && !prot.write) {
            return check(got.is_err(), || {
                self.fail(format!("copy {req:x?}: {got:?}, the reference EINVAL"))
            });
        }
        // The source pages, all mapped.
        let first = src_iova / P;
        let seg: Option<Vec<Page>> = (first..first + npages)
            .map(|p| s.pages.get(&p).copied())
            .collect();
        let Some(seg) = seg else {
            return check(got.as_ref().map_err(errno) == Err("ENOENT"), || {
                self.fail(format!(
                    "copy of unmapped source {req:x?}: {got:?}, the reference ENOENT"
                ))
            });
        };
        let iova = match (dst_iova, got) {
            (Some(iova), got) => {
                let want = self
                    .r
                    .place_error(dst, iova, npages)
                    .or((prot.write && seg.iter().any(|p| !p.writable)).then_some("EPERM"));
                check(got.as_ref().err().map(errno) == want, || {
                    self.fail(format!("copy {req:x?}: {got:x?}, the reference {want:?}"))
                })?;
                if want.is_some() {
                    return Ok(());
                }
                check(got == Ok(iova), || {
                    self.fail(format!("fixed copy at {iova:#x} returned {got:x?}"))
                })?;
                iova
            }
            (None, Err(e)) => {
                let ok = match e {
                    IoptError::Permission => prot.write && seg.iter().any(|p| !p.writable),
                    IoptError::NoSpace => !self.r.ioas[&dst].allowed.is_empty(),
                    // The allocator aligns to the source's user address,
                    // which may be below the IOAS alignment only if ...
                    _ => false,
                };
                return check(ok, || {
                    self.fail(format!("copy {req:x?} with the allocator: {e:?}"))
                });
            }
            (None, Ok(iova)) => {
                check(
                    prot.write <= seg.iter().all(|p| p.writable)
                        && iova % P == 0
                        && self.r.place_error(dst, iova, npages).is_none(),
                    || {
                        self.fail(format!(
                            "copy {req:x?} allocated {iova:#x}: not free, or EPERM expected"
                        ))
                    },
                )?;
                iova
            }
        };
        // One area per source area crossed.
        let mut area = iova;
        let pages = &mut self.r.ioas.get_mut(&dst).expect("checked").pages;
        for (k, p) in seg.iter().enumerate() {
            let k = k as u64;
            if k > 0 && p.area != seg[k as usize - 1].area {
                area = iova + k * P;
            }
            pages.insert(
                iova / P + k,
                Page {
                    area,
                    user_va: p.user_va,
                    prot,
                    writable: p.writable,
                },
            );
        }
        Ok(())
    }

    fn attach(&mut self, g: &mut Gen) -> Verdict {
        let dev = g.range(1, 4) as u32;
        let id = self.some_ioas(g, false);
        let got = self.model.attach(DeviceId(dev), IoasId(id));
        self.log
            .push(format!("attach dev {dev} to {id} -> {got:?}"));
        let want = if !self.r.reservations.contains_key(&dev) || !self.r.ioas.contains_key(&id) {
            Err("ENOENT")
        } else if self.r.attached.get(&dev) == Some(&id) {
            Ok(())
        } else {
            let rio = &self.r.ioas[&id];
            let hit = self.r.reservations[&dev].iter().any(|&res| {
                rio.pages.keys().any(|&p| {
                    overlaps(
                        res,
                        IovaRange {
                            start: p * P,
                            last: p * P + P - 1,
                        },
                    )
                }) || rio.allowed.iter().any(|&a| overlaps(a, res))
            });
            if hit {
                Err("EADDRINUSE")
            } else {
                Ok(())
            }
        };
        check(got.as_ref().map_err(errno).copied() == want, || {
            self.fail(format!(
                "attach dev {dev} to IOAS {id}: {got:?}, the reference {want:?}"
            ))
        })?;
        if want.is_ok() {
            self.r.attached.insert(dev, id);
        }
        Ok(())
    }

    fn detach(&mut self, g: &mut Gen) -> Verdict {
        let dev = g.range(1, 4) as u32;
        let got = self.model.detach(DeviceId(dev));
        self.log.push(format!("detach dev {dev} -> {got:?}"));
        let known = self.r.reservations.contains_key(&dev);
        check(got.is_ok() == known, || {
            self.fail(format!("detach dev {dev}: {got:?}"))
        })?;
        self.r.attached.remove(&dev);
        Ok(())
    }

    fn allow(&mut self, g: &mut Gen) -> Verdict {
        let id = self.some_ioas(g, false);
        let n = g.below(3);
        let ranges: Vec<IovaRange> = (0..n)
            .map(|_| {
                let s = Self::some_page(g) * P;
                IovaRange {
                    start: s,
                    last: s + g.range(1, 200) * P - 1,
                }
            })
            .collect();
        let got = self.model.allow_iovas(IoasId(id), &ranges);
        self.log.push(format!("allow {id} {ranges:x?} -> {got:?}"));
        let Some(_) = self.r.ioas.get(&id) else {
            return check(got.is_err(), || {
                self.fail(format!("allow on missing IOAS {id}: {got:?}"))
            });
        };
        let mut sorted = ranges.clone();
        sorted.sort_by_key(|r| r.start);
        let want = if sorted.windows(2).any(|w| overlaps(w[0], w[1])) {
            Err("EINVAL")
        } else if sorted.iter().any(|&r| self.r.reserved_hit(id, r)) {
            Err("EADDRINUSE")
        } else {
            Ok(())
        };
        check(got.as_ref().map_err(errno).copied() == want, || {
            self.fail(format!(
                "allow_iovas {ranges:x?}: {got:?}, the reference {want:?}"
            ))
        })?;
        if want.is_ok() {
            self.r.ioas.get_mut(&id).expect("checked").allowed = sorted;
        }
        Ok(())
    }

    /// Arbitrary values on a wild IOAS: a refusal changes nothing.
    fn wild(&mut self, g: &mut Gen) -> Verdict {
        let id = self.some_ioas(g, true);
        let src = self.some_ioas(g, true);
        // Wild values never reach a compared IOAS (its pages could not be
        // listed).
        let tame = |i: &u32| self.r.ioas.get(i).is_some_and(|x| !x.wild);
        if tame(&id) || tame(&src) {
            return Ok(());
        }
        let before = self.model.iopt(IoasId(id)).ok().cloned();
        let result = match g.below(3) {
            0 => self
                .model
                .map(
                    IoasId(id),
                    MapRequest {
                        iova: g.bool().then(|| g.edgy_u64()),
                        user_va: g.edgy_u64(),
                        length: g.edgy_u64(),
                        prot: prot(g),
                    },
                )
                .map(|_| ()),
            1 => self
                .model
                .copy(CopyRequest {
                    src_ioas: IoasId(src),
                    src_iova: g.edgy_u64(),
                    dst_ioas: IoasId(id),
                    dst_iova: g.bool().then(|| g.edgy_u64()),
                    length: g.edgy_u64(),
                    prot: prot(g),
                })
                .map(|_| ()),
            _ => {
                // A refused UNMAP may have unmapped the areas before the
                // one it would split: no "nothing changed" check.
                let _ = self.model.unmap(IoasId(id), g.edgy_u64(), g.edgy_u64());
                Ok(())
            }
        };
        self.log.push(format!("wild op on {id} -> {result:?}"));
        if result.is_err() {
            let after = self.model.iopt(IoasId(id)).ok().cloned();
            let same = match (&before, &after) {
                (Some(b), Some(a)) => b.areas().eq(a.areas()),
                (None, None) => true,
                _ => false,
            };
            check(same, || {
                self.fail(format!("refused wild op on IOAS {id} changed its areas"))
            })?;
        }
        Ok(())
    }

    /// The model against the reference, page by page; structure of every
    /// IOAS.
    fn compare(&self) -> Verdict {
        check(self.model.ioas_count() == self.r.ioas.len(), || {
            self.fail(format!(
                "model holds {} IOASes, the reference {}",
                self.model.ioas_count(),
                self.r.ioas.len()
            ))
        })?;
        for (&id, rio) in &self.r.ioas {
            let iopt = self
                .model
                .iopt(IoasId(id))
                .map_err(|e| self.fail(format!("IOAS {id}: {e}")))?;
            let mut prev: Option<u64> = None;
            for a in iopt.areas() {
                check(prev.is_none_or(|p| p < a.iova) && a.iova <= a.last, || {
                    self.fail(format!("IOAS {id}: area {a:x?} overlaps or is unordered"))
                })?;
                prev = Some(a.last);
                check(
                    !iopt.reserved().iter().any(|r| {
                        overlaps(
                            r.range,
                            IovaRange {
                                start: a.iova,
                                last: a.last,
                            },
                        )
                    }),
                    || self.fail(format!("IOAS {id}: area {a:x?} touches a reserved range")),
                )?;
            }
            if rio.wild {
                continue;
            }
            let mut model_pages = BTreeMap::new();
            for a in iopt.areas() {
                let mut at = a.iova;
                loop {
                    model_pages.insert(
                        at / P,
                        Page {
                            area: a.iova,
                            user_va: a.user_va_of(at),
                            prot: a.prot,
                            writable: a.writable_pages,
                        },
                    );
                    if at.checked_add(P).is_none_or(|n| n > a.last) {
                        break;
                    }
                    at += P;
                }
            }
            check(model_pages == rio.pages, || {
                let only_model: Vec<_> = model_pages
                    .iter()
                    .filter(|(k, v)| rio.pages.get(k) != Some(v))
                    .take(4)
                    .collect();
                let only_ref: Vec<_> = rio
                    .pages
                    .iter()
                    .filter(|(k, v)| model_pages.get(k) != Some(v))
                    .take(4)
                    .collect();
                self.fail(format!("IOAS {id}: translations differ; model {only_model:x?}, reference {only_ref:x?}"))
            })?;
            check(iopt.allowed() == &rio.allowed[..], || {
                self.fail(format!(
                    "IOAS {id}: allowed {:x?} vs {:x?}",
                    iopt.allowed(),
                    rio.allowed
                ))
            })?;
        }
        Ok(())
    }
}

/// See the module doc.
#[derive(Debug, Default)]
pub struct IoasTarget {
    ops: u64,
}

impl Target for IoasTarget {
    fn one(&mut self, g: &mut Gen) -> Verdict {
        let mut pair = Pair::new();
        pair.alloc(false)?;
        pair.alloc(false)?;
        pair.alloc(true)?;
        for _ in 0..g.range(1, 80) {
            self.ops += 1;
            pair.step(g)?;
        }
        Ok(())
    }

    fn notes(&self) -> Vec<String> {
        vec![format!("{} operations", self.ops)]
    }
}
