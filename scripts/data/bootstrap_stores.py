#!/usr/bin/env python3
"""Stores bootstrapped from the model's own continuations (issue 18 §3, the first approach).

Both stores hold text the model itself wrote, continuing the same prompts, so they share the
model's register and the prompts' topics and differ in what alt-profanity-check says about the
continuation. Steps:

1. Prompts: sentences of the default stores' training files (data/corpora/toxic.jsonl and
   nontoxic.jsonl, written by prepare_data.py; nlp-corpus sentences outside its held-out
   split, so no evaluation prompt is among them), --per-kind of each file in SHA-256 order of
   the text, cut at half their words as make_prompts.py cuts the evaluation's prompts.
2. Continuations: `goodtriever eval generate` without control (--samples per prompt,
   --tokens new tokens, top-p 0.9, --seed), then --more-toxic-samples more of each toxic
   prompt with seed + 1 (about 7% of a toxic prompt's continuations score toxic, 1% of a
   clean one's: 4 samples of each gave 300 toxic continuations, 7k tokens, a third of the
   default toxic store).
3. Labels: alt-profanity-check on the continuation alone (the prompt is corpus text whose
   label is known; what the store should learn is what the model does next).
4. Stores: toxic = continuations scoring >= --toxic-min; non-toxic = continuations scoring
   < --clean-max, matched to the toxic ones' prompt sources (each nlp-corpus document gets the
   share of the budget its toxic continuations have, as prepare_data.py matches the default
   non-toxic store), --ratio times the toxic characters in all (the default stores'
   proportion). A document is the continuation alone: its prompt, which may be toxic
   while the continuation is clean, must not lend its tokens to the non-toxic store.
   `goodtriever datastore build` (window 256 / stride 192, the default recipes') writes
   datastores/bootstrap-toxic and datastores/bootstrap-nontoxic.

**The labeller is the evaluation's EMT scorer**: every alt-profanity-check figure on these
stores measures the control learning its own labeller; docs/evaluation.md reports the second
scorer and prompts from sources the stores were not made from (Brown, SOTU, Davidson) next to
it.

Output under --work (default data/bootstrap-stores/, git-ignored): prompts.jsonl,
generated.jsonl, prompts-toxic.jsonl, generated-toxic-more.jsonl, toxic.jsonl, nontoxic.jsonl, manifest.json; each step is skipped when its
output is complete, so a rerun resumes. A store whose manifest.json exists is not rebuilt.

Usage: python3 scripts/data/bootstrap_stores.py [--bin target/release/goodtriever]
           [--per-kind 1000] [--samples 4] [--more-toxic-samples 12] [--tokens 24]
           [--no-build]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from data_venv import reexec_in_data_venv  # noqa: E402
from make_prompts import digest, split_sentence  # noqa: E402
from prepare_data import matched_budget  # noqa: E402

KINDS = {"toxic": "toxic.jsonl", "clean": "nontoxic.jsonl"}


def log(msg: str) -> None:
    print(f"[bootstrap_stores] {msg}", file=sys.stderr, flush=True)


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def make_prompts(corpora: Path, per_kind: int) -> list[dict]:
    """`per_kind` prompts from each training file, interleaved so any prefix is balanced."""
    by_kind = []
    for kind, name in KINDS.items():
        rows = sorted(read_jsonl(corpora / name), key=lambda r: digest(r["text"]))
        picked = []
        for r in rows:
            cut = split_sentence(r["text"])
            if cut is None:
                continue
            picked.append({"prompt": cut[0], "kind": kind, "source": r["source"],
                           "sentence_toxicity": r["toxicity"]})
            if len(picked) == per_kind:
                break
        if len(picked) < per_kind:
            log(f"{name}: only {len(picked)} sentences of 8 to 50 words (asked {per_kind})")
        by_kind.append(picked)
    out = []
    for i in range(max(len(k) for k in by_kind)):
        out += [k[i] for k in by_kind if i < len(k)]
    for i, p in enumerate(out):
        p["id"] = f"b{i:05d}-{digest(p['prompt'])[:8]}"
    return out


def select(scored: list[dict], toxic_min: float, clean_max: float, ratio: float) -> tuple[list, list]:
    """The two stores' documents: every toxic continuation; clean ones matched to the toxic
    ones' prompt sources (prepare_data.matched_budget: each nlp-corpus document gets its share
    of the toxic characters), `ratio` times the toxic characters in all."""
    toxic = [r for r in scored if r["toxicity"] >= toxic_min]
    clean = [r for r in scored if r["toxicity"] < clean_max]
    budget = ratio * sum(len(r["text"]) for r in toxic)
    return toxic, matched_budget(clean, toxic, budget) if toxic else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", type=Path, default=REPO / "target" / "release" / "goodtriever")
    ap.add_argument("--corpora", type=Path, default=REPO / "data" / "corpora")
    ap.add_argument("--work", type=Path, default=REPO / "data" / "bootstrap-stores")
    ap.add_argument("--stores", type=Path, default=REPO / "datastores")
    ap.add_argument("--per-kind", type=int, default=1000, help="prompts from each training file")
    ap.add_argument("--samples", type=int, default=4, help="continuations per prompt")
    ap.add_argument("--tokens", type=int, default=24, help="new tokens per continuation")
    ap.add_argument("--more-toxic-samples", type=int, default=12,
                    help="continuations per toxic prompt generated again with seed + 1")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--toxic-min", type=float, default=0.5)
    ap.add_argument("--clean-max", type=float, default=0.1)
    ap.add_argument("--ratio", type=float, default=2.5, help="non-toxic characters per toxic one")
    ap.add_argument("--no-build", action="store_true", help="write the jsonl files only")
    args = ap.parse_args()
    reexec_in_data_venv(__file__)
    from profanity_check import predict_prob  # noqa: E402  (inside the venv only)

    if not (args.corpora / "manifest.json").exists():
        sys.exit(f"{args.corpora} is not prepared: python3 scripts/data/prepare_data.py")
    if not args.bin.exists():
        sys.exit(f"{args.bin} is missing: cargo build --release --bin goodtriever")
    args.work.mkdir(parents=True, exist_ok=True)
    prompts_path, gen_path = args.work / "prompts.jsonl", args.work / "generated.jsonl"
    prompts = make_prompts(args.corpora, args.per_kind)
    write_jsonl(prompts_path, prompts)
    log(f"{len(prompts)} prompts -> {prompts_path}")

    def generate(prompts_file: Path, n_prompts: int, samples: int, seed: int, out: Path) -> list[dict]:
        """Base-model continuations of every prompt of `prompts_file` (resumed when complete)."""
        expected = n_prompts * samples
        have = len(read_jsonl(out)) if out.exists() else 0
        if have != expected:
            cmd = [str(args.bin), "eval", "generate", "--prompts", str(prompts_file),
                   "--num-samples", str(samples), "--max-new-tokens", str(args.tokens),
                   "--seed", str(seed), "--out", str(out)]
            log("generating: " + " ".join(cmd))
            t0 = time.monotonic()
            subprocess.run(cmd, check=True)
            gen_s[out.name] = time.monotonic() - t0
        rows = [r for r in read_jsonl(out) if r["variant"] == "base"]
        if len(rows) != expected:
            sys.exit(f"{out}: {len(rows)} continuations, expected {expected}")
        return rows

    gen_s: dict[str, float] = {}
    generated = generate(prompts_path, len(prompts), args.samples, args.seed, gen_path)
    if args.more_toxic_samples:
        # Toxic prompts' continuations are toxic a few times in a hundred: more of them, with
        # their own seed, fill the toxic store without a larger prompt set.
        toxic_prompts = [p for p in prompts if p["kind"] == "toxic"]
        more_path = args.work / "prompts-toxic.jsonl"
        write_jsonl(more_path, toxic_prompts)
        more = generate(more_path, len(toxic_prompts), args.more_toxic_samples, args.seed + 1,
                        args.work / "generated-toxic-more.jsonl")
        generated += [{**r, "sample": r["sample"] + args.samples} for r in more]

    texts = [r["continuation"].strip() for r in generated]
    scores = predict_prob(texts)
    # "source" is the prompt's nlp-corpus document: the non-toxic selection matches on it, and
    # `explain` shows it; "prompt_id" and "sample" say which continuation a row came from.
    scored = [{"text": t, "source": r["source"], "kind": r["kind"], "prompt_id": r["id"],
               "sample": r["sample"], "toxicity": round(float(p), 4)}
              for r, t, p in zip(generated, texts, scores) if t]
    toxic, nontoxic = select(scored, args.toxic_min, args.clean_max, args.ratio)
    write_jsonl(args.work / "toxic.jsonl", toxic)
    write_jsonl(args.work / "nontoxic.jsonl", nontoxic)
    counts = {
        "prompts": len(prompts), "continuations": len(scored),
        "toxic": len(toxic), "toxic_chars": sum(len(r["text"]) for r in toxic),
        "nontoxic": len(nontoxic), "nontoxic_chars": sum(len(r["text"]) for r in nontoxic),
        "clean_available": sum(r["toxicity"] < args.clean_max for r in scored),
        "toxic_by_kind": {k: sum(r["kind"] == k for r in toxic) for k in KINDS},
        "toxic_rate_by_kind": {k: sum(r["kind"] == k and r["toxicity"] >= args.toxic_min for r in scored)
                               / max(sum(r["kind"] == k for r in scored), 1) for k in KINDS},
    }
    log(f"counts: {counts}")
    manifest = {"rules": {k: getattr(args, k) for k in ("per_kind", "samples", "tokens", "seed", "toxic_min",
                                                        "clean_max", "ratio")},
                "labeller": "alt-profanity-check (the evaluation's EMT scorer)",
                "counts": counts, "generate_s": gen_s,
                "generated": {"continuations": len(generated), "more_toxic_samples": args.more_toxic_samples},
                "sha256": {n: digest((args.work / n).read_text(encoding="utf-8"))
                           for n in ("prompts.jsonl", "toxic.jsonl", "nontoxic.jsonl")}}
    (args.work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if args.no_build:
        return
    for name in ("toxic", "nontoxic"):
        out = args.stores / f"bootstrap-{name}"
        if (out / "manifest.json").exists():
            log(f"{out} exists: not rebuilt")
            continue
        cmd = [str(args.bin), "datastore", "build", "--input", str(args.work / f"{name}.jsonl"),
               "--format", "jsonl", "--window", "256", "--stride", "192", "--tag", f"bootstrap-{name}",
               "--label", f"bootstrap-{name}", "--json", "--out", str(out)]
        log("building: " + " ".join(cmd))
        t0 = time.monotonic()
        report = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        (args.work / f"build-{name}.json").write_text(json.dumps(
            {"report": json.loads(report), "wall_s": time.monotonic() - t0}, indent=2) + "\n")
        log(f"built {out} in {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
