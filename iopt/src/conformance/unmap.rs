// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `IOMMU_IOAS_UNMAP`, through the typed interface.

use super::*;

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

cases![
    unmap_of_nothing_is_enoent,
    unmap_of_zero_length_is_einval,
    unmap_of_part_of_an_area_is_enoent_and_keeps_it,
    unmap_of_a_range_covering_several_areas_unmaps_them_all,
    unmap_stopped_by_a_straddling_area_keeps_what_it_unmapped,
    unmap_all_of_an_empty_ioas_succeeds,
    unmap_all_unmaps_everything,
    unmap_of_ulong_max_length_not_from_zero_is_eoverflow,
    unmap_of_a_wrapping_range_is_eoverflow,
];
