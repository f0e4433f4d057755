// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `--scaling`: how the cost of a request grows with the mappings a domain
//! already holds.
//!
//! One domain is filled with N 4 KiB mappings, every other page from
//! [`IOVA_BASE`] (so each has a free page after it), for N in [`POINTS`];
//! the fill is incremental, each point adds to the previous one. At each N
//! two subjects are measured:
//! - the daemon's device model ([`DirectLeg`]: `handle_request` with the
//!   encoded request bytes, as the direct leg), and
//! - the shared translation table alone ([`TranslationTable`] over
//!   [`table::memory_store`]: what the daemon writes for QEMU on top).
//!
//! For each: MAP then UNMAP of a new 4 KiB mapping in a free page picked at
//! random (QD1, each request timed), and translation of existing IOVAs
//! picked at random (`Device::translate`, `table::translate`; timed in
//! groups, so ns per call include the random pick, about a nanosecond).
//! Every translation is checked against the mapping it should find.

use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use serde::Serialize;
use test_frontend::{Request, Status, MAP_F_READ, MAP_F_WRITE};
use vhost_user_iommu::config::Config;
use vhost_user_iommu::mirror::table::{self, TranslationTable};
use virtio_iommu::Translation;

use crate::direct_leg::DirectLeg;
use crate::histogram::{Histogram, Latency};
use crate::leg::LegError;
use crate::procstat;
use crate::run::Timing;
use crate::workload::IOVA_BASE;

/// Existing mappings at each point of the curve.
pub const POINTS: [u64; 5] = [100, 1_000, 10_000, 100_000, 1_000_000];
/// The largest point of a `--smoke` run.
pub const SMOKE_MAX: u64 = 10_000;

/// One page, the size of every mapping here.
const PAGE: u64 = 4096;
/// Existing mapping `i` is at `IOVA_BASE + i * STRIDE`; the page after it
/// stays free.
const STRIDE: u64 = 2 * PAGE;
/// The mappings point into a ring of this many guest pages.
const PHYS_PAGES: u64 = 256;
/// Where that ring starts in guest RAM.
const PHYS_BASE: u64 = 2 << 20;
/// Guest RAM of the device subject.
const RAM: u64 = 16 << 20;
/// The domain and endpoint used.
const DOMAIN: u32 = 1;
/// Translations between two looks at the clock.
const TRANSLATE_GROUP: u64 = 1024;

/// Why the curve could not be measured.
#[derive(Debug, thiserror::Error)]
pub enum ScalingError {
    /// The device model could not be built.
    #[error("device model: {0}")]
    Device(#[from] LegError),
    /// A request the curve needs was refused.
    #[error("{status:?} for {request:?} with {existing} mappings")]
    Refused {
        /// The request.
        request: Request,
        /// Its status.
        status: Status,
        /// Mappings in the domain then.
        existing: u64,
    },
    /// A translation did not find the mapping it should have.
    #[error("{subject}: IOVA {iova:#x} translates to {got:?}, expected GPA {want:#x}")]
    Translation {
        /// `device` or `table`.
        subject: &'static str,
        /// The IOVA.
        iova: u64,
        /// The GPA of its mapping.
        want: u64,
        /// What the translation gave.
        got: Option<u64>,
    },
    /// The table's store is full.
    #[error("the translation table ran out of its {0} pages")]
    TableFull(u32),
    /// The endpoint list of the configuration is empty.
    #[error("the configuration serves no endpoint")]
    NoEndpoint,
}

/// The results of one subject at one point.
#[derive(Clone, Debug, Serialize)]
pub struct SubjectPoint {
    /// MAP and UNMAP requests timed.
    pub requests: u64,
    /// Time per MAP or UNMAP request, nanoseconds.
    pub map_unmap_ns: Latency,
    /// This process's allocations per MAP or UNMAP request, if counted.
    pub allocations_per_req: Option<f64>,
    /// Translations made.
    pub translations: u64,
    /// Time per translation, nanoseconds.
    pub translate_ns: f64,
}

/// One point of the curve.
#[derive(Clone, Debug, Serialize)]
pub struct ScalingPoint {
    /// Mappings in the domain.
    pub existing: u64,
    /// The device model.
    pub device: SubjectPoint,
    /// The shared translation table alone.
    pub table: SubjectPoint,
    /// Table pages in use.
    pub table_pages: u32,
    /// This process's resident memory with both subjects filled, if known.
    pub rss_bytes: Option<u64>,
}

/// The points to measure: all of [`POINTS`], or those up to [`SMOKE_MAX`].
pub fn points(smoke: bool) -> Vec<u64> {
    POINTS
        .iter()
        .copied()
        .filter(|&n| !smoke || n <= SMOKE_MAX)
        .collect()
}

fn iova_of(i: u64) -> u64 {
    IOVA_BASE + i * STRIDE
}

fn phys_of(i: u64) -> u64 {
    PHYS_BASE + (i % PHYS_PAGES) * PAGE
}

/// xorshift64: cheap pseudo-random picks, the same every run.
#[derive(Debug)]
struct Picker(u64);

impl Picker {
    fn below(&mut self, n: u64) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x % n
    }
}

