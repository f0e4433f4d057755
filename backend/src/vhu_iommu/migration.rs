// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Migration: the device's state out through a vhost-user
//! `SET_DEVICE_STATE_FD` transfer while the device is stopped, and in,
//! checked entry by entry as a guest request would be
//! (docs/device-state.md).

use std::io;

use vhost::vhost_user::message::{VhostTransferStateDirection, VhostTransferStatePhase};
use virtio_iommu::NoRam;
use vm_memory::GuestAddressSpace;

use super::IommuBackend;
use crate::device_state::{Finished, Transfer};
use crate::guest_ram::GuestRamView;
use crate::session::{Publish, Reset};

impl IommuBackend {
    /// Migration (docs/device-state.md): with the device stopped, save its
    /// state into `file`, or load one from it; the bytes move on a thread
    /// of their own and [`Self::finish_transfer`] waits for them.
    pub(super) fn start_transfer(
        &self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        file: std::fs::File,
    ) -> io::Result<Option<std::fs::File>> {
        if phase != VhostTransferStatePhase::STOPPED {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "state transfer is only possible with the device stopped",
            ));
        }
        let mut st = self.lock();
        if let Some(old) = st.transfer.take() {
            log::warn!("migration: a new state transfer replaces an unfinished one");
            drop(old);
        }
        st.transfer = Some(match direction {
            VhostTransferStateDirection::SAVE => {
                let state = st.session.device().save_state();
                log::info!(
                    "migration: saving the state: {} attachments and mappings",
                    state.entries.len()
                );
                Transfer::save(state.encode(), file)?
            }
            VhostTransferStateDirection::LOAD => Transfer::load(file)?,
        });
        Ok(None)
    }

    /// The end of a state transfer: for a load, the state is decoded and
    /// applied, every entry checked as a guest request would be; a refused
    /// state leaves the device reset and fails the migration.
    pub(super) fn finish_transfer(&self) -> io::Result<()> {
        let Some(transfer) = self.lock().transfer.take() else {
            return Ok(());
        };
        let bytes = match transfer.finish() {
            Ok(Finished::Saved) => return Ok(()),
            Ok(Finished::Loaded(bytes)) => bytes,
            Err(e) => {
                log::error!("migration: state transfer failed: {e}");
                return Err(e);
            }
        };
        let invalid = |e: String| {
            log::error!("migration: refusing the loaded state: {e}");
            io::Error::new(io::ErrorKind::InvalidData, e)
        };
        let mut st = self.lock();
        let state = match virtio_iommu::DeviceState::decode(&bytes) {
            Ok(state) => state,
            Err(e) => {
                // As for a state the device refuses: nothing half-loaded.
                self.reset(&mut st, Reset::RefusedState);
                return Err(invalid(e.to_string()));
            }
        };
        let restored = match st.mem.clone() {
            Some(m) => {
                let guard = m.memory();
                let ram = GuestRamView::new(&guard);
                st.session
                    .change(&self.mirror, Publish::Sync, |device, sink| {
                        device.restore_state(&state, &ram, sink)
                    })
            }
            None => st
                .session
                .change(&self.mirror, Publish::Sync, |device, sink| {
                    device.restore_state(&state, &NoRam, sink)
                }),
        };
        restored.map_err(|e| invalid(e.to_string()))?;
        self.telemetry
            .state_restored("migration", st.session.device());
        log::info!(
            "migration: state loaded: {} attachments and mappings",
            state.entries.len()
        );
        Ok(())
    }
}
