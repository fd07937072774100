#!/usr/bin/env python3
"""Load run of the OpenAI-compatible HTTP API (`goodtriever serve --model ... --http ...`):
N (default 16) concurrent streaming clients, then the same clients one at a time, with the
control on (the server's stores) and off (`"goodtriever": {"alpha": 0}`).

Reports, per configuration: tokens/s in total and per client, and p50/p99 of the time to first
token and of the time per output token (from each client's own SSE chunks, so it is what a
client sees). Each client sends a streaming completion of --max-tokens tokens with its own
seed; prompts cycle through a small fixed list.

On the real model and the default stores (what the issue asks for):

    scripts/bench/bench_http_load.py --toxic datastores/toxic --nontoxic datastores/nontoxic

(`--model` defaults to the cached default model). On the tiny test model, to check the script
(`--tiny` writes it and builds two small stores with `datastore build`):

    scripts/bench/bench_http_load.py --tiny --clients 4 --max-tokens 16

Only the Python standard library is used. The binary is $GOODTRIEVER_BIN or
target/release/goodtriever (target/debug with --debug).
"""

import argparse
import http.client
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROMPTS = [
    "I think you are",
    "The people in this city",
    "My neighbour told me that",
    "When I saw him I said",
    "The best thing about the internet is",
    "She looked at the crowd and",
]
TINY_WORDS = "hello the world cat sat on mat rain over hill bright stone river quiet moon road".split()


def binary(debug: bool) -> Path:
    default = REPO / "target" / ("debug" if debug else "release") / "goodtriever"
    path = Path(os.environ.get("GOODTRIEVER_BIN", default))
    if not path.exists():
        sys.exit(f"{path} does not exist: build it with `cargo build {'' if debug else '--release '}--bin goodtriever`")
    return path


def tiny_fixture(bin_path: Path, work: Path, debug: bool):
    """The tiny model (the `tiny_model` example) and two stores built from random word text."""
    example = bin_path.parent / "examples" / "tiny_model"
    if not example.exists():
        subprocess.run(["cargo", "build", "--example", "tiny_model"] + ([] if debug else ["--release"]), cwd=REPO, check=True)
    model = work / "tiny.gguf"
    subprocess.run([str(example), str(model)], check=True, capture_output=True)
    rng = random.Random(0)
    stores = {}
    for name in ("toxic", "nontoxic"):
        text = work / f"{name}.txt"
        text.write_text("\n".join(" ".join(rng.choice(TINY_WORDS) for _ in range(16)) for _ in range(40)) + "\n")
        subprocess.run(
            [str(bin_path), "datastore", "build", "--input", str(text), "--out", str(work / name),
             "--model", str(model), "--window", "32", "--stride", "16"],
            check=True, capture_output=True,
        )
        stores[name] = work / name
    return model, stores


def start(bin_path: Path, args, model, stores):
    cmd = [
        str(bin_path), "serve", "--toxic", str(stores["toxic"]), "--nontoxic", str(stores["nontoxic"]),
        "--http", "127.0.0.1:0", "--no-grpc", "--metrics-addr", "127.0.0.1:0",
        "--http-batch-rows", str(max(args.clients, 1)), "--http-queue", str(max(2 * args.clients, 1)),
        "--served-model-name", "bench",
    ]
    if model:
        cmd += ["--model", str(model)]
    cmd += args.serve_arg
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("listening"):
        proc.kill()
        sys.exit(f"serve did not start: {line!r}")
    fields = dict(w.split("=", 1) for w in line.split()[1:])
    host, port = fields["http"].rsplit(":", 1)
    return proc, host, int(port)


