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


# --- The OpenAI-compatible HTTP API (`serve --model ... --http ...`) on the tiny model ---

TINY_NAME = "tiny"
TINY_WORDS = "hello the world cat sat on mat rain over hill bright stone river quiet moon road".split()


def _tiny_model_writer() -> Path:
    """The `tiny_model` example (`cargo test` builds it next to the binary's directory)."""
    path = Path(os.environ.get("GOODTRIEVER_TINY_MODEL_BIN", _binary().parent / "examples" / "tiny_model"))
    if not path.exists():
        pytest.fail(f"{path} does not exist: run `cargo build --example tiny_model` first, or set GOODTRIEVER_TINY_MODEL_BIN")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny random llama (ChatML template included) as a GGUF file, written by Rust."""
    out = tmp_path_factory.mktemp("tiny") / f"{TINY_NAME}.gguf"
    subprocess.run([str(_tiny_model_writer()), str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def tiny_stores(tmp_path_factory, binary, tiny_model):
    """A toxic and a non-toxic store built from text by `goodtriever datastore build` with the
    tiny model, so they carry its fingerprint."""
    root = tmp_path_factory.mktemp("tiny_stores")
    rng = np.random.default_rng(0)
    dirs = {}
    for name in ("toxic", "nontoxic"):
        texts = root / f"{name}.txt"
        texts.write_text("\n".join(" ".join(rng.choice(TINY_WORDS, size=12)) for _ in range(20)) + "\n")
        subprocess.run(
            [str(binary), "datastore", "build", "--input", str(texts), "--out", str(root / name),
             "--model", str(tiny_model), "--window", "32", "--stride", "16"],
            check=True,
            capture_output=True,
        )
        dirs[name] = root / name
    return dirs


class ServedHttp:
    def __init__(self, proc: subprocess.Popen, base_url: str, metrics: str):
        self.proc, self.base_url, self.metrics = proc, base_url, metrics


def start_http_server(binary: Path, model: Path, stores, *args: str) -> ServedHttp:
    """`goodtriever serve --model MODEL --http 127.0.0.1:0 --no-grpc` on free loopback ports,
    waiting for its `listening ... http=ADDR` line. Stop it with `stop_server`."""
    proc = subprocess.Popen(
        [
            str(binary), "serve", "--toxic", str(stores["toxic"]), "--nontoxic", str(stores["nontoxic"]),
            "--model", str(model), "--http", "127.0.0.1:0", "--no-grpc",
            "--metrics-addr", "127.0.0.1:0", "--k", "16", "--temperature", "10", "--filter-p", "1", "--exact", *args,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if not line.startswith("listening"):
        proc.kill()
        pytest.fail(f"goodtriever serve --http did not start: {line!r}")
    fields = dict(w.split("=", 1) for w in line.split()[1:])
    assert fields["grpc"] == "off", line
    return ServedHttp(proc, f"http://{fields['http']}/v1", fields["metrics"])
