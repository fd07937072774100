#!/usr/bin/env bash
# The project's whole test suite: what the README tells a new user to run, and what CI runs.
# Tests never download anything; tests that need the real model run when it is in the cache
# (`goodtriever model fetch` puts it there) and say that they skipped otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
# One build of every test, with the Milvus store backend (feature `milvus`) in it: its tests
# (tests/milvus_store.rs) read the server's address from GOODTRIEVER_MILVUS
# (`scripts/milvus.sh start` runs one locally) and skip, saying so, when it is unset; with
# GOODTRIEVER_REQUIRE_MILVUS=1 (CI) they fail instead of skipping. Building the feature into
# this one run instead of a second `cargo test --features milvus` saves a whole rebuild of the
# crate and its tests (about 4.5 of CI's 41 minutes, measured on the 2-core box).
cargo test --locked --features milvus
# What `cargo test` does not build: the core alone, without candle and tonic (the feature split,
# docs/architecture.md §9), and the benchmark drivers (benches/), which must keep compiling.
cargo check --locked --lib --no-default-features
cargo test --locked --benches --no-run

# The loopback check that `scripts/milvus.sh stop` runs (CI fails when the server's traffic
# left loopback), on fake /proc trees with and without an address off loopback.
python3 scripts/milvus_loopback.py --self-test

# The Python client (clients/python) against a real `goodtriever serve`: the pytest fixtures
# start the server built above on a free loopback port themselves. The venv lives under the
# git-ignored .venv-client; torch/transformers are not installed, so the transformers test
# skips unless you add them to that venv.
python3 -m venv .venv-client
.venv-client/bin/pip install --quiet --disable-pip-version-check "./clients/python[test]"
(cd clients/python && GOODTRIEVER_BIN="$PWD/../../target/debug/goodtriever" \
    ../../.venv-client/bin/python -m pytest -q)

# The evaluation's metric code (EMT, toxicity probability, dist-n, perplexity) on hand-computed
# cases; pure Python, so the client's venv (which has pytest) runs it.
.venv-client/bin/python -m pytest -q -p no:cacheprovider scripts/eval/tests