def one_client(host, port, i, args, alpha, out):
    """One streaming completion; appends (tokens, ttft, [gaps between chunks], total)."""
    body = {
        "model": "bench", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.max_tokens,
        "temperature": 1.0, "top_p": 0.9, "seed": 1000 + i, "stream": True,
        "stream_options": {"include_usage": True},
    }
    if alpha is not None:
        body["goodtriever"] = {"alpha": alpha}
    conn = http.client.HTTPConnection(host, port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    first, times, tokens = None, [], 0
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
            continue
        if any(c.get("text") for c in chunk["choices"]):
            now = time.perf_counter()
            first = first if first is not None else now
            times.append(now)
    total = time.perf_counter() - t0
    conn.close()
    gaps = [b - a for a, b in zip(times, times[1:])]
    out.append((tokens, (first - t0) if first else total, gaps, total))


def run_config(host, port, args, alpha, concurrent: bool):
    results = []
    t0 = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=one_client, args=(host, port, i, args, alpha, results)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i in range(args.clients):
            one_client(host, port, i, args, alpha, results)
    wall = time.perf_counter() - t0
    if len(results) != args.clients:
        raise RuntimeError(f"{args.clients - len(results)} clients failed")
    tokens = sum(r[0] for r in results)
    ttft = sorted(r[1] for r in results)
    gaps = sorted(g for r in results for g in r[2])
    q = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")
    return {
        "clients": args.clients,
        "concurrent": concurrent,
        "control": alpha is None,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s_total": tokens / wall,
        "tokens_per_s_per_client": statistics.mean(r[0] / r[3] for r in results),
        "ttft_p50_ms": 1e3 * q(ttft, 0.5),
        "ttft_p99_ms": 1e3 * q(ttft, 0.99),
        "tpot_p50_ms": 1e3 * q(gaps, 0.5),
        "tpot_p99_ms": 1e3 * q(gaps, 0.99),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--model", type=Path, help="GGUF model (default: the cached default model)")
    ap.add_argument("--toxic", type=Path, default=REPO / "datastores" / "toxic")
    ap.add_argument("--nontoxic", type=Path, default=REPO / "datastores" / "nontoxic")
    ap.add_argument("--tiny", action="store_true", help="the tiny test model and small stores (checks the script)")
    ap.add_argument("--debug", action="store_true", help="use target/debug")
    ap.add_argument("--serve-arg", action="append", default=[], help="extra flag for serve (repeatable)")
    ap.add_argument("--json", action="store_true", help="print one JSON object per configuration")
    args = ap.parse_args()
    bin_path = binary(args.debug)
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            model, stores = tiny_fixture(bin_path, Path(tmp), args.debug)
        else:
            model, stores = args.model, {"toxic": args.toxic, "nontoxic": args.nontoxic}
            for s in stores.values():
                if not (s / "manifest.json").exists():
                    sys.exit(f"no datastore at {s}: build the default stores first (scripts/demo.sh)")
        proc, host, port = start(bin_path, args, model, stores)
        try:
            # Warm-up: one short request so the first measurement does not pay page faults.
            warm = argparse.Namespace(**{**vars(args), "max_tokens": 4})
            one_client(host, port, 0, warm, None, [])
            rows = []
            for alpha in (None, 0):
                for concurrent in (True, False):
                    rows.append(run_config(host, port, args, alpha, concurrent))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}"
    if args.json:
        for r in rows:
            print(json.dumps({**r, "machine": machine, "max_tokens": args.max_tokens}))
        return
    print(f"# HTTP load: {args.clients} clients × {args.max_tokens} tokens, {machine}")
    print(f"{'control':8} {'mode':11} {'tok/s':>8} {'tok/s/cl':>9} {'ttft p50':>9} {'ttft p99':>9} {'tpot p50':>9} {'tpot p99':>9}  (ms)")
    for r in rows:
        print(
            f"{'on' if r['control'] else 'off':8} {'concurrent' if r['concurrent'] else 'one-by-one':11} "
            f"{r['tokens_per_s_total']:8.1f} {r['tokens_per_s_per_client']:9.1f} {r['ttft_p50_ms']:9.1f} "
            f"{r['ttft_p99_ms']:9.1f} {r['tpot_p50_ms']:9.2f} {r['tpot_p99_ms']:9.2f}"
        )


if __name__ == "__main__":
    main()
