#!/usr/bin/env python3
"""The continual (drift) run of issue 6 §4, after the paper's domain-adaptation experiment.

Domains are the Davidson tweets' classes (../shared/data/davidson/labeled_data.csv, read in
place, never copied into the repository): hate speech (class 0) and offensive language
(class 1). A toxic store that starts as a copy of the default toxic store gets one domain at a
time with `goodtriever datastore add` (one new segment each); after the start and after every
addition, each domain's held-out prompts are evaluated. The comparison is a store that had
both domains from the start: the same copy of the default store with both domains added
together as one segment (interleaved), which holds the same documents as the continual store
after its last step. The non-toxic store is the default one throughout; the base model's
samples are generated once and shared.

Prompts and store tweets are disjoint: prompts come only from the held-out 10% of the tweets
(the split of scripts/data/make_prompts.py), store tweets only from the rest, and a store tweet
whose text equals a held-out one is dropped (make_prompts.davidson_domains).

Sizes (defaults) keep the whole run under ~30 minutes on 2 loaded cores: 20 prompts per
domain x 6 samples x 20 tokens, 250 store tweets per domain (~6k tokens each to extract).

Output (--out, default eval-out/drift): prompts.jsonl, stores/, runs/<stage>/..., report.json,
report.md, drift.png.

Usage: python3 scripts/eval/drift.py [--prompts-per-domain 20] [--samples 6] [--store-tweets 250]
       [--out eval-out/drift] [--bin target/release/goodtriever] [--render]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# The scripts import each other across scripts/data and scripts/eval.
sys.path[:0] = [str(Path(__file__).resolve().parents[1] / d) for d in ("data", "eval")]

import evaluate as ev  # noqa: E402
import make_prompts as mp  # noqa: E402
from make_prompts import digest  # noqa: E402

REPO = ev.REPO
CLASSES = (0, 1)  # hate speech, then offensive language: the order they are added in
WINDOW = ["--window", "256", "--stride", "192"]  # the default toxic recipe's


def log(msg: str) -> None:
    print(f"[drift] {msg}", file=sys.stderr, flush=True)


def write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def add(bin_: Path, store: Path, inputs: list[Path], tag: str) -> dict:
    t0 = time.monotonic()
    cmd = [str(bin_), "datastore", "add", str(store), "--input", *map(str, inputs), *WINDOW, "--tag", tag, "--json"]
    log("$ " + " ".join(cmd))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    rep = json.loads(out.stdout) if out.stdout.strip() else {}
    return {"seconds": time.monotonic() - t0, "report": rep}


def store_rows(store: Path) -> int:
    m = json.loads((store / "manifest.json").read_text())
    return sum(s["rows"] for s in m["segments"] if not s.get("retired"))


def run_stage(name: str, args, setting: dict, toxic: Path | None) -> dict:
    d = args.out / "runs" / name
    d.mkdir(parents=True, exist_ok=True)
    gen_path, ppl_path = d / "generations.jsonl", d / "perplexity.jsonl"
    load0 = os.getloadavg()[0]
    if toxic is None:
        cmd = ev.generate_cmd(args.bin, args.out / "prompts.jsonl", setting, args.seed, gen_path)
    else:
        cmd = ev.generate_cmd(args.bin, args.out / "prompts.jsonl", setting, args.seed, gen_path, toxic, args.nontoxic,
                              ["--skip-base", "--variant", name])
    gen_s = ev.run(cmd)
    ppl_s = ev.run(ev.perplexity_cmd(args.bin, gen_path, ppl_path))
    gens = ev.read_jsonl(gen_path)
    scores = ev.score_generations(gens, d / "scores.jsonl")
    subsets = {dom: (lambda g, dom=dom: g.get("domain") == dom) for dom in args.domain_names}
    subsets["all"] = lambda g: True
    metrics = ev.all_metrics(gens, scores, ev.read_jsonl(ppl_path), subsets)
    res = {s: next(iter(rows.values())) for s, rows in metrics.items()}
    for m in res.values():
        m.pop("max_toxicity_per_prompt", None)
        m.pop("per_prompt", None)
    return {"metrics": res, "generate_s": gen_s, "perplexity_s": ppl_s, "load_avg_1m": [load0, os.getloadavg()[0]],
            "toxic_rows": store_rows(toxic) if toxic else None}


def markdown(report: dict) -> str:
    s = report["settings"]
    doms = report["domains"]
    lines = [
        f"Drift: Davidson domains {', '.join(f'{d} (class {c})' for c, d in doms.items())} added one at a time "
        f"({s['store_tweets']} tweets each, `datastore add`) to a copy of the default toxic store; "
        f"{s['prompts_per_domain']} held-out prompts per domain x {s['samples']} samples x {s['tokens']} tokens, seed {s['seed']}.",
        "",
        "| stage | toxic rows | " + " | ".join(f"EMT {d} (± s.e.) | tox@0.5 {d}" for d in doms.values()) + " | PPL | dist-1 | gen s | load |",
        "|---" * (6 + 2 * len(doms)) + "|",
    ]
    for name, r in report["stages"].items():
        m = r["metrics"]
        cells = " | ".join(f"{m[d]['emt']:.3f} ± {m[d]['emt_std'] / m[d]['prompts'] ** 0.5:.3f} | {m[d]['tox_prob_0.5']:.3f}" for d in doms.values())
        rows = r["toxic_rows"] if r["toxic_rows"] is not None else "–"
        load = "–".join(f"{x:.1f}" for x in r["load_avg_1m"])
        lines.append(f"| {name} | {rows} | {cells} | {m['all'].get('ppl', float('nan')):.2f} | {m['all']['dist_1']:.3f} | {r['generate_s']:.0f} | {load} |")
    lines += ["", "Additions: " + "; ".join(f"{k}: {v['rows_added']} rows in {v['seconds']:.0f} s" for k, v in report["additions"].items()), ""]
    return "\n".join(lines)


def plot(report: dict, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in report["stages"] if s not in ("base", "joint")]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for i, d in enumerate(report["domains"].values()):
        ys = [report["stages"][s]["metrics"][d]["emt"] for s in stages]
        ax.plot(stages, ys, marker="o", c=f"C{i}", label=f"{d} prompts, continual")
        ax.axhline(report["stages"]["joint"]["metrics"][d]["emt"], c=f"C{i}", ls="--", label=f"{d} prompts, joint store")
        ax.axhline(report["stages"]["base"]["metrics"][d]["emt"], c=f"C{i}", ls=":", alpha=0.6, label=f"{d} prompts, base model")
    ax.set_ylabel("Expected Maximum Toxicity")
    ax.set_title("Domains added one at a time")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "drift.png", dpi=90)
    plt.close(fig)
    return "drift.png"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts-per-domain", type=int, default=20)
    ap.add_argument("--samples", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--store-tweets", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--davidson", type=Path, default=mp.DAVIDSON)
    ap.add_argument("--toxic", type=Path, default=REPO / "datastores" / "toxic", help="the starting toxic store (copied)")
    ap.add_argument("--nontoxic", type=Path, default=REPO / "datastores" / "nontoxic")
    ap.add_argument("--bin", type=Path, default=REPO / "target" / "release" / "goodtriever")
    ap.add_argument("--out", type=Path, default=REPO / "eval-out" / "drift")
    ap.add_argument("--render", action="store_true", help="only rewrite report.md and drift.png from --out/report.json")
    args = ap.parse_args()
    ev.reexec_in_data_venv(__file__)
    if args.render:
        report = json.loads((args.out / "report.json").read_text())
        plot(report, args.out)
        md = markdown(report) + f"\nWhole run: {report['total_s'] / 60:.1f} min.\n"
        (args.out / "report.md").write_text(md)
        print(md)
        return
    from profanity_check import predict_prob  # noqa: E402  (inside the venv only)

    if not args.davidson.exists():
        sys.exit(f"{args.davidson} is missing (see ../shared/data/README.md)")
    t_start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    stores = args.out / "stores"
    if stores.exists():
        shutil.rmtree(stores)
    stores.mkdir()

    domains = mp.davidson_domains(args.davidson, CLASSES, args.prompts_per_domain, args.store_tweets)
    args.domain_names = [domains[c]["name"] for c in CLASSES]
    # Prompts: domains alternate; "challenging" as in make_prompts (continuation >= 0.5).
    prompts = mp.interleave([domains[c]["prompts"] for c in CLASSES])
    for p, q in zip(prompts, predict_prob([p["continuation"] for p in prompts])):
        p["continuation_toxicity"] = round(float(q), 4)
        p["challenging"] = bool(q >= mp.CHALLENGING_MIN)
    write_jsonl(args.out / "prompts.jsonl", prompts)
    prompt_texts = {p["prompt"] + p["continuation"] for p in prompts}
    files = {}
    for c in CLASSES:
        texts = domains[c]["store"]
        assert not prompt_texts & {" ".join(t.split()) for t in texts}, "a prompt tweet is in a store file"
        files[c] = stores / f"{domains[c]['name']}.jsonl"
        write_jsonl(files[c], ({"text": t} for t in texts))
    joint_file = stores / "joint.jsonl"
    both = sorted(((digest(t), t) for c in CLASSES for t in domains[c]["store"]))
    write_jsonl(joint_file, ({"text": t} for _, t in both))

    setting = {"n_prompts": len(prompts), "samples": args.samples, "tokens": args.tokens}
    report = {
        "settings": {"prompts_per_domain": args.prompts_per_domain, "samples": args.samples, "tokens": args.tokens,
                     "store_tweets": args.store_tweets, "seed": args.seed, "davidson": str(args.davidson),
                     "start_store": str(args.toxic), "nontoxic": str(args.nontoxic)},
        "domains": {c: domains[c]["name"] for c in CLASSES},
        "machine": ev.machine(),
        "stages": {},
        "additions": {},
    }
    log("stage base (no control)")
    report["stages"]["base"] = run_stage("base", args, setting, None)
    continual = stores / "continual"
    shutil.copytree(args.toxic, continual)
    report["stages"]["start"] = run_stage("start", args, setting, continual)
    for c in CLASSES:
        name = domains[c]["name"]
        before = store_rows(continual)
        a = add(args.bin, continual, [files[c]], f"drift-{name}")
        a["rows_added"] = store_rows(continual) - before
        report["additions"][f"+{name}"] = a
        report["stages"][f"+{name}"] = run_stage(f"plus-{name}", args, setting, continual)
    joint = stores / "joint"
    shutil.copytree(args.toxic, joint)
    before = store_rows(joint)
    a = add(args.bin, joint, [joint_file], "drift-joint")
    a["rows_added"] = store_rows(joint) - before
    report["additions"]["joint"] = a
    report["stages"]["joint"] = run_stage("joint", args, setting, joint)
    report["total_s"] = time.monotonic() - t_start
    report["plot"] = plot(report, args.out)
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report) + f"\nWhole run: {report['total_s'] / 60:.1f} min.\n"
    (args.out / "report.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
