//! virtio-iommu protocol and device model (being written).
