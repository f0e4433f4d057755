// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `IOMMU_IOAS_ALLOW_IOVAS`, through the typed interface.

use super::*;

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
    c.allow_only_the_first_page(a);
    c.fd().allow_iovas(a, &[]).unwrap();
    c.map(a, None, 0, 4 * P).unwrap();
    c.map(a, None, 0, 4 * P).unwrap();
    Ok(())
}

fn a_one_byte_allowed_range_is_einval(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    let one = IovaRange {
        start: BASE,
        last: BASE,
    };
    expect_errno(c.fd().allow_iovas(a, &[one]), Errno::EINVAL);
    // Two bytes are the least the kernel allows.
    let two = IovaRange {
        start: BASE,
        last: BASE + 1,
    };
    c.fd().allow_iovas(a, &[two]).unwrap();
    Ok(())
}

fn allowed_ranges_may_touch_end_to_end_in_any_order(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    let lo = IovaRange {
        start: BASE,
        last: BASE + P - 1,
    };
    let hi = IovaRange {
        start: BASE + P,
        last: BASE + 2 * P - 1,
    };
    c.fd().allow_iovas(a, &[hi, lo]).unwrap();
    // Both are allowed: two pages allocate there, and no third.
    c.map(a, None, 0, P).unwrap();
    c.map(a, None, 0, P).unwrap();
    expect_errno(c.map(a, None, 0, P), Errno::ENOSPC);
    Ok(())
}

fn a_range_overlapping_an_earlier_one_is_einval_whichever_comes_first(c: &mut Ctx) -> CaseResult {
    let a = c.ioas();
    let wide = IovaRange {
        start: BASE,
        last: BASE + 4 * P - 1,
    };
    let inner = IovaRange {
        start: BASE + P,
        last: BASE + 2 * P - 1,
    };
    expect_errno(c.fd().allow_iovas(a, &[wide, inner]), Errno::EINVAL);
    expect_errno(c.fd().allow_iovas(a, &[inner, wide]), Errno::EINVAL);
    expect_errno(c.fd().allow_iovas(a, &[wide, wide]), Errno::EINVAL);
    Ok(())
}

cases![
    allowed_ranges_that_overlap_are_einval,
    an_empty_allowed_list_allows_everything_again,
    a_one_byte_allowed_range_is_einval,
    allowed_ranges_may_touch_end_to_end_in_any_order,
    a_range_overlapping_an_earlier_one_is_einval_whichever_comes_first,
];
