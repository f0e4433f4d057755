// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The table socket (docs/mirror-protocol.md §16.1) as a back-end sees it:
//! the request, the answer with its two files, a reader on them; a bad
//! request refused; a reader that leaves unregistered; a reader stuck in a
//! section revoked at the bound, its socket closed.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use table_reader::wire::{self, Request, Status};
use table_reader::{Mode, Reader};
use vhost_user_iommu::config::RawConfig;
use vhost_user_iommu::listen::{listen_at, Access};
use vhost_user_iommu::mirror::{Hello, MirrorMemory, MirrorServer};
use vhost_user_iommu::table_socket::TableServer;
use vhost_user_iommu::vhu_iommu::{BackendHooks, IommuBackend};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Fields drop in order: the servers before their directory (a mirror
/// server wakes its accept through its socket's path).
struct Bed {
    backend: IommuBackend,
    table: std::path::PathBuf,
    _server: TableServer,
    _mirror: MirrorServer,
    _dir: PathGuard,
}

struct PathGuard(std::path::PathBuf);

impl Drop for PathGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn bed(name: &str) -> Bed {
    let dir = std::env::temp_dir().join(format!("vui-table-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = RawConfig::default().check().unwrap();
    let device = vhost_user_iommu::emulated::device(&config).unwrap();
    let memory = MirrorMemory::for_device(device.device_config()).unwrap();
    memory.readers.set_grace(Duration::from_millis(50));
    let hooks = Arc::new(BackendHooks::default());
    let mirror = MirrorServer::start_with(
        &dir.join("mirror.sock"),
        Hello::new(true, false),
        hooks.clone(),
        Arc::new(memory),
    )
    .unwrap();
    let backend = IommuBackend::new(device, mirror.handle());
    let _ = hooks.0.set(backend.clone());
    let table = dir.join("table.sock");
    let (listener, file) = listen_at(&table, Access::default()).unwrap();
    let server = TableServer::start(listener, Some(file), backend.clone()).unwrap();
    Bed {
        backend,
        table,
        _server: server,
        _mirror: mirror,
        _dir: PathGuard(dir),
    }
}

/// Ask for endpoint 0x28; the answer's status and files.
fn ask(path: &Path, request: &[u8]) -> (UnixStream, Status, Vec<std::fs::File>) {
    let mut s = UnixStream::connect(path).unwrap();
    s.write_all(request).unwrap();
    let mut answer = [0u8; wire::LEN];
    let mut iov = [libc::iovec {
        iov_base: answer.as_mut_ptr().cast(),
        iov_len: answer.len(),
    }];
    let mut fds: [RawFd; 2] = [-1; 2];
    // SAFETY: the iovec covers `answer`.
    let (n, nfds) = unsafe { s.recv_with_fds(&mut iov, &mut fds) }.unwrap();
    assert_eq!(n, wire::LEN);
    let files = fds[..nfds]
        .iter()
        // SAFETY: recvmsg installed these for us.
        .map(|&fd| unsafe { std::fs::File::from_raw_fd(fd) })
        .collect();
    let (status, _) = wire::decode_answer(&answer).unwrap();
    (s, status, files)
}

fn request() -> [u8; wire::LEN] {
    Request {
        endpoint: 0x28,
        flags: wire::F_OWNS_IOTLB,
    }
    .encode()
}

fn until(what: &str, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(5), "{what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_reader_gets_the_table_and_its_page_and_leaves_by_closing() {
    let b = bed("ok");
    let readers = b.backend.mirror().memory().unwrap().readers.clone();
    let (s, status, files) = ask(&b.table, &request());
    assert_eq!(status, Status::Ok);
    assert_eq!(files.len(), 2);
    let r = Reader::new(&files[0], &files[1]).unwrap();
    assert_eq!(r.endpoint(), 0x28);
    // Boot bypass: an unattached endpoint bypasses.
    assert_eq!(r.section(0).unwrap().mode(), Mode::Bypass);
    assert!(readers.owns_iotlb(0x28));
    drop(s);
    until("the reader is unregistered", || readers.is_empty());
}

#[test]
fn a_bad_request_is_refused_and_registers_nothing() {
    let b = bed("bad");
    let mut req = request();
    req[4] = 9;
    let (_s, status, files) = ask(&b.table, &req);
    assert_eq!((status, files.len()), (Status::BadRequest, 0));
    assert!(b.backend.mirror().memory().unwrap().readers.is_empty());
}

#[test]
fn a_reader_stuck_in_a_section_is_revoked_at_the_bound_and_told() {
    let b = bed("stuck");
    let readers = b.backend.mirror().memory().unwrap().readers.clone();
    let (mut s, _, files) = ask(&b.table, &request());
    let r = Reader::new(&files[0], &files[1]).unwrap();
    let stuck = r.section(3).unwrap();
    let t = Instant::now();
    assert_eq!(readers.synchronize(), 1, "revoked");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    drop(stuck);
    assert!(matches!(r.section(0), Err(table_reader::Error::Revoked)));
    // Its socket is closed: it reads EOF.
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(s.read(&mut [0u8; 1]).unwrap(), 0);
    assert!(readers.is_empty());
    assert_eq!(readers.stats().revoked, 1);
}
