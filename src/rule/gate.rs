//! The per-step toxicity gate (docs/architecture.md §1.3): how much of α a row gets, from the
//! evidence its own neighbours give that the context is toxic.
//!
//! The paper's rule applies the full α(ℓ⁺ − ℓ⁻) on every step. Where the context is nowhere
//! near toxic text that difference is mostly the two stores' register and topic, and applying
//! it anyway is what flattens the model's voice. The gate reads what the search already
//! returned: among the `m` nearest neighbours of all stores together, how many come from the
//! toxic (negative-weight) stores, each store's count divided by its size so that a store that
//! is simply larger does not look closer. That size-corrected toxic share `s` is 1/2 where the
//! context is as close to one side as to the other and 1 where all its nearest neighbours are
//! toxic; the gate is `g = clamp(2s − 1, 0, 1)`, and the row's strength is
//! `α · (1 − γ + γ·g)`: γ = 0 is the paper's rule, γ = 1 biases only contexts nearer the toxic
//! store than the non-toxic one.

use super::{Expert, Retrieved, RuleError};

/// What the gate saw for one row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GateReading {
    /// The size-corrected share of toxic (negative-weight) stores among the `m` nearest
    /// neighbours of all stores, in [0, 1]; 1/2 when no signed store contributed.
    pub toxic_share: f32,
    /// `clamp(2·toxic_share − 1, 0, 1)`: the evidence that the context is toxic.
    pub gate: f32,
}

impl GateReading {
    /// The factor on α for gate strength `gamma` (γ ∈ [0, 1]): `1 − γ + γ·gate`.
    pub fn alpha_factor(&self, gamma: f32) -> f32 {
        1.0 - gamma + gamma * self.gate
    }
}

/// An order-preserving map of an `f32` to a `u32` (ascending floats give ascending integers),
/// so that (distance, store) pairs sort as one integer.
fn ordered_bits(x: f32) -> u32 {
    // `+ 0.0` turns −0 into +0: they compare equal as floats and must as keys.
    let bits = (x + 0.0).to_bits();
    if bits >> 31 == 1 {
        !bits
    } else {
        bits | 1 << 31
    }
}

/// The gate of one row: the size-corrected toxic share among the `m` nearest neighbours of
/// `experts` together (fewer when the stores returned fewer). Ties in distance at the `m`-th
/// place go to the store listed first, so the answer is deterministic. `keys` is a reusable
/// buffer. Every expert needs its store's size (`rows`, > 0).
///
/// Cost: one pass over the neighbours and a selection, O(Σ k_j); a few microseconds at
/// k = 1024 with two stores.
pub fn toxicity_gate<N: Retrieved>(
    experts: &[Expert<'_, N>],
    m: usize,
    keys: &mut Vec<u64>,
) -> Result<GateReading, RuleError> {
    keys.clear();
    for (j, e) in experts.iter().enumerate() {
        if e.rows == 0 {
            return Err(RuleError::GateNeedsRows { store: j });
        }
        for n in e.neighbours {
            let d = n.sq_dist();
            if !d.is_finite() {
                return Err(RuleError::NonFiniteDistance(d));
            }
            keys.push(u64::from(ordered_bits(d)) << 32 | j as u64);
        }
    }
    let m = m.min(keys.len());
    if m == 0 {
        return Err(RuleError::NoNeighbours);
    }
    if m < keys.len() {
        keys.select_nth_unstable(m - 1);
    }
    // Per store, counts among the m nearest; the stores are few (at most MAX_STORES).
    let (mut toxic, mut clean) = (0.0f64, 0.0f64);
    for (j, e) in experts.iter().enumerate() {
        let n = keys[..m]
            .iter()
            .filter(|&&k| (k as u32) as usize == j)
            .count();
        let density = n as f64 / e.rows as f64;
        if e.weight < 0.0 {
            toxic += density;
        } else if e.weight > 0.0 {
            clean += density;
        }
    }
    let toxic_share = if toxic + clean > 0.0 {
        (toxic / (toxic + clean)) as f32
    } else {
        0.5
    };
    Ok(GateReading {
        toxic_share,
        gate: (2.0 * toxic_share - 1.0).clamp(0.0, 1.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expert(weight: f32, rows: u64, n: &[(u32, f32)]) -> Expert<'_, (u32, f32)> {
        Expert::new(weight, n).with_rows(rows)
    }

    #[test]
    fn nearer_toxic_neighbours_open_the_gate_and_store_size_is_corrected_for() {
        let toxic = [(1, 1.0), (1, 2.0), (1, 3.0)];
        let clean = [(2, 10.0), (2, 11.0), (2, 12.0)];
        let r = toxicity_gate(
            &[expert(-1.0, 100, &toxic), expert(1.0, 100, &clean)],
            3,
            &mut Vec::new(),
        )
        .unwrap();
        assert_eq!((r.toxic_share, r.gate), (1.0, 1.0));

        // Two of the four nearest are toxic, but the toxic store is 4 times smaller: each of
        // its neighbours is 4 times the evidence, s = 4·2 / (4·2 + 2) = 0.8.
        let toxic = [(1, 1.0), (1, 3.0)];
        let clean = [(2, 2.0), (2, 4.0), (2, 9.0)];
        let r = toxicity_gate(
            &[expert(-1.0, 25, &toxic), expert(1.0, 100, &clean)],
            4,
            &mut Vec::new(),
        )
        .unwrap();
        assert!((r.toxic_share - 0.8).abs() < 1e-6, "{r:?}");
        assert!((r.gate - 0.6).abs() < 1e-6, "{r:?}");
        assert!((r.alpha_factor(0.5) - 0.8).abs() < 1e-6);
    }

    #[test]
    fn a_context_nearer_the_clean_store_gets_no_gated_bias() {
        let toxic = [(1, 5.0), (1, 6.0)];
        let clean = [(2, 1.0), (2, 2.0)];
        let r = toxicity_gate(
            &[expert(-1.0, 10, &toxic), expert(1.0, 10, &clean)],
            2,
            &mut Vec::new(),
        )
        .unwrap();
        assert_eq!((r.toxic_share, r.gate), (0.0, 0.0));
        assert_eq!(r.alpha_factor(1.0), 0.0);
        assert_eq!(r.alpha_factor(0.0), 1.0);
    }

    #[test]
    fn ties_at_the_cut_are_deterministic_and_bad_input_is_refused() {
        let toxic = [(1, 1.0)];
        let clean = [(2, 1.0)];
        let e = [expert(-1.0, 10, &toxic), expert(1.0, 10, &clean)];
        // m = 1 with a tie: the first store's neighbour ranks first.
        assert_eq!(toxicity_gate(&e, 1, &mut Vec::new()).unwrap().gate, 1.0);
        let e = [expert(-1.0, 0, &toxic), expert(1.0, 10, &clean)];
        assert_eq!(
            toxicity_gate(&e, 1, &mut Vec::new()),
            Err(RuleError::GateNeedsRows { store: 0 })
        );
        let bad = [(1, f32::NAN)];
        let e = [expert(-1.0, 10, &bad)];
        assert!(matches!(
            toxicity_gate(&e, 1, &mut Vec::new()),
            Err(RuleError::NonFiniteDistance(_))
        ));
    }
}
