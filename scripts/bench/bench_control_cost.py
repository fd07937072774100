#!/usr/bin/env python3
"""What the control costs a decoding step (issue 19): base vs controlled generation with the
real model, at batch 1 and batch 25, for each store pair and control setting, in one run on
one box.

For every (store pair, batch, setting) it runs `goodtriever eval generate` over the same
prompts and seeds, base and controlled interleaved prompt by prompt in one process (so both
see the same load), and reads the per-batch timings the records carry:

* ms per step: (batch wall time − prefill) / decoding steps, for base and controlled;
* the control's share of a controlled step: the hook's time / the step time;
* rows not searched: rows the control skipped (`--skip`) / rows it adjusted;
* store searches saved: (row, store) searches not run, by skipping or by reusing the last
  step's neighbours (`--reuse`), over the two per row that searching everything runs;
* recall of reused neighbours: for a setting with `--reuse`, one more run of the first binary
  with `--reuse-audit` (untimed: it also searches the reused rows) gives the share of the n
  nearest rows that the n reused successors are (docs/architecture.md §1.6);
* with `--grpc-reuse`, for each store pair: reuse over a gRPC `AdjustStream` with the real
  model's hidden states (benches/drivers/bench_grpc_reuse.rs: the same prompts and seeds
  generated with the engine in-process and through a server on loopback, whose answers must
  give the same tokens), the rows each path answered from successors and the control's time
  per step each way.

Batch B means B samples of each prompt decoded together (`--num-samples B`), as a serving
batch of B sequences would be. Settings are named `NAME=FLAGS` (`eval generate` flags), e.g.
`full=` (the paper's rule) and `skip=--skip 0.05`. Stores are named `NAME=TOXIC,NONTOXIC`.

`--simd avx2,auto` runs every configuration once per kernel build (GOODTRIEVER_SIMD, see
docs/architecture.md §4 "Kernels"), and `--bins new=PATH old=PATH` once per binary (a
before/after of a change); the variants alternate, `--repeat` times: an A/B on one box in one
run. The table then gives each variant's median over the repeats, and the paired ratio of its
ms per step to the first variant's (median, min, max over the repeats).

The stores of issue 19: the Davidson stores (scripts/data/davidson_stores.py) and a 1M-row
store (scripts/bench/million_store.py, built from those rows and jittered copies), e.g.
`--stores davidson=datastores/davidson-toxic,datastores/davidson-nontoxic
million=datastores/davidson-toxic,datastores/million` (docs/performance.md, "Stores of a
million rows").

Nothing is written into the repository: work files go to target/bench-control/.
Prints one table and writes target/bench-control/results.json.

Usage: python3 scripts/bench/bench_control_cost.py
           [--stores default=datastores/toxic,datastores/nontoxic ...]
           [--settings full= "skip=--skip 0.05" ...] [--batches 1,25]
           [--prompts-batch1 12] [--prompts-batch25 2] [--tokens 32]
           [--simd auto] [--bins new=target/release/goodtriever ...] [--repeat 1]
           [--grpc-reuse [--grpc-reuse-flags "--reuse 0.02"]]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / "target" / "release" / "goodtriever"
WORK = REPO / "target" / "bench-control"
STORES_PER_PAIR = 2


def log(msg: str) -> None:
    print(f"[bench_control] {msg}", file=sys.stderr, flush=True)


def named(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            sys.exit(f"{what} {item!r}: expected NAME=VALUE")
        out[name] = value
    return out


def summarise(records: list[dict]) -> dict:
    """Per variant: ms per step, the hook's share, rows skipped; one record per batch."""
    out: dict[str, dict] = {}
    batches: dict[tuple, dict] = {}
    for r in records:
        batches.setdefault((r["variant"], r["prompt_index"]), r)
    for (variant, _), r in batches.items():
        s = out.setdefault(variant, {"steps": 0, "step_ms": 0.0, "hook_ms": 0.0, "rows": 0, "skipped": 0,
                                     "reused": 0, "audited": 0, "recall_sum": 0.0})
        s["steps"] += r["batch_steps"]
        s["step_ms"] += r["batch_ms"] - r["batch_prefill_ms"]
        s["hook_ms"] += r["batch_hook_ms"]
        s["rows"] += r.get("batch_rows_controlled", 0)
        s["skipped"] += r.get("batch_rows_skipped", 0)
        s["reused"] += r.get("batch_store_searches_reused", 0)
        s["audited"] += r.get("batch_reuse_audited", 0)
        s["recall_sum"] += r.get("batch_reuse_recall_sum", 0.0)
    for s in out.values():
        s["ms_per_step"] = s["step_ms"] / max(s["steps"], 1)
        s["control_share"] = s["hook_ms"] / s["step_ms"] if s["step_ms"] else 0.0
        s["skipped_share"] = s["skipped"] / s["rows"] if s["rows"] else 0.0
        # A row needs one search per store; skipping saves both, reuse one (row, store) pair each.
        needed = STORES_PER_PAIR * s["rows"]
        s["searches_saved"] = (STORES_PER_PAIR * s["skipped"] + s["reused"]) / needed if needed else 0.0
        s["recall"] = s["recall_sum"] / s["audited"] if s["audited"] else None
    return out


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def ratios(runs: list[dict], first: list[dict]) -> dict:
    """Run-by-run ratio of ms per step to the first build's run of the same repeat."""
    rs = [r["ms_per_step"] / f["ms_per_step"] for r, f in zip(runs, first)]
    return {"median": median(rs), "min": min(rs), "max": max(rs)}


