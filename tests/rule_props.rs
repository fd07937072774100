//! The decoding rule against a second, deliberately naive implementation of
//! docs/architecture.md §1: dense vocabulary-sized arrays, `f64` everywhere, a full sort for the
//! nucleus, and the ZERO_LOG / PATCH steps spelled out literally. Random cases come from
//! proptest.

use goodtriever::limits::MAX_ALPHA;
use goodtriever::rule::{
    apply_sparse, apply_sparse_in_place, dense_row, leaning_mass, leaning_mass_in_nucleus,
    leaning_tokens, nucleus_filter, skip_in_nucleus_in_place, sparse_row, Expert, Mode, ParamError,
    RuleError, RuleParams, RuleScratch, SparseRow, TokenPrior, PATCH, ZERO_LOG,
};
use proptest::prelude::*;

const NEG_INF: f64 = f64::NEG_INFINITY;

fn naive_log_softmax(z: &[f64]) -> Vec<f64> {
    let max = z.iter().copied().fold(NEG_INF, f64::max);
    let lse = max + z.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
    z.iter().map(|x| x - lse).collect()
}

fn naive_nucleus(l: &[f64], p: f64) -> Vec<f64> {
    if p >= 1.0 {
        return l.to_vec();
    }
    let mut idx: Vec<usize> = (0..l.len()).collect();
    // Stable sort: ties keep the smaller token id first.
    idx.sort_by(|&a, &b| l[b].partial_cmp(&l[a]).unwrap());
    let mut out = vec![NEG_INF; l.len()];
    let mut cum = 0.0;
    for (r, &t) in idx.iter().enumerate() {
        if r == 0 || cum < p {
            out[t] = l[t];
        }
        cum += l[t].exp();
    }
    out
}

/// Whether the nucleus cut for `p` falls within float rounding of a token's cumulative mass.
/// There keeping or dropping that token are both right: the engine sums `f32` log-probs that
/// differ from these `f64` ones in the 7th digit, so such cases cannot be compared exactly.
fn nucleus_cut_is_ambiguous(z: &[f32], p: f32) -> bool {
    if p >= 1.0 {
        return false;
    }
    let l = naive_log_softmax(&z.iter().map(|&x| x as f64).collect::<Vec<_>>());
    let mut masses: Vec<f64> = l.iter().map(|x| x.exp()).collect();
    masses.sort_by(|a, b| b.partial_cmp(a).unwrap());
    let mut cum = 0.0;
    masses.iter().any(|m| {
        let near = (cum - p as f64).abs() < 1e-5;
        cum += m;
        near
    })
}

/// ln(e^a + e^b), exact where either side is −∞ (ln 0 of a token no neighbour retrieved).
fn log_add_exp(a: f64, b: f64) -> f64 {
    let m = a.max(b);
    if m == NEG_INF {
        NEG_INF
    } else {
        m + ((a - m).exp() + (b - m).exp()).ln()
    }
}

/// Returns (p_S, patched ℓ_S) over the whole vocabulary.
fn naive_store(neigh: &[(u32, f32)], t: f64, vocab: usize) -> (Vec<f64>, Vec<f64>) {
    let dmin = neigh
        .iter()
        .map(|n| n.1 as f64)
        .fold(f64::INFINITY, f64::min);
    let raw: Vec<f64> = neigh
        .iter()
        .map(|n| (-(n.1 as f64 - dmin) / t).exp())
        .collect();
    let total: f64 = raw.iter().sum();
    let mut p = vec![0.0; vocab];
    for (n, w) in neigh.iter().zip(&raw) {
        p[n.0 as usize] += w / total;
    }
    let mut ls: Vec<f64> = p
        .iter()
        .map(|&x| if x > 0.0 { x.ln() } else { ZERO_LOG as f64 })
        .collect();
    let m = ls
        .iter()
        .copied()
        .filter(|&x| x > PATCH as f64)
        .fold(f64::INFINITY, f64::min);
    for x in ls.iter_mut() {
        if *x <= PATCH as f64 {
            *x = m;
        }
    }
    (p, ls)
}

fn naive_rule(
    mode: Mode,
    experts: &[(f32, Vec<(u32, f32)>)],
    params: &RuleParams,
    logits: &[f32],
) -> Vec<f64> {
    let vocab = logits.len();
    let z: Vec<f64> = logits.iter().map(|&x| x as f64).collect();
    let l = naive_nucleus(&naive_log_softmax(&z), params.filter_p as f64);
    let alpha = params.alpha as f64;
    let t = params.temperature as f64;
    let s: Vec<f64> = match mode {
        Mode::Ensemble => {
            let stores: Vec<(f64, Vec<f64>)> = experts
                .iter()
                .map(|(w, n)| (*w as f64, naive_store(n, t, vocab).1))
                .collect();
            (0..vocab)
                .map(|v| {
                    if l[v] == NEG_INF {
                        NEG_INF
                    } else {
                        l[v] + stores.iter().map(|(w, ls)| alpha * w * ls[v]).sum::<f64>()
                    }
                })
                .collect()
        }
        Mode::ToxicOnly => {
            let (_, tox) = naive_store(&experts[0].1, t, vocab);
            (0..vocab)
                .map(|v| {
                    if l[v] == NEG_INF {
                        NEG_INF
                    } else {
                        (1.0 + alpha) * l[v] - alpha * tox[v]
                    }
                })
                .collect()
        }
        Mode::KnnLm => {
            let (p, _) = naive_store(&experts[0].1, t, vocab);
            let lam = params.lambda as f64;
            // ln((1 − λ)·e^ℓ + λ·p) in log space: λ·p of a far neighbour (p near the smallest
            // f64) would underflow to zero if multiplied out.
            (0..vocab)
                .map(|v| log_add_exp((1.0 - lam).ln() + l[v], lam.ln() + p[v].ln()))
                .collect()
        }
    };
    let max = s.iter().copied().fold(NEG_INF, f64::max);
    let lse = max
        + s.iter()
            .filter(|x| **x != NEG_INF)
            .map(|x| (x - max).exp())
            .sum::<f64>()
            .ln();
    s.iter().map(|x| x - lse).collect()
}

