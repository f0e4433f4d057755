// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Property test: random MAP / UNMAP / COPY sequences on two IOASes give the
//! same results, the same errnos and the same translations in the model as in
//! a page-by-page reference that is correct by inspection.

use std::collections::BTreeMap;

use iopt::model::ModelIommufd;
use iopt::{CopyRequest, Errno, IoasId, Iommufd, MapRequest, Prot, PAGE_SIZE};
use proptest::prelude::*;

const PAGES: u64 = 48;
const P: u64 = PAGE_SIZE;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RefPage {
    area: u64,
    user_page: u64,
    prot: Prot,
    writable_pages: bool,
}

/// One IOAS as a map from IOVA page number to what it translates to, plus
/// each area's first and last page.
#[derive(Default)]
struct RefIoas {
    pages: BTreeMap<u64, RefPage>,
    areas: BTreeMap<u64, (u64, u64)>,
}

#[derive(Default)]
struct Reference {
    ioas: [RefIoas; 2],
    next_area: u64,
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Map {
        ioas: usize,
        page: u64,
        npages: u64,
        user_page: u64,
        prot: Prot,
    },
    Unmap {
        ioas: usize,
        page: u64,
        npages: u64,
    },
    UnmapAll {
        ioas: usize,
    },
    Copy {
        src: usize,
        src_page: u64,
        npages: u64,
        dst: usize,
        dst_page: u64,
        prot: Prot,
    },
}

fn prot() -> impl Strategy<Value = Prot> {
    (any::<bool>(), any::<bool>()).prop_map(|(read, write)| Prot { read, write })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..2usize, 0..PAGES, 0..6u64, 0..64u64, prot()).prop_map(
            |(ioas, page, npages, user_page, prot)| Op::Map { ioas, page, npages, user_page, prot }
        ),
        3 => (0..2usize, 0..PAGES, 0..10u64)
            .prop_map(|(ioas, page, npages)| Op::Unmap { ioas, page, npages }),
        1 => (0..2usize).prop_map(|ioas| Op::UnmapAll { ioas }),
        2 => (0..2usize, 0..PAGES, 0..6u64, 0..2usize, 0..PAGES, prot()).prop_map(
            |(src, src_page, npages, dst, dst_page, prot)| Op::Copy {
                src, src_page, npages, dst, dst_page, prot
            }
        ),
    ]
}

type Outcome = Result<u64, Errno>;

impl Reference {
    fn insert(&mut self, ioas: usize, first: u64, pages: &[(u64, bool)], prot: Prot) {
        let id = self.next_area;
        self.next_area += 1;
        for (i, &(user_page, writable_pages)) in pages.iter().enumerate() {
            self.ioas[ioas].pages.insert(
                first + i as u64,
                RefPage {
                    area: id,
                    user_page,
                    prot,
                    writable_pages,
                },
            );
        }
        self.ioas[ioas]
            .areas
            .insert(id, (first, first + pages.len() as u64 - 1));
    }

    fn apply(&mut self, op: Op) -> Outcome {
        match op {
            Op::Map {
                ioas,
                page,
                npages,
                user_page,
                prot,
            } => {
                if !prot.read && !prot.write {
                    return Err(Errno::EINVAL);
                }
                if npages == 0 {
                    return Err(Errno::EINVAL);
                }
                if (page..page + npages).any(|p| self.ioas[ioas].pages.contains_key(&p)) {
                    return Err(Errno::EEXIST);
                }
                let pages: Vec<_> = (0..npages).map(|i| (user_page + i, prot.write)).collect();
                self.insert(ioas, page, &pages, prot);
                Ok(page * P)
            }
            Op::Unmap { ioas, page, npages } => {
                if npages == 0 {
                    return Err(Errno::EINVAL);
                }
                self.unmap(ioas, page, page + npages - 1, false)
            }
            Op::UnmapAll { ioas } => self.unmap(ioas, 0, u64::MAX / P, true),
            Op::Copy {
                src,
                src_page,
                npages,
                dst,
                dst_page,
                prot,
            } => {
                if !prot.read && !prot.write {
                    return Err(Errno::EINVAL);
                }
                if npages == 0 {
                    return Err(Errno::EINVAL);
                }
                // One segment per source area crossed, in IOVA order.
                let mut segments: Vec<Vec<(u64, bool)>> = Vec::new();
                let mut last_area = None;
                for p in src_page..src_page + npages {
                    let Some(rp) = self.ioas[src].pages.get(&p) else {
                        return Err(Errno::ENOENT);
                    };
                    if last_area != Some(rp.area) {
                        segments.push(Vec::new());
                        last_area = Some(rp.area);
                    }
                    segments
                        .last_mut()
                        .unwrap()
                        .push((rp.user_page, rp.writable_pages));
                }
                if (dst_page..dst_page + npages).any(|p| self.ioas[dst].pages.contains_key(&p)) {
                    return Err(Errno::EEXIST);
                }
                if prot.write && segments.iter().flatten().any(|&(_, w)| !w) {
                    return Err(Errno::EPERM);
                }
                let mut at = dst_page;
                for seg in segments {
                    self.insert(dst, at, &seg, prot);
                    at += seg.len() as u64;
                }
                Ok(dst_page * P)
            }
        }
    }

