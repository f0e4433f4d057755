// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The request queue's split virtqueue (virtio 1.2 §2.7) and a request's
//! descriptor chain, read and written in place, allocating nothing.
//!
//! virtio-queue's `Queue` reaches guest memory through `GuestMemory` for
//! every ring access and every descriptor (a region lookup, a layered
//! slice iterator and, through vhost-user-backend, a load of the memory
//! map per used element), and its `Reader`/`Writer` collect the buffers of
//! each chain in a heap-allocated queue. On a request path that runs at
//! millions of requests per second those are the costs that matter, so a
//! batch resolves each ring area to the daemon's mapping once
//! ([`SplitQueue`]) and walks chains over that mapping ([`Descs`]); an area
//! that does not lie inside one memory region is reached through
//! `GuestMemory` as before, address by address, with the same checks.
//!
//! The driver's buffers follow virtio 1.2 §2.7.4.2: device-readable
//! descriptors first, then device-writable ones. A chain is refused whole —
//! completed with nothing written — if a descriptor lies outside guest
//! memory or a readable one follows a writable one.

use std::sync::atomic::{fence, Ordering};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::BS;
use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion,
    MemoryRegionAddress, Permissions, VolatileMemory, VolatileSlice,
};

use crate::dirty_log::DirtyLog;
use crate::guest_ram::GuestMem;

/// Why a chain was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("a descriptor lies outside guest memory")]
    OutsideMemory,
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
}

/// What a checked chain holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainLayout {
    /// Bytes copied into the caller's request buffer (at most its size).
    pub request_len: usize,
    /// Device-writable bytes in the chain.
    pub writable: u64,
}

/// Guest memory of one region, as the daemon maps it: its writes mark the
/// dirty log (src/dirty_log.rs).
type Slice<'m> = VolatileSlice<'m, BS<'m, DirtyLog>>;

/// The `len` bytes at `addr`, if they lie inside one region of `mem`.
fn region_slice(mem: &GuestMem, addr: GuestAddress, len: usize) -> Option<Slice<'_>> {
    let region = mem.find_region(addr)?;
    let offset = addr.checked_offset_from(region.start_addr())?;
    region.get_slice(MemoryRegionAddress(offset), len).ok()
}

/// A descriptor's buffer, checked to be guest memory.
enum Buffer<'m> {
    /// Inside one region.
    Mapped(Slice<'m>),
    /// Across adjacent regions (reached through `GuestMemory`), or empty.
    Spanning,
}

/// The buffer of `d` if every byte of it is guest memory (an empty buffer
/// always is, wherever it points).
fn buffer<'m>(mem: &'m GuestMem, d: &Descriptor) -> Option<Buffer<'m>> {
    let len = d.len() as usize;
    if let Some(s) = region_slice(mem, d.addr(), len) {
        return Some(Buffer::Mapped(s));
    }
    let access = if d.is_write_only() {
        Permissions::Write
    } else {
        Permissions::Read
    };
    (len == 0 || GuestMemory::check_range(mem, d.addr(), len, access)).then_some(Buffer::Spanning)
}

/// Check every descriptor of a chain, and copy the start of its readable
/// part into `request` (virtio 1.2 §2.7.4.2: readable descriptors first;
/// every byte of a non-empty buffer must be guest memory).
pub fn read_request<I>(
    descs: I,
    mem: &GuestMem,
    request: &mut [u8],
) -> Result<ChainLayout, ChainError>
where
    I: IntoIterator<Item = Descriptor>,
{
    let mut layout = ChainLayout {
        request_len: 0,
        writable: 0,
    };
    // A zero-length writable descriptor counts too: the order rule is about
    // descriptors, not bytes.
    let mut seen_writable = false;
    for d in descs {
        let buf = buffer(mem, &d).ok_or(ChainError::OutsideMemory)?;
        if d.is_write_only() {
            layout.writable += u64::from(d.len());
            seen_writable = true;
            continue;
        }
        if seen_writable {
            return Err(ChainError::ReadableAfterWritable);
        }
        let room = request.len() - layout.request_len;
        let n = room.min(d.len() as usize);
        if n > 0 {
            let to = &mut request[layout.request_len..layout.request_len + n];
            match buf {
                // n is at most the slice's length: all of `to` is filled.
                Buffer::Mapped(s) => {
                    s.copy_to(to);
                }
                Buffer::Spanning => mem
                    .read_slice(to, d.addr())
                    .map_err(|_| ChainError::OutsideMemory)?,
            }
            layout.request_len += n;
        }
    }
    Ok(layout)
}

