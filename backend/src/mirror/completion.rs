// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The completion signal (docs/mirror-protocol.md §15): QEMU hands over,
//! with COMPLETION_FD, a pipe (or eventfd) to write after updates of the
//! request queue's used ring, and its kick page. A vCPU that kicked the
//! queue sleeps in QEMU until its requests are done instead of spinning on
//! the CPU the daemon needs; the page says whether one sleeps now (the pipe
//! is written only then) and on which CPU it ran.
//!
//! The request path reads one address and writes one descriptor number,
//! both fixed for the daemon's life: a new connection's file is put behind
//! the number with `dup3`, its page over the address with `MAP_FIXED`, each
//! an atomic replacement. No lock, and no write or read ever reaches a
//! closed file or an unmapped page.

use std::io;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicBool, AtomicI32, AtomicU32, Ordering};
use std::sync::Mutex;

/// Bytes of the kick page QEMU shares (§15).
pub const KICK_PAGE_LEN: usize = 4096;

/// Why a COMPLETION_FD's files are refused.
#[derive(Debug, thiserror::Error)]
pub enum CompletionError {
    #[error("the completion file is neither a pipe nor an eventfd ({0})")]
    NotPipe(String),
    #[error("the kick page is not a memory file sealed against shrinking, of at least {KICK_PAGE_LEN} bytes")]
    KickPage,
    #[error("cannot use the completion files: {0}")]
    Io(#[from] io::Error),
}

/// The pipe the request path writes after publishing used entries, and
/// the kick page it reads.
#[derive(Debug)]
pub struct CompletionSignal {
    /// The descriptor the request path writes; -1 until the first file.
    slot: AtomicI32,
    /// The kick page's fixed address: QEMU's page while a connection gave
    /// one, else a page of zeroes. `None` if no address could be reserved.
    page: Option<NonNull<AtomicU32>>,
    /// A connected QEMU gave its files: writes reach them.
    armed: AtomicBool,
    /// Serialises installs (the mirror's reader threads).
    install: Mutex<()>,
}

// SAFETY: `page` points at a mapping owned by the signal for its whole
// life, only ever read through atomics; the rest is atomics and a mutex.
unsafe impl Send for CompletionSignal {}
// SAFETY: as above.
unsafe impl Sync for CompletionSignal {}

impl Default for CompletionSignal {
    fn default() -> Self {
        Self {
            slot: AtomicI32::new(-1),
            page: zero_page(None).ok(),
            armed: AtomicBool::new(false),
            install: Mutex::new(()),
        }
    }
}

/// Map a page of zeroes, read-only, at `at` (replacing what is there) or
/// anywhere.
fn zero_page(at: Option<NonNull<AtomicU32>>) -> io::Result<NonNull<AtomicU32>> {
    let (addr, fixed) = match at {
        Some(p) => (p.as_ptr().cast(), libc::MAP_FIXED),
        None => (std::ptr::null_mut(), 0),
    };
    // SAFETY: an anonymous mapping; with MAP_FIXED it replaces only our own
    // page at `at`, which nothing else uses.
    let p = unsafe {
        libc::mmap(
            addr,
            KICK_PAGE_LEN,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | fixed,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned null"))
}

impl CompletionSignal {
    /// Write to `pipe` and read `page` from now on. The pipe is made
    /// non-blocking, so that a peer that never reads it cannot stall the
    /// request path; the page must be sealed against shrinking, so that no
    /// peer can take it from under a read.
    pub fn install(&self, pipe: OwnedFd, page: OwnedFd) -> Result<(), CompletionError> {
        check_pipe(&pipe)?;
        set_nonblocking(&pipe)?;
        if !crate::guest_ram::shrink_sealed(&page) || file_len(&page)? < KICK_PAGE_LEN as u64 {
            return Err(CompletionError::KickPage);
        }
        let _serial = self.install.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = self.page {
            // SAFETY: replaces our own page at `at` with the first page of
            // `page`, a file of at least that size that cannot shrink.
            let p = unsafe {
                libc::mmap(
                    at.as_ptr().cast(),
                    KICK_PAGE_LEN,
                    libc::PROT_READ,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    page.as_raw_fd(),
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(io::Error::last_os_error().into());
            }
        }
        let slot = self.slot.load(Ordering::Acquire);
        if slot < 0 {
            self.slot.store(pipe.into_raw_fd(), Ordering::Release);
        } else {
            // SAFETY: both descriptors are open and ours: `pipe` is owned
            // here, `slot` is owned by `self` until drop. dup3 swaps the
            // file behind `slot` atomically, so a concurrent `signal`
            // writes to the old file or the new one, never a closed number.
            if unsafe { libc::dup3(pipe.as_raw_fd(), slot, libc::O_CLOEXEC) } < 0 {
                return Err(io::Error::last_os_error().into());
            }
        }
        self.armed.store(true, Ordering::Release);
        Ok(())
    }

    /// The connection that gave the files ended: nothing is written until
    /// the next one gives its own, and the page reads as zeroes (no vCPU,
    /// none waiting).
    pub fn disarm(&self) {
        let _serial = self.install.lock().unwrap_or_else(|e| e.into_inner());
        self.armed.store(false, Ordering::Release);
        if let Some(at) = self.page {
            if let Err(e) = zero_page(Some(at)) {
                log::warn!("mirror: cannot unmap the old kick page: {e}");
            }
        }
    }

    /// Whether a connection's files are in use.
    pub fn armed(&self) -> bool {
        self.armed.load(Ordering::Acquire)
    }

    /// Word `i` of the kick page (0: `cpu`, 1: `waiting`).
    fn word(&self, i: usize) -> u32 {
        match self.page {
            // SAFETY: the page is mapped, readable, for as long as `self`
            // lives, and `i` is one of its first two words.
            Some(p) => unsafe { &*p.as_ptr().add(i) }.load(Ordering::Relaxed),
            None => 0,
        }
    }

    /// The CPU the vCPU that kicked last ran on, as QEMU wrote it.
    pub fn vcpu_cpu(&self) -> Option<usize> {
        (self.word(0) as usize).checked_sub(1)
    }

    /// The used ring moved: wake the vCPU asleep on its kick, if one is.
    /// `true` if the pipe was written. Never blocks: a full pipe (a peer
    /// that never drains) drops the signal.
    pub fn signal(&self) -> bool {
        if !self.armed.load(Ordering::Acquire) {
            return false;
        }
        // The used index was stored before this; QEMU stores `waiting`
        // before it looks at the used index. With a fence on both sides,
        // either QEMU sees the new index or we see it waiting.
        fence(Ordering::SeqCst);
        if self.word(1) == 0 {
            return false;
        }
        let one = 1u64.to_ne_bytes();
        let fd = self.slot.load(Ordering::Acquire);
        // SAFETY: `fd` is the slot, open and owned by `self` (armed implies
        // installed); the buffer is 8 readable bytes.
        let _ = unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
        true
    }
}

impl Drop for CompletionSignal {
    fn drop(&mut self) {
        let fd = *self.slot.get_mut();
        if fd >= 0 {
            // SAFETY: the slot is ours, and nothing can write it any more.
            unsafe { libc::close(fd) };
        }
        if let Some(p) = self.page {
            // SAFETY: our own mapping; nothing can read it any more.
            unsafe { libc::munmap(p.as_ptr().cast(), KICK_PAGE_LEN) };
        }
    }
}

/// A pipe's descriptor links to `pipe:[inode]`, an eventfd's to
/// `anon_inode:[eventfd]`.
fn check_pipe(file: &OwnedFd) -> Result<(), CompletionError> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    let link = link.to_string_lossy();
    if link.starts_with("pipe:[") || link == "anon_inode:[eventfd]" {
        Ok(())
    } else {
        Err(CompletionError::NotPipe(link.into_owned()))
    }
}

fn file_len(file: &OwnedFd) -> io::Result<u64> {
    let f = std::fs::File::from(file.try_clone()?);
    Ok(f.metadata()?.len())
}

fn set_nonblocking(file: &OwnedFd) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A kick page as QEMU makes one, and the handle QEMU writes it through:
/// for tests of the daemon's side.
#[cfg(test)]
pub(crate) mod test_page {
    use super::*;
    use crate::mirror::SharedMem;

    pub struct KickPage(pub SharedMem);

    impl KickPage {
        pub fn new() -> Self {
            let m = SharedMem::new(c"kick", KICK_PAGE_LEN).unwrap();
            KickPage(m)
        }
        pub fn file(&self) -> OwnedFd {
            self.0.file().try_clone().unwrap().into()
        }
        fn word(&self, i: usize) -> &AtomicU32 {
            // SAFETY: the mapping is at least a page, aligned, and shared
            // only through atomics.
            unsafe { &*self.0.as_u8s().as_ptr().cast::<AtomicU32>().add(i) }
        }
        pub fn set(&self, cpu: Option<u32>, waiting: bool) {
            self.word(0)
                .store(cpu.map_or(0, |c| c + 1), Ordering::SeqCst);
            self.word(1).store(u32::from(waiting), Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_page::KickPage;
    use super::*;
    use std::io::Read;

    fn pipe() -> (std::fs::File, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two descriptors, which we then own.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: fresh descriptors, each owned once.
        unsafe {
            (
                std::fs::File::from_raw_fd(fds[0]),
                OwnedFd::from_raw_fd(fds[1]),
            )
        }
    }
    use std::os::fd::FromRawFd;

    /// Signals waiting in the pipe (non-blocking read).
    fn pending(r: &mut std::fs::File) -> usize {
        // SAFETY: F_SETFL on a descriptor we own.
        unsafe { libc::fcntl(r.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        let mut buf = [0u8; 256];
        match r.read(&mut buf) {
            Ok(n) => n / 8,
            Err(_) => 0,
        }
    }

    #[test]
    fn the_pipe_is_written_only_while_a_vcpu_waits_and_a_connection_lasts() {
        let c = CompletionSignal::default();
        assert!(!c.signal());
        assert_eq!(c.vcpu_cpu(), None);
        let (mut r, w) = pipe();
        let page = KickPage::new();
        c.install(w, page.file()).unwrap();
        assert!(!c.signal(), "no vCPU waits");
        page.set(Some(1), true);
        assert_eq!(c.vcpu_cpu(), Some(1));
        assert!(c.signal());
        assert!(c.signal());
        assert_eq!(pending(&mut r), 2);
        c.disarm();
        assert!(!c.signal());
        assert_eq!(c.vcpu_cpu(), None, "the old page is gone");
        assert_eq!(pending(&mut r), 0);
    }

    #[test]
    fn a_new_connections_files_replace_the_old_ones_in_place() {
        let c = CompletionSignal::default();
        let (mut r1, w1) = pipe();
        let p1 = KickPage::new();
        c.install(w1, p1.file()).unwrap();
        let slot = c.slot.load(Ordering::Relaxed);
        let (mut r2, w2) = pipe();
        let p2 = KickPage::new();
        c.install(w2, p2.file()).unwrap();
        assert_eq!(c.slot.load(Ordering::Relaxed), slot);
        p1.set(Some(0), true);
        assert!(!c.signal(), "the old page no longer counts");
        p2.set(Some(1), true);
        assert_eq!(c.vcpu_cpu(), Some(1));
        assert!(c.signal());
        assert_eq!(pending(&mut r2), 1);
        assert_eq!(pending(&mut r1), 0);
    }

    #[test]
    fn only_a_pipe_and_a_sealed_page_are_taken_and_the_pipe_never_blocks() {
        let c = CompletionSignal::default();
        let null: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let page = KickPage::new();
        assert!(matches!(
            c.install(null.try_clone().unwrap(), page.file()),
            Err(CompletionError::NotPipe(l)) if l == "/dev/null"
        ));
        let (_r, w) = pipe();
        assert!(matches!(c.install(w, null), Err(CompletionError::KickPage)));
        let unsealed: OwnedFd = tempfile_of(KICK_PAGE_LEN);
        let (_r, w) = pipe();
        assert!(matches!(
            c.install(w, unsealed),
            Err(CompletionError::KickPage)
        ));
        assert!(!c.armed());
        // A pipe nobody reads fills up; signals are then dropped.
        let (_r, w) = pipe();
        c.install(w, page.file()).unwrap();
        page.set(Some(0), true);
        for _ in 0..20_000 {
            assert!(c.signal());
        }
    }

    fn tempfile_of(len: usize) -> OwnedFd {
        let path = std::env::temp_dir().join(format!("vui-kick-{}", std::process::id()));
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(len as u64).unwrap();
        let _ = std::fs::remove_file(&path);
        f.into()
    }
}
