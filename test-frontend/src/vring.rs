// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A split virtqueue, driver side, living in [`GuestRam`].
//!
//! Layout (virtio 1.x, "Split Virtqueues"):
//! - descriptor table: `size` x `{le64 addr, le32 len, le16 flags, le16 next}`, align 16
//! - avail ring: `le16 flags, le16 idx, le16 ring[size], le16 used_event`, align 2
//! - used ring: `le16 flags, le16 idx, {le32 id, le32 len}[size], le16 avail_event`, align 4
//!
//! Free descriptors are tracked host-side (a preallocated stack), so the
//! submit path does not allocate.

use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::ram::{GuestRam, RamError};

/// VRING_DESC_F_NEXT
pub const DESC_F_NEXT: u16 = 1;
/// VRING_DESC_F_WRITE
pub const DESC_F_WRITE: u16 = 2;
/// VRING_DESC_F_INDIRECT
pub const DESC_F_INDIRECT: u16 = 4;
/// VRING_AVAIL_F_NO_INTERRUPT
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// VRING_USED_F_NO_NOTIFY
pub const USED_F_NO_NOTIFY: u16 = 1;

/// One buffer of a descriptor chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    /// Guest-physical address of the buffer.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (VRING_DESC_F_WRITE).
    pub write: bool,
}

impl Desc {
    /// A device-readable buffer.
    pub const fn readable(gpa: u64, len: u32) -> Self {
        Desc {
            gpa,
            len,
            write: false,
        }
    }

    /// A device-writable buffer.
    pub const fn writable(gpa: u64, len: u32) -> Self {
        Desc {
            gpa,
            len,
            write: true,
        }
    }
}

