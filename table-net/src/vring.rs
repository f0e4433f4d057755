// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A split virtqueue (virtio 1.2 §2.7) whose ring addresses are IOVAs, as
//! vhost-user gives them with `VIRTIO_F_ACCESS_PLATFORM`: every field is
//! read and written through [`Dma`], so through the shared table.

use std::fs::File;
use std::io::Write;

use crate::mem::{Dma, DmaError};

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// One buffer of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// A queue's configuration and position.
#[derive(Debug, Default)]
pub struct Vring {
    pub num: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub last_avail: u16,
    pub used_idx: u16,
    pub kick: Option<File>,
    pub call: Option<File>,
    pub enabled: bool,
    /// Started: it has a kick and its addresses.
    pub ready: bool,
}

impl Vring {
    /// The next available chain: its head and buffers (at most `num`; a
    /// loop or an indirect descriptor, which is not offered, is an error).
    pub fn pop(&mut self, dma: &mut Dma<'_>, out: &mut Vec<Desc>) -> Result<Option<u16>, DmaError> {
        out.clear();
        if self.num == 0 {
            return Ok(None);
        }
        let avail_idx = dma.load_u16(self.avail + 2)?;
        if avail_idx == self.last_avail {
            return Ok(None);
        }
        let slot = u64::from(self.last_avail % self.num);
        let head = u16::from_le_bytes(dma.read_obj::<2>(self.avail + 4 + 2 * slot)?);
        self.last_avail = self.last_avail.wrapping_add(1);
        let mut i = head;
        for _ in 0..self.num {
            if i >= self.num {
                return Err(DmaError::NotRam {
                    gpa: u64::from(i),
                    len: 0,
                });
            }
            let d = dma.read_obj::<16>(self.desc + 16 * u64::from(i))?;
            let flags = u16::from_le_bytes([d[12], d[13]]);
            out.push(Desc {
                addr: u64::from_le_bytes(d[0..8].try_into().unwrap_or_default()),
                len: u32::from_le_bytes(d[8..12].try_into().unwrap_or_default()),
                write: flags & VRING_DESC_F_WRITE != 0,
            });
            if flags & VRING_DESC_F_NEXT == 0 {
                return Ok(Some(head));
            }
            i = u16::from_le_bytes([d[14], d[15]]);
        }
        Err(DmaError::Short(self.desc))
    }

    /// Put `(head, len)` in the used ring (its index is published by
    /// [`Self::publish`]).
    pub fn push_used(&mut self, dma: &mut Dma<'_>, head: u16, len: u32) -> Result<(), DmaError> {
        let slot = u64::from(self.used_idx % self.num);
        let mut e = [0u8; 8];
        e[0..4].copy_from_slice(&u32::from(head).to_le_bytes());
        e[4..8].copy_from_slice(&len.to_le_bytes());
        dma.write(self.used + 4 + 8 * slot, &e)?;
        self.used_idx = self.used_idx.wrapping_add(1);
        Ok(())
    }

    /// Store the used index (release: after the elements) and notify the
    /// driver unless it asked not to be.
    pub fn publish(&mut self, dma: &mut Dma<'_>) -> Result<(), DmaError> {
        dma.store_u16(self.used + 2, self.used_idx)?;
        // The index store must be visible before the flags are read
        // (virtio 1.2 §2.7.7.2): the driver re-enables interrupts, then
        // looks at the used index; without a full fence both sides could
        // miss the other and the last replies would sit in the ring.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let flags = dma.load_u16(self.avail)?;
        if flags & VRING_AVAIL_F_NO_INTERRUPT == 0 {
            if let Some(c) = &self.call {
                let _ = (&*c).write(&1u64.to_ne_bytes());
            }
        }
        Ok(())
    }
}
