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

use crate::model::{MockDevice, ModelIommufd};
use crate::{
    CopyRequest, DeviceId, Errno, IoasId, IommuOption, Iommufd, IovaRange, MapRequest, OptionOp,
    Prot, Result, HPAGE_SIZE, PAGE_SIZE,
};

/// An iommufd under test, fresh for every case.
pub struct Session {
    pub fd: Box<dyn Iommufd>,
    /// A device bound to `fd` that cases may attach, if the fixture has one.
    pub device: Option<DeviceId>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("device", &self.device)
            .finish()
    }
}

/// Where the cases get their iommufd from.
pub trait Fixture {
    /// A name for reports.
    fn name(&self) -> &str;
    /// A fresh iommufd (and device) for one case.
    fn open(&self) -> Session;
}

/// The model with one x86-like mock device.
#[derive(Clone, Copy, Debug, Default)]
pub struct ModelFixture;

impl Fixture for ModelFixture {
    fn name(&self) -> &str {
        "model"
    }

    fn open(&self) -> Session {
        let mut fd = ModelIommufd::new();
        let dev = DeviceId(1);
        fd.add_device(dev, MockDevice::x86())
            .expect("a fresh model takes a device");
        Session {
            fd: Box::new(fd),
            device: Some(dev),
        }
    }
}

/// Real memory to map: page-aligned addresses at a 2 MiB-aligned base, so
/// cases control the alignment the IOVA allocator sees. The kernel pins it
/// when a device is attached; the model only records its addresses.
struct Buffer {
    _mem: Vec<u8>,
    base: u64,
}

impl Buffer {
    const LEN: u64 = 8 << 20;

    fn new() -> Self {
        let mem = vec![0u8; (Self::LEN + HPAGE_SIZE) as usize];
        let addr = mem.as_ptr() as u64;
        let base = (addr + HPAGE_SIZE - 1) & !(HPAGE_SIZE - 1);
        Self { _mem: mem, base }
    }

    /// The user address `offset` bytes into the buffer.
    fn at(&self, offset: u64) -> u64 {
        assert!(offset < Self::LEN);
        self.base + offset
    }
}

/// Why a case did not run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skip(pub &'static str);

type CaseResult = std::result::Result<(), Skip>;

