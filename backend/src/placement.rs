// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Where the vring worker runs: beside the vCPU it serves, when that vCPU
//! sleeps on its kick (docs/mirror-protocol.md §15).
//!
//! A vCPU that kicks the request queue and sleeps until its requests are
//! done leaves its CPU free for exactly that long. Waking the worker on
//! that CPU costs a context switch; waking it on another costs that CPU's
//! wake-up from idle — measured here (a 2-vCPU virtual machine): a
//! cross-process round trip through two pipes takes 3.6 µs on one CPU and
//! 42 µs across two, and the scheduler places the wakee on an idle CPU
//! whenever one exists (kernel/sched/fair.c, `select_idle_sibling`). So
//! while polling is off, the worker asks to run on the CPU the vCPU last
//! kicked from (QEMU writes it in the kick page), within the CPUs the
//! daemon was started on; when polling resumes it gets them all back (a
//! poller beside its own vCPU would only take that vCPU's time).

use std::io;

/// The calling thread's placement: the CPUs it may use, and the one it is
/// held to, if any.
#[derive(Debug)]
pub struct Placement {
    /// The CPUs the thread was allowed when first asked (an operator's
    /// `taskset` or cpuset stays the bound).
    home: libc::cpu_set_t,
    /// The CPU the thread is held to.
    on: Option<usize>,
}

impl Placement {
    /// The calling thread's current placement.
    pub fn current() -> io::Result<Self> {
        // SAFETY: an all-zero cpu_set_t is a valid empty set.
        let mut home: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: sched_getaffinity(2) writes at most the set's size into
        // `home`, a live cpu_set_t.
        let rc = unsafe {
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut home)
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { home, on: None })
    }

    /// The CPUs the thread may use.
    pub fn home_cpus(&self) -> Vec<usize> {
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| self.allowed(c))
            .collect()
    }

    /// The CPU the thread is held to.
    pub fn held_to(&self) -> Option<usize> {
        self.on
    }

    fn allowed(&self, cpu: usize) -> bool {
        // SAFETY: CPU_ISSET only reads the set; out-of-range CPUs are
        // refused by the bound check.
        cpu < libc::CPU_SETSIZE as usize && unsafe { libc::CPU_ISSET(cpu, &self.home) }
    }

    /// Hold the thread to `cpu` (if it is one of its own): it moves there
    /// now. Nothing is done if it is held there already.
    pub fn follow(&mut self, cpu: Option<usize>) -> io::Result<()> {
        let Some(cpu) = cpu.filter(|&c| self.allowed(c)) else {
            return Ok(());
        };
        if self.on == Some(cpu) {
            return Ok(());
        }
        // SAFETY: an all-zero cpu_set_t is a valid empty set.
        let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `cpu` is below CPU_SETSIZE (checked by `allowed`).
        unsafe { libc::CPU_SET(cpu, &mut one) };
        set_affinity(&one)?;
        self.on = Some(cpu);
        Ok(())
    }

    /// Give the thread all of its CPUs again.
    pub fn release(&mut self) -> io::Result<()> {
        if self.on.take().is_some() {
            set_affinity(&self.home)?;
        }
        Ok(())
    }
}

fn set_affinity(set: &libc::cpu_set_t) -> io::Result<()> {
    // SAFETY: sched_setaffinity(2) on the calling thread reads the set,
    // a live cpu_set_t of the size given.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu_now() -> usize {
        // SAFETY: sched_getcpu takes nothing and returns the current CPU.
        unsafe { libc::sched_getcpu() as usize }
    }

    #[test]
    fn a_thread_follows_a_cpu_of_its_own_and_gets_them_all_back() {
        std::thread::spawn(|| {
            let mut p = Placement::current().unwrap();
            let last = (0..libc::CPU_SETSIZE as usize)
                .rfind(|&c| p.allowed(c))
                .unwrap();
            p.follow(Some(last)).unwrap();
            assert_eq!(p.held_to(), Some(last));
            assert_eq!(cpu_now(), last, "moved at once");
            // Not one of its CPUs, or none said: stays.
            p.follow(Some(libc::CPU_SETSIZE as usize + 1)).unwrap();
            p.follow(None).unwrap();
            assert_eq!(p.held_to(), Some(last));
            p.release().unwrap();
            assert_eq!(p.held_to(), None);
            let again = Placement::current().unwrap();
            // SAFETY: CPU_EQUAL only reads both sets.
            assert!(unsafe { libc::CPU_EQUAL(&again.home, &p.home) });
        })
        .join()
        .unwrap();
    }
}
