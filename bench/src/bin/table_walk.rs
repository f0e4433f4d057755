// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What a back-end pays to translate through the shared table itself
//! (docs/mirror-protocol.md §16), in nanoseconds, on this host:
//!
//! - one walk of the table (table-reader's `translate`), over mappings laid
//!   out as Linux's IOVA allocator lays them (4 KiB pages top-down, 4
//!   levels for a 48-bit input range) and over 2 MiB blocks;
//! - a section opened and closed (the reader's half of the handshake: one
//!   store, a full fence, one release store);
//! - a translation through a `Reader` on the daemon's own memfds, in an
//!   open section (what vui-table-net does per ring field and buffer);
//! - the daemon's half: `synchronize` over a reader's 32 idle slots (what
//!   every batch that removes a translation costs with one reader).
//!
//! `cargo run --release -p vhost-user-iommu-bench --bin table-walk [-- ITERATIONS]`

use clap::Parser;
use std::hint::black_box;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use table_reader::layout::SLOTS;
use vhost_user_iommu::mirror::readers::ReaderEntry;
use vhost_user_iommu::mirror::MirrorMemory;
use virtio_iommu::Map;

/// xorshift: reproducible IOVAs to look up, no dependency.
fn next(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

fn per_op(iterations: u64, f: impl FnMut(u64)) -> f64 {
    let mut f = f;
    // Warm up the caches and the branch predictors.
    for i in 0..iterations / 10 {
        f(i);
    }
    let t = Instant::now();
    for i in 0..iterations {
        f(i);
    }
    t.elapsed().as_nanos() as f64 / iterations as f64
}

/// What a back-end pays to translate through the shared table itself, in
/// nanoseconds per operation.
#[derive(Debug, Parser)]
#[command(name = "table-walk")]
struct Cli {
    /// Operations timed per figure
    #[arg(value_name = "ITERATIONS", default_value_t = 5_000_000,
          value_parser = clap::value_parser!(u64).range(10..))]
    iterations: u64,
}

fn main() {
    let iterations = Cli::parse().iterations;
    const PAGES: u64 = 4096;
    let memory = MirrorMemory::new(8192, (1 << 48) - 1).expect("table memory");
    let mut table = memory.writer();
    let root = table.attach(0x28, 1, false);
    // 4 KiB pages downwards from 4 GiB (as Linux's DMA IOVAs), scattered
    // guest pages; then 64 2 MiB blocks at 64 GiB.
    let top = 1u64 << 32;
    for i in 0..PAGES {
        table.map(&Map {
            domain: 1,
            virt_start: top - (i + 1) * 4096,
            virt_end: top - i * 4096 - 1,
            phys_start: ((i * 7919) % (1 << 18)) << 12,
            flags: 3,
        });
    }
    for i in 0..64u64 {
        table.map(&Map {
            domain: 1,
            virt_start: (64 << 30) + (i << 21),
            virt_end: (64 << 30) + ((i + 1) << 21) - 1,
            phys_start: (1 << 30) + (i << 21),
            flags: 3,
        });
    }
    let words = table.words();
    let levels = table.levels();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let iovas: Vec<u64> = (0..PAGES)
        .map(|_| top - (next(&mut seed) % PAGES + 1) * 4096 + (next(&mut seed) & 0xfff))
        .collect();
    let blocks: Vec<u64> = (0..PAGES)
        .map(|_| (64 << 30) + (next(&mut seed) % (64 << 21)))
        .collect();
    println!(
        "shared-table reader costs ({iterations} operations each, {levels}-level table, \
         {PAGES} pages + 64 blocks mapped):"
    );
    let walk_4k = per_op(iterations, |i| {
        let r = table_reader::translate(words, levels, root, iovas[(i % PAGES) as usize]);
        black_box(r.is_ok());
    });
    println!("  walk, 4 KiB pages (random):        {walk_4k:7.1} ns/translation");
    let walk_2m = per_op(iterations, |i| {
        let r = table_reader::translate(words, levels, root, blocks[(i % PAGES) as usize]);
        black_box(r.is_ok());
    });
    println!("  walk, 2 MiB blocks (random):       {walk_2m:7.1} ns/translation");
    let miss = per_op(iterations, |i| {
        let r = table_reader::translate(words, levels, root, (i % PAGES) << 12);
        black_box(r.is_ok());
    });
    println!("  walk, unmapped IOVA:               {miss:7.1} ns/translation");
    let slot = AtomicU64::new(0);
    let section = per_op(iterations, |_| {
        black_box(table_reader::SlotGuard::enter(&slot));
    });
    println!("  section open + close:              {section:7.1} ns");
    // A reader on the daemon's own files, as a back-end maps them.
    let entry = ReaderEntry::new(
        1,
        0x28,
        true,
        8192,
        levels,
        table_reader::EndpointState {
            mode: table_reader::Mode::Translated { root },
            revoked: false,
        },
    )
    .expect("reader page");
    let table_file = memory.table.file().try_clone().expect("table file");
    let page_file = entry.page().file().try_clone().expect("page file");
    let reader = table_reader::Reader::new(&table_file, &page_file).expect("reader");
    let s = reader.section(0).expect("section");
    let via_reader = per_op(iterations, |i| {
        let r = s.translate(iovas[(i % PAGES) as usize], 1500, true);
        black_box(r.is_ok());
    });
    drop(s);
    println!("  Reader::translate in a section:    {via_reader:7.1} ns/translation");
    let readers = memory.readers.clone();
    readers.add(std::sync::Arc::new(entry)).expect("register");
    readers.set_grace(Duration::from_millis(200));
    let sync = per_op(iterations / 10, |_| {
        black_box(readers.synchronize());
    });
    println!("  daemon synchronize, {SLOTS} idle slots: {sync:7.1} ns/removal batch");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iterations_default_and_are_checked() {
        assert_eq!(
            Cli::try_parse_from(["table-walk"]).unwrap().iterations,
            5_000_000
        );
        assert_eq!(
            Cli::try_parse_from(["table-walk", "1000"])
                .unwrap()
                .iterations,
            1000
        );
        for bad in ["x", "0", "-5"] {
            assert!(Cli::try_parse_from(["table-walk", bad]).is_err(), "{bad}");
        }
        let help = Cli::try_parse_from(["table-walk", "--help"]).unwrap_err();
        assert_eq!(help.kind(), clap::error::ErrorKind::DisplayHelp);
    }
}
