//! Reusing one decoding step's neighbours at the next (RetoMaton-style pointers;
//! docs/architecture.md §1.6).
//!
//! After a sequence emits token `y`, the neighbours of its last step that predicted `y` point,
//! one row on in their documents, at contexts that have just continued the same way
//! ([`crate::store::Store::successors_into`]). When enough of those successors still lie
//! inside the neighbourhood the last full search found, they are this step's neighbours and
//! the store is not searched; otherwise the row is searched as usual. The state is per
//! sequence, so it lives in the caller's [`crate::detox::DetoxScratch`], which the generator's
//! hook keeps for one batch of sequences; a caller without sequences (a unary request) never
//! reports emitted tokens and so never reuses.
//!
//! What reuse changes: a reused row's experts see the successors only (at least
//! `min · k` of them, all within `radius` times the last full search's k-th distance), not the
//! k nearest rows. `audit` measures how far that is from a full search (recall) by running
//! both; the evaluation measures what it costs in toxicity and fluency.

use crate::datastore::Neighbour;

/// When a row may reuse its successors instead of being searched.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReuseParams {
    /// Reuse a store's successors only when at least `min · k` of them pass the radius test
    /// (in (0, 1]).
    pub min: f32,
    /// A successor counts only within `radius` times the k-th distance of the row's last full
    /// search of that store (in (0, [`MAX_REUSE_RADIUS`]]).
    pub radius: f32,
    /// Also search the reused rows and compare (recall in [`ReuseStats`]); the reused
    /// neighbours are still the ones used, so results do not change, only the cost.
    #[serde(default)]
    pub audit: bool,
}

/// The largest radius factor: beyond it the test admits rows far outside any neighbourhood.
pub const MAX_REUSE_RADIUS: f32 = 4.0;

impl Default for ReuseParams {
    fn default() -> Self {
        Self {
            min: 0.25,
            radius: 1.0,
            audit: false,
        }
    }
}

/// A reuse setting out of range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReuseParamError {
    /// `min` outside (0, 1].
    #[error("reuse min must be in (0, 1], got {0}")]
    Min(f32),
    /// `radius` outside (0, MAX_REUSE_RADIUS].
    #[error("reuse radius must be in (0, {MAX_REUSE_RADIUS}], got {0}")]
    Radius(f32),
}

impl ReuseParams {
    /// Checks both knobs' ranges.
    pub fn validate(&self) -> Result<(), ReuseParamError> {
        if !(self.min > 0.0 && self.min <= 1.0) {
            return Err(ReuseParamError::Min(self.min));
        }
        if !(self.radius > 0.0 && self.radius <= MAX_REUSE_RADIUS) {
            return Err(ReuseParamError::Radius(self.radius));
        }
        Ok(())
    }

    /// How many successors a store must keep for `k` neighbours.
    pub fn needed(&self, k: usize) -> usize {
        ((self.min as f64 * k as f64).ceil() as usize).clamp(1, k.max(1))
    }
}

/// What reuse did over a scratch's calls so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct ReuseStats {
    /// (row, store) searches the calls needed without reuse (rows not skipped).
    pub row_searches: u64,
    /// Of those, the ones answered from successors instead.
    pub reused: u64,
    /// Reused (row, store) pairs that were also searched to measure recall (`audit`).
    pub audited: u64,
    /// Sum over audited pairs of recall: the share of the `n` nearest rows (n the successors
    /// kept) that the successors found.
    pub recall_sum: f64,
    /// Sum over audited pairs of the share of successors that are among the full search's k.
    pub in_top_k_sum: f64,
}

impl ReuseStats {
    /// Searches saved, as a share of the searches the calls needed.
    pub fn saved(&self) -> f64 {
        ratio(self.reused as f64, self.row_searches as f64)
    }

    /// Mean recall of the audited pairs (NaN when none was audited).
    pub fn recall(&self) -> f64 {
        ratio(self.recall_sum, self.audited as f64)
    }