/// Virtqueue errors.
#[derive(Debug, thiserror::Error)]
pub enum VringError {
    /// Guest memory access failed.
    #[error(transparent)]
    Ram(#[from] RamError),
    /// Not enough free descriptors for the chain.
    #[error("virtqueue full: need {need} descriptors, {free} free")]
    Full {
        /// Descriptors needed.
        need: usize,
        /// Descriptors free.
        free: usize,
    },
    /// An empty chain was submitted.
    #[error("empty descriptor chain")]
    EmptyChain,
    /// The device put an id in the used ring that is not an in-flight head.
    #[error("used ring entry names descriptor {id}, which is not an in-flight chain head")]
    BadUsedId {
        /// The id the device wrote.
        id: u32,
    },
    /// The device moved used.idx further than the number of in-flight chains.
    #[error("used.idx advanced by {advance} with only {in_flight} chains in flight")]
    UsedIdxJump {
        /// How far used.idx is ahead of the driver's last seen index.
        advance: u16,
        /// Chains in flight.
        in_flight: u16,
    },
    /// eventfd / poll failure.
    #[error("eventfd: {0}")]
    Io(#[from] std::io::Error),
}

/// `vring_need_event` from the virtio spec: with EVENT_IDX, the other side
/// wants a notification if `event_idx` lies in `[old, new)` (mod 2^16).
pub fn need_event(event_idx: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event_idx).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Guest-physical placement of a split virtqueue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VringAddrs {
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
}

/// Driver side of one split virtqueue.
#[derive(Debug)]
pub struct VirtQueue {
    ram: Arc<GuestRam>,
    size: u16,
    addrs: VringAddrs,
    event_idx: bool,
    /// Host-side free descriptor stack (capacity `size`, never reallocated).
    free: Vec<u16>,
    /// Host-side copy of each descriptor's `next` (valid while in flight).
    next: Vec<u16>,
    /// Number of descriptors in the chain headed by each in-flight head (0 = not a head).
    chain_len: Vec<u16>,
    /// Driver's shadow of avail.idx.
    avail_idx: u16,
    /// avail.idx at the last notification decision.
    kicked_avail_idx: u16,
    /// Next used ring entry to consume.
    last_used_idx: u16,
    in_flight: u16,
    kick: EventFd,
    call: EventFd,
    err: EventFd,
    kicks: u64,
}

impl VirtQueue {
    /// Allocate a queue of `size` entries (a power of two, <= 32768) in `ram`
    /// and zero its rings.
    pub fn new(ram: Arc<GuestRam>, size: u16) -> Result<Self, VringError> {
        assert!(
            size.is_power_of_two() && size <= 32768,
            "bad queue size {size}"
        );
        let n = size as u64;
        let desc = ram.alloc(16 * n, 4096)?;
        let avail = ram.alloc(6 + 2 * n, 2)?;
        let used = ram.alloc(6 + 8 * n, 4096)?;
        ram.fill(desc, 16 * size as usize, 0)?;
        ram.fill(avail, 6 + 2 * size as usize, 0)?;
        ram.fill(used, 6 + 8 * size as usize, 0)?;
        Ok(VirtQueue {
            ram,
            size,
            addrs: VringAddrs { desc, avail, used },
            event_idx: false,
            free: (0..size).rev().collect(),
            next: vec![0; size as usize],
            chain_len: vec![0; size as usize],
            avail_idx: 0,
            kicked_avail_idx: 0,
            last_used_idx: 0,
            in_flight: 0,
            kick: EventFd::new(EFD_NONBLOCK)?,
            call: EventFd::new(EFD_NONBLOCK)?,
            err: EventFd::new(EFD_NONBLOCK)?,
            kicks: 0,
        })
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Where the rings are.
    pub fn addrs(&self) -> VringAddrs {
        self.addrs
    }

    /// The guest RAM the queue lives in.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// Use VIRTIO_RING_F_EVENT_IDX (used_event / avail_event) for
    /// notification suppression. Set before the first submission.
    pub fn set_event_idx(&mut self, on: bool) {
        self.event_idx = on;
    }

    /// Whether EVENT_IDX is in use.
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    /// The kick eventfd (driver -> device), for SET_VRING_KICK.
    pub fn kick_fd(&self) -> &EventFd {
        &self.kick
    }

    /// The call eventfd (device -> driver), for SET_VRING_CALL.
    pub fn call_fd(&self) -> &EventFd {
        &self.call
    }

    /// The error eventfd, for SET_VRING_ERR.
    pub fn err_fd(&self) -> &EventFd {
        &self.err
    }

    /// True if the device signalled the error eventfd (consumes the signal).
    pub fn take_error(&self) -> bool {
        self.err.read().is_ok()
    }

    /// Free descriptors.
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Chains submitted and not yet returned.
    pub fn in_flight(&self) -> u16 {
        self.in_flight
    }

    /// Driver's avail.idx.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Next used index the driver will consume.
    pub fn last_used_idx(&self) -> u16 {
        self.last_used_idx
    }

    /// How many times the kick eventfd was written.
    pub fn kicks(&self) -> u64 {
        self.kicks
    }

    /// GPA of descriptor `i`.
    pub fn desc_gpa(&self, i: u16) -> u64 {
        self.addrs.desc + 16 * i as u64
    }

    /// GPA of `used_event` (in the avail ring).
    pub fn used_event_gpa(&self) -> u64 {
        self.addrs.avail + 4 + 2 * self.size as u64
    }

    /// GPA of `avail_event` (in the used ring).
    pub fn avail_event_gpa(&self) -> u64 {
        self.addrs.used + 4 + 8 * self.size as u64
    }

    /// Read descriptor `i` as `(addr, len, flags, next)`.
    pub fn read_desc(&self, i: u16) -> Result<(u64, u32, u16, u16), VringError> {
        let mut b = [0u8; 16];
        self.ram.read(self.desc_gpa(i), &mut b)?;
        Ok((
            u64::from_le_bytes(b[0..8].try_into().unwrap()),
            u32::from_le_bytes(b[8..12].try_into().unwrap()),
            u16::from_le_bytes(b[12..14].try_into().unwrap()),
            u16::from_le_bytes(b[14..16].try_into().unwrap()),
        ))
    }

    /// Write descriptor `i` verbatim (for malformed-chain tests).
    pub fn write_desc(
        &self,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<(), VringError> {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        self.ram.write(self.desc_gpa(i), &b)?;
        Ok(())
    }

    /// Put a chain in the descriptor table and publish it in the avail ring
    /// (no notification: call [`kick`](Self::kick) or
    /// [`kick_if_needed`](Self::kick_if_needed)). Returns the head index.
    pub fn add_chain(&mut self, chain: &[Desc]) -> Result<u16, VringError> {
        if chain.is_empty() {
            return Err(VringError::EmptyChain);
        }
        if chain.len() > self.free.len() {
            return Err(VringError::Full {
                need: chain.len(),
                free: self.free.len(),
            });
        }
        // Descriptors come off the top of the free stack: chain[k] uses
        // free[top - k], linked to free[top - k - 1].
        let top = self.free.len() - 1;
        let head = self.free[top];
        for (k, d) in chain.iter().enumerate() {
            let idx = self.free[top - k];
            let last = k + 1 == chain.len();
            let next = if last { 0 } else { self.free[top - k - 1] };
            let mut flags = if d.write { DESC_F_WRITE } else { 0 };
            if !last {
                flags |= DESC_F_NEXT;
            }
            self.write_desc(idx, d.gpa, d.len, flags, next)?;
            self.next[idx as usize] = next;
        }
        self.free.truncate(self.free.len() - chain.len());
        self.chain_len[head as usize] = chain.len() as u16;
        self.publish(head)?;
        Ok(head)
    }

    /// Publish `head` in the avail ring and bump avail.idx.
    fn publish(&mut self, head: u16) -> Result<(), VringError> {
        let slot = self.addrs.avail + 4 + 2 * (self.avail_idx % self.size) as u64;
        self.ram.write_u16(slot, head)?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.in_flight += 1;
        // The ring entry must be visible before the index.
        self.ram
            .store_u16_release(self.addrs.avail + 2, self.avail_idx)?;
        Ok(())
    }

    /// Notify the device unconditionally (eventfd write).
    pub fn kick(&mut self) -> Result<(), VringError> {
        self.kicked_avail_idx = self.avail_idx;
        self.kick.write(1)?;
        self.kicks += 1;
        Ok(())
    }

    /// Notify the device if it asked for it: with EVENT_IDX, if avail_event
    /// lies in the entries published since the last decision; without, if
    /// used.flags lacks NO_NOTIFY. Returns whether a kick was sent.
    pub fn kick_if_needed(&mut self) -> Result<bool, VringError> {
        // The avail.idx store must be visible before we read the device's
        // suppression state (pairs with the device's fence after writing it).
        fence(Ordering::SeqCst);
        let old = self.kicked_avail_idx;
        let new = self.avail_idx;
        let needed = if self.event_idx {
            let ev = self.ram.load_u16_acquire(self.avail_event_gpa())?;
            need_event(ev, new, old)
        } else {
            self.ram.load_u16_acquire(self.addrs.used)? & USED_F_NO_NOTIFY == 0
        };
        self.kicked_avail_idx = new;
        if needed {
            self.kick.write(1)?;
            self.kicks += 1;
        }
        Ok(needed)
    }

    /// Device's used.idx.
    pub fn used_idx(&self) -> Result<u16, VringError> {
        Ok(self.ram.load_u16_acquire(self.addrs.used + 2)?)
    }

    /// Consume one used entry: `(head, len)`. Frees the chain's descriptors.
    /// With EVENT_IDX, asks for a notification at the next used entry.
    pub fn pop_used(&mut self) -> Result<Option<(u16, u32)>, VringError> {
        self.take_used(true)
    }

    /// [`pop_used`](Self::pop_used) for a driver that busy-polls the used
    /// ring instead of waiting for notifications, as Linux's virtio-iommu
    /// driver does on its request queue (which has no callback): with
    /// EVENT_IDX, `used_event` is left where it is, so the device stops
    /// signalling the call eventfd once it has passed it. No system call.
    pub fn poll_used(&mut self) -> Result<Option<(u16, u32)>, VringError> {
        self.take_used(false)
    }

    /// Consume one used entry; `rearm`: move `used_event` past it.
    fn take_used(&mut self, rearm: bool) -> Result<Option<(u16, u32)>, VringError> {
        let used_idx = self.used_idx()?;
        let advance = used_idx.wrapping_sub(self.last_used_idx);
        if advance == 0 {
            return Ok(None);
        }
        if advance > self.in_flight {
            return Err(VringError::UsedIdxJump {
                advance,
                in_flight: self.in_flight,
            });
        }
        let elem = self.addrs.used + 4 + 8 * (self.last_used_idx % self.size) as u64;
        let id = self.ram.read_u32(elem)?;
        let len = self.ram.read_u32(elem + 4)?;
        if id >= self.size as u32 || self.chain_len[id as usize] == 0 {
            return Err(VringError::BadUsedId { id });
        }
        self.last_used_idx = self.last_used_idx.wrapping_add(1);
        self.in_flight -= 1;
        let head = id as u16;
        let mut d = head;
        for k in 0..self.chain_len[head as usize] {
            if k > 0 {
                d = self.next[d as usize];
            }
            self.free.push(d);
        }
        self.chain_len[head as usize] = 0;
        if self.event_idx && rearm {
            // Ask for an interrupt at the very next used entry.
            self.ram
                .store_u16_release(self.used_event_gpa(), self.last_used_idx)?;
        }
        Ok(Some((head, len)))
    }

    /// [`pop_used`](Self::pop_used), waiting on the call eventfd up to `timeout`.
    /// `Ok(None)` on timeout.
    pub fn wait_used(&mut self, timeout: Duration) -> Result<Option<(u16, u32)>, VringError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(u) = self.pop_used()? {
                return Ok(Some(u));
            }
            if self.event_idx {
                self.ram
                    .store_u16_release(self.used_event_gpa(), self.last_used_idx)?;
            }
            // used_event must be visible before re-checking used.idx.
            fence(Ordering::SeqCst);
            if let Some(u) = self.pop_used()? {
                return Ok(Some(u));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            poll_readable(self.call.as_raw_fd(), deadline - now)?;
            // Drain the counter; EAGAIN (spurious wake-up / timeout) is fine.
            let _ = self.call.read();
        }
    }
}

/// Wait until `fd` is readable or `timeout` passes.
pub(crate) fn poll_readable(fd: i32, timeout: Duration) -> std::io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: `pfd` is a valid pollfd array of length 1 that outlives the call.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(r > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ram::RegionSpec;

    fn queue(size: u16) -> VirtQueue {
        let ram = Arc::new(GuestRam::new(&[RegionSpec::new(0, 1 << 20)]).unwrap());
        VirtQueue::new(ram, size).unwrap()
    }

    /// Play the device: put `(id, len)` in the used ring and bump used.idx.
    fn device_use(q: &VirtQueue, id: u16, len: u32) {
        let ram = q.ram();
        let idx = ram.read_u16(q.addrs().used + 2).unwrap();
        let elem = q.addrs().used + 4 + 8 * (idx % q.size()) as u64;
        ram.write_u32(elem, id as u32).unwrap();
        ram.write_u32(elem + 4, len).unwrap();
        ram.store_u16_release(q.addrs().used + 2, idx.wrapping_add(1))
            .unwrap();
    }

    /// Play the device: the head published at avail ring slot `i`.
    fn avail_entry(q: &VirtQueue, i: u16) -> u16 {
        q.ram()
            .read_u16(q.addrs().avail + 4 + 2 * (i % q.size()) as u64)
            .unwrap()
    }

    #[test]
    fn ring_placement_and_alignment() {
        let q = queue(256);
        let a = q.addrs();
        assert_eq!(a.desc % 16, 0);
        assert_eq!(a.avail % 2, 0);
        assert_eq!(a.used % 4, 0);
        assert!(a.avail >= a.desc + 16 * 256);
        assert!(a.used >= a.avail + 6 + 2 * 256);
        assert_eq!(q.used_event_gpa(), a.avail + 4 + 512);
        assert_eq!(q.avail_event_gpa(), a.used + 4 + 8 * 256);
        assert!(q.ram().contains(a.used, 6 + 8 * 256));
        assert_ne!(a.desc, 0, "GPA 0 is kept free");
    }

    #[test]
    fn chain_layout() {
        let mut q = queue(8);
        let chain = [
            Desc::readable(0x10000, 20),
            Desc::readable(0x10100, 16),
            Desc::writable(0x10200, 4),
        ];
        let head = q.add_chain(&chain).unwrap();
        assert_eq!(q.avail_idx(), 1);
        assert_eq!(q.ram().read_u16(q.addrs().avail + 2).unwrap(), 1);
        assert_eq!(avail_entry(&q, 0), head);
        assert_eq!(q.num_free(), 5);
        // Walk the chain the way a device would.
        let mut i = head;
        for (k, d) in chain.iter().enumerate() {
            let (addr, len, flags, next) = q.read_desc(i).unwrap();
            assert_eq!((addr, len), (d.gpa, d.len));
            assert_eq!(flags & DESC_F_WRITE != 0, d.write);
            let last = k + 1 == chain.len();
            assert_eq!(flags & DESC_F_NEXT != 0, !last);
            assert_eq!(flags & DESC_F_INDIRECT, 0);
            if !last {
                assert!(next < 8);
                assert_ne!(next, i);
            }
            i = next;
        }
        // A second chain uses different descriptors.
        let head2 = q.add_chain(&[Desc::writable(0x20000, 8)]).unwrap();
        assert_ne!(head2, head);
        assert_eq!(avail_entry(&q, 1), head2);
        assert_eq!(q.in_flight(), 2);
    }

    #[test]
    fn full_and_empty_chains() {
        let mut q = queue(4);
        assert!(matches!(q.add_chain(&[]), Err(VringError::EmptyChain)));
        q.add_chain(&[Desc::readable(0x1000, 1); 3]).unwrap();
        assert!(matches!(
            q.add_chain(&[Desc::readable(0x1000, 1); 2]),
            Err(VringError::Full { need: 2, free: 1 })
        ));
        // A failed add does not consume anything.
        assert_eq!(q.num_free(), 1);
        assert_eq!(q.avail_idx(), 1);
    }

    #[test]
    fn used_ring_reading() {
        let mut q = queue(8);
        assert_eq!(q.pop_used().unwrap(), None);
        let h1 = q
            .add_chain(&[Desc::readable(0x1000, 20), Desc::writable(0x2000, 4)])
            .unwrap();
        let h2 = q
            .add_chain(&[Desc::readable(0x3000, 36), Desc::writable(0x4000, 4)])
            .unwrap();
        assert_eq!(q.num_free(), 4);
        // Out-of-order completion.
        device_use(&q, h2, 4);
        device_use(&q, h1, 3);
        assert_eq!(q.pop_used().unwrap(), Some((h2, 4)));
        assert_eq!(q.pop_used().unwrap(), Some((h1, 3)));
        assert_eq!(q.pop_used().unwrap(), None);
        assert_eq!(q.num_free(), 8);
        assert_eq!(q.in_flight(), 0);
        assert_eq!(q.last_used_idx(), 2);
    }

    #[test]
    fn used_ring_errors() {
        let mut q = queue(8);
        let h = q.add_chain(&[Desc::writable(0x2000, 4)]).unwrap();
        // An id that is not in flight.
        device_use(&q, (h + 1) % 8, 4);
        assert!(matches!(q.pop_used(), Err(VringError::BadUsedId { .. })));
        // An id out of range.
        let mut q = queue(8);
        q.add_chain(&[Desc::writable(0x2000, 4)]).unwrap();
        device_use(&q, 9, 4);
        assert!(matches!(q.pop_used(), Err(VringError::BadUsedId { id: 9 })));
        // used.idx ahead of what is in flight.
        let mut q = queue(8);
        let h = q.add_chain(&[Desc::writable(0x2000, 4)]).unwrap();
        device_use(&q, h, 4);
        device_use(&q, h, 4);
        assert!(matches!(
            q.pop_used(),
            Err(VringError::UsedIdxJump {
                advance: 2,
                in_flight: 1
            })
        ));
    }

    #[test]
    fn indices_wrap_around() {
        let mut q = queue(4);
        for n in 0..70_000u32 {
            let h = q
                .add_chain(&[Desc::readable(0x1000, 4), Desc::writable(0x2000, 4)])
                .unwrap();
            assert_eq!(avail_entry(&q, q.avail_idx().wrapping_sub(1)), h);
            device_use(&q, h, n);
            assert_eq!(q.pop_used().unwrap(), Some((h, n)));
        }
        assert_eq!(q.avail_idx(), (70_000u32 % 65_536) as u16);
        assert_eq!(q.num_free(), 4);
    }

    #[test]
    fn event_idx_math() {
        // Spec examples: notify iff event_idx in [old, new).
        assert!(need_event(0, 1, 0));
        assert!(!need_event(1, 1, 0));
        assert!(need_event(5, 10, 0));
        assert!(!need_event(10, 10, 0));
        assert!(!need_event(4, 10, 5));
        assert!(need_event(5, 10, 5));
        // Wrap-around.
        assert!(need_event(65535, 2, 65534));
        assert!(need_event(0, 2, 65534));
        assert!(!need_event(2, 2, 65534));
        assert!(!need_event(65533, 2, 65534));
        // Nothing new: never notify.
        for e in [0u16, 1, 100, 65535] {
            assert!(!need_event(e, 7, 7));
        }
    }

    #[test]
    fn kick_suppression_with_event_idx() {
        let mut q = queue(8);
        q.set_event_idx(true);
        // avail_event = 0: the device wants to hear about entry 0.
        q.add_chain(&[Desc::writable(0x2000, 4)]).unwrap();
        assert!(q.kick_if_needed().unwrap());
        assert_eq!(q.kicks(), 1);
        assert_eq!(q.kick_fd().read().unwrap(), 1);
        // Device still at avail_event 0: entry 1 is past it, no kick.
        q.add_chain(&[Desc::writable(0x2000, 4)]).unwrap();
        assert!(!q.kick_if_needed().unwrap());
        // Device asks for entry 3; entries 2 and 3 published together.
        q.ram().write_u16(q.avail_event_gpa(), 3).unwrap();
        q.add_chain(&[Desc::writable(0x2000, 4)]).unwrap();
        assert!(!q.kick_if_needed().unwrap());
        q.add_chain(&[Desc::writable(0x2000, 4)]).unwrap();
        assert!(q.kick_if_needed().unwrap());
        assert_eq!(q.kicks(), 2);
    }

    #[test]
    fn kick_suppression_without_event_idx() {
        let mut q = queue(8);
        q.add_chain(&[Desc::writable(0x2000, 4)]).unwrap();
        assert!(q.kick_if_needed().unwrap());
        q.ram().write_u16(q.addrs().used, USED_F_NO_NOTIFY).unwrap();
        q.add_chain(&[Desc::writable(0x2000, 4)]).unwrap();
        assert!(!q.kick_if_needed().unwrap());
        // An explicit kick always goes out.
        q.kick().unwrap();
        assert_eq!(q.kicks(), 2);
    }

    #[test]
    fn used_event_follows_consumption() {
        let mut q = queue(8);
        q.set_event_idx(true);
        let h = q.add_chain(&[Desc::writable(0x2000, 4)]).unwrap();
        device_use(&q, h, 4);
        q.pop_used().unwrap().unwrap();
        assert_eq!(q.ram().read_u16(q.used_event_gpa()).unwrap(), 1);
        // Waiting (with nothing there) re-arms used_event at last_used_idx.
        q.ram().write_u16(q.used_event_gpa(), 0).unwrap();
        assert_eq!(q.wait_used(Duration::from_millis(1)).unwrap(), None);
        assert_eq!(q.ram().read_u16(q.used_event_gpa()).unwrap(), 1);
    }

    #[test]
    fn poll_used_does_not_ask_for_notifications() {
        let mut q = queue(8);
        q.set_event_idx(true);
        for n in 0..3u32 {
            let h = q.add_chain(&[Desc::writable(0x2000, 4)]).unwrap();
            device_use(&q, h, n);
            assert_eq!(q.poll_used().unwrap(), Some((h, n)));
        }
        assert_eq!(q.poll_used().unwrap(), None);
        assert_eq!(q.last_used_idx(), 3);
        assert_eq!(q.num_free(), 8);
        // used_event stayed at 0: a device past it does not signal.
        assert_eq!(q.ram().read_u16(q.used_event_gpa()).unwrap(), 0);
        assert!(!need_event(0, 4, 3));
        // pop_used re-arms it.
        let h = q.add_chain(&[Desc::writable(0x2000, 4)]).unwrap();
        device_use(&q, h, 4);
        q.pop_used().unwrap().unwrap();
        assert_eq!(q.ram().read_u16(q.used_event_gpa()).unwrap(), 4);
    }

    #[test]
    fn wait_used_wakes_on_call() {
        let mut q = queue(8);
        let h = q.add_chain(&[Desc::writable(0x2000, 4)]).unwrap();
        let start = Instant::now();
        assert_eq!(q.wait_used(Duration::from_millis(30)).unwrap(), None);
        assert!(start.elapsed() >= Duration::from_millis(30));

        let ram = q.ram().clone();
        let (used, size) = (q.addrs().used, q.size());
        let call = q.call_fd().try_clone().unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            let elem = used + 4 + 8 * (0 % size) as u64;
            ram.write_u32(elem, h as u32).unwrap();
            ram.write_u32(elem + 4, 4).unwrap();
            ram.store_u16_release(used + 2, 1).unwrap();
            call.write(1).unwrap();
        });
        assert_eq!(q.wait_used(Duration::from_secs(5)).unwrap(), Some((h, 4)));
        t.join().unwrap();
    }
}
