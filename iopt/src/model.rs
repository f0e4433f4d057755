//! The in-process iommufd: [`Iommufd`] over [`IoPagetable`], with mock
//! devices.
//!
//! This is the uAPI layer of `drivers/iommu/iommufd/ioas.c` (argument
//! checks, object lookup) and the attach path of `device.c`, kept thin: the
//! behaviour lives in [`IoPagetable`]. Devices are mocks with an aperture, a
//! list of reserved regions and a minimum page size, like the kernel's
//! `selftest.c` mock domain.

use std::collections::BTreeMap;

use crate::io_pagetable::Segment;
use crate::{
    AccessFlags, CopyRequest, DeviceId, IoPagetable, IoasId, IommuOption, Iommufd, IoptError,
    IovaRange, IovaRanges, MapRequest, OptionOp, Prot, Result, UserMemory, PAGE_SIZE,
};

/// A device the model can attach: what the kernel learns from the IOMMU
/// driver at attach time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MockDevice {
    /// The IOVA window the device's domain can translate
    /// (`iommu_domain_geometry`); everything outside is reserved on attach.
    pub aperture: IovaRange,
    /// Reserved regions (`iommu_get_resv_regions`), e.g. the MSI window.
    pub reserved: Vec<IovaRange>,
    /// The domain's smallest page size (`pgsize_bitmap`'s lowest bit); the
    /// IOAS alignment rises to it while the device is attached.
    pub page_size: u64,
}

impl MockDevice {
    /// A device behind an x86 IOMMU: 48-bit aperture, 4 KiB pages, the MSI
    /// window `0xfee00000..=0xfeefffff` reserved.
    pub fn x86() -> Self {
        Self {
            aperture: IovaRange {
                start: 0,
                last: (1 << 48) - 1,
            },
            reserved: vec![IovaRange {
                start: 0xfee0_0000,
                last: 0xfeef_ffff,
            }],
            page_size: PAGE_SIZE,
        }
    }

    /// The ranges the device reserves in any IOAS it is attached to.
    fn reservations(&self) -> Vec<IovaRange> {
        let mut v = self.reserved.clone();
        if self.aperture.start > 0 {
            v.push(IovaRange {
                start: 0,
                last: self.aperture.start - 1,
            });
        }
        if self.aperture.last < u64::MAX {
            v.push(IovaRange {
                start: self.aperture.last + 1,
                last: u64::MAX,
            });
        }
        v
    }
}

#[derive(Clone, Debug)]
struct Ioas {
    iopt: IoPagetable,
    /// `IOMMU_OPTION_HUGE_PAGES` (1 unless cleared).
    huge_pages: u64,
    attached: u32,
}

#[derive(Clone, Debug)]
struct Device {
    mock: MockDevice,
    ioas: Option<IoasId>,
}

/// The in-process iommufd: IOAS objects and mock devices.
#[derive(Clone, Debug, Default)]
pub struct ModelIommufd {
    ioas: BTreeMap<u32, Ioas>,
    devices: BTreeMap<DeviceId, Device>,
    rlimit_mode: u64,
}

impl ModelIommufd {
    /// An empty iommufd.
    pub fn new() -> Self {
        Self::default()
    }

    /// Register a mock device (the model's `VFIO_DEVICE_BIND_IOMMUFD`).
    pub fn add_device(&mut self, dev: DeviceId, mock: MockDevice) -> Result<()> {
        if self.devices.contains_key(&dev) {
            return Err(IoptError::Exists);
        }
        self.devices.insert(dev, Device { mock, ioas: None });
        Ok(())
    }

    /// Register a mock device with an aperture, reserved regions and 4 KiB
    /// pages.
    pub fn add_mock_device(
        &mut self,
        dev: DeviceId,
        aperture: IovaRange,
        reserved: &[IovaRange],
    ) -> Result<()> {
        self.add_device(
            dev,
            MockDevice {
                aperture,
                reserved: reserved.to_vec(),
                page_size: PAGE_SIZE,
            },
        )
    }

