#!/usr/bin/env python3
"""Sweeps of the control's knobs (issue 6 §3), reusing scripts/eval/evaluate.py's generation,
scoring and metrics.

One base run (no control) is generated once and shared; every other run is the controlled
variant only (`eval generate --skip-base`) with the same prompts and seeds, so each run differs
from the base and from the others only by its knobs (paired samples). Groups:

* alpha     α in {0.5, 1, 2, 4}: the toxicity-versus-perplexity curve
* k         neighbours per store in {64, 256, 1024}
* T         kNN softmax temperature in {1, 5, 25, 100, 400} (default 100, src/rule.rs). With
            the default stores the squared L2 distances of a query's 1024 neighbours span only
            ~25 to ~40, so T >= 25 weighs them almost uniformly: only small T sharpens the kNN
            distribution
* size      the toxic store's size: 25%, 50%, 100% of its documents. The smaller stores are
            built with `goodtriever datastore build` from a prefix of the default recipe's
            input (data/corpora/toxic.jsonl, same recipe arguments), under --out/stores/
* mode      ensemble (toxic and non-toxic stores, the paper's) vs toxic-only
* sampling  the diversity question: the rule keeps its own nucleus (filter_p 0.9) and the
            sampler then applies top-p 0.9 again; runs with sampler top-p 1, with filter_p 1,
            and both, plus a base run at top-p 1 for reference
* alpha-sampling  the diversity question continued: α 1 and 0.5 at top-p 0.9, α 1 at top-p 1

Everything not swept stays at the defaults (α 2, k 1024, T 100, filter_p 0.9, ensemble, the
default stores, sampler top-p 0.9, temperature 1). A run whose files and settings are already
in --out is reused, so an interrupted sweep resumes.

Output (--out, default eval-out/sweep[-quick]): runs/<name>/{generations,perplexity,scores}.jsonl
and run.json, report.json, report.md, and sweep_<group>.png plots.

Cost (measured on the shared 2-core box at load 4-14, docs/evaluation.md): a --quick
controlled run (120 sequences) takes ~1.5-2.5 min of generation and ~0.5-1 min of
perplexity; --quick --groups alpha,k,T,size,mode (base + 13 runs, two small stores built) took
~40 min in all, the two diversity groups at 20 prompts x 10 samples ~30 min. Use --groups to
run part of it.

Usage: python3 scripts/eval/sweep.py [--quick] [--groups alpha,k,T,size,mode,sampling,alpha-sampling]
       [--out DIR] [--n-prompts N --samples S --tokens L]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

# The scripts import each other across scripts/data and scripts/eval.
sys.path[:0] = [str(Path(__file__).resolve().parents[1] / d) for d in ("data", "eval")]

import evaluate as ev  # noqa: E402

REPO = ev.REPO
QUICK = {"n_prompts": 24, "samples": 5, "tokens": 20}
FULL = {"n_prompts": 200, "samples": 10, "tokens": 20}
SIZES = (0.25, 0.5)
ALL_GROUPS = ("alpha", "k", "T", "size", "mode", "sampling", "alpha-sampling")
DEFAULT_RULE = {"alpha": 2.0, "k": 1024, "T": 100.0, "filter_p": 0.9, "top_p": 0.9}


def log(msg: str) -> None:
    print(f"[sweep] {msg}", file=sys.stderr, flush=True)


def recipe_args(path: Path) -> list[str]:
    """A recipe file's arguments (one per line; blank lines and # comments skipped)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def prefix_store(bin_: Path, frac: float, stores: Path) -> tuple[Path, float]:
    """The toxic store built from the first `frac` of the default recipe's documents (same
    recipe arguments otherwise); reused when it exists. Returns (path, build seconds or 0)."""
    name = f"toxic-{round(frac * 100)}pct"
    out = stores / name
    timing = stores / f"{name}.build.json"
    if (out / "manifest.json").exists():
        return out, json.loads(timing.read_text())["seconds"] if timing.exists() else 0.0
    args = recipe_args(REPO / "datastores" / "recipes" / "toxic.args")
    i = args.index("--input")
    src = REPO / args[i + 1]
    lines = [l for l in src.read_text(encoding="utf-8").splitlines() if l.strip()]
    keep = lines[: max(1, math.ceil(frac * len(lines)))]
    stores.mkdir(parents=True, exist_ok=True)
    part = stores / f"{name}.jsonl"
    part.write_text("\n".join(keep) + "\n", encoding="utf-8")
    args[i + 1] = str(part)
    if "--tag" in args:
        args[args.index("--tag") + 1] = name
    else:
        args += ["--tag", name]
    if out.exists():
        shutil.rmtree(out)
    secs = ev.run([str(bin_), "datastore", "build", *args, "--out", str(out)])
    timing.write_text(json.dumps({"seconds": secs}) + "\n")
    return out, secs


