// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The model's own tests; the conformance suite runs from here too.

use super::*;

/// The conformance suite, against the model of a kernel with transparent
/// huge pages and of one without.
#[test]
fn model_passes_the_conformance_suite() {
    for thp in [crate::Thp::Enabled, crate::Thp::Disabled] {
        let report = crate::conformance::run_all(&crate::conformance::ModelFixture { thp });
        report.assert_all_passed();
        // The model has a device, so no case may be skipped.
        assert_eq!(report.counts(), (crate::conformance::cases().len(), 0, 0));
    }
}

/// User memory backed by a byte vector at a fixed base address.
struct Mem {
    base: u64,
    bytes: std::cell::RefCell<Vec<u8>>,
}

impl UserMemory for Mem {
    fn read(&self, user_va: u64, buf: &mut [u8]) -> Result<()> {
        let off = user_va.checked_sub(self.base).ok_or(IoptError::Fault)? as usize;
        let src = self.bytes.borrow();
        let src = src.get(off..off + buf.len()).ok_or(IoptError::Fault)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write(&self, user_va: u64, buf: &[u8]) -> Result<()> {
        let off = user_va.checked_sub(self.base).ok_or(IoptError::Fault)? as usize;
        let mut dst = self.bytes.borrow_mut();
        let dst = dst.get_mut(off..off + buf.len()).ok_or(IoptError::Fault)?;
        dst.copy_from_slice(buf);
        Ok(())
    }
}

fn mapped() -> (ModelIommufd, IoasId, Mem) {
    let mem = Mem {
        base: 0x10_0000,
        bytes: std::cell::RefCell::new(vec![0; 4 * PAGE_SIZE as usize]),
    };
    let mut m = ModelIommufd::new();
    let ioas = m.ioas_alloc().unwrap();
    // Two areas back to back, the second read-only, over swapped pages.
    let map = |m: &mut ModelIommufd, iova, user_va, prot| {
        m.map(
            ioas,
            MapRequest {
                iova: Some(iova),
                user_va,
                length: PAGE_SIZE,
                prot,
            },
        )
        .unwrap();
    };
    map(&mut m, 0x1000, 0x10_0000 + PAGE_SIZE, Prot::RW);
    map(&mut m, 0x2000, 0x10_0000, Prot::READ);
    (m, ioas, mem)
}

#[test]
fn access_goes_through_contiguous_areas_to_their_memory() {
    let (m, ioas, mem) = mapped();
    mem.bytes.borrow_mut()[0] = 0xaa;
    mem.bytes.borrow_mut()[PAGE_SIZE as usize - 1] = 0xbb;
    let mut buf = [0u8; 2];
    m.access_read(ioas, 0x1fff, &mut buf, &mem).unwrap();
    // 0x1fff is the last byte of page 1 of the memory, 0x2000 the first of page 0.
    assert_eq!(buf, [0, 0xaa]);
    m.access_write(ioas, 0x1000, &[1, 2, 3], &mem).unwrap();
    assert_eq!(
        &mem.bytes.borrow()[PAGE_SIZE as usize..PAGE_SIZE as usize + 3],
        &[1, 2, 3]
    );
}

#[test]
fn access_refuses_writes_to_read_only_areas_gaps_and_zero_lengths() {
    let (m, ioas, mem) = mapped();
    assert_eq!(
        m.access_write(ioas, 0x1ffe, &[0; 4], &mem),
        Err(IoptError::Permission)
    );
    let mut buf = [0u8; 4];
    assert_eq!(
        m.access_read(ioas, 0x2ffe, &mut buf, &mem)
            .unwrap_err()
            .errno(),
        crate::Errno::ENOENT
    );
    assert_eq!(
        m.access_read(ioas, 0x1000, &mut [], &mem)
            .unwrap_err()
            .errno(),
        crate::Errno::EINVAL
    );
    // Nothing was written by the refused write.
    assert!(mem.bytes.borrow()[PAGE_SIZE as usize..]
        .iter()
        .all(|&b| b == 0));
}

#[test]
fn a_failing_case_is_reported() {
    /// A fixture whose iommufd forgets every map.
    struct Amnesiac;
    impl crate::conformance::Fixture for Amnesiac {
        fn name(&self) -> &str {
            "amnesiac"
        }
        fn open(
            &self,
            _: std::sync::Arc<crate::conformance::SuiteMemory>,
        ) -> crate::conformance::Session {
            crate::conformance::Session {
                fd: Box::new(Forgetful(ModelIommufd::new())),
                device: None,
                thp: crate::Thp::Enabled,
            }
        }
    }
    #[derive(Debug)]
    struct Forgetful(ModelIommufd);
    impl crate::uapi::Ioctl for Forgetful {
        fn ioctl(&mut self, cmd: crate::uapi::Cmd, arg: &mut [u8], user: &mut [u8]) -> Result<()> {
            self.0.ioctl(cmd, arg, user)
        }
    }
    impl Iommufd for Forgetful {
        fn ioas_alloc(&mut self) -> Result<IoasId> {
            self.0.ioas_alloc()
        }
        fn ioas_destroy(&mut self, ioas: IoasId) -> Result<()> {
            self.0.ioas_destroy(ioas)
        }
        fn iova_ranges(&self, ioas: IoasId, out: &mut [IovaRange]) -> Result<IovaRanges> {
            self.0.iova_ranges(ioas, out)
        }
        fn allow_iovas(&mut self, ioas: IoasId, allowed: &[IovaRange]) -> Result<()> {
            self.0.allow_iovas(ioas, allowed)
        }
        fn map(&mut self, _: IoasId, req: MapRequest) -> Result<u64> {
            Ok(req.iova.unwrap_or(PAGE_SIZE))
        }
        fn copy(&mut self, req: CopyRequest) -> Result<u64> {
            self.0.copy(req)
        }
        fn unmap(&mut self, ioas: IoasId, iova: u64, length: u64) -> Result<u64> {
            self.0.unmap(ioas, iova, length)
        }
        fn option(&mut self, option: IommuOption, op: OptionOp) -> Result<u64> {
            self.0.option(option, op)
        }
        fn attach(&mut self, dev: DeviceId, ioas: IoasId) -> Result<()> {
            self.0.attach(dev, ioas)
        }
        fn detach(&mut self, dev: DeviceId) -> Result<()> {
            self.0.detach(dev)
        }
        fn device_iova_ranges(&mut self, dev: DeviceId) -> Result<Vec<IovaRange>> {
            self.0.device_iova_ranges(dev)
        }
    }
    let report = crate::conformance::run_all(&Amnesiac);
    let (passed, skipped, failed) = report.counts();
    assert!(failed > 10, "only {failed} failures");
    assert!(skipped > 5, "device cases must skip without a device");
    assert!(passed > 0);
    assert!(report
        .failures()
        .iter()
        .any(|(n, _)| *n == "map_over_an_existing_area_is_eexist"));
}

#[test]
fn allowed_ranges_load_in_order_against_their_neighbours() {
    let r = |start, last| IovaRange { start, last };
    let load = |v: &[IovaRange]| super::load_iovas(v.len(), |i| Ok(v[i]));
    assert_eq!(
        load(&[r(30, 39), r(10, 19), r(20, 29)]),
        Ok(vec![r(10, 19), r(20, 29), r(30, 39)])
    );
    for bad in [
        vec![r(10, 19), r(0, 10)],
        vec![r(10, 19), r(19, 25)],
        vec![r(10, 19), r(12, 14)],
        vec![r(12, 14), r(0, 100)],
        vec![r(5, 5)],
        vec![r(6, 5)],
    ] {
        assert_eq!(
            load(&bad).unwrap_err().errno(),
            crate::Errno::EINVAL,
            "{bad:?}"
        );
    }
    // A range that cannot be read stops the load there.
    assert_eq!(
        super::load_iovas(2, |i| if i == 0 {
            Ok(r(0, 1))
        } else {
            Err(IoptError::Fault)
        }),
        Err(IoptError::Fault)
    );
}
