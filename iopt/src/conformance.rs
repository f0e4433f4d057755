//! The conformance suite (placeholder; being written).
