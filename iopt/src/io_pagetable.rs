//! The io_pagetable data structure (placeholder; being written).

/// A mapped area.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Area {
    pub iova: u64,
    pub last: u64,
    pub user_va: u64,
    pub prot: crate::Prot,
}

/// The areas, allowed and reserved ranges of one IOAS.
#[derive(Debug, Default)]
pub struct IoPagetable {}
