// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `--table-socket`: where back-ends come for the shared translation table
//! (docs/mirror-protocol.md §16.1).
//!
//! One thread, `table-readers`, polls the listener and every reader's
//! socket. A reader sends one 16-byte request naming its endpoint; the
//! daemon answers with the table and a reader page of the reader's own
//! (`SCM_RIGHTS`) and keeps the connection: its end is the reader's end.
//! Nothing a reader sends or fails to send holds the daemon: the request
//! must arrive within a second, anything after it closes the connection,
//! and the handshake's waits are bounded by the registry
//! (src/mirror/readers.rs).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use table_reader::layout::SLOTS;
use table_reader::wire::{self, Request, Status};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::listen::SocketFile;
use crate::vhu_iommu::{IommuBackend, ReaderError};

/// How long a new connection has to send its request.
const REQUEST_DEADLINE: Duration = Duration::from_secs(1);
/// The poll tick: how soon a stop is seen.
const TICK_MS: i32 = 200;

/// The running table socket; dropping it stops the thread and revokes every
/// reader.
#[derive(Debug)]
pub struct TableServer {
    stop: Arc<AtomicBool>,
    /// The socket file, removed as the server stops if it is still there.
    file: Option<SocketFile>,
    thread: Option<JoinHandle<()>>,
}

impl TableServer {
    /// Serve readers from `listener` for `backend`'s table.
    pub fn start(
        listener: UnixListener,
        file: Option<SocketFile>,
        backend: IommuBackend,
    ) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("table-readers".into())
            .spawn(move || serve(&listener, &backend, &s))?;
        Ok(Self {
            stop,
            file,
            thread: Some(thread),
        })
    }
}

impl Drop for TableServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(f) = &self.file {
            f.remove();
        }
    }
}

/// A registered reader's connection.
struct Conn {
    id: u64,
    stream: UnixStream,
}

fn serve(listener: &UnixListener, backend: &IommuBackend, stop: &AtomicBool) {
    log::info!("table socket: serving readers of the shared translation table");
    let readers = backend_readers(backend);
    let mut conns: Vec<Conn> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let mut fds: Vec<libc::pollfd> = std::iter::once(listener.as_raw_fd())
            .chain(conns.iter().map(|c| c.stream.as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds for the
        // length of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, TICK_MS) };
        if n <= 0 {
            continue;
        }
        // Readers that spoke or hung up are gone: a reader sends nothing
        // after its request.
        let gone: Vec<u64> = fds[1..]
            .iter()
            .zip(&conns)
            .filter(|(p, _)| p.revents != 0)
            .map(|(_, c)| c.id)
            .collect();
        for id in gone {
            conns.retain(|c| c.id != id);
            if let Some(r) = &readers {
                if let Some(e) = r.remove(id) {
                    log::info!(
                        "table socket: reader {id} (endpoint {:#x}) left",
                        e.endpoint
                    );
                }
            }
        }
        if fds[0].revents != 0 {
            loop {
                match listener.accept() {
                    Ok((stream, _)) => {
                        if let Some(c) = admit(stream, backend) {
                            conns.push(c);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        log::warn!("table socket: accept failed: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                        break;
                    }
                }
            }
        }
    }
    if let Some(r) = readers {
        r.revoke_all();
    }
}

fn backend_readers(backend: &IommuBackend) -> Option<Arc<crate::mirror::Readers>> {
    backend.mirror().memory().map(|m| m.readers.clone())
}

/// Read a new connection's request, register it, answer with the files.
fn admit(mut stream: UnixStream, backend: &IommuBackend) -> Option<Conn> {
    stream.set_nonblocking(false).ok()?;
    stream.set_read_timeout(Some(REQUEST_DEADLINE)).ok()?;
    stream.set_write_timeout(Some(REQUEST_DEADLINE)).ok()?;
    let mut buf = [0u8; wire::LEN];
    if let Err(e) = stream.read_exact(&mut buf) {
        log::warn!("table socket: no request from a new connection: {e}");
        return None;
    }
    let req = match Request::decode(&buf) {
        Ok(r) => r,
        Err(e) => {
            log::warn!("table socket: bad request ({e}): closed");
            let _ = stream.write_all(&wire::encode_answer(Status::BadRequest, 0));
            return None;
        }
    };
    let owns = req.flags & wire::F_OWNS_IOTLB != 0;
    let entry = match backend.register_table_reader(req.endpoint, owns) {
        Ok(e) => e,
        Err(e) => {
            let status = match e {
                ReaderError::NoTable => Status::NoTable,
                _ => Status::Full,
            };
            log::warn!(
                "table socket: reader of endpoint {:#x} refused: {e}",
                req.endpoint
            );
            let _ = stream.write_all(&wire::encode_answer(status, 0));
            return None;
        }
    };
    let table_fd: RawFd = match backend.mirror().memory() {
        Some(m) => m.table.file().as_raw_fd(),
        None => return None,
    };
    let answer = wire::encode_answer(Status::Ok, SLOTS as u32);
    let page_file = entry.page().file();
    let sent = stream.send_with_fds(&[&answer[..]], &[table_fd, page_file.as_raw_fd()]);
    drop(page_file);
    let readers = backend_readers(backend)?;
    match sent {
        Ok(n) if n == answer.len() => {}
        r => {
            log::warn!("table socket: cannot answer reader {}: {r:?}", entry.id);
            readers.remove(entry.id);
            return None;
        }
    }
    match stream.try_clone() {
        Ok(c) => entry.set_conn(c),
        Err(e) => {
            log::warn!("table socket: {e}");
            readers.remove(entry.id);
            return None;
        }
    }
    log::info!(
        "table socket: reader {} serves endpoint {:#x}{}, state {:?}",
        entry.id,
        entry.endpoint,
        if owns { " (owns its IOTLB)" } else { "" },
        table_reader::EndpointState::decode(
            entry.page().as_u64s()[table_reader::layout::W_STATE].load(Ordering::Relaxed)
        )
    );
    Some(Conn {
        id: entry.id,
        stream,
    })
}