/// One case: a name and the behaviour it checks.
pub type Case = (&'static str, fn(&mut Ctx) -> CaseResult);

/// What a case works with.
pub struct Ctx {
    pub s: Session,
    buf: Buffer,
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

// ---- IOAS objects -------------------------------------------------------

fn ioas_alloc_gives_distinct_ids(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    let b = c.ioas();
    assert_ne!(a, b);
    Ok(())
}

fn destroy_of_an_unknown_ioas_is_enoent(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    c.fd().ioas_destroy(a).unwrap();
    expect_errno(c.fd().ioas_destroy(a), Errno::ENOENT);
    Ok(())
}

fn a_destroyed_ioas_cannot_be_mapped(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    c.map(a, Some(BASE), 0, P).unwrap();
    c.fd().ioas_destroy(a).unwrap();
    expect_errno(c.map(a, Some(BASE), 0, P), Errno::ENOENT);
    Ok(())
}

// ---- IOVA_RANGES ----------------------------------------------------------

fn an_empty_ioas_has_the_whole_space_usable(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    let (ranges, align) = c.ranges(a);
    assert_eq!(
        ranges,
        vec![IovaRange {
            start: 0,
            last: u64::MAX
        }]
    );
    assert_eq!(align, 1);
    Ok(())
}

fn iova_ranges_into_a_short_buffer_is_emsgsize_with_the_count(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    let mut none: [IovaRange; 0] = [];
    match c.fd().iova_ranges(a, &mut none) {
        Err(crate::IoptError::MessageSize { needed }) => assert_eq!(needed, 1),
        r => panic!("expected EMSGSIZE, got {r:?}"),
    }
    Ok(())
}

fn iova_ranges_of_an_unknown_ioas_is_enoent(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    c.fd().ioas_destroy(a).unwrap();
    let mut out = [IovaRange::default(); 4];
    expect_errno(c.fd().iova_ranges(a, &mut out), Errno::ENOENT);
    Ok(())
}

// ---- MAP --------------------------------------------------------------------

fn map_without_read_or_write_is_einval(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    expect_errno(
        c.map_prot(a, Some(BASE), 0, P, Prot::default()),
        Errno::EINVAL,
    );
    Ok(())
}

fn map_of_zero_length_is_einval(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    expect_errno(c.map(a, Some(BASE), 0, 0), Errno::EINVAL);
    Ok(())
}

fn map_of_ulong_max_length_or_iova_is_eoverflow(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    expect_errno(c.map(a, Some(BASE), 0, u64::MAX), Errno::EOVERFLOW);
    expect_errno(c.map(a, Some(u64::MAX), 0, P), Errno::EOVERFLOW);
    Ok(())
}

fn map_at_a_fixed_iova_that_wraps_is_eoverflow(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    expect_errno(c.map(a, Some(u64::MAX - P + 1), 0, 2 * P), Errno::EOVERFLOW);
    Ok(())
}

fn map_of_user_memory_that_wraps_is_eoverflow(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    let r = c.fd().map(
        a,
        MapRequest {
            iova: Some(BASE),
            user_va: u64::MAX - P + 1,
            length: 2 * P,
            prot: Prot::RW,
        },
    );
    expect_errno(r, Errno::EOVERFLOW);
    Ok(())
}

fn map_at_a_fixed_iova_maps_there(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    assert_eq!(c.map(a, Some(BASE), 0, 4 * P).unwrap(), BASE);
    // The whole range is now taken: unmapping it gives its length back.
    assert_eq!(c.fd().unmap(a, BASE, 4 * P).unwrap(), 4 * P);
    Ok(())
}

fn map_over_an_existing_area_is_eexist(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    c.map(a, Some(BASE + 4 * P), 0, 4 * P).unwrap();
    for (iova, len) in [
        (BASE + 4 * P, 4 * P),
        (BASE + 3 * P, 2 * P),
        (BASE + 7 * P, 2 * P),
        (BASE, 16 * P),
        (BASE + 5 * P, P),
    ] {
        expect_errno(c.map(a, Some(iova), 0, len), Errno::EEXIST);
    }
    Ok(())
}

fn maps_may_touch_end_to_end(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    c.map(a, Some(BASE + P), 0, P).unwrap();
    c.map(a, Some(BASE), 0, P).unwrap();
    c.map(a, Some(BASE + 2 * P), 0, P).unwrap();
    assert_eq!(c.fd().unmap(a, BASE, 3 * P).unwrap(), 3 * P);
    Ok(())
}

fn the_same_memory_may_be_mapped_twice(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    c.map(a, Some(BASE), 0, P).unwrap();
    c.map(a, Some(BASE + 16 * P), 0, P).unwrap();
    Ok(())
}

// ---- the IOVA allocator -----------------------------------------------------

fn allocated_iovas_keep_the_page_offset(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    let iova = c.map(a, None, P + 0x123, 0x100).unwrap();
    assert_eq!(iova % P, 0x123);
    Ok(())
}

fn allocated_iovas_are_never_zero(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    let iova = c.map(a, None, 0, P).unwrap();
    assert!(iova >= P, "allocated IOVA {iova:#x}");
    Ok(())
}

fn allocated_iovas_follow_the_user_address_alignment(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    // 64 KiB of memory at a 64 KiB-aligned address: a 64 KiB-aligned IOVA.
    let iova = c.map(a, None, 0x1_0000, 0x1_0000).unwrap();
    assert_eq!(iova % 0x1_0000, 0);
    // 2 MiB at a 2 MiB-aligned address.
    let iova = c.map(a, None, 0, HPAGE_SIZE).unwrap();
    assert_eq!(iova % HPAGE_SIZE, 0);
    // One page at an address aligned only to a page: any page will do, but
    // it must not overlap what is mapped.
    let iova2 = c.map(a, None, P, P).unwrap();
    assert!(iova2 + P <= iova || iova2 >= iova + HPAGE_SIZE);
    Ok(())
}

fn allocated_iovas_avoid_existing_areas(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    let mut seen = Vec::new();
    for i in 0..8 {
        let iova = c.map(a, None, i * P, P).unwrap();
        assert!(!seen.contains(&iova));
        seen.push(iova);
    }
    Ok(())
}

fn allocated_iovas_stay_inside_the_allowed_ranges(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    let allowed = IovaRange {
        start: BASE,
        last: BASE + 16 * P - 1,
    };
    c.fd().allow_iovas(a, &[allowed]).unwrap();
    for i in 0..4 {
        let iova = c.map(a, None, i * P, P).unwrap();
        assert!(allowed.contains(iova) && allowed.contains(iova + P - 1));
    }
    Ok(())
}

fn allocation_outside_a_too_small_allowed_range_is_enospc(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    c.fd()
        .allow_iovas(
            a,
            &[IovaRange {
                start: BASE,
                last: BASE + P - 1,
            }],
        )
        .unwrap();
    expect_errno(c.map(a, None, 0, 2 * P), Errno::ENOSPC);
    c.map(a, None, 0, P).unwrap();
    expect_errno(c.map(a, None, 0, P), Errno::ENOSPC);
    Ok(())
}

fn fixed_maps_may_ignore_the_allowed_ranges(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    c.fd()
        .allow_iovas(
            a,
            &[IovaRange {
                start: BASE,
                last: BASE + P - 1,
            }],
        )
        .unwrap();
    c.map(a, Some(2 * BASE), 0, P).unwrap();
    Ok(())
}

// ---- ALLOW_IOVAS ------------------------------------------------------------

fn allowed_ranges_that_overlap_are_einval(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    let r = c.fd().allow_iovas(
        a,
        &[
            IovaRange {
                start: BASE,
                last: BASE + 2 * P - 1,
            },
            IovaRange {
                start: BASE + P,
                last: BASE + 3 * P - 1,
            },
        ],
    );
    expect_errno(r, Errno::EINVAL);
    Ok(())
}

fn an_empty_allowed_list_allows_everything_again(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    c.fd()
        .allow_iovas(
            a,
            &[IovaRange {
                start: BASE,
                last: BASE + P - 1,
            }],
        )
        .unwrap();
    c.fd().allow_iovas(a, &[]).unwrap();
    c.map(a, None, 0, 4 * P).unwrap();
    c.map(a, None, 0, 4 * P).unwrap();
    Ok(())
}

// ---- UNMAP ------------------------------------------------------------------

fn unmap_of_nothing_is_enoent(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    expect_errno(c.fd().unmap(a, BASE, P), Errno::ENOENT);
    c.map(a, Some(BASE), 0, P).unwrap();
    expect_errno(c.fd().unmap(a, BASE + P, P), Errno::ENOENT);
    Ok(())
}

fn unmap_of_zero_length_is_einval(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    c.map(a, Some(BASE), 0, P).unwrap();
    expect_errno(c.fd().unmap(a, BASE, 0), Errno::EINVAL);
    Ok(())
}

fn unmap_of_part_of_an_area_is_enoent_and_keeps_it(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    c.map(a, Some(BASE), 0, 4 * P).unwrap();
    expect_errno(c.fd().unmap(a, BASE + P, P), Errno::ENOENT);
    expect_errno(c.fd().unmap(a, BASE, P), Errno::ENOENT);
    expect_errno(c.fd().unmap(a, BASE + 3 * P, 2 * P), Errno::ENOENT);
    assert_eq!(c.fd().unmap(a, BASE, 4 * P).unwrap(), 4 * P);
    Ok(())
}

fn unmap_of_a_range_covering_several_areas_unmaps_them_all(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    c.map(a, Some(BASE + P), 0, P).unwrap();
    c.map(a, Some(BASE + 4 * P), 0, 2 * P).unwrap();
    assert_eq!(c.fd().unmap(a, BASE, 16 * P).unwrap(), 3 * P);
    expect_errno(c.fd().unmap(a, BASE, 16 * P), Errno::ENOENT);
    Ok(())
}

fn unmap_stopped_by_a_straddling_area_keeps_what_it_unmapped(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    c.map(a, Some(BASE), 0, P).unwrap();
    c.map(a, Some(BASE + P), 0, 4 * P).unwrap();
    expect_errno(c.fd().unmap(a, BASE, 2 * P), Errno::ENOENT);
    // The first area went before the second stopped the walk.
    expect_errno(c.fd().unmap(a, BASE, P), Errno::ENOENT);
    assert_eq!(c.fd().unmap(a, BASE + P, 4 * P).unwrap(), 4 * P);
    Ok(())
}

fn unmap_all_of_an_empty_ioas_succeeds(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    assert_eq!(c.fd().unmap(a, 0, u64::MAX).unwrap(), 0);
    Ok(())
}

fn unmap_all_unmaps_everything(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    c.map(a, Some(BASE), 0, P).unwrap();
    c.map(a, None, 0, 2 * P).unwrap();
    assert_eq!(c.fd().unmap(a, 0, u64::MAX).unwrap(), 3 * P);
    expect_errno(c.fd().unmap(a, BASE, P), Errno::ENOENT);
    Ok(())
}

fn unmap_of_ulong_max_length_not_from_zero_is_eoverflow(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    c.map(a, Some(BASE), 0, P).unwrap();
    expect_errno(c.fd().unmap(a, BASE, u64::MAX), Errno::EOVERFLOW);
    expect_errno(c.fd().unmap(a, u64::MAX, 1), Errno::EOVERFLOW);
    Ok(())
}

fn unmap_of_a_wrapping_range_is_eoverflow(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    expect_errno(c.fd().unmap(a, u64::MAX - P + 1, 2 * P), Errno::EOVERFLOW);
    Ok(())
}

// ---- COPY -------------------------------------------------------------------

fn copy_of_a_whole_area_maps_the_same_memory(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    let b = c.ioas();
    c.map(a, Some(BASE), 0, 4 * P).unwrap();
    assert_eq!(
        c.fd()
            .copy(copy_req(a, BASE, b, Some(BASE), 4 * P))
            .unwrap(),
        BASE
    );
    // The copy is independent of its source.
    c.fd().unmap(a, BASE, 4 * P).unwrap();
    assert_eq!(c.fd().unmap(b, BASE, 4 * P).unwrap(), 4 * P);
    Ok(())
}

fn copy_of_part_of_an_area(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    let b = c.ioas();
    c.map(a, Some(BASE), 0, 8 * P).unwrap();
    c.fd()
        .copy(copy_req(a, BASE + 2 * P, b, Some(BASE), 2 * P))
        .unwrap();
    assert_eq!(c.fd().unmap(b, BASE, 2 * P).unwrap(), 2 * P);
    Ok(())
}

fn copy_across_contiguous_areas(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    let b = c.ioas();
    c.map(a, Some(BASE), 0, 2 * P).unwrap();
    c.map(a, Some(BASE + 2 * P), 4 * P, 2 * P).unwrap();
    c.fd()
        .copy(copy_req(a, BASE + P, b, Some(BASE), 2 * P))
        .unwrap();
    assert_eq!(c.fd().unmap(b, 0, u64::MAX).unwrap(), 2 * P);
    Ok(())
}

fn copy_within_one_ioas(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    c.map(a, Some(BASE), 0, 2 * P).unwrap();
    let iova = c.fd().copy(copy_req(a, BASE, a, None, 2 * P)).unwrap();
    assert_ne!(iova, BASE);
    assert_eq!(c.fd().unmap(a, 0, u64::MAX).unwrap(), 4 * P);
    Ok(())
}

fn copy_over_a_gap_is_enoent(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    let b = c.ioas();
    c.map(a, Some(BASE), 0, P).unwrap();
    c.map(a, Some(BASE + 2 * P), 0, P).unwrap();
    expect_errno(
        c.fd().copy(copy_req(a, BASE, b, Some(BASE), 3 * P)),
        Errno::ENOENT,
    );
    expect_errno(
        c.fd().copy(copy_req(a, BASE + P, b, Some(BASE), P)),
        Errno::ENOENT,
    );
    // Nothing was mapped in the destination.
    assert_eq!(c.fd().unmap(b, 0, u64::MAX).unwrap(), 0);
    Ok(())
}

fn copy_asking_write_of_read_only_memory_is_eperm(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    let b = c.ioas();
    c.map_prot(a, Some(BASE), 0, P, Prot::READ).unwrap();
    expect_errno(
        c.fd().copy(copy_req(a, BASE, b, Some(BASE), P)),
        Errno::EPERM,
    );
    let mut req = copy_req(a, BASE, b, Some(BASE), P);
    req.prot = Prot::READ;
    c.fd().copy(req).unwrap();
    Ok(())
}

fn copy_with_an_unknown_ioas_is_enoent(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    let gone = c.ioas();
    c.fd().ioas_destroy(gone).unwrap();
    c.map(a, Some(BASE), 0, P).unwrap();
    expect_errno(c.fd().copy(copy_req(gone, BASE, a, None, P)), Errno::ENOENT);
    expect_errno(c.fd().copy(copy_req(a, BASE, gone, None, P)), Errno::ENOENT);
    Ok(())
}

fn copy_without_read_or_write_is_einval(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    c.map(a, Some(BASE), 0, P).unwrap();
    let mut req = copy_req(a, BASE, a, None, P);
    req.prot = Prot::default();
    expect_errno(c.fd().copy(req), Errno::EINVAL);
    Ok(())
}

fn copy_onto_an_existing_area_is_eexist(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    c.map(a, Some(BASE), 0, 2 * P).unwrap();
    expect_errno(
        c.fd().copy(copy_req(a, BASE, a, Some(BASE + P), P)),
        Errno::EEXIST,
    );
    Ok(())
}

// ---- OPTION -----------------------------------------------------------------

fn huge_pages_option_defaults_on_and_can_be_cleared(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    let opt = IommuOption::HugePages(a);
    assert_eq!(c.fd().option(opt, OptionOp::Get).unwrap(), 1);
    c.fd().option(opt, OptionOp::Set(0)).unwrap();
    assert_eq!(c.fd().option(opt, OptionOp::Get).unwrap(), 0);
    expect_errno(c.fd().option(opt, OptionOp::Set(2)), Errno::EINVAL);
    Ok(())
}

fn rlimit_mode_is_set_only_on_an_empty_iommufd(c: &mut Ctx) -> CaseResult {
    let get = |c: &mut Ctx| c.fd().option(IommuOption::RlimitMode, OptionOp::Get);
    assert_eq!(get(c).unwrap(), 0);
    if c.device().is_err() {
        // Nothing bound yet: the value is checked, 0 and 1 are taken.
        expect_errno(
            c.fd().option(IommuOption::RlimitMode, OptionOp::Set(2)),
            Errno::EINVAL,
        );
        c.fd()
            .option(IommuOption::RlimitMode, OptionOp::Set(1))
            .unwrap();
        assert_eq!(get(c).unwrap(), 1);
    }
    // Any object (a bound device, an IOAS) makes it busy, whatever the value.
    c.ioas();
    for v in [0, 1, 2] {
        expect_errno(
            c.fd().option(IommuOption::RlimitMode, OptionOp::Set(v)),
            Errno::EBUSY,
        );
    }
    Ok(())
}

// ---- devices ------------------------------------------------------------------

fn attach_reserves_the_device_regions(c: &mut Ctx) -> CaseResult {
    let dev = c.device()?;
    let expected = c.fd().device_iova_ranges(dev).unwrap();
    let a = c.ioas();
    c.fd().attach(dev, a).unwrap();
    let (ranges, align) = c.ranges(a);
    assert_eq!(ranges, expected);
    assert!(align >= P, "alignment {align:#x} below a page");
    Ok(())
}

fn map_into_a_reserved_region_is_einval(c: &mut Ctx) -> CaseResult {
    let dev = c.device()?;
    let iova = c.reserved_iova(dev)?;
    let a = c.ioas();
    c.fd().attach(dev, a).unwrap();
    expect_errno(c.map(a, Some(iova), 0, P), Errno::EINVAL);
    Ok(())
}

fn map_misaligned_for_the_device_is_einval(c: &mut Ctx) -> CaseResult {
    let dev = c.device()?;
    let a = c.ioas();
    c.fd().attach(dev, a).unwrap();
    expect_errno(c.map(a, Some(BASE + 0x800), 0, P), Errno::EINVAL);
    expect_errno(c.map(a, Some(BASE), 0, 0x800), Errno::EINVAL);
    Ok(())
}

fn destroy_with_a_device_attached_is_ebusy(c: &mut Ctx) -> CaseResult {
    let dev = c.device()?;
    let a = c.ioas();
    c.fd().attach(dev, a).unwrap();
    expect_errno(c.fd().ioas_destroy(a), Errno::EBUSY);
    c.fd().detach(dev).unwrap();
    c.fd().ioas_destroy(a).unwrap();
    Ok(())
}

fn attach_over_a_mapped_reserved_region_is_eaddrinuse(c: &mut Ctx) -> CaseResult {
    let dev = c.device()?;
    let iova = c.reserved_iova(dev)?;
    let a = c.ioas();
    c.map(a, Some(iova), 0, P).unwrap();
    expect_errno(c.fd().attach(dev, a), Errno::EADDRINUSE);
    // Nothing changed: the area is still there and nothing is reserved.
    let (ranges, _) = c.ranges(a);
    assert_eq!(
        ranges,
        vec![IovaRange {
            start: 0,
            last: u64::MAX
        }]
    );
    assert_eq!(c.fd().unmap(a, iova, P).unwrap(), P);
    c.fd().attach(dev, a).unwrap();
    Ok(())
}

fn attach_over_an_allowed_reserved_region_is_eaddrinuse(c: &mut Ctx) -> CaseResult {
    let dev = c.device()?;
    let iova = c.reserved_iova(dev)?;
    let a = c.ioas();
    c.fd()
        .allow_iovas(
            a,
            &[IovaRange {
                start: iova,
                last: iova + P - 1,
            }],
        )
        .unwrap();
    expect_errno(c.fd().attach(dev, a), Errno::EADDRINUSE);
    Ok(())
}

fn allowing_a_reserved_region_is_eaddrinuse(c: &mut Ctx) -> CaseResult {
    let dev = c.device()?;
    let iova = c.reserved_iova(dev)?;
    let a = c.ioas();
    c.fd().attach(dev, a).unwrap();
    let r = c.fd().allow_iovas(
        a,
        &[IovaRange {
            start: iova,
            last: iova + P - 1,
        }],
    );
    expect_errno(r, Errno::EADDRINUSE);
    Ok(())
}

fn detach_releases_the_device_regions(c: &mut Ctx) -> CaseResult {
    let dev = c.device()?;
    let a = c.ioas();
    c.fd().attach(dev, a).unwrap();
    c.fd().detach(dev).unwrap();
    let (ranges, align) = c.ranges(a);
    assert_eq!(
        ranges,
        vec![IovaRange {
            start: 0,
            last: u64::MAX
        }]
    );
    assert_eq!(align, 1);
    Ok(())
}

fn attach_to_another_ioas_moves_the_device(c: &mut Ctx) -> CaseResult {
    let dev = c.device()?;
    let a = c.ioas();
    let b = c.ioas();
    c.fd().attach(dev, a).unwrap();
    c.fd().attach(dev, b).unwrap();
    c.fd().ioas_destroy(a).unwrap();
    expect_errno(c.fd().ioas_destroy(b), Errno::EBUSY);
    Ok(())
}

fn maps_made_before_attach_stay_after_it(c: &mut Ctx) -> CaseResult {
    let dev = c.device()?;
    let a = c.ioas();
    c.map(a, Some(BASE), 0, 4 * P).unwrap();
    c.fd().attach(dev, a).unwrap();
    expect_errno(c.map(a, Some(BASE), 0, P), Errno::EEXIST);
    assert_eq!(c.fd().unmap(a, BASE, 4 * P).unwrap(), 4 * P);
    Ok(())
}

fn attach_over_an_area_the_device_cannot_align_is_eaddrinuse(c: &mut Ctx) -> CaseResult {
    let dev = c.device()?;
    let a = c.ioas();
    c.map(a, Some(BASE + 0x800), 0, 0x800).unwrap();
    expect_errno(c.fd().attach(dev, a), Errno::EADDRINUSE);
    Ok(())
}

/// Every case, in order.
pub const CASES: &[Case] = &[
    (
        "ioas_alloc_gives_distinct_ids",
        ioas_alloc_gives_distinct_ids,
    ),
    (
        "destroy_of_an_unknown_ioas_is_enoent",
        destroy_of_an_unknown_ioas_is_enoent,
    ),
    (
        "a_destroyed_ioas_cannot_be_mapped",
        a_destroyed_ioas_cannot_be_mapped,
    ),
    (
        "an_empty_ioas_has_the_whole_space_usable",
        an_empty_ioas_has_the_whole_space_usable,
    ),
    (
        "iova_ranges_into_a_short_buffer_is_emsgsize_with_the_count",
        iova_ranges_into_a_short_buffer_is_emsgsize_with_the_count,
    ),
    (
        "iova_ranges_of_an_unknown_ioas_is_enoent",
        iova_ranges_of_an_unknown_ioas_is_enoent,
    ),
    (
        "map_without_read_or_write_is_einval",
        map_without_read_or_write_is_einval,
    ),
    ("map_of_zero_length_is_einval", map_of_zero_length_is_einval),
    (
        "map_of_ulong_max_length_or_iova_is_eoverflow",
        map_of_ulong_max_length_or_iova_is_eoverflow,
    ),
    (
        "map_at_a_fixed_iova_that_wraps_is_eoverflow",
        map_at_a_fixed_iova_that_wraps_is_eoverflow,
    ),
    (
        "map_of_user_memory_that_wraps_is_eoverflow",
        map_of_user_memory_that_wraps_is_eoverflow,
    ),
    (
        "map_at_a_fixed_iova_maps_there",
        map_at_a_fixed_iova_maps_there,
    ),
    (
        "map_over_an_existing_area_is_eexist",
        map_over_an_existing_area_is_eexist,
    ),
    ("maps_may_touch_end_to_end", maps_may_touch_end_to_end),
    (
        "the_same_memory_may_be_mapped_twice",
        the_same_memory_may_be_mapped_twice,
    ),
    (
        "allocated_iovas_keep_the_page_offset",
        allocated_iovas_keep_the_page_offset,
    ),
    (
        "allocated_iovas_are_never_zero",
        allocated_iovas_are_never_zero,
    ),
    (
        "allocated_iovas_follow_the_user_address_alignment",
        allocated_iovas_follow_the_user_address_alignment,
    ),
    (
        "allocated_iovas_avoid_existing_areas",
        allocated_iovas_avoid_existing_areas,
    ),
    (
        "allocated_iovas_stay_inside_the_allowed_ranges",
        allocated_iovas_stay_inside_the_allowed_ranges,
    ),
    (
        "allocation_outside_a_too_small_allowed_range_is_enospc",
        allocation_outside_a_too_small_allowed_range_is_enospc,
    ),
    (
        "fixed_maps_may_ignore_the_allowed_ranges",
        fixed_maps_may_ignore_the_allowed_ranges,
    ),
    (
        "allowed_ranges_that_overlap_are_einval",
        allowed_ranges_that_overlap_are_einval,
    ),
    (
        "an_empty_allowed_list_allows_everything_again",
        an_empty_allowed_list_allows_everything_again,
    ),
    ("unmap_of_nothing_is_enoent", unmap_of_nothing_is_enoent),
    (
        "unmap_of_zero_length_is_einval",
        unmap_of_zero_length_is_einval,
    ),
    (
        "unmap_of_part_of_an_area_is_enoent_and_keeps_it",
        unmap_of_part_of_an_area_is_enoent_and_keeps_it,
    ),
    (
        "unmap_of_a_range_covering_several_areas_unmaps_them_all",
        unmap_of_a_range_covering_several_areas_unmaps_them_all,
    ),
    (
        "unmap_stopped_by_a_straddling_area_keeps_what_it_unmapped",
        unmap_stopped_by_a_straddling_area_keeps_what_it_unmapped,
    ),
    (
        "unmap_all_of_an_empty_ioas_succeeds",
        unmap_all_of_an_empty_ioas_succeeds,
    ),
    ("unmap_all_unmaps_everything", unmap_all_unmaps_everything),
    (
        "unmap_of_ulong_max_length_not_from_zero_is_eoverflow",
        unmap_of_ulong_max_length_not_from_zero_is_eoverflow,
    ),
    (
        "unmap_of_a_wrapping_range_is_eoverflow",
        unmap_of_a_wrapping_range_is_eoverflow,
    ),
    (
        "copy_of_a_whole_area_maps_the_same_memory",
        copy_of_a_whole_area_maps_the_same_memory,
    ),
    ("copy_of_part_of_an_area", copy_of_part_of_an_area),
    ("copy_across_contiguous_areas", copy_across_contiguous_areas),
    ("copy_within_one_ioas", copy_within_one_ioas),
    ("copy_over_a_gap_is_enoent", copy_over_a_gap_is_enoent),
    (
        "copy_asking_write_of_read_only_memory_is_eperm",
        copy_asking_write_of_read_only_memory_is_eperm,
    ),
    (
        "copy_with_an_unknown_ioas_is_enoent",
        copy_with_an_unknown_ioas_is_enoent,
    ),
    (
        "copy_without_read_or_write_is_einval",
        copy_without_read_or_write_is_einval,
    ),
    (
        "copy_onto_an_existing_area_is_eexist",
        copy_onto_an_existing_area_is_eexist,
    ),
    (
        "huge_pages_option_defaults_on_and_can_be_cleared",
        huge_pages_option_defaults_on_and_can_be_cleared,
    ),
    (
        "rlimit_mode_is_set_only_on_an_empty_iommufd",
        rlimit_mode_is_set_only_on_an_empty_iommufd,
    ),
    (
        "attach_reserves_the_device_regions",
        attach_reserves_the_device_regions,
    ),
    (
        "map_into_a_reserved_region_is_einval",
        map_into_a_reserved_region_is_einval,
    ),
    (
        "map_misaligned_for_the_device_is_einval",
        map_misaligned_for_the_device_is_einval,
    ),
    (
        "destroy_with_a_device_attached_is_ebusy",
        destroy_with_a_device_attached_is_ebusy,
    ),
    (
        "attach_over_a_mapped_reserved_region_is_eaddrinuse",
        attach_over_a_mapped_reserved_region_is_eaddrinuse,
    ),
    (
        "attach_over_an_allowed_reserved_region_is_eaddrinuse",
        attach_over_an_allowed_reserved_region_is_eaddrinuse,
    ),
    (
        "allowing_a_reserved_region_is_eaddrinuse",
        allowing_a_reserved_region_is_eaddrinuse,
    ),
    (
        "detach_releases_the_device_regions",
        detach_releases_the_device_regions,
    ),
    (
        "attach_to_another_ioas_moves_the_device",
        attach_to_another_ioas_moves_the_device,
    ),
    (
        "maps_made_before_attach_stay_after_it",
        maps_made_before_attach_stay_after_it,
    ),
    (
        "attach_over_an_area_the_device_cannot_align_is_eaddrinuse",
        attach_over_an_area_the_device_cannot_align_is_eaddrinuse,
    ),
];

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
    let outcomes = CASES
        .iter()
        .map(|(name, case)| {
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                let mut ctx = Ctx {
                    s: fixture.open(),
                    buf: Buffer::new(),
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
