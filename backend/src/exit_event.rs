// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The exit events of a connection's vring worker threads, made before the
//! connection and closed after it.
//!
//! vhost-user-backend (0.24) asks the back-end for one exit event per worker
//! thread each time a `VhostUserDaemon` is built, i.e. once per front-end
//! connection here. It keeps the notifier (and closes it with the worker),
//! but turns the consumer into a bare descriptor number for its epoll set
//! and never closes it: one open file per connection, until the open-file
//! limit stops the daemon. And when the back-end cannot make an exit event
//! it has to answer `None`, which leaves a worker no one can stop: the
//! daemon then hangs at the end of that connection.
//!
//! So the events are made up front ([`ExitEvents::prepare`], where running
//! out of files is an error the serve loop reports), handed out by the
//! back-end's `exit_event` hook ([`ExitEvents::take`]), and once the
//! connection's worker threads are gone, the consumers the library
//! abandoned are closed ([`ExitEvents::reclaim`]). Each is closed only if
//! its number still names the eventfd we made, as `kcmp(2)` proves against
//! a duplicate we keep: should a later library close them itself, nothing
//! that reused the number is touched.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, MutexGuard};

use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// `kcmp(2)`'s request to compare two file descriptors' open files.
const KCMP_FILE: libc::c_int = 0;

/// One worker's exit event, before the library takes it.
struct Prepared {
    consumer: EventConsumer,
    notifier: EventNotifier,
    witness: OwnedFd,
}

/// A consumer the library took: its number, and our duplicate of it.
#[derive(Debug)]
struct Given {
    raw: RawFd,
    witness: OwnedFd,
}

#[derive(Default)]
struct Inner {
    prepared: Vec<Prepared>,
    given: Vec<Given>,
}

/// The exit events of the current connection (see the module docs).
#[derive(Default)]
pub struct ExitEvents {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for ExitEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_struct("ExitEvents")
            .field("prepared", &inner.prepared.len())
            .field("given", &inner.given)
            .finish()
    }
}

impl ExitEvents {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Make the exit events of `workers` worker threads for the next
    /// connection. Fails (and keeps nothing) when the process is out of
    /// files.
    pub fn prepare(&self, workers: usize) -> io::Result<()> {
        let mut made = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (consumer, notifier) =
                new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?;
            // SAFETY: `consumer` owns this open descriptor and outlives the
            // borrow, which only duplicates it.
            let witness =
                unsafe { BorrowedFd::borrow_raw(consumer.as_raw_fd()) }.try_clone_to_owned()?;
            made.push(Prepared {
                consumer,
                notifier,
                witness,
            });
        }
        self.lock().prepared = made;
        Ok(())
    }

    /// The next prepared exit event, for the back-end's `exit_event` hook.
    /// `None` only if more were asked for than prepared (a worker that
    /// could never be stopped: logged).
    pub fn take(&self) -> Option<(EventConsumer, EventNotifier)> {
        let mut inner = self.lock();
        let Some(p) = inner.prepared.pop() else {
            log::error!("vring worker without an exit event: more workers than prepared");
            return None;
        };
        inner.given.push(Given {
            raw: p.consumer.as_raw_fd(),
            witness: p.witness,
        });
        Some((p.consumer, p.notifier))
    }

    /// Close what the finished connection left open. Call only once every
    /// worker thread that used these events is gone (the library's epoll
    /// handlers dropped). Returns how many abandoned consumers were closed.
    pub fn reclaim(&self) -> usize {
        let (given, prepared) = {
            let mut inner = self.lock();
            (
                std::mem::take(&mut inner.given),
                std::mem::take(&mut inner.prepared),
            )
        };
        drop(prepared);
        let mut closed = 0;
        for g in given {
            match same_open_file(g.raw, g.witness.as_raw_fd()) {
                Ok(true) => {
                    // SAFETY: `g.raw` is the consumer the library took from
                    // `take` and gave up with `into_raw_fd`; kcmp shows it
                    // still names our eventfd, so nothing else has opened
                    // that number since; the epoll handler that watched it
                    // is gone (the caller's contract), so nothing uses it.
                    // We are its only owner now, and close it once.
                    drop(unsafe { OwnedFd::from_raw_fd(g.raw) });
                    closed += 1;
                }
                Ok(false) => {
                    log::debug!("exit event {}: already closed by its taker", g.raw);
                }
                Err(e) => {
                    log::warn!(
                        "exit event {}: cannot tell whether it is still ours ({e}); left open",
                        g.raw
                    );
                }
            }
        }
        closed
    }
}

/// Whether descriptors `a` and `b` of this process share one open file
/// (`kcmp(2)`, `KCMP_FILE`). A closed `a` is simply not the same.
fn same_open_file(a: RawFd, b: RawFd) -> io::Result<bool> {
    let pid = std::process::id() as libc::c_long;
    // SAFETY: kcmp only compares kernel objects of this process named by
    // integers; no memory is passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid,
            pid,
            KCMP_FILE as libc::c_long,
            a as libc::c_long,
            b as libc::c_long,
        )
    };
    match r {
        0 => Ok(true),
        1..=2 => Ok(false),
        _ => {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EBADF) => Ok(false),
                _ => Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    fn is_open(fd: RawFd) -> bool {
        // SAFETY: F_GETFD reads the flags of a descriptor number; no memory.
        unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
    }

    #[test]
    fn a_consumer_the_taker_abandons_is_closed_after_the_connection() {
        let events = ExitEvents::default();
        events.prepare(1).unwrap();
        let (consumer, notifier) = events.take().unwrap();
        // What vhost-user-backend 0.24 does with it.
        let raw = consumer.into_raw_fd();
        drop(notifier);
        assert!(is_open(raw));
        assert_eq!(events.reclaim(), 1);
        assert_eq!(events.reclaim(), 0, "only once");
    }

    #[test]
    fn a_number_that_names_another_file_by_then_is_left_alone() {
        let events = ExitEvents::default();
        events.prepare(1).unwrap();
        let (consumer, notifier) = events.take().unwrap();
        // As if the taker had closed it and the number had been reused.
        let other = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        // SAFETY: dup2 onto a number `consumer` owns, replacing its file;
        // `consumer` still owns (and later closes) that number.
        assert!(unsafe { libc::dup2(other.as_raw_fd(), consumer.as_raw_fd()) } >= 0);
        assert_eq!(events.reclaim(), 0);
        assert!(
            is_open(consumer.as_raw_fd()),
            "someone else's file stays open"
        );
        drop((consumer, notifier));
    }

    #[test]
    fn prepared_but_unused_events_are_dropped_and_extra_takers_get_none() {
        let events = ExitEvents::default();
        events.prepare(2).unwrap();
        assert!(events.take().is_some());
        assert!(events.take().is_some());
        assert!(events.take().is_none());
        events.prepare(1).unwrap();
        assert_eq!(events.reclaim(), 0, "the taken pairs were closed by drop");
    }

    #[test]
    fn the_same_open_file_is_recognised() {
        let a = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let b = a.try_clone().unwrap();
        let c = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        assert!(same_open_file(a.as_raw_fd(), b.as_raw_fd()).unwrap());
        assert!(!same_open_file(a.as_raw_fd(), c.as_raw_fd()).unwrap());
        assert!(!same_open_file(-1, a.as_raw_fd()).unwrap());
    }
}