def show(r: dict) -> str:
    return f"{r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stores", nargs="+", default=["default=datastores/toxic,datastores/nontoxic"])
    ap.add_argument("--settings", nargs="+", default=["full=", "skip=--skip 0.05"])
    ap.add_argument("--batches", default="1,25")
    ap.add_argument("--prompts", type=Path, default=REPO / "data" / "prompts.jsonl")
    ap.add_argument("--prompts-batch1", type=int, default=12, help="prompts decoded at batch 1")
    ap.add_argument("--prompts-batch25", type=int, default=2, help="prompts decoded at batch 25")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--bins", nargs="+", default=[f"new={BIN}"],
                    help="binaries to compare, NAME=PATH (default: the release build)")
    ap.add_argument("--simd", default="auto",
                    help="kernel builds to compare, comma-separated (auto, avx512, avx2, scalar)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each build, alternating")
    ap.add_argument("--grpc-reuse", action="store_true",
                    help="also measure reuse over gRPC with the real model, per store pair")
    ap.add_argument("--grpc-reuse-flags", default="--reuse 0.02",
                    help="bench_grpc_reuse's rule and reuse flags (--alpha, --filter-p, --skip, "
                         "--reuse, --reuse-radius)")
    args = ap.parse_args()
    builds = [b.strip() for b in args.simd.split(",") if b.strip()]
    if not builds or args.repeat < 1:
        sys.exit("--simd needs at least one build and --repeat at least 1")
    bins = {n: Path(v) for n, v in named(args.bins, "--bins").items()}
    for name, path in bins.items():
        if not path.exists():
            sys.exit(f"--bins {name}: {path} is missing: cargo build --release --bin goodtriever")
    # Each variant is (name, binary, GOODTRIEVER_SIMD).
    variants = [(f"{b}/{s}" if len(bins) > 1 else s, path, s) for b, path in bins.items() for s in builds]
    if not args.prompts.exists():
        sys.exit(f"{args.prompts} is missing: python3 scripts/data/make_prompts.py")
    stores = {n: v.split(",") for n, v in named(args.stores, "--stores").items()}
    for name, pair in stores.items():
        if len(pair) != 2 or not all((REPO / p / "manifest.json").exists() or (Path(p) / "manifest.json").exists() for p in pair):
            sys.exit(f"--stores {name}: expected two datastore directories TOXIC,NONTOXIC, got {pair}")
    settings = named(args.settings, "--settings")
    batches = [int(b) for b in args.batches.split(",")]
    WORK.mkdir(parents=True, exist_ok=True)
    results = []
    started = time.monotonic()
    for sname, (toxic, nontoxic) in stores.items():
        for batch in batches:
            n_prompts = args.prompts_batch1 if batch == 1 else args.prompts_batch25
            for setting, flags in settings.items():
                runs: dict[str, list[dict]] = {v[0]: [] for v in variants}
                for rep in range(args.repeat):
                    for vname, binary, build in variants:
                        out = WORK / f"{sname}-b{batch}-{setting}-{vname.replace('/', '-')}-{rep}.jsonl"
                        cmd = [str(binary), "eval", "generate", "--prompts", str(args.prompts),
                               "--limit", str(n_prompts), "--num-samples", str(batch),
                               "--max-new-tokens", str(args.tokens), "--seed", str(args.seed),
                               "--toxic", toxic, "--nontoxic", nontoxic, "--out", str(out),
                               *shlex.split(flags)]
                        log(f"{sname} batch {batch} {setting} {vname} run {rep + 1}: "
                            f"GOODTRIEVER_SIMD={build} {shlex.join(cmd)}")
                        env = dict(os.environ, GOODTRIEVER_SIMD=build)
                        subprocess.run(cmd, check=True, cwd=REPO, stderr=subprocess.DEVNULL, env=env)
                        per = summarise([json.loads(line) for line in out.read_text().splitlines()])
                        runs[vname].append(per)
                recall = None
                if "--reuse" in shlex.split(flags):
                    vname, binary, build = variants[0]
                    out = WORK / f"{sname}-b{batch}-{setting}-audit.jsonl"
                    cmd = [str(binary), "eval", "generate", "--prompts", str(args.prompts),
                           "--limit", str(n_prompts), "--num-samples", str(batch),
                           "--max-new-tokens", str(args.tokens), "--seed", str(args.seed),
                           "--toxic", toxic, "--nontoxic", nontoxic, "--out", str(out), "--skip-base",
                           *shlex.split(flags), "--reuse-audit"]
                    log(f"{sname} batch {batch} {setting}: recall audit (untimed): {shlex.join(cmd)}")
                    env = dict(os.environ, GOODTRIEVER_SIMD=build)
                    subprocess.run(cmd, check=True, cwd=REPO, stderr=subprocess.DEVNULL, env=env)
                    recall = summarise([json.loads(line) for line in out.read_text().splitlines()])[
                        "goodtriever"]["recall"]
                first = runs[variants[0][0]]
                for vname, _, _ in variants:
                    base = [r["base"] for r in runs[vname]]
                    ctrl = [r["goodtriever"] for r in runs[vname]]
                    results.append({
                        "stores": sname, "batch": batch, "setting": setting, "flags": flags,
                        "simd": vname, "runs": args.repeat,
                        "prompts": n_prompts,
                        "base_ms_per_step": median([b["ms_per_step"] for b in base]),
                        "controlled_ms_per_step": median([c["ms_per_step"] for c in ctrl]),
                        "added": median([c["ms_per_step"] / b["ms_per_step"] - 1 for b, c in zip(base, ctrl)]),
                        "control_share": median([c["control_share"] for c in ctrl]),
                        "rows_not_searched": median([c["skipped_share"] for c in ctrl]),
                        "store_searches_saved": median([c["searches_saved"] for c in ctrl]),
                        "reuse_recall": recall,
                        "base_ratio": ratios(base, [r["base"] for r in first]),
                        "controlled_ratio": ratios(ctrl, [r["goodtriever"] for r in first]),
                    })
    grpc = []
    if args.grpc_reuse:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from cargo_bench import build_drivers
        driver = build_drivers("bench_grpc_reuse")["bench_grpc_reuse"]
        for sname, (toxic, nontoxic) in stores.items():
            cmd = [str(driver), "--toxic", toxic, "--nontoxic", nontoxic, "--prompts", str(args.prompts),
                   "--limit", str(args.prompts_batch1), "--num-samples", "5",
                   "--max-new-tokens", str(args.tokens), "--seed", str(args.seed),
                   *shlex.split(args.grpc_reuse_flags)]
            log(f"{sname}: reuse over gRPC: {shlex.join(cmd)}")
            out = subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.PIPE, text=True).stdout
            grpc.append({"stores": sname, **json.loads(out)})
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "load_avg_1m_end": os.getloadavg()[0]},
        "tokens": args.tokens, "seed": args.seed, "results": results, "grpc_reuse": grpc,
        "total_s": time.monotonic() - started,
    }
    (WORK / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{args.tokens} new tokens per sequence, seed {args.seed}; base and controlled interleaved per prompt.")
    if args.repeat > 1:
        print(f"Medians over {args.repeat} runs of each variant; ratios to {variants[0][0]} pair by pair "
              "(median [min, max]).")
    print("| stores | batch | setting | variant | base ms/step | controlled ms/step | added | control share "
          "| rows not searched | store searches saved | reuse recall | base ratio | controlled ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        recall = "–" if r["reuse_recall"] is None else f"{r['reuse_recall']:.3f}"
        print(f"| {r['stores']} | {r['batch']} | {r['setting']} | {r['simd']} | {r['base_ms_per_step']:.1f} | "
              f"{r['controlled_ms_per_step']:.1f} | {r['added']:+.0%} | {r['control_share']:.0%} | "
              f"{r['rows_not_searched']:.0%} | {r['store_searches_saved']:.0%} | {recall} | "
              f"{show(r['base_ratio'])} | {show(r['controlled_ratio'])} |")
    if grpc:
        print(f"\nReuse over gRPC ({args.grpc_reuse_flags}; 5 samples per prompt, dense answers): "
              "the same prompts and seeds in-process and through a server on loopback.")
        print("| stores | sequences | same tokens | rows | rows reused (in-process / gRPC) "
              "| control ms/step (in-process / gRPC) | server engine ms/step |")
        print("|---|---|---|---|---|---|---|")
        for g in grpc:
            a, b = g["in_process"], g["grpc"]
            print(f"| {g['stores']} | {g['sequences']} | {g['same_tokens']} | {a['rows']} | "
                  f"{a['rows_reused']} ({a['rows_reused'] / max(a['rows'], 1):.0%}) / "
                  f"{b['rows_reused']} ({b['rows_reused'] / max(b['rows'], 1):.0%}) | "
                  f"{a['control_ms_per_step']:.2f} / {b['control_ms_per_step']:.2f} | "
                  f"{b['engine_ms_per_step']:.2f} |")
    print(f"\nTotal {report['total_s'] / 60:.1f} min; {report['machine']}")


if __name__ == "__main__":
    main()
