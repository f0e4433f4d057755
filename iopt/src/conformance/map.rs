// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `IOMMU_IOAS_MAP` and the IOVA allocator, through the typed interface.

use super::*;

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
    let cap = c.s.thp.max_alloc_alignment();
    let iova = c.map(a, None, 0x1_0000, 0x1_0000).unwrap();
    assert_eq!(iova % 0x1_0000u64.min(cap), 0);
    // 2 MiB at a 2 MiB-aligned address: as aligned as the kernel's cap.
    let iova = c.map(a, None, 0, HPAGE_SIZE).unwrap();
    assert_eq!(iova % cap, 0);
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
    c.allow_only_the_first_page(a);
    expect_errno(c.map(a, None, 0, 2 * P), Errno::ENOSPC);
    c.map(a, None, 0, P).unwrap();
    expect_errno(c.map(a, None, 0, P), Errno::ENOSPC);
    Ok(())
}

fn fixed_maps_may_ignore_the_allowed_ranges(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    c.allow_only_the_first_page(a);
    c.map(a, Some(2 * BASE), 0, P).unwrap();
    Ok(())
}

fn allocated_iovas_are_aligned_no_more_than_the_kernel_caps_them(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    // An allowed window starting one page past a 2 MiB boundary: 2 MiB at a
    // 2 MiB-aligned address goes to the next 2 MiB boundary with
    // transparent huge pages, and right at the window's start without
    // (iopt_alloc_iova caps the alignment at PAGE_SIZE then).
    let window = IovaRange {
        start: BASE + P,
        last: BASE + 2 * HPAGE_SIZE - 1,
    };
    c.fd().allow_iovas(a, &[window]).unwrap();
    let iova = c.map(a, None, 0, HPAGE_SIZE).unwrap();
    let expected = match c.s.thp {
        Thp::Enabled => BASE + HPAGE_SIZE,
        Thp::Disabled => BASE + P,
    };
    assert_eq!(iova, expected, "{:?}", c.s.thp);
    Ok(())
}

cases![
    map_without_read_or_write_is_einval,
    map_of_zero_length_is_einval,
    map_of_ulong_max_length_or_iova_is_eoverflow,
    map_at_a_fixed_iova_that_wraps_is_eoverflow,
    map_of_user_memory_that_wraps_is_eoverflow,
    map_at_a_fixed_iova_maps_there,
    map_over_an_existing_area_is_eexist,
    maps_may_touch_end_to_end,
    the_same_memory_may_be_mapped_twice,
    allocated_iovas_keep_the_page_offset,
    allocated_iovas_are_never_zero,
    allocated_iovas_follow_the_user_address_alignment,
    allocated_iovas_avoid_existing_areas,
    allocated_iovas_stay_inside_the_allowed_ranges,
    allocation_outside_a_too_small_allowed_range_is_enospc,
    fixed_maps_may_ignore_the_allowed_ranges,
    allocated_iovas_are_aligned_no_more_than_the_kernel_caps_them,
];
