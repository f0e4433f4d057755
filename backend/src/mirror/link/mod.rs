// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon's end of the mirror connection (docs/mirror-protocol.md §6–§8).
//!
//! One listener thread accepts QEMU; each connection has a reader thread
//! (HELLO, ACK, FAULT, SYSTEM_RESET) and a writer thread that drains an
//! outgoing buffer. [`MirrorHandle::publish`] only appends to that buffer, so
//! it never blocks on QEMU (§8 rule 4 is kept by construction); a caller that
//! must complete a guest UNMAP/DETACH only once QEMU dropped the translation
//! waits with [`MirrorHandle::wait`], holding no lock the vhost-user thread
//! needs (§8 rule 2).

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::completion::CompletionSignal;
use super::proto::{
    self, FromQemu, Header, ProtoError, Record, FEATURE_COMPLETION_FD, FEATURE_VFIO_DEVICES,
    HEADER_LEN, MAX_RECORDS,
};
use super::MirrorMemory;

/// What the daemon does when QEMU talks (called on the reader thread).
pub trait MirrorHooks: Send + Sync + 'static {
    /// A new connection: call `send` with the full current state (§6 step 2)
    /// while holding the lock under which the state changes, so that no
    /// change is both in the dump and published after it.
    fn snapshot(&self, send: &mut dyn FnMut(&[Record]));
    /// An emulated device's DMA faulted (§10).
    fn fault(&self, fault: proto::Fault);
    /// QEMU reset the machine (§9): reset the translation state and call
    /// `send` with `RESET(system, id)` + `GLOBAL_BYPASS`, under the state lock.
    fn system_reset(&self, id: u32, send: &mut dyn FnMut(&[Record]));
    /// QEMU forwarded an iommufd-backed VFIO device (§14): its endpoint,
    /// the device ID QEMU's bind returned, QEMU's iommufd file and the
    /// device's file. Only called when the daemon offered
    /// [`FEATURE_VFIO_DEVICES`]. An error is logged; the device stays
    /// blocked.
    fn vfio_device_added(
        &self,
        _endpoint: u32,
        _devid: u32,
        _iommufd: OwnedFd,
        _device: OwnedFd,
    ) -> Result<(), String> {
        Err("this daemon does not take VFIO devices".into())
    }
    /// QEMU took back the device of `endpoint` (hot-unplug).
    fn vfio_device_removed(&self, _endpoint: u32) {}
    /// QEMU's HELLO arrived with its `instance` (2.2; 0 from an older
    /// QEMU), before the dump of this connection is made (§6 rule 4: a
    /// state recovered for another QEMU must not reach this one).
    fn qemu_hello(&self, _instance: u64) {}
    /// A HELLO naming `instance` would reset a recovered state (§6 rule
    /// 4): it then counts only from the front-end's process (§6 rule 7),
    /// so the link waits for the front-end first.
    fn hello_would_reset(&self, _instance: u64) -> bool {
        false
    }
    /// The connection that forwarded devices ended: they go with it (§14).
    fn vfio_devices_gone(&self) {}
    /// A peer connected, was refused, or its connection ended (for the
    /// control socket's events; nothing to do with the state).
    fn peer(&self, _event: PeerEvent) {}
}

/// What happened to a peer of the mirror socket ([`MirrorHooks::peer`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerEvent {
    /// Connection `connection` is served; `pid`: the peer's process, if
    /// found.
    Connected { connection: u64, pid: Option<u32> },
    /// A connection was refused ([`Refusal`]).
    Refused { pid: Option<u32>, why: Refusal },
    /// Connection `connection` ended, [`Ended`] how.
    Gone { connection: u64, how: Ended },
}

/// Why a connection is refused (§6 rules 7 and "one QEMU at a time").
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the front-end's QEMU is process {0}")]
    NotFrontEnd(u32),
    #[error("QEMU (connection {0}) is connected")]
    Busy(u64),
}

impl Refusal {
    /// Its name in the control socket's `mirror_refused` event.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::NotFrontEnd(_) => "not_front_end",
            Refusal::Busy(_) => "busy",
        }
    }
}

/// How a mirror connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// QEMU closed it.
    Closed,
    /// QEMU exited with data unread (the connection was reset).
    Reset,
    /// What QEMU sent could not be read or was not the protocol.
    Error,
    /// The daemon closed it first: no ACK or no read in time, or the
    /// daemon stopping.
    Dropped,
}

