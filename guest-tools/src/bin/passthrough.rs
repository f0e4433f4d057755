// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The pass-through test, run inside the iommufd test guest: a kernel with
//! IOMMUFD + VFIO_DEVICE_CDEV, an intel-iommu, two QEMU `edu` devices bound
//! to vfio-pci.
//!
//! The daemon runs in this process in `--mode iommufd` with the two edu
//! devices as endpoints 1 and 2 (each handed over as a dup of the one open
//! file this program also uses for the registers: a VFIO cdev grants access
//! per open file). The Rust test front-end is the VMM and the guest driver:
//! it sends ATTACH/MAP/UNMAP, then drives the edu DMA engines itself, and
//! checks where the data went in its memfd guest RAM. Each check prints
//! `VUI-CHECK pt-<name> ok` or `... FAIL <why>`.
//!
//! usage: passthrough [/dev/vfio/devices/vfioA /dev/vfio/devices/vfioB]
//! (`--help` for more; exit status 2 for bad arguments)

use std::fs::{File, OpenOptions};
use std::os::fd::IntoRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use guest_tools::edu::{self, Direction};
use guest_tools::vfio::{enable_bus_master, region_offset, FileBar};
use test_frontend::wire::{ATTACH_F_BYPASS, MAP_F_READ, MAP_F_WRITE};
use test_frontend::{Status, TestVm, VmOptions};
use vhost_user_iommu::config::{Mode, RawConfig};
use vhost_user_iommu::mirror::MirrorHandle;
use vhost_user_iommu::passthrough;
use vhost_user_iommu::serve::{Server, SocketSource};
use vhost_user_iommu::vhu_iommu::IommuBackend;

const PAGE: u64 = 0x1000;
const EP_A: u32 = 1;
const EP_B: u32 = 2;
/// IOVAs below the edu device's 28-bit DMA mask.
const IOVA_DST: u64 = 0x10_0000;
const IOVA_SRC: u64 = 0x20_0000;
const IOVA_RO: u64 = 0x30_0000;
const IOVA_ONLY_A: u64 = 0x40_0000;
const IOVA_DST2: u64 = 0x50_0000;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// The edu devices bound to vfio-pci, by their cdev nodes.
fn edu_cdevs() -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(devices) = std::fs::read_dir("/sys/bus/pci/devices") else {
        return found;
    };
    for d in devices.flatten() {
        let p = d.path();
        let id = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
        if id("vendor").trim() != "0x1234" || id("device").trim() != "0x11e8" {
            continue;
        }
        if let Ok(nodes) = std::fs::read_dir(p.join("vfio-dev")) {
            for n in nodes.flatten() {
                found.push(Path::new("/dev/vfio/devices").join(n.file_name()));
            }
        }
    }
    found.sort();
    found
}

struct Checks {
    failed: u32,
}

impl Checks {
    fn check(&mut self, name: &str, ok: bool, why: impl FnOnce() -> String) {
        if ok {
            println!("VUI-CHECK pt-{name} ok");
        } else {
            self.failed += 1;
            println!("VUI-CHECK pt-{name} FAIL {}", why());
        }
    }
}

/// One edu device: its BAR0 through the shared VFIO file.
struct Edu<'a> {
    bar: FileBar<'a>,
}

impl<'a> Edu<'a> {
    fn new(file: &'a File) -> Res<Self> {
        enable_bus_master(file)?;
        let bar = FileBar {
            file,
            base: region_offset(file, 0)?,
        };
        edu::check_id(&bar)?;
        Ok(Self { bar })
    }

    fn write_ram(&self, iova: u64) -> Res<()> {
        Ok(edu::dma(&self.bar, Direction::ToRam, iova, PAGE)?)
    }

    fn read_ram(&self, iova: u64) -> Res<()> {
        Ok(edu::dma(&self.bar, Direction::FromRam, iova, PAGE)?)
    }
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..PAGE as usize)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

