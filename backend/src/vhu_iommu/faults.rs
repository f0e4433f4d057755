// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Fault events on the event queue (virtio 1.2 §5.13.6.3): faults QEMU
//! reports through the mirror (docs/mirror-protocol.md §10) wait for a
//! buffer the driver posts, the oldest dropped beyond a bound.

use std::io::Write;

use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::{ByteValued, GuestAddressSpace};

use super::{IommuBackend, State, Vring, EVENT_QUEUE};

/// Fault events kept while the guest has no event buffer posted.
pub(super) const MAX_PENDING_FAULTS: usize = 64;

impl IommuBackend {
    /// Queue a fault event for the guest and deliver what fits in the event
    /// queue (virtio 1.2 §5.13.6.9: the device reports faults on the
    /// eventq). Without a buffer it waits for one, up to
    /// `MAX_PENDING_FAULTS`, the oldest dropped beyond (mirror protocol
    /// §10).
    pub fn report_fault(&self, fault: virtio_iommu::FaultEvent) {
        let mut st = self.lock();
        st.stats.faults_reported += 1;
        if st.faults.len() == MAX_PENDING_FAULTS {
            if let Some(oldest) = st.faults.pop_front() {
                self.telemetry.fault_dropped(&oldest, "no_buffer");
            }
            st.stats.faults_dropped += 1;
        }
        st.faults.push_back(fault);
        if let Some(vrings) = st.vrings.clone() {
            self.deliver_faults(&mut st, &vrings[EVENT_QUEUE as usize]);
        }
    }

    /// Write pending faults into posted event buffers.
    pub(super) fn deliver_faults(&self, st: &mut State, vring: &Vring) {
        let Some(mem) = st.mem.as_ref().map(|m| m.memory()) else {
            return;
        };
        let mut delivered = false;
        while let Some(fault) = st.faults.front().copied() {
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else { break };
            st.faults.pop_front();
            let head = chain.head_index();
            let len = match chain.writer(&mem) {
                Ok(mut w) if w.available_bytes() >= fault.as_slice().len() => {
                    match w.write_all(fault.as_slice()) {
                        Ok(()) => fault.as_slice().len() as u32,
                        Err(_) => 0,
                    }
                }
                _ => 0,
            };
            if len == 0 {
                st.stats.bad_chains += 1;
                st.stats.faults_dropped += 1;
                self.telemetry.fault_dropped(&fault, "bad_buffer");
            } else {
                st.stats.faults_delivered += 1;
                self.telemetry.fault_reported(&fault);
            }
            if vring.add_used(head, len).is_err() {
                break;
            }
            delivered = true;
        }
        if delivered && vring.needs_notification().unwrap_or(true) {
            let _ = vring.signal_used_queue();
        }
        // Out of buffers with faults waiting: ask the driver to kick when it
        // adds one (with EVENT_IDX this moves avail_event, which a delivery
        // from the mirror thread does not), and deliver at once if it
        // already has.
        if !st.faults.is_empty() && vring.enable_notification().unwrap_or(false) {
            self.deliver_faults(st, vring);
        }
    }
}
