// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The request queue's rings, a batch at a time: chains claimed from the
//! available ring under one vring lock, completions published to the used
//! ring with one index store (virtio 1.2 §2.7.6–§2.7.8). The rings
//! themselves are read and written in place by [`crate::chain`].

use std::io;

use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::GuestMemoryAtomic;

use crate::chain::{self, Descs, SplitQueue};
use crate::guest_ram::GuestMem;

/// The daemon's vrings, over its logged guest memory.
pub type Vring = vhost_user_backend::VringRwLock<GuestMemoryAtomic<GuestMem>>;

/// Chains taken from the available ring per vring lock.
const CLAIM: usize = 64;
/// How many chains ahead of the one being carried out a batch asks for
/// buffers to be brought into the cache.
const LOOKAHEAD: usize = 2;

/// Put `completed` chains (head, bytes written) in the used ring under
/// one vring lock: every entry first, then one store of the used index
/// with release ordering (virtio 1.2 §2.7.8), rather than an index
/// store per chain. Returns whether the driver wants a used buffer
/// notification (§2.7.7: with EVENT_IDX, if `used_event` lies among
/// the entries just published; else always, as virtio-queue says). A
/// head outside the queue ends the batch there with an error, the
/// entries before it published, as virtio-queue's `add_used` did.
pub fn complete_chains(
    vring: &Vring,
    mem: &GuestMem,
    completed: &[(u16, u32)],
) -> io::Result<bool> {
    let outside = || io::Error::other("the used ring is not in guest memory");
    let mut state = vring.get_mut();
    let q = state.get_queue_mut();
    let ring = SplitQueue::new(mem, q);
    let old = q.next_used();
    let mut next = old;
    let mut failed = None;
    let mut put = 0;
    for &(head, len) in completed {
        if head >= ring.size() {
            failed = Some(io::Error::other(
                virtio_queue::Error::InvalidDescriptorIndex,
            ));
            break;
        }
        if ring.put_used(next, head, len).is_none() {
            failed = Some(outside());
            break;
        }
        next = next.wrapping_add(1);
        put += 1;
    }
    if put > 0 {
        q.set_next_used(next);
        ring.publish_used(next).ok_or_else(outside)?;
    }
    if let Some(e) = failed {
        return Err(e);
    }
    Ok(!q.event_idx_enabled()
        || ring
            .used_event()
            .is_none_or(|e| chain::need_event(e, next, old)))
}

/// The chains a batch takes from the available ring, `CLAIM` at a time
/// under one vring lock each (`Avail::claim`).
#[allow(missing_debug_implementations)]
pub struct Avail<'v, 'm> {
    vring: &'v Vring,
    mem: &'m GuestMem,
    /// The queue's areas, as of the last claim.
    ring: Option<SplitQueue<'m>>,
    heads: [u16; CLAIM],
    /// Ring position of `heads[0]`.
    first: u16,
    taken: usize,
    /// Heads handed out so far.
    at: usize,
}

impl<'v, 'm> Avail<'v, 'm> {
    pub fn new(vring: &'v Vring, mem: &'m GuestMem) -> Self {
        Avail {
            vring,
            mem,
            ring: None,
            heads: [0; CLAIM],
            first: 0,
            taken: 0,
            at: 0,
        }
    }

    /// The next available chain: its ring position, head, and descriptors.
    /// The buffers of the chain `LOOKAHEAD` places on are asked into the
    /// cache meanwhile.
    pub fn next_chain(&mut self) -> Option<(u16, u16, Descs<'m>)> {
        if self.at == self.taken && !self.claim() {
            return None;
        }
        let ring = self.ring?;
        if let Some(&ahead) = self.heads[..self.taken].get(self.at + LOOKAHEAD) {
            ring.chain(ahead).prefetch();
        }
        let head = self.heads[self.at];
        let pos = self.first.wrapping_add(self.at as u16);
        self.at += 1;
        Some((pos, head, ring.chain(head)))
    }

    /// Take up to [`CLAIM`] of the chains the driver has made available
    /// (virtio 1.2 §2.7.6) under one vring lock: their heads, and the
    /// queue's `next_avail` moves past them. None is taken where
    /// virtio-queue's `pop_descriptor_chain` would find none: the queue is
    /// not ready, its available index is not guest memory or more than a
    /// queue ahead (no driver can have more chains than the queue size
    /// available: the index is bogus), or an entry is not guest memory
    /// (taken up to there).
    fn claim(&mut self) -> bool {
        let mut state = self.vring.get_mut();
        let q = state.get_queue_mut();
        if !q.ready() || q.avail_ring() == 0 {
            return false;
        }
        let ring = SplitQueue::new(self.mem, q);
        let first = q.next_avail();
        let Some(idx) = ring.avail_idx() else {
            return false;
        };
        let ahead = idx.wrapping_sub(first);
        if ahead > ring.size() {
            return false;
        }
        let mut taken = 0;
        for (slot, i) in self.heads.iter_mut().zip(0..ahead) {
            let Some(head) = ring.avail_head(first.wrapping_add(i)) else {
                break;
            };
            *slot = head;
            taken += 1;
        }
        q.set_next_avail(first.wrapping_add(taken as u16));
        drop(state);
        // The driver wrote these from another CPU: ask for all their
        // descriptors at once, and for the buffers of the first chains.
        for &head in &self.heads[..taken] {
            ring.prefetch_head(head);
        }
        for &head in self.heads[..taken].iter().take(LOOKAHEAD) {
            ring.chain(head).prefetch();
        }
        self.ring = Some(ring);
        self.first = first;
        self.taken = taken;
        self.at = 0;
        taken > 0
    }
}