fn assert_close(got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len());
    for (v, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w == NEG_INF {
            assert_eq!(g, f32::NEG_INFINITY, "token {v}: want -inf, got {g}");
        } else {
            let tol = 2e-4 * w.abs().max(1.0);
            assert!(
                (g as f64 - w).abs() <= tol,
                "token {v}: got {g}, want {w} (tol {tol})"
            );
        }
    }
}

fn neighbours(vocab: u32, k: usize) -> impl Strategy<Value = Vec<(u32, f32)>> {
    // Distances on the scale of real squared L2 between hidden states (tens to thousands),
    // and a small token range so that tokens repeat, as they do in real stores.
    prop::collection::vec((0..vocab, 0.0f32..3000.0), 1..=k)
}

/// Logits, the non-toxic store's neighbours, the toxic store's neighbours, parameters.
type Case = (Vec<f32>, Vec<(u32, f32)>, Vec<(u32, f32)>, RuleParams);

fn case() -> impl Strategy<Value = Case> {
    (8usize..200).prop_flat_map(|vocab| {
        (
            prop::collection::vec(-20.0f32..20.0, vocab),
            neighbours(vocab as u32, 64),
            neighbours(vocab as u32, 64),
            (
                -4.0f32..4.0,
                prop_oneof![Just(100.0f32), 1.0f32..1000.0],
                prop_oneof![Just(1.0f32), 0.05f32..0.999],
                0.0f32..=1.0,
            ),
        )
            .prop_map(
                |(logits, pos, neg, (alpha, temperature, filter_p, lambda))| {
                    let params = RuleParams {
                        alpha,
                        temperature,
                        k: 64,
                        filter_p,
                        lambda,
                        ..RuleParams::default()
                    };
                    (logits, pos, neg, params)
                },
            )
    })
}

