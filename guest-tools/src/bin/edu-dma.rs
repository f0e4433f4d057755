//! Guest test 4 (issue 4): a guest program maps a buffer through VFIO
//! (type1), runs edu DMA both ways and checks the data; after unmapping, a
//! DMA must not touch the buffer (the vIOMMU refuses it and reports a fault
//! to the guest, which the test script looks for in dmesg).
//!
//! usage: edu-dma [BDF]   (default: the first 1234:11e8 device)

use std::process::ExitCode;

use guest_tools::edu::{self, Direction};
use guest_tools::vfio::{FileBar, Type1};

const IOVA: u64 = 0x10_0000;
const LEN: u64 = 4096;

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

fn run() -> std::io::Result<bool> {
    let bdf = match std::env::args().nth(1).or_else(find_edu) {
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

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            println!("EDU: error: {e}");
            ExitCode::from(2)
        }
    }
}