    /// The io_pagetable of an IOAS, for inspection.
    pub fn iopt(&self, ioas: IoasId) -> Result<&IoPagetable> {
        self.ioas
            .get(&ioas.0)
            .map(|i| &i.iopt)
            .ok_or(IoptError::NotFound("no such IOAS"))
    }

    /// How many IOAS objects exist, for inspection.
    pub fn ioas_count(&self) -> usize {
        self.ioas.len()
    }

    /// The IOAS a device is attached to.
    pub fn attached_to(&self, dev: DeviceId) -> Option<IoasId> {
        self.devices.get(&dev).and_then(|d| d.ioas)
    }

    fn get(&self, ioas: IoasId) -> Result<&Ioas> {
        self.ioas
            .get(&ioas.0)
            .ok_or(IoptError::NotFound("no such IOAS"))
    }

    fn get_mut(&mut self, ioas: IoasId) -> Result<&mut Ioas> {
        self.ioas
            .get_mut(&ioas.0)
            .ok_or(IoptError::NotFound("no such IOAS"))
    }

    /// A software DMA read through `ioas` (`iommufd_access_rw` without
    /// `IOMMUFD_ACCESS_RW_WRITE`): copy `buf.len()` bytes from `iova`.
    pub fn access_read(
        &self,
        ioas: IoasId,
        iova: u64,
        buf: &mut [u8],
        mem: &dyn UserMemory,
    ) -> Result<()> {
        let iopt = &self.get(ioas)?.iopt;
        iopt.access(iova, buf.len() as u64, false, |va, off, len| {
            mem.read(va, &mut buf[off as usize..(off + len) as usize])
        })
    }

    /// A software DMA write through `ioas` (`IOMMUFD_ACCESS_RW_WRITE`):
    /// the areas must be writeable.
    pub fn access_write(
        &self,
        ioas: IoasId,
        iova: u64,
        buf: &[u8],
        mem: &dyn UserMemory,
    ) -> Result<()> {
        let iopt = &self.get(ioas)?.iopt;
        iopt.access(iova, buf.len() as u64, true, |va, off, len| {
            mem.write(va, &buf[off as usize..(off + len) as usize])
        })
    }

    /// Either access, by flag.
    pub fn access_rw(
        &self,
        ioas: IoasId,
        iova: u64,
        buf: &mut [u8],
        flags: AccessFlags,
        mem: &dyn UserMemory,
    ) -> Result<()> {
        match flags {
            AccessFlags::Read => self.access_read(ioas, iova, buf, mem),
            AccessFlags::Write => self.access_write(ioas, iova, buf, mem),
        }
    }

    /// Recompute an IOAS's alignment from the devices attached to it (the
    /// kernel recomputes it when a domain leaves the io_pagetable).
    fn recalc_alignment(&mut self, ioas: IoasId) {
        let align = self
            .devices
            .values()
            .filter(|d| d.ioas == Some(ioas))
            .map(|d| d.mock.page_size)
            .max()
            .unwrap_or(1);
        if let Some(i) = self.ioas.get_mut(&ioas.0) {
            // Lowering the alignment cannot fail.
            let _ = i.iopt.set_iova_alignment(align);
        }
    }
}

/// `IOMMU_IOAS_MAP`/`COPY` values are `__u64` but the kernel keeps IOVAs and
/// lengths in `unsigned long` and refuses `ULONG_MAX` itself
/// (`iommufd_ioas_map`): `EOVERFLOW`.
fn check_ulong(v: u64) -> Result<()> {
    if v == u64::MAX {
        return Err(IoptError::Overflow);
    }
    Ok(())
}

/// No READ and no WRITE → `EINVAL` (`iommufd_ioas_map`).
fn check_prot(prot: Prot) -> Result<()> {
    if !prot.read && !prot.write {
        return Err(IoptError::Invalid("neither READABLE nor WRITEABLE"));
    }
    Ok(())
}