    /// Mean share of successors inside the full search's top k (NaN when none was audited).
    pub fn in_top_k(&self) -> f64 {
        ratio(self.in_top_k_sum, self.audited as f64)
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

/// Keeps the successors within `limit` (squared distance), nearest first, at most `k`;
/// `true` when at least `needed` remain.
pub fn accept_successors(found: &mut Vec<Neighbour>, limit: f32, k: usize, needed: usize) -> bool {
    found.retain(|n| n.dist <= limit);
    if found.len() < needed {
        return false;
    }
    found.sort_unstable_by(|a, b| a.dist.total_cmp(&b.dist).then(a.id.cmp(&b.id)));
    found.truncate(k);
    true
}

/// Recall of `reused` against a full search's `full` (both ascending by distance): the share
/// of the `reused.len()` nearest rows of `full` that `reused` holds, and the share of `reused`
/// inside all of `full`. `ids` is scratch.
pub fn audit(reused: &[Neighbour], full: &[Neighbour], ids: &mut Vec<u64>) -> (f64, f64) {
    if reused.is_empty() {
        return (1.0, 1.0);
    }
    let n = reused.len().min(full.len());
    let share_of = |ids: &Vec<u64>| {
        reused
            .iter()
            .filter(|r| ids.binary_search(&r.id).is_ok())
            .count() as f64
            / reused.len() as f64
    };
    ids.clear();
    ids.extend(full[..n].iter().map(|f| f.id));
    ids.sort_unstable();
    let recall = share_of(ids) * reused.len() as f64 / n.max(1) as f64;
    ids.clear();
    ids.extend(full.iter().map(|f| f.id));
    ids.sort_unstable();
    (recall.min(1.0), share_of(ids))
}

/// Per-sequence memory of a scratch: the token each row emitted since the last call, and each
/// row's last neighbours and full-search radius per store.
#[derive(Debug, Default)]
pub(crate) struct ReuseMemory {
    pub params: Option<ReuseParams>,
    /// The token each row of the last call emitted, when the caller said so.
    pub tokens: Vec<u32>,
    /// Whether `tokens` belongs to the rows of the coming call.
    pub pending: bool,
    /// The rows whose memory is kept: the last call's, less those `keep_rows` dropped.
    pub rows: usize,
    /// `prev[store][row]`: the row's neighbours at the last call, swapped out of the scratch's
    /// neighbour lists at the start of a call (no copy).
    pub prev: Vec<Vec<Vec<Neighbour>>>,
    /// `radius[store][row]`: squared k-th distance of the row's last full search (0: none).
    pub radius: Vec<Vec<f32>>,
    /// Per row of the last call: answered from successors, not searched; and how many were
    /// (read by every step's answer, so counted once per call, not per answer).
    pub reused: Vec<bool>,
    pub last_reused: usize,
    /// `ok[store][row]`: the store kept enough successors for the row.
    pub ok: Vec<Vec<bool>>,
    pub stats: ReuseStats,
    /// Scratch of the audit and the searched-row gather.
    pub ids: Vec<u64>,
}

/// Keeps elements `keep` (ascending indices) of `v` at its front, in order, moving rather than
/// copying them.
pub(crate) fn keep_in_place<T>(v: &mut [T], keep: &[usize]) {
    for (new, &old) in keep.iter().enumerate() {
        if new != old && old < v.len() {
            v.swap(new, old);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(id: u64, dist: f32) -> Neighbour {
        Neighbour { id, value: 0, dist }
    }

    #[test]
    fn bad_params_are_refused() {
        for (min, radius) in [
            (0.0, 1.0),
            (1.5, 1.0),
            (f32::NAN, 1.0),
            (0.5, 0.0),
            (0.5, 5.0),
        ] {
            let p = ReuseParams {
                min,
                radius,
                audit: false,
            };
            assert!(p.validate().is_err(), "{min} {radius}");
        }
        assert!(ReuseParams::default().validate().is_ok());
        assert_eq!(ReuseParams::default().needed(1024), 256);
        assert_eq!(ReuseParams::default().needed(1), 1);
    }

    #[test]
    fn successors_outside_the_radius_do_not_count() {
        let mut f = vec![n(5, 3.0), n(2, 9.0), n(7, 1.0), n(1, 4.0)];
        assert!(!accept_successors(&mut f.clone(), 3.5, 8, 3));
        assert!(accept_successors(&mut f, 4.0, 2, 3));
        assert_eq!(f, vec![n(7, 1.0), n(5, 3.0)]);
    }

    #[test]
    fn audit_counts_the_nearest_rows_found() {
        let full = [n(1, 0.1), n(2, 0.2), n(3, 0.3), n(4, 0.4)];
        let mut ids = Vec::new();
        assert_eq!(audit(&[n(1, 0.1), n(2, 0.2)], &full, &mut ids), (1.0, 1.0));
        assert_eq!(audit(&[n(1, 0.1), n(4, 0.4)], &full, &mut ids), (0.5, 1.0));
        assert_eq!(audit(&[n(9, 0.5), n(4, 0.4)], &full, &mut ids), (0.0, 0.5));
    }

    #[test]
    fn keeping_rows_moves_them_to_the_front_in_order() {
        let mut v = vec!['a', 'b', 'c', 'd', 'e'];
        keep_in_place(&mut v, &[1, 3, 4]);
        assert_eq!(&v[..3], &['b', 'd', 'e']);
    }
}
