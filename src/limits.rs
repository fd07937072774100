//! Crate-wide limits on what one call may ask for.
//!
//! They live apart from the modules that enforce them because several do: the rule checks `k`
//! in its parameters, the datastore in its searches, the server reports it in `Info`; the engine
//! and the server bound rows per call. One definition keeps them from drifting apart.

/// The most neighbours a search (and so the rule) may retrieve per store and row.
pub const MAX_K: usize = 4096;

/// The largest vocabulary a store may declare. Real models stay below 300k tokens; the bound
/// keeps what a damaged or hostile manifest can make an open allocate (the store's
/// next-token statistics are one entry per token) to tens of megabytes.
pub const MAX_VOCAB: usize = 1 << 22;

/// The most rows one engine call may carry; bounds the memory a single request can claim.
pub const MAX_ROWS: usize = 1024;

/// The most stores one engine combines (signed n-store ensembles); keeps per-row expert lists
/// on the stack.
pub const MAX_STORES: usize = 16;

/// The largest control strength |α| the rule accepts. A store's term `ℓ_S − m_S` lies in
/// `[0, −PATCH]` (`rule::PATCH` is −50), so with |α| at most this every bias stays a few
/// million at most and finite in f32, whatever the request. A negative α is allowed: it steers
/// toward the toxic store (the rule is defined for it, and the property tests cover it), which
/// red-teaming and contrast experiments use; a server's default is the paper's α = 2.
pub const MAX_ALPHA: f32 = 1000.0;

/// The range of a non-zero prior weight ρ ([`crate::rule::RuleParams::prior`]). A corrected
/// expert scores `ln(1 + p/(ρ·u))` with `u` at least ½ over the store's rows plus half the
/// vocabulary, so ρ at or above the minimum keeps every score below about 50 nats (like the
/// paper's `−PATCH`) for any store up to 10¹² rows, and α·score finite.
pub const MIN_PRIOR: f32 = 1e-3;
/// See [`MIN_PRIOR`]; above this the prior swamps any neighbourhood (scores → 0).
pub const MAX_PRIOR: f32 = 1000.0;

/// The largest magnitude a hidden-state value may have. Squared L2 distances sum `D` squared
/// differences in f32; values up to this keep them finite for any model's width, and no real
/// hidden state comes near it.
pub const MAX_ABS_HIDDEN: f32 = 1.0e15;

/// The largest logit the dense form accepts. Normalising subtracts the log-sum-exp from every
/// logit in f32, which loses the differences between logits far above this (an answer with
/// one finite log-probability instead of many); real logits are a few tens. Large negative
/// values are fine (a mask such as the most negative f32 normalises to a probability of 0).
pub const MAX_LOGIT: f32 = 1.0e6;
