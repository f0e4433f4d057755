// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Confinement: `PR_SET_NO_NEW_PRIVS` and a seccomp filter (seccomp(2)) that
//! allows the system calls the daemon makes and nothing else.
//!
//! The daemon parses guest-controlled rings and maps all of guest RAM; a
//! flaw in that path must not become a shell. Once it has bound its sockets
//! and opened its files, it needs no `execve`, no network socket, no
//! `ptrace`, no mount or module call, and only the ioctls of iommufd and
//! VFIO (both of type `';'`). The filter is installed on every thread at
//! once (`SECCOMP_FILTER_FLAG_TSYNC`), and threads made later inherit it.
//!
//! The list was taken from the daemon's own calls (strace of the test
//! suites, emulated and pass-through) and is checked by running every test
//! tier with the filter on; `--seccomp log` lets a call through and has
//! the kernel log it (`audit: type=1326`), for a host whose C library makes
//! calls this one does not.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What happens on a call outside the list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seccomp {
    /// The process is killed (`SIGSYS`, core dump): the default.
    Kill,
    /// The call goes through and the kernel logs it.
    Log,
    /// No filter (no_new_privs is still set).
    None,
}

/// Why the daemon could not confine itself.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("prctl(PR_SET_NO_NEW_PRIVS): {0}")]
    NoNewPrivs(std::io::Error),
    #[error("building the seccomp filter: {0}")]
    Build(seccompiler::BackendError),
    #[error("installing the seccomp filter: {0}")]
    Install(seccompiler::Error),
    #[error("seccomp filters are built for x86_64 and aarch64 only")]
    Arch,
}

/// `ioctl` request types the daemon issues: iommufd's and VFIO's (both
/// `';'`, include/uapi/linux/iommufd.h and vfio.h).
const IOCTL_TYPE_IOMMUFD_VFIO: u64 = b';' as u64;

/// Confine the calling process: no new privileges, then `mode`'s filter on
/// every thread.
pub fn confine(mode: Seccomp) -> Result<(), ConfineError> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(ConfineError::NoNewPrivs(std::io::Error::last_os_error()));
    }
    let action = match mode {
        Seccomp::None => return Ok(()),
        Seccomp::Kill => SeccompAction::KillProcess,
        Seccomp::Log => SeccompAction::Log,
    };
    let program = filter(action)?;
    seccompiler::apply_filter_all_threads(&program).map_err(ConfineError::Install)
}

/// The compiled filter: the allowed calls pass, anything else meets
/// `mismatch`.
pub fn filter(mismatch: SeccompAction) -> Result<BpfProgram, ConfineError> {
    let arch = if cfg!(target_arch = "x86_64") {
        TargetArch::x86_64
    } else if cfg!(target_arch = "aarch64") {
        TargetArch::aarch64
    } else {
        return Err(ConfineError::Arch);
    };
    let f = SeccompFilter::new(rules()?, mismatch, SeccompAction::Allow, arch)
        .map_err(ConfineError::Build)?;
    f.try_into().map_err(ConfineError::Build)
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, ConfineError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(ConfineError::Build)
}

/// One rule per condition: the call is allowed if any of them holds.
fn any_of(conds: Vec<SeccompCondition>) -> Result<Vec<SeccompRule>, ConfineError> {
    conds
        .into_iter()
        .map(|c| SeccompRule::new(vec![c]).map_err(ConfineError::Build))
        .collect()
}

fn rules() -> Result<BTreeMap<i64, Vec<SeccompRule>>, ConfineError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
    // Unix sockets only: nothing the guest could turn into a network
    // connection. (The servers no longer connect to themselves to stop:
    // listen::wake_accept.)
    let unix = libc::AF_UNIX as u64;
    rules.insert(
        libc::SYS_socket,
        any_of(vec![cond(0, SeccompCmpOp::Eq, unix)?])?,
    );
    rules.insert(
        libc::SYS_socketpair,
        any_of(vec![cond(0, SeccompCmpOp::Eq, unix)?])?,
    );
    // iommufd and VFIO; and the terminal and non-blocking queries of the
    // standard library and the logger.
    rules.insert(
        libc::SYS_ioctl,
        any_of(vec![
            cond(
                1,
                SeccompCmpOp::MaskedEq(0xff00),
                IOCTL_TYPE_IOMMUFD_VFIO << 8,
            )?,
            cond(1, SeccompCmpOp::Eq, libc::TCGETS)?,
            cond(1, SeccompCmpOp::Eq, libc::FIONBIO)?,
            cond(1, SeccompCmpOp::Eq, libc::FIOCLEX)?,
        ])?,
    );
    // Thread names.
    rules.insert(
        libc::SYS_prctl,
        any_of(vec![
            cond(0, SeccompCmpOp::Eq, libc::PR_SET_NAME as u64)?,
            cond(0, SeccompCmpOp::Eq, libc::PR_GET_NAME as u64)?,
        ])?,
    );
    // Signals to this process's own threads only (abort, thread wake-ups).
    let pid = std::process::id() as u64;
    rules.insert(
        libc::SYS_tgkill,
        any_of(vec![cond(0, SeccompCmpOp::Eq, pid)?])?,
    );
    Ok(rules)
}

