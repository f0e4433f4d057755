// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Devices: attach and detach, and what they do to an IOAS.

use super::*;

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
    c.expect_the_whole_space_usable(a);
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

cases![
    attach_reserves_the_device_regions,
    map_into_a_reserved_region_is_einval,
    map_misaligned_for_the_device_is_einval,
    destroy_with_a_device_attached_is_ebusy,
    attach_over_a_mapped_reserved_region_is_eaddrinuse,
    attach_over_an_allowed_reserved_region_is_eaddrinuse,
    allowing_a_reserved_region_is_eaddrinuse,
    detach_releases_the_device_regions,
    attach_to_another_ioas_moves_the_device,
    maps_made_before_attach_stay_after_it,
    attach_over_an_area_the_device_cannot_align_is_eaddrinuse,
];
