//! Test front-end (being written).
