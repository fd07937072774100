"""Builds the measurement drivers in benches/drivers/ (Cargo.toml `[[bench]]` targets with
`harness = false`) and finds their executables, for the benchmark scripts beside this file.

`cargo bench --no-run --bench NAME` builds a driver in the bench profile (the release settings)
and prints nothing about where the executable went except in its JSON messages, so this reads
them: the `compiler-artifact` message of each bench target carries its `executable` path.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def build_drivers(*names: str) -> dict[str, Path]:
    """Builds the named drivers with one `cargo bench --no-run` (a no-op when they are fresh)
    and returns each name's executable. Compiler diagnostics go to stderr as usual."""
    cmd = ["cargo", "bench", "--no-run", "--message-format=json-render-diagnostics"]
    for name in names:
        cmd += ["--bench", name]
    out = subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.PIPE, text=True).stdout
    exes: dict[str, Path] = {}
    for line in out.splitlines():
        msg = json.loads(line)
        target = msg.get("target", {})
        if (msg.get("reason") == "compiler-artifact" and "bench" in target.get("kind", [])
                and target.get("name") in names and msg.get("executable")):
            exes[target["name"]] = Path(msg["executable"])
    missing = [n for n in names if n not in exes]
    if missing:
        sys.exit(f"`{' '.join(cmd)}` reported no executable for {', '.join(missing)}")
    return exes
