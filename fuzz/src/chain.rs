// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Target `chain`: the daemon's descriptor-chain reader
//! (`vhost_user_iommu::chain`) over arbitrary descriptor tables written
//! into guest memory: buffers outside memory, straddling a region's end or
//! a gap, overlapping each other, zero-length, looping `next` links,
//! indirect tables, out-of-order readable/writable descriptors.
//!
//! The daemon's own walker (`chain::SplitQueue::chain`, what the request
//! path reads from) must yield exactly the descriptors virtio-queue's
//! `DescriptorChain` does for the same head, loops and indirect tables
//! included. The reference reads the same chain (those descriptors)
//! by the rule of virtio 1.2 §2.7.4.2 written out plainly: every byte of a
//! non-empty buffer in guest memory, readable buffers before writable
//! ones; the request is the readable bytes in order, cut at the buffer; the
//! reply fills the writable buffers in order and touches nothing else.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::{Bitmap, NewBitmap};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use vhost_user_iommu::chain::{read_request, write_reply, ChainError, ChainLayout, SplitQueue};

use crate::{check, Gen, Target, Verdict};

const QSIZE: u16 = 16;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const INDIRECT: u64 = 0x3000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// Guest memory: a first region holding the rings, then one to three more,
/// some adjacent (a buffer may span two), some behind gaps.
/// Generic over the dirty bitmap: the type is whatever the chain reader
/// takes.
fn memory<B: NewBitmap>(g: &mut Gen) -> (GuestMemoryMmap<B>, Vec<(u64, u64)>) {
    let mut ranges = vec![(0u64, 0x10_000u64)];
    let mut at = 0x10_000;
    for _ in 0..g.range(1, 3) {
        if g.bool() {
            at += g.range(1, 4) << 12;
        }
        let len = g.range(1, 8) << 12;
        ranges.push((at, len));
        at += len;
    }
    let spec: Vec<(GuestAddress, usize)> = ranges
        .iter()
        .map(|&(a, l)| (GuestAddress(a), l as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&spec).expect("anonymous guest memory");
    (mem, ranges)
}

fn buffer_addr(g: &mut Gen, ranges: &[(u64, u64)]) -> u64 {
    let (a, l) = ranges[g.below(ranges.len() as u64) as usize];
    match g.below(8) {
        0 => g.edgy_u64(),
        1 => a + l - g.range(1, 16),
        2 => a + l,
        _ => a + g.below(l),
    }
}

fn buffer_len(g: &mut Gen) -> u32 {
    match g.below(8) {
        0 => 0,
        1 => g.edgy_u32(),
        2 => g.range(0x1000, 0x8000) as u32,
        _ => g.range(1, 96) as u32,
    }
}

fn flags(g: &mut Gen) -> u16 {
    match g.below(10) {
        0 => F_INDIRECT,
        1 => g.next_u64() as u16,
        2..=3 => F_WRITE,
        4..=5 => F_WRITE | F_NEXT,
        _ => F_NEXT,
    }
}

fn write_desc<B: Bitmap>(
    mem: &GuestMemoryMmap<B>,
    at: u64,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) {
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&addr.to_le_bytes());
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..16].copy_from_slice(&next.to_le_bytes());
    // The ring region is ours; it holds every table.
    let _ = mem.write_slice(&raw, GuestAddress(at));
}

/// The indirect table the chain from `head` switches to, as `(address,
/// length)`, read from the ring as it is now (as virtio-queue reads it:
/// along `next` links from the head to the first descriptor marked
/// indirect).
fn indirect_table<B: Bitmap>(mem: &GuestMemoryMmap<B>, head: u16) -> Option<(u64, u64)> {
    let mut at = head;
    for _ in 0..QSIZE {
        if at >= QSIZE {
            return None;
        }
        let d: Descriptor = mem.read_obj(GuestAddress(DESC + u64::from(at) * 16)).ok()?;
        if d.refers_to_indirect_table() {
            return Some((d.addr().0, u64::from(d.len())));
        }
        if !d.has_next() {
            return None;
        }
        at = d.next();
    }
    None
}