    /// Unmap whole areas inside `[first, last]`, lowest first, stopping at one
    /// that reaches outside.
    fn unmap(&mut self, ioas: usize, first: u64, last: u64, all: bool) -> Outcome {
        let r = &mut self.ioas[ioas];
        let mut hit: Vec<(u64, u64, u64)> = r
            .areas
            .iter()
            .filter(|(_, &(a, b))| a <= last && first <= b)
            .map(|(&id, &(a, b))| (a, b, id))
            .collect();
        hit.sort_unstable();
        let mut bytes = 0;
        for (a, b, id) in hit {
            if a < first || b > last {
                return Err(Errno::ENOENT);
            }
            for p in a..=b {
                r.pages.remove(&p);
            }
            r.areas.remove(&id);
            bytes += (b - a + 1) * P;
        }
        if bytes == 0 && !all {
            return Err(Errno::ENOENT);
        }
        Ok(bytes)
    }
}

fn apply_model(m: &mut ModelIommufd, ids: [IoasId; 2], op: Op) -> Outcome {
    let r = match op {
        Op::Map {
            ioas,
            page,
            npages,
            user_page,
            prot,
        } => m.map(
            ids[ioas],
            MapRequest {
                iova: Some(page * P),
                user_va: user_page * P,
                length: npages * P,
                prot,
            },
        ),
        Op::Unmap { ioas, page, npages } => m.unmap(ids[ioas], page * P, npages * P),
        Op::UnmapAll { ioas } => m.unmap(ids[ioas], 0, u64::MAX),
        Op::Copy {
            src,
            src_page,
            npages,
            dst,
            dst_page,
            prot,
        } => m.copy(CopyRequest {
            src_ioas: ids[src],
            src_iova: src_page * P,
            dst_ioas: ids[dst],
            dst_iova: Some(dst_page * P),
            length: npages * P,
            prot,
        }),
    };
    r.map_err(|e| e.errno())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn model_matches_the_page_by_page_reference(ops in prop::collection::vec(op(), 1..40)) {
        let mut m = ModelIommufd::new();
        let ids = [m.ioas_alloc().unwrap(), m.ioas_alloc().unwrap()];
        let mut reference = Reference::default();
        for (i, op) in ops.iter().enumerate() {
            let want = reference.apply(*op);
            let got = apply_model(&mut m, ids, *op);
            prop_assert_eq!(got, want, "step {}: {:?}", i, op);
            for (k, id) in ids.iter().enumerate() {
                let iopt = m.iopt(*id).unwrap();
                for page in 0..PAGES + 10 {
                    let got = iopt.area_at(page * P).map(|a| (a.user_va_of(page * P) / P, a.prot));
                    let want = reference.ioas[k].pages.get(&page).map(|p| (p.user_page, p.prot));
                    prop_assert_eq!(got, want, "step {}: IOAS {} page {}", i, k, page);
                }
            }
        }
    }
}

/// The conformance suite against the kernel, where this machine has
/// `/dev/iommu` (set `IOPT_VFIO_DEVICE` to a VFIO cdev for the device
/// cases). Says why when it skips.
#[test]
fn kernel_passes_the_conformance_suite_where_dev_iommu_exists() {
    let iommufd = std::path::PathBuf::from("/dev/iommu");
    if !iommufd.exists() {
        eprintln!("kernel conformance: skipped: no /dev/iommu on this machine");
        return;
    }
    let device = std::env::var_os("IOPT_VFIO_DEVICE").map(Into::into);
    let report = iopt::conformance::run_all(&iopt::kernel::KernelFixture { iommufd, device });
    report.assert_all_passed();
}