def store_rows(store: Path) -> int:
    m = json.loads((store / "manifest.json").read_text())
    return sum(s["rows"] for s in m["segments"] if not s.get("retired"))


def plan(groups: list[str], size_stores: dict[float, Path]) -> tuple[dict, dict]:
    """(runs, groups): runs = {name: {"extra", "toxic", "base"}}; groups = {group: [(x, run)]}."""
    runs = {
        "base": {"extra": [], "base": True},
        "default": {"extra": []},
    }
    out: dict[str, list] = {}

    def add(group, x, name, extra=(), toxic=None, base=False):
        runs.setdefault(name, {"extra": list(extra), "base": base, **({"toxic": str(toxic)} if toxic else {})})
        out.setdefault(group, []).append((x, name))

    for g in groups:
        if g == "alpha":
            for a in (0.5, 1.0, 2.0, 4.0):
                add(g, a, "default" if a == 2.0 else f"alpha-{a:g}", ["--alpha", f"{a:g}"])
        elif g == "k":
            for k in (64, 256, 1024):
                add(g, k, "default" if k == 1024 else f"k-{k}", ["--k", str(k)])
        elif g == "T":
            for t in (1.0, 5.0, 25.0, 100.0, 400.0):
                add(g, t, "default" if t == 100.0 else f"T-{t:g}", ["--knn-temperature", f"{t:g}"])
        elif g == "size":
            for frac in (*SIZES, 1.0):
                if frac == 1.0:
                    add(g, 1.0, "default")
                else:
                    add(g, frac, f"toxic-{round(frac * 100)}pct", toxic=size_stores[frac])
        elif g == "mode":
            add(g, "ensemble", "default")
            add(g, "toxic-only", "toxic-only", ["--mode", "toxic-only"])
        elif g == "sampling":
            add(g, "top-p 0.9, filter_p 0.9 (default)", "default")
            add(g, "top-p 1, filter_p 0.9", "top-p-1", ["--top-p", "1"])
            add(g, "top-p 0.9, filter_p 1", "filter-p-1", ["--filter-p", "1"])
            add(g, "top-p 1, filter_p 1", "top-p-1-filter-p-1", ["--top-p", "1", "--filter-p", "1"])
            add(g, "base, top-p 1", "base-top-p-1", ["--top-p", "1"], base=True)
        elif g == "alpha-sampling":
            add(g, "α 2, top-p 0.9 (default)", "default")
            add(g, "α 1, top-p 0.9", "alpha-1", ["--alpha", "1"])
            add(g, "α 1, top-p 1", "alpha-1-top-p-1", ["--alpha", "1", "--top-p", "1"])
            add(g, "α 0.5, top-p 0.9", "alpha-0.5", ["--alpha", "0.5"])
        else:
            raise SystemExit(f"unknown group {g!r} (known: {', '.join(ALL_GROUPS)})")
    return runs, out


def do_run(name: str, spec: dict, args, setting: dict) -> dict:
    """Generates, scores and measures one run (reused when its settings match)."""
    d = args.out / "runs" / name
    d.mkdir(parents=True, exist_ok=True)
    key = {"setting": setting, "seed": args.seed, "prompts": str(args.prompts), "spec": spec}
    meta_path = d / "run.json"
    gen_path, ppl_path = d / "generations.jsonl", d / "perplexity.jsonl"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if meta.get("key") != key or not (gen_path.exists() and ppl_path.exists()):
        load0 = os.getloadavg()[0]
        if spec.get("base"):
            cmd = ev.generate_cmd(args.bin, args.prompts, setting, args.seed, gen_path, extra=spec["extra"])
        else:
            toxic = Path(spec.get("toxic", args.toxic))
            cmd = ev.generate_cmd(args.bin, args.prompts, setting, args.seed, gen_path, toxic, args.nontoxic,
                                  ["--skip-base", "--variant", name, *spec["extra"]])
        gen_s = ev.run(cmd)
        ppl_s = ev.run(ev.perplexity_cmd(args.bin, gen_path, ppl_path))
        meta = {"key": key, "generate_s": gen_s, "perplexity_s": ppl_s, "load_avg_1m": [load0, os.getloadavg()[0]]}
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    else:
        log(f"{name}: reusing {d}")
    gens = ev.read_jsonl(gen_path)
    for g in gens:  # base runs are named after the run, not "base", in the sweep's tables
        g["variant"] = name
    ppl_rows = ev.read_jsonl(ppl_path)
    for p in ppl_rows:
        p["variant"] = name
    scores = ev.score_generations(gens, d / "scores.jsonl")
    metrics = ev.all_metrics(gens, scores, ppl_rows)
    return {"metrics": {s: rows[name] for s, rows in metrics.items()}, **{k: meta[k] for k in ("generate_s", "perplexity_s", "load_avg_1m")}}


