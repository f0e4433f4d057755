// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Pinning: with a device attached the kernel pins what an IOAS maps
//! (`pin_user_pages` from `pages.c`), at MAP/COPY time and, for what was
//! mapped before, when the first device attaches; memory it cannot pin is
//! `EFAULT` and the operation leaves nothing behind.

use super::*;

fn map_req(iova: u64, user_va: u64, length: u64, prot: Prot) -> MapRequest {
    MapRequest {
        iova: Some(iova),
        user_va,
        length,
        prot,
    }
}

fn map_of_unbacked_memory_with_a_device_attached_is_efault(c: &mut Ctx) -> CaseResult {
    let dev = c.device()?;
    let a = c.ioas();
    c.fd().attach(dev, a).unwrap();
    // Four pages, the last two not mapped in the process.
    let va = c.arena(4, 2, Access::None);
    expect_errno(
        c.fd().map(a, map_req(BASE, va, 4 * P, Prot::RW)),
        Errno::EFAULT,
    );
    // Nothing was left at BASE: the backed head maps there.
    assert_eq!(
        c.fd().map(a, map_req(BASE, va, 2 * P, Prot::RW)).unwrap(),
        BASE
    );
    assert_eq!(c.fd().unmap(a, 0, u64::MAX).unwrap(), 2 * P);
    Ok(())
}

fn unbacked_memory_maps_without_a_device_and_attach_is_efault(c: &mut Ctx) -> CaseResult {
    let dev = c.device()?;
    let a = c.ioas();
    let va = c.arena(4, 2, Access::None);
    // Nothing is pinned without a domain.
    assert_eq!(
        c.fd().map(a, map_req(BASE, va, 4 * P, Prot::RW)).unwrap(),
        BASE
    );
    expect_errno(c.fd().attach(dev, a), Errno::EFAULT);
    // The failed attach reserved nothing, and the area is whole: its
    // unbacked tail counts in the length unmapped.
    c.expect_the_whole_space_usable(a);
    assert_eq!(c.fd().unmap(a, BASE, 4 * P).unwrap(), 4 * P);
    c.fd().attach(dev, a).unwrap();
    Ok(())
}

fn a_failed_move_leaves_the_device_where_it_was(c: &mut Ctx) -> CaseResult {
    let dev = c.device()?;
    let a = c.ioas();
    let b = c.ioas();
    let va = c.arena(2, 1, Access::None);
    c.fd().map(b, map_req(BASE, va, 2 * P, Prot::RW)).unwrap();
    c.fd().attach(dev, a).unwrap();
    expect_errno(c.fd().attach(dev, b), Errno::EFAULT);
    expect_errno(c.fd().ioas_destroy(a), Errno::EBUSY);
    c.fd().ioas_destroy(b).unwrap();
    Ok(())
}

fn writeable_map_of_read_only_memory_with_a_device_is_efault(c: &mut Ctx) -> CaseResult {
    let dev = c.device()?;
    let a = c.ioas();
    c.fd().attach(dev, a).unwrap();
    let va = c.arena(2, 2, Access::ReadOnly);
    expect_errno(
        c.fd().map(a, map_req(BASE, va, 2 * P, Prot::RW)),
        Errno::EFAULT,
    );
    // A pin for reading reaches read-only memory.
    c.fd().map(a, map_req(BASE, va, 2 * P, Prot::READ)).unwrap();
    Ok(())
}

fn copy_of_unbacked_memory_into_an_ioas_with_a_device_is_efault(c: &mut Ctx) -> CaseResult {
    let dev = c.device()?;
    let src = c.ioas();
    let dst = c.ioas();
    c.fd().attach(dev, dst).unwrap();
    let va = c.arena(4, 2, Access::None);
    c.fd().map(src, map_req(BASE, va, 4 * P, Prot::RW)).unwrap();
    expect_errno(
        c.fd().copy(copy_req(src, BASE, dst, Some(BASE), 4 * P)),
        Errno::EFAULT,
    );
    c.fd()
        .copy(copy_req(src, BASE, dst, Some(BASE), 2 * P))
        .unwrap();
    assert_eq!(c.fd().unmap(dst, 0, u64::MAX).unwrap(), 2 * P);
    Ok(())
}

cases![
    map_of_unbacked_memory_with_a_device_attached_is_efault,
    unbacked_memory_maps_without_a_device_and_attach_is_efault,
    a_failed_move_leaves_the_device_where_it_was,
    writeable_map_of_read_only_memory_with_a_device_is_efault,
    copy_of_unbacked_memory_into_an_ioas_with_a_device_is_efault,
];