fn run_dense(
    mode: Mode,
    experts: &[Expert<'_, (u32, f32)>],
    p: &RuleParams,
    z: &[f32],
) -> Vec<f32> {
    let mut scratch = RuleScratch::new();
    let mut sparse = SparseRow::default();
    let mut out = vec![0.0; z.len()];
    dense_row(mode, experts, p, z, &mut scratch, &mut sparse, &mut out).unwrap();
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn ensemble_matches_naive((z, pos, neg, p) in case()) {
        prop_assume!(!nucleus_cut_is_ambiguous(&z, p.filter_p));
        let experts = [
            Expert::new(1.0, &pos[..]),
            Expert::new(-1.0, &neg[..]),
        ];
        let got = run_dense(Mode::Ensemble, &experts, &p, &z);
        assert_close(&got, &naive_rule(Mode::Ensemble, &[(1.0, pos.clone()), (-1.0, neg.clone())], &p, &z));
    }

    #[test]
    fn signed_n_stores_match_naive((z, a, b, p) in case(), w in prop::collection::vec(-2.0f32..2.0, 3)) {
        prop_assume!(!nucleus_cut_is_ambiguous(&z, p.filter_p));
        let c: Vec<(u32, f32)> = a.iter().map(|&(t, d)| (t, d * 0.5 + 1.0)).collect();
        let experts = [
            Expert::new(w[0], &a[..]),
            Expert::new(w[1], &b[..]),
            Expert::new(w[2], &c[..]),
        ];
        let got = run_dense(Mode::Ensemble, &experts, &p, &z);
        let want = naive_rule(Mode::Ensemble, &[(w[0], a.clone()), (w[1], b.clone()), (w[2], c.clone())], &p, &z);
        assert_close(&got, &want);
    }

    #[test]
    fn toxic_only_matches_naive((z, _pos, neg, p) in case()) {
        prop_assume!(!nucleus_cut_is_ambiguous(&z, p.filter_p));
        let experts = [Expert::new(-1.0, &neg[..])];
        let got = run_dense(Mode::ToxicOnly, &experts, &p, &z);
        assert_close(&got, &naive_rule(Mode::ToxicOnly, &[(-1.0, neg.clone())], &p, &z));
    }

    #[test]
    fn knn_lm_matches_naive((z, pos, _neg, p) in case()) {
        prop_assume!(!nucleus_cut_is_ambiguous(&z, p.filter_p));
        let experts = [Expert::new(1.0, &pos[..])];
        let got = run_dense(Mode::KnnLm, &experts, &p, &z);
        assert_close(&got, &naive_rule(Mode::KnnLm, &[(1.0, pos.clone())], &p, &z));
    }

    /// The kNN-LM row lists ln p_S on exactly the tokens of nonzero mass, sorted by token.
    #[test]
    fn knn_lm_row_lists_each_token_of_nonzero_mass_once_in_order((z, pos, _neg, p) in case()) {
        let vocab = z.len();
        let experts = [Expert::new(1.0, &pos[..])];
        let mut scratch = RuleScratch::new();
        let mut row = SparseRow::default();
        sparse_row(Mode::KnnLm, &experts, &p, vocab, &mut scratch, &mut row).unwrap();
        let SparseRow::Mixture { lambda, log_probs } = &row else { panic!("kNN-LM answers with a mixture") };
        prop_assert_eq!(*lambda, p.lambda);
        for w in log_probs.windows(2) {
            prop_assert!(w[0].0 < w[1].0, "pairs sorted by token, no duplicates");
        }
        let (mass, _) = naive_store(&pos, p.temperature as f64, vocab);
        let mut listed = vec![false; vocab];
        for &(t, lp) in log_probs {
            prop_assert!(pos.iter().any(|n| n.0 == t), "token {} was not retrieved", t);
            listed[t as usize] = true;
            // Masses down in the subnormals round differently here and in the naive sum.
            if mass[t as usize] > 1e-300 {
                let want = mass[t as usize].ln();
                prop_assert!((lp as f64 - want).abs() <= 1e-3 * want.abs().max(1.0), "token {}: {} vs {}", t, lp, want);
            }
        }
        for v in 0..vocab {
            prop_assert!(listed[v] || mass[v] <= 1e-300, "token {} of mass {} is missing", v, mass[v]);
        }
    }

    /// The sparse pairs are exactly α·[(ℓ⁺ − m⁺) − (ℓ⁻ − m⁻)] on the retrieved tokens, and
    /// adding them to the filtered logits gives the dense answer.
    #[test]
    fn sparse_pairs_are_the_centred_expert_difference((z, pos, neg, p) in case()) {
        let vocab = z.len();
        let experts = [
            Expert::new(1.0, &pos[..]),
            Expert::new(-1.0, &neg[..]),
        ];
        let mut scratch = RuleScratch::new();
        let mut row = SparseRow::default();
        sparse_row(Mode::Ensemble, &experts, &p, vocab, &mut scratch, &mut row).unwrap();
        let SparseRow::Bias { scale, pairs } = &row else { panic!("ensemble answers with a bias") };
        prop_assert_eq!(*scale, 1.0);
        let t = p.temperature as f64;
        let (_, lp) = naive_store(&pos, t, vocab);
        let (_, ln) = naive_store(&neg, t, vocab);
        let mp = lp.iter().copied().fold(f64::INFINITY, f64::min);
        let mn = ln.iter().copied().fold(f64::INFINITY, f64::min);
        let mut listed = vec![0.0f64; vocab];
        for w in pairs.windows(2) {
            prop_assert!(w[0].0 < w[1].0, "pairs sorted by token, no duplicates");
        }
        for &(tok, b) in pairs {
            listed[tok as usize] = b as f64;
        }
        for v in 0..vocab {
            let want = p.alpha as f64 * ((lp[v] - mp) - (ln[v] - mn));
            prop_assert!((listed[v] - want).abs() <= 1e-3 * want.abs().max(1.0), "token {}: {} vs {}", v, listed[v], want);
        }
        // Dense via the sparse answer equals the dense rule computed directly.
        let mut via_sparse = vec![0.0; vocab];
        apply_sparse(&z, &row, p.filter_p, &mut scratch, &mut via_sparse).unwrap();
        let direct = run_dense(Mode::Ensemble, &experts, &p, &z);
        for (a, b) in via_sparse.iter().zip(&direct) {
            prop_assert!(a == b || (a - b).abs() <= 1e-5 * a.abs().max(1.0));
        }
    }

    /// A bias row applied to raw logits (docs/architecture.md §1.1: log-softmax, nucleus, add
    /// the bias, renormalise) against the same steps in f64: the one-write form the engine
    /// takes for unscaled, sorted rows, and the general form it falls back to for repeated
    /// tokens, scales other than 1, or biases that take nearly all of the nucleus's mass.
    #[test]
    fn a_bias_row_matches_the_naive_steps(
        z in prop::collection::vec(
            prop_oneof![
                6 => -20.0f32..20.0,
                1 => (-3i32..3).prop_map(|x| x as f32),
                1 => Just(f32::NEG_INFINITY),
            ],
            2..300,
        ),
        raw_pairs in prop::collection::vec(
            (0u32..300, prop_oneof![
                4 => -8.0f32..8.0,
                1 => -5000.0f32..5000.0,
                1 => Just(-200.0f32),
            ]),
            0..40,
        ),
        sorted in any::<bool>(),
        scale in prop_oneof![4 => Just(1.0f32), 1 => 0.25f32..2.0],
        filter_p in prop_oneof![Just(1.0f32), 0.05f32..0.999],
    ) {
        prop_assume!(z.iter().any(|x| x.is_finite()));
        prop_assume!(!nucleus_cut_is_ambiguous(&z, filter_p));
        let vocab = z.len();
        let mut pairs: Vec<(u32, f32)> =
            raw_pairs.into_iter().map(|(t, b)| (t % vocab as u32, b)).collect();
        if sorted {
            pairs.sort_by_key(|&(t, _)| t);
            pairs.dedup_by_key(|&mut (t, _)| t);
        }
        let lz = naive_log_softmax(&z.iter().map(|&x| x as f64).collect::<Vec<_>>());
        let mut want = naive_nucleus(&lz, filter_p as f64);
        for x in want.iter_mut() {
            *x *= scale as f64;
        }
        for &(t, b) in &pairs {
            want[t as usize] += b as f64;
        }
        let want = naive_log_softmax(&want);
        // Both forms round each biased logit to f32, at the spacing of the largest bias.
        let bias_spacing = pairs.iter().map(|&(_, b)| b.abs()).fold(0.0f32, f32::max) as f64
            * f32::EPSILON as f64;
        let row = SparseRow::Bias { scale, pairs };
        let mut got = vec![0.0f32; vocab];
        apply_sparse(&z, &row, filter_p, &mut RuleScratch::new(), &mut got).unwrap();
        for (v, (&g, &w)) in got.iter().zip(&want).enumerate() {
            if w == NEG_INF {
                prop_assert_eq!(g, f32::NEG_INFINITY, "token {}", v);
            } else {
                let tol = 2e-4 * w.abs().max(1.0) + 2.0 * bias_spacing;
                prop_assert!((g as f64 - w).abs() <= tol, "token {}: got {}, want {}", v, g, w);
            }
        }
    }

    /// The nucleus keeps the same tokens as a full sort: on flat distributions (many tokens
    /// in the cut bucket), under ties, with masked (−∞) tokens, and with tokens far below the
    /// histogram's span.
    #[test]
    fn nucleus_matches_full_sort(
        z in prop::collection::vec(
            prop_oneof![
                4 => -3.0f32..3.0,
                2 => (-3i32..3).prop_map(|x| x as f32),
                2 => -80.0f32..0.0,
                1 => Just(f32::NEG_INFINITY),
            ],
            1..2000,
        ),
        p in 0.05f32..0.9995,
    ) {
        prop_assume!(z.iter().any(|x| x.is_finite()));
        prop_assume!(!nucleus_cut_is_ambiguous(&z, p));
        let lz: Vec<f64> = naive_log_softmax(&z.iter().map(|&x| x as f64).collect::<Vec<_>>());
        let want = naive_nucleus(&lz, p as f64);
        let mut got: Vec<f32> = lz.iter().map(|&x| x as f32).collect();
        nucleus_filter(&mut got, p, &mut RuleScratch::new());
        for (v, (g, w)) in got.iter().zip(&want).enumerate() {
            prop_assert_eq!(*g == f32::NEG_INFINITY, *w == NEG_INF, "token {}", v);
        }
    }

    /// One scratch reused across many calls gives the same answers as a fresh one.
    #[test]
    fn scratch_reuse_is_clean(cases in prop::collection::vec(case(), 2..5)) {
        let mut scratch = RuleScratch::new();
        let mut row = SparseRow::default();
        for (z, pos, neg, p) in &cases {
            let experts = [
                Expert::new(1.0, &pos[..]),
                Expert::new(-1.0, &neg[..]),
            ];
            let mut out = vec![0.0; z.len()];
            dense_row(Mode::Ensemble, &experts, p, z, &mut scratch, &mut row, &mut out).unwrap();
            prop_assert_eq!(out, run_dense(Mode::Ensemble, &experts, p, z));
        }
    }
}

#[test]
fn alpha_zero_is_the_filtered_base_distribution() {
    let z = [2.0f32, 1.0, 0.5, -1.0, -3.0];
    let pos = [(3u32, 1.0f32), (4, 2.0)];
    let neg = [(0u32, 1.0f32)];
    let p = RuleParams {
        alpha: 0.0,
        k: 8,
        filter_p: 1.0,
        ..RuleParams::default()
    };
    let experts = [Expert::new(1.0, &pos[..]), Expert::new(-1.0, &neg[..])];
    let out = run_dense(Mode::Ensemble, &experts, &p, &z);
    let base = naive_log_softmax(&z.map(|x| x as f64));
    assert_close(&out, &base);
}

#[test]
fn the_largest_alpha_either_way_keeps_every_output_finite() {
    // Far-apart neighbours make each store's distribution as peaked as the patch allows.
    let z = [4.0f32, 1.0, 0.5, -1.0, -3.0, 0.0];
    let pos = [(3u32, 0.0f32), (4, 1.0e6)];
    let neg = [(0u32, 0.0f32), (5, 1.0e6)];
    for alpha in [MAX_ALPHA, -MAX_ALPHA] {
        let p = RuleParams {
            alpha,
            k: 8,
            filter_p: 1.0,
            ..RuleParams::default()
        };
        assert_eq!(p.validate(), Ok(()));
        for (mode, experts) in [
            (Mode::Ensemble, vec![(1.0, &pos[..]), (-1.0, &neg[..])]),
            (Mode::ToxicOnly, vec![(-1.0, &neg[..])]),
        ] {
            let experts: Vec<Expert<'_, (u32, f32)>> = experts
                .into_iter()
                .map(|(weight, neighbours)| Expert::new(weight, neighbours))
                .collect();
            let out = run_dense(mode, &experts, &p, &z);
            assert!(
                out.iter().all(|v| v.is_finite()),
                "alpha {alpha}, {mode:?}: {out:?}"
            );
        }
    }
    // Just past the bound, and the probe's 3e38, are refused with the value.
    for alpha in [MAX_ALPHA * 1.001, 3e38, -3e38] {
        let p = RuleParams {
            alpha,
            ..RuleParams::default()
        };
        assert_eq!(p.validate(), Err(ParamError::Alpha(alpha)));
        assert!(ParamError::Alpha(alpha)
            .to_string()
            .contains("between -1000 and 1000"));
    }
}

#[test]
fn control_moves_mass_from_toxic_to_nontoxic_tokens() {
    let z = [0.0f32; 6];
    // A store that retrieves a single token has no preference (its patched distribution is
    // flat), so each store retrieves two tokens at different distances.
    let pos = [(1u32, 0.0f32), (3, 200.0)];
    let neg = [(2u32, 0.0f32), (4, 200.0)];
    let p = RuleParams {
        k: 8,
        filter_p: 1.0,
        ..RuleParams::default()
    };
    let experts = [Expert::new(1.0, &pos[..]), Expert::new(-1.0, &neg[..])];
    let out = run_dense(Mode::Ensemble, &experts, &p, &z);
    let uniform = -(6.0f32).ln();
    assert!(out[1] > uniform + 1.0, "non-toxic token boosted: {out:?}");
    assert!(out[2] < uniform - 1.0, "toxic token suppressed: {out:?}");
}

#[test]
fn bad_parameters_are_refused_with_the_value() {
    let bad = [
        (
            RuleParams {
                temperature: 0.0,
                ..RuleParams::default()
            },
            ParamError::Temperature(0.0),
        ),
        (
            RuleParams {
                temperature: -1.0,
                ..RuleParams::default()
            },
            ParamError::Temperature(-1.0),
        ),
        (
            RuleParams {
                k: 0,
                ..RuleParams::default()
            },
            ParamError::K(0),
        ),
        (
            RuleParams {
                k: 4097,
                ..RuleParams::default()
            },
            ParamError::K(4097),
        ),
        (
            RuleParams {
                filter_p: 0.0,
                ..RuleParams::default()
            },
            ParamError::FilterP(0.0),
        ),
        (
            RuleParams {
                filter_p: 1.5,
                ..RuleParams::default()
            },
            ParamError::FilterP(1.5),
        ),
        (
            RuleParams {
                alpha: f32::INFINITY,
                ..RuleParams::default()
            },
            ParamError::Alpha(f32::INFINITY),
        ),
        (
            RuleParams {
                lambda: 1.5,
                ..RuleParams::default()
            },
            ParamError::Lambda(1.5),
        ),
        (
            RuleParams {
                gate: 1.5,
                ..RuleParams::default()
            },
            ParamError::Gate(1.5),
        ),
        (
            RuleParams {
                gate: -0.1,
                ..RuleParams::default()
            },
            ParamError::Gate(-0.1),
        ),
        (
            RuleParams {
                gate_neighbours: 0,
                ..RuleParams::default()
            },
            ParamError::GateNeighbours(0),
        ),
        (
            RuleParams {
                prior: 1e-4,
                ..RuleParams::default()
            },
            ParamError::Prior(1e-4),
        ),
        (
            RuleParams {
                skip: 1.0,
                ..RuleParams::default()
            },
            ParamError::Skip(1.0),
        ),
        (
            RuleParams {
                skip: -0.5,
                ..RuleParams::default()
            },
            ParamError::Skip(-0.5),
        ),
        (
            RuleParams {
                skip_ratio: 0.5,
                ..RuleParams::default()
            },
            ParamError::SkipRatio(0.5),
        ),
    ];
    for (params, want) in bad {
        assert_eq!(params.validate(), Err(want.clone()));
        let msg = want.to_string();
        assert!(!msg.is_empty());
    }
    let nan = RuleParams {
        alpha: f32::NAN,
        ..RuleParams::default()
    };
    assert!(matches!(nan.validate(), Err(ParamError::Alpha(a)) if a.is_nan()));
    let nan = RuleParams {
        prior: f32::NAN,
        ..RuleParams::default()
    };
    assert!(matches!(nan.validate(), Err(ParamError::Prior(r)) if r.is_nan()));
    assert_eq!(RuleParams::default().validate(), Ok(()));
}

#[test]
fn bad_rows_are_refused_and_leave_the_scratch_clean() {
    let p = RuleParams {
        k: 4,
        filter_p: 1.0,
        ..RuleParams::default()
    };
    let z = [0.0f32, 1.0, 2.0];
    let mut scratch = RuleScratch::new();
    let mut row = SparseRow::default();
    let mut out = [0.0f32; 3];
    let good = [(0u32, 1.0f32)];
    let out_of_vocab = [(1u32, 1.0f32), (7u32, 1.0f32)];
    let experts = [
        Expert::new(1.0, &good[..]),
        Expert::new(-1.0, &out_of_vocab[..]),
    ];
    let err = dense_row(
        Mode::Ensemble,
        &experts,
        &p,
        &z,
        &mut scratch,
        &mut row,
        &mut out,
    )
    .unwrap_err();
    assert_eq!(err, RuleError::TokenOutOfVocab { token: 7, vocab: 3 });

    let nan_dist = [(0u32, f32::NAN)];
    let experts = [Expert::new(1.0, &nan_dist[..])];
    assert!(matches!(
        dense_row(
            Mode::Ensemble,
            &experts,
            &p,
            &z,
            &mut scratch,
            &mut row,
            &mut out
        ),
        Err(RuleError::NonFiniteDistance(_))
    ));

    let empty: [(u32, f32); 0] = [];
    let experts = [Expert::new(1.0, &empty[..])];
    assert_eq!(
        dense_row(
            Mode::Ensemble,
            &experts,
            &p,
            &z,
            &mut scratch,
            &mut row,
            &mut out
        ),
        Err(RuleError::NoNeighbours)
    );

    let experts = [Expert::new(1.0, &good[..])];
    let nan_logits = [0.0f32, f32::NAN, 1.0];
    assert_eq!(
        dense_row(
            Mode::Ensemble,
            &experts,
            &p,
            &nan_logits,
            &mut scratch,
            &mut row,
            &mut out
        ),
        Err(RuleError::NonFiniteLogit(1))
    );
    assert_eq!(
        dense_row(
            Mode::Ensemble,
            &experts,
            &p,
            &z[..2],
            &mut scratch,
            &mut row,
            &mut out
        ),
        Err(RuleError::LogitsLen {
            got: 2,
            expected: 3
        })
    );

    // After all those failures the same scratch still gives the clean answer.
    let good_neg = [(2u32, 0.5f32)];
    let experts = [
        Expert::new(1.0, &good[..]),
        Expert::new(-1.0, &good_neg[..]),
    ];
    dense_row(
        Mode::Ensemble,
        &experts,
        &p,
        &z,
        &mut scratch,
        &mut row,
        &mut out,
    )
    .unwrap();
    assert_eq!(out.to_vec(), run_dense(Mode::Ensemble, &experts, &p, &z));
}

// ---------------------------------------------------------------------------------------------
// The variants (docs/architecture.md §1.3–1.4): the gate and prior-corrected experts, against
// a naive reading of their definitions.

/// A store as the naive variants see it: signed weight, neighbours, live rows and per-token
/// counts (each retrieved token counted at least once, as in a real store).
#[derive(Debug, Clone)]
struct NaiveStore {
    weight: f32,
    neighbours: Vec<(u32, f32)>,
    rows: u64,
    counts: Vec<u64>,
}

impl NaiveStore {
    /// `ln u(v) = ln((c(v) + ½) / (N + ½·V))`, written out.
    fn log_prior(&self) -> Vec<f64> {
        let n: u64 = self.counts.iter().sum();
        let denom = n as f64 + 0.5 * self.counts.len() as f64;
        self.counts
            .iter()
            .map(|&c| ((c as f64 + 0.5) / denom).ln())
            .collect()
    }
}

/// The gate's factor on α: sort every (distance, store) pair, take the m nearest, count each
/// store's share divided by its size, `g = clamp(2·toxic/(toxic + clean) − 1, 0, 1)`.
fn naive_gate_factor(stores: &[NaiveStore], m: usize, gamma: f64) -> f64 {
    let mut all: Vec<(f32, usize)> = stores
        .iter()
        .enumerate()
        .flat_map(|(j, s)| s.neighbours.iter().map(move |n| (n.1, j)))
        .collect();
    all.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap().then(a.1.cmp(&b.1)));
    let (mut toxic, mut clean) = (0.0, 0.0);
    for (j, s) in stores.iter().enumerate() {
        let n = all.iter().take(m).filter(|x| x.1 == j).count() as f64;
        if s.weight < 0.0 {
            toxic += n / s.rows as f64;
        } else if s.weight > 0.0 {
            clean += n / s.rows as f64;
        }
    }
    let share = if toxic + clean > 0.0 {
        toxic / (toxic + clean)
    } else {
        0.5
    };
    1.0 - gamma + gamma * (2.0 * share - 1.0).clamp(0.0, 1.0)
}

