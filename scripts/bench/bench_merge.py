#!/usr/bin/env python3
"""Many small adds into a serving store, with and without the merge policy (issue 20).

For each variant it copies the two stores that scripts/bench/bench_server.py builds (cached in
--work-dir), starts `goodtriever serve` on a free loopback port with an admin token, sends --adds
single-row AddExamples into the toxic store (each call writes one segment), waits for background
merges to settle, and then times --steps sparse Adjust calls at k = 1024 (HNSW) on the store as
it stands. Variants:

- `merge`: the default policy (`--merge-segments 8`);
- `no-merge`: `--merge-segments 0`, every add stays its own segment;
- `compacted`: the no-merge store after `goodtriever datastore compact`, one segment of the
  same rows: the baseline the merged store is compared with.

It prints, per variant, the live segment count, add latency p50/p99 and the Adjust p50/p99,
and the ratio of the merged store's Adjust p50 to the compacted one's.

Usage: scripts/bench/bench_merge.py [--rows 50000] [--adds 1000] [--steps 300]
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "clients" / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import build_stores  # noqa: E402
from goodtriever_client import Client  # noqa: E402

TOKEN = "bench-merge-token"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs, q):
    return float(np.percentile(np.asarray(xs) * 1e3, q))


def segments(binary, store):
    out = subprocess.run([str(binary), "datastore", "info", "--json", str(store)],
                         check=True, capture_output=True, text=True).stdout
    return sum(1 for s in json.loads(out)["segments"] if not s["retired"])


def serve(binary, stores, token_file, merge_segments):
    port = free_port()
    proc = subprocess.Popen(
        [str(binary), "serve", "--toxic", str(stores["toxic"]), "--nontoxic", str(stores["nontoxic"]),
         "--addr", f"127.0.0.1:{port}", "--no-metrics", "--admin-token-file", str(token_file),
         "--merge-segments", str(merge_segments), "--vocab-size", "49152"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    client = Client(f"127.0.0.1:{port}", admin_token=TOKEN)
    for _ in range(300):
        try:
            client.info()
            return proc, client
        except Exception:
            time.sleep(0.1)
    proc.kill()
    sys.exit("serve did not come up")


def stop(proc):
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)


def time_adjust(client, queries, steps):
    lat = []
    for i in range(steps):
        t = time.perf_counter()
        client.adjust(queries[i % len(queries)][None, :], k=1024)
        lat.append(time.perf_counter() - t)
    return lat


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--adds", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--work-dir", type=Path, default=ROOT / "target" / "bench-server")
    ap.add_argument("--binary", type=Path, default=ROOT / "target" / "release" / "goodtriever")
    ap.add_argument("--out", type=Path, help="write the results as JSON")
    a = ap.parse_args()
    if not a.binary.exists():
        sys.exit(f"{a.binary} is missing: run `cargo build --release --bin goodtriever` first")
    a.work_dir.mkdir(parents=True, exist_ok=True)
    base, queries_path = build_stores(a.binary, a.work_dir, a.rows)
    queries = np.load(queries_path)
    rng = np.random.default_rng(7)
    new_keys = (queries[rng.integers(0, len(queries), size=a.adds)]
                + rng.normal(0, 0.3, size=(a.adds, queries.shape[1]))).astype(np.float32)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        token_file = tmp / "token"
        token_file.write_text(TOKEN)
        for variant, merge_segments in (("merge", 8), ("no-merge", 0)):
            stores = {}
            for name, d in base.items():
                stores[name] = tmp / variant / name
                shutil.copytree(d, stores[name])
            proc, client = serve(a.binary, stores, token_file, merge_segments)
            add_lat = []
            for r in range(a.adds):
                t = time.perf_counter()
                client.add_examples("toxic", new_keys[r][None, :], [int(r % 49152)], source="bench-merge")
                add_lat.append(time.perf_counter() - t)
            # Background merges settle: the segment count stops changing.
            last, still = -1, 0
            while still < 10:
                n = segments(a.binary, stores["toxic"])
                still = still + 1 if n == last else 0
                last = n
                time.sleep(0.2)
            lat = time_adjust(client, queries, a.steps)
            client.close()
            stop(proc)
            results[variant] = {
                "segments": last,
                "add_p50_ms": pct(add_lat, 50), "add_p99_ms": pct(add_lat, 99),
                "adjust_p50_ms": pct(lat, 50), "adjust_p99_ms": pct(lat, 99),
            }
            log(variant, results[variant])
            if variant == "no-merge":
                subprocess.run([str(a.binary), "datastore", "compact", str(stores["toxic"])],
                               check=True, stdout=subprocess.DEVNULL)
                proc, client = serve(a.binary, stores, token_file, 0)
                lat = time_adjust(client, queries, a.steps)
                client.close()
                stop(proc)
                results["compacted"] = {
                    "segments": segments(a.binary, stores["toxic"]),
                    "adjust_p50_ms": pct(lat, 50), "adjust_p99_ms": pct(lat, 99),
                }
                log("compacted", results["compacted"])
    ratio = results["merge"]["adjust_p50_ms"] / results["compacted"]["adjust_p50_ms"]
    print(f"| variant | live segments (toxic) | AddExamples p50 / p99 ms | Adjust k=1024 p50 / p99 ms |")
    print("|---|---|---|---|")
    for v, r in results.items():
        add = f"{r['add_p50_ms']:.2f} / {r['add_p99_ms']:.2f}" if "add_p50_ms" in r else "-"
        print(f"| {v} | {r['segments']} | {add} | {r['adjust_p50_ms']:.2f} / {r['adjust_p99_ms']:.2f} |")
    print(f"merged / compacted Adjust p50: {ratio:.2f}x")
    if a.out:
        a.out.write_text(json.dumps({"rows": a.rows, "adds": a.adds, "results": results, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
