//! What the daemon tells a management layer about itself (QEMU's
//! "Backend program conventions", docs/interop/vhost-user.rst and
//! docs/interop/vhost-user.json).

/// The back-end type. The vhost-user.json schema has no IOMMU type yet; this
/// is the name a future schema entry would carry.
pub const BACKEND_TYPE: &str = "iommu";

/// The `--print-capabilities` answer: the type and the optional features
/// this back-end supports (none defined for this type yet).
pub fn capabilities_json() -> String {
    format!("{{\n  \"type\": \"{BACKEND_TYPE}\",\n  \"features\": []\n}}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_name_the_type_and_an_empty_feature_list() {
        let json = capabilities_json();
        assert!(json.contains("\"type\": \"iommu\""));
        assert!(json.contains("\"features\": []"));
    }
}
