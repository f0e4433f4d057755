// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The behaviour every [`Iommufd`] implementation must show, written once.
//!
//! Each case is one behaviour of the merged Linux iommufd, named after it,
//! in the spirit of `tools/testing/selftests/iommu/iommufd.c`. The same
//! cases run against [`crate::model::ModelIommufd`] in `cargo test` and
//! against the kernel driver wherever `/dev/iommu` and a VFIO device exist;
//! when the two disagree, the model is wrong.
//!
//! Errors are compared by errno, the only thing the kernel reports. Cases
//! that need a device ask the fixture for one and are skipped without it;
//! they learn the device's reserved regions from
//! [`Iommufd::device_iova_ranges`] instead of assuming them, so they hold for
//! a mock device and for a real one behind any IOMMU.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use crate::model::{MockDevice, ModelIommufd};
use crate::uapi::{Cmd, Ioctl};
use crate::{
    CopyRequest, DeviceId, Errno, IoasId, IommuOption, Iommufd, IovaRange, MapRequest, OptionOp,
    Prot, Result, Thp, HPAGE_SIZE, PAGE_SIZE,
};

pub use memory::{Access, SuiteMemory};
use memory::{Arena, Buffer};

/// `cases![f, g]`: a module's cases, each named after its function.
macro_rules! cases {
    ($($f:ident),* $(,)?) => {
        pub(super) const CASES: &[super::Case] = &[$((stringify!($f), $f)),*];
    };
}

mod allow_iovas;
mod copy;
mod device;
mod ioas;
mod map;
mod memory;
mod pinning;
mod ucmd;
mod unmap;

/// What the suite runs against: the typed interface and the byte-level
/// entry point of one iommufd.
pub trait Subject: Iommufd + Ioctl {}

impl<T: Iommufd + Ioctl> Subject for T {}

/// An iommufd under test, fresh for every case.
pub struct Session {
    pub fd: Box<dyn Subject>,
    /// A device bound to `fd` that cases may attach, if the fixture has one.
    pub device: Option<DeviceId>,
    /// Whether the kernel under test has transparent huge pages.
    pub thp: Thp,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("device", &self.device)
            .field("thp", &self.thp)
            .finish()
    }
}

/// Where the cases get their iommufd from.
pub trait Fixture {
    /// A name for reports.
    fn name(&self) -> &str;
    /// A fresh iommufd (and device) for one case, whose user memory is
    /// `memory` (the kernel finds it by itself; the model is told).
    fn open(&self, memory: Arc<SuiteMemory>) -> Session;
}

/// The model with one x86-like mock device, of a kernel with or without
/// transparent huge pages.
#[derive(Clone, Copy, Debug, Default)]
pub struct ModelFixture {
    pub thp: Thp,
}

impl Fixture for ModelFixture {
    fn name(&self) -> &str {
        "model"
    }

    fn open(&self, memory: Arc<SuiteMemory>) -> Session {
        let mut fd = ModelIommufd::new().with_thp(self.thp).with_backing(memory);
        let dev = DeviceId(1);
        fd.add_device(dev, MockDevice::x86())
            .expect("a fresh model takes a device");
        Session {
            fd: Box::new(fd),
            device: Some(dev),
            thp: self.thp,
        }
    }
}

/// Why a case did not run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skip(pub &'static str);

type CaseResult = std::result::Result<(), Skip>;

/// One case: a name and the behaviour it checks.
pub type Case = (&'static str, fn(&mut Ctx) -> CaseResult);

/// What a case works with. Fields drop in order: the session (and its
/// pins) before the memory.
pub struct Ctx {
    pub s: Session,
    buf: Buffer,
    /// Memory the byte-level commands' arrays point into.
    user: Vec<u8>,
    mem: Arc<SuiteMemory>,
    arenas: Vec<Arena>,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx").field("s", &self.s).finish()
    }
}

impl Ctx {
    fn fd(&mut self) -> &mut dyn Iommufd {
        &mut *self.s.fd
    }

    /// Run `cmd` on the structure in `arg` at the byte level, its array (if
    /// any) in [`Ctx::user_addr`].
    fn ucmd(&mut self, cmd: Cmd, arg: &mut [u8]) -> Result<()> {
        self.s.fd.ioctl(cmd, arg, &mut self.user)
    }

    /// The address of the memory byte-level arrays may point into.
    fn user_addr(&self) -> u64 {
        self.user.as_ptr() as u64
    }

    /// The user memory byte-level arrays point into.
    fn user_mut(&mut self) -> &mut [u8] {
        &mut self.user
    }

    /// Map `pages` fresh pages for this case, the last `tail` of them left
    /// with `access`; returns their address.
    fn arena(&mut self, pages: u64, tail: u64, access: Access) -> u64 {
        let arena = Arena::new(&self.mem, pages, tail, access);
        let addr = arena.at(0);
        self.arenas.push(arena);
        addr
    }

    fn ioas(&mut self) -> IoasId {
        self.fd().ioas_alloc().expect("IOAS_ALLOC")
    }

    fn device(&self) -> std::result::Result<DeviceId, Skip> {
        self.s.device.ok_or(Skip("the fixture has no device"))
    }

    /// MAP `length` bytes of the buffer at `offset`, at `iova` or anywhere.
    fn map(&mut self, ioas: IoasId, iova: Option<u64>, offset: u64, length: u64) -> Result<u64> {
        self.map_prot(ioas, iova, offset, length, Prot::RW)
    }

