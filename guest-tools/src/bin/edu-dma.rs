// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest test 4 (issue 4): a guest program maps a buffer through VFIO
//! (type1), runs edu DMA both ways and checks the data; after unmapping, a
//! DMA must not touch the buffer (the vIOMMU refuses it and reports a fault
//! to the guest, which the test script looks for in dmesg).
//!
//! The nested test bed (issue 12) runs it in the second-level guest, whose
//! edu devices are the first level's, given to it with QEMU's vfio-pci:
//!
//! ```text
//! usage: edu-dma [BDF]              the guest test 4 sequence (default: the first 1234:11e8)
//!        edu-dma suite BDF1 BDF2    exact placement, UNMAP, read-only, two domains
//!        edu-dma rates BDF          map/unmap rate; DMA throughput with a map/unmap per transfer
//!        edu-dma hold BDF           keep a mapping and DMA into it until the DMA stops
//!                                   landing (the vIOMMU went away), then wait to be killed
//!        edu-dma identity BDF       no driver, group in an identity domain: DMA to
//!                                   guest-physical addresses, in and outside RAM
//!        edu-dma detached BAR0      the device removed from Linux (virtio-iommu DETACH):
//!                                   its DMA, started through /dev/mem at BAR0, lands nowhere
//!        edu-dma [COMMAND] --help   the same in more words; exit status 2 for bad arguments
//! ```
//! Checks print `VUI-CHECK <name> ok|<what went wrong>`, figures `VUI-LOG`.
//!
//! `identity` and `detached` cannot use VFIO (it would put the device in a
//! domain of its own): they reach BAR0 with mmap (sysfs `resource0`, or
//! `/dev/mem` once the device is gone from sysfs) and DMA to physical
//! addresses of mlocked pages, read from `/proc/self/pagemap`.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use guest_tools::edu::{self, Direction};
use guest_tools::vfio::{FileBar, Type1};

const IOVA: u64 = 0x10_0000;
const LEN: u64 = 4096;
const PAGE: usize = 4096;

fn find_edu() -> Option<String> {
    for e in std::fs::read_dir("/sys/bus/pci/devices").ok()? {
        let p = e.ok()?.path();
        let id = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
        if id("vendor").trim() == "0x1234" && id("device").trim() == "0x11e8" {
            return Some(p.file_name()?.to_str()?.to_string());
        }
    }
    None
}

/// Page-aligned memory of this process, `pages` pages.
struct Pages {
    mem: Vec<u8>,
    off: usize,
    pages: usize,
}

impl Pages {
    fn new(pages: usize) -> Self {
        let mem = vec![0u8; (pages + 1) * PAGE];
        let off = mem.as_ptr().align_offset(PAGE);
        Self { mem, off, pages }
    }
    fn page(&mut self, i: usize) -> &mut [u8] {
        assert!(i < self.pages);
        let s = self.off + i * PAGE;
        &mut self.mem[s..s + PAGE]
    }
    fn vaddr(&self, i: usize) -> u64 {
        self.mem[self.off + i * PAGE..].as_ptr() as u64
    }
    fn all(&mut self) -> &mut [u8] {
        let s = self.off;
        &mut self.mem[s..s + self.pages * PAGE]
    }
}

/// One edu device in its own VFIO type1 container (its own domain).
struct Edu {
    bdf: String,
    vfio: Type1,
    base: u64,
}

impl Edu {
    fn open(bdf: &str) -> std::io::Result<Self> {
        let vfio = Type1::open(bdf)?;
        vfio.enable_bus_master()?;
        let base = vfio.region_offset(0)?;
        let e = Self {
            bdf: bdf.to_string(),
            vfio,
            base,
        };
        println!("EDU: {bdf} id {:#x}", edu::check_id(&e.bar())?);
        Ok(e)
    }
    fn bar(&self) -> FileBar<'_> {
        FileBar {
            file: self.vfio.device(),
            base: self.base,
        }
    }
    fn dma(&self, dir: Direction, iova: u64, len: u64) -> std::io::Result<()> {
        edu::dma(&self.bar(), dir, iova, len)
    }
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..PAGE)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

fn check(name: &str, ok: bool, bad: &str) -> bool {
    println!("VUI-CHECK {name} {}", if ok { "ok" } else { bad });
    ok
}