/// Write `reply` into the writable part of a chain (checked by
/// [`read_request`]), in order; returns the bytes written.
pub fn write_reply<I>(descs: I, mem: &GuestMem, reply: &[u8]) -> Result<usize, ChainError>
where
    I: IntoIterator<Item = Descriptor>,
{
    let mut done = 0;
    for d in descs.into_iter().filter(Descriptor::is_write_only) {
        if done == reply.len() {
            break;
        }
        let n = (reply.len() - done).min(d.len() as usize);
        if n == 0 {
            continue;
        }
        let from = &reply[done..done + n];
        match region_slice(mem, d.addr(), n) {
            // The slice is n bytes long: all of `from` goes in.
            Some(s) => s.copy_from(from),
            None => mem
                .write_slice(from, d.addr())
                .map_err(|_| ChainError::OutsideMemory)?,
        }
        done += n;
    }
    Ok(done)
}

/// Bytes at the start of a buffer [`Descs::prefetch`] asks the CPU for:
/// more than any request the daemon reads in full.
const PREFETCH_BYTES: usize = 128;
/// Descriptors of a chain [`Descs::prefetch`] looks at.
const PREFETCH_DESCS: usize = 4;
/// A cache line.
const LINE: usize = 64;

/// Ask the CPU to start bringing the cache line holding `at` into its
/// cache. A hint only: nothing is read into the program, and no address
/// faults, so any pointer will do.
#[inline]
fn prefetch_line(at: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 (SSE, present on every x86_64 CPU) dereferences
    // nothing: it neither faults nor changes memory, whatever `at` is.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(at.cast())
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

/// [`prefetch_line`] every line of the first `len` bytes of `s`.
fn prefetch_slice(s: &Slice<'_>, len: usize) {
    let start = s.ptr_guard().as_ptr();
    let end = start as usize + len.min(s.len());
    // From the start of the line holding the first byte.
    let mut at = start.wrapping_sub(start as usize % LINE);
    while (at as usize) < end {
        prefetch_line(at);
        at = at.wrapping_add(LINE);
    }
}

/// One area of guest memory the rings live in: mapped once if it lies
/// inside one region, else reached address by address through
/// `GuestMemory` (every access checked, as virtio-queue does).
#[derive(Clone, Copy, Debug)]
enum Area<'m> {
    Mapped(Slice<'m>),
    Guest(GuestAddress),
}

impl<'m> Area<'m> {
    fn new(mem: &'m GuestMem, addr: GuestAddress, len: usize) -> Self {
        region_slice(mem, addr, len).map_or(Area::Guest(addr), Area::Mapped)
    }

    fn read_obj<T: ByteValued>(&self, mem: &GuestMem, offset: usize) -> Option<T> {
        match self {
            // One volatile (unaligned) load, not a byte copy.
            Area::Mapped(s) => s.get_ref(offset).ok().map(|r| r.load()),
            Area::Guest(a) => mem.read_obj(a.checked_add(offset as u64)?).ok(),
        }
    }

    fn write_obj<T: ByteValued>(&self, mem: &GuestMem, offset: usize, val: T) -> Option<()> {
        match self {
            // One volatile store, marking the dirty log.
            Area::Mapped(s) => s.get_ref(offset).ok().map(|r| r.store(val)),
            Area::Guest(a) => mem.write_obj(val, a.checked_add(offset as u64)?).ok(),
        }
    }

    fn load_u16(&self, mem: &GuestMem, offset: usize, order: Ordering) -> Option<u16> {
        let v: u16 = match self {
            Area::Mapped(s) => s.load(offset, order).ok()?,
            Area::Guest(a) => mem.load(a.checked_add(offset as u64)?, order).ok()?,
        };
        Some(u16::from_le(v))
    }

    fn store_u16(&self, mem: &GuestMem, offset: usize, val: u16, order: Ordering) -> Option<()> {
        let val = val.to_le();
        match self {
            Area::Mapped(s) => s.store(val, offset, order).ok(),
            Area::Guest(a) => mem.store(val, a.checked_add(offset as u64)?, order).ok(),
        }
    }
}

/// Bytes of a descriptor table entry (virtio 1.2 §2.7.5).
const DESC_SIZE: usize = 16;
/// `flags` and `idx` before the available ring's entries (§2.7.6).
const AVAIL_HEADER: usize = 4;
/// `flags` and `idx` before the used ring's entries (§2.7.8).
const USED_HEADER: usize = 4;
/// Bytes of a used ring entry (`id`, `len`).
const USED_ELEM: usize = 8;

/// A split virtqueue's three areas (virtio 1.2 §2.7), resolved to the
/// daemon's mapping once for a batch rather than per access. Positions are
/// free-running 16-bit indexes, reduced modulo the queue size here. It
/// reads and writes only what the caller asks; the queue's own indexes
/// (`next_avail`, `next_used`) stay in virtio-queue's [`Queue`], which the
/// caller updates under its vring lock.
#[derive(Clone, Copy, Debug)]
pub struct SplitQueue<'m> {
    mem: &'m GuestMem,
    size: u16,
    desc: Area<'m>,
    avail: Area<'m>,
    used: Area<'m>,
}

