// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The byte-level entry point ([`crate::uapi::Ioctl`]): what only the
//! structures can say (`size`, `__reserved`, unknown flags, `IOMMU_OPTION`'s
//! operations, the user arrays), and the order the kernel checks things in
//! (`iommufd_fops_ioctl` in `main.c`, then the handler in `ioas.c`).

use super::*;
use crate::uapi::{self, Field};

/// ID 0 is never an object's: the kernel's IDs start at 1.
const NO_IOAS: u32 = 0;

/// Issue `cmd` on `bytes`; the bytes as the command left them.
fn issue<const N: usize>(c: &mut Ctx, cmd: Cmd, mut bytes: [u8; N]) -> (Result<()>, [u8; N]) {
    let r = c.ucmd(cmd, &mut bytes);
    (r, bytes)
}

fn map_cmd(ioas: u32, flags: u32, user_va: u64, length: u64, iova: u64) -> uapi::iommu_ioas_map {
    uapi::iommu_ioas_map {
        size: uapi::iommu_ioas_map::SIZE as u32,
        flags,
        ioas_id: ioas,
        user_va,
        length,
        iova,
        ..Default::default()
    }
}

const RW: u32 = uapi::IOMMU_IOAS_MAP_READABLE | uapi::IOMMU_IOAS_MAP_WRITEABLE;
const FIXED: u32 = uapi::IOMMU_IOAS_MAP_FIXED_IOVA;

fn map(c: &mut Ctx, m: uapi::iommu_ioas_map) -> (Result<()>, uapi::iommu_ioas_map) {
    let (r, b) = issue(c, Cmd::IoasMap, m.to_bytes());
    (r, uapi::iommu_ioas_map::from_bytes(&b))
}

fn copy_cmd(src: u32, dst: u32, flags: u32, length: u64, dst_iova: u64) -> uapi::iommu_ioas_copy {
    uapi::iommu_ioas_copy {
        size: uapi::iommu_ioas_copy::SIZE as u32,
        flags,
        dst_ioas_id: dst,
        src_ioas_id: src,
        length,
        dst_iova,
        src_iova: BASE,
    }
}

fn copy(c: &mut Ctx, m: uapi::iommu_ioas_copy) -> Result<()> {
    issue(c, Cmd::IoasCopy, m.to_bytes()).0
}

fn option(c: &mut Ctx, option_id: u32, op: u16, object_id: u32) -> (Result<()>, u64) {
    let o = uapi::iommu_option {
        size: uapi::iommu_option::SIZE as u32,
        option_id,
        op,
        object_id,
        val64: 7,
        ..Default::default()
    };
    let (r, b) = issue(c, Cmd::Option, o.to_bytes());
    (r, uapi::iommu_option::from_bytes(&b).val64)
}

fn iova_ranges(
    c: &mut Ctx,
    ioas: u32,
    num: u32,
    ptr: u64,
) -> (Result<()>, uapi::iommu_ioas_iova_ranges) {
    let cmd = uapi::iommu_ioas_iova_ranges {
        size: uapi::iommu_ioas_iova_ranges::SIZE as u32,
        ioas_id: ioas,
        num_iovas: num,
        allowed_iovas: ptr,
        ..Default::default()
    };
    let (r, b) = issue(c, Cmd::IoasIovaRanges, cmd.to_bytes());
    (r, uapi::iommu_ioas_iova_ranges::from_bytes(&b))
}

/// `ALLOW_IOVAS` of `ranges`, written at the start of the user memory.
fn allow(c: &mut Ctx, ioas: u32, ranges: &[(u64, u64)]) -> Result<()> {
    for (i, &(start, last)) in ranges.iter().enumerate() {
        let r = uapi::iommu_iova_range { start, last };
        let at = i * uapi::iommu_iova_range::SIZE;
        c.user_mut()[at..at + uapi::iommu_iova_range::SIZE].copy_from_slice(&r.to_bytes());
    }
    let ptr = c.user_addr();
    allow_at(c, ioas, ranges.len() as u32, ptr)
}

fn allow_at(c: &mut Ctx, ioas: u32, num: u32, ptr: u64) -> Result<()> {
    let cmd = uapi::iommu_ioas_allow_iovas {
        size: uapi::iommu_ioas_allow_iovas::SIZE as u32,
        ioas_id: ioas,
        num_iovas: num,
        allowed_iovas: ptr,
        ..Default::default()
    };
    issue(c, Cmd::IoasAllowIovas, cmd.to_bytes()).0
}

/// An address just past the user memory: an array there is not the
/// caller's.
fn outside(c: &Ctx) -> u64 {
    c.user_addr() + c.user.len() as u64
}