/// What is measured: something holding one domain's 4 KiB mappings.
trait Subject {
    const NAME: &'static str;
    /// MAP `[iova, iova + 4 KiB)` → `phys`, read-write.
    fn map(&mut self, iova: u64, phys: u64, existing: u64) -> Result<(), ScalingError>;
    /// UNMAP `[iova, iova + 4 KiB)`.
    fn unmap(&mut self, iova: u64, existing: u64) -> Result<(), ScalingError>;
    /// Where a read of `iova` goes.
    fn translate(&self, iova: u64) -> Option<u64>;
}

/// The device model, as the direct leg runs it.
#[derive(Debug)]
struct DeviceSubject {
    leg: DirectLeg,
    endpoint: u32,
}

impl DeviceSubject {
    fn request(&mut self, request: Request, existing: u64) -> Result<(), ScalingError> {
        match self.leg.request(&request) {
            Status::Ok => Ok(()),
            status => Err(ScalingError::Refused {
                request,
                status,
                existing,
            }),
        }
    }
}

impl Subject for DeviceSubject {
    const NAME: &'static str = "device";

    fn map(&mut self, iova: u64, phys: u64, existing: u64) -> Result<(), ScalingError> {
        let map = Request::Map {
            domain: DOMAIN,
            virt_start: iova,
            virt_end: iova + PAGE - 1,
            phys_start: phys,
            flags: MAP_F_READ | MAP_F_WRITE,
        };
        self.request(map, existing)
    }

    fn unmap(&mut self, iova: u64, existing: u64) -> Result<(), ScalingError> {
        let unmap = Request::Unmap {
            domain: DOMAIN,
            virt_start: iova,
            virt_end: iova + PAGE - 1,
        };
        self.request(unmap, existing)
    }

    fn translate(&self, iova: u64) -> Option<u64> {
        match self.leg.device().translate(self.endpoint, iova, false) {
            Translation::Mapped { gpa, .. } => Some(gpa),
            _ => None,
        }
    }
}

/// The shared translation table in plain memory.
#[derive(Debug)]
struct TableSubject {
    table: TranslationTable<Box<[AtomicU64]>>,
    root: u32,
}

impl TableSubject {
    fn check_room(&self) -> Result<(), ScalingError> {
        if self.table.stats().alloc_failures > 0 {
            return Err(ScalingError::TableFull(self.table.pages()));
        }
        Ok(())
    }
}

impl Subject for TableSubject {
    const NAME: &'static str = "table";

