// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vui-table-net`: a minimal vhost-user net back-end behind the vIOMMU
//! that reads vhost-user-iommu's shared translation table itself
//! (docs/mirror-protocol.md §16). It answers the guest's ARP and ping, like
//! DPDK testpmd's `icmpecho`, and every byte it moves — the rings too —
//! goes through an IOVA translated in the table: no IOTLB miss, no
//! message per mapping, so no reply lost on a miss.
//!
//! ```text
//! vui-table-net --socket net.sock --table-socket table.sock --endpoint 00:05.0
//! qemu … -chardev socket,id=n0,path=net.sock -netdev vhost-user,id=net0,chardev=n0 \
//!        -device virtio-net-pci,netdev=net0,iommu_platform=on,addr=05.0
//! ```
//!
//! One thread serves the vhost-user socket and both queues; each pass over
//! the queues is one section of the reader handshake on slot 0, so a guest
//! UNMAP completes only once no pass that may have translated with the old
//! entry is still running. It serves one front-end connection, then exits
//! writing its counters (`--stats`).

mod echo;
mod mem;
mod vhost_user;
mod vring;

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use table_reader::wire::{self, Request, Status};
use table_reader::Reader;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use mem::{Dma, GuestMemory};
use vhost_user::{ConnError, Message};
use vring::{Desc, Vring};

/// `struct virtio_net_hdr_v1` (virtio 1.2 §5.1.6): 12 bytes with
/// VIRTIO_F_VERSION_1.
const NET_HDR: usize = 12;
/// Replies waiting for a receive buffer.
const MAX_PENDING: usize = 256;
const MAX_FRAME: usize = 65_550;

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << 33;
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The vhost-user socket to listen on (QEMU's `-chardev socket`
    /// connects to it).
    #[arg(long)]
    socket: PathBuf,
    /// The daemon's --table-socket.
    #[arg(long)]
    table_socket: PathBuf,
    /// The NIC's endpoint: its PCI address (`BB:DD.F`, segment 0) or its
    /// requester ID (`0x28`).
    #[arg(long, value_parser = parse_endpoint)]
    endpoint: u32,
    /// Check that every ping payload byte past the timestamp is this one
    /// (hex; the guest's `ping -p`).
    #[arg(long, value_parser = parse_hex_byte)]
    pattern: Option<u8>,
    /// Write the counters here when the front-end leaves.
    #[arg(long)]
    stats: Option<PathBuf>,
}

fn parse_endpoint(s: &str) -> Result<u32, String> {
    if let Some(h) = s.strip_prefix("0x") {
        return u32::from_str_radix(h, 16).map_err(|e| e.to_string());
    }
    let (bus, rest) = s.split_once(':').ok_or("BB:DD.F or 0xRID")?;
    let (dev, func) = rest.split_once('.').ok_or("BB:DD.F or 0xRID")?;
    let n = |x: &str, max: u32| match u32::from_str_radix(x, 16) {
        Ok(v) if v <= max => Ok(v),
        _ => Err(format!("{x}: not a hex number up to {max:#x}")),
    };
    Ok(n(bus, 0xff)? << 8 | n(dev, 0x1f)? << 3 | n(func, 7)?)
}

fn parse_hex_byte(s: &str) -> Result<u8, String> {
    u8::from_str_radix(s.trim_start_matches("0x"), 16).map_err(|e| e.to_string())
}

/// What the back-end did.
#[derive(Debug, Default)]
struct Stats {
    frames_in: u64,
    frames_out: u64,
    arp: u64,
    echoes: u64,
    pattern_ok: u64,
    pattern_bad: u64,
    bad_checksum: u64,
    dropped: u64,
    /// Frames neither ARP nor an echo request (IPv6 neighbour discovery…).
    ignored: u64,
    dma_errors: u64,
    passes: u64,
    refused_passes: u64,
    walks: u64,
    pass_ns: u64,
    iotlb_msgs: u64,
}

