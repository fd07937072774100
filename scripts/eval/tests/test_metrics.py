"""Hand-computed cases for scripts/eval/eval_metrics.py (no scorer, no model, no download).

Run: .venv-data/bin/python -m pytest scripts/eval/tests
"""

import math
import sys
from pathlib import Path

import pytest

# The scripts under test live in scripts/eval and scripts/data.
sys.path[:0] = [str(Path(__file__).resolve().parents[2] / d) for d in ("data", "eval")]

from eval_metrics import (  # noqa: E402
    dist_n,
    dist_n_per_prompt,
    expected_max_toxicity,
    latency,
    mean_se,
    paired_difference,
    perplexities,
    relative_change,
    toxicity_probability,
)

# Three prompts, hand-made sample scores.
SCORES = {
    "a": [0.1, 0.9, 0.3],  # max 0.9
    "b": [0.2, 0.2],  # max 0.2
    "c": [0.3, 0.4, 0.1, 0.25],  # max 0.4
}


def test_emt_is_mean_of_per_prompt_maxima_with_std():
    mean, std = expected_max_toxicity(SCORES)
    assert mean == pytest.approx(0.5)  # (0.9 + 0.2 + 0.4) / 3
    # deviations 0.4, -0.3, -0.1 -> variance (0.16 + 0.09 + 0.01) / 3
    assert std == pytest.approx(math.sqrt(0.26 / 3))


def test_emt_ignores_the_mean_of_samples():
    # Same maxima, very different means: same EMT.
    assert expected_max_toxicity({"x": [0.8, 0.0, 0.0]})[0] == pytest.approx(
        expected_max_toxicity({"x": [0.8, 0.8, 0.8]})[0]
    )


def test_toxicity_probability_counts_prompts_with_any_sample_over_threshold():
    assert toxicity_probability(SCORES, 0.5) == pytest.approx(1 / 3)
    assert toxicity_probability(SCORES, 0.25) == pytest.approx(2 / 3)  # a (0.9), c (0.3, 0.4)
    assert toxicity_probability(SCORES, 0.2) == pytest.approx(1.0)  # inclusive threshold
    assert toxicity_probability(SCORES, 0.95) == 0.0


def test_dist_n_per_prompt_then_averaged():
    texts = {
        # words: the cat the cat | the dog -> 6 unigrams, 3 distinct (the, cat, dog)
        # bigrams: (the cat)(cat the)(the cat) | (the dog) -> 4, 3 distinct
        # trigrams: (the cat the)(cat the cat) | none -> 2, 2 distinct
        "p": ["the cat the cat", "the dog"],
        # all distinct: a b c -> 3/3 unigrams, 2/2 bigrams, 1/1 trigram
        "q": ["a b c"],
    }
    assert dist_n(texts, 1) == pytest.approx((3 / 6 + 1.0) / 2)
    assert dist_n(texts, 2) == pytest.approx((3 / 4 + 1.0) / 2)
    assert dist_n(texts, 3) == pytest.approx((2 / 2 + 1.0) / 2)


def test_dist_n_repetition_lowers_it_and_empty_prompts_are_skipped():
    assert dist_n({"r": ["x x x x"]}, 1) == pytest.approx(0.25)
    assert dist_n({"r": ["x x x x"], "e": [""]}, 1) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        dist_n({"e": ["one"]}, 2)


def test_perplexity_mean_and_pooled_by_hand():
    # Continuation 1: 2 tokens, probabilities 1/2 and 1/8 -> nll = ln 2 + ln 8 = ln 16,
    #   ppl = exp(ln16 / 2) = 4.
    # Continuation 2: 1 token, probability 1/2 -> ppl 2.
    # Mean: 3. Pooled: exp((ln 16 + ln 2) / 3) = 32^(1/3).
    rows = [(math.log(16), 2), (math.log(2), 1), (0.0, 0)]
    p = perplexities(rows)
    assert p["mean"] == pytest.approx(3.0)
    assert p["pooled"] == pytest.approx(32 ** (1 / 3))
    assert p["scored"] == 2 and p["empty"] == 1
    with pytest.raises(ValueError):
        perplexities([(0.0, 0)])


def test_latency_per_sequence_and_control_share():
    # Batch 1: 100 ms for 25 sequences (4 ms each), 10 ms in the hook.
    # Batch 2: 60 ms for 10 sequences (6 ms each), 30 ms in the hook.
    lat = latency([(100.0, 25, 10.0), (60.0, 10, 30.0)])
    assert lat["ms_per_sequence"] == pytest.approx(5.0)
    assert lat["control_share"] == pytest.approx(40 / 160)
    with pytest.raises(ValueError):
        latency([(1.0, 0, 0.0)])


def test_relative_change():
    assert relative_change(0.39, 0.22) == pytest.approx(-0.4359, abs=1e-4)  # the paper's EMT
    with pytest.raises(ValueError):
        relative_change(0.0, 1.0)


def test_mean_and_standard_error_by_hand():
    # mean 2, sample variance ((1)^2 + 0 + 1^2) / 2 = 1, s.e. sqrt(1 / 3)
    m, se = mean_se([1.0, 2.0, 3.0])
    assert m == 2.0 and se == pytest.approx(math.sqrt(1 / 3))
    assert mean_se([5.0]) == (5.0, 0.0)
    with pytest.raises(ValueError):
        mean_se([])


def test_paired_difference_uses_only_common_prompts_and_per_prompt_differences():
    base = {"a": 0.5, "b": 0.2, "c": 0.9}
    run = {"a": 0.3, "b": 0.2, "d": 0.0}  # "c" and "d" are not paired
    d, se, n = paired_difference(base, run)
    # differences -0.2 and 0.0: mean -0.1, sample std sqrt(0.02), s.e. sqrt(0.02 / 2) = 0.1
    assert (d, n) == (pytest.approx(-0.1), 2)
    assert se == pytest.approx(0.1)
    # A constant shift has zero s.e. however spread the prompts are: the pairing removes it.
    shifted = {k: v - 0.05 for k, v in base.items()}
    assert paired_difference(base, shifted)[:2] == (pytest.approx(-0.05), pytest.approx(0.0))
    with pytest.raises(ValueError):
        paired_difference({"a": 1.0}, {"b": 1.0})


def test_dist_n_per_prompt_lists_each_prompts_ratio():
    texts = {"p": ["a b", "a c"], "q": ["x x x x"], "r": [""]}
    assert dist_n_per_prompt(texts, 1) == {"p": 3 / 4, "q": 1 / 4}
    assert dist_n(texts, 1) == pytest.approx((3 / 4 + 1 / 4) / 2)
