#!/usr/bin/env python3
"""SmolLM2-135M-Instruct in Hugging Face transformers, steered by `goodtriever serve`.

Loads the GGUF that `goodtriever model fetch` put in the cache into transformers (dequantised
to float32), starts `goodtriever serve --toxic datastores/toxic --nontoxic datastores/nontoxic`
(or uses --addr), and:

1. checks that the hidden state transformers produces is the one the stores were built from:
   the toxic store's first rows are the `last_ffn_input` keys of its first document, computed
   by our Rust runtime. The same document run through transformers (with the hook the
   processor uses) must find exactly those rows as nearest neighbours, at a distance that is
   tiny next to the distance to the second neighbour;
2. generates, for a few prompts of data/corpora/demo_prompts.jsonl, a continuation without and
   with the processor (greedy by default, so that the only difference is the control), prints
   them side by side, and the per-step latency of the hook;
3. with --compare-runtime, runs `goodtriever generate` (our runtime, f32 weights, greedy) on the
   same prompts with and without the stores and counts the continuations whose tokens agree.

Run from the repository root, in the venv described in clients/python/README.md:

    .venv-hf/bin/python clients/python/examples/hf_generate.py --compare-runtime
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from goodtriever_client import Client
from goodtriever_client.hf import GoodtrieverLogitsProcessor, find_key_module

REPO = Path(__file__).resolve().parents[3]
HOME = Path(os.environ.get("GOODTRIEVER_HOME", Path.home() / ".cache" / "goodtriever"))
GGUF = HOME / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def pick_binary(explicit: str | None) -> Path:
    """target/release/goodtriever if it is newer than every source file, else target/debug."""
    if explicit:
        return Path(explicit)
    sources = [REPO / "Cargo.toml", REPO / "Cargo.lock"]
    for root in ("src", "proto"):
        sources += [p for p in (REPO / root).rglob("*") if p.is_file()]
    newest_source = max(p.stat().st_mtime for p in sources if p.exists())
    built = [REPO / "target" / kind / "goodtriever" for kind in ("release", "debug")]
    built = [b for b in built if b.exists()]
    if not built:
        sys.exit("no target/{release,debug}/goodtriever: run `cargo build --release --bin goodtriever`")
    for b in built:
        if b.stat().st_mtime >= newest_source:
            return b
    newest = max(built, key=lambda b: b.stat().st_mtime)
    print(f"warning: {newest} is older than the sources; using it anyway", file=sys.stderr)
    return newest


def gguf_eos(path: Path) -> int:
    """The EOS id from the GGUF metadata (transformers' GGUF tokenizer reports a different one
    for this file)."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields["tokenizer.ggml.eos_token_id"]
    return int(field.parts[field.data[0]][0])


def start_server(binary: Path, toxic: str, nontoxic: str, extra: list[str]):
    proc = subprocess.Popen(
        [str(binary), "serve", "--toxic", toxic, "--nontoxic", nontoxic,
         "--addr", "127.0.0.1:0", "--no-metrics", *extra],
        stdout=subprocess.PIPE, text=True,
    )
    line = proc.stdout.readline()
    if not line.startswith("listening"):
        proc.kill()
        sys.exit(f"goodtriever serve did not start: {line!r}")
    fields = dict(w.split("=", 1) for w in line.split()[1:])
    return proc, fields["grpc"]


def capture_keys(model, ids: list[int]) -> torch.Tensor:
    """The last_ffn_input of every position, through the module the processor hooks."""
    got = {}
    module = find_key_module(model, "last_ffn_input")
    handle = module.register_forward_hook(lambda m, i, o: got.__setitem__("h", o))
    with torch.no_grad():
        model(torch.tensor([ids]))
    handle.remove()
    return got["h"][0].float()


