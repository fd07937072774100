#!/usr/bin/env python3
"""Datastore builder benchmark (issue 4): build throughput, and add-to-visible latency.

1. Throughput: `goodtriever datastore build` with the default model on the first N toxic
   tweets (classes 0 and 1) of ../shared/data/davidson/labeled_data.csv, for each window and
   stride; tokens/s = rows / extraction seconds from the build's --json report (model loading
   and indexing are reported separately).
2. Add-to-visible: a reader process (benches/drivers/add_latency_reader.rs) holds a ~1M-row store
   open and polls `refresh`; we run `goodtriever datastore add` with ~10k tokens of other
   tweets and time from the moment the add starts until the reader's search returns a new row.
   The 1M-row store is assembled from hard links of an existing store's segments (segments
   are immutable, so links are safe): by default datastores/nontoxic, replicated until it has
   at least --big-rows rows. The rows are real hidden states of the default model, duplicated;
   duplicates change nothing for this latency (an add never touches existing segments).

Nothing is written into the repository: work files go to target/bench-build/.
Prints one table and writes target/bench-build/results.json.

Usage: python3 scripts/bench/bench_build.py [--tweets 1000] [--windows 256:192,1024:512]
                                      [--add-tokens 10000] [--big-rows 1000000] [--skip-throughput]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from cargo_bench import build_drivers

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / "target" / "release" / "goodtriever"
DAVIDSON = REPO.parent / "shared" / "data" / "davidson" / "labeled_data.csv"
WORK = REPO / "target" / "bench-build"


def log(msg: str) -> None:
    print(f"[bench_build] {msg}", file=sys.stderr, flush=True)


def tweets(toxic: bool) -> list[str]:
    if not DAVIDSON.exists():
        sys.exit(f"{DAVIDSON} is missing (see ../shared/data/README.md)")
    with open(DAVIDSON, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    keep = [r["tweet"] for r in rows if (r["class"] in ("0", "1")) == toxic]
    return [" ".join(t.split()) for t in keep if t.strip()]


def write_jsonl(path: Path, texts: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")


def machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "load_avg": os.getloadavg(),
    }


def throughput(n: int, windows: list[tuple[int, int]]) -> list[dict]:
    texts = tweets(toxic=True)[:n]
    src = WORK / f"tweets-{n}.jsonl"
    write_jsonl(src, texts)
    out = []
    for w, s in windows:
        dest = WORK / f"throughput-w{w}-s{s}"
        shutil.rmtree(dest, ignore_errors=True)
        log(f"build: {n} tweets, window {w}, stride {s}")
        load0 = os.getloadavg()[0]
        t0 = time.time()
        r = subprocess.run(
            [str(BIN), "datastore", "build", "--input", str(src), "--out", str(dest),
             "--window", str(w), "--stride", str(s), "--json"],
            check=True, capture_output=True, text=True,
        )
        wall = time.time() - t0
        rep = json.loads(r.stdout)
        rows = rep["rows"]
        out.append({
            "window": w, "stride": s, "documents": rep["documents"], "tokens": rep["tokens"],
            "rows": rows, "extract_s": rep["extract_seconds"], "index_s": rep["index_seconds"],
            "wall_s": wall, "tokens_per_s": rows / rep["extract_seconds"],
            "load_avg_before": load0,
        })
    return out


def replicate(src: Path, dest: Path, min_rows: int) -> int:
    """A store whose manifest lists `src`'s live segments again and again (hard links)."""
    m = json.loads((src / "manifest.json").read_text())
    live = [s for s in m["segments"] if not s.get("retired")]
    per = sum(s["rows"] for s in live)
    if per == 0:
        sys.exit(f"{src} has no live rows")
    copies = -(-min_rows // per)
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "segments").mkdir(parents=True)
    segs, next_id = [], 0
    for _ in range(copies):
        for s in live:
            d = dest / "segments" / str(next_id)
            d.mkdir()
            for f in (src / "segments" / str(s["id"])).iterdir():
                os.link(f, d / f.name)
            segs.append(dict(s, id=next_id))
            next_id += 1
    m.update(segments=segs, next_segment_id=next_id, generation=m.get("generation", 0) + 1)
    (dest / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    return per * copies


def add_latency(reader_exe: Path, add_tokens: int, big_from: Path, big_rows: int) -> dict:
    big = WORK / "big"
    rows = replicate(big_from, big, big_rows)
    log(f"{big}: {rows} rows in hard-linked segments of {big_from}")
    # ~42 tokens per tweet (measured); the add's report gives the exact count.
    texts = tweets(toxic=False)[: max(1, add_tokens // 42)]
    src = WORK / "add.jsonl"
    write_jsonl(src, texts)
    reader = subprocess.Popen([str(reader_exe), str(big), "10"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    line = reader.stderr.readline()
    if not line.startswith("ready"):
        sys.exit(f"reader failed: {line}{reader.stderr.read()}")
    log(f"reader {line.strip()}; adding {len(texts)} tweets")
    t0 = time.time()
    r = subprocess.run([str(BIN), "datastore", "add", str(big), "--input", str(src),
                        "--window", "256", "--stride", "192", "--json"],
                       check=True, capture_output=True, text=True)
    t_add = time.time() - t0
    seen = json.loads(reader.stdout.readline())
    reader.wait(timeout=60)
    rep = json.loads(r.stdout)
    return {
        "store_rows": rows, "added_tokens": rep["tokens"], "added_rows": rep["rows"],
        "add_process_s": t_add, "extract_s": rep["extract_seconds"],
        "index_s": rep["index_seconds"],
        "load_and_read_s": t_add - rep["extract_seconds"] - rep["index_seconds"],
        "add_start_to_visible_s": seen["visible_at"] - t0,
        "commit_to_visible_s": seen["visible_at"] - t0 - t_add,
        "reader_refresh_ms": seen["refresh_ms"], "reader_search_ms": seen["search_ms"],
        "found_new_row": seen["found_new_row"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tweets", type=int, default=1000)
    ap.add_argument("--windows", default="256:192,1024:512")
    ap.add_argument("--add-tokens", type=int, default=10_000)
    ap.add_argument("--big-rows", type=int, default=1_000_000)
    ap.add_argument("--big-from", type=Path, default=REPO / "datastores" / "nontoxic")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-latency", action="store_true")
    a = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    log("cargo build --release (binary and reader)")
    subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "goodtriever"],
                   check=True, cwd=REPO)
    res = {"machine": machine()}
    if not a.skip_throughput:
        wins = [tuple(int(x) for x in p.split(":")) for p in a.windows.split(",")]
        res["throughput"] = throughput(a.tweets, wins)
    if not a.skip_latency:
        reader_exe = build_drivers("add_latency_reader")["add_latency_reader"]
        res["add_latency"] = add_latency(reader_exe, a.add_tokens, a.big_from, a.big_rows)
    res["machine"]["load_avg_after"] = os.getloadavg()
    (WORK / "results.json").write_text(json.dumps(res, indent=2) + "\n")

    m = res["machine"]
    print(f"machine: {m['cpus']} CPUs ({m['cpu']}), load average {m['load_avg'][0]:.1f} at start")
    for t in res.get("throughput", []):
        print(f"build  window {t['window']:>4} stride {t['stride']:>4}: {t['rows']:>7} rows "
              f"from {t['documents']} docs, extraction {t['extract_s']:.1f} s = "
              f"{t['tokens_per_s']:.0f} tokens/s, indexing {t['index_s']:.1f} s")
    if "add_latency" in res:
        r = res["add_latency"]
        print(f"add {r['added_rows']} rows ({r['added_tokens']} tokens) into {r['store_rows']} rows: "
              f"visible to a running reader {r['add_start_to_visible_s']:.1f} s after the add started "
              f"(model load + read {r['load_and_read_s']:.1f} s, extraction {r['extract_s']:.1f} s, "
              f"indexing {r['index_s']:.1f} s; commit to visible {r['commit_to_visible_s']*1e3:.0f} ms, "
              f"refresh {r['reader_refresh_ms']:.1f} ms, first search {r['reader_search_ms']:.1f} ms, "
              f"found: {r['found_new_row']})")


if __name__ == "__main__":
    main()