/// The guest test 4 sequence.
fn basic(bdf: Option<String>) -> std::io::Result<bool> {
    let bdf = match bdf.or_else(find_edu) {
        Some(b) => b,
        None => return Err(std::io::Error::other("no edu device")),
    };
    let vfio = Type1::open(&bdf)?;
    vfio.enable_bus_master()?;
    let bar = FileBar {
        file: vfio.device(),
        base: vfio.region_offset(0)?,
    };
    println!("EDU: {bdf} id {:#x}", edu::check_id(&bar)?);

    // A page-aligned buffer in this process.
    let mut mem = vec![0u8; 2 * LEN as usize];
    let off = mem.as_ptr().align_offset(LEN as usize);
    let buf = &mut mem[off..off + LEN as usize];
    let vaddr = buf.as_ptr() as u64;
    vfio.map_dma(vaddr, IOVA, LEN, true)?;
    println!("EDU: mapped {LEN:#x} bytes at IOVA {IOVA:#x}");

    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i * 7 + 3) as u8;
    }
    let pattern = buf.to_vec();
    edu::dma(&bar, Direction::FromRam, IOVA, LEN)?;
    buf.fill(0);
    edu::dma(&bar, Direction::ToRam, IOVA, LEN)?;
    let both_ways = buf == pattern.as_slice();
    println!(
        "VUI-CHECK edu-dma-both-ways {}",
        if both_ways { "ok" } else { "MISMATCH" }
    );

    vfio.unmap_dma(IOVA, LEN)?;
    buf.fill(0x55);
    edu::dma(&bar, Direction::ToRam, IOVA, LEN)?;
    let untouched = buf.iter().all(|&b| b == 0x55);
    println!(
        "VUI-CHECK edu-after-unmap {}",
        if untouched { "untouched" } else { "WRITTEN" }
    );
    Ok(both_ways && untouched)
}

/// The IOVAs of the suite: away from 0 and from each other, below the
/// edu's 28-bit DMA limit.
const EXACT: u64 = 0x0123_0000;
const RO: u64 = 0x0234_0000;
const SHARED: u64 = 0x0345_0000;
const ONLY_A: u64 = 0x0456_0000;

