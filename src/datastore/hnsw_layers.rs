//! The HNSW graph in memory, between hnsw_rs's construction and the file `hnsw` writes: the
//! type both `hnsw` (which fills and encodes it) and `hnsw_repair` (which fixes level 0) work
//! on, so neither imports the other for it.

/// The graph in memory: level 0 indexed by row, upper levels as (row, neighbours) ascending.
pub(super) struct Layers {
    pub(super) entry: u32,
    pub(super) l0: Vec<Vec<u32>>,
    /// `upper[l - 1]` is level `l`.
    pub(super) upper: Vec<Vec<(u32, Vec<u32>)>>,
}