COLS = [
    ("EMT ± s.e.", "emt", "{:.3f}"),
    ("tox@0.5", "tox_prob_0.5", "{:.3f}"),
    ("tox@0.25", "tox_prob_0.25", "{:.3f}"),
    ("EMT chall. ± s.e.", ("challenging", "emt"), "{:.3f}"),
    ("PPL", "ppl", "{:.2f}"),
    ("dist-1", "dist_1", "{:.3f}"),
    ("dist-2", "dist_2", "{:.3f}"),
    ("dist-3", "dist_3", "{:.3f}"),
    ("ms/seq", "ms_per_sequence", "{:.0f}"),
    ("control", "control_share", "{:.0%}"),
]


def cell(res: dict, key) -> str:
    subset, k = key if isinstance(key, tuple) else ("all", key)
    v = res["metrics"].get(subset, {}).get(k)
    fmt = next(f for _, kk, f in COLS if kk == key)
    if v is None or (k == "control_share" and res.get("is_base")):
        return "–"
    if k == "emt":  # with its standard error over prompts
        m = res["metrics"][subset]
        return fmt.format(v) + f" ± {m['emt_std'] / m['prompts'] ** 0.5:.3f}"
    return fmt.format(v)


def table(rows: list[tuple[str, dict]]) -> list[str]:
    head = "| run | " + " | ".join(c[0] for c in COLS) + " | gen s | ppl s | load |"
    lines = [head, "|---" * (len(COLS) + 4) + "|"]
    for label, res in rows:
        load = "–".join(f"{x:.1f}" for x in res["load_avg_1m"])
        lines.append(f"| {label} | " + " | ".join(cell(res, k) for _, k, _ in COLS)
                     + f" | {res['generate_s']:.0f} | {res['perplexity_s']:.0f} | {load} |")
    return lines


def markdown(report: dict) -> str:
    s = report["settings"]
    out = [
        f"Sweep: first {s['n_prompts']} prompts of {s['prompts_file']} (balanced: half challenging), "
        f"{s['samples']} samples x {s['tokens']} tokens, seed {s['seed']}, sampler top-p 0.9 unless said; "
        "scorer alt-profanity-check; PPL = mean conditional perplexity under the base model; "
        "'gen s'/'ppl s' = wall seconds of `eval generate`/`eval perplexity` for the run, "
        "'load' = 1-minute load average before–after (2 cores). Defaults: α 2, k 1024, T 100, "
        "filter_p 0.9, ensemble, default stores.",
        "",
    ]
    res = report["runs"]
    for g, pts in report["groups"].items():
        out += [f"**{g}**", ""]
        rows = [("base", res["base"])] + [(f"{g} = {x}" + (" (default)" if n == "default" and "default" not in str(x) else ""), res[n]) for x, n in pts]
        out += table(rows) + [""]
    if report.get("stores"):
        out += ["Toxic stores of the size ablation: " + ", ".join(f"{k}: {v['rows']} rows" + (f" (built in {v['build_s']:.0f} s)" if v.get("build_s") else "") for k, v in report["stores"].items()), ""]
    return "\n".join(out)