impl Stats {
    fn line(&self) -> String {
        format!(
            "frames_in={} frames_out={} arp={} echoes={} pattern_ok={} pattern_bad={} \
             bad_checksum={} dropped={} ignored={} dma_errors={} passes={} refused_passes={} walks={} \
             pass_ns={} iotlb_msgs={}",
            self.frames_in,
            self.frames_out,
            self.arp,
            self.echoes,
            self.pattern_ok,
            self.pattern_bad,
            self.bad_checksum,
            self.dropped,
            self.ignored,
            self.dma_errors,
            self.passes,
            self.refused_passes,
            self.walks,
            self.pass_ns,
            self.iotlb_msgs
        )
    }
}

struct Device {
    reader: Reader,
    mem: Option<GuestMemory>,
    vrings: [Vring; 2],
    features: u64,
    protocol_features: u64,
    pending: VecDeque<Vec<u8>>,
    pattern: Option<u8>,
    stats: Stats,
    /// Reused buffers.
    descs: Vec<Desc>,
    frame: Vec<u8>,
    /// The table socket closed: translate nothing more (§16.1).
    cut_off: bool,
    /// The reader page's change count last seen (state changes are logged).
    last_changes: u64,
    /// The last refusal logged (once per kind, not per pass).
    last_refusal: Option<String>,
}

/// Ask the daemon's table socket for the table and a reader page.
fn open_table(path: &PathBuf, endpoint: u32) -> Result<(Reader, UnixStream), String> {
    let mut s = UnixStream::connect(path).map_err(|e| format!("{}: {e}", path.display()))?;
    s.write_all(
        &Request {
            endpoint,
            flags: wire::F_OWNS_IOTLB,
        }
        .encode(),
    )
    .map_err(|e| e.to_string())?;
    let mut answer = [0u8; wire::LEN];
    let mut iov = [libc::iovec {
        iov_base: answer.as_mut_ptr().cast(),
        iov_len: answer.len(),
    }];
    let mut fds: [RawFd; 2] = [-1; 2];
    // SAFETY: the iovec covers `answer`, a live buffer.
    let (n, nfds) =
        unsafe { s.recv_with_fds(&mut iov, &mut fds) }.map_err(|e| format!("recvmsg: {e}"))?;
    // SAFETY: recvmsg installed these fds in this process for us alone.
    let files: Vec<File> = fds[..nfds]
        .iter()
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    if n < answer.len() {
        s.read_exact(&mut answer[n..]).map_err(|e| e.to_string())?;
    }
    let (status, _slots) = wire::decode_answer(&answer).map_err(|e| e.to_string())?;
    if status != Status::Ok || files.len() != 2 {
        return Err(format!(
            "the daemon refused: {status:?} ({} files)",
            files.len()
        ));
    }
    let reader = Reader::new(&files[0], &files[1]).map_err(|e| e.to_string())?;
    Ok((reader, s))
}