/// A store's expert over the vocabulary: the paper's patched `ℓ − m` when ρ is 0, else
/// `ln(1 + p/(ρ·u))` (0 where no neighbour predicted the token).
fn naive_expert(s: &NaiveStore, p: &RuleParams, vocab: usize) -> Vec<f64> {
    let (mass, patched) = naive_store(&s.neighbours, p.temperature as f64, vocab);
    if p.prior == 0.0 {
        let m = patched.iter().copied().fold(f64::INFINITY, f64::min);
        return patched.iter().map(|x| x - m).collect();
    }
    let lu = s.log_prior();
    (0..vocab)
        .map(|v| (mass[v] / (p.prior as f64 * lu[v].exp())).ln_1p())
        .collect()
}

/// The whole rule with variants, ensemble or toxic-only, as normalised log-probabilities.
fn naive_variant_rule(
    mode: Mode,
    stores: &[NaiveStore],
    p: &RuleParams,
    logits: &[f32],
) -> Vec<f64> {
    let vocab = logits.len();
    let z: Vec<f64> = logits.iter().map(|&x| x as f64).collect();
    let l = naive_nucleus(&naive_log_softmax(&z), p.filter_p as f64);
    let alpha = p.alpha as f64;
    let s: Vec<f64> = match mode {
        Mode::Ensemble => {
            let f = naive_gate_factor(stores, p.gate_neighbours, p.gate as f64);
            let experts: Vec<(f64, Vec<f64>)> = stores
                .iter()
                .map(|s| (s.weight as f64, naive_expert(s, p, vocab)))
                .collect();
            (0..vocab)
                .map(|v| {
                    if l[v] == NEG_INF {
                        NEG_INF
                    } else {
                        l[v] + experts
                            .iter()
                            .map(|(w, e)| alpha * f * w * e[v])
                            .sum::<f64>()
                    }
                })
                .collect()
        }
        Mode::ToxicOnly => {
            let e = naive_expert(&stores[0], p, vocab);
            (0..vocab)
                .map(|v| {
                    if l[v] == NEG_INF {
                        NEG_INF
                    } else {
                        (1.0 + alpha) * l[v] - alpha * e[v]
                    }
                })
                .collect()
        }
        Mode::KnnLm => unreachable!("the variants do not apply to kNN-LM"),
    };
    let max = s.iter().copied().fold(NEG_INF, f64::max);
    let lse = max + s.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
    s.iter().map(|x| x - lse).collect()
}

