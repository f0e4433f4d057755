//! The translation mirror: the daemon's state changes sent to QEMU, which
//! translates its emulated devices' DMA with them (docs/mirror-protocol.md).

mod link;
pub mod proto;

pub use link::{MirrorHandle, MirrorHooks, MirrorServer, ReadError, Ticket, WaitOutcome};
pub use proto::{Fault, Record};

/// The mirror record of a device change (docs/mirror-protocol.md §5).
pub fn record_of(change: &virtio_iommu::Change) -> Record {
    use virtio_iommu::Change;
    match *change {
        Change::Attach {
            endpoint,
            domain,
            bypass,
        } => Record::Attach {
            endpoint,
            domain,
            bypass,
        },
        Change::Detach { endpoint, domain } => Record::Detach { endpoint, domain },
        Change::Map {
            domain,
            virt_start,
            virt_end,
            phys_start,
            flags,
        } => Record::Map {
            domain,
            virt_start,
            virt_end,
            phys_start,
            // virtio-iommu MAP flags fit in 16 bits (READ, WRITE, MMIO).
            flags: flags as u16,
        },
        Change::Unmap {
            domain,
            virt_start,
            virt_end,
        } => Record::Unmap {
            domain,
            virt_start,
            virt_end,
        },
        Change::GlobalBypass(on) => Record::GlobalBypass(on),
        Change::Reset => Record::Reset {
            system: false,
            reset_id: 0,
        },
    }
}
