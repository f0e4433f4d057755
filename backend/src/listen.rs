// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A listening Unix socket that appears at its path only once it listens.
//!
//! `bind(2)` creates the socket file and `listen(2)` follows: between the
//! two, a client that saw the file appear and connects is refused
//! (`ECONNREFUSED`). Launchers (and QEMU's `reconnect`) watch for the file,
//! so the daemon binds at a hidden sibling name, listens, and renames it
//! into place: `rename(2)` is atomic, the path either is absent (or the
//! stale socket of an earlier run) or accepts connections.
//!
//! The socket keeps the address it was bound at: `getsockname` on it (and
//! on the connections it accepts) reports the hidden name, which is how
//! [`crate::peer::connected_to`] is asked to find them.
//!
//! **One process a path.** A daemon started on a path where a socket
//! already is replaces it only if no process serves it: the one that does
//! holds `PATH.lock` (`flock(2)`, the PID inside, as virtiofsd's
//! `SOCKET.pid`), so a second daemon started by mistake is refused with the
//! first one's PID instead of taking its path, and when it exits it
//! removes nothing of the first's. A crashed daemon's lock goes with its
//! process; its stale socket (and lock file) are replaced. And the path a
//! daemon removes as it stops is removed only while it still names the
//! file this one placed ([`SocketFile`] keeps its device and inode): an
//! operator may have replaced it meanwhile.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// The longest path `sockaddr_un` holds, its terminating NUL excluded.
const SUN_PATH_MAX: usize = 107;

/// Who may connect to a socket bound at a path: its mode and group, set
/// before it appears (`None`: the umask's mode, the daemon's group).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Access {
    pub mode: Option<u32>,
    pub group: Option<u32>,
}

impl Access {
    fn apply(&self, path: &Path) -> io::Result<()> {
        if let Some(gid) = self.group {
            std::os::unix::fs::lchown(path, None, Some(gid))?;
        }
        if let Some(mode) = self.mode {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        }
        Ok(())
    }
}

/// The socket file a listener of this process was placed at, and the lock
/// that makes it this process's: removed (as the listener's owner stops,
/// or when dropped: a start that fails later leaves nothing behind) only
/// while its path still names it.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    /// `st_dev`, `st_ino` of the file as placed.
    id: (u64, u64),
    lock: Option<PathLock>,
}

impl SocketFile {
    /// The file at `at` (where it was bound), which will be found at `path`.
    fn placed(at: &Path, path: &Path, lock: PathLock) -> io::Result<Self> {
        Ok(Self {
            path: path.to_owned(),
            id: file_id(&std::fs::symlink_metadata(at)?),
            lock: Some(lock),
        })
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the path still names this file.
    pub fn is_in_place(&self) -> bool {
        names(&self.path, self.id)
    }

    /// Remove the path if it still names this file (leave whatever else is
    /// there now alone), and the lock file, still locked: a daemon that
    /// opened it meanwhile finds it gone once it holds it, and tries again.
    pub fn remove(&self) {
        if self.is_in_place() {
            let _ = std::fs::remove_file(&self.path);
        }
        if let Some(lock) = &self.lock {
            lock.remove();
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        self.remove();
    }
}

/// `st_dev`, `st_ino`: which file this is.
fn file_id(m: &std::fs::Metadata) -> (u64, u64) {
    (m.dev(), m.ino())
}

/// Whether `path` names the file `id` (not following a symlink).
fn names(path: &Path, id: (u64, u64)) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| file_id(&m) == id)
}

/// `PATH.lock`, held with `flock(2)` by the process serving `PATH`, with
/// its PID inside (for the message a second one gets).
#[derive(Debug)]
struct PathLock {
    path: PathBuf,
    /// Held open for as long as the lock is held: closing it (dropping the
    /// [`PathLock`], or the process ending) releases the lock.
    held: File,
}

