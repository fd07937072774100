"""Fixtures: tiny datastores made with `goodtriever datastore import`, and a real
`goodtriever serve` on a free loopback port, started and stopped (SIGTERM) by the tests.

The binary is $GOODTRIEVER_BIN, or target/debug/goodtriever in the repository (scripts/test.sh
builds it with `cargo test` before running pytest).
"""

import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[3]
DIM = 16
VOCAB = 200
TOKEN = "python-test-token"


def _binary() -> Path:
    path = Path(os.environ.get("GOODTRIEVER_BIN", REPO / "target" / "debug" / "goodtriever"))
    if not path.exists():
        pytest.fail(f"{path} does not exist: run `cargo build --bin goodtriever` first, or set GOODTRIEVER_BIN")
    return path


def make_keys(rows: int, seed: int):
    """Keys around four cluster centres; each cluster predicts its own band of tokens."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-3, 3, size=(4, DIM)).astype(np.float32)
    cluster = np.arange(rows) % 4
    keys = centres[cluster] + rng.uniform(-0.25, 0.25, size=(rows, DIM)).astype(np.float32)
    values = (cluster * 40 + rng.integers(0, 30, size=rows)) % VOCAB
    return keys.astype(np.float32), values.astype(np.int64)


@pytest.fixture(scope="session")
def binary() -> Path:
    return _binary()


def import_store(binary: Path, directory: Path, keys: np.ndarray, values: np.ndarray, *, model_id: str = "tiny-test", label: str = "") -> Path:
    """Writes keys [N, D] and next-token values [N] to .npy files beside `directory` and imports
    them with `goodtriever datastore import` (f32 keys)."""
    directory = Path(directory)
    np.save(directory.parent / f"{directory.name}_keys.npy", np.ascontiguousarray(keys, dtype=np.float32))
    np.save(directory.parent / f"{directory.name}_values.npy", np.asarray(values, dtype=np.int64))
    subprocess.run(
        [
            str(binary), "datastore", "import",
            "--keys", str(directory.parent / f"{directory.name}_keys.npy"),
            "--values", str(directory.parent / f"{directory.name}_values.npy"),
            "--model-id", model_id, "--dtype", "f32", "--label", label or directory.name, str(directory),
        ],
        check=True,
        capture_output=True,
    )
    return directory


@pytest.fixture(scope="session")
def stores(tmp_path_factory, binary):
    root = tmp_path_factory.mktemp("stores")
    dirs = {}
    for name, seed in (("toxic", 1), ("nontoxic", 2)):
        keys, values = make_keys(300, seed)
        dirs[name] = import_store(binary, root / name, keys, values, label=name)
    return dirs


class Served:
    def __init__(self, proc: subprocess.Popen, grpc: str, metrics: str):
        self.proc, self.grpc, self.metrics = proc, grpc, metrics


def start_server(
    binary: Path, toxic: Path, nontoxic: Path, *args: str, env=None, addr: str = "127.0.0.1:0"
) -> Served:
    """`goodtriever serve` on free loopback ports (gRPC and metrics) or the gRPC `addr` given,
    waiting for its `listening grpc=... metrics=...` line. Stop it with `stop_server`."""
    proc = subprocess.Popen(
        [
            str(binary), "serve", "--toxic", str(toxic), "--nontoxic", str(nontoxic),
            "--addr", addr, "--metrics-addr", "127.0.0.1:0", *args,
        ],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    line = proc.stdout.readline()
    if not line.startswith("listening"):
        proc.kill()
        pytest.fail(f"goodtriever serve did not start: {line!r}")
    fields = dict(w.split("=", 1) for w in line.split()[1:])
    return Served(proc, fields["grpc"], fields["metrics"])


def stop_server(served: Served) -> None:
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=60) == 0, "serve did not exit cleanly on SIGTERM"


@pytest.fixture(scope="module")
def server(stores, binary):
    env = dict(os.environ, GOODTRIEVER_ADMIN_TOKEN=TOKEN)
    served = start_server(
        binary, stores["toxic"], stores["nontoxic"],
        "--vocab-size", str(VOCAB), "--k", "32", "--temperature", "10", "--exact",
        env=env,
    )
    yield served
    stop_server(served)
