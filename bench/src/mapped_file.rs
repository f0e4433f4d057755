// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A file the daemon shared with QEMU, mapped into this process the way
//! QEMU maps it (docs/mirror-protocol.md §4, §11): the translation table
//! read-only, the notifier flags read-write. The daemon writes (or reads)
//! the same memory concurrently, so it is only seen through atomics.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicU8};

/// A shared mapping of the first `len` bytes of a file; unmapped on drop.
#[derive(Debug)]
pub struct MappedFile {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is only reached through `&[AtomicU64]` / `&[AtomicU8]`
// views (Sync types); the pointer stays valid until drop.
unsafe impl Send for MappedFile {}
// SAFETY: as above.
unsafe impl Sync for MappedFile {}

impl MappedFile {
    /// Map `len` bytes of `file` shared, readable, and writable if
    /// `writable`. Fails if the file is shorter than `len` (`fstat` first,
    /// as QEMU does: touching a mapping past the end of a file is SIGBUS).
    pub fn map(file: &File, len: usize, writable: bool) -> io::Result<Self> {
        let size = file.metadata()?.len();
        if len == 0 || size < len as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the file has {size} bytes, the HELLO announced {len}"),
            ));
        }
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        // SAFETY: a new shared mapping of `len` bytes of a file at least that
        // long (checked above); the kernel picks the address, so no memory of
        // ours is replaced.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave NULL"))?;
        Ok(Self { ptr, len })
    }

    /// The mapping as 64-bit words (the table's entries).
    pub fn words(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is page-aligned (so 8-byte aligned) and holds
        // `len / 8` whole words for as long as `self` lives. AtomicU64 has
        // interior mutability, so the daemon's concurrent stores are no
        // aliasing violation. On a read-only mapping the caller may only
        // load: std allows atomic loads of lock-free sizes up to a pointer's
        // on read-only memory, and this crate only ever loads the table.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<AtomicU64>(), self.len / 8) }
    }

    /// The mapping as bytes (the notifier flags).
    pub fn bytes(&self) -> &[AtomicU8] {
        // SAFETY: `len` bytes valid for as long as `self` lives; AtomicU8
        // has the size and alignment of u8 and interior mutability.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<AtomicU8>(), self.len) }
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, of `len` bytes; no view of it
        // outlives `self` (they borrow it).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::atomic::Ordering;

    fn temp_file(name: &str, bytes: &[u8]) -> File {
        let path =
            std::env::temp_dir().join(format!("vui-bench-mapped-{}-{name}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.write_all(bytes).unwrap();
        let _ = std::fs::remove_file(&path);
        f
    }

    #[test]
    fn words_read_the_files_little_endian_contents() {
        let mut data = vec![0u8; 4096];
        data[8..16].copy_from_slice(&0x1234_5678_9abc_def0u64.to_le_bytes());
        let f = temp_file("words", &data);
        let m = MappedFile::map(&f, 4096, false).unwrap();
        assert_eq!(m.words().len(), 512);
        assert_eq!(m.words()[1].load(Ordering::Acquire), 0x1234_5678_9abc_def0);
    }

    #[test]
    fn a_writable_mapping_writes_the_file() {
        let f = temp_file("bytes", &[0u8; 4096]);
        let m = MappedFile::map(&f, 4096, true).unwrap();
        m.bytes()[7].store(1, Ordering::SeqCst);
        let again = MappedFile::map(&f, 4096, false).unwrap();
        assert_eq!(again.bytes()[7].load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_file_shorter_than_announced_is_refused() {
        let f = temp_file("short", &[0u8; 100]);
        let err = MappedFile::map(&f, 4096, false).unwrap_err();
        assert!(err.to_string().contains("100 bytes"), "{err}");
    }
}
