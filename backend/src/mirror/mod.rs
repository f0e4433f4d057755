// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The translation mirror: what QEMU needs of the daemon's state to
//! translate its emulated devices' DMA and fire its IOMMU notifiers
//! (docs/mirror-protocol.md): a shared translation table QEMU reads
//! directly, and a socket for the changes QEMU must act on.

mod batch;
pub mod completion;
mod link;
pub mod proto;
pub mod readers;
pub mod shm;
pub mod table;

use std::io;
use std::sync::Arc;

pub use batch::{dump, Batch, Effects, NOTIFIER_FLAGS_LEN};
pub use link::{
    Ended, Hello, MirrorHandle, MirrorHooks, MirrorServer, PeerEvent, ReadError, Refusal, Ticket,
    WaitOutcome,
};
pub use proto::{Fault, Record};
pub use readers::Readers;
pub use shm::SharedMem;
pub use table::{TableStats, TranslationTable};

/// Table pages the daemon offers (1 GiB of address space; pages take memory
/// only once used): at 4 KiB mappings, one leaf page covers 2 MiB of IOVA.
pub const TABLE_PAGES: u32 = 1 << 18;

/// Why the mirror cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error(
        "with --mirror-socket the smallest page must be at least 4 KiB (QEMU's translation \
         table has 4 KiB pages); --page-size-mask allows {0:#x}"
    )]
    Granule(u64),
    #[error("cannot create the memory shared with QEMU: {0}")]
    Memory(io::Error),
}

/// The memory shared with QEMU (§11): the translation table, read-only for
/// QEMU, and the notifier flags QEMU writes.
#[derive(Debug)]
pub struct MirrorMemory {
    pub table: Arc<SharedMem>,
    pub flags: SharedMem,
    pub levels: u32,
    /// Back-ends that read the table themselves (§16).
    pub readers: Arc<Readers>,
}

impl MirrorMemory {
    /// A table of `pages` pages with trees deep enough for input addresses
    /// up to `input_last`, and zeroed flags.
    pub fn new(pages: u32, input_last: u64) -> io::Result<Self> {
        let table = SharedMem::new(
            c"vhost-user-iommu-table",
            pages as usize * table::PAGE_SIZE as usize,
        )?;
        table.seal_writes()?;
        let flags = SharedMem::new(c"vhost-user-iommu-notifiers", NOTIFIER_FLAGS_LEN)?;
        Ok(Self {
            table: Arc::new(table),
            flags,
            levels: table::levels_for(input_last),
            readers: Arc::default(),
        })
    }

    /// The shared memory for a device: QEMU's view must express every
    /// mapping the device accepts, so the smallest page the device offers
    /// must be at least the table's 4 KiB page.
    pub fn for_device(cfg: &virtio_iommu::DeviceConfig) -> Result<Self, MirrorError> {
        let granule = 1u64 << cfg.page_size_mask.trailing_zeros().min(63);
        if granule < table::PAGE_SIZE {
            return Err(MirrorError::Granule(granule));
        }
        Self::new(TABLE_PAGES, cfg.input_range.1).map_err(MirrorError::Memory)
    }

    /// A writer for the table.
    pub fn writer(&self) -> TranslationTable<Arc<SharedMem>> {
        TranslationTable::new(self.table.clone(), self.levels)
    }

    fn hello_shm(&self) -> proto::HelloShm {
        proto::HelloShm {
            table_pages: (self.table.len() / table::PAGE_SIZE as usize) as u32,
            table_levels: self.levels as u8,
            flags_len: self.flags.len() as u32,
        }
    }
}

/// The mirror record of a device change (docs/mirror-protocol.md §5), for
/// a domain with no tree in a shared table.
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
            root: 0,
        },
        Change::Detach { endpoint, domain } => Record::Detach { endpoint, domain },
        Change::Map(m) => Record::Map(m),
        Change::Unmap(u) => Record::Unmap(u),
        Change::GlobalBypass(on) => Record::GlobalBypass(on),
        Change::Reset => Record::Reset {
            system: false,
            reset_id: 0,
        },
    }
}
