//! A request's descriptor chain, read and written in place, allocating
//! nothing (virtio-queue's `Reader`/`Writer` collect the buffers of each
//! chain in a heap-allocated queue; on a request path that runs at millions
//! of requests per second, that is the cost that matters).
//!
//! The driver's buffers follow virtio 1.2 §2.7.4.2: device-readable
//! descriptors first, then device-writable ones. A chain is refused whole —
//! completed with nothing written — if a descriptor lies outside guest
//! memory or a readable one follows a writable one.

use std::ops::Deref;

use virtio_queue::{desc::split::Descriptor, DescriptorChain};
use vm_memory::{Bytes, GuestMemory, Permissions};

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

fn in_memory(mem: &GuestMem, d: &Descriptor) -> bool {
    let access = if d.is_write_only() {
        Permissions::Write
    } else {
        Permissions::Read
    };
    d.len() == 0 || mem.check_range(d.addr(), d.len() as usize, access)
}

/// Check every descriptor of `chain`, and copy the start of its readable
/// part into `request`.
pub fn read_request<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMem,
    request: &mut [u8],
) -> Result<ChainLayout, ChainError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let mut layout = ChainLayout {
        request_len: 0,
        writable: 0,
    };
    // A zero-length writable descriptor counts too: the order rule is about
    // descriptors, not bytes.
    let mut seen_writable = false;
    for d in chain {
        if !in_memory(mem, &d) {
            return Err(ChainError::OutsideMemory);
        }
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
            mem.read_slice(
                &mut request[layout.request_len..layout.request_len + n],
                d.addr(),
            )
            .map_err(|_| ChainError::OutsideMemory)?;
            layout.request_len += n;
        }
    }
    Ok(layout)
}

/// Write `reply` into the writable part of `chain` (checked by
/// [`read_request`]), in order; returns the bytes written.
pub fn write_reply<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMem,
    reply: &[u8],
) -> Result<usize, ChainError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let mut done = 0;
    for d in chain.filter(Descriptor::is_write_only) {
        if done == reply.len() {
            break;
        }
        let n = (reply.len() - done).min(d.len() as usize);
        mem.write_slice(&reply[done..done + n], d.addr())
            .map_err(|_| ChainError::OutsideMemory)?;
        done += n;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;
    use vm_memory::GuestAddress;

    const WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;

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
}
