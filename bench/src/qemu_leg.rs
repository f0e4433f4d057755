// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The QEMU leg: the daemon leg with a QEMU stand-in on the daemon's
//! translation mirror ([`QemuStandIn`]), and the strictness check QEMU's
//! emulated devices rely on: once a MAP has completed, a walk of the shared
//! table translates its IOVAs to its GPAs with its permissions; once an
//! UNMAP has completed, the walk finds nothing (docs/mirror-protocol.md §7,
//! §11). A failed check stops the run.
//!
//! With notifiers ([`QemuVariant::Notifiers`]) the stand-in has set the
//! notifier flags of the workload's endpoints, as QEMU does for a VFIO
//! device behind the vIOMMU: every MAP and UNMAP then also becomes a record
//! the daemon waits for QEMU to acknowledge.

use test_frontend::{Request, MAP_F_READ, MAP_F_WRITE};

use crate::daemon_leg::DaemonLeg;
use crate::histogram::Histogram;
use crate::leg::{Leg, LegError, MirrorCounters, StrictnessError};
use crate::qemu_standin::QemuStandIn;

/// How the QEMU stand-in is set up for a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QemuVariant {
    /// Connected, no notifiers: MAP/UNMAP are table writes only.
    Table,
    /// Connected, the workload's endpoints have notifiers: MAP/UNMAP are
    /// also records, acknowledged before the guest sees them complete.
    Notifiers,
}

impl QemuVariant {
    /// The suffix of the workload's name in the reports.
    pub fn label(self) -> &'static str {
        match self {
            QemuVariant::Table => "+qemu",
            QemuVariant::Notifiers => "+qemu+notif",
        }
    }

    /// Whether the endpoints have notifiers.
    pub fn notifiers(self) -> bool {
        self == QemuVariant::Notifiers
    }
}

/// Check, after `req` completed, that QEMU's view of the table agrees:
/// the first and the last byte of a MAP translate as mapped, those of an
/// UNMAP do not translate. Returns the number of walks made.
pub fn check(qemu: &QemuStandIn, req: &Request) -> Result<u64, StrictnessError> {
    match *req {
        Request::Map {
            domain,
            virt_start,
            virt_end,
            phys_start,
            flags,
        } => {
            let root = qemu
                .root(domain)
                .ok_or(StrictnessError::NoDomain { domain })?;
            let (want_read, want_write) = (flags & MAP_F_READ != 0, flags & MAP_F_WRITE != 0);
            for iova in [virt_start, virt_end] {
                let want = phys_start.wrapping_add(iova - virt_start);
                match qemu.walk(root, iova) {
                    None => return Err(StrictnessError::Missing { domain, iova }),
                    Some(l) if (l.phys, l.read, l.write) == (want, want_read, want_write) => {}
                    Some(got) => {
                        return Err(StrictnessError::Wrong {
                            domain,
                            iova,
                            want,
                            want_read,
                            want_write,
                            got,
                        })
                    }
                }
            }
            Ok(2)
        }
        Request::Unmap {
            domain,
            virt_start,
            virt_end,
        } => {
            // A domain QEMU does not know translates nothing.
            let Some(root) = qemu.root(domain) else {
                return Ok(0);
            };
            for iova in [virt_start, virt_end] {
                if let Some(l) = qemu.walk(root, iova) {
                    return Err(StrictnessError::StillMapped {
                        domain,
                        iova,
                        phys: l.phys,
                    });
                }
            }
            Ok(2)
        }
        _ => Ok(0),
    }
}

/// The daemon leg, checked through a QEMU stand-in after every kick.
#[derive(Debug)]
pub struct QemuLeg<'q> {
    inner: DaemonLeg,
    qemu: &'q QemuStandIn,
    checks: u64,
}

impl<'q> QemuLeg<'q> {
    /// `inner`, a front-end connected to the daemon `qemu` mirrors.
    pub fn new(inner: DaemonLeg, qemu: &'q QemuStandIn) -> Self {
        QemuLeg {
            inner,
            qemu,
            checks: 0,
        }
    }
}

