#!/usr/bin/env python3
"""A 1M-row datastore of the default model's hidden states for the cost benchmark (issue 19).

Two cores extract about 350 tokens a second, so a million rows of real text would take the
model most of an hour; this script instead takes every live row of the stores already built
(by default the demo's two stores and the Davidson stores: about 520k rows of real hidden
states) and fills the rest up to --rows with copies of randomly chosen real rows plus Gaussian
noise (per dimension, --jitter times that dimension's standard deviation over the real rows),
each keeping its row's next-token value. What this measures is what a search of a store of
that size costs (a graph over a million rows, keys that do not fit any cache); the jittered
rows make a query's neighbourhood denser than a million rows of fresh text would, so the
store is for speed, never for quality figures.

The store keeps the first source store's model fingerprint (so the generator accepts it): the
source directory is copied, the rows are imported into it as one new segment with `goodtriever
datastore import` (one HNSW build over all of them: about 20 min on two cores), and the copied
segments are retired. Work files go to target/bench-million/ (git-ignored); the store to --out
(default datastores/million, git-ignored). An existing --out is left alone.

Usage: python3 scripts/bench/million_store.py [--rows 1000000] [--jitter 0.05] [--seed 1]
           [--from datastores/davidson-nontoxic datastores/davidson-toxic ...]
           [--out datastores/million] [--bin target/release/goodtriever]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

# numpy comes from the data venv (scripts/data/prepare_data.py makes it): run inside it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from data_venv import reexec_in_data_venv  # noqa: E402

if __name__ == "__main__":
    reexec_in_data_venv(__file__)

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / "target" / "bench-million"
DEFAULT_FROM = ["davidson-nontoxic", "davidson-toxic", "nontoxic", "toxic"]


def log(msg: str) -> None:
    print(f"[million_store] {msg}", file=sys.stderr, flush=True)


def live_rows(store: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """Every live row's key (f16) and value of a local store, in manifest order."""
    m = json.loads((store / "manifest.json").read_text())
    if m.get("dtype") != "f16":
        sys.exit(f"{store}: keys are {m.get('dtype')}, this script reads f16 stores")
    dim = m["fingerprint"]["hidden_size"]
    keys, values = [], []
    for seg in m["segments"]:
        if seg.get("retired"):
            continue
        d = store / "segments" / str(seg["id"])
        k = np.fromfile(d / "keys.bin", dtype="<f2").reshape(-1, dim)
        v = np.fromfile(d / "values.bin", dtype="<u4")
        if len(k) != seg["rows"] or len(v) != seg["rows"]:
            sys.exit(f"{d}: {len(k)} keys and {len(v)} values, the manifest says {seg['rows']}")
        keys.append(k)
        values.append(v)
    return np.concatenate(keys), np.concatenate(values), dim


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--jitter", type=float, default=0.05, help="noise per dimension, in its standard deviations")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--from", dest="sources", nargs="+", type=Path,
                    default=[REPO / "datastores" / s for s in DEFAULT_FROM])
    ap.add_argument("--out", type=Path, default=REPO / "datastores" / "million")
    ap.add_argument("--bin", type=Path, default=REPO / "target" / "release" / "goodtriever")
    a = ap.parse_args()
    if (a.out / "manifest.json").exists():
        log(f"{a.out} exists; remove it to rebuild")
        return
    sources = [s for s in a.sources if (s / "manifest.json").exists()]
    if not sources:
        sys.exit("none of the source stores exists: run scripts/demo.sh (and scripts/data/davidson_stores.py)")
    fingerprints = {json.dumps(json.loads((s / "manifest.json").read_text())["fingerprint"], sort_keys=True)
                    for s in sources}
    if len(fingerprints) != 1:
        sys.exit("the source stores come from different models")
    parts = [live_rows(s) for s in sources]
    keys = np.concatenate([p[0] for p in parts])
    values = np.concatenate([p[1] for p in parts])
    real = len(keys)
    log(f"{real} real rows from {', '.join(s.name for s in sources)}")
    if real > a.rows:
        keys, values = keys[: a.rows], values[: a.rows]
    elif real < a.rows:
        rng = np.random.default_rng(a.seed)
        extra = a.rows - real
        pick = rng.integers(0, real, size=extra)
        std = keys.astype(np.float32).std(axis=0)
        noisy = np.empty((extra, keys.shape[1]), dtype=np.float16)
        for start in range(0, extra, 65536):
            end = min(start + 65536, extra)
            block = keys[pick[start:end]].astype(np.float32)
            block += rng.standard_normal(block.shape, dtype=np.float32) * (a.jitter * std)
            noisy[start:end] = block.astype(np.float16)
        keys = np.concatenate([keys, noisy])
        values = np.concatenate([values, values[pick]])
        log(f"{extra} jittered copies ({a.jitter} standard deviations per dimension)")
    WORK.mkdir(parents=True, exist_ok=True)
    np.save(WORK / "keys.npy", keys)
    np.save(WORK / "values.npy", values.astype(np.uint32))
    staging = a.out.with_name(a.out.name + ".staging")
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(sources[0], staging)
    old = [seg["id"] for seg in json.loads((staging / "manifest.json").read_text())["segments"]
           if not seg.get("retired")]
    started = time.time()
    subprocess.run([str(a.bin), "datastore", "import", str(staging), "--keys", str(WORK / "keys.npy"),
                    "--values", str(WORK / "values.npy"), "--label", "bench",
                    "--tag", f"{real} real rows + jittered copies"], check=True)
    for seg in old:
        subprocess.run([str(a.bin), "datastore", "retire", str(staging), str(seg)],
                       check=True, stdout=subprocess.DEVNULL)
    took = time.time() - started
    staging.rename(a.out)
    (WORK / "build.json").write_text(json.dumps({"rows": len(keys), "real_rows": real, "jitter": a.jitter,
                                                 "seed": a.seed, "sources": [str(s) for s in sources],
                                                 "import_s": round(took, 1)}, indent=1))
    log(f"{a.out}: {len(keys)} rows in one segment, import {took:.0f} s")


if __name__ == "__main__":
    main()