/// Whether every byte of `[addr, addr + len)` is guest memory.
fn covered(ranges: &[(u64, u64)], addr: u64, len: u64) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    let mut at = addr;
    while at < end {
        match ranges.iter().find(|&&(a, l)| a <= at && at < a + l) {
            Some(&(a, l)) => at = a + l,
            None => return false,
        }
    }
    true
}

fn snapshot<B: Bitmap>(mem: &GuestMemoryMmap<B>) -> Vec<u8> {
    let mut out = Vec::new();
    for r in mem.iter() {
        let mut buf = vec![0u8; r.len() as usize];
        let _ = mem.read_slice(&mut buf, r.start_addr());
        out.extend_from_slice(&buf);
    }
    out
}

/// Offset of `gpa` in a [`snapshot`].
fn snap_offset(ranges: &[(u64, u64)], gpa: u64) -> usize {
    let mut off = 0;
    for &(a, l) in ranges {
        if a <= gpa && gpa < a + l {
            return off + (gpa - a) as usize;
        }
        off += l as usize;
    }
    unreachable!("a covered address")
}

/// See the module doc.
#[derive(Debug, Default)]
pub struct ChainTarget {
    chains: u64,
    accepted: u64,
    outside: u64,
    out_of_order: u64,
    self_modifying: u64,
}

