#!/usr/bin/env python3
"""Search and decoding-rule benchmark: goodtriever against faiss-cpu on the same vectors.

One command, one table, one JSON file (issue 2, "What it must show"):

    python3 -m venv .venv-bench && .venv-bench/bin/pip install -r scripts/bench/requirements-bench.txt
    cargo build --release --bin goodtriever   # the script builds its driver (cargo bench --no-run)
    .venv-bench/bin/python scripts/bench/bench_search.py            # N = 200k and 1M
    .venv-bench/bin/python scripts/bench/bench_search.py --quick    # N = 200k only

Data: a seeded two-level Gaussian mixture in D = 576 (SmolLM2-135M's hidden size): 64 topics,
`--centres` cluster centres spread around them, points around the centres with a per-cluster
spread and a decaying per-dimension variance (hidden states have a few strong directions, not
576 equal ones), so that the 1024 nearest neighbours of a query are a meaningful region and
HNSW recall is neither trivial nor hopeless. Values are token ids tied to the cluster.
Two stores per N ("toxic" = sample a, "non-toxic" = sample b, same mixture) and `--queries`
fresh queries from the same mixture.

Per N and k (1024 and 64), single query at a time (a decoding step):
  * goodtriever exact scan and HNSW, `ef` swept (benches/drivers/bench_engine.rs, bench profile);
  * faiss IndexFlatL2 and IndexHNSWFlat(M=16, efConstruction=100), efSearch swept, with
    faiss.omp_set_num_threads(1) for searching (its OpenMP threads slow single queries);
  * recall@k of every configuration against one ground truth: faiss IndexFlatL2 in f32;
  * latency of each library at matched recall (`--target-recall`, interpolated along each
    library's ef sweep, plus the measured sweep points nearest to it);
  * index build time (goodtriever: wall time of `goodtriever datastore import`, which reads the
    .npy, writes the segment and builds the HNSW graph with rayon on every core; faiss:
    `index.add` with its default OpenMP threads); resident memory after open (goodtriever: the
    bench_engine process right after `Datastore::open`; faiss: a fresh Python process right
    after `faiss.read_index`, minus the same process before it);
  * the full rule over both stores (`Detoxifier::adjust_sparse`, ensemble mode, one row), exact
    and HNSW, with a breakdown: each store's search alone and the rule alone.

Everything built (data, stores, faiss indexes, ground truth, build times) is cached under
`--data-dir` (default target/bench-data, git-ignored): the 1M-row HNSW builds take many minutes
on 2 cores and are measured once; later runs reuse them and report the recorded build time.
Stores built by an older goodtriever HNSW build (INDEX_REV below) are rebuilt. Before building
an N that is not cached, the log gives an estimate extrapolated from the largest cached smaller
build (N log N). N = 1M needs about 10 GB of disk under --data-dir (two 2.3 GB key files, one
goodtriever store, the faiss index) and ~8 GB of memory (faiss flat + HNSW indexes while the
goodtriever store is searched); from 1M on the rule uses store a twice (--rule-same-store-from).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cargo_bench import build_drivers

D = 576
VOCAB = 49_152
GEN_VERSION = 1  # bump when the generator changes, so cached data is rebuilt
# Bump when goodtriever's HNSW build changes, so cached stores are rebuilt rather than
# benchmarked with an old graph. 2: level-0 repair after hnsw_rs (src/datastore/hnsw_repair.rs).
INDEX_REV = 2
ROOT = Path(__file__).resolve().parents[2]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ---------------------------------------------------------------------------------------------
# Data


class Mixture:
    """The seeded generator: topics -> cluster centres -> points."""

    def __init__(self, centres: int, seed: int):
        rng = np.random.default_rng(seed)
        topics = 64
        # Per-dimension scale: a power-law spectrum, mean square 1.
        scale = (np.arange(D) + 1.0) ** -0.5
        self.scale = (scale / np.sqrt(np.mean(scale**2))).astype(np.float32)
        topic_centres = rng.standard_normal((topics, D)).astype(np.float32) * self.scale
        owner = rng.integers(0, topics, centres)
        self.centres = topic_centres[owner] + 0.5 * rng.standard_normal((centres, D)).astype(
            np.float32
        ) * self.scale
        # Cluster spread: log-normal around 0.35 (clusters of different tightness).
        self.sigma = (0.35 * np.exp(0.3 * rng.standard_normal(centres))).astype(np.float32)
        # Cluster sizes: Zipf-like weights, as token contexts are.
        w = 1.0 / (np.arange(centres) + 10.0)
        self.weights = w / w.sum()
        self.token_base = rng.integers(0, VOCAB, centres)

    def sample(self, n: int, seed: int, chunk: int = 65_536):
        """Yields (keys f32 [m, D], values i32 [m]) chunks totalling n rows."""
        rng = np.random.default_rng(seed)
        done = 0
        while done < n:
            m = min(chunk, n - done)
            c = rng.choice(len(self.weights), size=m, p=self.weights)
            x = rng.standard_normal((m, D), dtype=np.float32)
            x *= self.scale
            x *= self.sigma[c, None]
            x += self.centres[c]
            v = ((self.token_base[c] + rng.integers(0, 16, m)) % VOCAB).astype(np.int32)
            yield x, v
            done += m


def make_data(d: Path, n: int, n_queries: int, centres: int, seed: int) -> dict:
    """Writes keys_a/values_a, keys_b/values_b and queries as .npy (cached)."""
    d.mkdir(parents=True, exist_ok=True)
    tag = {"gen_version": GEN_VERSION, "n": n, "queries": n_queries, "centres": centres, "seed": seed}
    stamp = d / "data.json"
    paths = {
        "keys_a": d / "keys_a.npy",
        "values_a": d / "values_a.npy",
        "keys_b": d / "keys_b.npy",
        "values_b": d / "values_b.npy",
        "queries": d / "queries.npy",
    }
    if stamp.exists() and json.loads(stamp.read_text()) == tag and all(p.exists() for p in paths.values()):
        return paths
    log(f"generating {n} x {D} rows (x2 stores) and {n_queries} queries in {d}")
    mix = Mixture(centres, seed)
    for name, s in (("a", seed + 1), ("b", seed + 2)):
        keys = np.lib.format.open_memmap(paths[f"keys_{name}"], mode="w+", dtype=np.float32, shape=(n, D))
        values = np.empty(n, dtype=np.int32)
        at = 0
        for x, v in mix.sample(n, s):
            keys[at : at + len(x)] = x
            values[at : at + len(x)] = v
            at += len(x)
        keys.flush()
        del keys
        np.save(paths[f"values_{name}"], values)
    q = np.concatenate([x for x, _ in mix.sample(n_queries, seed + 3)])
    np.save(paths["queries"], q)
    stamp.write_text(json.dumps(tag))
    return paths


# ---------------------------------------------------------------------------------------------
# goodtriever


def children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def build_entry(v) -> dict:
    """Build-cache entries are {"wall_s", "cpu_s", "load"} (+ "index_rev" for goodtriever
    stores); early runs recorded wall time only."""
    return v if isinstance(v, dict) else {"wall_s": v, "cpu_s": None, "load": None}


def gt_import(binary: Path, keys: Path, values: Path, store: Path, dtype: str, cache: dict, key: str) -> dict:
    """Imports a store once; returns the (recorded) wall and CPU time of the import. A store
    built by an older HNSW build (INDEX_REV) is rebuilt."""
    if key in cache and (store / "manifest.json").exists():
        if build_entry(cache[key]).get("index_rev") == INDEX_REV:
            return build_entry(cache[key])
        log(f"{store} was built by an older HNSW build: rebuilding")
    if store.exists():
        subprocess.run(["rm", "-rf", str(store)], check=True)
    load = load_avg()
    log(f"goodtriever datastore import -> {store} (load {load})")
    t, c = time.perf_counter(), children_cpu_s()
    subprocess.run(
        [str(binary), "datastore", "import", "--keys", str(keys), "--values", str(values),
         "--dtype", dtype, "--model-id", "bench", "--key-type", "final_hidden", "--json", str(store)],
        check=True, stdout=subprocess.DEVNULL,
    )
    cache[key] = {"wall_s": time.perf_counter() - t, "cpu_s": children_cpu_s() - c, "load": load,
                  "index_rev": INDEX_REV, "rows": rows_of(keys)}
    return cache[key]


def rows_of(npy: Path) -> int:
    return int(np.load(npy, mmap_mode="r").shape[0])


def estimate_build(cache: dict, n: int, faiss_index: bool) -> str | None:
    """Build time for n rows extrapolated from the largest cached smaller build of the same
    kind, as N·log N (HNSW insertions each cost ~log N distance evaluations): CPU seconds, and
    wall on every core of an idle machine. None when nothing comparable is cached."""
    best = None
    for path, v in cache.items():
        e = build_entry(v)
        if faiss_index != path.endswith(".index") or not e.get("cpu_s"):
            continue
        if not faiss_index and e.get("index_rev") != INDEX_REV:
            continue
        m = e.get("rows")
        if m is None:  # early entries: the row count is in the directory name (n<rows>-...)
            part = next((p for p in Path(path).parts if p.startswith("n") and "-c" in p), None)
            m = int(part[1:].split("-")[0]) if part else None
        if m and m < n and (best is None or m > best[0]):
            best = (m, e["cpu_s"])
    if best is None:
        return None
    m, cpu = best
    est = cpu * (n * np.log(n)) / (m * np.log(m))
    cores = os.cpu_count() or 1
    return f"~{est:.0f} s CPU, ~{est / cores / 60:.0f} min wall on {cores} idle cores (from {m} rows: {cpu:.0f} s CPU)"


def gt_search(driver: Path, store: Path, queries: Path, k: int, efs: list[int], out: Path,
              threads: int | None = None) -> dict:
    cmd = [str(driver), "search", "--store", str(store), "--queries", str(queries), "--k", str(k),
           "--out-dir", str(out)]
    if efs:
        cmd += ["--ef", ",".join(map(str, efs))]
    env = dict(os.environ)
    if threads:
        env["RAYON_NUM_THREADS"] = str(threads)
    r = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(r.stdout)


def gt_rule(driver: Path, toxic: Path, nontoxic: Path, queries: Path, k: int, ef: int | None) -> dict:
    cmd = [str(driver), "rule", "--toxic", str(toxic), "--nontoxic", str(nontoxic),
           "--queries", str(queries), "--k", str(k)]
    if ef is not None:
        cmd += ["--ef", str(ef)]
    r = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(r.stdout)


# ---------------------------------------------------------------------------------------------
# faiss


def lat_stats(ms: list[float]) -> dict:
    a = np.sort(np.asarray(ms))
    pct = lambda p: float(a[int(round((len(a) - 1) * p))])  # noqa: E731 (same rule as the Rust side)
    return {"n": len(a), "p50_ms": pct(0.5), "p99_ms": pct(0.99), "mean_ms": float(a.mean())}


def time_single(index, q: np.ndarray, k: int, warmup: int = 1, stats=None):
    """Like bench_engine: `warmup` untimed passes over all queries, then one timed pass.
    `stats` (faiss.cvar.hnsw_stats) is reset before the timed pass."""
    for _ in range(warmup):
        for i in range(len(q)):
            index.search(q[i : i + 1], k)
    if stats is not None:
        stats.reset()
    ids = np.empty((len(q), k), dtype=np.int64)
    ms = []
    for i in range(len(q)):
        t = time.perf_counter()
        _, I = index.search(q[i : i + 1], k)
        ms.append((time.perf_counter() - t) * 1e3)
        ids[i] = I[0]
    return ids, lat_stats(ms)


def recall(ids: np.ndarray, truth: np.ndarray, k: int) -> float:
    hits = 0
    for a, b in zip(ids[:, :k], truth[:, :k]):
        hits += len(np.intersect1d(a[a >= 0], b, assume_unique=True))
    return hits / (truth.shape[0] * k)


def faiss_rss(index_path: Path) -> dict:
    """RSS of a fresh process before and after faiss.read_index (MiB)."""
    code = (
        "import faiss,json,sys\n"
        "def rss():\n"
        "    s=open('/proc/self/status').read().split('\\n')\n"
        "    f=lambda n:[float(l.split()[1])/1024 for l in s if l.startswith(n)][0]\n"
        "    return {'vm_rss':f('VmRSS:'),'rss_anon':f('RssAnon:'),'rss_file':f('RssFile:')}\n"
        "a=rss(); idx=faiss.read_index(sys.argv[1]); b=rss()\n"
        "print(json.dumps({'before':a,'after':b}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(index_path)], check=True, capture_output=True, text=True)
    return json.loads(r.stdout)


# ---------------------------------------------------------------------------------------------
# Matched recall


def interp_latency(points: list[tuple[float, float, int]], target: float) -> float | None:
    """p50 at recall `target` along a sweep of (recall, p50_ms, ef), linear between the first
    pair of points (in ef order) that brackets it; None when the sweep never reaches it."""
    pts = sorted(points, key=lambda p: p[2])
    if pts and pts[0][0] >= target:
        return None  # already above at the smallest ef: no bracket
    for (r0, l0, _), (r1, l1, _) in zip(pts, pts[1:]):
        if r0 <= target <= r1 and r1 > r0:
            return l0 + (l1 - l0) * (target - r0) / (r1 - r0)
    return None


def at_recall(points: list[tuple[float, float, int]], target: float) -> dict:
    """Latency at `target` recall (interpolated) and the measured sweep point nearest to it."""
    nearest = min(points, key=lambda p: abs(p[0] - target))
    return {"interp_p50_ms": interp_latency(points, target),
            "nearest": {"recall": nearest[0], "p50_ms": nearest[1], "ef": nearest[2]}}


def equal_recall(ref: list[tuple[float, float, int]], other: list[tuple[float, float, int]]) -> list[dict]:
    """For every point of the `ref` sweep, the p50 the `other` library needs for the same
    recall, interpolated along its own sweep; `at_most` when even its smallest ef already has a
    higher recall (its cheapest point is then an upper bound); `unreached` when no ef reaches it."""
    out = []
    lo = min(other, key=lambda p: p[2])
    for r, l, ef in sorted(ref, key=lambda p: p[2]):
        mine = interp_latency(other, r)
        kind = "interp"
        if mine is None:
            if lo[0] >= r:
                mine, kind = lo[1], "at_most"
            else:
                kind = "unreached"
        out.append({"recall": r, "ref_ef": ef, "ref_p50_ms": l, "other_p50_ms": mine, "kind": kind})
    return out


# ---------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N = 200k only")
    ap.add_argument("--sizes", default="200000,1000000", help="rows per store (comma-separated)")
    ap.add_argument("--ks", default="1024,64")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--centres", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=20240)
    ap.add_argument("--dtype", default="f32", choices=["f32", "f16"], help="goodtriever key dtype (faiss is f32)")
    ap.add_argument("--target-recall", type=float, default=0.965)
    ap.add_argument("--ef-1024", default="1024,1280,1536,2048,3072")
    ap.add_argument("--ef-64", default="64,96,128,192,256,384,512")
    ap.add_argument("--rule-ef", type=int, default=None, help="HNSW ef for the rule (default: the engine's, max(k, 128))")
    ap.add_argument("--rule-same-store-from", type=int, default=1_000_000,
                    help="from this N on, the rule uses sample a as both stores (saves a second many-minute build)")
    ap.add_argument("--no-faiss", action="store_true")
    ap.add_argument("--data-dir", type=Path, default=ROOT / "target" / "bench-data")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default: DATA_DIR/results.json)")
    ap.add_argument("--bin", type=Path, default=ROOT / "target" / "release" / "goodtriever")
    ap.add_argument("--driver", type=Path, default=None,
                    help="the bench_engine executable (default: built by `cargo bench --no-run --bench bench_engine`)")
    args = ap.parse_args()

    sizes = [200_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    ks = [int(k) for k in args.ks.split(",")]
    efs = {1024: [int(e) for e in args.ef_1024.split(",")], 64: [int(e) for e in args.ef_64.split(",")]}
    if not args.bin.exists():
        sys.exit(f"{args.bin} is missing: run `cargo build --release --bin goodtriever` first")
    if args.driver is None:
        args.driver = build_drivers("bench_engine")["bench_engine"]
    elif not args.driver.exists():
        sys.exit(f"{args.driver} is missing")
    faiss = None
    if not args.no_faiss:
        import faiss  # noqa: PLC0415 (optional dependency)

    args.data_dir.mkdir(parents=True, exist_ok=True)
    build_cache_path = args.data_dir / "build_times.json"
    build_cache = json.loads(build_cache_path.read_text()) if build_cache_path.exists() else {}
    results = {
        "machine": {
            "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "faiss": getattr(faiss, "__version__", None),
            "numpy": np.__version__,
        },
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_at_start": load_avg(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "sizes": {},
    }
    table = []
    for n in sizes:
        d = args.data_dir / f"n{n}-c{args.centres}-s{args.seed}"
        paths = make_data(d, n, args.queries, args.centres, args.seed)
        q = np.load(paths["queries"])
        res = {"load": {}}
        # ---- builds
        store_a = d / f"gt-{args.dtype}-a"
        store_b = d / f"gt-{args.dtype}-b"
        for what, is_faiss in (("goodtriever import", False), ("faiss HNSW build", True)):
            est = estimate_build(build_cache, n, is_faiss)
            if est:
                log(f"N={n}: {what} estimate per store (if not cached): {est}")
        build_a = gt_import(args.bin, paths["keys_a"], paths["values_a"], store_a, args.dtype, build_cache, str(store_a))
        build_cache_path.write_text(json.dumps(build_cache, indent=1))
        same_store = n >= args.rule_same_store_from
        if not same_store:
            gt_import(args.bin, paths["keys_b"], paths["values_b"], store_b, args.dtype, build_cache, str(store_b))
            build_cache_path.write_text(json.dumps(build_cache, indent=1))
        res["goodtriever_build"] = build_a
        if faiss is not None:
            faiss.omp_set_num_threads(os.cpu_count() or 1)
            fpath = d / "faiss-hnsw-a.index"
            if str(fpath) not in build_cache or not fpath.exists():
                xb = np.load(paths["keys_a"], mmap_mode="r")
                log(f"faiss IndexHNSWFlat(M=16, efC=100) build on {n} rows (load {load_avg()})")
                index = faiss.IndexHNSWFlat(D, 16)
                index.hnsw.efConstruction = 100
                load = load_avg()
                t, c = time.perf_counter(), time.process_time()
                for s in range(0, n, 100_000):
                    index.add(np.ascontiguousarray(xb[s : s + 100_000]))
                build_cache[str(fpath)] = {"wall_s": time.perf_counter() - t,
                                           "cpu_s": time.process_time() - c, "load": load, "rows": n}
                faiss.write_index(index, str(fpath))
                build_cache_path.write_text(json.dumps(build_cache, indent=1))
                del index
            res["faiss_build"] = build_entry(build_cache[str(fpath)])
            res["faiss_rss_mib"] = faiss_rss(fpath)
            # Ground truth, once for the largest k.
            kmax = max(ks)
            gt_path = d / f"truth_k{kmax}.npy"
            xb = np.ascontiguousarray(np.load(paths["keys_a"]))
            flat = faiss.IndexFlatL2(D)
            flat.add(xb)
            del xb
            if not gt_path.exists():
                log("ground truth (faiss IndexFlatL2, all threads)")
                _, truth = flat.search(q, kmax)
                np.save(gt_path, truth)
            truth = np.load(gt_path)
            faiss.omp_set_num_threads(1)
            hnsw = faiss.read_index(str(fpath))
        res["load"]["before_search"] = load_avg()
        for k in ks:
            log(f"N={n} k={k}: searching (load {load_avg()})")
            row = {"n": n, "k": k}
            out = d / f"ids-k{k}"
            g = gt_search(args.driver, store_a, paths["queries"], k, efs[k], out)
            row["gt_rss_after_open_mib"] = g["rss_mib_after_open"]
            row["gt_rss_after_search_mib"] = g["rss_mib_after_search"]
            row["gt_rayon_threads"] = g["rayon_threads"]
            # The exact scan is parallel over row chunks; faiss searches on one thread, so the
            # exact scan is timed on one thread too.
            g1 = gt_search(args.driver, store_a, paths["queries"], k, [], d / f"ids-k{k}-1t", threads=1)
            g1["results"][0]["config"] = "exact_1thread"
            row["gt"] = []
            for r in g["results"] + g1["results"]:
                ids = np.load(r["ids"])
                entry = {"config": r["config"], "ef": r["ef"], **r["latency"]}
                if faiss is not None:
                    entry["recall"] = recall(ids, truth, k)
                row["gt"].append(entry)
            if faiss is not None:
                ids, st = time_single(flat, q, k)
                row["faiss_flat"] = {**st, "recall": recall(ids, truth, k)}
                row["faiss_hnsw"] = []
                for ef in efs[k]:
                    hnsw.hnsw.efSearch = ef
                    stats = faiss.cvar.hnsw_stats
                    ids, st = time_single(hnsw, q, k, stats=stats)
                    row["faiss_hnsw"].append({"ef": ef, **st, "recall": recall(ids, truth, k),
                                              "ndis_per_query": stats.ndis / len(q),
                                              "nhops_per_query": stats.nhops / len(q)})
                ours = [(e["recall"], e["p50_ms"], e["ef"]) for e in row["gt"] if e["ef"]]
                theirs = [(e["recall"], e["p50_ms"], e["ef"]) for e in row["faiss_hnsw"]]
                row["matched"] = {
                    "target_recall": args.target_recall,
                    "goodtriever": at_recall(ours, args.target_recall),
                    "faiss": at_recall(theirs, args.target_recall),
                    # at each faiss point, what goodtriever needs; and the other way round
                    "faiss_points": equal_recall(theirs, ours),
                    "goodtriever_points": equal_recall(ours, theirs),
                }
            row["load_after"] = load_avg()
            table.append(row)
        # ---- the full rule over both stores
        res["rule"] = {}
        for k in ks:
            log(f"N={n} k={k}: full rule over both stores (load {load_avg()})")
            res["rule"][str(k)] = gt_rule(args.driver, store_a, store_a if same_store else store_b,
                                          paths["queries"], k, args.rule_ef)
            res["rule"][str(k)]["same_store_twice"] = same_store
            res["rule"][str(k)]["load_after"] = load_avg()
        if faiss is not None:
            del flat, hnsw
        results["sizes"][str(n)] = res
    results["search"] = table
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    results["load_at_end"] = load_avg()
    out = args.out or args.data_dir / "results.json"
    out.write_text(json.dumps(results, indent=1))
    print_tables(results)
    print(f"\nJSON: {out}")
    return 0


def fmt(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def print_tables(r: dict) -> None:
    m = r["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores; faiss {m['faiss']}; load at start {r['load_at_start']}, end {r['load_at_end']}")
    print("single query at a time; latency p50/p99 ms; recall@k vs faiss IndexFlatL2; goodtriever dtype "
          f"{r['args']['dtype']}, faiss f32, faiss searches on 1 OpenMP thread\n")
    hdr = f"{'N':>8} {'k':>5} {'system':<22} {'ef':>5} {'recall':>7} {'p50':>7} {'p99':>7}"
    print(hdr)
    print("-" * len(hdr))
    for row in r["search"]:
        n, k = row["n"], row["k"]
        for e in row["gt"]:
            name = {"exact": "goodtriever exact", "exact_1thread": "goodtriever exact 1thr"}.get(
                e["config"], "goodtriever HNSW")
            print(f"{n:>8} {k:>5} {name:<22} {fmt(e['ef'], 'd') if e['ef'] else '-':>5} {fmt(e.get('recall'), '.4f'):>7} "
                  f"{fmt(e['p50_ms']):>7} {fmt(e['p99_ms']):>7}")
        if "faiss_flat" in row:
            e = row["faiss_flat"]
            print(f"{n:>8} {k:>5} {'faiss IndexFlatL2':<22} {'-':>5} {fmt(e['recall'], '.4f'):>7} {fmt(e['p50_ms']):>7} {fmt(e['p99_ms']):>7}")
            for e in row["faiss_hnsw"]:
                nd = f"   ndis/q {e['ndis_per_query']:.0f}" if "ndis_per_query" in e else ""
                print(f"{n:>8} {k:>5} {'faiss IndexHNSWFlat':<22} {e['ef']:>5} {fmt(e['recall'], '.4f'):>7} "
                      f"{fmt(e['p50_ms']):>7} {fmt(e['p99_ms']):>7}{nd}")
        print()
    print(f"matched recall (target {r['search'][0].get('matched', {}).get('target_recall', '-')}), p50 ms:")
    print(f"{'N':>8} {'k':>5} {'goodtriever':>12} {'faiss':>8} {'ratio':>6}   nearest measured points (recall, p50, ef)")
    for row in r["search"]:
        mt = row.get("matched")
        if not mt:
            continue
        a, b = mt["goodtriever"], mt["faiss"]
        ratio = a["interp_p50_ms"] / b["interp_p50_ms"] if a["interp_p50_ms"] and b["interp_p50_ms"] else None
        na, nb = a["nearest"], b["nearest"]
        print(f"{row['n']:>8} {row['k']:>5} {fmt(a['interp_p50_ms']):>12} {fmt(b['interp_p50_ms']):>8} {fmt(ratio):>6}   "
              f"ours ({na['recall']:.4f}, {na['p50_ms']:.2f}, {na['ef']}) faiss ({nb['recall']:.4f}, {nb['p50_ms']:.2f}, {nb['ef']})")
    print("\nequal recall (ratio = goodtriever p50 / faiss p50; '<=' : the other side's smallest ef already"
          " has a higher recall, so its cheapest point bounds it; 'unreached': no swept ef gets there):")
    print(f"{'N':>8} {'k':>5} {'point of':<12} {'ef':>5} {'recall':>7} {'goodtriever':>11} {'faiss':>9} {'ratio':>7}")
    for row in r["search"]:
        mt = row.get("matched") or {}
        for side, key in (("faiss", "faiss_points"), ("goodtriever", "goodtriever_points")):
            for e in mt.get(key, []):
                o = e["other_p50_ms"]
                other = {"interp": fmt(o), "at_most": "<=" + fmt(o), "unreached": "unreached"}[e["kind"]]
                ours, theirs = (other, fmt(e["ref_p50_ms"])) if side == "faiss" else (fmt(e["ref_p50_ms"]), other)
                if o is None:
                    ratio = "-"
                elif side == "faiss":
                    ratio = ("<=" if e["kind"] == "at_most" else "") + fmt(o / e["ref_p50_ms"])
                else:
                    ratio = (">=" if e["kind"] == "at_most" else "") + fmt(e["ref_p50_ms"] / o)
                print(f"{row['n']:>8} {row['k']:>5} {side:<12} {e['ref_ef']:>5} {e['recall']:>7.4f} {ours:>11} {theirs:>9} {ratio:>7}")
    print("\nbuild and memory:")
    print("(build: wall s / CPU s, and the load average when it started; the machine is shared)")
    print(f"{'N':>8} {'gt build':>18} {'faiss build':>18} {'gt RSS open MiB':>16} {'gt RSS after search':>20} {'faiss RSS MiB':>14}")
    def b(e):
        if not e:
            return "-"
        return f"{e['wall_s']:.0f}/{fmt(e['cpu_s'], '.0f')} ({(e['load'] or '?').split()[0]})"
    for n, s in r["sizes"].items():
        rows = [x for x in r["search"] if str(x["n"]) == n]
        ro = rows[0]["gt_rss_after_open_mib"]["vm_rss"] if rows else None
        rs = max(x["gt_rss_after_search_mib"]["vm_rss"] for x in rows) if rows else None
        fr = s.get("faiss_rss_mib")
        fr = fr["after"]["vm_rss"] - fr["before"]["vm_rss"] if fr else None
        print(f"{n:>8} {b(s['goodtriever_build']):>18} {b(s.get('faiss_build')):>18} "
              f"{fmt(ro, '.1f'):>16} {fmt(rs, '.1f'):>20} {fmt(fr, '.1f'):>14}")
    print("\nfull rule over both stores (Detoxifier::adjust_sparse, one row), ms:")
    print(f"{'N':>8} {'k':>5} {'search':<7} {'ef':>5} {'p50':>7} {'p99':>7} {'toxic alone':>12} {'nontoxic alone':>15} {'rule alone':>11}")
    for n, s in r["sizes"].items():
        for k, rr in s["rule"].items():
            for e in rr["results"]:
                note = "  (one store twice)" if rr["same_store_twice"] else ""
                print(f"{n:>8} {k:>5} {e['search']:<7} {fmt(e['ef'], 'd') if e['ef'] else '-':>5} "
                      f"{fmt(e['full_rule']['p50_ms']):>7} {fmt(e['full_rule']['p99_ms']):>7} "
                      f"{fmt(e['toxic_search_alone']['p50_ms']):>12} {fmt(e['nontoxic_search_alone']['p50_ms']):>15} "
                      f"{fmt(e['rule_alone']['p50_ms'], '.3f'):>11}{note}")


if __name__ == "__main__":
    raise SystemExit(main())
