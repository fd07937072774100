#!/usr/bin/env python3
"""Compare goodtriever's per-token log-probabilities with llama.cpp's on the same GGUF file.

llama.cpp is an independent implementation of the llama forward pass (and of the Q4_1 kernels),
so agreement on a few hundred tokens of ordinary English checks our forward, RoPE variant,
tokenizer and weight conversion at once.

Usage (llama-cpp-python builds llama.cpp from source; this takes a while on 2 cores):
    python3 -m venv .venv-llama && .venv-llama/bin/pip install llama-cpp-python numpy
    cargo build --release
    .venv-llama/bin/python scripts/bench/compare_llamacpp.py [--model PATH] [--weights native]

It prints, for each weight format asked for, the token agreement, the mean and max absolute
difference of per-token log-probabilities, and both per-token NLLs, and exits non-zero unless
the token ids are identical, mean |Δ log p| ≤ 0.08 nats and |Δ NLL| ≤ 0.02 nats per token.
The per-token noise floor comes from llama.cpp's own approximations (f16 KV cache, 8-bit
activations): even our F32 path, which has neither, differs from it by ~0.04 nats per token on
average, while the mean over the text agrees to ~0.001-0.01.
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np

TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
    "from 1887 to 1889. Locally nicknamed \"La dame de fer\" (French for \"Iron Lady\"), it was "
    "constructed as the centrepiece of the 1889 World's Fair, and to crown the centennial "
    "anniversary of the French Revolution. Although initially criticised by some of France's "
    "leading artists and intellectuals for its design, it has since become a global cultural "
    "icon of France and one of the most recognisable structures in the world. The tower received "
    "5,889,000 visitors in 2022. The Eiffel Tower is the most visited monument with an entrance "
    "fee in the world: 6.91 million people ascended it in 2015. It was designated a monument "
    "historique in 1964, and was named part of a UNESCO World Heritage Site (\"Paris, Banks of "
    "the Seine\") in 1991. The tower is 330 metres tall, about the same height as an 81-storey "
    "building, and the tallest structure in Paris. Its base is square, measuring 125 metres on "
    "each side. During its construction, the Eiffel Tower surpassed the Washington Monument to "
    "become the tallest human-made structure in the world, a title it held for 41 years until "
    "the Chrysler Building in New York City was finished in 1930."
)


def default_model():
    home = os.environ.get("GOODTRIEVER_HOME") or os.path.expanduser("~/.cache/goodtriever")
    return os.path.join(home, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")


def ours(binary, model, weights, text):
    out = subprocess.run(
        [binary, "model", "score", "--model", model, "--weights", weights, "--json", "--text", text],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out)


def llamacpp_logprobs(llm, tokens):
    llm.reset()
    llm.eval(tokens)
    scores = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    m = scores.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(scores - m).sum(axis=1))
    return np.array([scores[i, tokens[i + 1]] - lse[i] for i in range(len(tokens) - 1)])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=default_model())
    ap.add_argument("--binary", default="target/release/goodtriever")
    ap.add_argument("--weights", default="native,q8_0,f32", help="comma-separated weight formats")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()

    from llama_cpp import Llama

    llm = Llama(
        model_path=args.model,
        n_ctx=1024,
        n_batch=512,
        n_threads=args.threads,
        logits_all=True,
        verbose=False,
    )
    ref_tokens = llm.tokenize(TEXT.encode(), add_bos=False, special=False)
    failed = False
    for weights in args.weights.split(","):
        res = ours(args.binary, args.model, weights, TEXT)
        tokens = res["tokens"]
        same_tokens = tokens == ref_tokens
        theirs = llamacpp_logprobs(llm, tokens)
        mine = np.array(res["logprobs"], dtype=np.float64)
        d = np.abs(mine - theirs)
        nll_mine, nll_theirs = -mine.mean(), -theirs.mean()
        ok = same_tokens and d.mean() <= 0.08 and abs(nll_mine - nll_theirs) <= 0.02
        failed |= not ok
        print(
            f"{weights:<7} tokens {len(tokens)} (same as llama.cpp: {same_tokens}) | "
            f"|Δ log p| mean {d.mean():.4f} max {d.max():.4f} | "
            f"NLL ours {nll_mine:.4f} llama.cpp {nll_theirs:.4f} | "
            f"{'OK' if ok else 'FAIL'} (tolerance: mean 0.08, NLL 0.02)"
        )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
