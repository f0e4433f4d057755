// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! IOAS objects (`IOMMU_IOAS_ALLOC`, `IOMMU_DESTROY`), `IOMMU_IOAS_IOVA_RANGES`
//! and `IOMMU_OPTION`, through the typed interface.

use super::*;

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

fn an_empty_ioas_has_the_whole_space_usable(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    c.expect_the_whole_space_usable(a);
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

fn huge_pages_off_aligns_the_ioas_to_a_page(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    let opt = IommuOption::HugePages(a);
    c.fd().option(opt, OptionOp::Set(0)).unwrap();
    assert_eq!(c.ranges(a).1, P);
    expect_errno(c.map(a, Some(BASE + 0x800), 0, P), Errno::EINVAL);
    expect_errno(c.map(a, Some(BASE), 0, 0x800), Errno::EINVAL);
    c.fd().option(opt, OptionOp::Set(1)).unwrap();
    assert_eq!(c.ranges(a).1, 1);
    c.map(a, Some(BASE + 0x800), 0, 0x800).unwrap();
    Ok(())
}

fn huge_pages_off_over_a_misaligned_area_is_eaddrinuse(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    let opt = IommuOption::HugePages(a);
    c.map(a, Some(BASE + 0x800), 0, 0x800).unwrap();
    expect_errno(c.fd().option(opt, OptionOp::Set(0)), Errno::EADDRINUSE);
    assert_eq!(c.fd().option(opt, OptionOp::Get).unwrap(), 1);
    assert_eq!(c.ranges(a).1, 1);
    Ok(())
}

fn huge_pages_cannot_be_turned_off_once_a_device_holds_areas(c: &mut Ctx) -> CaseResult {
    let dev = c.device()?;
    let a = c.ioas();
    let opt = IommuOption::HugePages(a);
    c.fd().attach(dev, a).unwrap();
    c.fd().option(opt, OptionOp::Set(0)).unwrap();
    c.fd().option(opt, OptionOp::Set(1)).unwrap();
    c.map(a, Some(BASE), 0, P).unwrap();
    expect_errno(c.fd().option(opt, OptionOp::Set(0)), Errno::EINVAL);
    // Turning them on again is always allowed.
    c.fd().option(opt, OptionOp::Set(1)).unwrap();
    Ok(())
}

cases![
    ioas_alloc_gives_distinct_ids,
    destroy_of_an_unknown_ioas_is_enoent,
    a_destroyed_ioas_cannot_be_mapped,
    an_empty_ioas_has_the_whole_space_usable,
    iova_ranges_into_a_short_buffer_is_emsgsize_with_the_count,
    iova_ranges_of_an_unknown_ioas_is_enoent,
    huge_pages_option_defaults_on_and_can_be_cleared,
    rlimit_mode_is_set_only_on_an_empty_iommufd,
    huge_pages_off_aligns_the_ioas_to_a_page,
    huge_pages_off_over_a_misaligned_area_is_eaddrinuse,
    huge_pages_cannot_be_turned_off_once_a_device_holds_areas,
];
