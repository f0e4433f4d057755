// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A vhost-user back-end's view of vhost-user-iommu's shared translation
//! table (docs/mirror-protocol.md §11 and §16).
//!
//! The daemon keeps every domain's mappings as radix page tables in a memory
//! file; QEMU walks them for the devices it emulates. A back-end that reads
//! the same file turns the IOVAs its guest driver gives it into
//! guest-physical addresses itself: no IOTLB miss, no message per mapping.
//! This crate is that reader, for a back-end to link:
//!
//! - [`walk`]: the walk QEMU does — one acquire load per level, every page
//!   index checked against the table's size, at most `levels` steps — so a
//!   table with any content gives an answer or an error, never an access
//!   outside it and never a loop (§11, "The shared translation table");
//! - [`epoch`]: the reader handshake (§16.3). A back-end thread marks the
//!   span in which it translates and uses translations (a *section*) in a
//!   slot of its own; the daemon completes a guest UNMAP only once every
//!   section that may have seen the old entry has ended, and stops waiting
//!   for a reader after a bound, revoking it;
//! - [`wire`]: the 16-byte request and answer of the table socket (§16.1);
//! - [`Reader`]: the two files the daemon sends, mapped, and the endpoint's
//!   current state (§16.2), to open sections on.
//!
//! The crate does no I/O of its own beyond mapping the files it is given:
//! the back-end connects to the socket and passes the files in.

pub mod epoch;
pub mod layout;
pub mod walk;
pub mod wire;

mod reader;

pub use epoch::{synchronize, GraceOutcome, SlotGuard};
pub use layout::{EndpointState, Mode};
pub use reader::{Reader, Section, Segment};
pub use walk::{translate, Leaf, WalkError};

/// Why a reader cannot be set up or cannot translate.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("the {what} file is {got} bytes, not a usable size ({want})")]
    FileSize {
        what: &'static str,
        got: u64,
        want: &'static str,
    },
    #[error("cannot map the {what} file: errno {errno}")]
    Map { what: &'static str, errno: i32 },
    #[error("the reader page has magic/version {0:#x}, not this crate's")]
    BadPage(u64),
    #[error("the reader page gives a table of {pages} pages and {levels} levels, which the file does not hold")]
    BadGeometry { pages: u64, levels: u64 },
    #[error("reader slot {0} does not exist (a reader has {n} slots)", n = layout::SLOTS)]
    NoSlot(usize),
    #[error("reader slot {0} is already in a section")]
    SlotBusy(usize),
    #[error("the daemon revoked this reader (it held a section past the daemon's bound, or the daemon is going)")]
    Revoked,
    #[error("endpoint is blocked: not attached, and no bypass")]
    Blocked,
    #[error(transparent)]
    Walk(#[from] WalkError),
}
