"""apply_bias's nucleus against a plain full stable sort (no server needed)."""

import numpy as np
import pytest

from goodtriever_client import log_softmax, nucleus_filter


def sorted_nucleus(l: np.ndarray, filter_p: float) -> np.ndarray:
    order = np.argsort(-l, kind="stable")
    p = np.exp(l[order].astype(np.float64))
    before = np.cumsum(p) - p
    keep = before < filter_p
    keep[0] = True
    out = np.full_like(l, -np.inf)
    out[order[keep]] = l[order[keep]]
    return out


def cut_is_ambiguous(l: np.ndarray, filter_p: float) -> bool:
    """Whether some rank's preceding mass is within rounding of filter_p: then both answers
    are right and two summation orders may differ."""
    p = np.sort(np.exp(l.astype(np.float64)))[::-1]
    return bool(np.any(np.abs(np.cumsum(p) - p - filter_p) < 1e-9))


def rows(rng, vocab):
    yield rng.uniform(-2, 2, vocab)  # flat: the cut bucket holds many tokens
    yield rng.normal(0, 4, vocab)  # peaked
    yield np.round(rng.normal(0, 2, vocab) * 2) / 2  # many exact ties
    z = rng.uniform(-80, 0, vocab)  # far below the histogram's span
    z[: vocab // 50] = rng.normal(0, 1, vocab // 50)
    yield z
    z = rng.normal(0, 3, vocab)
    z[rng.random(vocab) < 0.3] = -np.inf  # masked tokens
    yield z


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("filter_p", [0.05, 0.5, 0.9, 0.999])
def test_histogram_nucleus_equals_a_full_sort(seed, filter_p):
    rng = np.random.default_rng(seed)
    checked = 0
    for vocab in (1, 7, 600, 49152):
        for z in rows(rng, vocab):
            if not np.isfinite(z).any():
                continue
            for dtype in (np.float32, np.float64):
                l = log_softmax(z).astype(dtype)
                if cut_is_ambiguous(l, filter_p):
                    continue
                got, want = nucleus_filter(l, filter_p), sorted_nucleus(l, filter_p)
                assert got.dtype == l.dtype
                assert np.array_equal(np.isneginf(got), np.isneginf(want)), (vocab, dtype)
                assert np.array_equal(got[np.isfinite(got)], l[np.isfinite(got)])
                checked += 1
    assert checked >= 30