impl Device {
    /// One message of the front-end's, answered.
    fn handle(&mut self, conn: &mut UnixStream, mut m: Message) -> io::Result<()> {
        use vhost_user::*;
        let idx = |m: &Message| (m.u32_at(0) & 0xff) as usize;
        match m.request {
            GET_FEATURES => {
                let f =
                    VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM | VHOST_USER_F_PROTOCOL_FEATURES;
                return reply(conn, m.request, &f.to_le_bytes());
            }
            SET_FEATURES => self.features = m.u64_at(0),
            GET_PROTOCOL_FEATURES => {
                let f = PROTOCOL_F_REPLY_ACK | PROTOCOL_F_BACKEND_REQ;
                return reply(conn, m.request, &f.to_le_bytes());
            }
            SET_PROTOCOL_FEATURES => self.protocol_features = m.u64_at(0),
            SET_OWNER | RESET_OWNER | SET_VRING_ERR | SET_BACKEND_REQ_FD => {}
            SET_MEM_TABLE => {
                let n = m.u32_at(0) as usize;
                if n != m.files.len() {
                    log::error!("SET_MEM_TABLE: {n} regions, {} files", m.files.len());
                } else {
                    let files = std::mem::take(&mut m.files);
                    let regions = files
                        .into_iter()
                        .enumerate()
                        .map(|(i, f)| {
                            let at = 8 + 32 * i;
                            (m.u64_at(at), m.u64_at(at + 8), m.u64_at(at + 24), f)
                        })
                        .collect();
                    match GuestMemory::map(regions) {
                        Ok(g) => self.mem = Some(g),
                        Err(e) => log::error!("cannot map guest memory: {e}"),
                    }
                }
            }
            SET_VRING_NUM => {
                if let Some(v) = self.vrings.get_mut(idx(&m)) {
                    v.num = m.u32_at(4).min(32768) as u16;
                }
            }
            SET_VRING_ADDR => {
                // index, flags, then the IOVAs of desc, used, avail.
                if let Some(v) = self.vrings.get_mut(idx(&m)) {
                    (v.desc, v.used, v.avail) = (m.u64_at(8), m.u64_at(16), m.u64_at(24));
                }
            }
            SET_VRING_BASE => {
                if let Some(v) = self.vrings.get_mut(idx(&m)) {
                    v.last_avail = m.u32_at(4) as u16;
                    v.used_idx = v.last_avail;
                }
            }
            GET_VRING_BASE => {
                let i = idx(&m);
                let base = self.vrings.get_mut(i).map_or(0, |v| {
                    v.ready = false;
                    v.kick = None;
                    v.last_avail
                });
                let mut p = [0u8; 8];
                p[0..4].copy_from_slice(&(i as u32).to_le_bytes());
                p[4..8].copy_from_slice(&u32::from(base).to_le_bytes());
                return reply(conn, m.request, &p);
            }
            SET_VRING_KICK | SET_VRING_CALL => {
                let polling = m.u64_at(0) & 0x100 != 0;
                let file = if polling { None } else { m.files.pop() };
                if let Some(v) = self.vrings.get_mut(idx(&m)) {
                    if m.request == SET_VRING_KICK {
                        v.ready = file.is_some();
                        v.kick = file;
                        // Without VHOST_USER_F_PROTOCOL_FEATURES a ring is
                        // enabled by its kick.
                        if self.features & VHOST_USER_F_PROTOCOL_FEATURES == 0 {
                            v.enabled = true;
                        }
                    } else {
                        v.call = file;
                    }
                }
            }
            SET_VRING_ENABLE => {
                if let Some(v) = self.vrings.get_mut(idx(&m)) {
                    v.enabled = m.u32_at(4) != 0;
                }
            }
            IOTLB_MSG => {
                // QEMU tells every ACCESS_PLATFORM back-end of the used
                // rings at start and passes on its notifiers' UNMAPs: this
                // back-end keeps no IOTLB, the table is its translation.
                self.stats.iotlb_msgs += 1;
            }
            other => log::debug!("vhost-user request {other} ignored"),
        }
        if m.need_reply() {
            reply(conn, m.request, &0u64.to_le_bytes())?;
        }
        Ok(())
    }

