// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The change stream: each change of the translation state, reported as
//! the device makes it, to whoever keeps a copy (QEMU's translation mirror,
//! the state journal). The migration state ([`crate::state`]) and the
//! journal ([`crate::journal`]) are written in these changes too.

use crate::map_unmap::{Map, Unmap};

/// A change of the translation state, for whoever mirrors it (QEMU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Attach {
        endpoint: u32,
        domain: u32,
        bypass: bool,
    },
    Detach {
        endpoint: u32,
        domain: u32,
    },
    Map(Map),
    Unmap(Unmap),
    GlobalBypass(bool),
    /// Everything is gone: no domains, no attachments.
    Reset,
}

/// Receives changes as the device makes them.
pub trait ChangeSink {
    fn change(&mut self, c: Change);
}

impl ChangeSink for Vec<Change> {
    fn change(&mut self, c: Change) {
        self.push(c);
    }
}

/// A sink that drops every change.
#[derive(Clone, Copy, Debug, Default)]
pub struct Discard;

impl ChangeSink for Discard {
    fn change(&mut self, _: Change) {}
}