impl<'m> SplitQueue<'m> {
    /// The areas of `queue` in `mem`.
    pub fn new(mem: &'m GuestMem, queue: &Queue) -> Self {
        let size = queue.size();
        let n = usize::from(size);
        SplitQueue {
            mem,
            size,
            desc: Area::new(mem, GuestAddress(queue.desc_table()), n * DESC_SIZE),
            // The entries and `used_event` (only read with EVENT_IDX).
            avail: Area::new(
                mem,
                GuestAddress(queue.avail_ring()),
                AVAIL_HEADER + n * 2 + 2,
            ),
            // The entries; `avail_event` is virtio-queue's business.
            used: Area::new(
                mem,
                GuestAddress(queue.used_ring()),
                USED_HEADER + n * USED_ELEM,
            ),
        }
    }

    /// The queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The driver's `avail->idx`, with acquire ordering: the ring entries
    /// and descriptors it covers are read after it (virtio 1.2 §2.7.13.3:
    /// the driver updates the index after the entries). `None` if it is not
    /// guest memory.
    pub fn avail_idx(&self) -> Option<u16> {
        self.avail.load_u16(self.mem, 2, Ordering::Acquire)
    }

    /// The head of the chain at free-running position `pos` of the
    /// available ring (virtio 1.2 §2.7.6), read after [`Self::avail_idx`]
    /// covered it.
    pub fn avail_head(&self, pos: u16) -> Option<u16> {
        let slot = usize::from(pos.checked_rem(self.size)?);
        self.avail
            .load_u16(self.mem, AVAIL_HEADER + slot * 2, Ordering::Relaxed)
    }