impl Iommufd for ModelIommufd {
    fn ioas_alloc(&mut self) -> Result<IoasId> {
        // The kernel's object xarray hands out the lowest free ID from 1.
        let id = (1..=u32::MAX)
            .find(|id| !self.ioas.contains_key(id))
            .ok_or(IoptError::NoSpace)?;
        self.ioas.insert(
            id,
            Ioas {
                iopt: IoPagetable::new(),
                huge_pages: 1,
                attached: 0,
            },
        );
        Ok(IoasId(id))
    }

    fn ioas_destroy(&mut self, ioas: IoasId) -> Result<()> {
        if self.get(ioas)?.attached > 0 {
            return Err(IoptError::Busy);
        }
        self.ioas.remove(&ioas.0);
        Ok(())
    }

    fn iova_ranges(&self, ioas: IoasId, out: &mut [IovaRange]) -> Result<IovaRanges> {
        let iopt = &self.get(ioas)?.iopt;
        let mut n: u32 = 0;
        iopt.usable_ranges(|r| {
            if let Some(slot) = out.get_mut(n as usize) {
                *slot = r;
            }
            n += 1;
        });
        if n as usize > out.len() {
            return Err(IoptError::MessageSize { needed: n });
        }
        Ok(IovaRanges {
            num_iovas: n,
            out_iova_alignment: iopt.iova_alignment(),
        })
    }

    fn allow_iovas(&mut self, ioas: IoasId, allowed: &[IovaRange]) -> Result<()> {
        self.get_mut(ioas)?.iopt.set_allowed(allowed)
    }

    fn map(&mut self, ioas: IoasId, req: MapRequest) -> Result<u64> {
        check_ulong(req.iova.unwrap_or(0))?;
        check_ulong(req.length)?;
        check_prot(req.prot)?;
        let iopt = &mut self.get_mut(ioas)?.iopt;
        // iopt_alloc_pages(): the user range itself.
        if req.length == 0 || req.length > u64::MAX - PAGE_SIZE {
            return Err(IoptError::Invalid("bad length"));
        }
        req.user_va
            .checked_add(req.length)
            .ok_or(IoptError::Overflow)?;
        let seg = [Segment {
            user_va: req.user_va,
            length: req.length,
            writable_pages: req.prot.write,
        }];
        iopt.map_pages(req.iova, &seg, req.prot)
    }

    fn copy(&mut self, req: CopyRequest) -> Result<u64> {
        check_ulong(req.length)?;
        check_ulong(req.src_iova)?;
        check_ulong(req.dst_iova.unwrap_or(0))?;
        check_prot(req.prot)?;
        let segments = self
            .get(req.src_ioas)?
            .iopt
            .get_pages(req.src_iova, req.length)?;
        self.get_mut(req.dst_ioas)?
            .iopt
            .map_pages(req.dst_iova, &segments, req.prot)
    }

    fn unmap(&mut self, ioas: IoasId, iova: u64, length: u64) -> Result<u64> {
        let iopt = &mut self.get_mut(ioas)?.iopt;
        if iova == 0 && length == u64::MAX {
            return Ok(iopt.unmap_all());
        }
        check_ulong(iova)?;
        check_ulong(length)?;
        let (n, r) = iopt.unmap(iova, length);
        r.map(|()| n)
    }

