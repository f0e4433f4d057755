// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A *leg*: one way of running requests through the device. Both legs run
//! the same [`Plan`](crate::workload::Plan)s, so their numbers compare.

use std::time::Duration;

use test_frontend::{Request, Status};
use vhost_user_iommu::mirror::table::Leaf;

use crate::histogram::Histogram;
use crate::qemu_standin::StandInFailure;

/// Why a leg could not complete a kick.
#[derive(Debug, thiserror::Error)]
pub enum LegError {
    /// The vhost-user session failed (socket, handshake, rings, ...).
    #[error("front-end: {0}")]
    Vm(#[from] test_frontend::Error),
    /// A request did not succeed: the plan and the device disagree (e.g. an
    /// external daemon whose endpoints or ranges differ).
    #[error("{status:?} for a request in a kick of {kick_len} starting with {first:?}")]
    Status {
        /// The status the device wrote.
        status: Status,
        /// The first request of the kick.
        first: Request,
        /// Requests in the kick.
        kick_len: usize,
    },
    /// The device used nothing for too long.
    #[error("no used buffer after {0:?}: is the daemon stuck?")]
    Timeout(Duration),
    /// The in-process device refused its configuration.
    #[error("device model: {0}")]
    Device(#[from] virtio_iommu::ConfigError),
    /// The in-process guest RAM could not be made.
    #[error("guest RAM: {0}")]
    Ram(String),
    /// After a request completed, QEMU's walk of the shared table did not
    /// find what the request did: a strictness bug of the daemon.
    #[error("strictness: {0}")]
    Strictness(#[from] StrictnessError),
    /// The QEMU stand-in stopped on an error.
    #[error("QEMU stand-in: {0}")]
    Qemu(#[from] StandInFailure),
}

impl LegError {
    /// A request of `kick` got `status`.
    pub fn status(status: Status, kick: &[Request]) -> Self {
        LegError::Status {
            status,
            // Kicks are never empty: the caller received a completion.
            first: kick[0],
            kick_len: kick.len(),
        }
    }
}

/// Runs kicks of requests.
pub trait Leg {
    /// Hand `reqs` to the device as one notification (if it asks for one)
    /// and wait for all of them; record each request's latency — from the
    /// submission of the kick to its completion — in `hist`. A status other
    /// than OK is an error. Must not allocate.
    fn kick(&mut self, reqs: &[Request], hist: &mut Histogram) -> Result<(), LegError>;

    /// Notifications actually sent to the device so far, if the leg has
    /// such a thing.
    fn notifications(&mut self) -> Option<u64> {
        None
    }

    /// What the QEMU side saw so far, if the leg has a QEMU.
    fn mirror(&self) -> Option<MirrorCounters> {
        None
    }
}

/// Counters of a leg with a QEMU on the daemon's translation mirror.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MirrorCounters {
    /// Translations checked through the shared table after MAP/UNMAP.
    pub checks: u64,
    /// MAP and UNMAP records QEMU received (only for domains whose
    /// endpoints have notifiers).
    pub map_unmap_records: u64,
    /// EVENTS batches QEMU acknowledged.
    pub batches: u64,
}

impl MirrorCounters {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &MirrorCounters) -> MirrorCounters {
        MirrorCounters {
            checks: self.checks.saturating_sub(earlier.checks),
            map_unmap_records: self
                .map_unmap_records
                .saturating_sub(earlier.map_unmap_records),
            batches: self.batches.saturating_sub(earlier.batches),
        }
    }
}

/// What QEMU's walk found wrong after a request completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StrictnessError {
    /// QEMU has no tree for the domain of a completed MAP.
    #[error("MAP in domain {domain} completed, but QEMU knows no tree for the domain")]
    NoDomain {
        /// The domain.
        domain: u32,
    },
    /// A completed MAP is not in the table.
    #[error("MAP in domain {domain} completed, but QEMU's walk finds nothing at IOVA {iova:#x}")]
    Missing {
        /// The domain.
        domain: u32,
        /// The IOVA walked.
        iova: u64,
    },
    /// A completed MAP translates elsewhere, or with other permissions.
    #[error(
        "MAP in domain {domain} completed, but QEMU's walk translates IOVA {iova:#x} to \
         {:#x} (read {}, write {}) instead of {want:#x} (read {}, write {})",
        got.phys, got.read, got.write, want_read, want_write
    )]
    Wrong {
        /// The domain.
        domain: u32,
        /// The IOVA walked.
        iova: u64,
        /// The GPA the MAP asked for.
        want: u64,
        /// The MAP's READ flag.
        want_read: bool,
        /// The MAP's WRITE flag.
        want_write: bool,
        /// What the walk found.
        got: Leaf,
    },
    /// A completed UNMAP is still in the table.
    #[error(
        "UNMAP in domain {domain} completed, but QEMU's walk still translates IOVA {iova:#x} \
         to {phys:#x}"
    )]
    StillMapped {
        /// The domain.
        domain: u32,
        /// The IOVA walked.
        iova: u64,
        /// Where it still goes.
        phys: u64,
    },
}