    /// One pass over both queues, in one section: take the guest's
    /// frames, answer them into its receive buffers.
    fn pass(&mut self) {
        let Some(mem) = self.mem.as_ref() else {
            return;
        };
        if self.cut_off {
            self.stats.refused_passes += 1;
            return;
        }
        let t0 = Instant::now();
        let section = match self.reader.section(0) {
            Ok(s) => s,
            Err(e) => {
                self.stats.refused_passes += 1;
                note_refusal(&mut self.last_refusal, &e.to_string());
                return;
            }
        };
        if self.reader.changes() != self.last_changes {
            self.last_changes = self.reader.changes();
            log::info!("endpoint state: {:?}", section.mode());
        }
        let mut dma = Dma::new(&section, mem);
        // virtio-net's queues: 0 receive (device → driver), 1 transmit.
        let [rx, tx] = &mut self.vrings;
        let mut reply = Vec::new();
        if tx.ready && tx.enabled {
            let mut used = false;
            loop {
                let head = match tx.pop(&mut dma, &mut self.descs) {
                    Ok(Some(h)) => h,
                    Ok(None) => break,
                    Err(e) => {
                        self.stats.refused_passes += 1;
                        note_refusal(&mut self.last_refusal, &e.to_string());
                        break;
                    }
                };
                self.frame.clear();
                let mut ok = true;
                for d in self.descs.iter().filter(|d| !d.write) {
                    let at = self.frame.len();
                    let len = (d.len as usize).min(MAX_FRAME - at);
                    self.frame.resize(at + len, 0);
                    if let Err(e) = dma.read(d.addr, &mut self.frame[at..]) {
                        log::warn!("transmit buffer: {e}");
                        ok = false;
                        break;
                    }
                }
                if tx.push_used(&mut dma, head, 0).is_err() {
                    self.stats.dma_errors += 1;
                }
                used = true;
                if !ok || self.frame.len() < NET_HDR {
                    self.stats.dma_errors += 1;
                    continue;
                }
                self.stats.frames_in += 1;
                if log::log_enabled!(log::Level::Debug) {
                    let segs: Vec<_> = self
                        .descs
                        .iter()
                        .map(|d| (d.addr, d.len, section.translate(d.addr, 1, false).ok()))
                        .collect();
                    log::debug!(
                        "frame {} of {} bytes in {segs:x?}: {:02x?}",
                        self.stats.frames_in,
                        self.frame.len() - NET_HDR,
                        &self.frame[NET_HDR..self.frame.len().min(NET_HDR + 40)]
                    );
                }
                match echo::answer(&self.frame[NET_HDR..], self.pattern, &mut reply) {
                    echo::Verdict::Arp => self.stats.arp += 1,
                    echo::Verdict::Echo { pattern_ok } => {
                        self.stats.echoes += 1;
                        match pattern_ok {
                            Some(true) => self.stats.pattern_ok += 1,
                            Some(false) => self.stats.pattern_bad += 1,
                            None => {}
                        }
                    }
                    echo::Verdict::BadChecksum => self.stats.bad_checksum += 1,
                    echo::Verdict::Other => {
                        self.stats.ignored += 1;
                        let f = &self.frame[NET_HDR..];
                        // IPv6 neighbour discovery is expected; anything
                        // else is worth a look.
                        if f.get(12..14) != Some(&[0x86, 0xdd]) && self.stats.ignored <= 4 {
                            log::info!(
                                "frame ignored ({} bytes): {:02x?}",
                                f.len(),
                                &f[..f.len().min(48)]
                            );
                        }
                    }
                }
                if !reply.is_empty() {
                    if self.pending.len() >= MAX_PENDING {
                        self.stats.dropped += 1;
                    } else {
                        self.pending.push_back(std::mem::take(&mut reply));
                    }
                }
            }
            if used && tx.publish(&mut dma).is_err() {
                self.stats.dma_errors += 1;
            }
        }
        if rx.ready && rx.enabled && !self.pending.is_empty() {
            let mut used = false;
            while let Some(frame) = self.pending.front() {
                let head = match rx.pop(&mut dma, &mut self.descs) {
                    Ok(Some(h)) => h,
                    Ok(None) => break,
                    Err(e) => {
                        note_refusal(&mut self.last_refusal, &e.to_string());
                        break;
                    }
                };
                // The header (no offloads, one buffer), then the frame.
                let mut hdr = [0u8; NET_HDR];
                hdr[10] = 1;
                let mut src = hdr.iter().chain(frame.iter()).copied();
                let mut written = 0u32;
                let mut chunk = Vec::new();
                let mut ok = true;
                for d in self.descs.iter().filter(|d| d.write) {
                    chunk.clear();
                    chunk.extend(src.by_ref().take(d.len as usize));
                    if chunk.is_empty() {
                        break;
                    }
                    if let Err(e) = dma.write(d.addr, &chunk) {
                        log::warn!("receive buffer: {e}");
                        ok = false;
                        break;
                    }
                    written += chunk.len() as u32;
                }
                let complete = ok && src.next().is_none();
                if rx
                    .push_used(&mut dma, head, if complete { written } else { 0 })
                    .is_err()
                {
                    self.stats.dma_errors += 1;
                }
                used = true;
                if complete {
                    self.stats.frames_out += 1;
                } else {
                    self.stats.dma_errors += 1;
                }
                self.pending.pop_front();
            }
            if used && rx.publish(&mut dma).is_err() {
                self.stats.dma_errors += 1;
            }
        }
        self.stats.walks += dma.walks;
        self.stats.passes += 1;
        drop(section);
        self.stats.pass_ns += t0.elapsed().as_nanos() as u64;
    }
}