    /// `IOMMU_OPTION` (`iommufd_option_rlimit_mode`, `iommufd_ioas_option`):
    /// the accounting mode can be set only while the iommufd holds no
    /// objects (IOAS or bound device) → `EBUSY`, checked before the value.
    fn option(&mut self, option: IommuOption, op: OptionOp) -> Result<u64> {
        if option == IommuOption::RlimitMode
            && matches!(op, OptionOp::Set(_))
            && !(self.ioas.is_empty() && self.devices.is_empty())
        {
            return Err(IoptError::Busy);
        }
        let slot = match option {
            IommuOption::RlimitMode => &mut self.rlimit_mode,
            IommuOption::HugePages(ioas) => &mut self.get_mut(ioas)?.huge_pages,
        };
        match op {
            OptionOp::Get => Ok(*slot),
            OptionOp::Set(v) if v <= 1 => {
                *slot = v;
                Ok(v)
            }
            OptionOp::Set(_) => Err(IoptError::Invalid("option value must be 0 or 1")),
        }
    }

    fn attach(&mut self, dev: DeviceId, ioas: IoasId) -> Result<()> {
        let d = self
            .devices
            .get(&dev)
            .ok_or(IoptError::NotFound("no such device"))?
            .clone();
        if d.ioas == Some(ioas) {
            return Ok(());
        }
        let target = self.get_mut(ioas)?;
        // iopt_table_enforce_dev_resv_regions + the domain's aperture, then
        // the domain's page size; undo everything on failure.
        let before = target.iopt.clone();
        let result = (|| {
            for r in d.mock.reservations() {
                target.iopt.reserve(r, dev)?;
            }
            let align = target.iopt.iova_alignment().max(d.mock.page_size);
            target.iopt.set_iova_alignment(align)
        })();
        if let Err(e) = result {
            target.iopt = before;
            return Err(e);
        }
        target.attached += 1;
        // Attaching elsewhere replaces the old attachment
        // (VFIO_DEVICE_ATTACH_IOMMUFD_PT on an attached device).
        if let Some(old) = d.ioas {
            self.leave(dev, old);
        }
        if let Some(d) = self.devices.get_mut(&dev) {
            d.ioas = Some(ioas);
        }
        Ok(())
    }

    fn detach(&mut self, dev: DeviceId) -> Result<()> {
        let d = self
            .devices
            .get_mut(&dev)
            .ok_or(IoptError::NotFound("no such device"))?;
        // Detaching a device that is not attached succeeds, as
        // VFIO_DEVICE_DETACH_IOMMUFD_PT does.
        if let Some(old) = d.ioas.take() {
            self.leave(dev, old);
        }
        Ok(())
    }

    fn device_iova_ranges(&mut self, dev: DeviceId) -> Result<Vec<IovaRange>> {
        let d = self
            .devices
            .get(&dev)
            .ok_or(IoptError::NotFound("no such device"))?;
        let mut scratch = IoPagetable::new();
        for r in d.mock.reservations() {
            scratch.reserve(r, dev)?;
        }
        let mut v = Vec::new();
        scratch.usable_ranges(|r| v.push(r));
        Ok(v)
    }
}

impl ModelIommufd {
    /// Take `dev` out of `ioas`: its reserved ranges go, the alignment is
    /// recomputed.
    fn leave(&mut self, dev: DeviceId, ioas: IoasId) {
        if let Some(d) = self.devices.get_mut(&dev) {
            if d.ioas == Some(ioas) {
                d.ioas = None;
            }
        }
        if let Some(i) = self.ioas.get_mut(&ioas.0) {
            i.iopt.release_reserved(dev);
            i.attached = i.attached.saturating_sub(1);
        }
        self.recalc_alignment(ioas);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The conformance suite, against the model.
    #[test]
    fn model_passes_the_conformance_suite() {
        let report = crate::conformance::run_all(&crate::conformance::ModelFixture);
        report.assert_all_passed();
        // The model has a device, so no case may be skipped.
        assert_eq!(report.counts(), (crate::conformance::CASES.len(), 0, 0));
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
            fn open(&self) -> crate::conformance::Session {
                crate::conformance::Session {
                    fd: Box::new(Forgetful(ModelIommufd::new())),
                    device: None,
                }
            }
        }
        #[derive(Debug)]
        struct Forgetful(ModelIommufd);
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
}
