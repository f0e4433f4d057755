//! The in-process iommufd (placeholder; being written).
