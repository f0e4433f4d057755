// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the translation mirror asks of the backend: the full-state dump,
//! QEMU's faults, HELLO and system resets, and the VFIO devices it forwards
//! (docs/mirror-protocol.md §6, §9, §10, §14).

use virtio_iommu::Change;

use super::IommuBackend;
use crate::control::Event;
use crate::mirror::{self, PeerEvent, Record};
use crate::session::Reset;

/// The mirror's view of the backend (docs/mirror-protocol.md §6, §9, §10).
/// Set once the backend exists (the backend needs the mirror's handle
/// first). A QEMU may connect before that — one reconnecting to a daemon
/// still recovering its state file — so its HELLO and the dump wait for
/// the backend: a dump made earlier would be empty, and never followed by
/// one with the recovered state.
#[derive(Debug, Default)]
pub struct BackendHooks(pub std::sync::OnceLock<IommuBackend>);

impl mirror::MirrorHooks for BackendHooks {
    fn snapshot(&self, send: &mut dyn FnMut(&[Record])) {
        let st = self.0.wait().lock();
        let mut changes: Vec<Change> = Vec::new();
        st.session.device().replay(&mut changes);
        let mut records = Vec::with_capacity(changes.len() + 1);
        mirror::dump(st.session.table(), &changes, &mut records);
        send(&records);
    }

    fn fault(&self, fault: mirror::Fault) {
        let Some(backend) = self.0.get() else { return };
        backend.telemetry().fault(crate::control::FaultRecord::new(
            fault.reason,
            fault.flags,
            fault.endpoint,
            fault.address,
        ));
        let event =
            virtio_iommu::encode_fault(fault.reason, fault.flags, fault.endpoint, fault.address);
        backend.report_fault(event);
    }

    fn qemu_hello(&self, instance: u64) {
        self.0.wait().qemu_hello(instance);
    }

    fn hello_would_reset(&self, instance: u64) -> bool {
        self.0.wait().lock().session.hello_would_reset(instance)
    }

    fn system_reset(&self, id: u32, send: &mut dyn FnMut(&[Record])) {
        let Some(backend) = self.0.get() else { return };
        let mut st = backend.lock();
        let before = st.session.device().stats();
        // The records go to QEMU below, as the answer to its SYSTEM_RESET.
        backend.reset(&mut st, Reset::System);
        log::info!(
            "mirror: system reset {id} from QEMU: {} domains, {} mappings and {} attachments \
             dropped; the device is at power-on",
            before.domains,
            before.mappings,
            before.attached
        );
        let bypass = st.session.device().config().bypass != 0;
        send(&[
            Record::Reset {
                system: true,
                reset_id: id,
            },
            Record::GlobalBypass(bypass),
        ]);
    }

    fn vfio_device_added(
        &self,
        endpoint: u32,
        devid: u32,
        iommufd: std::os::fd::OwnedFd,
        device: std::os::fd::OwnedFd,
    ) -> Result<(), String> {
        let backend = self.0.get().ok_or("the daemon is still starting")?;
        backend
            .adopt_vfio(endpoint, devid, iommufd, device)
            .map_err(|e| e.to_string())
    }

    fn vfio_device_removed(&self, endpoint: u32) {
        if let Some(backend) = self.0.get() {
            backend.forget_vfio(Some(endpoint));
            log::info!("mirror: endpoint {endpoint:#x}: QEMU took its VFIO device back");
        }
    }

    fn vfio_devices_gone(&self) {
        if let Some(backend) = self.0.get() {
            backend.forget_vfio(None);
        }
    }

    fn peer(&self, event: PeerEvent) {
        // Before the backend exists no control client can be subscribed.
        let Some(backend) = self.0.get() else { return };
        backend.telemetry().events().publish(match event {
            PeerEvent::Connected { connection, pid } => Event::MirrorConnected { connection, pid },
            PeerEvent::Refused { pid, why } => Event::MirrorRefused {
                pid,
                reason: why.name(),
            },
            PeerEvent::Gone { connection, how } => Event::MirrorDisconnected {
                connection,
                how: how.name(),
            },
        });
    }
}