/// A store for the variants: its neighbours, a size, and counts that include every retrieved
/// token at least once (the rest random, some zero).
fn naive_store_case(vocab: usize) -> impl Strategy<Value = (Vec<(u32, f32)>, u64, Vec<u64>)> {
    (
        neighbours(vocab as u32, 64),
        prop::collection::vec(prop_oneof![Just(0u64), 0u64..50, 0u64..5000], vocab),
    )
        .prop_map(|(n, mut counts)| {
            for &(t, _) in &n {
                counts[t as usize] = counts[t as usize].max(1);
            }
            let rows = counts.iter().sum();
            (n, rows, counts)
        })
}

/// Logits, a non-toxic and a toxic store, parameters with a gate and/or a prior.
type VariantCase = (Vec<f32>, [NaiveStore; 2], RuleParams);

fn variant_case() -> impl Strategy<Value = VariantCase> {
    (8usize..200).prop_flat_map(|vocab| {
        (
            prop::collection::vec(-20.0f32..20.0, vocab),
            naive_store_case(vocab),
            naive_store_case(vocab),
            (
                -4.0f32..4.0,
                prop_oneof![Just(100.0f32), 1.0f32..1000.0],
                prop_oneof![Just(1.0f32), 0.05f32..0.999],
                prop_oneof![Just(0.0f32), Just(1.0f32), 0.0f32..=1.0],
                1usize..=128,
                prop_oneof![Just(0.0f32), Just(1.0f32), 0.001f32..10.0],
            ),
        )
            .prop_map(
                |(logits, pos, neg, (alpha, temperature, filter_p, gate, m, prior))| {
                    let params = RuleParams {
                        alpha,
                        temperature,
                        k: 64,
                        filter_p,
                        gate,
                        gate_neighbours: m,
                        prior,
                        ..RuleParams::default()
                    };
                    let store = |weight, (neighbours, rows, counts)| NaiveStore {
                        weight,
                        neighbours,
                        rows,
                        counts,
                    };
                    (logits, [store(1.0, pos), store(-1.0, neg)], params)
                },
            )
    })
}