    /// The descriptors of the chain starting at `head`.
    pub fn chain(&self, head: u16) -> Descs<'m> {
        Descs {
            mem: self.mem,
            table: self.desc,
            entries: self.size,
            next: head,
            ttl: self.size,
            yielded: 0,
            indirect: false,
        }
    }

    /// Start bringing the descriptor table entry of `head` into the cache,
    /// ahead of walking its chain (a hint: nothing is read or checked).
    pub fn prefetch_head(&self, head: u16) {
        if let Area::Mapped(table) = &self.desc {
            if head < self.size {
                prefetch_line(
                    table
                        .ptr_guard()
                        .as_ptr()
                        .wrapping_add(usize::from(head) * DESC_SIZE),
                );
            }
        }
    }

    /// Write the used ring entry at free-running position `pos`: chain
    /// `head`, `len` bytes written (virtio 1.2 §2.7.8). The driver sees it
    /// only once [`Self::publish_used`] moves the index past it.
    pub fn put_used(&self, pos: u16, head: u16, len: u32) -> Option<()> {
        let slot = usize::from(pos.checked_rem(self.size)?);
        // `struct virtq_used_elem { le32 id; le32 len; }`
        let elem = u64::from(head) | u64::from(len) << 32;
        self.used
            .write_obj(self.mem, USED_HEADER + slot * USED_ELEM, elem.to_le())
    }

    /// Store `used->idx` with release ordering, so that the entries written
    /// before it are visible first (virtio 1.2 §2.7.8: the device updates
    /// the index after the entries); then a full fence, so that what the
    /// driver asks about notifications is read after the store (§2.7.7,
    /// as virtio-queue's `needs_notification` does).
    pub fn publish_used(&self, idx: u16) -> Option<()> {
        let stored = self.used.store_u16(self.mem, 2, idx, Ordering::Release);
        fence(Ordering::SeqCst);
        stored
    }

    /// The driver's `used_event` (virtio 1.2 §2.7.7, with EVENT_IDX).
    pub fn used_event(&self) -> Option<u16> {
        let at = AVAIL_HEADER + usize::from(self.size) * 2;
        self.avail.load_u16(self.mem, at, Ordering::Relaxed)
    }
}

/// `vring_need_event` (virtio 1.2 §2.7.7.2): with EVENT_IDX, the driver
/// wants a used buffer notification if `used_event` lies in the entries
/// `[old, new)` just published (mod 2^16).
pub fn need_event(used_event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// The descriptors of one chain (virtio 1.2 §2.7.5), read from the
/// queue's mapped table: exactly those virtio-queue's `DescriptorChain`
/// yields for the same head, so chains are judged as before. Iteration
/// ends at the last descriptor, after the table's size in links (a loop),
/// at an entry outside the table or not in guest memory, at an indirect
/// table inside another (§2.7.5.3.1) or not a whole number of entries, or
/// once the chain would pass 2^32 bytes (§2.7.5.2). Cheap to clone, to
/// walk a chain twice.
#[derive(Clone, Debug)]
pub struct Descs<'m> {
    mem: &'m GuestMem,
    table: Area<'m>,
    /// Entries of the table being walked.
    entries: u16,
    next: u16,
    /// Links left before the chain counts as a loop.
    ttl: u16,
    /// Bytes of the descriptors yielded so far.
    yielded: u32,
    /// Walking an indirect table.
    indirect: bool,
}

impl Descs<'_> {
    /// Start bringing the start of the chain's buffers (those of its
    /// first few descriptors that lie inside one region) into the cache,
    /// ahead of [`read_request`] and [`write_reply`]: the driver wrote them
    /// from another CPU, and the misses otherwise come one after the other.
    /// A hint: the descriptors are read, but nothing is checked or kept.
    pub fn prefetch(&self) {
        for d in self.clone().take(PREFETCH_DESCS) {
            let len = (d.len() as usize).min(PREFETCH_BYTES);
            if let Some(s) = region_slice(self.mem, d.addr(), len) {
                prefetch_slice(&s, len);
            }
        }
    }
}