// ---- size ---------------------------------------------------------------------

fn every_command_refuses_a_size_below_its_structure_with_einval(c: &mut Ctx) -> CaseResult {
    for cmd in Cmd::ALL {
        for size in [0, 4, cmd.min_size() - 1] {
            let mut b = vec![0u8; cmd.size()];
            (size as u32).put(&mut b);
            expect_errno(c.ucmd(cmd, &mut b), Errno::EINVAL);
        }
    }
    Ok(())
}

fn a_size_past_the_callers_bytes_is_efault(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    let mut short = map_cmd(a.0, RW, c.buf.at(0), P, 0).to_bytes();
    expect_errno(c.ucmd(Cmd::IoasMap, &mut short[..32]), Errno::EFAULT);
    expect_errno(c.ucmd(Cmd::IoasMap, &mut short[..3]), Errno::EFAULT);
    Ok(())
}

fn bytes_past_the_structure_must_be_zero_else_e2big(c: &mut Ctx) -> CaseResult {
    let size = uapi::iommu_ioas_alloc::SIZE;
    // `size` says 8 zero bytes follow the structure; one more byte lies
    // past `size`, neither read nor written.
    let mut b = [0u8; 24];
    ((size + 8) as u32).put(&mut b);
    b[size + 8] = 0xaa;
    c.ucmd(Cmd::IoasAlloc, &mut b).unwrap();
    let id = uapi::iommu_ioas_alloc::from_bytes(&b).out_ioas_id;
    assert_ne!(id, 0);
    assert_eq!(b[size + 8], 0xaa);
    let mut b = [0u8; 24];
    ((size + 8) as u32).put(&mut b);
    b[size + 7] = 1;
    expect_errno(c.ucmd(Cmd::IoasAlloc, &mut b), Errno::E2BIG);
    Ok(())
}

// ---- flags and reserved fields --------------------------------------------------

fn ioas_alloc_with_any_flag_is_eopnotsupp(c: &mut Ctx) -> CaseResult {
    for flags in [1, 1 << 31] {
        let cmd = uapi::iommu_ioas_alloc {
            size: uapi::iommu_ioas_alloc::SIZE as u32,
            flags,
            out_ioas_id: 0,
        };
        expect_errno(
            issue(c, Cmd::IoasAlloc, cmd.to_bytes()).0,
            Errno::EOPNOTSUPP,
        );
    }
    Ok(())
}

fn reserved_fields_are_eopnotsupp_before_the_ioas_is_looked_up(c: &mut Ctx) -> CaseResult {
    let mut r = uapi::iommu_ioas_iova_ranges {
        size: uapi::iommu_ioas_iova_ranges::SIZE as u32,
        ioas_id: NO_IOAS,
        __reserved: 1,
        ..Default::default()
    };
    expect_errno(
        issue(c, Cmd::IoasIovaRanges, r.to_bytes()).0,
        Errno::EOPNOTSUPP,
    );
    r.__reserved = 0;
    expect_errno(issue(c, Cmd::IoasIovaRanges, r.to_bytes()).0, Errno::ENOENT);
    let a = uapi::iommu_ioas_allow_iovas {
        size: uapi::iommu_ioas_allow_iovas::SIZE as u32,
        ioas_id: NO_IOAS,
        __reserved: 1 << 31,
        ..Default::default()
    };
    expect_errno(
        issue(c, Cmd::IoasAllowIovas, a.to_bytes()).0,
        Errno::EOPNOTSUPP,
    );
    let mut m = map_cmd(NO_IOAS, RW, c.buf.at(0), P, 0);
    m.__reserved = 1;
    expect_errno(map(c, m).0, Errno::EOPNOTSUPP);
    let o = uapi::iommu_option {
        size: uapi::iommu_option::SIZE as u32,
        option_id: uapi::IOMMU_OPTION_HUGE_PAGES,
        op: uapi::IOMMU_OPTION_OP_GET,
        __reserved: 1,
        object_id: NO_IOAS,
        val64: 0,
    };
    expect_errno(issue(c, Cmd::Option, o.to_bytes()).0, Errno::EOPNOTSUPP);
    Ok(())
}

fn unknown_map_and_copy_flags_are_checked_first(c: &mut Ctx) -> CaseResult {
    let m = map_cmd(NO_IOAS, RW | 1 << 3, c.buf.at(0), u64::MAX, u64::MAX);
    expect_errno(map(c, m).0, Errno::EOPNOTSUPP);
    let k = copy_cmd(NO_IOAS, NO_IOAS, RW | 1 << 31, u64::MAX, 0);
    expect_errno(copy(c, k), Errno::EOPNOTSUPP);
    Ok(())
}

