// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The main job, for now: the daemon and a scripted guest-driver session.
//!
//! Starts `vhost-user-iommu` in this process on a temporary socket, connects
//! the Rust test front-end (VMM + guest driver), and walks through what a
//! Linux guest's virtio-iommu driver does: read the config, probe an
//! endpoint, attach it, map a DMA buffer, translate through the mapping,
//! unmap, detach. Prints each step and the daemon's counters.
//!
//! `cargo run --release -p vhost-user-iommu --example demo`

use std::time::Instant;

use test_frontend::{Request, Status, TestVm, VmOptions, MAP_F_READ, MAP_F_WRITE};
use vhost_user_iommu::config::RawConfig;
use vhost_user_iommu::emulated;
use vhost_user_iommu::mirror::MirrorHandle;
use vhost_user_iommu::serve::{Server, SocketSource};
use vhost_user_iommu::vhu_iommu::IommuBackend;

const ENDPOINT: u32 = 0x08; // 00:01.0
const DOMAIN: u32 = 1;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let socket = std::env::temp_dir().join(format!("vui-demo-{}.sock", std::process::id()));
    let config = RawConfig {
        endpoints: Some("0x08,0x10".into()),
        ..Default::default()
    }
    .check()?;
    let backend = IommuBackend::new(emulated::device(&config)?, MirrorHandle::disconnected());
    let server = Server::bind(&SocketSource::Path(socket.clone()))?;
    let stopper = server.stopper();
    let daemon_backend = backend.clone();
    let daemon = std::thread::spawn(move || server.run(&daemon_backend));
    println!("daemon: listening on {}", socket.display());

    let mut vm = TestVm::connect(&socket, VmOptions::default())?;
    let cfg = vm.iommu_config()?;
    println!(
        "config: page_size_mask {:#x}, input range {:#x}-{:#x}, domains {}-{}, probe_size {}",
        cfg.page_size_mask,
        cfg.input_start,
        cfg.input_end,
        cfg.domain_start,
        cfg.domain_end,
        cfg.probe_size
    );
    let (status, props) = vm.probe(ENDPOINT)?;
    println!("PROBE  endpoint {ENDPOINT:#x}: {status:?}");
    for p in &props {
        let kind = if p.subtype == 1 { "MSI" } else { "reserved" };
        println!("         RESV_MEM {kind:8} {:#x}-{:#x}", p.start, p.end);
    }
    println!(
        "ATTACH endpoint {ENDPOINT:#x} -> domain {DOMAIN}: {:?}",
        vm.attach(DOMAIN, ENDPOINT, 0)?
    );

    // A 64 KiB DMA buffer in guest RAM, mapped at IOVA 0x1_0000_0000.
    let buf = vm.ram().alloc(0x1_0000, 0x1000)?;
    vm.ram().write(buf, b"hello from guest RAM")?;
    let iova = 0x1_0000_0000u64;
    let status = vm.map(DOMAIN, iova, iova + 0xffff, buf, MAP_F_READ | MAP_F_WRITE)?;
    println!(
        "MAP    domain {DOMAIN} iova {iova:#x}-{:#x} -> gpa {buf:#x} rw: {status:?}",
        iova + 0xffff
    );

    let t = backend.with_device(|d| d.translate(ENDPOINT, iova + 6, false));
    println!("translate endpoint {ENDPOINT:#x} iova {:#x}: {t}", iova + 6);

    // A batch: 256 page mappings, one kick.
    let reqs: Vec<Request> = (0..256u64)
        .map(|i| Request::Map {
            domain: DOMAIN,
            virt_start: 0x2_0000_0000 + i * 0x1000,
            virt_end: 0x2_0000_0fff + i * 0x1000,
            phys_start: buf + (i % 16) * 0x1000,
            flags: MAP_F_READ,
        })
        .collect();
    let start = Instant::now();
    let statuses = vm.submit_batch(&reqs)?;
    let ok = statuses.iter().filter(|s| **s == Status::Ok).count();
    println!(
        "MAP    batch of {}: {ok} OK in {:?}",
        reqs.len(),
        start.elapsed()
    );
    let status = vm.unmap(DOMAIN, 0x2_0000_0000, 0x2_0000_0000 + 256 * 0x1000 - 1)?;
    println!("UNMAP  the batch: {status:?}");

    println!(
        "UNMAP  iova {iova:#x}-{:#x}: {:?}",
        iova + 0xffff,
        vm.unmap(DOMAIN, iova, iova + 0xffff)?
    );
    let t = backend.with_device(|d| d.translate(ENDPOINT, iova + 6, false));
    println!("translate endpoint {ENDPOINT:#x} iova {:#x}: {t}", iova + 6);
    println!(
        "DETACH endpoint {ENDPOINT:#x}: {:?}",
        vm.detach(DOMAIN, ENDPOINT)?
    );

    let (model, queues) = backend.stats();
    println!("stats: {model}");
    println!(
        "queues: {} kicks, {} requests, {} bad chains",
        queues.kicks, queues.requests, queues.bad_chains
    );
    drop(vm);
    stopper.stop();
    daemon.join().map_err(|_| "daemon thread panicked")??;
    Ok(())
}
