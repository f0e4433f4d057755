// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The named workloads: which MAP/UNMAP requests go out, and how many per
//! notification, the way guest drivers send them.
//!
//! A workload becomes a [`Plan`]: set-up requests (ATTACH), one *cycle* of
//! kicks that leaves the device as it found it (every MAP undone by an
//! UNMAP), and tear-down requests (DETACH). A run repeats the cycle.

use clap::ValueEnum;
use test_frontend::{Request, MAP_F_READ, MAP_F_WRITE};

/// Where the workloads place their mappings: 4 GiB, aligned for any size.
pub const IOVA_BASE: u64 = 1 << 32;

/// A named MAP/UNMAP mix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum)]
pub enum Workload {
    /// QD1: MAP 4 KiB, UNMAP it, one request per kick (Linux's driver in
    /// strict mode, `iommu.strict=1`).
    #[value(name = "strict-4k")]
    Strict4k,
    /// strict-4k with 64 KiB mappings.
    #[value(name = "strict-64k")]
    Strict64k,
    /// strict-4k with 2 MiB mappings (huge pages).
    #[value(name = "strict-2m")]
    Strict2m,
    /// --qd MAPs in one kick, then their --qd UNMAPs in the next (--size each).
    Batch,
    /// strict-4k round-robin over --domains domains, each with its own
    /// endpoint (--size each).
    Domains,
}

impl Workload {
    /// Every workload, in the order they run.
    pub const ALL: [Workload; 5] = [
        Workload::Strict4k,
        Workload::Strict64k,
        Workload::Strict2m,
        Workload::Batch,
        Workload::Domains,
    ];

    /// The name on the command line and in the reports.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Strict4k => "strict-4k",
            Workload::Strict64k => "strict-64k",
            Workload::Strict2m => "strict-2m",
            Workload::Batch => "batch",
            Workload::Domains => "domains",
        }
    }

    /// One line on what it sends.
    pub fn description(self, p: &Params) -> String {
        match self {
            Workload::Strict4k | Workload::Strict64k | Workload::Strict2m => format!(
                "QD1: MAP {0}, UNMAP {0}, one request per kick",
                size_name(self.mapping_size(p))
            ),
            Workload::Batch => format!(
                "{0} MAPs of {1} per kick, then {0} UNMAPs per kick",
                p.qd,
                size_name(p.size)
            ),
            Workload::Domains => format!(
                "QD1: MAP {}, UNMAP, round-robin over {} domains with one endpoint each",
                size_name(p.size),
                p.domains
            ),
        }
    }

    /// Bytes per mapping.
    pub fn mapping_size(self, p: &Params) -> u64 {
        match self {
            Workload::Strict4k => 4 << 10,
            Workload::Strict64k => 64 << 10,
            Workload::Strict2m => 2 << 20,
            Workload::Batch | Workload::Domains => p.size,
        }
    }

    /// The largest number of requests in one kick.
    pub fn requests_per_kick(self, p: &Params) -> usize {
        match self {
            Workload::Batch => p.qd,
            _ => 1,
        }
    }

    /// The requests, mapping guest memory at `phys` (which holds at least
    /// [`mapping_size`](Self::mapping_size) bytes).
    pub fn plan(self, p: &Params, phys: u64) -> Plan {
        let size = self.mapping_size(p);
        let map = |domain, iova| Request::Map {
            domain,
            virt_start: iova,
            virt_end: iova + size - 1,
            phys_start: phys,
            flags: MAP_F_READ | MAP_F_WRITE,
        };
        let unmap = |domain, iova| Request::Unmap {
            domain,
            virt_start: iova,
            virt_end: iova + size - 1,
        };
        let domains = match self {
            Workload::Domains => p.domains,
            _ => 1,
        };
        let kicks = match self {
            Workload::Strict4k | Workload::Strict64k | Workload::Strict2m => {
                vec![vec![map(1, IOVA_BASE)], vec![unmap(1, IOVA_BASE)]]
            }
            Workload::Batch => {
                // Distinct IOVAs, one physical buffer: a driver mapping the
                // same page for several devices' DMA does the same.
                let iovas = (0..p.qd as u64).map(|i| IOVA_BASE + i * size);
                vec![
                    iovas.clone().map(|iova| map(1, iova)).collect(),
                    iovas.map(|iova| unmap(1, iova)).collect(),
                ]
            }
            Workload::Domains => (1..=domains)
                .flat_map(|d| [vec![map(d, IOVA_BASE)], vec![unmap(d, IOVA_BASE)]])
                .collect(),
        };
        let endpoint = |d: u32| p.first_endpoint + d - 1;
        Plan {
            setup: (1..=domains)
                .map(|d| Request::Attach {
                    domain: d,
                    endpoint: endpoint(d),
                    flags: 0,
                })
                .collect(),
            kicks,
            teardown: (1..=domains)
                .map(|d| Request::Detach {
                    domain: d,
                    endpoint: endpoint(d),
                })
                .collect(),
        }
    }
}