def plots(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, written = report["runs"], []
    base = res["base"]["metrics"]["all"]
    for g, pts in report["groups"].items():
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
        xs = [str(x) for x, _ in pts]
        emt = [res[n]["metrics"]["all"]["emt"] for _, n in pts]
        ppl = [res[n]["metrics"]["all"].get("ppl", float("nan")) for _, n in pts]
        d1 = [res[n]["metrics"]["all"]["dist_1"] for _, n in pts]
        if g == "alpha":
            # The toxicity-versus-perplexity curve, the base model as the α = 0 point.
            ax[0].plot([base["ppl"]] + ppl, [base["emt"]] + emt, marker="o")
            for x, p, e in zip(["base"] + xs, [base["ppl"]] + ppl, [base["emt"]] + emt):
                ax[0].annotate(x if x == "base" else f"α={x}", (p, e), textcoords="offset points", xytext=(4, 4), fontsize=8)
            ax[0].set_xlabel("conditional perplexity (base model)")
            ax[0].set_ylabel("Expected Maximum Toxicity")
            ax[0].set_title("α: toxicity vs perplexity")
        else:
            ax[0].plot(xs, emt, marker="o", label="EMT")
            ax[0].axhline(base["emt"], ls="--", c="gray", label="base EMT")
            ax[0].set_ylabel("EMT")
            ax[0].set_xlabel(g)
            ax[0].set_title(f"{g}: toxicity")
            ax[0].legend(fontsize=8)
            if g == "sampling":
                ax[0].tick_params(axis="x", labelsize=6, rotation=15)
        ax2 = ax[1]
        ax2.plot(xs, ppl, marker="o", c="C1", label="PPL")
        ax2.axhline(base["ppl"], ls="--", c="C1", alpha=0.5)
        ax2.set_ylabel("PPL", color="C1")
        ax3 = ax2.twinx()
        ax3.plot(xs, d1, marker="s", c="C2", label="dist-1")
        ax3.axhline(base["dist_1"], ls="--", c="C2", alpha=0.5)
        ax3.set_ylabel("dist-1", color="C2")
        ax2.set_xlabel(g)
        ax2.set_title(f"{g}: fluency and diversity (dashed: base)")
        if g == "sampling":
            ax2.tick_params(axis="x", labelsize=6, rotation=15)
        fig.tight_layout()
        name = f"sweep_{g}.png"
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        written.append(name)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ev.add_run_args(ap, QUICK, FULL)
    ap.add_argument("--groups", default=",".join(ALL_GROUPS))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    ev.reexec_in_data_venv(__file__)
    setting = ev.run_setting(args, QUICK, FULL)
    args.out = args.out or REPO / "eval-out" / ("sweep-quick" if args.quick else "sweep")
    if not args.prompts.exists():
        sys.exit(f"{args.prompts} is missing: run python3 scripts/data/make_prompts.py")
    for s in (args.toxic, args.nontoxic):
        if not (s / "manifest.json").exists():
            sys.exit(f"no datastore at {s}: scripts/demo.sh builds the default ones")
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()

    stores = {"toxic-100pct": {"path": str(args.toxic), "rows": store_rows(args.toxic)}}
    size_stores = {}
    if "size" in groups:
        for frac in SIZES:
            p, secs = prefix_store(args.bin, frac, args.out / "stores")
            size_stores[frac] = p
            stores[p.name] = {"path": str(p), "rows": store_rows(p), "build_s": secs}
    runs, grp = plan(groups, size_stores)
    results = {}
    for i, (name, spec) in enumerate(runs.items()):
        log(f"run {i + 1}/{len(runs)}: {name} {' '.join(spec['extra'])}")
        results[name] = do_run(name, spec, args, setting)
        results[name]["is_base"] = bool(spec.get("base"))
        results[name]["spec"] = spec
    report = {
        "settings": {**setting, "seed": args.seed, "prompts_file": str(args.prompts), "quick": args.quick, "groups": groups},
        "machine": ev.machine(),
        "total_s": time.monotonic() - t_start,
        "stores": stores,
        "groups": grp,
        "runs": results,
    }
    if "default" in results:
        report["targets_default"] = ev.check_targets(results["base"]["metrics"]["all"], results["default"]["metrics"]["all"])
    report["plots"] = plots(report, args.out)
    for r in results.values():  # per-prompt maxima are in each run's files; keep report.json small
        for m in r["metrics"].values():
            m.pop("max_toxicity_per_prompt", None)
            m.pop("per_prompt", None)
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    report["runs_s"] = sum(r["generate_s"] + r["perplexity_s"] for r in results.values()) + sum(v.get("build_s", 0.0) for v in stores.values())
    md = markdown(report) + (f"\nThis invocation: {report['total_s'] / 60:.1f} min; the runs' generation, perplexity and "
                             f"store builds, summed over when they ran: {report['runs_s'] / 60:.1f} min.\n")
    (args.out / "report.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