fn expect_ok(what: &str, s: test_frontend::Result<Status>) -> Res<()> {
    match s? {
        Status::Ok => Ok(()),
        other => Err(format!("{what}: status {other:?}").into()),
    }
}

/// MAP one page, IOVA `iova` → guest page `gpa`, in `domain`; it must succeed.
fn map_page(vm: &mut TestVm, domain: u32, iova: u64, gpa: u64, flags: u32) -> Res<()> {
    let status = vm.map(domain, iova, iova + PAGE - 1, gpa, flags);
    expect_ok(&format!("MAP {iova:#x} in domain {domain}"), status)
}

/// The pass-through test: the daemon in iommufd mode in this process, two
/// edu devices on vfio-pci as its endpoints, driven by the Rust test
/// front-end; each check prints `VUI-CHECK pt-<name> ok` or `... FAIL
/// <why>`.
///
/// Needs a kernel with IOMMUFD and VFIO_DEVICE_CDEV, an IOMMU, and two QEMU
/// edu devices bound to vfio-pci. Exit status: 0 if every check passed, 1
/// if one failed or the test could not be set up, 2 for bad arguments.
#[derive(Debug, Parser)]
#[command(name = "passthrough", version)]
struct Cli {
    /// The first edu device's VFIO cdev node (/dev/vfio/devices/vfioN),
    /// endpoint 1 [default: the edu devices bound to vfio-pci, if there
    /// are two].
    #[arg(value_name = "VFIO_CDEV_A", requires = "b")]
    a: Option<PathBuf>,

    /// The second edu device's, endpoint 2.
    #[arg(value_name = "VFIO_CDEV_B")]
    b: Option<PathBuf>,
}

