#!/usr/bin/env python3
"""Single-query HNSW walk latency at the control's k, A/B, on one box in one run (issue 19).

The control's cost at batch 1 is the graph walk: one query, k = ef = 1024, a store too large
for any cache. This script times exactly that with `goodtriever datastore search
--one-by-one --hnsw`, for several builds (--bins) or environment settings (--env) of the
binary, alternated --repeat times over the same queries so that load drifts hit every variant
alike, and prints p50 / p99 / mean per query and each variant's agreement with the first
one's neighbour ids (a faster walk must find the same rows).

Queries are hidden states of text that no store holds: the f16 keys of a store built from
held-out text (`--queries-from DIR`, its segments' keys.bin), --n of them spread evenly.

Usage:
  python3 scripts/bench/bench_walk.py --store datastores/million --queries-from DIR \
      --bins new=target/release/goodtriever old=/tmp/goodtriever-old [--n 200] [--repeat 3]
  python3 scripts/bench/bench_walk.py --store S --queries-from Q --env "pf=GT_X=1" base=
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_PY = REPO / ".venv-data" / "bin" / "python"

try:
    import numpy as np
except ImportError:  # the demo's .venv-data has numpy; re-run there
    if VENV_PY.exists() and Path(sys.prefix).resolve() != VENV_PY.parents[1].resolve():
        os.execv(str(VENV_PY), [str(VENV_PY), *sys.argv])
    sys.exit("bench_walk.py needs numpy (run scripts/demo.sh once, which makes .venv-data)")


def store_dim(store: Path) -> int:
    manifest = json.loads((store / "manifest.json").read_text())
    if manifest.get("dtype") != "f16":
        raise SystemExit(f"{store}: queries are read from f16 keys, this store's are {manifest.get('dtype')}")
    return int(manifest["fingerprint"]["hidden_size"])


def load_queries(src: Path, n: int) -> np.ndarray:
    dim = store_dim(src)
    rows = [
        np.fromfile(seg / "keys.bin", dtype=np.float16).reshape(-1, dim)
        for seg in sorted((src / "segments").iterdir())
        if (seg / "keys.bin").exists()
    ]
    keys = np.concatenate(rows)
    if len(keys) < n:
        raise SystemExit(f"{src} holds {len(keys)} rows, fewer than --n {n}")
    pick = np.linspace(0, len(keys) - 1, n).round().astype(int)
    return keys[pick].astype(np.float32)


def parse_variants(bins: list[str], envs: list[str], default_bin: Path) -> list[tuple[str, Path, dict]]:
    variants = []
    for spec in bins:
        name, _, path = spec.partition("=")
        variants.append((name, Path(path), {}))
    for spec in envs:
        name, _, assigns = spec.partition("=")
        env = {}
        for a in assigns.split(","):
            if a:
                k, _, v = a.partition(":")
                env[k] = v
        variants.append((name, default_bin, env))
    if not variants:
        raise SystemExit("name at least one variant with --bins or --env")
    return variants


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, required=True, help="the store to search")
    ap.add_argument("--queries-from", type=Path, required=True, help="a store of held-out text")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--bins", nargs="*", default=[], help="NAME=PATH of a goodtriever binary")
    ap.add_argument("--env", nargs="*", default=[],
                    help="NAME=VAR:VALUE,VAR:VALUE run with the default binary and these variables")
    ap.add_argument("--bin", type=Path, default=REPO / "target" / "release" / "goodtriever")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    a = ap.parse_args()

    variants = parse_variants(a.bins, a.env, a.bin)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        qpath = tmp / "queries.npy"
        np.save(qpath, load_queries(a.queries_from, a.n))
        runs: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
        ids: dict[str, np.ndarray] = {}
        for rep in range(a.repeat):
            for name, binary, env in variants:
                out_ids, out_d = tmp / f"{name}-ids.npy", tmp / f"{name}-d.npy"
                cmd = [str(binary), "datastore", "search", str(a.store), "--queries", str(qpath),
                       "--k", str(a.k), "--hnsw", "--one-by-one", "--json",
                       "--out-ids", str(out_ids), "--out-dists", str(out_d)]
                proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"{name}: {' '.join(cmd)} failed:\n{proc.stderr}")
                runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                ids[name] = np.load(out_ids)
                r = runs[name][-1]
                print(f"[{rep + 1}/{a.repeat}] {name}: p50 {r['p50_ms']:.3f} ms, "
                      f"p99 {r['p99_ms']:.3f} ms, mean {r['per_query_ms']:.3f} ms", file=sys.stderr)

        first = variants[0][0]
        summary = []
        for name, _, _ in variants:
            agree = np.mean([
                len(np.intersect1d(ids[name][i], ids[first][i])) / a.k for i in range(a.n)
            ])
            p50 = [r["p50_ms"] for r in runs[name]]
            summary.append({
                "variant": name,
                "p50_ms_median": statistics.median(p50),
                "p50_ms_min": min(p50),
                "p50_ms_max": max(p50),
                "mean_ms_median": statistics.median(r["per_query_ms"] for r in runs[name]),
                "p99_ms_median": statistics.median(r["p99_ms"] for r in runs[name]),
                "ids_shared_with_first": float(agree),
            })
    if a.json:
        print(json.dumps({"store": str(a.store), "k": a.k, "queries": a.n, "repeat": a.repeat,
                          "variants": summary}, indent=2))
        return
    print(f"store {a.store}, k = ef = {a.k}, {a.n} held-out queries one at a time, {a.repeat} alternations")
    print(f"{'variant':<14} {'p50 median (min–max)':>24} {'mean':>8} {'p99':>8} {'ids shared':>11}")
    for s in summary:
        print(f"{s['variant']:<14} {s['p50_ms_median']:>8.3f} ({s['p50_ms_min']:.3f}–{s['p50_ms_max']:.3f}) ms"
              f" {s['mean_ms_median']:>8.3f} {s['p99_ms_median']:>8.3f} {s['ids_shared_with_first']:>11.4f}")


if __name__ == "__main__":
    main()