    fn map(&mut self, iova: u64, phys: u64, _existing: u64) -> Result<(), ScalingError> {
        self.table.map(&virtio_iommu::Map {
            domain: DOMAIN,
            virt_start: iova,
            virt_end: iova + PAGE - 1,
            phys_start: phys,
            flags: virtio_iommu::wire::map_flags::READ | virtio_iommu::wire::map_flags::WRITE,
        });
        Ok(())
    }

    fn unmap(&mut self, iova: u64, _existing: u64) -> Result<(), ScalingError> {
        self.table.unmap(&virtio_iommu::Unmap {
            domain: DOMAIN,
            virt_start: iova,
            virt_end: iova + PAGE - 1,
        });
        Ok(())
    }

    fn translate(&self, iova: u64) -> Option<u64> {
        table::translate(self.table.words(), self.table.levels(), self.root, iova).map(|l| l.phys)
    }
}

/// Table pages for `n` mappings laid out as here: the leaves (512 pages of
/// IOVA each, half of them mapped), the tables above, and room to spare.
fn table_pages_for(n: u64) -> u32 {
    let leaves = (2 * n).div_ceil(512) + 1;
    u32::try_from(leaves + leaves / 8 + 64).unwrap_or(u32::MAX)
}

/// Map existing mappings `from..to`.
fn fill(s: &mut impl Subject, from: u64, to: u64) -> Result<(), ScalingError> {
    for i in from..to {
        s.map(iova_of(i), phys_of(i), i)?;
    }
    Ok(())
}

/// MAP then UNMAP a page in a random free slot among `n` mappings, each
/// request timed into `hist`, for `duration`. Returns the requests made.
fn map_unmap(
    s: &mut impl Subject,
    n: u64,
    duration: Duration,
    pick: &mut Picker,
    hist: &mut Histogram,
) -> Result<u64, ScalingError> {
    let start = Instant::now();
    let mut requests = 0;
    while start.elapsed() < duration {
        let hole = iova_of(pick.below(n)) + PAGE;
        let t0 = Instant::now();
        s.map(hole, PHYS_BASE, n)?;
        let t1 = Instant::now();
        s.unmap(hole, n)?;
        let t2 = Instant::now();
        hist.record_duration(t1 - t0);
        hist.record_duration(t2 - t1);
        requests += 2;
    }
    Ok(requests)
}

/// Translate random existing IOVAs among `n` for `duration`, checking
/// each. Returns (translations, elapsed).
fn translate<S: Subject>(
    s: &S,
    n: u64,
    duration: Duration,
    pick: &mut Picker,
) -> Result<(u64, Duration), ScalingError> {
    let start = Instant::now();
    let mut calls = 0;
    loop {
        for _ in 0..TRANSLATE_GROUP {
            let i = pick.below(n);
            let iova = iova_of(i) + 0x123;
            let got = std::hint::black_box(s.translate(iova));
            if got != Some(phys_of(i) + 0x123) {
                return Err(ScalingError::Translation {
                    subject: S::NAME,
                    iova,
                    want: phys_of(i) + 0x123,
                    got,
                });
            }
        }
        calls += TRANSLATE_GROUP;
        let elapsed = start.elapsed();
        if elapsed >= duration {
            return Ok((calls, elapsed));
        }
    }
}

/// Warm up, then measure MAP/UNMAP and translation of `s` holding `n`
/// mappings; `each` is the time of each measured part.
fn measure<S: Subject>(
    s: &mut S,
    n: u64,
    warmup: Duration,
    each: Duration,
    allocations: Option<fn() -> u64>,
) -> Result<SubjectPoint, ScalingError> {
    let mut pick = Picker(0x9e37_79b9_7f4a_7c15 ^ n);
    let mut hist = Histogram::new();
    map_unmap(s, n, warmup, &mut pick, &mut hist)?;
    hist.reset();
    let before = allocations.map(|count| count());
    let requests = map_unmap(s, n, each, &mut pick, &mut hist)?;
    let allocs = allocations
        .zip(before)
        .map(|(count, b)| count().saturating_sub(b));
    translate(s, n, warmup, &mut pick)?;
    let (translations, elapsed) = translate(s, n, each, &mut pick)?;
    Ok(SubjectPoint {
        requests,
        map_unmap_ns: Latency::of(&hist),
        allocations_per_req: allocs.map(|a| a as f64 / requests.max(1) as f64),
        translations,
        translate_ns: elapsed.as_nanos() as f64 / translations.max(1) as f64,
    })
}

