//! The vhost-user-iommu daemon library (being written).