def key_check(model, tok, binary: Path, store: str, corpus: Path, eos: int, tmp: Path) -> dict:
    """The first document of the toxic store's corpus through transformers; its keys searched in
    the store. The build keys `EOS d1 EOS d2 ...` and skips separators, so rows 0..n-1 of the
    store's first segment are d1's positions 1..n in `[EOS] + tokens(d1)`."""
    with open(corpus) as f:
        doc = next(r for r in map(json.loads, f) if r.get("toxicity", 0) >= 0.8)
    ids = [eos] + tok(doc["text"], add_special_tokens=False).input_ids
    keys = capture_keys(model, ids)[1:].numpy()
    np.save(tmp / "q.npy", keys)
    subprocess.run(
        [str(binary), "datastore", "search", store, "--queries", str(tmp / "q.npy"), "--k", "2",
         "--exact", "--out-ids", str(tmp / "ids.npy"), "--out-dists", str(tmp / "d.npy")],
        check=True, capture_output=True,
    )
    nn_ids, dists = np.load(tmp / "ids.npy"), np.load(tmp / "d.npy")
    expected = np.arange(len(keys))
    return {
        "text": doc["text"],
        "tokens": len(keys),
        "nearest_is_own_row": int((nn_ids[:, 0] == expected).sum()),
        "d1_max": float(dists[:, 0].max()),
        "d1_median": float(np.median(dists[:, 0])),
        "d2_median": float(np.median(dists[:, 1])),
        "d2_min": float(dists[:, 1].min()),
        "norm2_median": float(np.median((keys ** 2).sum(-1))),
    }


def runtime_generate(binary: Path, prompts: list[str], args, tmp: Path, controlled: bool) -> list[list[int]]:
    path = tmp / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    cmd = [str(binary), "generate", "--prompts", str(path), "--temperature", "0",
           "--max-new-tokens", str(args.max_new_tokens), "--weights", "f32", "--json"]
    if controlled:
        cmd += ["--toxic", args.toxic, "--nontoxic", args.nontoxic]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return [r["token_ids"] for r in sorted(rows, key=lambda r: r["prompt_index"])]