/// Exact placement, nothing after UNMAP, read-only, two domains.
fn suite(a: &str, b: &str) -> std::io::Result<bool> {
    let ea = Edu::open(a)?;
    let eb = Edu::open(b)?;
    let mut ok = true;

    // Exact placement: three pages mapped at three consecutive IOVAs; a DMA
    // into the middle one, at an offset, changes exactly those bytes.
    let mut m = Pages::new(3);
    m.all().fill(0x11);
    for i in 0..3 {
        ea.vfio
            .map_dma(m.vaddr(i), EXACT + (i as u64) * LEN, LEN, true)?;
    }
    let src = pattern(3);
    m.page(1).copy_from_slice(&src);
    ea.dma(Direction::FromRam, EXACT + LEN, LEN)?;
    m.all().fill(0x11);
    let (off, len) = (0x100usize, 0x200usize);
    ea.dma(Direction::ToRam, EXACT + LEN + off as u64, len as u64)?;
    let all = m.all().to_vec();
    let changed: Vec<usize> = (0..all.len()).filter(|&i| all[i] != 0x11).collect();
    let want_lo = PAGE + off;
    let exact = all[want_lo..want_lo + len] == src[..len]
        && changed
            .iter()
            .all(|&i| (want_lo..want_lo + len).contains(&i));
    println!(
        "VUI-LOG nested: DMA of {len:#x} bytes to IOVA {:#x}: bytes changed at buffer offsets {:#x}..{:#x} (want {want_lo:#x}..{:#x})",
        EXACT + LEN + off as u64,
        changed.first().copied().unwrap_or(0),
        changed.last().map_or(0, |l| l + 1),
        want_lo + len
    );
    ok &= check("nested-dma-lands-exactly", exact, "MISPLACED");

    // After UNMAP of the middle page, a DMA to it lands nowhere.
    ea.vfio.unmap_dma(EXACT + LEN, LEN)?;
    m.all().fill(0x55);
    println!("VUI-LOG nested: DMA to unmapped IOVA {:#x}", EXACT + LEN);
    ea.dma(Direction::ToRam, EXACT + LEN, LEN)?;
    let untouched = m.all().iter().all(|&x| x == 0x55);
    ok &= check("nested-after-unmap-untouched", untouched, "WRITTEN");
    ea.vfio.unmap_dma(EXACT, LEN)?;
    ea.vfio.unmap_dma(EXACT + 2 * LEN, LEN)?;

    // Read-only: the device reads it, its writes are refused.
    let mut r = Pages::new(2);
    let ro_src = pattern(9);
    r.page(0).copy_from_slice(&ro_src);
    ea.vfio.map_dma(r.vaddr(0), RO, LEN, false)?;
    ea.vfio.map_dma(r.vaddr(1), RO + LEN, LEN, true)?;
    ea.dma(Direction::FromRam, RO, LEN)?;
    ea.dma(Direction::ToRam, RO + LEN, LEN)?;
    let readable = r.page(1) == ro_src.as_slice();
    ok &= check("nested-read-only-readable", readable, "UNREADABLE");
    let edu_pattern = pattern(5);
    r.page(1).copy_from_slice(&edu_pattern);
    ea.dma(Direction::FromRam, RO + LEN, LEN)?;
    println!("VUI-LOG nested: device write to read-only IOVA {RO:#x}");
    ea.dma(Direction::ToRam, RO, LEN)?;
    let refused = r.page(0) == ro_src.as_slice();
    ok &= check("nested-read-only-refuses-writes", refused, "WRITTEN");
    ea.vfio.unmap_dma(RO, 2 * LEN)?;

    // Two domains: the same IOVA maps a different page in each container;
    // an IOVA mapped only in A's is nothing for B.
    let mut d = Pages::new(3);
    d.all().fill(0);
    ea.vfio.map_dma(d.vaddr(0), SHARED, LEN, true)?;
    eb.vfio.map_dma(d.vaddr(1), SHARED, LEN, true)?;
    ea.vfio.map_dma(d.vaddr(2), ONLY_A, LEN, true)?;
    let (pa, pb) = (pattern(21), pattern(42));
    d.page(0).copy_from_slice(&pa);
    ea.dma(Direction::FromRam, SHARED, LEN)?;
    d.page(1).copy_from_slice(&pb);
    eb.dma(Direction::FromRam, SHARED, LEN)?;
    d.all().fill(0);
    ea.dma(Direction::ToRam, SHARED, LEN)?;
    eb.dma(Direction::ToRam, SHARED, LEN)?;
    let split = d.page(0) == pa.as_slice() && d.page(1) == pb.as_slice();
    println!(
        "VUI-LOG nested: {} and {} each DMA to IOVA {SHARED:#x}; device {} to IOVA {ONLY_A:#x} (mapped only for {})",
        ea.bdf, eb.bdf, eb.bdf, ea.bdf
    );
    eb.dma(Direction::ToRam, ONLY_A, LEN)?;
    let isolated = split && d.page(2).iter().all(|&x| x == 0);
    ok &= check("nested-domains-isolated", isolated, "LEAKED");
    ea.vfio.unmap_dma(SHARED, LEN)?;
    ea.vfio.unmap_dma(ONLY_A, LEN)?;
    eb.vfio.unmap_dma(SHARED, LEN)?;
    Ok(ok)
}