fn variant_experts<'a>(
    stores: &'a [NaiveStore],
    priors: &'a [TokenPrior],
) -> Vec<Expert<'a, (u32, f32)>> {
    stores
        .iter()
        .zip(priors)
        .map(|(s, prior)| {
            Expert::new(s.weight, &s.neighbours[..])
                .with_rows(s.rows)
                .with_prior(prior.log_prior())
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn gated_and_prior_corrected_ensemble_matches_naive((z, stores, p) in variant_case()) {
        prop_assume!(!nucleus_cut_is_ambiguous(&z, p.filter_p));
        let priors: Vec<TokenPrior> = stores
            .iter()
            .map(|s| TokenPrior::from_counts(&s.counts, z.len()))
            .collect();
        let experts = variant_experts(&stores, &priors);
        let got = run_dense(Mode::Ensemble, &experts, &p, &z);
        assert_close(&got, &naive_variant_rule(Mode::Ensemble, &stores, &p, &z));
    }

    #[test]
    fn prior_corrected_toxic_only_matches_naive((z, stores, p) in variant_case()) {
        prop_assume!(!nucleus_cut_is_ambiguous(&z, p.filter_p));
        let p = RuleParams { gate: 0.0, ..p };
        let toxic = &stores[1..];
        let priors = [TokenPrior::from_counts(&toxic[0].counts, z.len())];
        let experts = variant_experts(toxic, &priors);
        let got = run_dense(Mode::ToxicOnly, &experts, &p, &z);
        assert_close(&got, &naive_variant_rule(Mode::ToxicOnly, toxic, &p, &z));
    }

    /// The sparse answer of a variant lists only retrieved tokens, and applying it to the
    /// logits is the dense answer: the client-side formula is unchanged by the variants.
    #[test]
    fn variant_sparse_rows_apply_to_the_dense_answer((z, stores, p) in variant_case()) {
        prop_assume!(!nucleus_cut_is_ambiguous(&z, p.filter_p));
        let priors: Vec<TokenPrior> = stores
            .iter()
            .map(|s| TokenPrior::from_counts(&s.counts, z.len()))
            .collect();
        let experts = variant_experts(&stores, &priors);
        let mut scratch = RuleScratch::new();
        let mut row = SparseRow::default();
        sparse_row(Mode::Ensemble, &experts, &p, z.len(), &mut scratch, &mut row).unwrap();
        for &(t, _) in row.pairs() {
            prop_assert!(stores.iter().any(|s| s.neighbours.iter().any(|n| n.0 == t)), "token {} was not retrieved", t);
        }
        let mut out = vec![0.0; z.len()];
        apply_sparse(&z, &row, p.filter_p, &mut scratch, &mut out).unwrap();
        prop_assert_eq!(out, run_dense(Mode::Ensemble, &experts, &p, &z));
    }

    /// The tokens that lean toxic are those whose naive toxic-over-clean unigram ratio
    /// exceeds the threshold, and the mass on them is the naive softmax's (skip, §1.5).
    #[test]
    fn leaning_tokens_and_their_mass_match_naive(
        (z, stores, _) in variant_case(),
        ratio in prop_oneof![Just(1.0f32), 1.0f32..50.0],
    ) {
        let priors: Vec<TokenPrior> = stores
            .iter()
            .map(|s| TokenPrior::from_counts(&s.counts, z.len()))
            .collect();
        let weighted: Vec<(f32, &TokenPrior)> =
            stores.iter().zip(&priors).map(|(s, p)| (s.weight, p)).collect();
        let mut got = Vec::new();
        leaning_tokens(&weighted, z.len(), ratio, &mut got);
        let (clean, toxic) = (stores[0].log_prior(), stores[1].log_prior());
        let threshold = (ratio as f64).ln();
        for v in 0..z.len() {
            let r = toxic[v] - clean[v];
            // Within float error of the threshold either answer is right.
            if (r - threshold).abs() > 1e-4 {
                prop_assert_eq!(got.contains(&(v as u32)), r > threshold, "token {} r {}", v, r);
            }
        }
        prop_assert!(got.windows(2).all(|w| w[0] < w[1]), "ascending, no repeats");
        let zf: Vec<f64> = z.iter().map(|&x| x as f64).collect();
        let l = naive_log_softmax(&zf);
        let want: f64 = got.iter().map(|&t| l[t as usize].exp()).sum();
        let mass = leaning_mass(&z, &got);
        prop_assert!((mass - want).abs() <= 1e-5, "{} vs {}", mass, want);
    }

    /// Counted inside the nucleus, the mass on a token set is the naive nucleus's
    /// renormalised mass on those of its tokens the nucleus keeps (skip_in_nucleus, §1.5), and
    /// never more than the nucleus keeps of them; `filter_p` 1 is the whole distribution's.
    #[test]
    fn leaning_mass_in_the_nucleus_matches_naive(
        (z, _, p) in variant_case(),
        picks in proptest::collection::vec(any::<bool>(), 1..=64),
    ) {
        prop_assume!(!nucleus_cut_is_ambiguous(&z, p.filter_p));
        let tokens: Vec<u32> = (0..z.len() as u32).filter(|&t| picks[t as usize % picks.len()]).collect();
        let zf: Vec<f64> = z.iter().map(|&x| x as f64).collect();
        let kept = naive_nucleus(&naive_log_softmax(&zf), p.filter_p as f64);
        let total: f64 = kept.iter().map(|x| x.exp()).sum();
        let want: f64 = tokens.iter().map(|&t| kept[t as usize].exp()).sum::<f64>() / total;
        let mut scratch = RuleScratch::new();
        let got = leaning_mass_in_nucleus(&z, &tokens, p.filter_p, &mut scratch);
        prop_assert!((got - want).abs() <= 1e-5, "{} vs {}", got, want);
        // The scratch's buffers carry nothing from one row to the next.
        let again = leaning_mass_in_nucleus(&z, &tokens, p.filter_p, &mut scratch);
        prop_assert_eq!(got, again);
        let whole = leaning_mass_in_nucleus(&z, &tokens, 1.0, &mut scratch);
        prop_assert_eq!(whole, leaning_mass(&z, &tokens));
    }

    /// The in-place decision (the dense form's, with skip_in_nucleus) decides as the naive
    /// nucleus mass does wherever rounding cannot tip it, and a row it skips holds exactly the
    /// answer the rule gives an unchanged row, bit for bit; a row it keeps is left as it was.
    #[test]
    fn the_in_place_decision_skips_as_the_nucleus_mass_says_and_answers_as_the_rule(
        (z, _, p) in variant_case(),
        picks in proptest::collection::vec(any::<bool>(), 1..=64),
        skip in 0.0f64..1.0,
    ) {
        prop_assume!(p.filter_p < 1.0 && !nucleus_cut_is_ambiguous(&z, p.filter_p));
        let tokens: Vec<u32> = (0..z.len() as u32).filter(|&t| picks[t as usize % picks.len()]).collect();
        let mut scratch = RuleScratch::new();
        let mass = leaning_mass_in_nucleus(&z, &tokens, p.filter_p, &mut scratch);
        let mut row = z.clone();
        let skipped = skip_in_nucleus_in_place(&mut row, &tokens, p.filter_p, skip, &mut scratch).unwrap();
        if (mass - skip).abs() > 1e-5 {
            prop_assert_eq!(skipped, mass < skip, "mass {} skip {}", mass, skip);
        }
        if skipped {
            let mut want = z.clone();
            apply_sparse_in_place(&mut want, &SparseRow::default(), p.filter_p, &mut RuleScratch::new()).unwrap();
            prop_assert_eq!(
                row.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
        } else {
            prop_assert_eq!(&row, &z);
        }
    }

    /// The library's smoothed unigram is the naive one.
    #[test]
    fn token_prior_is_the_smoothed_unigram((_, stores, _) in variant_case()) {
        for s in &stores {
            let got = TokenPrior::from_counts(&s.counts, s.counts.len());
            prop_assert_eq!(got.rows(), s.rows);
            for (g, w) in got.log_prior().iter().zip(s.log_prior()) {
                prop_assert!((*g as f64 - w).abs() <= 1e-5 * w.abs().max(1.0), "{} vs {}", g, w);
            }
        }
    }
}

#[test]
fn a_fully_gated_row_nearer_the_clean_store_is_the_filtered_base_distribution() {
    let z = [1.0f32, 2.0, 0.5, -1.0];
    let clean = [(0u32, 1.0f32), (1, 2.0)];
    let toxic = [(1u32, 9.0f32), (2, 10.0)];
    let experts = [
        Expert::new(1.0, &clean[..]).with_rows(100),
        Expert::new(-1.0, &toxic[..]).with_rows(100),
    ];
    let gated = RuleParams {
        gate: 1.0,
        gate_neighbours: 2,
        filter_p: 1.0,
        ..RuleParams::default()
    };
    let off = RuleParams {
        alpha: 0.0,
        ..gated
    };
    assert_eq!(
        run_dense(Mode::Ensemble, &experts, &gated, &z),
        run_dense(Mode::Ensemble, &experts, &off, &z)
    );
    // Without the gate the same row is biased.
    let ungated = RuleParams { gate: 0.0, ..gated };
    assert_ne!(
        run_dense(Mode::Ensemble, &experts, &ungated, &z),
        run_dense(Mode::Ensemble, &experts, &off, &z)
    );
}

#[test]
fn the_prior_removes_a_pure_frequency_difference_between_the_stores() {
    // Both stores' neighbours predict tokens 0 and 1 exactly at each store's own base rate,
    // but the clean store says token 0 three times as often overall. The paper's rule pushes
    // token 0 up; the corrected experts see no evidence either way.
    let clean = [(0u32, 1.0f32), (0, 1.0), (0, 1.0), (1, 1.0)];
    let toxic = [(0u32, 1.0f32), (1, 1.0)];
    let (clean_counts, toxic_counts) = ([300u64, 100], [100u64, 100]);
    let priors = [
        TokenPrior::from_counts(&clean_counts, 2),
        TokenPrior::from_counts(&toxic_counts, 2),
    ];
    let experts = [
        Expert::new(1.0, &clean[..]).with_prior(priors[0].log_prior()),
        Expert::new(-1.0, &toxic[..]).with_prior(priors[1].log_prior()),
    ];
    let z = [0.0f32, 0.0];
    let paper = RuleParams {
        filter_p: 1.0,
        ..RuleParams::default()
    };
    let corrected = RuleParams {
        prior: 1.0,
        ..paper
    };
    let out = run_dense(Mode::Ensemble, &experts, &paper, &z);
    assert!(
        out[0] > out[1] + 0.5,
        "the paper's rule favours token 0: {out:?}"
    );
    let out = run_dense(Mode::Ensemble, &experts, &corrected, &z);
    assert!(
        (out[0] - out[1]).abs() < 1e-2,
        "the prior cancels it: {out:?}"
    );
}

#[test]
fn variants_are_refused_where_they_do_not_apply_or_lack_their_inputs() {
    let n = [(0u32, 1.0f32)];
    let mut scratch = RuleScratch::new();
    let mut row = SparseRow::default();
    let gated = RuleParams {
        gate: 0.5,
        ..RuleParams::default()
    };
    let with_prior = RuleParams {
        prior: 1.0,
        ..RuleParams::default()
    };
    let one = [Expert::new(-1.0, &n[..]).with_rows(1)];
    assert!(matches!(
        sparse_row(Mode::ToxicOnly, &one, &gated, 4, &mut scratch, &mut row),
        Err(RuleError::NotInMode {
            what: "the gate",
            ..
        })
    ));
    assert!(matches!(
        sparse_row(Mode::KnnLm, &one, &with_prior, 4, &mut scratch, &mut row),
        Err(RuleError::NotInMode {
            mode: Mode::KnnLm,
            ..
        })
    ));
    // No size for the gate, no prior for the correction.
    let bare = [Expert::new(1.0, &n[..]), Expert::new(-1.0, &n[..])];
    assert_eq!(
        sparse_row(Mode::Ensemble, &bare, &gated, 4, &mut scratch, &mut row),
        Err(RuleError::GateNeedsRows { store: 0 })
    );
    assert_eq!(
        sparse_row(
            Mode::Ensemble,
            &bare,
            &with_prior,
            4,
            &mut scratch,
            &mut row
        ),
        Err(RuleError::NoPrior { store: 0 })
    );
    // A prior that does not cover a retrieved token is refused too.
    let far = [(3u32, 1.0f32)];
    let short = TokenPrior::from_counts(&[1, 1], 2);
    let e = [Expert::new(1.0, &far[..]).with_prior(short.log_prior())];
    assert_eq!(
        sparse_row(Mode::Ensemble, &e, &with_prior, 4, &mut scratch, &mut row),
        Err(RuleError::NoPrior { store: 0 })
    );
    // After the failures the scratch gives the clean answer.
    let clean = [Expert::new(1.0, &n[..]), Expert::new(-1.0, &far[..])];
    sparse_row(
        Mode::Ensemble,
        &clean,
        &RuleParams::default(),
        4,
        &mut scratch,
        &mut row,
    )
    .unwrap();
    let mut fresh = SparseRow::default();
    sparse_row(
        Mode::Ensemble,
        &clean,
        &RuleParams::default(),
        4,
        &mut RuleScratch::new(),
        &mut fresh,
    )
    .unwrap();
    assert_eq!(row, fresh);
}
