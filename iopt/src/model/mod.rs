// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The in-process iommufd: [`Iommufd`] over [`IoPagetable`], with mock
//! devices.
//!
//! This is the uAPI layer of `drivers/iommu/iommufd/ioas.c` (argument
//! checks, object lookup) and the attach path of `device.c`, kept thin: the
//! behaviour lives in [`IoPagetable`]. Devices are mocks with an aperture, a
//! list of reserved regions and a minimum page size, like the kernel's
//! `selftest.c` mock domain ([`MockDevice`]). The byte-level uAPI entry
//! point ([`crate::uapi::Ioctl`]) is `ucmd.rs`, over the same methods.
//!
//! Two facts of the host change what the kernel answers, and are the
//! model's options: whether it has transparent huge pages ([`Thp`], see
//! [`ModelIommufd::with_thp`]), and which user memory can be pinned
//! ([`Backing`], see [`ModelIommufd::with_backing`]).

mod mock;
mod ucmd;

use std::collections::BTreeMap;
use std::sync::Arc;

pub use mock::MockDevice;

use crate::io_pagetable::Segment;
use crate::{
    AccessFlags, AllBacked, Backing, CopyRequest, DeviceId, IoPagetable, IoasId, IommuOption,
    Iommufd, IoptError, IovaRange, IovaRanges, MapRequest, OptionOp, Prot, Result, Thp, UserMemory,
    PAGE_SIZE,
};

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
#[derive(Clone, Debug)]
pub struct ModelIommufd {
    ioas: BTreeMap<u32, Ioas>,
    devices: BTreeMap<DeviceId, Device>,
    rlimit_mode: u64,
    thp: Thp,
    /// The memory a pin would find (shared: it describes the process).
    backing: Arc<dyn Backing>,
}

impl Default for ModelIommufd {
    fn default() -> Self {
        Self::new()
    }
}

impl ModelIommufd {
    /// An empty iommufd of a kernel with transparent huge pages, over memory
    /// that is always there ([`AllBacked`]).
    pub fn new() -> Self {
        Self {
            ioas: BTreeMap::new(),
            devices: BTreeMap::new(),
            rlimit_mode: 0,
            thp: Thp::Enabled,
            backing: Arc::new(AllBacked),
        }
    }

    /// The model of a kernel built with or without transparent huge pages
    /// (`CONFIG_TRANSPARENT_HUGEPAGE`: the IOVA allocator's alignment cap).
    /// Applies to IOASes allocated from now on.
    pub fn with_thp(mut self, thp: Thp) -> Self {
        self.thp = thp;
        self
    }

    /// Answer pins from `backing`: with a device attached, memory it says
    /// cannot be pinned makes `IOMMU_IOAS_MAP`/`COPY` and the first attach
    /// fail with `EFAULT`, as the kernel's `pin_user_pages` does.
    pub fn with_backing(mut self, backing: Arc<dyn Backing>) -> Self {
        self.backing = backing;
        self
    }

    /// [`Self::with_backing`] on a model in use: what a pin finds from now
    /// on (the process's memory changed). Areas already mapped are not
    /// checked again, as the kernel keeps the pages it pinned.
    pub fn set_backing(&mut self, backing: Arc<dyn Backing>) {
        self.backing = backing;
    }

