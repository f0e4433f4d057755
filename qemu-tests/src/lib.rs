//! Real QEMU + Linux guest tests (being written).
