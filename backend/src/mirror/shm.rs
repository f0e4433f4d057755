// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Shared memory the daemon hands to QEMU over the mirror socket
//! (docs/mirror-protocol.md §11): a sealed memfd, mapped here read-write and
//! seen by this process only through atomics, because another process reads
//! (or, for the notifier flags, writes) it concurrently.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicU8};
use std::sync::{Mutex, MutexGuard};

/// A memfd of a fixed size, mapped shared and read-write in this process.
///
/// The file is sealed against shrinking and growing, so a peer holding it
/// cannot make this process fault on its own mapping (a truncated shared
/// file raises SIGBUS); [`SharedMem::seal_writes`] additionally stops any
/// new writable mapping (the peer may then only map it read-only).
#[derive(Debug)]
pub struct SharedMem {
    /// The file behind the mapping: replaced by [`SharedMem::renew`].
    file: Mutex<File>,
    name: CString,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is only accessed through atomics (see `as_u64s` and
// `as_u8s`), which are Sync; the pointer stays valid until drop.
unsafe impl Send for SharedMem {}
// SAFETY: as above.
unsafe impl Sync for SharedMem {}

impl SharedMem {
    /// A zeroed memfd of `len` bytes (a multiple of 8), mapped read-write.
    /// Its pages take memory only once written.
    pub fn new(name: &CStr, len: usize) -> io::Result<Self> {
        if len == 0 || !len.is_multiple_of(8) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "shared memory size must be a non-zero multiple of 8",
            ));
        }
        let file = memfd(name, len, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW)?;
        let mut m = Self::map(file, len)?;
        m.name = name.to_owned();
        Ok(m)
    }

    /// Put a new, zeroed file behind the mapping, sealed against resizing
    /// and further seals, in place of the old one (`MAP_FIXED` replaces the
    /// pages atomically: this process reads the new file's at once). Whoever
    /// holds the old file keeps it, but nothing written there is seen here
    /// any more: a mirror peer's file is its own (docs/mirror-protocol.md
    /// §11, notifier flags).
    pub fn renew(&self) -> io::Result<()> {
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let new = memfd(
            &self.name,
            self.len,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
        )?;
        // SAFETY: replaces exactly our own mapping (`ptr`, `len`) with one
        // of a file of that length that cannot shrink; only atomics read it.
        let p = unsafe {
            libc::mmap(
                self.ptr.as_ptr().cast(),
                self.len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                new.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        *file = new;
        Ok(())
    }

    /// A shared read-write mapping of all of `file`, which is `len` bytes
    /// (a non-zero multiple of 8) and must not shrink while mapped: sealed,
    /// as [`Self::new`] makes it, or private to this process and locked (a
    /// truncated shared file raises SIGBUS at the next access).
    pub fn map(file: File, len: usize) -> io::Result<Self> {
        if len == 0 || !len.is_multiple_of(8) || file.metadata()?.len() != len as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a shared mapping needs a file of exactly its non-zero multiple of 8 bytes",
            ));
        }
        // SAFETY: a new shared mapping of `len` bytes of a file that is
        // exactly that long and, per this function's contract, does not
        // shrink; the kernel picks the address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(io::Error::last_os_error)?;
        Ok(Self {
            file: Mutex::new(file),
            name: c"vhost-user-iommu".to_owned(),
            ptr,
            len,
        })
    }

    /// Forbid new writable mappings and writes through the file
    /// (`F_SEAL_FUTURE_WRITE`); this process's mapping stays writable.
    pub fn seal_writes(&self) -> io::Result<()> {
        // SAFETY: F_ADD_SEALS on our own memfd.
        let r = unsafe {
            libc::fcntl(
                self.file().as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_FUTURE_WRITE | libc::F_SEAL_SEAL,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The file, to pass to QEMU.
    pub fn file(&self) -> MutexGuard<'_, File> {
        self.file.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The mapping as 64-bit words.
    pub fn as_u64s(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is `len` bytes, page aligned (so aligned for
        // u64), valid for the life of `self`, and only ever accessed through
        // atomics in this process.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<AtomicU64>(), self.len / 8) }
    }

    /// The mapping as bytes.
    pub fn as_u8s(&self) -> &[AtomicU8] {
        // SAFETY: as for `as_u64s`; AtomicU8 has no alignment requirement.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<AtomicU8>(), self.len) }
    }
}

/// A memfd of `len` bytes with `seals`.
fn memfd(name: &CStr, len: usize, seals: libc::c_int) -> io::Result<File> {
    // SAFETY: `name` is NUL-terminated; the flags are valid.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len as u64)?;
    // SAFETY: F_ADD_SEALS on our own memfd, created with MFD_ALLOW_SEALING.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

impl Drop for SharedMem {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `map`; no reference
        // into it outlives `self` (the slices borrow `self`).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn a_renewed_file_is_seen_at_once_and_the_old_holders_writes_are_not() {
        let m = SharedMem::new(c"vui-test", 4096).unwrap();
        let old = m.file().try_clone().unwrap();
        // SAFETY: a shared mapping of our 4096-byte file, unmapped below.
        let theirs = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                old.as_raw_fd(),
                0,
            )
        };
        assert_ne!(theirs, libc::MAP_FAILED);
        // SAFETY: within the mapping just made.
        unsafe { *theirs.cast::<u8>().add(5) = 1 };
        assert_eq!(m.as_u8s()[5].load(Ordering::SeqCst), 1);
        m.renew().unwrap();
        assert_eq!(m.as_u8s()[5].load(Ordering::SeqCst), 0, "a fresh file");
        // SAFETY: as above.
        unsafe { *theirs.cast::<u8>().add(6) = 1 };
        assert_eq!(m.as_u8s()[6].load(Ordering::SeqCst), 0, "not seen any more");
        // The new file takes no further seals (no peer can lock the next
        // one out of a writable mapping).
        // SAFETY: F_ADD_SEALS on the new file.
        let r = unsafe {
            libc::fcntl(
                m.file().as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_FUTURE_WRITE,
            )
        };
        assert_eq!(r, -1);
        // SAFETY: unmapping the mapping made above.
        unsafe { libc::munmap(theirs, 4096) };
    }

    #[test]
    fn a_sealed_file_cannot_be_resized_or_mapped_writable_again() {
        let m = SharedMem::new(c"vui-test", 8192).unwrap();
        m.as_u64s()[3].store(42, Ordering::Relaxed);
        m.seal_writes().unwrap();
        // Our own mapping stays writable.
        m.as_u64s()[4].store(7, Ordering::Relaxed);
        assert!(m.file().set_len(4096).is_err());
        assert!(m.file().set_len(16384).is_err());
        // SAFETY: a throwaway mapping attempt, unmapped if it succeeded.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                m.file().as_raw_fd(),
                0,
            )
        };
        assert_eq!(p, libc::MAP_FAILED, "a writable mapping of a sealed file");
        // SAFETY: a read-only mapping of 8192 bytes of an 8192-byte file.
        let ro = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_READ,
                libc::MAP_SHARED,
                m.file().as_raw_fd(),
                0,
            )
        };
        assert_ne!(ro, libc::MAP_FAILED);
        // SAFETY: reading within the read-only mapping just made.
        let v = unsafe { *(ro.cast::<u64>().add(3)) };
        assert_eq!(v, 42);
        // SAFETY: unmapping the mapping made above.
        unsafe { libc::munmap(ro, 8192) };
    }
}
