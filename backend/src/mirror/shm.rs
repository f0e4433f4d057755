//! Shared memory the daemon hands to QEMU over the mirror socket
//! (docs/mirror-protocol.md §11): a sealed memfd, mapped here read-write and
//! seen by this process only through atomics, because another process reads
//! (or, for the notifier flags, writes) it concurrently.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicU8};

/// A memfd of a fixed size, mapped shared and read-write in this process.
///
/// The file is sealed against shrinking and growing, so a peer holding it
/// cannot make this process fault on its own mapping (a truncated shared
/// file raises SIGBUS); [`SharedMem::seal_writes`] additionally stops any
/// new writable mapping (the peer may then only map it read-only).
#[derive(Debug)]
pub struct SharedMem {
    file: File,
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
    pub fn new(name: &std::ffi::CStr, len: usize) -> io::Result<Self> {
        if len == 0 || !len.is_multiple_of(8) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "shared memory size must be a non-zero multiple of 8",
            ));
        }
        // SAFETY: `name` is NUL-terminated; the flags are valid.
        let fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64)?;
        // SAFETY: F_ADD_SEALS on our own memfd, created with MFD_ALLOW_SEALING.
        let r = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Self::map(file, len)
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
        Ok(Self { file, ptr, len })
    }

    /// Forbid new writable mappings and writes through the file
    /// (`F_SEAL_FUTURE_WRITE`); this process's mapping stays writable.
    pub fn seal_writes(&self) -> io::Result<()> {
        // SAFETY: F_ADD_SEALS on our own memfd.
        let r = unsafe {
            libc::fcntl(
                self.file.as_raw_fd(),
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
    pub fn file(&self) -> &File {
        &self.file
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