def pct(xs, q):
    return float(np.percentile(np.asarray(xs), q)) if len(xs) else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=str(GGUF))
    ap.add_argument("--addr", help="a running goodtriever serve; default: start one")
    ap.add_argument("--binary", help="goodtriever binary (default: target/release if fresh, else target/debug)")
    ap.add_argument("--toxic", default=str(REPO / "datastores" / "toxic"))
    ap.add_argument("--nontoxic", default=str(REPO / "datastores" / "nontoxic"))
    ap.add_argument("--prompts", default=str(REPO / "data" / "corpora" / "demo_prompts.jsonl"))
    ap.add_argument("--num-prompts", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--alpha", type=float, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--compare-runtime", action="store_true",
                    help="also run `goodtriever generate` (greedy, f32 weights) and compare tokens")
    ap.add_argument("--skip-key-check", action="store_true")
    ap.add_argument("--no-overlap", action="store_true",
                    help="send each step's request when the processor runs, not from the hook")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    binary = pick_binary(args.binary)
    gguf = Path(args.gguf)
    eos = gguf_eos(gguf)
    print(f"binary      {binary.relative_to(REPO) if binary.is_relative_to(REPO) else binary}")
    print(f"torch {torch.__version__}, transformers {__import__('transformers').__version__}, "
          f"{torch.get_num_threads()} threads")

    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32).eval()
    print(f"model       {gguf.name} -> {type(model).__name__}, hidden {model.config.hidden_size}, "
          f"vocab {model.config.vocab_size}, loaded and dequantised in {time.perf_counter() - t:.1f} s")

    server = None
    addr = args.addr
    if addr is None:
        t = time.perf_counter()
        server, addr = start_server(binary, args.toxic, args.nontoxic, [])
        print(f"server      {addr} (started in {time.perf_counter() - t:.1f} s)")
    try:
        client = Client(addr)
        info = client.info()
        print(f"stores      " + ", ".join(f"{s.name}: {s.rows} rows" for s in info.stores)
              + f"; key type {info.model.key_type}, model {info.model.model_id!r}; "
              f"alpha {info.defaults.alpha}, k {info.defaults.k}, T {info.defaults.temperature}")

        with tempfile.TemporaryDirectory() as tmpdir:
            tmp = Path(tmpdir)
            if not args.skip_key_check:
                r = key_check(model, tok, binary, args.toxic, REPO / "data" / "corpora" / "toxic.jsonl", eos, tmp)
                print("\n== key check: transformers' last_ffn_input vs the toxic store (our runtime's keys)")
                print(f"document    {r['text']!r} ({r['tokens']} positions)")
                print(f"nearest neighbour is the document's own row: {r['nearest_is_own_row']}/{r['tokens']}")
                print(f"squared L2 to it: median {r['d1_median']:.3g}, max {r['d1_max']:.3g}; "
                      f"to the 2nd neighbour: median {r['d2_median']:.3g}, min {r['d2_min']:.3g}; "
                      f"|key|^2 median {r['norm2_median']:.3g}")

            with open(args.prompts) as f:
                prompts = [json.loads(line)["prompt"] for line in f if line.strip()][: args.num_prompts]

            overrides = {} if args.alpha is None else {"alpha": args.alpha}
            proc = GoodtrieverLogitsProcessor(client, model, overlap=not args.no_overlap, **overrides)
            gen = dict(
                max_new_tokens=args.max_new_tokens, eos_token_id=eos, pad_token_id=eos,
                synced_gpus=False,  # Debian's torch 1.13 on Python 3.11 cannot import fsdp
            )
            if args.temperature > 0:
                gen.update(do_sample=True, temperature=args.temperature, top_p=0.9, top_k=0)
            else:
                gen.update(do_sample=False, temperature=None, top_p=None, top_k=None)

            print(f"\n== generation ({'greedy' if args.temperature == 0 else f'T={args.temperature}'}, "
                  f"{args.max_new_tokens} new tokens)")
            plain_ms, ctrl_ms, results = [], [], []
            for prompt in prompts:
                inputs = tok(prompt, add_special_tokens=False, return_tensors="pt")
                n = inputs.input_ids.shape[1]
                runs = {}
                for name, extra in (("plain", {}), ("controlled", {"logits_processor": [proc]})):
                    torch.manual_seed(args.seed)
                    proc.reset_timings()
                    t = time.perf_counter()
                    with torch.no_grad():
                        out = model.generate(**inputs, **gen, **extra)
                    dt = time.perf_counter() - t
                    new = out[0, n:].tolist()
                    (plain_ms if name == "plain" else ctrl_ms).append(1000 * dt / max(len(new), 1))
                    runs[name] = new
                    if name == "controlled":
                        hook_ms = [1000 * s for s in proc.step_seconds]
                        engine_us = list(proc.engine_micros)
                results.append((prompt, runs, hook_ms, engine_us))
                print(f"\nprompt      {prompt!r}")
                print(f"  plain       {tok.decode(runs['plain'])!r}")
                print(f"  controlled  {tok.decode(runs['controlled'])!r}")
                print(f"  hook per step: median {pct(hook_ms, 50):.1f} ms (server engine {pct(engine_us, 50) / 1000:.1f} ms)")
            proc.remove()

            all_hook = [x for r in results for x in r[2]]
            all_engine = [x / 1000 for r in results for x in r[3]]
            print("\n== latency per generated token (CPU, this machine's load)")
            print(f"plain generate       median {pct(plain_ms, 50):.1f} ms/token over {len(prompts)} prompts")
            print(f"controlled generate  median {pct(ctrl_ms, 50):.1f} ms/token")
            print(f"hook ({'sent from the hook' if proc.overlap else 'sent by the processor'}; waiting for "
                  f"the answer + applying the bias), {len(all_hook)} steps: p50 {pct(all_hook, 50):.1f} ms, "
                  f"p90 {pct(all_hook, 90):.1f} ms, max {max(all_hook):.1f} ms; "
                  f"of which the server's engine p50 {pct(all_engine, 50):.1f} ms")
            changed = sum(r[1]["plain"] != r[1]["controlled"] for r in results)
            print(f"continuations changed by the control: {changed}/{len(results)}")

            if args.compare_runtime:
                print("\n== our runtime (goodtriever generate, greedy, f32 weights) vs transformers")
                for controlled in (False, True):
                    ours = runtime_generate(binary, prompts, args, tmp, controlled)
                    key = "controlled" if controlled else "plain"
                    same = 0
                    for (prompt, runs, _, _), o in zip(results, ours):
                        hf = runs[key]
                        agree = next((i for i, (a, b) in enumerate(zip(hf, o)) if a != b), min(len(hf), len(o)))
                        same += hf == o
                        if hf != o:
                            print(f"  {key:10s} {prompt!r}: first {agree} tokens agree; ours continues "
                                  f"{tok.decode(o[agree:])!r}")
                    print(f"{key:10s} identical token ids: {same}/{len(prompts)}")
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)


if __name__ == "__main__":
    main()