/// Measure every point of `points` (increasing) on the device `config`
/// describes (its first endpoint attached to domain 1) and on a table as
/// deep as the daemon makes it. `timing` is per point: its warm-up and
/// measured time are shared by the four measured parts. `done` sees each
/// point as it is finished.
pub fn run(
    config: &Config,
    points: &[u64],
    timing: Timing,
    allocations: Option<fn() -> u64>,
    done: &mut dyn FnMut(&ScalingPoint),
) -> Result<Vec<ScalingPoint>, ScalingError> {
    let endpoint = *config.endpoints.first().ok_or(ScalingError::NoEndpoint)?;
    let mut device = DeviceSubject {
        leg: DirectLeg::new(config, RAM)?,
        endpoint,
    };
    device.request(
        Request::Attach {
            domain: DOMAIN,
            endpoint,
            flags: 0,
        },
        0,
    )?;
    let max = points.iter().copied().max().unwrap_or(0);
    let store = table::memory_store(table_pages_for(max));
    let mut table = TranslationTable::new(store, table::levels_for(config.device.input_range.1));
    let root = table.attach(endpoint, DOMAIN, false);
    let mut table = TableSubject { table, root };

    let (warmup, each) = (timing.warmup / 4, timing.measure / 4);
    let mut out = Vec::with_capacity(points.len());
    let mut filled = 0;
    for &n in points {
        fill(&mut device, filled, n)?;
        fill(&mut table, filled, n)?;
        table.check_room()?;
        filled = filled.max(n);
        let point = ScalingPoint {
            existing: n,
            device: measure(&mut device, n, warmup, each, allocations)?,
            table: measure(&mut table, n, warmup, each, allocations)?,
            table_pages: table.table.stats().pages_in_use,
            rss_bytes: procstat::rss_bytes(std::process::id()).ok(),
        };
        done(&point);
        out.push(point);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vhost_user_iommu::config::RawConfig;

    #[test]
    fn smoke_points_stop_at_ten_thousand() {
        assert_eq!(points(true), [100, 1_000, 10_000]);
        assert_eq!(points(false).last(), Some(&1_000_000));
    }

    #[test]
    fn a_table_for_a_million_mappings_is_small() {
        // 2e6 pages of IOVA: 3907 leaves, plus the levels above.
        let pages = table_pages_for(1_000_000);
        assert!(pages >= 3907 + 8 + 2, "{pages}");
        assert!(u64::from(pages) * PAGE < 32 << 20, "{pages}");
    }

    #[test]
    fn a_short_curve_measures_both_subjects() {
        let config = RawConfig {
            endpoints: Some("8".into()),
            ..RawConfig::default()
        }
        .check()
        .unwrap();
        let timing = Timing {
            warmup: Duration::from_millis(4),
            measure: Duration::from_millis(20),
        };
        let mut seen = Vec::new();
        let curve = run(&config, &[10, 300], timing, None, &mut |p| {
            seen.push(p.existing)
        })
        .unwrap();
        assert_eq!(seen, [10, 300]);
        for p in &curve {
            for s in [&p.device, &p.table] {
                assert!(s.requests >= 2 && s.requests % 2 == 0);
                assert!(s.map_unmap_ns.p50 > 0);
                assert!(s.translations >= TRANSLATE_GROUP);
                assert!(s.translate_ns > 0.0);
            }
            assert!(p.table_pages >= 4, "root, two tables above, a leaf");
        }
    }
}
