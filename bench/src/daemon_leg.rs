// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon leg: a guest driver on the vhost-user socket, which kicks
//! and then busy-polls the used ring, as Linux's virtio-iommu driver does.

use std::hint::spin_loop;
use std::path::Path;
use std::time::{Duration, Instant};

use test_frontend::{Request, TestVm, VmOptions};

use crate::histogram::Histogram;
use crate::leg::{Leg, LegError};

/// How long a kick may go without a completion.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Polls of the used ring between two looks at the clock.
const POLLS_PER_CLOCK: u32 = 1024;

/// A [`TestVm`] session driven without sleeping.
#[derive(Debug)]
pub struct DaemonLeg {
    vm: TestVm,
}

impl DaemonLeg {
    /// Connect to the daemon at `socket` with queues long enough for
    /// `requests_per_kick` requests in flight (two descriptors each) and
    /// `ram` bytes of guest RAM at GPA 0.
    pub fn connect(socket: &Path, requests_per_kick: usize, ram: u64) -> Result<Self, LegError> {
        let queue_size = (2 * requests_per_kick).next_power_of_two().max(256);
        let opts = VmOptions {
            regions: vec![test_frontend::RegionSpec::new(0, ram)],
            queue_size: u16::try_from(queue_size).unwrap_or(u16::MAX / 2 + 1),
            ..VmOptions::default()
        };
        Ok(DaemonLeg {
            vm: TestVm::connect(socket, opts)?,
        })
    }

    /// Allocate `len` bytes of guest RAM aligned to `align`.
    pub fn alloc(&self, len: u64, align: u64) -> Result<u64, LegError> {
        Ok(self
            .vm
            .ram()
            .alloc(len, align)
            .map_err(test_frontend::Error::from)?)
    }
}

impl Leg for DaemonLeg {
    fn kick(&mut self, reqs: &[Request], hist: &mut Histogram) -> Result<(), LegError> {
        let start = Instant::now();
        let mut submitted = 0;
        let mut done = 0;
        let mut polls = 0u32;
        while done < reqs.len() {
            if submitted < reqs.len() {
                // More than fit in the ring go in as completions free slots.
                submitted += self.vm.submit(&reqs[submitted..])?;
            }
            match self.vm.poll_completion()? {
                Some(c) => {
                    hist.record_duration(start.elapsed());
                    if !c.status.is_ok() {
                        return Err(LegError::status(c.status, reqs));
                    }
                    done += 1;
                    polls = 0;
                }
                None => {
                    polls += 1;
                    if polls == POLLS_PER_CLOCK {
                        polls = 0;
                        if start.elapsed() > TIMEOUT {
                            return Err(LegError::Timeout(TIMEOUT));
                        }
                    }
                    spin_loop();
                }
            }
        }
        Ok(())
    }

    fn notifications(&mut self) -> Option<u64> {
        Some(self.vm.request_queue().kicks())
    }
}