    /// Whether the modelled kernel has transparent huge pages.
    pub fn thp(&self) -> Thp {
        self.thp
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

    /// Recompute an IOAS's alignment from the devices attached to it and
    /// its huge pages option (`iopt_calculate_iova_alignment`: `PAGE_SIZE`
    /// at least while huge pages are off, else 1; then the largest minimum
    /// page of the domains). Raising it over a misaligned area →
    /// `EADDRINUSE`, and nothing changes.
    fn recalc_alignment(&mut self, ioas: IoasId) -> Result<()> {
        let align = self
            .devices
            .values()
            .filter(|d| d.ioas == Some(ioas))
            .map(|d| d.mock.page_size)
            .max()
            .unwrap_or(1);
        let i = self.get_mut(ioas)?;
        let floor = if i.huge_pages == 0 { PAGE_SIZE } else { 1 };
        i.iopt.set_iova_alignment(align.max(floor))
    }

    /// `IOMMU_OPTION_HUGE_PAGES` set (`iopt_disable_large_pages`,
    /// `iopt_enable_large_pages`): turning huge pages off raises the IOAS
    /// alignment to `PAGE_SIZE`, and is refused (`EINVAL`) once a device is
    /// attached and something is mapped; turning them on lowers it again.
    fn set_huge_pages(&mut self, ioas: IoasId, value: u64) -> Result<u64> {
        let i = self.get_mut(ioas)?;
        match value {
            0 if i.huge_pages == 0 => return Ok(0),
            0 if i.attached > 0 && i.iopt.areas().next().is_some() => {
                return Err(IoptError::Invalid(
                    "huge pages cannot be turned off with domains holding areas",
                ))
            }
            0 | 1 => {}
            _ => return Err(IoptError::Invalid("option value must be 0 or 1")),
        }
        let before = i.huge_pages;
        i.huge_pages = value;
        if let Err(e) = self.recalc_alignment(ioas) {
            self.get_mut(ioas)?.huge_pages = before;
            return Err(e);
        }
        Ok(value)
    }
}

/// `iommufd_ioas_load_iovas`: each allowed range, in the order given, must
/// have `start < last` (a one-byte range is refused too) and must not
/// overlap one before it, else `EINVAL`. `next` yields the ranges, or the
/// error of reading one. Like the kernel's interval tree, a range is checked
/// against its neighbours only (the ones loaded are disjoint), so a long
/// list costs `n log n`.
fn load_iovas(
    count: usize,
    mut next: impl FnMut(usize) -> Result<IovaRange>,
) -> Result<Vec<IovaRange>> {
    // Keyed by start: the loaded ranges never overlap.
    let mut loaded: BTreeMap<u64, IovaRange> = BTreeMap::new();
    for i in 0..count {
        let r = next(i)?;
        if r.start >= r.last {
            return Err(IoptError::Invalid("allowed range with start >= last"));
        }
        let before = loaded.range(..=r.start).next_back();
        let after = loaded.range(r.start..).next();
        if before.into_iter().chain(after).any(|(_, l)| l.overlaps(&r)) {
            return Err(IoptError::Invalid("allowed ranges overlap"));
        }
        loaded.insert(r.start, r);
    }
    Ok(loaded.into_values().collect())
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
                iopt: IoPagetable::with_thp(self.thp),
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
        let iopt = &mut self.get_mut(ioas)?.iopt;
        let loaded = load_iovas(allowed.len(), |i| Ok(allowed[i]))?;
        iopt.set_allowed(&loaded)
    }

    fn map(&mut self, ioas: IoasId, req: MapRequest) -> Result<u64> {
        check_ulong(req.iova.unwrap_or(0))?;
        check_ulong(req.length)?;
        check_prot(req.prot)?;
        let target = self
            .ioas
            .get_mut(&ioas.0)
            .ok_or(IoptError::NotFound("no such IOAS"))?;
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
        let pin = (target.attached > 0).then_some(&*self.backing);
        target.iopt.map_pages(req.iova, &seg, req.prot, pin)
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
        let dst = self
            .ioas
            .get_mut(&req.dst_ioas.0)
            .ok_or(IoptError::NotFound("no such IOAS"))?;
        let pin = (dst.attached > 0).then_some(&*self.backing);
        dst.iopt.map_pages(req.dst_iova, &segments, req.prot, pin)
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
    /// objects (IOAS or bound device) → `EBUSY`, checked before the value;
    /// huge pages off raises the IOAS alignment to `PAGE_SIZE`
    /// (`iopt_disable_large_pages`, refused with `EINVAL` once a device is
    /// attached and something is mapped), on lowers it again.
    fn option(&mut self, option: IommuOption, op: OptionOp) -> Result<u64> {
        match (option, op) {
            (IommuOption::RlimitMode, OptionOp::Get) => Ok(self.rlimit_mode),
            (IommuOption::RlimitMode, OptionOp::Set(_))
                if !(self.ioas.is_empty() && self.devices.is_empty()) =>
            {
                Err(IoptError::Busy)
            }
            (IommuOption::RlimitMode, OptionOp::Set(v)) if v <= 1 => {
                self.rlimit_mode = v;
                Ok(v)
            }
            (IommuOption::RlimitMode, OptionOp::Set(_)) => {
                Err(IoptError::Invalid("option value must be 0 or 1"))
            }
            (IommuOption::HugePages(ioas), OptionOp::Get) => Ok(self.get(ioas)?.huge_pages),
            (IommuOption::HugePages(ioas), OptionOp::Set(v)) => self.set_huge_pages(ioas, v),
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
        let backing = &*self.backing;
        let target = self
            .ioas
            .get_mut(&ioas.0)
            .ok_or(IoptError::NotFound("no such IOAS"))?;
        // iopt_table_enforce_dev_resv_regions + the domain's aperture, then
        // the domain's page size, then (for the IOAS's first domain) pinning
        // every area (iopt_fill_domain); undo everything on failure.
        let before = target.iopt.clone();
        let first_domain = target.attached == 0;
        let result = (|| {
            for r in d.mock.reservations() {
                target.iopt.reserve(r, dev)?;
            }
            let align = target.iopt.iova_alignment().max(d.mock.page_size);
            target.iopt.set_iova_alignment(align)?;
            if first_domain {
                target.iopt.fill_domain(backing)?;
            }
            Ok(())
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
        // Lowering the alignment cannot fail.
        let _ = self.recalc_alignment(ioas);
    }
}

#[cfg(test)]
mod tests;
