#!/usr/bin/env bash
# The project's whole test suite: what the README tells a new user to run, and what CI runs.
# Tests never download anything; tests that need the real model run when it is in the cache
# (`goodtriever model fetch` puts it there) and say that they skipped otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --locked --all-targets