/// Map/unmap rate, and DMA throughput with and without a map/unmap per
/// transfer. Each edu DMA takes at least 100 ms of virtual time (the
/// device completes it from a timer), which bounds the throughput.
fn rates(bdf: &str) -> std::io::Result<bool> {
    let e = Edu::open(bdf)?;
    let mut p = Pages::new(1);
    let v = p.vaddr(0);
    let budget = Duration::from_secs(2);
    let start = Instant::now();
    let mut pairs = 0u32;
    while pairs < 500 && start.elapsed() < budget {
        e.vfio.map_dma(v, IOVA, LEN, true)?;
        e.vfio.unmap_dma(IOVA, LEN)?;
        pairs += 1;
    }
    let t = start.elapsed().as_secs_f64();
    println!(
        "VUI-LOG nested-rate map+unmap: {pairs} pairs in {t:.2} s = {:.0} pairs/s ({:.0} us per pair)",
        f64::from(pairs) / t,
        t * 1e6 / f64::from(pairs)
    );
    let n = 6u32;
    p.page(0).copy_from_slice(&pattern(1));
    let start = Instant::now();
    for _ in 0..n {
        e.vfio.map_dma(v, IOVA, LEN, true)?;
        e.dma(Direction::FromRam, IOVA, LEN)?;
        e.vfio.unmap_dma(IOVA, LEN)?;
    }
    let with = start.elapsed().as_secs_f64();
    e.vfio.map_dma(v, IOVA, LEN, true)?;
    let start = Instant::now();
    for _ in 0..n {
        e.dma(Direction::FromRam, IOVA, LEN)?;
    }
    let without = start.elapsed().as_secs_f64();
    e.vfio.unmap_dma(IOVA, LEN)?;
    let kib = f64::from(n) * LEN as f64 / 1024.0;
    println!(
        "VUI-LOG nested-rate dma 4KiB with map+unmap each: {n} in {with:.2} s = {:.1} KiB/s ({:.1} ms per transfer)",
        kib / with,
        with * 1e3 / f64::from(n)
    );
    println!(
        "VUI-LOG nested-rate dma 4KiB, one mapping: {n} in {without:.2} s = {:.1} KiB/s ({:.1} ms per transfer; the edu device completes a DMA after 100 ms)",
        kib / without,
        without * 1e3 / f64::from(n)
    );
    Ok(true)
}