impl Target for ChainTarget {
    fn one(&mut self, g: &mut Gen) -> Verdict {
        let (mem, ranges) = memory(g);
        // A descriptor table of arbitrary entries, and sometimes an
        // indirect table.
        for i in 0..u64::from(QSIZE) {
            let next = if g.chance(3, 4) {
                (i as u16 + 1) % QSIZE
            } else {
                g.below(u64::from(QSIZE) + 4) as u16
            };
            let (addr, len) = if g.chance(1, 10) {
                (INDIRECT, (g.range(0, 6) * 16) as u32)
            } else {
                (buffer_addr(g, &ranges), buffer_len(g))
            };
            write_desc(&mem, DESC + i * 16, addr, len, flags(g), next);
        }
        for i in 0..6u64 {
            let f = flags(g) & !F_INDIRECT;
            let f = if g.chance(1, 20) { F_INDIRECT } else { f };
            write_desc(
                &mem,
                INDIRECT + i * 16,
                buffer_addr(g, &ranges),
                buffer_len(g),
                f,
                g.below(8) as u16,
            );
        }
        // Fill some buffer bytes so the request has content.
        for &(a, l) in &ranges[1..] {
            let _ = mem.write_slice(&g.bytes(l.min(256) as usize), GuestAddress(a));
        }
        let heads = g.range(1, 4) as u16;
        let _ = mem.write_obj(0u16, GuestAddress(AVAIL));
        let _ = mem.write_obj(heads, GuestAddress(AVAIL + 2));
        for i in 0..u64::from(heads) {
            let head = g.below(u64::from(QSIZE) + 2) as u16;
            let _ = mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * i));
        }
        let mut q = Queue::new(QSIZE).map_err(|e| e.to_string())?;
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);

        // The daemon's own walker over the same rings (the request path
        // takes chains from it, not from virtio-queue).
        let ring = SplitQueue::new(&mem, &q);
        while let Some(chain) = q.pop_descriptor_chain(&mem) {
            self.chains += 1;
            let descs: Vec<Descriptor> = chain.clone().collect();
            // Descriptor has no PartialEq: compare what a reader uses.
            let key = |d: &Descriptor| (d.addr().0, d.len(), d.flags(), d.next());
            let walked: Vec<Descriptor> = ring.chain(chain.head_index()).collect();
            check(walked.iter().map(key).eq(descs.iter().map(key)), || {
                format!(
                    "head {}: the daemon's walker yields {walked:x?}, virtio-queue {descs:x?}",
                    chain.head_index()
                )
            })?;
            let cap = g.below(160) as usize;
            let mut got_req = vec![0u8; cap];
            let got = read_request(chain.clone(), &mem, &mut got_req);

            // The reference.
            let mut want_req = Vec::new();
            let mut writable = 0u64;
            let mut seen_writable = false;
            let mut want = Ok(());
            for d in &descs {
                if d.len() != 0 && !covered(&ranges, d.addr().0, u64::from(d.len())) {
                    want = Err(ChainError::OutsideMemory);
                    break;
                }
                if d.is_write_only() {
                    seen_writable = true;
                    writable += u64::from(d.len());
                    continue;
                }
                // The order rule is about descriptors, not bytes: a
                // readable one after a zero-length writable one is refused
                // too (the deviation this target first found, now fixed).
                if seen_writable {
                    want = Err(ChainError::ReadableAfterWritable);
                    break;
                }
                let n = (cap - want_req.len()).min(d.len() as usize);
                let mut buf = vec![0u8; n];
                mem.read_slice(&mut buf, d.addr())
                    .map_err(|e| format!("reference read of {d:x?}: {e}"))?;
                want_req.extend_from_slice(&buf);
            }
            let want = want.map(|()| ChainLayout {
                request_len: want_req.len(),
                writable,
            });
            check(got == want, || {
                format!("chain {descs:x?} (request buffer {cap}): read_request gave {got:?}, the reference {want:?}")
            })?;
            let Ok(layout) = got else {
                match got {
                    Err(ChainError::OutsideMemory) => self.outside += 1,
                    _ => self.out_of_order += 1,
                }
                continue;
            };
            self.accepted += 1;
            check(got_req[..layout.request_len] == want_req[..], || {
                format!("chain {descs:x?}: request bytes differ")
            })?;

            // The reply goes into the writable buffers and nowhere else.
            let reply = g.bytes_upto(80);
            let mut expect = snapshot(&mem);
            let mut done = 0;
            for d in descs.iter().filter(|d| d.is_write_only()) {
                if done == reply.len() {
                    break;
                }
                let n = (reply.len() - done).min(d.len() as usize);
                for k in 0..n {
                    let off = snap_offset(&ranges, d.addr().0 + k as u64);
                    expect[off] = reply[done + k];
                }
                done += n;
            }
            // A writable buffer over a descriptor table: write_reply reads
            // the chain again after the reply rewrote it, so it follows
            // the rewritten links (guest memory only, every write bounds
            // checked): only the bound is checked then. The tables are the
            // ring's, the one at INDIRECT, and the indirect table this chain
            // uses, wherever its descriptor put it.
            let mut tables = vec![(DESC, u64::from(QSIZE) * 16), (INDIRECT, 6 * 16)];
            tables.extend(indirect_table(&mem, chain.head_index()));
            let self_modifying = descs.iter().any(|d| {
                d.is_write_only()
                    && tables.iter().any(|&(t, l)| {
                        d.addr().0 < t.saturating_add(l)
                            && t < d.addr().0.saturating_add(u64::from(d.len()))
                    })
            });
            let wrote = write_reply(chain, &mem, &reply);
            if self_modifying {
                self.self_modifying += 1;
                check(
                    wrote.is_ok_and(|n| n <= reply.len()) || wrote.is_err(),
                    || format!("chain {descs:x?}: write_reply gave {wrote:?}"),
                )?;
                continue;
            }
            check(wrote == Ok(done), || {
                format!("chain {descs:x?}: write_reply gave {wrote:?}, expected Ok({done})")
            })?;
            check(snapshot(&mem) == expect, || {
                format!(
                    "chain {descs:x?}: the reply of {} bytes changed other memory",
                    reply.len()
                )
            })?;
        }
        Ok(())
    }

    fn notes(&self) -> Vec<String> {
        vec![
            format!(
                "{} chains: {} accepted, {} outside memory, {} out of order",
                self.chains, self.accepted, self.outside, self.out_of_order
            ),
            format!(
                "known deviation (reported): {} replies into the chain's own descriptor table",
                self.self_modifying
            ),
        ]
    }
}
