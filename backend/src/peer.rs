// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Who is at the other end of a Unix socket: its process, as the kernel
//! recorded it at connect time (`SO_PEERCRED`, unix(7)).
//!
//! The mirror socket (docs/mirror-protocol.md §6) must be the front-end's
//! QEMU: the process at the other end of the vhost-user connection. vhost-
//! user-backend accepts that connection itself and keeps the stream; it is
//! found again among the daemon's open files as the connected socket whose
//! local address is the vhost-user socket's path (an accepted socket
//! reports its listener's address, `getsockname`).

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

/// The process at the other end of a connected Unix socket.
pub fn peer_pid(sock: &impl AsRawFd) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a live
    // ucred of that size.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0 && cred.pid > 0).then_some(cred.pid as u32)
}

/// The local address of a Unix socket, if it has a path.
pub fn local_path(sock: &impl AsRawFd) -> Option<std::path::PathBuf> {
    let fd = sock.as_raw_fd();
    // SAFETY: an all-zero sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: getsockname writes at most `len` bytes into `addr`.
    let rc =
        unsafe { libc::getsockname(fd, (&mut addr as *mut libc::sockaddr_un).cast(), &mut len) };
    if rc != 0 || addr.sun_family != libc::AF_UNIX as libc::sa_family_t {
        return None;
    }
    let path: Vec<u8> = addr
        .sun_path
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    use std::os::unix::ffi::OsStringExt;
    (!path.is_empty()).then(|| std::ffi::OsString::from_vec(path).into())
}

/// Whether `fd` is a listening socket.
fn listening(fd: RawFd) -> bool {
    let mut on: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes one int into `on`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut on as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    rc == 0 && on != 0
}

/// The processes connected to the listening socket at `path` through the
/// daemon's open connections: the front-end's, once vhost-user-backend has
/// accepted it.
pub fn connected_to(path: &Path) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<RawFd>().ok())
        .filter(|&fd| !listening(fd) && local_path(&Fd(fd)).as_deref() == Some(path))
        .filter_map(|fd| peer_pid(&Fd(fd)))
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// A descriptor number, borrowed for one call.
struct Fd(RawFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::{UnixListener, UnixStream};

    #[test]
    fn an_accepted_connection_is_found_by_its_listeners_path_with_its_peer() {
        let dir = std::env::temp_dir().join(format!("vui-peer-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        assert!(
            connected_to(&path).is_empty(),
            "the listener itself is not a peer"
        );
        let c = UnixStream::connect(&path).unwrap();
        let (s, _) = l.accept().unwrap();
        assert_eq!(peer_pid(&s), Some(std::process::id()));
        assert_eq!(peer_pid(&c), Some(std::process::id()));
        assert_eq!(connected_to(&path), vec![std::process::id()]);
        drop(s);
        assert!(connected_to(&path).is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
