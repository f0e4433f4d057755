// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! How the vring worker asks the host scheduler for prompt wake-ups.
//!
//! A guest's request waits for the worker to be woken and *run*; on a host
//! whose CPUs all run vCPUs the woken worker must preempt one. Under EEVDF
//! (Linux ≥ 6.6) a woken task preempts the running one only if it is
//! eligible and its virtual deadline is earlier — and with `RUN_TO_PARITY`
//! the running task is protected until its slice is used. A task may ask for
//! a shorter slice (`sched_setattr` with `sched_runtime` for `SCHED_OTHER`,
//! Linux ≥ 6.12, 0.1–100 ms, no privilege needed): its deadlines come sooner,
//! and `PREEMPT_SHORT` lets it cut a longer-sliced task's protection short
//! (kernel/sched/fair.c, `update_deadline`, `check_preempt_wakeup_fair`).
//! Its share of the CPU does not change: a guest that floods the queue gets
//! the worker no more CPU than before, only sooner.

use std::io;
use std::time::Duration;

/// `struct sched_attr` (include/uapi/linux/sched/types.h), first version.
#[repr(C)]
#[derive(Debug, Default)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
    sched_util_min: u32,
    sched_util_max: u32,
}

/// The shortest and longest slices the kernel accepts
/// (kernel/sched/syscalls.c, `__setscheduler_params`).
pub const SLICE_MIN: Duration = Duration::from_micros(100);
pub const SLICE_MAX: Duration = Duration::from_millis(100);

/// Ask for a scheduler slice of `slice` for the calling thread, keeping its
/// nice value (`SCHED_OTHER`).
pub fn set_thread_slice(slice: Duration) -> io::Result<()> {
    if !(SLICE_MIN..=SLICE_MAX).contains(&slice) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a slice of {slice:?} is outside {SLICE_MIN:?}..={SLICE_MAX:?}"),
        ));
    }
    // SAFETY: getpriority reads the calling thread's nice value; -1 is also
    // a valid nice value, so errno tells failure, and a failure keeps 0.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        sched_policy: libc::SCHED_OTHER as u32,
        sched_nice: nice,
        sched_runtime: slice.as_nanos() as u64,
        ..SchedAttr::default()
    };
    // SAFETY: sched_setattr(2) on the calling thread (pid 0) reads `attr`,
    // a live, fully initialised struct whose `size` field says its length.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The calling thread's slice, as the kernel reports it (0: none asked).
pub fn thread_slice() -> io::Result<Duration> {
    let mut attr = SchedAttr::default();
    // SAFETY: sched_getattr(2) on the calling thread writes at most `size`
    // bytes (the last argument) into `attr`, which is that large.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            &mut attr as *mut SchedAttr,
            std::mem::size_of::<SchedAttr>() as u32,
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Duration::from_nanos(attr.sched_runtime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_struct_is_the_kernels_first_version() {
        // SCHED_ATTR_SIZE_VER1
        assert_eq!(std::mem::size_of::<SchedAttr>(), 56);
    }

    #[test]
    fn slices_outside_the_kernels_range_are_refused_before_the_call() {
        let e = set_thread_slice(Duration::from_micros(10)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(set_thread_slice(Duration::from_secs(1)).is_err());
    }

    #[test]
    fn a_thread_gets_the_slice_it_asks_for_where_the_kernel_has_them() {
        std::thread::spawn(|| match set_thread_slice(Duration::from_micros(300)) {
            // Kernels before 6.12 take the call and ignore the runtime.
            Ok(()) => {
                let got = thread_slice().unwrap();
                assert!([Duration::from_micros(300), Duration::ZERO].contains(&got));
            }
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}"),
        })
        .join()
        .unwrap();
    }
}