/// Calls allowed whatever their arguments.
#[cfg(target_arch = "x86_64")]
const ARCH_ONLY: &[i64] = &[
    libc::SYS_access,
    libc::SYS_arch_prctl,
    libc::SYS_epoll_wait,
    libc::SYS_poll,
    libc::SYS_readlink,
    libc::SYS_rename,
    libc::SYS_unlink,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_clone,
];

#[cfg(target_arch = "aarch64")]
const ARCH_ONLY: &[i64] = &[libc::SYS_newfstatat, libc::SYS_fstat, libc::SYS_clone];

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const ARCH_ONLY: &[i64] = &[];

const COMMON: &[i64] = &[
    // Files: guest memory and state files, /proc and /sys reads (spare CPU,
    // the front-end's process), the sockets' paths.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_openat,
    libc::SYS_close,
    libc::SYS_lseek,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_getdents64,
    libc::SYS_readlinkat,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlinkat,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_memfd_create,
    libc::SYS_eventfd2,
    // Memory.
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_membarrier,
    // Waiting.
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_ppoll,
    libc::SYS_futex,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_gettimeofday,
    libc::SYS_sched_yield,
    // Sockets: vhost-user, the mirror and the control socket (src/control/:
    // accept4, poll/ppoll on a client with a timeout, SO_RCVTIMEO and
    // SO_SNDTIMEO, shutdown before closing on a client; a thread per
    // client, clone3 below; nothing it needs is not already here).
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_recvmsg,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_shutdown,
    // Threads and scheduling: the worker's placement and slice.
    libc::SYS_clone3,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_set_robust_list,
    libc::SYS_set_tid_address,
    libc::SYS_rseq,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getcpu,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_setaffinity,
    libc::SYS_sched_getattr,
    libc::SYS_sched_setattr,
    // The worker's nice value, kept when it asks for a slice (src/sched.rs).
    libc::SYS_getpriority,
    libc::SYS_getrusage,
    libc::SYS_prlimit64,
    libc::SYS_getrandom,
    libc::SYS_kcmp,
    // Signals.
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
];

static ALLOWED: std::sync::LazyLock<Vec<i64>> =
    std::sync::LazyLock::new(|| COMMON.iter().chain(ARCH_ONLY).copied().collect());

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::process::Command;

    /// Set by the parent test: this process is the child that confines
    /// itself and then tries a call outside the list.
    const CHILD: &str = "VUI_CONFINE_CHILD";

    #[test]
    #[ignore = "the child process's part of the test below"]
    fn confined_child() {
        let Ok(what) = std::env::var(CHILD) else {
            return;
        };
        let mode = if what.starts_with("log") {
            Seccomp::Log
        } else {
            Seccomp::Kill
        };
        confine(mode).unwrap();
        match what.trim_start_matches("log-") {
            // A network socket: refused.
            "inet" => {
                // SAFETY: socket(2) with integer arguments; the descriptor,
                // if any, is closed at exit.
                let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
                println!("inet socket: {fd}");
            }
            // execve: refused.
            "exec" => {
                let e = Command::new("/bin/true").status();
                println!("exec: {e:?}");
            }
            // What the daemon does: allowed.
            _ => {
                let t = std::thread::spawn(|| std::fs::read_to_string("/proc/self/stat").unwrap());
                assert!(!t.join().unwrap().is_empty());
                let l = std::os::unix::net::UnixListener::bind(
                    std::env::temp_dir().join(format!("vui-confine-{}", std::process::id())),
                )
                .unwrap();
                drop(l);
                println!("allowed: ok");
            }
        }
    }

    fn run_child(what: &str) -> std::process::Output {
        Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "confine::tests::confined_child"])
            .args(["--nocapture", "--test-threads=1"])
            .env(CHILD, what)
            .output()
            .unwrap()
    }

    #[test]
    fn calls_outside_the_list_kill_the_process_and_the_daemons_own_calls_pass() {
        for what in ["inet", "exec"] {
            let out = run_child(what);
            assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{what}: {out:?}");
        }
        let out = run_child("allowed");
        assert!(out.status.success(), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("allowed: ok"));
    }

    #[test]
    fn log_mode_lets_a_call_outside_the_list_through() {
        let out = run_child("log-inet");
        assert!(out.status.success(), "{out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!stdout.contains("inet socket: -1"), "{stdout}");
    }

    #[test]
    fn the_filter_compiles_for_each_mode() {
        for a in [SeccompAction::KillProcess, SeccompAction::Log] {
            assert!(!filter(a).unwrap().is_empty());
        }
    }
}