fn main() -> ExitCode {
    // --help and --version answer and exit here, bad arguments with status
    // 2: no device has been opened yet.
    let cli = Cli::parse();
    match run(cli) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(n) => {
            println!("passthrough: {n} checks failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            println!("VUI-CHECK pt-setup FAIL {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Res<u32> {
    let nodes = match (cli.a, cli.b) {
        (Some(a), Some(b)) => vec![a, b],
        _ => edu_cdevs(),
    };
    let [a, b] = nodes.as_slice() else {
        return Err(format!("need two edu devices on vfio-pci, found {nodes:?}").into());
    };
    println!(
        "passthrough: edu devices {} and {}",
        a.display(),
        b.display()
    );
    let open = |p: &Path| OpenOptions::new().read(true).write(true).open(p);
    let (file_a, file_b) = (open(a)?, open(b)?);

    // The daemon gets its own descriptors of the same open files.
    let (fd_a, fd_b) = (
        file_a.try_clone()?.into_raw_fd(),
        file_b.try_clone()?.into_raw_fd(),
    );
    let config = RawConfig {
        mode: Mode::Iommufd,
        vfio: vec![format!("{EP_A}=fd:{fd_a}"), format!("{EP_B}=fd:{fd_b}")],
        bypass: Some(false),
        ..Default::default()
    }
    .check()?;
    let device = passthrough::device(&config, Path::new("/dev/iommu"))?;
    let backend = IommuBackend::new(device, MirrorHandle::disconnected());
    let socket = PathBuf::from("/tmp/viommu.sock");
    let _ = std::fs::remove_file(&socket);
    let server = Server::bind(&SocketSource::Path(socket.clone()))?;
    let stopper = server.stopper();
    let serving = {
        let backend = backend.clone();
        std::thread::spawn(move || server.run(&backend))
    };

    let mut vm = TestVm::connect(&socket, VmOptions::default())?;
    let cfg = vm.iommu_config()?;
    println!(
        "passthrough: page_size_mask {:#x}, input range {:#x}-{:#x}, bypass {}",
        cfg.page_size_mask, cfg.input_start, cfg.input_end, cfg.bypass
    );
    let (st, resv) = vm.probe(EP_A)?;
    for r in &resv {
        println!(
            "passthrough: PROBE endpoint {EP_A}: RESV_MEM {} {:#x}-{:#x}",
            if r.subtype == 1 { "MSI" } else { "RESERVED" },
            r.start,
            r.end
        );
    }
    let mut c = Checks { failed: 0 };
    c.check(
        "probe-msi-window",
        st == Status::Ok
            && resv
                .iter()
                .any(|r| r.subtype == 1 && r.start == 0xfee0_0000 && r.end == 0xfeef_ffff),
        || format!("status {st:?}, {resv:?}"),
    );

    let edu_a = Edu::new(&file_a)?;
    let edu_b = Edu::new(&file_b)?;
    let ram = vm.ram().clone();
    let alloc = |pages: u64| ram.alloc(pages * PAGE, PAGE);
    let read_page = |gpa: u64| -> Res<Vec<u8>> {
        let mut v = vec![0u8; PAGE as usize];
        ram.read(gpa, &mut v)?;
        Ok(v)
    };
    let zero = vec![0u8; PAGE as usize];

    // 1. Translated DMA both ways, landing at exactly the mapped GPA.
    let p = pattern(3);
    let src = alloc(1)?;
    ram.write(src, &p)?;
    let dst_area = alloc(3)?;
    let dst = dst_area + PAGE;
    expect_ok("ATTACH 1", vm.attach(1, EP_A, 0))?;
    map_page(&mut vm, 1, IOVA_DST, dst, MAP_F_READ | MAP_F_WRITE)?;
    map_page(&mut vm, 1, IOVA_SRC, src, MAP_F_READ)?;
    edu_a.read_ram(IOVA_SRC)?;
    edu_a.write_ram(IOVA_DST)?;
    c.check(
        "device-to-memory",
        read_page(dst)? == p && read_page(dst_area)? == zero && read_page(dst + PAGE)? == zero,
        || "the data is not (only) at the mapped GPA".into(),
    );
    // What the CPU writes at the mapped GPA is what the device reads at
    // the IOVA (seen through a second mapping, since the edu buffer is not
    // readable from the CPU).
    let p2 = pattern(55);
    ram.write(dst, &p2)?;
    let dst2 = alloc(1)?;
    map_page(&mut vm, 1, IOVA_DST2, dst2, MAP_F_READ | MAP_F_WRITE)?;
    edu_a.read_ram(IOVA_DST)?;
    edu_a.write_ram(IOVA_DST2)?;
    c.check("memory-to-device", read_page(dst2)? == p2, || {
        "the device did not read the mapped GPA's data".into()
    });

    // 2. After UNMAP, a DMA to the IOVA touches nothing.
    expect_ok("UNMAP dst", vm.unmap(1, IOVA_DST, IOVA_DST + PAGE - 1))?;
    ram.write(dst, &zero)?;
    edu_a.write_ram(IOVA_DST)?;
    c.check("after-unmap-untouched", read_page(dst)? == zero, || {
        "the DMA wrote to an unmapped IOVA's old page".into()
    });

    // 3. A read-only mapping refuses device writes.
    let ro = alloc(1)?;
    map_page(&mut vm, 1, IOVA_RO, ro, MAP_F_READ)?;
    edu_a.write_ram(IOVA_RO)?;
    c.check("read-only-refuses-writes", read_page(ro)? == zero, || {
        "the device wrote through a read-only mapping".into()
    });

    // 4. Two domains are isolated: the same IOVA goes to each domain's own
    //    page, and an IOVA mapped only in domain 1 is nothing in domain 2.
    let q = pattern(101);
    let (src_b, dst_b, only_a) = (alloc(1)?, alloc(1)?, alloc(1)?);
    ram.write(src_b, &q)?;
    map_page(&mut vm, 1, IOVA_DST, dst, MAP_F_READ | MAP_F_WRITE)?;
    map_page(&mut vm, 1, IOVA_ONLY_A, only_a, MAP_F_READ | MAP_F_WRITE)?;
    expect_ok("ATTACH 2", vm.attach(2, EP_B, 0))?;
    map_page(&mut vm, 2, IOVA_DST, dst_b, MAP_F_READ | MAP_F_WRITE)?;
    map_page(&mut vm, 2, IOVA_SRC, src_b, MAP_F_READ)?;
    edu_b.read_ram(IOVA_SRC)?;
    edu_b.write_ram(IOVA_DST)?;
    edu_b.write_ram(IOVA_ONLY_A)?;
    c.check(
        "domains-isolated",
        read_page(dst_b)? == q && read_page(dst)? == zero && read_page(only_a)? == zero,
        || "a DMA of endpoint 2 reached domain 1's pages".into(),
    );

    // 5. A bypass domain is identity: IOVA = guest physical address. Then
    //    DETACH with bypass off blocks the device.
    let ident = alloc(1)?;
    expect_ok("ATTACH bypass", vm.attach(3, EP_A, ATTACH_F_BYPASS))?;
    edu_a.read_ram(src)?;
    edu_a.write_ram(ident)?;
    c.check("bypass-is-identity", read_page(ident)? == p, || {
        "the DMA did not land at IOVA = GPA".into()
    });
    expect_ok("DETACH", vm.detach(3, EP_A))?;
    ram.write(ident, &zero)?;
    edu_a.write_ram(ident)?;
    c.check("detached-is-blocked", read_page(ident)? == zero, || {
        "a detached device reached guest RAM".into()
    });

    // 6. A second bind of a device the daemon holds is refused, and says why.
    let again = RawConfig {
        mode: Mode::Iommufd,
        vfio: vec![format!("{EP_A}={}", a.display())],
        ..Default::default()
    }
    .check()?;
    match passthrough::device(&again, Path::new("/dev/iommu")) {
        Ok(_) => c.check("second-bind-refused", false, || "it was bound twice".into()),
        Err(e) => {
            let msg = e.to_string();
            println!("passthrough: a second bind: {}", msg.replace('\n', " / "));
            c.check("second-bind-refused", msg.contains("hint:"), || msg.clone());
        }
    }

    // 7. When the front-end goes, its mappings go with it, at once.
    let last = alloc(1)?;
    expect_ok("ATTACH 4", vm.attach(4, EP_A, 0))?;
    map_page(&mut vm, 4, IOVA_DST, last, MAP_F_READ | MAP_F_WRITE)?;
    edu_a.write_ram(IOVA_DST)?;
    let landed = read_page(last)? == p;
    ram.write(last, &zero)?;
    let (model, queues) = backend.stats();
    println!("passthrough: daemon: {model}; {} requests", queues.requests);
    drop(vm);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while backend.with_device(|d| d.stats().domains) > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    edu_a.write_ram(IOVA_DST)?;
    c.check(
        "disconnect-unmaps",
        landed && read_page(last)? == zero,
        || format!("mapped DMA landed: {landed}; after the disconnect the page changed"),
    );
    stopper.stop();
    let _ = serving.join();
    Ok(c.failed)
}

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("passthrough").chain(args.split_whitespace()))
    }

    #[test]
    fn no_devices_or_exactly_two() {
        Cli::command().debug_assert();
        let cli = parse("").unwrap();
        assert_eq!((cli.a, cli.b), (None, None));
        let cli = parse("/dev/vfio/devices/vfio0 /dev/vfio/devices/vfio1").unwrap();
        assert_eq!(
            (cli.a, cli.b),
            (
                Some("/dev/vfio/devices/vfio0".into()),
                Some("/dev/vfio/devices/vfio1".into())
            )
        );
        let kind = |args: &str| parse(args).unwrap_err().kind();
        assert_eq!(kind("--help"), ErrorKind::DisplayHelp);
        assert_eq!(kind("--version"), ErrorKind::DisplayVersion);
        assert_eq!(kind("--bogus"), ErrorKind::UnknownArgument);
        assert_eq!(
            kind("/dev/vfio/devices/vfio0"),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(kind("/dev/a /dev/b /dev/c"), ErrorKind::UnknownArgument);
    }
}