// ---- MAP, COPY, UNMAP, DESTROY ------------------------------------------------------

fn map_checks_overflow_then_permissions_then_the_ioas(c: &mut Ctx) -> CaseResult {
    let va = c.buf.at(0);
    // ULONG_MAX as the IOVA is refused even when the IOVA is not fixed.
    expect_errno(
        map(c, map_cmd(NO_IOAS, RW, va, P, u64::MAX)).0,
        Errno::EOVERFLOW,
    );
    expect_errno(
        map(c, map_cmd(NO_IOAS, 0, va, u64::MAX, 0)).0,
        Errno::EOVERFLOW,
    );
    expect_errno(
        map(c, map_cmd(NO_IOAS, FIXED, va, P, BASE)).0,
        Errno::EINVAL,
    );
    expect_errno(map(c, map_cmd(NO_IOAS, RW, va, P, 0)).0, Errno::ENOENT);
    Ok(())
}

fn map_writes_back_the_iova_it_chose_or_was_given(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    let va = c.buf.at(0);
    // Without FIXED_IOVA the IOVA given is ignored: the first page goes at
    // PAGE_SIZE (never at 0).
    let (r, out) = map(c, map_cmd(a.0, RW, va, P, 0x1234_5000));
    r.unwrap();
    assert_eq!(out.iova, P);
    let (r, out) = map(c, map_cmd(a.0, RW | FIXED, va, P, BASE));
    r.unwrap();
    assert_eq!(out.iova, BASE);
    Ok(())
}

fn copy_checks_overflow_then_permissions_then_source_then_destination(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    expect_errno(
        copy(c, copy_cmd(NO_IOAS, NO_IOAS, RW, P, u64::MAX)),
        Errno::EOVERFLOW,
    );
    expect_errno(copy(c, copy_cmd(NO_IOAS, NO_IOAS, 0, P, 0)), Errno::EINVAL);
    expect_errno(copy(c, copy_cmd(NO_IOAS, a.0, RW, P, 0)), Errno::ENOENT);
    // The source range is taken before the destination is looked up.
    expect_errno(copy(c, copy_cmd(a.0, NO_IOAS, RW, P, 0)), Errno::ENOENT);
    c.map(a, Some(BASE), 0, P).unwrap();
    expect_errno(copy(c, copy_cmd(a.0, NO_IOAS, RW, P, 0)), Errno::ENOENT);
    let k = copy_cmd(a.0, a.0, RW | FIXED, P, 2 * BASE);
    let (r, b) = issue(c, Cmd::IoasCopy, k.to_bytes());
    r.unwrap();
    assert_eq!(uapi::iommu_ioas_copy::from_bytes(&b).dst_iova, 2 * BASE);
    Ok(())
}

fn unmap_looks_up_the_ioas_before_the_range_and_writes_back_the_length(c: &mut Ctx) -> CaseResult {
    let unmap = |c: &mut Ctx, ioas: u32, iova: u64, length: u64| {
        let u = uapi::iommu_ioas_unmap {
            size: uapi::iommu_ioas_unmap::SIZE as u32,
            ioas_id: ioas,
            iova,
            length,
        };
        let (r, b) = issue(c, Cmd::IoasUnmap, u.to_bytes());
        r.map(|()| uapi::iommu_ioas_unmap::from_bytes(&b).length)
    };
    let a = c.ioas();
    expect_errno(unmap(c, NO_IOAS, 1, u64::MAX), Errno::ENOENT);
    expect_errno(unmap(c, a.0, 1, u64::MAX), Errno::EOVERFLOW);
    c.map(a, Some(BASE), 0, 2 * P).unwrap();
    c.map(a, Some(2 * BASE), 0, P).unwrap();
    assert_eq!(unmap(c, a.0, 0, u64::MAX), Ok(3 * P));
    Ok(())
}

fn destroy_of_id_zero_is_enoent(c: &mut Ctx) -> CaseResult {
    let d = uapi::iommu_destroy {
        size: uapi::iommu_destroy::SIZE as u32,
        id: NO_IOAS,
    };
    expect_errno(issue(c, Cmd::Destroy, d.to_bytes()).0, Errno::ENOENT);
    Ok(())
}

// ---- OPTION -----------------------------------------------------------------------

