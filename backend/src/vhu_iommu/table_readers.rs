// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Registering a back-end that reads the shared table
//! (docs/mirror-protocol.md §16): its reader page starts with its
//! endpoint's state as the device has it, under the device lock, so no
//! batch falls between the two.

use std::sync::Arc;

use super::IommuBackend;
use crate::mirror::readers::{ReaderEntry, RegisterError};

/// Why a reader was not registered.
#[derive(Debug, thiserror::Error)]
pub enum ReaderError {
    #[error("the daemon has no shared table (no --mirror-socket)")]
    NoTable,
    #[error(transparent)]
    Register(#[from] RegisterError),
    #[error("cannot create the reader page: {0}")]
    Page(std::io::Error),
}

impl IommuBackend {
    /// A new table reader of `endpoint`, registered.
    pub fn register_table_reader(
        &self,
        endpoint: u32,
        owns_iotlb: bool,
    ) -> Result<Arc<ReaderEntry>, ReaderError> {
        let memory = self.mirror.memory().ok_or(ReaderError::NoTable)?;
        let readers = &memory.readers;
        let pages = (memory.table.len() / crate::mirror::table::PAGE_SIZE as usize) as u32;
        let st = self.lock();
        let entry = Arc::new(
            ReaderEntry::new(
                readers.next_id(),
                endpoint,
                owns_iotlb,
                pages,
                memory.levels,
                st.session.reader_state(endpoint),
            )
            .map_err(ReaderError::Page)?,
        );
        readers.add(entry.clone())?;
        drop(st);
        Ok(entry)
    }
}