impl PathLock {
    /// Lock `socket`'s lock file, creating it if needed. `AddrInUse`, with
    /// the holder's PID, if another process holds it.
    fn take(socket: &Path) -> io::Result<Self> {
        let mut name = socket.as_os_str().to_owned();
        name.push(".lock");
        let path = PathBuf::from(name);
        // A file unlinked by its stopping holder between our open and our
        // flock is locked in vain: open again (a few times at most).
        for _ in 0..8 {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .open(&path)?;
            // flock(2), LOCK_EX | LOCK_NB.
            if let Err(e) = file.try_lock() {
                let std::fs::TryLockError::WouldBlock = e else {
                    return Err(e.into());
                };
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                let who = match pid.parse::<u32>() {
                    Ok(p) => format!("process {p}"),
                    Err(_) => "another process".into(),
                };
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "{} is served by {who} (it holds {}): stop that one first",
                        socket.display(),
                        path.display()
                    ),
                ));
            }
            if names(&path, file_id(&file.metadata()?)) {
                file.set_len(0)?;
                write!(file, "{}", std::process::id())?;
                return Ok(Self { path, held: file });
            }
        }
        Err(io::Error::other(format!(
            "{}: its lock file keeps being removed under us",
            socket.display()
        )))
    }

    /// Remove the lock file, still holding the lock (dropping `self`
    /// releases it), if the path still names it: once removed, the path may
    /// name the next daemon's.
    fn remove(&self) {
        if self
            .held
            .metadata()
            .is_ok_and(|m| names(&self.path, file_id(&m)))
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Listen on `path` with `access`, replacing a stale socket there: one no
/// process serves (one that does holds `PATH.lock`: `AddrInUse`, naming
/// it), never another kind of file (`AddrInUse`, as `bind(2)` would
/// answer). The [`SocketFile`] is what its owner removes as it stops.
pub fn listen_at(path: &Path, access: Access) -> io::Result<(UnixListener, SocketFile)> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        _ => {}
    }
    let lock = PathLock::take(path)?;
    let Some(hidden) = hidden_sibling(path) else {
        // No room for a longer name: bind in place, with the short window.
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        access.apply(path)?;
        return Ok((listener, SocketFile::placed(path, path, lock)?));
    };
    let _ = std::fs::remove_file(&hidden);
    let listener = UnixListener::bind(&hidden)?;
    // rename(2) keeps the inode: the file placed is the one bound here.
    match access
        .apply(&hidden)
        .and_then(|()| SocketFile::placed(&hidden, path, lock))
        .and_then(|file| std::fs::rename(&hidden, path).map(|()| file))
    {
        Ok(file) => Ok((listener, file)),
        Err(e) => {
            let _ = std::fs::remove_file(&hidden);
            Err(e)
        }
    }
}

/// `dir/.name.PID`, if it fits in `sockaddr_un`.
fn hidden_sibling(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?;
    let mut hidden = OsString::from(".");
    hidden.push(name);
    hidden.push(format!(".{}", std::process::id()));
    let hidden = path.with_file_name(hidden);
    (hidden.as_os_str().len() <= SUN_PATH_MAX).then_some(hidden)
}

