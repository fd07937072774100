#!/usr/bin/env python3
"""Local HNSW against Milvus on the same rows (docs/scale-out.md): pushes a local store into a
Milvus collection (ingestion rows/s), then measures k-nearest search p50/p99 at 1 and 8
concurrent requests and the per-step cost of the full control with each backend, through the
driver benches/drivers/bench_milvus.rs.

    scripts/milvus.sh start
    python3 scripts/bench/bench_milvus.py --store datastores/toxic --out bench-milvus.json
    scripts/milvus.sh stop

`--local-only` measures the local store alone (no Milvus server, no push): run it on two
stores, e.g. a store and its compacted copy, to compare them on the same queries.

`--profile dev` builds the driver in the dev profile (dependencies optimised, this crate at
opt-level 1) when a release build of the `milvus` feature is too slow to wait for; say so with
the figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, help="the local datastore directory")
    ap.add_argument("--address", default="milvus://127.0.0.1:19530/gt_bench?timeout_ms=30000",
                    help="the collection to push into (dropped first)")
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--ef", type=int, default=1024)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--profile", default="bench", choices=["bench", "dev", "release"])
    ap.add_argument("--reuse", action="store_true",
                    help="measure the finished copy already at --address instead of pushing again: Milvus "
                         "compacts a fresh push and rebuilds its indexes for minutes afterwards, which "
                         "the searches of a run started at once compete with")
    ap.add_argument("--local-only", action="store_true",
                    help="measure the local store alone: no Milvus server, no push")
    ap.add_argument("--out", help="also write the JSON report here")
    a = ap.parse_args()
    cmd = ["cargo", "bench", "--quiet", "--features", "milvus", "--profile", a.profile,
           "--bench", "bench_milvus", "--", "--store", a.store, "--k", str(a.k), "--ef", str(a.ef),
           "--queries", str(a.queries), "--concurrency", a.concurrency]
    cmd += ["--local-only"] if a.local_only else ["--address", a.address]
    cmd += ["--reuse"] if a.reuse else []
    out = subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.PIPE, text=True).stdout
    report = json.loads(out)
    report["profile"] = a.profile
    text = json.dumps(report, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
