// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `IOMMU_IOAS_COPY`, through the typed interface.

use super::*;

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

cases![
    copy_of_a_whole_area_maps_the_same_memory,
    copy_of_part_of_an_area,
    copy_across_contiguous_areas,
    copy_within_one_ioas,
    copy_over_a_gap_is_enoent,
    copy_asking_write_of_read_only_memory_is_eperm,
    copy_with_an_unknown_ioas_is_enoent,
    copy_without_read_or_write_is_einval,
    copy_onto_an_existing_area_is_eexist,
];