/// Make an `accept(2)` blocked on `listener` (or on a clone of it) return,
/// as a server stops: `shutdown(2)` of a listening socket wakes it with
/// `EINVAL`. Unlike a throwaway connection to the socket's path, this works
/// when the path is gone or names another socket by then.
pub fn wake_accept(listener: &UnixListener) {
    // SAFETY: shutdown(2) on a descriptor `listener` owns and keeps open;
    // it touches no memory of ours.
    unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vui-listen-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_path_accepts_as_soon_as_it_exists_and_no_hidden_name_is_left() {
        let dir = scratch("accepts");
        let path = dir.join("s.sock");
        let (l, _file) = listen_at(&path, Access::default()).unwrap();
        UnixStream::connect(&path).unwrap();
        l.accept().unwrap();
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        let mut names = names;
        names.sort();
        assert_eq!(
            names,
            vec![OsString::from("s.sock"), OsString::from("s.sock.lock")]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_stale_socket_is_replaced_and_a_regular_file_is_not() {
        let dir = scratch("stale");
        let path = dir.join("s.sock");
        drop(UnixListener::bind(&path).unwrap());
        assert!(UnixStream::connect(&path).is_err(), "stale");
        let _l = listen_at(&path, Access::default()).unwrap();
        UnixStream::connect(&path).unwrap();

        let file = dir.join("file");
        std::fs::write(&file, b"keep").unwrap();
        let e = listen_at(&file, Access::default()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_socket_appears_with_its_mode_and_group() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("access");
        let path = dir.join("s.sock");
        // SAFETY: getgid has no arguments and cannot fail.
        let gid = unsafe { libc::getgid() };
        let access = Access {
            mode: Some(0o660),
            group: Some(gid),
        };
        let _l = listen_at(&path, access).unwrap();
        let m = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o660);
        assert_eq!(m.gid(), gid);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_path_with_no_room_for_the_hidden_name_is_bound_in_place() {
        let dir = scratch("long");
        let room = SUN_PATH_MAX - dir.as_os_str().len() - 1;
        let path = dir.join("x".repeat(room));
        assert!(hidden_sibling(&path).is_none());
        let _l = listen_at(&path, Access::default()).unwrap();
        UnixStream::connect(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_socket_file_is_removed_only_while_its_path_still_names_it() {
        let dir = scratch("ours");
        let path = dir.join("s.sock");
        let (_first, mut first) = listen_at(&path, Access::default()).unwrap();
        assert!(first.is_in_place());
        // The first stops serving without removing its socket (as a
        // crashed daemon's lock goes with its process): a second daemon on
        // the same path replaces it.
        drop(first.lock.take());
        let (second_listener, second) = listen_at(&path, Access::default()).unwrap();
        assert!(!first.is_in_place());
        first.remove();
        UnixStream::connect(&path).expect("the second daemon's socket is still there");
        second_listener.accept().unwrap();
        second.remove();
        assert!(
            std::fs::symlink_metadata(&path).is_err(),
            "its own is removed"
        );
        second.remove();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_path_served_by_a_process_is_refused_naming_it_and_free_once_it_stops() {
        let dir = scratch("served");
        let path = dir.join("s.sock");
        let (first_listener, first) = listen_at(&path, Access::default()).unwrap();
        let lock = dir.join("s.sock.lock");
        assert_eq!(
            std::fs::read_to_string(&lock).unwrap(),
            std::process::id().to_string()
        );

        let e = listen_at(&path, Access::default()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("served by process {}", std::process::id()))
                && msg.contains("s.sock.lock"),
            "{msg}"
        );
        // The refused one took nothing: the first still answers at its path.
        assert!(first.is_in_place());
        UnixStream::connect(&path).unwrap();
        first_listener.accept().unwrap();

        // It stops: socket and lock file go, and the path is free.
        first.remove();
        drop(first);
        assert!(std::fs::symlink_metadata(&path).is_err());
        assert!(std::fs::symlink_metadata(&lock).is_err());
        let (_l, again) = listen_at(&path, Access::default()).unwrap();
        assert!(again.is_in_place());

        // Dropped (a start that failed later): nothing left.
        drop(again);
        assert!(std::fs::symlink_metadata(&path).is_err());
        assert!(std::fs::symlink_metadata(&lock).is_err());

        // A lock file left by a crash (no holder, any content) is taken
        // over.
        std::fs::write(&lock, b"12345").unwrap();
        let (_l, _f) = listen_at(&path, Access::default()).unwrap();
        assert_eq!(
            std::fs::read_to_string(&lock).unwrap(),
            std::process::id().to_string()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_socket_file_bound_in_place_is_known_too() {
        let dir = scratch("long-ours");
        let room = SUN_PATH_MAX - dir.as_os_str().len() - 1;
        let path = dir.join("y".repeat(room));
        let (_l, file) = listen_at(&path, Access::default()).unwrap();
        assert!(file.is_in_place());
        file.remove();
        assert!(std::fs::symlink_metadata(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