impl Iterator for Descs<'_> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        loop {
            if self.ttl == 0 || self.next >= self.entries {
                return None;
            }
            let d: Descriptor = self
                .table
                .read_obj(self.mem, usize::from(self.next) * DESC_SIZE)?;
            if d.refers_to_indirect_table() {
                let len = d.len() as usize;
                if self.indirect || !len.is_multiple_of(DESC_SIZE) {
                    return None;
                }
                let entries = u16::try_from(len / DESC_SIZE).ok()?;
                self.table = Area::new(self.mem, d.addr(), len);
                self.entries = entries;
                self.next = 0;
                self.ttl = entries;
                self.indirect = true;
                continue;
            }
            self.yielded = self.yielded.checked_add(d.len())?;
            if d.has_next() {
                self.next = d.next();
                self.ttl -= 1;
            } else {
                self.ttl = 0;
            }
            return Some(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::DescriptorChain;
    use vm_memory::GuestAddress;

    const NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
    const INDIRECT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;

    fn mem() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn chain_of<'a>(
        m: &'a GuestMem,
        q: &MockSplitQueue<'a, GuestMem>,
        descs: &[(u64, u32, u16)],
    ) -> DescriptorChain<&'a GuestMem> {
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|&(addr, len, flags)| RawDescriptor::from(Descriptor::new(addr, len, flags, 0)))
            .collect();
        q.build_desc_chain(&raw).unwrap();
        let mut queue: virtio_queue::Queue = q.create_queue().unwrap();
        queue.pop_descriptor_chain(m).unwrap()
    }

    #[test]
    fn readable_bytes_come_in_and_the_reply_goes_out_across_descriptors() {
        let m = mem();
        m.write_slice(&[1, 2, 3], GuestAddress(0x1000)).unwrap();
        m.write_slice(&[4, 5], GuestAddress(0x2000)).unwrap();
        let q = MockSplitQueue::new(&m, 16);
        let descs = [
            (0x1000, 3, 0),
            (0x2000, 2, 0),
            (0x3000, 2, WRITE),
            (0x4000, 8, WRITE),
        ];
        let chain = chain_of(&m, &q, &descs);
        let mut req = [0u8; 4];
        let layout = read_request(chain.clone(), &m, &mut req).unwrap();
        assert_eq!(
            layout,
            ChainLayout {
                request_len: 4,
                writable: 10
            }
        );
        assert_eq!(req, [1, 2, 3, 4], "cut at the buffer's size");
        assert_eq!(write_reply(chain, &m, &[9, 8, 7]).unwrap(), 3);
        let mut out = [0u8; 2];
        m.read_slice(&mut out, GuestAddress(0x3000)).unwrap();
        assert_eq!(out, [9, 8]);
        m.read_slice(&mut out[..1], GuestAddress(0x4000)).unwrap();
        assert_eq!(out[0], 7);
    }

    #[test]
    fn chains_outside_memory_or_out_of_order_are_refused() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        let chain = chain_of(&m, &q, &[(0x1000, 4, 0), (0xf_fff0, 0x100, WRITE)]);
        assert_eq!(
            read_request(chain, &m, &mut [0; 8]),
            Err(ChainError::OutsideMemory)
        );
        let q = MockSplitQueue::new(&m, 16);
        let chain = chain_of(&m, &q, &[(0x1000, 4, WRITE), (0x2000, 4, 0)]);
        assert_eq!(
            read_request(chain, &m, &mut [0; 8]),
            Err(ChainError::ReadableAfterWritable)
        );
        // Even after a zero-length writable descriptor (found by vui-fuzz,
        // seed 1, chain input 353).
        let q = MockSplitQueue::new(&m, 16);
        let chain = chain_of(&m, &q, &[(0x3000, 0, WRITE), (0x2000, 0x55, 0)]);
        assert_eq!(
            read_request(chain, &m, &mut [0; 8]),
            Err(ChainError::ReadableAfterWritable)
        );
    }

    #[test]
    fn buffers_spanning_adjacent_regions_are_read_and_written_whole() {
        let m = GuestMem::from_ranges(&[
            (GuestAddress(0), 0x1_0000),
            (GuestAddress(0x1_0000), 0x1000),
            (GuestAddress(0x2_0000), 0x1000),
        ])
        .unwrap();
        m.write_slice(&[1, 2, 3, 4], GuestAddress(0xfffe)).unwrap();
        let descs = [
            Descriptor::new(0xfffe, 4, 0, 0),
            Descriptor::new(0x1_0ffc, 4, WRITE, 0),
        ];
        let mut req = [0u8; 8];
        let layout = read_request(descs, &m, &mut req).unwrap();
        assert_eq!(layout.request_len, 4);
        assert_eq!(req[..4], [1, 2, 3, 4]);
        // Two bytes in the second region, two in the gap after it.
        let descs = [
            Descriptor::new(0xfffe, 4, 0, 0),
            Descriptor::new(0x1_0ffe, 4, WRITE, 0),
        ];
        assert_eq!(
            read_request(descs, &m, &mut req),
            Err(ChainError::OutsideMemory)
        );
        let descs = [
            Descriptor::new(0xfffe, 4, 0, 0),
            Descriptor::new(0xfffc, 8, WRITE, 0),
        ];
        assert_eq!(write_reply(descs, &m, &[9; 6]), Ok(6));
        let mut out = [0u8; 8];
        m.read_slice(&mut out, GuestAddress(0xfffc)).unwrap();
        assert_eq!(out, [9, 9, 9, 9, 9, 9, 0, 0]);
    }

    /// A small deterministic generator (xorshift64*), for the tables below.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Queue of 16 at 0x0 (descriptors), 0x1000 (available ring), 0x2000
    /// (used ring), indirect tables at 0x3000 and across the end of the
    /// rings' region, into the next region or into a gap; buffers anywhere.
    #[test]
    fn descs_yield_what_virtio_queues_descriptor_chain_yields() {
        const QSIZE: u16 = 16;
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut compared = 0;
        for round in 0..4000 {
            let ranges: &[(GuestAddress, usize)] = if round % 2 == 0 {
                &[
                    (GuestAddress(0), 0x1_0000),
                    (GuestAddress(0x1_0000), 0x4000),
                ]
            } else {
                &[
                    (GuestAddress(0), 0x1_0000),
                    (GuestAddress(0x2_0000), 0x4000),
                ]
            };
            let m = GuestMem::from_ranges(ranges).unwrap();
            let entry = |rng: &mut Rng, at: u64, entries: u64| {
                let flags = match rng.below(10) {
                    0 => INDIRECT,
                    1 => rng.next() as u16,
                    2 | 3 => WRITE,
                    4 | 5 => WRITE | NEXT,
                    _ => NEXT,
                };
                let (addr, len) = match rng.below(13) {
                    0 => (0x3000 + 16 * rng.below(4), 16 * rng.below(8) as u32),
                    // A table that ends in the next region, or in a gap.
                    12 => (0x1_0000 - 16 * rng.below(4), 16 * rng.below(8) as u32),
                    1 => (rng.next(), rng.next() as u32),
                    2 => (0x3000 - 8 * rng.below(3), 16 * rng.below(3) as u32 + 8),
                    3 => (0x1_0000 - rng.below(64), 1 + rng.below(256) as u32),
                    4 => (rng.next(), u32::MAX - rng.below(4) as u32),
                    _ => (0x1_0000 + rng.below(0x5000), rng.below(0x200) as u32),
                };
                let next = rng.below(entries + 2) as u16;
                let d = Descriptor::new(addr, len, flags, next);
                // Entries past the first region land in a gap, half the time.
                let _ = m.write_obj(d, GuestAddress(at));
            };
            for i in 0..u64::from(QSIZE) {
                entry(&mut rng, i * 16, u64::from(QSIZE));
            }
            for i in 0..8 {
                entry(&mut rng, 0x3000 + i * 16, 8);
                entry(&mut rng, 0xffc0 + i * 16, 8);
            }
            let heads = 1 + rng.below(4) as u16;
            for i in 0..heads {
                let head = rng.below(u64::from(QSIZE) + 2) as u16;
                m.write_obj(head, GuestAddress(0x1004 + 2 * u64::from(i)))
                    .unwrap();
            }
            m.write_obj(heads, GuestAddress(0x1002)).unwrap();
            let mut q = Queue::new(QSIZE).unwrap();
            q.set_desc_table_address(Some(0), Some(0));
            q.set_avail_ring_address(Some(0x1000), Some(0));
            q.set_used_ring_address(Some(0x2000), Some(0));
            q.set_ready(true);
            let ring = SplitQueue::new(&m, &q);
            assert_eq!(ring.avail_idx(), Some(heads));
            let mut pos = 0;
            while let Some(chain) = q.pop_descriptor_chain(&m) {
                let head = ring.avail_head(pos).unwrap();
                assert_eq!(head, chain.head_index());
                let want: Vec<_> = chain
                    .map(|d| (d.addr(), d.len(), d.flags(), d.next()))
                    .collect();
                let got: Vec<_> = ring
                    .chain(head)
                    .map(|d| (d.addr(), d.len(), d.flags(), d.next()))
                    .collect();
                assert_eq!(got, want, "round {round}, head {head}");
                pos += 1;
                compared += usize::from(!got.is_empty());
            }
        }
        assert!(compared > 2000, "{compared} non-empty chains compared");
    }

    #[test]
    fn used_entries_become_visible_with_the_index_and_event_idx_says_when_to_notify() {
        let m = mem();
        let mut q = Queue::new(4).unwrap();
        q.set_desc_table_address(Some(0), Some(0));
        q.set_avail_ring_address(Some(0x1000), Some(0));
        q.set_used_ring_address(Some(0x2000), Some(0));
        q.set_ready(true);
        let ring = SplitQueue::new(&m, &q);
        // Positions wrap around the ring.
        for (pos, head) in [(3u16, 2u16), (4, 1), (5, 3)] {
            ring.put_used(pos, head, u32::from(head) * 100).unwrap();
        }
        assert_eq!(m.read_obj::<u16>(GuestAddress(0x2002)).unwrap(), 0);
        ring.publish_used(6).unwrap();
        assert_eq!(m.read_obj::<u16>(GuestAddress(0x2002)).unwrap(), 6);
        let elem = |slot: u64| {
            let at = 0x2004 + 8 * slot;
            (
                m.read_obj::<u32>(GuestAddress(at)).unwrap(),
                m.read_obj::<u32>(GuestAddress(at + 4)).unwrap(),
            )
        };
        assert_eq!([elem(3), elem(0), elem(1)], [(2, 200), (1, 100), (3, 300)]);
        // used_event sits after the 4 available ring entries.
        m.write_obj(4u16, GuestAddress(0x1004 + 8)).unwrap();
        assert_eq!(ring.used_event(), Some(4));
        assert!(need_event(4, 6, 3), "4 is in [3, 6)");
        assert!(!need_event(6, 6, 3), "6 is not yet used");
        assert!(!need_event(2, 6, 3), "2 was, before");
        assert!(need_event(0xffff, 1, 0xfffe), "around the wrap");
    }

    #[test]
    fn rings_outside_one_region_are_reached_through_guest_memory() {
        // The used ring straddles two adjacent regions; the available ring
        // lies in a gap.
        let m = GuestMem::from_ranges(&[(GuestAddress(0), 0x2008), (GuestAddress(0x2008), 0x1000)])
            .unwrap();
        let mut q = Queue::new(4).unwrap();
        q.set_desc_table_address(Some(0), Some(0));
        q.set_avail_ring_address(Some(0x8000), Some(0));
        q.set_used_ring_address(Some(0x2000), Some(0));
        q.set_ready(true);
        let ring = SplitQueue::new(&m, &q);
        assert!(matches!(ring.used, Area::Guest(_)));
        assert_eq!(ring.avail_idx(), None);
        ring.put_used(1, 3, 7).unwrap();
        ring.publish_used(2).unwrap();
        assert_eq!(m.read_obj::<u32>(GuestAddress(0x200c)).unwrap(), 3);
        assert_eq!(m.read_obj::<u16>(GuestAddress(0x2002)).unwrap(), 2);
    }
}
