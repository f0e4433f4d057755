// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the daemon tells a management layer about itself (QEMU's
//! "Backend program conventions", docs/interop/vhost-user.rst and
//! docs/interop/vhost-user.json).

/// The back-end type. QEMU's vhost-user.json schema (`VHostUserBackendType`)
/// gains it with the project's patch series (scripts/qemu/patches, 0009).
pub const BACKEND_TYPE: &str = "iommu";

/// What `--version` says besides the daemon's version: the mirror protocol
/// it speaks (docs/mirror-protocol.md: a QEMU of the same major version and
/// any minor works) and the QEMU it pairs with. Checked against
/// `mirror::proto::{MAJOR, MINOR}` by a test.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\nmirror protocol 2.6\n",
    "QEMU 10.0 with the patch series of this release (scripts/qemu/patches, CHANGELOG.md)"
);

/// The `--print-capabilities` answer: the type and the optional features
/// this back-end supports (none defined for this type yet).
pub fn capabilities_json() -> String {
    format!("{{\n  \"type\": \"{BACKEND_TYPE}\",\n  \"features\": []\n}}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_names_the_mirror_protocol_this_daemon_speaks() {
        use crate::mirror::proto::{MAJOR, MINOR};
        assert!(LONG_VERSION.contains(&format!("mirror protocol {MAJOR}.{MINOR}\n")));
    }

    #[test]
    fn capabilities_name_the_type_and_an_empty_feature_list() {
        let json = capabilities_json();
        assert!(json.contains("\"type\": \"iommu\""));
        assert!(json.contains("\"features\": []"));
    }
}