fn note_refusal(last: &mut Option<String>, what: &str) {
    if last.as_deref() != Some(what) {
        log::warn!("DMA refused: {what}");
        *last = Some(what.to_string());
    }
}

fn drain(f: &File) {
    let mut b = [0u8; 8];
    let _ = (&*f).read(&mut b);
}

fn serve(dev: &mut Device, mut conn: UnixStream, table: &UnixStream) -> Result<(), ConnError> {
    loop {
        // A closed table socket stays readable: poll it no more (-1 is
        // skipped by poll).
        let table_fd = if dev.cut_off { -1 } else { table.as_raw_fd() };
        let mut fds = vec![conn.as_raw_fd(), table_fd];
        fds.extend(
            dev.vrings
                .iter()
                .filter_map(|v| v.kick.as_ref().map(|k| k.as_raw_fd())),
        );
        let mut polled: Vec<libc::pollfd> = fds
            .iter()
            .map(|&fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `polled` is a valid array of pollfds for the call.
        let n = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, 1000) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        if polled[1].revents != 0 && !dev.cut_off {
            // Revoked, or the daemon is gone: a restarted daemon has a new
            // table, and this one would go stale. Fail safe: no more DMA.
            log::error!(
                "the daemon closed the table socket (revoked, or the daemon is gone): \
                 no more DMA; restart this back-end with the daemon"
            );
            dev.cut_off = true;
        }
        for v in &dev.vrings {
            if let Some(k) = &v.kick {
                if polled[2..]
                    .iter()
                    .any(|p| p.fd == k.as_raw_fd() && p.revents != 0)
                {
                    drain(k);
                }
            }
        }
        dev.pass();
        if polled[0].revents != 0 {
            let m = vhost_user::recv(&mut conn)?;
            dev.handle(&mut conn, m)?;
        }
    }
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let (reader, table) = match open_table(&cli.table_socket, cli.endpoint) {
        Ok(r) => r,
        Err(e) => {
            log::error!("cannot read the daemon's table: {e}");
            std::process::exit(1);
        }
    };
    log::info!(
        "reading the shared table for endpoint {:#x}: {:?}",
        reader.endpoint(),
        reader.state()
    );
    let _ = std::fs::remove_file(&cli.socket);
    let listener = match UnixListener::bind(&cli.socket) {
        Ok(l) => l,
        Err(e) => {
            log::error!("{}: {e}", cli.socket.display());
            std::process::exit(1);
        }
    };
    let conn = match listener.accept() {
        Ok((c, _)) => c,
        Err(e) => {
            log::error!("accept: {e}");
            std::process::exit(1);
        }
    };
    let mut dev = Device {
        reader,
        mem: None,
        vrings: Default::default(),
        features: 0,
        protocol_features: 0,
        pending: VecDeque::new(),
        pattern: cli.pattern,
        stats: Stats::default(),
        descs: Vec::new(),
        frame: Vec::new(),
        last_refusal: None,
        last_changes: 0,
        cut_off: false,
    };
    let end = serve(&mut dev, conn, &table);
    let line = dev.stats.line();
    log::info!(
        "front-end gone ({}): {line}",
        end.err().map_or(String::new(), |e| e.to_string())
    );
    if let Some(p) = &cli.stats {
        if let Err(e) = std::fs::write(p, format!("{line}\n")) {
            log::error!("{}: {e}", p.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_as_pci_addresses_or_requester_ids() {
        assert_eq!(parse_endpoint("00:05.0"), Ok(0x28));
        assert_eq!(parse_endpoint("01:1f.7"), Ok(0x1ff));
        assert_eq!(parse_endpoint("0x28"), Ok(0x28));
        assert!(parse_endpoint("00:20.0").is_err());
        assert!(parse_endpoint("junk").is_err());
        assert_eq!(parse_hex_byte("a5"), Ok(0xa5));
    }
}
