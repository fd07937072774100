#!/usr/bin/env python3
"""Load benchmark of `goodtriever serve`: steps/s and per-step p50/p99 latency for 1, 8 and 64
concurrent decoding streams, sparse versus dense answers, and the overhead of the gRPC path
over calling the engine in-process on the same stores and queries.

Everything stays on loopback and is bounded: each configuration runs at most --seconds and at
most --max-steps steps per stream. Steps:

1. Builds (once, cached in --work-dir) two datastores of --rows rows each (default 200k,
   D = 576, f16 keys, the shape of SmolLM2-135M's hidden states), clustered so that HNSW is
   meaningful, with `goodtriever datastore import`.
2. Starts `goodtriever serve` on a free loopback port (or a Unix socket in a temporary directory).
3. Runs the Rust load generator (benches/drivers/bench_server_load.rs, built by `cargo bench
   --no-run`) which drives N AdjustStream sessions with tonic, then calls the engine in-process
   with the same queries.
4. At 1 stream, runs benches/drivers/bench_socket_floor.rs: a blocking ping-pong over a bare
   socket of the same transport with the same message sizes and the server busy for the
   in-process p50, the floor under any RPC stack's overhead on this machine.
5. Optionally (--python) times the Python client too, for one stream.

By default every form runs over loopback TCP and the sparse form also over a Unix domain
socket (`serve --addr unix:PATH`), the transport for a sidecar on the same host.

Usage: scripts/bench/bench_server.py [--rows 200000] [--seconds 10] [--streams 1 8 64]
                               [--transports tcp unix] [--repeat N]
"""

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cargo_bench import build_drivers

REPO = Path(__file__).resolve().parents[2]
DIM = 576
VOCAB = 49152


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def make_store_data(rows, seed, centres):
    rng = np.random.default_rng(seed)
    cluster = rng.integers(0, len(centres), size=rows)
    keys = centres[cluster] + rng.normal(0, 0.6, size=(rows, DIM)).astype(np.float32)
    # Each cluster predicts from its own band of tokens, as real contexts would.
    values = (cluster * 97 + rng.integers(0, 500, size=rows)) % VOCAB
    return keys.astype(np.float16), values.astype(np.int64)


def build_stores(binary, work, rows):
    centres = np.random.default_rng(0).normal(0, 2.0, size=(256, DIM)).astype(np.float32)
    dirs = {}
    for name, seed in (("toxic", 1), ("nontoxic", 2)):
        d = work / f"{name}-{rows}"
        dirs[name] = d
        if (d / "manifest.json").exists():
            continue
        keys, values = make_store_data(rows, seed, centres)
        np.save(work / f"{name}_keys.npy", keys)
        np.save(work / f"{name}_values.npy", values)
        t = time.time()
        log(f"importing {rows} rows into {d} (builds the HNSW index)...")
        subprocess.run(
            [str(binary), "datastore", "import", "--keys", str(work / f"{name}_keys.npy"),
             "--values", str(work / f"{name}_values.npy"), "--model-id", "bench",
             "--dtype", "f16", "--label", name, str(d)],
            check=True,
        )
        log(f"  {time.time() - t:.0f} s")
    queries = work / "queries.npy"
    if not queries.exists():
        rng = np.random.default_rng(3)
        q = centres[rng.integers(0, len(centres), size=4096)] + rng.normal(0, 0.6, size=(4096, DIM))
        np.save(queries, q.astype(np.float32))
    return dirs, queries


def start_server(binary, dirs, extra, addr="127.0.0.1:0"):
    proc = subprocess.Popen(
        [str(binary), "serve", "--toxic", str(dirs["toxic"]), "--nontoxic", str(dirs["nontoxic"]),
         "--addr", addr, "--no-metrics", "--vocab-size", str(VOCAB),
         "--max-rows", "64", "--max-message-bytes", str(64 << 20), *extra],
        stdout=subprocess.PIPE, text=True,
    )
    line = proc.stdout.readline()
    if not line.startswith("listening"):
        proc.kill()
        raise SystemExit(f"serve did not start: {line!r}")
    return proc, line.split()[1].split("=", 1)[1]


