#!/usr/bin/env bash
# The whole toxicity evaluation (issue 6) from one command, on a machine where the README's
# main command (scripts/demo.sh) has run once: it needs the release binary, the default model,
# the prepared corpora (with .venv-data) and the default datastores. Everything it writes goes
# to git-ignored eval-out/; docs/evaluation.md explains every table.
#
#   scripts/eval/evaluate_all.sh          # the full setting: hours on 2 cores
#   scripts/eval/evaluate_all.sh --quick  # base vs Goodtriever at the defaults only, ~10 min
#                                         # on 2 cores: what CI runs (numbers not asserted)
#
# Steps: prompts (scripts/data/make_prompts.py, once) -> base vs controlled
# (scripts/eval/evaluate.py) -> knob sweeps and the diversity study (scripts/eval/sweep.py)
# -> the drift run (scripts/eval/drift.py, only when the Davidson tweets are in ../shared/data).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

quick=0
case "${1:-}" in
  --quick) quick=1 ;;
  "") ;;
  *) echo "usage: scripts/eval/evaluate_all.sh [--quick]" >&2; exit 2 ;;
esac

step() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }
for need in target/release/goodtriever datastores/toxic/manifest.json \
  datastores/nontoxic/manifest.json data/corpora/manifest.json; do
  if [[ ! -e $need ]]; then
    echo "evaluate_all: $need is missing; run scripts/demo.sh (the README's main command) first" >&2
    exit 1
  fi
done

if [[ ! -f data/prompts.jsonl ]]; then
  step "prompts (scripts/data/make_prompts.py)"
  python3 scripts/data/make_prompts.py
fi

if ((quick)); then
  step "base vs Goodtriever at the defaults, quick setting -> eval-out/quick"
  python3 scripts/eval/evaluate.py --quick --out eval-out/quick
  exit 0
fi

step "base vs Goodtriever at the defaults, full setting -> eval-out/full"
python3 scripts/eval/evaluate.py --out eval-out/full
step "knob sweeps: alpha, k, T, toxic store size, toxic-only -> eval-out/sweep"
python3 scripts/eval/sweep.py --groups alpha,k,T,size,mode --out eval-out/sweep
step "diversity study: the two nuclei, alpha -> eval-out/diversity"
python3 scripts/eval/sweep.py --groups sampling,alpha-sampling --out eval-out/diversity
if [[ -f ../shared/data/davidson/labeled_data.csv ]]; then
  step "drift: Davidson hate / offensive domains added one at a time -> eval-out/drift"
  python3 scripts/eval/drift.py --out eval-out/drift
else
  echo "evaluate_all: ../shared/data/davidson is absent: skipping the drift run" >&2
fi