impl Ended {
    /// Its name in the control socket's `mirror_disconnected` event.
    pub fn name(self) -> &'static str {
        match self {
            Ended::Closed => "closed",
            Ended::Reset => "reset",
            Ended::Error => "error",
            Ended::Dropped => "dropped",
        }
    }
}

/// A batch to wait for: acknowledged when QEMU's highest ACK reaches `seq`
/// on connection `conn`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    conn: u64,
    seq: u64,
}

/// How a wait ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitOutcome {
    /// QEMU applied the batch and its notifiers returned.
    Acked,
    /// The connection closed: QEMU dropped its whole copy (§6 step 4).
    Disconnected,
    /// [`MirrorHandle::release_waiters`] was called (the vring is stopping).
    Released,
    /// No ACK in time: the connection was closed, so QEMU fails safe.
    TimedOut,
}

#[derive(Debug, Default)]
struct Conn {
    id: u64,
    stream: Option<UnixStream>,
    out: Vec<u8>,
    next_seq: u64,
    acked: u64,
    closed: bool,
    /// The sequence number of the connect dump's SYNC batch (0 until sent).
    dump_seq: u64,
    /// The peer's process (`SO_PEERCRED`).
    peer: Option<u32>,
}

impl Conn {
    /// QEMU has applied the dump: its copy is the daemon's state.
    fn synced(&self) -> bool {
        !self.closed && self.dump_seq > 0 && self.acked >= self.dump_seq
    }
}

#[derive(Debug, Default)]
struct Link {
    conn: Option<Conn>,
    next_conn_id: u64,
    release_epoch: u64,
    stop: bool,
    /// A QEMU may hold a frozen copy of the state (§6 rule 4): one synced
    /// since the front-end came, or the daemon recovered the state of a
    /// QEMU that kept running ([`MirrorHandle::expect_peer`]).
    expect_peer: bool,
    /// The vhost-user front-end's process, while one is connected: the only
    /// process whose mirror connection is served (§6 rule 7).
    front_end: Option<u32>,
    /// A front-end is connected, but its process could not be found: any
    /// process is served, as without one.
    front_end_unknown: bool,
    /// How long a new connection has to send its HELLO (§6 rule 7);
    /// [`HELLO_DEADLINE`] if unset.
    hello_deadline: Option<Duration>,
    /// How long a write may wait for the peer to read; [`WRITE_DEADLINE`]
    /// if unset.
    write_deadline: Option<Duration>,
    /// How long QEMU has to acknowledge its dump; [`DUMP_ACK_DEADLINE`] if
    /// unset.
    dump_ack_deadline: Option<Duration>,
    /// The last connection closed because its peer had hung up (before its
    /// reader saw the EOF): QEMU's doing, not the daemon's
    /// ([`Ended::Closed`], not [`Ended::Dropped`]).
    hung_up: Option<u64>,
}

/// How long QEMU has to acknowledge its dump (§12).
pub const DUMP_ACK_DEADLINE: Duration = Duration::from_secs(10);

/// How long a HELLO that must decide a recovered state's owner waits for
/// the front-end to connect (QEMU reconnects its vhost-user socket with
/// `reconnect-ms`).
pub const FRONT_END_WAIT: Duration = Duration::from_secs(30);

/// How long a write to the peer may wait for it to read: a peer that stops
/// reading is closed, not left holding the socket (§12).
pub const WRITE_DEADLINE: Duration = Duration::from_secs(10);

/// How long a new connection has to send its HELLO before it is closed: a
/// peer that never says who it is must not hold the socket (§6 rule 7).
pub const HELLO_DEADLINE: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<Link>,
    /// Requests may have to wait for a synced QEMU ([`MirrorHandle::wait_synced`]
    /// looks under the lock); false only while one is synced or none is
    /// expected. Set under the lock whenever that may have changed.
    gate: AtomicBool,
    /// Signalled on ACKs, closes, releases and new outgoing bytes.
    changed: Condvar,
    /// The connected QEMU's completion eventfd (§15).
    completion: CompletionSignal,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Link> {
        // A panic elsewhere must not take the mirror down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The publishing side, cloned into whoever changes the translation state.
#[derive(Clone, Debug, Default)]
pub struct MirrorHandle {
    shared: Arc<Shared>,
    memory: Option<Arc<MirrorMemory>>,
}

mod conn;
mod handle;
mod read;
mod server;
#[cfg(test)]
mod tests;

use crate::listen::Access;
use conn::{close, close_if_hung_up, dumped, enqueue};
pub use read::ReadError;
use read::{read_loop, Inbound};
pub use server::{Hello, MirrorServer};
