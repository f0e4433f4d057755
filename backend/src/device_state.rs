// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Migration state transfer (vhost-user `SET_DEVICE_STATE_FD` and
//! `CHECK_DEVICE_STATE`): the bytes of [`virtio_iommu::DeviceState`] move
//! through a pipe the front-end hands over, on a thread of their own — the
//! vhost-user handler must not block on the pipe (the front-end reads or
//! writes it only after our reply).

use std::fs::File;
use std::io::{self, Read, Write};
use std::thread::JoinHandle;

use virtio_iommu::state::{ENTRY_LEN, HEADER_LEN, MAX_ENTRIES};

/// The most bytes a state may have: the header and [`MAX_ENTRIES`] entries.
/// A stream that goes on is refused rather than read without bound.
pub const MAX_STATE_LEN: u64 = HEADER_LEN as u64 + MAX_ENTRIES as u64 * ENTRY_LEN as u64;

/// A transfer in flight.
#[derive(Debug)]
pub enum Transfer {
    /// Writing the saved state into the pipe.
    Saving(JoinHandle<io::Result<()>>),
    /// Reading a state to load from the pipe.
    Loading(JoinHandle<io::Result<Vec<u8>>>),
}

/// How a transfer ended.
#[derive(Debug)]
pub enum Finished {
    Saved,
    /// The bytes read, for the device to decode and apply.
    Loaded(Vec<u8>),
}

impl Transfer {
    /// Start writing `bytes` to `file`; the file closes when they are all
    /// written, which ends the front-end's read.
    pub fn save(bytes: Vec<u8>, mut file: File) -> io::Result<Self> {
        let t = std::thread::Builder::new()
            .name("state-save".into())
            .spawn(move || file.write_all(&bytes))?;
        Ok(Self::Saving(t))
    }

    /// Start reading a state from `file`, up to its end.
    pub fn load(file: File) -> io::Result<Self> {
        let t = std::thread::Builder::new()
            .name("state-load".into())
            .spawn(move || {
                let mut bytes = Vec::new();
                file.take(MAX_STATE_LEN + 1).read_to_end(&mut bytes)?;
                if bytes.len() as u64 > MAX_STATE_LEN {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("the state is longer than {MAX_STATE_LEN} bytes"),
                    ));
                }
                Ok(bytes)
            })?;
        Ok(Self::Loading(t))
    }

    /// Wait for the transfer to end (`CHECK_DEVICE_STATE`: the front-end
    /// has finished its side of the pipe).
    pub fn finish(self) -> io::Result<Finished> {
        let joined = match self {
            Self::Saving(t) => t.join().map(|r| r.map(|()| Finished::Saved)),
            Self::Loading(t) => t.join().map(|r| r.map(Finished::Loaded)),
        };
        joined.unwrap_or_else(|_| Err(io::Error::other("the state transfer thread panicked")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{FromRawFd, OwnedFd};

    fn pipe() -> (File, File) {
        let mut fds = [-1; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both were just created and are owned by nobody else.
        let [r, w] = fds.map(|fd| File::from(unsafe { OwnedFd::from_raw_fd(fd) }));
        (r, w)
    }

    #[test]
    fn a_saved_state_comes_out_of_the_pipe_whole_and_a_loaded_one_in() {
        let (mut r, w) = pipe();
        let bytes: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        // More than a pipe holds: the writer must not block the caller.
        let t = Transfer::save(bytes.clone(), w).unwrap();
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        assert_eq!(got, bytes);
        assert!(matches!(t.finish().unwrap(), Finished::Saved));

        let (r, mut w) = pipe();
        let t = Transfer::load(r).unwrap();
        w.write_all(&bytes).unwrap();
        drop(w);
        match t.finish().unwrap() {
            Finished::Loaded(b) => assert_eq!(b, bytes),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_front_end_that_stops_reading_fails_the_save_without_blocking_the_daemon() {
        let (r, w) = pipe();
        drop(r);
        let t = Transfer::save(vec![0; 1 << 20], w).unwrap();
        assert!(t.finish().is_err());
    }
}