def guest_halt_poll_ns():
    """The guest kernel's halt-polling limit (KVM guests with the haltpoll cpuidle driver), or
    None where there is no such setting."""
    try:
        return int(Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns").read_text())
    except (OSError, ValueError):
        return None


def python_client_steps(addr, queries, seconds, max_steps):
    sys.path.insert(0, str(REPO / "clients" / "python"))
    from goodtriever_client import Client

    q = np.load(queries)
    lat = []
    with Client(addr) as c, c.session() as s:
        end = time.time() + seconds
        for i in range(max_steps):
            if time.time() > end:
                break
            t = time.perf_counter()
            s.step(q[i % len(q)])
            lat.append(time.perf_counter() - t)
    lat = np.array(lat) * 1e6
    return {"steps": len(lat), "p50_us": float(np.percentile(lat, 50)),
            "p99_us": float(np.percentile(lat, 99))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--seconds", type=float, default=10.0, help="per configuration")
    ap.add_argument("--max-steps", type=int, default=2000, help="per stream and configuration")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--forms", nargs="+", default=["sparse", "dense"])
    ap.add_argument("--transports", nargs="+", default=["tcp", "unix"], choices=["tcp", "unix"],
                    help="loopback TCP, and a Unix domain socket (serve --addr unix:PATH)")
    ap.add_argument("--unix-forms", nargs="+", default=["sparse"],
                    help="forms measured over the Unix socket (the hot-path form by default)")
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--exact", action="store_true", help="exact search instead of HNSW")
    ap.add_argument("--work-dir", type=Path, default=REPO / "target" / "bench-server")
    ap.add_argument("--python", action="store_true", help="also time the Python client (1 stream)")
    ap.add_argument("--out", type=Path, help="write the results as JSON")
    ap.add_argument("--serve-args", default="",
                    help="extra arguments for `goodtriever serve`, e.g. \"--concurrent-steps 1\"")
    ap.add_argument("--client-current-thread", action="store_true",
                    help="the load generator drives its streams from one thread (current-thread runtime)")
    ap.add_argument("--server-binary", type=Path,
                    help="serve with this goodtriever build instead of the tree's (to compare builds)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the whole sweep this many times, round-robin, and report medians "
                         "(one run's p50 moves by tens of µs with a shared host's noise)")
    ap.add_argument("--prepare-only", action="store_true", help="build the stores and stop")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")

    args.work_dir.mkdir(parents=True, exist_ok=True)
    log("building goodtriever and the load generator (release)...")
    subprocess.run(["cargo", "build", "--release", "--bin", "goodtriever"], cwd=REPO, check=True)
    drivers = build_drivers("bench_server_load", "bench_socket_floor")
    binary = REPO / "target" / "release" / "goodtriever"
    loadgen = drivers["bench_server_load"]
    floor_bin = drivers["bench_socket_floor"]
    dirs, queries = build_stores(binary, args.work_dir, args.rows)
    if args.prepare_only:
        return
    if args.server_binary:
        binary = args.server_binary.resolve()

    search = ["--exact"] if args.exact else []
    results = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
        "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
        # Whether idle vCPUs poll before halting decides most of the one-stream floor on a VM.
        "guest_halt_poll_ns": guest_halt_poll_ns(),
        "rows_per_store": args.rows, "dim": DIM, "vocab": VOCAB, "k": args.k,
        "search": "exact" if args.exact else "auto (HNSW)", "runs": [],
        "server_binary": str(binary),
    }
    log(f"guest halt polling: {results['guest_halt_poll_ns']} ns (None: no such setting)")
    # Repeating the whole sweep round-robin, not each configuration back to back, spreads every
    # configuration over the same stretch of the host's noise.
    for rep in range(args.repeat):
        if args.repeat > 1:
            log(f"round {rep + 1} of {args.repeat}")
        run_sweep(args, binary, loadgen, floor_bin, dirs, queries, search, results)

    print_table(summarise(results["runs"]), args.repeat)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


def run_sweep(args, binary, loadgen, floor_bin, dirs, queries, search, results):
    """One run of every configuration, each transport against a freshly started server."""
    for transport in args.transports:
        # Socket paths are limited to ~107 bytes; a fresh short temporary directory holds it.
        sock_dir = tempfile.TemporaryDirectory(prefix="gt-bench-")
        listen = "127.0.0.1:0" if transport == "tcp" else f"unix:{sock_dir.name}/serve.sock"
        forms = args.forms if transport == "tcp" else [f for f in args.forms if f in args.unix_forms]
        proc, addr = start_server(binary, dirs, ["--k", str(args.k), *search, *args.serve_args.split()],
                                  listen)
        try:
            for form in forms:
                for n in args.streams:
                    cmd = [str(loadgen), "--addr", addr, "--toxic", str(dirs["toxic"]),
                           "--nontoxic", str(dirs["nontoxic"]), "--queries", str(queries),
                           "--streams", str(n), "--form", form, "--seconds", str(args.seconds),
                           "--max-steps", str(args.max_steps), "--k", str(args.k),
                           "--vocab", str(VOCAB), *search,
                           *(["--current-thread"] if args.client_current_thread else [])]
                    log(f"{transport}, {form}, {n} stream(s)...")
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                    r = json.loads(out)
                    r["transport"] = transport
                    results["runs"].append(r)
                    log(f"  grpc {r['grpc']['steps_per_s']:.0f} steps/s p50 {r['grpc']['p50_us']:.0f} us "
                        f"p99 {r['grpc']['p99_us']:.0f} us | in-process p50 {r['in_process']['p50_us']:.0f} us "
                        f"| overhead p50 {r['overhead_p50_us']:.0f} us p99 {r['overhead_p99_us']:.0f} us")
                    if n == 1:
                        # The same message sizes and server time over a bare socket: what any
                        # RPC stack pays on this machine before its own cost.
                        fl = json.loads(subprocess.run(
                            [str(floor_bin), "--transport", transport,
                             "--compute-us", str(int(r["in_process"]["p50_us"])),
                             "--request-bytes", str(r["request_bytes"]),
                             "--response-bytes", str(max(r["response_bytes"], 1)),
                             "--steps", "2000"],
                            check=True, capture_output=True, text=True).stdout)
                        r["socket_floor"] = fl
                        log(f"  bare-socket floor p50 {fl['overhead_p50_us']:.0f} us")
            if args.python and transport == "tcp":
                py = python_client_steps(addr, queries, args.seconds, args.max_steps)
                results.setdefault("python_client_1_stream_sparse", []).append(py)
                log(f"python client: {py}")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            sock_dir.cleanup()


def summarise(runs):
    """Runs grouped by configuration, in first-seen order: the median of each figure over the
    group's runs, keeping every run's overhead p50 and floor for their range."""
    groups = {}
    for r in runs:
        groups.setdefault((r["transport"], r["form"], r["streams"]), []).append(r)
    rows = []
    for (transport, form, streams), rs in groups.items():
        med = lambda f: float(np.median([f(r) for r in rs]))
        row = {
            "transport": transport, "form": form, "streams": streams,
            "steps_per_s": med(lambda r: r["grpc"]["steps_per_s"]),
            "p50_us": med(lambda r: r["grpc"]["p50_us"]),
            "p99_us": med(lambda r: r["grpc"]["p99_us"]),
            "in_process_p50_us": med(lambda r: r["in_process"]["p50_us"]),
            "in_process_steps_per_s": med(lambda r: r["in_process"]["steps_per_s"]),
            "overhead_p50_us": [r["overhead_p50_us"] for r in rs],
            "overhead_p99_us": med(lambda r: r["overhead_p99_us"]),
            "floor_p50_us": [r["socket_floor"]["overhead_p50_us"] for r in rs if "socket_floor" in r],
        }
        rows.append(row)
    return rows


def spread(values):
    """`median` for one value, `median (min–max)` for several."""
    if not values:
        return ""
    m = float(np.median(values))
    return f"{m:.0f}" if len(values) == 1 else f"{m:.0f} ({min(values):.0f}–{max(values):.0f})"


def print_table(rows, repeat):
    if repeat > 1:
        print(f"Medians over {repeat} rounds; the overhead p50 and the floor with their range.")
    print("| transport | form | streams | steps/s | p50 µs | p99 µs | in-process p50 µs | in-process steps/s | gRPC overhead p50 / p99 µs | bare-socket floor p50 µs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['transport']} | {r['form']} | {r['streams']} | {r['steps_per_s']:.0f} | {r['p50_us']:.0f} "
              f"| {r['p99_us']:.0f} | {r['in_process_p50_us']:.0f} | {r['in_process_steps_per_s']:.0f} "
              f"| {spread(r['overhead_p50_us'])} / {r['overhead_p99_us']:.0f} | {spread(r['floor_p50_us'])} |")


if __name__ == "__main__":
    main()