/// What the workloads are built from (the command line's values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    /// Requests per kick in `batch`.
    pub qd: usize,
    /// Domains (and endpoints) in `domains`.
    pub domains: u32,
    /// Bytes per mapping in `batch` and `domains` (a multiple of 4 KiB).
    pub size: u64,
    /// Endpoint of domain 1; domain `d` gets endpoint `first_endpoint + d - 1`.
    pub first_endpoint: u32,
}

impl Params {
    /// The endpoints the workloads attach, as a daemon `--endpoints` value.
    pub fn endpoint_list(&self) -> String {
        let last = self.first_endpoint + self.domains.max(1) - 1;
        format!("{:#x}-{last:#x}", self.first_endpoint)
    }
}

/// The requests of one workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Sent once before measuring (ATTACH each endpoint to its domain).
    pub setup: Vec<Request>,
    /// One cycle: the requests of each kick, in order. After a whole cycle
    /// the domains hold no mapping.
    pub kicks: Vec<Vec<Request>>,
    /// Sent once after measuring (DETACH).
    pub teardown: Vec<Request>,
}

impl Plan {
    /// Requests in one cycle.
    pub fn cycle_len(&self) -> usize {
        self.kicks.iter().map(Vec::len).sum()
    }
}

/// `4 KiB`, `2 MiB`, ... for whole binary units, else bytes.
pub fn size_name(bytes: u64) -> String {
    for (shift, unit) in [(30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{} {unit}", bytes >> shift);
        }
    }
    format!("{bytes} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Params = Params {
        qd: 8,
        domains: 3,
        size: 16 << 10,
        first_endpoint: 0x10,
    };

    fn is_map(r: &Request) -> bool {
        matches!(r, Request::Map { .. })
    }

    #[test]
    fn strict_workloads_map_then_unmap_one_request_per_kick() {
        for (w, size) in [
            (Workload::Strict4k, 0x1000),
            (Workload::Strict64k, 0x1_0000),
            (Workload::Strict2m, 0x20_0000),
        ] {
            let plan = w.plan(&P, 0x20_0000);
            assert_eq!(
                plan.kicks,
                [
                    vec![Request::Map {
                        domain: 1,
                        virt_start: IOVA_BASE,
                        virt_end: IOVA_BASE + size - 1,
                        phys_start: 0x20_0000,
                        flags: MAP_F_READ | MAP_F_WRITE,
                    }],
                    vec![Request::Unmap {
                        domain: 1,
                        virt_start: IOVA_BASE,
                        virt_end: IOVA_BASE + size - 1,
                    }]
                ]
            );
            assert_eq!(
                plan.setup,
                [Request::Attach {
                    domain: 1,
                    endpoint: 0x10,
                    flags: 0
                }]
            );
            assert_eq!(w.requests_per_kick(&P), 1);
        }
    }

    #[test]
    fn batch_sends_qd_maps_then_qd_unmaps_of_disjoint_ranges() {
        let plan = Workload::Batch.plan(&P, 0x20_0000);
        assert_eq!(plan.kicks.len(), 2);
        assert_eq!(plan.cycle_len(), 16);
        assert!(plan.kicks[0].iter().all(is_map));
        assert!(!plan.kicks[1].iter().any(is_map));
        let starts: Vec<u64> = plan.kicks[0]
            .iter()
            .map(|r| match r {
                Request::Map { virt_start, .. } => *virt_start,
                _ => unreachable!(),
            })
            .collect();
        assert!(starts.windows(2).all(|w| w[1] - w[0] == P.size));
    }

    #[test]
    fn domains_round_robin_with_one_endpoint_each() {
        let plan = Workload::Domains.plan(&P, 0x20_0000);
        assert_eq!(plan.kicks.len(), 6);
        let domain_of = |r: &Request| match *r {
            Request::Map { domain, .. } | Request::Unmap { domain, .. } => domain,
            _ => unreachable!(),
        };
        let order: Vec<u32> = plan.kicks.iter().map(|k| domain_of(&k[0])).collect();
        assert_eq!(order, [1, 1, 2, 2, 3, 3]);
        assert_eq!(plan.setup.len(), 3);
        assert_eq!(
            plan.teardown[2],
            Request::Detach {
                domain: 3,
                endpoint: 0x12
            }
        );
        assert_eq!(P.endpoint_list(), "0x10-0x12");
    }

    #[test]
    fn sizes_are_named_in_binary_units() {
        assert_eq!(size_name(4096), "4 KiB");
        assert_eq!(size_name(2 << 20), "2 MiB");
        assert_eq!(size_name(6 << 10), "6 KiB");
        assert_eq!(size_name(100), "100 B");
    }
}