/// Keep a mapping; DMA into it until the DMA stops landing. Never returns
/// normally: closing the container would send UNMAPs to a vIOMMU that may
/// be gone, so the caller powers the guest off around it.
fn hold(bdf: &str) -> std::io::Result<bool> {
    let e = Edu::open(bdf)?;
    let mut p = Pages::new(1);
    e.vfio.map_dma(p.vaddr(0), IOVA, LEN, true)?;
    let src = pattern(77);
    p.page(0).copy_from_slice(&src);
    e.dma(Direction::FromRam, IOVA, LEN)?;
    p.page(0).fill(0);
    e.dma(Direction::ToRam, IOVA, LEN)?;
    let mapped = p.page(0) == src.as_slice();
    check("nested-hold-mapped", mapped, "MISMATCH");
    println!("VUI-LOG nested-hold: mapped at IOVA {IOVA:#x}, waiting for the vIOMMU to go");
    let start = Instant::now();
    let mut gone = false;
    while start.elapsed() < Duration::from_secs(90) {
        p.page(0).fill(0x55);
        e.dma(Direction::ToRam, IOVA, LEN)?;
        if p.page(0).iter().all(|&x| x == 0x55) {
            gone = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "VUI-LOG nested-hold: DMA stopped landing after {:.1} s",
        start.elapsed().as_secs_f64()
    );
    check(
        "nested-vanished-viommu-unmaps",
        mapped && gone,
        "STILL-MAPPED",
    );
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Physical memory from userspace: mmap/mlock and `/proc/self/pagemap`.
mod phys {
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;

    use guest_tools::edu::Bar;
    use libc::{mlock, mmap, munmap, MAP_SHARED, PROT_READ, PROT_WRITE};

    /// Device memory mapped from `file` (sysfs `resourceN`, `/dev/mem`),
    /// accessed with single volatile loads and stores of the register's
    /// width (the edu device takes 4- and 8-byte accesses only).
    #[derive(Debug)]
    pub struct Mmio {
        ptr: *mut u8,
        len: usize,
    }

    impl Mmio {
        /// Map `len` bytes of `file` at `offset` (page-aligned), shared.
        pub fn map(file: &File, offset: u64, len: usize) -> io::Result<Self> {
            let off = libc::off_t::try_from(offset).map_err(io::Error::other)?;
            // SAFETY: a fresh mapping chosen by the kernel (addr NULL); the
            // result is checked before use and unmapped on drop.
            let ptr = unsafe {
                mmap(
                    std::ptr::null_mut(),
                    len,
                    PROT_READ | PROT_WRITE,
                    MAP_SHARED,
                    file.as_raw_fd(),
                    off,
                )
            };
            if ptr as isize == -1 {
                let e = io::Error::last_os_error();
                return Err(io::Error::new(e.kind(), format!("mmap {offset:#x}: {e}")));
            }
            Ok(Self {
                ptr: ptr.cast(),
                len,
            })
        }

        fn at<T>(&self, off: u64) -> io::Result<*mut T> {
            let off = usize::try_from(off).map_err(io::Error::other)?;
            if off % std::mem::align_of::<T>() != 0 || off + std::mem::size_of::<T>() > self.len {
                return Err(io::Error::other(format!(
                    "register {off:#x} out of the mapping"
                )));
            }
            // SAFETY: in bounds of the mapping (checked above).
            Ok(unsafe { self.ptr.add(off) }.cast())
        }
    }

    impl Drop for Mmio {
        fn drop(&mut self) {
            // SAFETY: the mapping made in `map`, no reference into it outlives self.
            unsafe { munmap(self.ptr.cast(), self.len) };
        }
    }

    impl Bar for Mmio {
        fn read32(&self, off: u64) -> io::Result<u32> {
            // SAFETY: aligned and in bounds (`at`); device memory, read once.
            Ok(unsafe { self.at::<u32>(off)?.read_volatile() })
        }
        fn write64(&self, off: u64, v: u64) -> io::Result<()> {
            // SAFETY: aligned and in bounds (`at`); device memory, written once.
            unsafe { self.at::<u64>(off)?.write_volatile(v) };
            Ok(())
        }
        fn read64(&self, off: u64) -> io::Result<u64> {
            // SAFETY: aligned and in bounds (`at`); device memory, read once.
            Ok(unsafe { self.at::<u64>(off)?.read_volatile() })
        }
    }

    /// Keep `len` bytes at `addr` in RAM (and at one physical address:
    /// mlocked pages are not migrated by this minimal kernel, which has no
    /// compaction or NUMA balancing).
    pub fn lock(addr: *const u8, len: usize) -> io::Result<()> {
        // SAFETY: mlock only changes how the kernel treats the range.
        if unsafe { mlock(addr.cast(), len) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The physical address of the (present) page at `vaddr`
    /// (Documentation/admin-guide/mm/pagemap.rst: bit 63 present, bits
    /// 0-54 the page frame number; zero without CAP_SYS_ADMIN).
    pub fn address(vaddr: u64) -> io::Result<u64> {
        const PAGE: u64 = 4096;
        let pagemap = File::open("/proc/self/pagemap")?;
        let mut e = [0u8; 8];
        pagemap.read_exact_at(&mut e, vaddr / PAGE * 8)?;
        let e = u64::from_le_bytes(e);
        let pfn = e & ((1 << 55) - 1);
        if e >> 63 == 0 || pfn == 0 {
            return Err(io::Error::other(format!(
                "no physical address for {vaddr:#x} (pagemap entry {e:#x}; CONFIG_PROC_PAGE_MONITOR and root needed)"
            )));
        }
        Ok(pfn * PAGE + vaddr % PAGE)
    }
}

/// `pages` mlocked pages and their guest-physical addresses.
fn locked(pages: usize) -> io::Result<(Pages, Vec<u64>)> {
    let mut m = Pages::new(pages);
    m.all().fill(0xaa);
    phys::lock(m.all().as_ptr(), pages * PAGE)?;
    let pa = (0..pages)
        .map(|i| phys::address(m.vaddr(i)))
        .collect::<io::Result<Vec<_>>>()?;
    Ok((m, pa))
}

/// The device's PCI command register: memory decoding and bus mastering on
/// (no driver is bound to do it).
fn enable_bus_master(bdf: &str) -> io::Result<()> {
    let config = OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/sys/bus/pci/devices/{bdf}/config"))?;
    let mut cmd = [0u8; 2];
    config.read_exact_at(&mut cmd, 4)?;
    let v = u16::from_le_bytes(cmd) | 0x6;
    config.write_all_at(&v.to_le_bytes(), 4)
}

/// The start of a `/proc/iomem` line's range, its end, and its name.
fn iomem_ranges() -> io::Result<Vec<(u64, u64, String)>> {
    let text = std::fs::read_to_string("/proc/iomem")?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let (range, name) = l.trim().split_once(" : ")?;
            let (a, b) = range.split_once('-')?;
            let a = u64::from_str_radix(a, 16).ok()?;
            let b = u64::from_str_radix(b, 16).ok()?;
            Some((a, b, name.to_string()))
        })
        .collect())
}

/// Bypass identity (virtio 1.2 §5.13.6.3: an endpoint attached to a domain
/// with VIRTIO_IOMMU_ATTACH_F_BYPASS is not translated; Linux 6.12 sends
/// that ATTACH for an identity domain when BYPASS_CONFIG is negotiated): a
/// DMA to guest-physical address X lands exactly at X, and a DMA to an
/// address that is no guest RAM lands in no guest page. The caller put the
/// device's group in an identity domain, with no driver bound.
fn identity(bdf: &str) -> io::Result<bool> {
    enable_bus_master(bdf)?;
    let res = OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/sys/bus/pci/devices/{bdf}/resource0"))?;
    let bar = phys::Mmio::map(&res, 0, PAGE)?;
    println!(
        "EDU: {bdf} id {:#x} (sysfs resource0)",
        edu::check_id(&bar)?
    );
    let (mut m, pa) = locked(2)?;
    let mut ok = true;

    let src = pattern(13);
    m.page(0).copy_from_slice(&src);
    edu::dma(&bar, Direction::FromRam, pa[0], LEN)?;
    m.all().fill(0x11);
    let (off, len) = (0x100usize, 0x200usize);
    edu::dma(&bar, Direction::ToRam, pa[0] + off as u64, len as u64)?;
    let p0 = m.page(0).to_vec();
    let changed: Vec<usize> = (0..PAGE).filter(|&i| p0[i] != 0x11).collect();
    let exact = p0[off..off + len] == src[..len]
        && changed.iter().all(|&i| (off..off + len).contains(&i))
        && m.page(1).iter().all(|&x| x == 0x11);
    println!(
        "VUI-LOG nested: identity DMA of {len:#x} bytes to guest-physical {:#x} (page {:#x}; other page {:#x}): bytes changed at page offsets {:#x}..{:#x} (want {off:#x}..{:#x})",
        pa[0] + off as u64,
        pa[0],
        pa[1],
        changed.first().copied().unwrap_or(0),
        changed.last().map_or(0, |l| l + 1),
        off + len
    );
    ok &= check("nested-bypass-identity", exact, "MISPLACED");

    // Outside RAM: the last page the edu device can address, if it is no
    // System RAM of this guest (nested-l1.sh gives it less than the
    // device's 28 bits). The L1 kernel reports the fault (nested-l1.sh).
    let outside = edu::DMA_LIMIT - LEN;
    let ram = iomem_ranges()?
        .into_iter()
        .filter(|(a, b, name)| name == "System RAM" && *a < outside + LEN && outside <= *b)
        .count();
    if ram > 0 {
        println!("VUI-CHECK nested-bypass-outside-ram-untouched NOT-CHECKED ({outside:#x} is System RAM here: give the guest less memory)");
        return Ok(false);
    }
    m.all().fill(0x22);
    println!("VUI-LOG nested: identity DMA outside guest RAM, to {outside:#x}");
    edu::dma(&bar, Direction::ToRam, outside, LEN)?;
    let untouched = m.all().iter().all(|&x| x == 0x22);
    ok &= check("nested-bypass-outside-ram-untouched", untouched, "WRITTEN");
    // The device still works afterwards: the fault stopped one DMA only.
    m.page(1).fill(0);
    edu::dma(&bar, Direction::ToRam, pa[1], LEN)?;
    let alive = m.page(1) == src.as_slice();
    ok &= check("nested-bypass-after-fault-lands", alive, "LOST");
    Ok(ok)
}

/// Detach blocks (virtio 1.3 §5.13.6.4 DETACH; the device then applies
/// virtio 1.2 §5.13.5: an endpoint in no domain is blocked when `bypass` is 0): the
/// caller removed the device from Linux (sysfs `remove`: Linux 6.12 sends
/// DETACH from viommu_release_device, and only there), so its DMA, started
/// through `/dev/mem` at `bar0`, must land nowhere. The ID register still
/// answering shows that the device itself still works.
fn detached(bar0: u64) -> io::Result<bool> {
    let mem = OpenOptions::new().read(true).write(true).open("/dev/mem")?;
    let bar = phys::Mmio::map(&mem, bar0, PAGE)?;
    println!(
        "EDU: id {:#x} at {bar0:#x} (/dev/mem)",
        edu::check_id(&bar)?
    );
    let (mut m, pa) = locked(1)?;
    m.all().fill(0x55);
    println!(
        "VUI-LOG nested: DMA of the detached endpoint to guest-physical {:#x}",
        pa[0]
    );
    edu::dma(&bar, Direction::ToRam, pa[0], LEN)?;
    let untouched = m.all().iter().all(|&x| x == 0x55);
    Ok(check("nested-detach-blocks", untouched, "WRITTEN"))
}

/// Guest test 4 and the nested test bed's checks: edu DMA through guest
/// VFIO (type1) behind the vIOMMU, and where it lands.
///
/// Without a command: the guest test 4 sequence on BDF (default: the first
/// 1234:11e8), mapping a buffer through VFIO, DMA both ways, and after the
/// UNMAP a DMA that must not touch it. Checks print `VUI-CHECK <name>
/// ok|<what went wrong>`, figures `VUI-LOG`.
///
/// Exit status: 0 if every check passed, 1 if one failed, 2 for bad
/// arguments or an error that stopped the checks (`EDU: error: ...`).
#[derive(Debug, Parser)]
#[command(name = "edu-dma", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// The edu device for the guest test 4 sequence, its PCI address as
    /// sysfs names it (e.g. 0000:00:03.0), bound to vfio-pci [default: the
    /// first 1234:11e8].
    #[arg(value_name = "BDF", value_parser = bdf)]
    bdf: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Exact placement, nothing after UNMAP, read-only, two domains (two
    /// edu devices on vfio-pci).
    Suite {
        /// The first edu device (PCI address, e.g. 0000:00:03.0), on
        /// vfio-pci.
        #[arg(value_name = "BDF1", value_parser = bdf)]
        a: String,
        /// The second, in a domain of its own.
        #[arg(value_name = "BDF2", value_parser = bdf)]
        b: String,
    },
    /// Map/unmap rate; DMA throughput with a map/unmap per transfer.
    Rates {
        /// The edu device (PCI address, e.g. 0000:00:03.0), on vfio-pci.
        #[arg(value_name = "BDF", value_parser = bdf)]
        bdf: String,
    },
    /// Keep a mapping and DMA into it until the DMA stops landing (the
    /// vIOMMU went away), then wait to be killed.
    Hold {
        /// The edu device (PCI address, e.g. 0000:00:03.0), on vfio-pci.
        #[arg(value_name = "BDF", value_parser = bdf)]
        bdf: String,
    },
    /// No driver, the device's group in an identity domain: DMA to
    /// guest-physical addresses, in and outside RAM.
    Identity {
        /// The edu device (PCI address, e.g. 0000:00:03.0), bound to no
        /// driver.
        #[arg(value_name = "BDF", value_parser = bdf)]
        bdf: String,
    },
    /// The device removed from Linux (virtio-iommu DETACH): its DMA,
    /// started through /dev/mem at BAR0, lands nowhere.
    Detached {
        /// The physical address of the device's BAR0, hex (its sysfs
        /// `resource` file's first field, e.g. 0x00000000fea00000).
        #[arg(value_name = "BAR0", value_parser = bar0)]
        bar0: u64,
    },
}

/// A PCI address as sysfs names the device (`DOMAIN:BUS:DEVICE.FUNCTION`,
/// lower-case hex): the name of its directory under /sys/bus/pci/devices.
fn bdf(s: &str) -> Result<String, String> {
    let hex = |p: &str, digits: std::ops::RangeInclusive<usize>| {
        digits.contains(&p.len()) && p.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let fields = s
        .rsplit_once('.')
        .and_then(|(rest, function)| Some((rest.split_once(':')?, function)))
        .and_then(|((domain, rest), function)| Some((domain, rest.split_once(':')?, function)));
    match fields {
        Some((domain, (bus, device), function))
            if hex(domain, 4..=8)
                && hex(bus, 2..=2)
                && hex(device, 2..=2)
                && u8::from_str_radix(device, 16).is_ok_and(|d| d < 0x20)
                && matches!(function, "0" | "1" | "2" | "3" | "4" | "5" | "6" | "7") =>
        {
            Ok(s.to_string())
        }
        _ => Err(
            "want a PCI address as sysfs names it, DOMAIN:BUS:DEVICE.FUNCTION in \
                  lower-case hex (e.g. 0000:00:03.0)"
                .into(),
        ),
    }
}

/// A BAR's physical address: hex, `0x` optional, page-aligned (it is
/// mapped from /dev/mem).
fn bar0(s: &str) -> Result<u64, String> {
    let a = u64::from_str_radix(s.strip_prefix("0x").unwrap_or(s), 16)
        .map_err(|e| format!("want the BAR's physical address in hex: {e}"))?;
    if a == 0 || a % PAGE as u64 != 0 {
        return Err("want the BAR's physical address, non-zero and page-aligned".into());
    }
    Ok(a)
}

fn main() -> ExitCode {
    // --help and --version answer and exit here, bad arguments with status
    // 2: no device has been touched yet.
    let cli = Cli::parse();
    let r = match cli.command {
        Some(Command::Suite { a, b }) => suite(&a, &b),
        Some(Command::Rates { bdf }) => rates(&bdf),
        Some(Command::Hold { bdf }) => hold(&bdf),
        Some(Command::Identity { bdf }) => identity(&bdf),
        Some(Command::Detached { bar0 }) => detached(bar0),
        None => basic(cli.bdf),
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            println!("EDU: error: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("edu-dma").chain(args.split_whitespace()))
    }

    #[test]
    fn each_command_takes_its_devices_as_the_guest_scripts_give_them() {
        Cli::command().debug_assert();
        let cli = parse("").unwrap();
        assert!(cli.command.is_none() && cli.bdf.is_none());
        let cli = parse("0000:00:04.0").unwrap();
        assert_eq!(cli.bdf.as_deref(), Some("0000:00:04.0"));
        assert!(matches!(
            parse("suite 0000:00:03.0 0000:00:04.0").unwrap().command,
            Some(Command::Suite { a, b }) if a == "0000:00:03.0" && b == "0000:00:04.0"
        ));
        for cmd in ["rates", "hold", "identity"] {
            let cli = parse(&format!("{cmd} 0000:01:1f.7")).unwrap();
            let bdf = match cli.command {
                Some(
                    Command::Rates { bdf } | Command::Hold { bdf } | Command::Identity { bdf },
                ) => bdf,
                other => panic!("{cmd}: {other:?}"),
            };
            assert_eq!(bdf, "0000:01:1f.7");
        }
        // nested-l2.sh: the first field of sysfs `resource`.
        assert!(matches!(
            parse("detached 0x00000000fea00000").unwrap().command,
            Some(Command::Detached { bar0: 0xfea0_0000 })
        ));
        assert!(matches!(
            parse("detached fea00000").unwrap().command,
            Some(Command::Detached { bar0: 0xfea0_0000 })
        ));
    }

    #[test]
    fn bad_devices_and_arguments_are_refused_before_anything_runs() {
        let kind = |args: &str| parse(args).unwrap_err().kind();
        assert_eq!(kind("--help"), ErrorKind::DisplayHelp);
        assert_eq!(kind("suite --help"), ErrorKind::DisplayHelp);
        assert_eq!(kind("--version"), ErrorKind::DisplayVersion);
        assert_eq!(kind("--bogus"), ErrorKind::UnknownArgument);
        assert_eq!(
            kind("0000:00:04.0 0000:00:05.0"),
            ErrorKind::ArgumentConflict
        );
        assert_eq!(
            kind("suite 0000:00:04.0"),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(kind("rates"), ErrorKind::MissingRequiredArgument);
        assert_eq!(kind("detached"), ErrorKind::MissingRequiredArgument);
        for bad in [
            "00:04.0",
            "0000:00:04",
            "0000:00:04.8",
            "0000:00:20.0",
            "0000:0:04.0",
            "0000:00:0A.0",
            "../../../x:00:04.0",
            "0000:00:04.0/x",
        ] {
            assert_eq!(kind(bad), ErrorKind::ValueValidation, "{bad}");
            assert_eq!(
                kind(&format!("hold {bad}")),
                ErrorKind::ValueValidation,
                "{bad}"
            );
        }
        for bad in ["xyz", "0x", "0", "0xfea00010", "-1"] {
            assert!(parse(&format!("detached {bad}")).is_err(), "{bad}");
        }
    }
}
