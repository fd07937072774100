"""The bootstrapped stores' prompts and selection (scripts/data/bootstrap_stores.py)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "data"))

import bootstrap_stores as bs  # noqa: E402


def sentence(i: int, words: int) -> str:
    return " ".join(f"w{i}x{j}" for j in range(words))


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_prompts_are_half_sentences_balanced_by_kind(tmp_path):
    write(tmp_path / "toxic.jsonl",
          [{"text": sentence(i, 10), "source": "nlp-corpus/doc-1.json", "toxicity": 0.9} for i in range(5)]
          + [{"text": "too short", "source": "nlp-corpus/doc-1.json", "toxicity": 0.9}])
    write(tmp_path / "nontoxic.jsonl",
          [{"text": sentence(100 + i, 12), "source": "nlp-corpus/doc-2.json", "toxicity": 0.01} for i in range(5)])
    prompts = bs.make_prompts(tmp_path, 3)
    assert [p["kind"] for p in prompts] == ["toxic", "clean"] * 3
    for p in prompts:
        words = p["prompt"].split()
        assert len(words) in (5, 6)  # half of 10 or 12 words
        assert words[0].endswith("x0")
    assert len({p["id"] for p in prompts}) == 6
    assert prompts == bs.make_prompts(tmp_path, 3)


def test_selection_labels_and_matches_prompt_sources():
    def row(text, source, tox):
        return {"text": text, "source": source, "kind": "clean", "toxicity": tox}

    scored = ([row(f"bad {i}".ljust(40, "x"), "doc-a", 0.9) for i in range(3)]
              + [row(f"bad b {i}".ljust(40, "x"), "doc-b", 0.6) for i in range(1)]
              + [row(f"unsure {i}".ljust(40, "x"), "doc-a", 0.3) for i in range(20)]
              + [row(f"good a {i}".ljust(40, "x"), "doc-a", 0.01) for i in range(20)]
              + [row(f"good b {i}".ljust(40, "x"), "doc-b", 0.05) for i in range(20)]
              + [row(f"good c {i}".ljust(40, "x"), "doc-c", 0.02) for i in range(20)])
    toxic, nontoxic = bs.select(scored, 0.5, 0.1, 2.0)
    assert len(toxic) == 4 and all(r["toxicity"] >= 0.5 for r in toxic)
    assert all(r["toxicity"] < 0.1 for r in nontoxic)
    chars = {s: sum(len(r["text"]) for r in nontoxic if r["source"] == s) for s in ("doc-a", "doc-b", "doc-c")}
    # 2 x 160 toxic characters: 3/4 of them from doc-a's prompts, 1/4 from doc-b's, none from doc-c's.
    assert 240 <= chars["doc-a"] <= 280 and 80 <= chars["doc-b"] <= 120 and chars["doc-c"] == 0
    assert bs.select([r for r in scored if r["toxicity"] < 0.5], 0.5, 0.1, 2.0) == ([], [])
