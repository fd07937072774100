//! Crate-wide limits on what one call may ask for.
//!
//! They live apart from the modules that enforce them because several do: the rule checks `k`
//! in its parameters, the datastore in its searches, the server reports it in `Info`; the engine
//! and the server bound rows per call. One definition keeps them from drifting apart.

/// The most neighbours a search (and so the rule) may retrieve per store and row.
pub const MAX_K: usize = 4096;

/// The most rows one engine call may carry; bounds the memory a single request can claim.
pub const MAX_ROWS: usize = 1024;

/// The most stores one engine combines (signed n-store ensembles); keeps per-row expert lists
/// on the stack.
pub const MAX_STORES: usize = 16;