fn option_ids_objects_and_operations_the_kernel_does_not_know_are_eopnotsupp(
    c: &mut Ctx,
) -> CaseResult {
    let (rlimit, huge) = (
        uapi::IOMMU_OPTION_RLIMIT_MODE,
        uapi::IOMMU_OPTION_HUGE_PAGES,
    );
    let get = uapi::IOMMU_OPTION_OP_GET;
    expect_errno(option(c, 2, get, 0).0, Errno::EOPNOTSUPP);
    expect_errno(option(c, rlimit, get, 1).0, Errno::EOPNOTSUPP);
    expect_errno(option(c, rlimit, 2, 0).0, Errno::EOPNOTSUPP);
    // HUGE_PAGES finds its IOAS before it looks at the operation.
    expect_errno(option(c, huge, 2, NO_IOAS).0, Errno::ENOENT);
    let a = c.ioas();
    expect_errno(option(c, huge, 2, a.0).0, Errno::EOPNOTSUPP);
    Ok(())
}

fn option_get_writes_back_the_value(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    let get = uapi::IOMMU_OPTION_OP_GET;
    assert_eq!(
        option(c, uapi::IOMMU_OPTION_RLIMIT_MODE, get, 0),
        (Ok(()), 0)
    );
    assert_eq!(
        option(c, uapi::IOMMU_OPTION_HUGE_PAGES, get, a.0),
        (Ok(()), 1)
    );
    Ok(())
}

// ---- the user arrays ------------------------------------------------------------

fn iova_ranges_writes_what_fits_then_the_count(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    // No room: EMSGSIZE, with the count and the alignment written back and
    // the array (a bad pointer) never touched.
    let (r, out) = iova_ranges(c, a.0, 0, 8);
    expect_errno(r, Errno::EMSGSIZE);
    assert_eq!((out.num_iovas, out.out_iova_alignment), (1, 1));
    let ptr = c.user_addr();
    let (r, out) = iova_ranges(c, a.0, 4, ptr);
    r.unwrap();
    assert_eq!(out.num_iovas, 1);
    let range = uapi::iommu_iova_range::from_bytes(&c.user);
    assert_eq!((range.start, range.last), (0, u64::MAX));
    // An array the caller does not own: EFAULT, and nothing written back.
    let bad = outside(c);
    let (r, out) = iova_ranges(c, a.0, 2, bad);
    expect_errno(r, Errno::EFAULT);
    assert_eq!(out.num_iovas, 2);
    Ok(())
}

fn allow_iovas_refuses_one_byte_ranges_and_overlaps_in_the_order_given(c: &mut Ctx) -> CaseResult {
    let a = c.ioas().0;
    expect_errno(allow(c, a, &[(BASE, BASE)]), Errno::EINVAL);
    expect_errno(allow(c, a, &[(BASE + 1, BASE)]), Errno::EINVAL);
    allow(c, a, &[(BASE, BASE + 1)]).unwrap();
    // End to end is not an overlap.
    allow(c, a, &[(BASE + P, BASE + 2 * P - 1), (BASE, BASE + P - 1)]).unwrap();
    expect_errno(
        allow(c, a, &[(BASE + P, BASE + 2 * P - 1), (BASE, BASE + P)]),
        Errno::EINVAL,
    );
    expect_errno(allow(c, a, &[(BASE, BASE + P - 1); 2]), Errno::EINVAL);
    allow(c, a, &[]).unwrap();
    Ok(())
}

fn allow_iovas_looks_up_the_ioas_then_reads_the_ranges(c: &mut Ctx) -> CaseResult {
    let a = c.ioas().0;
    let bad = outside(c);
    expect_errno(allow_at(c, NO_IOAS, 1, bad), Errno::ENOENT);
    expect_errno(allow_at(c, a, 1, bad), Errno::EFAULT);
    // Nothing is read of an empty array.
    allow_at(c, a, 0, bad).unwrap();
    Ok(())
}

cases![
    every_command_refuses_a_size_below_its_structure_with_einval,
    a_size_past_the_callers_bytes_is_efault,
    bytes_past_the_structure_must_be_zero_else_e2big,
    ioas_alloc_with_any_flag_is_eopnotsupp,
    reserved_fields_are_eopnotsupp_before_the_ioas_is_looked_up,
    unknown_map_and_copy_flags_are_checked_first,
    map_checks_overflow_then_permissions_then_the_ioas,
    map_writes_back_the_iova_it_chose_or_was_given,
    copy_checks_overflow_then_permissions_then_source_then_destination,
    unmap_looks_up_the_ioas_before_the_range_and_writes_back_the_length,
    destroy_of_id_zero_is_enoent,
    option_ids_objects_and_operations_the_kernel_does_not_know_are_eopnotsupp,
    option_get_writes_back_the_value,
    iova_ranges_writes_what_fits_then_the_count,
    allow_iovas_refuses_one_byte_ranges_and_overlaps_in_the_order_given,
    allow_iovas_looks_up_the_ioas_then_reads_the_ranges,
];