    fn map_prot(
        &mut self,
        ioas: IoasId,
        iova: Option<u64>,
        offset: u64,
        length: u64,
        prot: Prot,
    ) -> Result<u64> {
        let user_va = self.buf.at(offset);
        self.fd().map(
            ioas,
            MapRequest {
                iova,
                user_va,
                length,
                prot,
            },
        )
    }

    fn ranges(&mut self, ioas: IoasId) -> (Vec<IovaRange>, u64) {
        let mut out = [IovaRange::default(); 64];
        let r = self.fd().iova_ranges(ioas, &mut out).expect("IOVA_RANGES");
        (out[..r.num_iovas as usize].to_vec(), r.out_iova_alignment)
    }

    /// Allow only `[BASE, BASE + P)` in `ioas` (`IOMMU_IOAS_ALLOW_IOVAS`).
    fn allow_only_the_first_page(&mut self, ioas: IoasId) {
        let first = IovaRange {
            start: BASE,
            last: BASE + P - 1,
        };
        self.fd().allow_iovas(ioas, &[first]).expect("ALLOW_IOVAS");
    }

    /// `ioas` reports one usable range, all of the IOVA space, with no
    /// alignment (an IOAS with no device and no allowed list).
    fn expect_the_whole_space_usable(&mut self, ioas: IoasId) {
        let (ranges, align) = self.ranges(ioas);
        let all = IovaRange {
            start: 0,
            last: u64::MAX,
        };
        assert_eq!((ranges, align), (vec![all], 1));
    }

    /// A reserved IOVA below 2^40 of the fixture's device: the first IOVA
    /// after its first usable range.
    fn reserved_iova(&mut self, dev: DeviceId) -> std::result::Result<u64, Skip> {
        let usable = self.fd().device_iova_ranges(dev).expect("device ranges");
        usable
            .first()
            .filter(|r| r.last < (1 << 40))
            .map(|r| r.last + 1)
            .ok_or(Skip("the device has no reserved region below 2^40"))
    }
}

#[track_caller]
fn expect_errno<T: std::fmt::Debug>(r: Result<T>, errno: Errno) {
    match r {
        Err(e) => assert_eq!(e.errno(), errno, "expected {errno}, got {e:?}"),
        Ok(v) => panic!("expected {errno}, got Ok({v:?})"),
    }
}

fn copy_req(
    src: IoasId,
    src_iova: u64,
    dst: IoasId,
    dst_iova: Option<u64>,
    length: u64,
) -> CopyRequest {
    CopyRequest {
        src_ioas: src,
        src_iova,
        dst_ioas: dst,
        dst_iova,
        length,
        prot: Prot::RW,
    }
}

const P: u64 = PAGE_SIZE;
/// An IOVA well inside any aperture and away from x86 reserved windows.
const BASE: u64 = 0x1000_0000;

/// Every case, grouped by concern.
pub fn cases() -> Vec<Case> {
    [
        ioas::CASES,
        map::CASES,
        allow_iovas::CASES,
        unmap::CASES,
        copy::CASES,
        device::CASES,
        pinning::CASES,
        ucmd::CASES,
    ]
    .concat()
}

/// How one case went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    Skipped(&'static str),
    Failed(String),
}

/// The outcome of every case against one fixture.
#[derive(Clone, Debug)]
pub struct Report {
    pub fixture: String,
    pub outcomes: Vec<(&'static str, Outcome)>,
}

impl Report {
    /// Cases that failed.
    pub fn failures(&self) -> Vec<&(&'static str, Outcome)> {
        self.outcomes
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Failed(_)))
            .collect()
    }

    /// Counts of passed, skipped and failed cases.
    pub fn counts(&self) -> (usize, usize, usize) {
        let mut c = (0, 0, 0);
        for (_, o) in &self.outcomes {
            match o {
                Outcome::Passed => c.0 += 1,
                Outcome::Skipped(_) => c.1 += 1,
                Outcome::Failed(_) => c.2 += 1,
            }
        }
        c
    }

    /// Panic with every failure if any case failed.
    #[track_caller]
    pub fn assert_all_passed(&self) {
        let failures = self.failures();
        assert!(
            failures.is_empty(),
            "{} conformance case(s) failed against {}:\n{}",
            failures.len(),
            self.fixture,
            failures
                .iter()
                .map(|(n, o)| format!("  {n}: {o:?}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// Run every case against `fixture`, each with a fresh session.
pub fn run_all(fixture: &dyn Fixture) -> Report {
    let outcomes = cases()
        .iter()
        .map(|(name, case)| {
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                let mem = Arc::new(SuiteMemory::default());
                let mut ctx = Ctx {
                    s: fixture.open(mem.clone()),
                    buf: Buffer::new(),
                    user: vec![0; 64 * crate::uapi::iommu_iova_range::SIZE],
                    mem,
                    arenas: Vec::new(),
                };
                case(&mut ctx)
            }));
            let outcome = match outcome {
                Ok(Ok(())) => Outcome::Passed,
                Ok(Err(Skip(why))) => Outcome::Skipped(why),
                Err(panic) => Outcome::Failed(
                    panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default(),
                ),
            };
            (*name, outcome)
        })
        .collect();
    Report {
        fixture: fixture.name().to_string(),
        outcomes,
    }
}
