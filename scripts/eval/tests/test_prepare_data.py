"""The default non-toxic store's selection (scripts/data/prepare_data.py, `matched_budget`):
clean sentences taken from each source in the toxic store's proportions."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "data"))

import prepare_data as pd  # noqa: E402


def rows(source: str, n: int, length: int) -> list[dict]:
    return [{"text": f"{source} sentence {i:03d} ".ljust(length, "x"), "source": source} for i in range(n)]


def chars(picked: list[dict], source: str) -> int:
    return sum(len(r["text"]) for r in picked if r["source"] == source)


def test_sources_get_the_toxic_stores_shares():
    clean = rows("a", 100, 50) + rows("b", 100, 50) + rows("c", 100, 50)
    toxic = rows("a", 3, 100) + rows("b", 1, 100)  # a: 75%, b: 25%, c: none
    picked = pd.matched_budget(clean, toxic, 2000)
    assert 1500 <= chars(picked, "a") <= 1550
    assert 500 <= chars(picked, "b") <= 550
    assert chars(picked, "c") == 0
    # In hash order, every row once, and the same on every run.
    assert picked == sorted(picked, key=lambda r: pd.digest(r["text"]))
    assert len({r["text"] for r in picked}) == len(picked)
    assert picked == pd.matched_budget(list(reversed(clean)), toxic, 2000)


def test_what_a_source_cannot_fill_comes_from_the_rest():
    clean = rows("a", 2, 50) + rows("c", 100, 50)
    toxic = rows("a", 1, 100)  # a holds all the toxic text but only 100 clean characters
    picked = pd.matched_budget(clean, toxic, 1000)
    assert chars(picked, "a") == 100
    assert 900 <= chars(picked, "c") <= 950