impl Leg for QemuLeg<'_> {
    fn kick(&mut self, reqs: &[Request], hist: &mut Histogram) -> Result<(), LegError> {
        let done = self.inner.kick(reqs, hist);
        // A stand-in that stopped explains a stuck daemon better than the
        // timeout does.
        if let Some(f) = self.qemu.failure() {
            return Err(f.into());
        }
        done?;
        for req in reqs {
            self.checks += check(self.qemu, req)?;
        }
        Ok(())
    }

    fn notifications(&mut self) -> Option<u64> {
        self.inner.notifications()
    }

    fn mirror(&self) -> Option<MirrorCounters> {
        Some(MirrorCounters {
            checks: self.checks,
            map_unmap_records: self.qemu.map_unmap_records(),
            batches: self.qemu.batches(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::Ordering;
    use vhost_user_iommu::mirror::proto::{self, HelloShm, Record};
    use vhost_user_iommu::mirror::MirrorMemory;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;

    const PAGES: u32 = 64;

    fn map(domain: u32, iova: u64, phys: u64, flags: u32) -> Request {
        Request::Map {
            domain,
            virt_start: iova,
            virt_end: iova + 0xfff,
            phys_start: phys,
            flags,
        }
    }

    fn unmap(domain: u32, iova: u64) -> Request {
        Request::Unmap {
            domain,
            virt_start: iova,
            virt_end: iova + 0xfff,
        }
    }

    /// A daemon's side of the mirror, by hand: the shared memory, the
    /// HELLO with its files, and a state dump attaching endpoint 8 to
    /// domain 1. Returns the connected stand-in, the memory, and the
    /// daemon's end of the socket (kept open).
    fn connected(name: &str) -> (QemuStandIn, MirrorMemory, std::os::unix::net::UnixStream) {
        let path = std::env::temp_dir().join(format!(
            "vui-bench-qemu-leg-{}-{name}.sock",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let memory = MirrorMemory::new(PAGES, (1 << 39) - 1).unwrap();
        let mut writer = memory.writer();
        let root = writer.attach(8, 1, false);
        writer.map(&virtio_iommu::Map {
            domain: 1,
            virt_start: 0x1000,
            virt_end: 0x1fff,
            phys_start: 0x5000,
            flags: virtio_iommu::wire::map_flags::READ | virtio_iommu::wire::map_flags::WRITE,
        });
        let shm = HelloShm {
            table_pages: PAGES,
            table_levels: memory.levels as u8,
            flags_len: memory.flags.len() as u32,
        };
        let fds = [
            memory.table.file().as_raw_fd(),
            memory.flags.file().as_raw_fd(),
        ];
        let daemon = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut hello = Vec::new();
            proto::encode_hello(false, 0, shm, (0, 0), &mut hello);
            s.send_with_fds(&[&hello[..]], &fds).unwrap();
            let mut dump = Vec::new();
            let attach = Record::Attach {
                endpoint: 8,
                domain: 1,
                bypass: false,
                root,
            };
            proto::encode_events(1, true, &[Record::GlobalBypass(true), attach], &mut dump);
            std::io::Write::write_all(&mut s, &dump).unwrap();
            s
        });
        let qemu = QemuStandIn::connect(&path).unwrap();
        let stream = daemon.join().unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(qemu.root(1), Some(root));
        assert_eq!(qemu.batches(), 1);
        // The table stays the daemon's: `writer` may be dropped, the memory
        // lives on in `memory`.
        drop(writer);
        (qemu, memory, stream)
    }

    #[test]
    fn a_completed_map_must_be_in_the_table_with_its_gpa_and_permissions() {
        let (qemu, _memory, _daemon) = connected("map");
        assert_eq!(check(&qemu, &map(1, 0x1000, 0x5000, 3)), Ok(2));
        assert_eq!(
            check(&qemu, &map(1, 0x3000, 0x5000, 3)),
            Err(StrictnessError::Missing {
                domain: 1,
                iova: 0x3000
            })
        );
        assert!(matches!(
            check(&qemu, &map(1, 0x1000, 0x6000, 3)),
            Err(StrictnessError::Wrong { want: 0x6000, .. })
        ));
        assert!(matches!(
            check(&qemu, &map(1, 0x1000, 0x5000, MAP_F_READ)),
            Err(StrictnessError::Wrong {
                want_write: false,
                ..
            })
        ));
        assert_eq!(
            check(&qemu, &map(2, 0x1000, 0x5000, 3)),
            Err(StrictnessError::NoDomain { domain: 2 })
        );
    }

    #[test]
    fn a_completed_unmap_must_be_gone_from_the_table() {
        let (qemu, memory, _daemon) = connected("unmap");
        assert_eq!(
            check(&qemu, &unmap(1, 0x1000)),
            Err(StrictnessError::StillMapped {
                domain: 1,
                iova: 0x1000,
                phys: 0x5000
            })
        );
        assert_eq!(check(&qemu, &unmap(1, 0x8000)), Ok(2));
        // The flags QEMU sets are the daemon's to read.
        qemu.set_notified([8]).unwrap();
        assert_eq!(memory.flags.as_u8s()[8].load(Ordering::SeqCst), 1);
        assert!(qemu.set_notified([0x1_0000]).is_err());
    }
}
