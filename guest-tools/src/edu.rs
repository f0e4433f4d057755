// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! QEMU's `edu` device (hw/misc/edu.c, docs/specs/edu.rst): BAR0 registers
//! and a DMA engine that copies between a 4 KiB buffer inside the device
//! (at device address 0x40000) and bus addresses (28 bits by default).

use std::io;
use std::time::{Duration, Instant};

/// Register offsets in BAR0.
pub const REG_ID: u64 = 0x00;
pub const REG_DMA_SRC: u64 = 0x80;
pub const REG_DMA_DST: u64 = 0x88;
pub const REG_DMA_COUNT: u64 = 0x90;
pub const REG_DMA_CMD: u64 = 0x98;
/// `DMA_CMD` bits: start (cleared when done), direction edu → RAM.
pub const CMD_START: u64 = 1;
pub const CMD_TO_RAM: u64 = 2;
/// The device-side DMA buffer.
pub const EDU_BUFFER: u64 = 0x40000;
pub const EDU_BUFFER_LEN: u64 = 4096;
/// The device's default DMA mask: addresses must fit in 28 bits.
pub const DMA_LIMIT: u64 = 1 << 28;

/// BAR0 access, however the caller reaches it.
pub trait Bar {
    fn read32(&self, off: u64) -> io::Result<u32>;
    fn write64(&self, off: u64, v: u64) -> io::Result<()>;
    fn read64(&self, off: u64) -> io::Result<u64>;
}

/// Which way a DMA copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Bus address (RAM) → the device buffer.
    FromRam,
    /// The device buffer → bus address (RAM).
    ToRam,
}

/// Check the ID register (0x010000ed: version 1.0, "ed").
pub fn check_id(bar: &dyn Bar) -> io::Result<u32> {
    let id = bar.read32(REG_ID)?;
    if id & 0xff != 0xed {
        return Err(io::Error::other(format!("not an edu device: id {id:#x}")));
    }
    Ok(id)
}

/// Run one DMA of `len` bytes between bus address `addr` and the device
/// buffer, and wait until the engine reports it done.
pub fn dma(bar: &dyn Bar, dir: Direction, addr: u64, len: u64) -> io::Result<()> {
    if len > EDU_BUFFER_LEN || addr >= DMA_LIMIT {
        return Err(io::Error::other("edu DMA out of range"));
    }
    let (src, dst, cmd) = match dir {
        Direction::FromRam => (addr, EDU_BUFFER, CMD_START),
        Direction::ToRam => (EDU_BUFFER, addr, CMD_START | CMD_TO_RAM),
    };
    bar.write64(REG_DMA_SRC, src)?;
    bar.write64(REG_DMA_DST, dst)?;
    bar.write64(REG_DMA_COUNT, len)?;
    bar.write64(REG_DMA_CMD, cmd)?;
    let start = Instant::now();
    while bar.read64(REG_DMA_CMD)? & CMD_START != 0 {
        if start.elapsed() > Duration::from_secs(10) {
            return Err(io::Error::other("edu DMA did not complete"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}
