#!/usr/bin/env python3
"""Time llama.cpp (through llama-cpp-python) on the default GGUF with the same workloads as
`cargo bench --bench model`: prefill tokens/s at batch 1 and 8 with 128-token prompts, decode
tokens/s at batch 1 and 25 (one 16-token prompt copied to 25 sequences), on all CPU threads.

Usage:
    python3 -m venv .venv-llama && .venv-llama/bin/pip install llama-cpp-python numpy
    .venv-llama/bin/python scripts/bench/bench_llamacpp.py [--model PATH] [--reps 3]

Uses llama.cpp's low-level batch API, so batched rows are one llama_decode call per step, as
in our runtime.
"""

import argparse
import ctypes
import os
import statistics
import time

import llama_cpp as L


def default_model():
    home = os.environ.get("GOODTRIEVER_HOME") or os.path.expanduser("~/.cache/goodtriever")
    return os.path.join(home, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")


def tokens(n, salt):
    # The same synthetic ids as benches/model.rs.
    return [300 + (i * 7919 + salt * 104729) % 40000 for i in range(n)]


class Runner:
    def __init__(self, path, threads):
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        cp = L.llama_context_default_params()
        cp.n_ctx = 4096
        cp.n_batch = 1024
        cp.n_ubatch = 1024
        cp.n_seq_max = 32
        cp.n_threads = threads
        cp.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.mem = L.llama_get_memory(self.ctx)
        self.batch = L.llama_batch_init(1024, 0, 32)

    def decode(self, entries):
        """entries: list of (token, pos, seq, want_logits)."""
        b = self.batch
        b.n_tokens = len(entries)
        for i, (tok, pos, seq, logits) in enumerate(entries):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = 1 if logits else 0
        rc = L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def clear(self):
        L.llama_memory_clear(self.mem, True)

    def prefill(self, batch, length):
        self.clear()
        entries = []
        for s in range(batch):
            toks = tokens(length, s)
            entries += [(t, p, s, p == length - 1) for p, t in enumerate(toks)]
        t = time.perf_counter()
        self.decode(entries)
        return time.perf_counter() - t

    def decode_steps(self, batch, steps):
        self.clear()
        prompt = tokens(16, 1)
        self.decode([(t, p, 0, p == 15) for p, t in enumerate(prompt)])
        for s in range(1, batch):
            L.llama_memory_seq_cp(self.mem, 0, s, -1, -1)
        nxt = [500] * batch
        t = time.perf_counter()
        for step in range(steps):
            self.decode([(nxt[r], 16 + step, r, True) for r in range(batch)])
            nxt = [300 + (step * 31 + r * 17) % 30000 for r in range(batch)]
        return (time.perf_counter() - t) / steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=default_model())
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    r = Runner(args.model, args.threads)
    r.prefill(1, 16)
    r.decode_steps(1, 3)
    med = lambda f: statistics.median(f() for _ in range(args.reps))
    p1 = 128 / med(lambda: r.prefill(1, 128))
    p8 = 8 * 128 / med(lambda: r.prefill(8, 128))
    d1 = med(lambda: r.decode_steps(1, 32))
    d25 = med(lambda: r.decode_steps(25, 16))
    print(f"llama.cpp {L.__version__} | {args.threads} threads | {args.reps} repetitions, medians")
    print(
        f"llama.cpp prefill b1 {p1:.0f} tok/s | prefill b8 {p8:.0f} tok/s | "
        f"decode b1 {d1 * 1e3:.1f} ms ({1 / d1:.0f} t/s) | decode b25 {d25 * 1e3:.1f} ms ({25 / d25:.0f} t/s)"
    )


if __name__ == "__main__":
    main()
