#!/usr/bin/env python3
"""Checks that a process group's TCP traffic stays on loopback (`scripts/milvus.sh check-loopback`).

    python3 scripts/milvus_loopback.py PGID      # the group's sockets, from /proc
    python3 scripts/milvus_loopback.py --self-test

Lists every connected TCP socket (every state but LISTEN: ESTABLISHED, SYN_SENT, CLOSE_WAIT, ...)
that a process of the group owns, and exits 1, printing them, when a local or remote address of
one is not loopback (127.0.0.0/8, ::1, ::ffff:127.0.0.0/104). Exits 0 otherwise, after a summary
line and the group's listening sockets with their bind addresses (for information: a socket
that listens on every interface is not traffic). Exits 2 when the group has no process.

Reads /proc only (no `ss`): /proc/PID/stat for the group, /proc/PID/fd for the sockets'
inodes, /proc/PID/net/tcp and tcp6 (the process's own network namespace) for the sockets. A
snapshot: a connection opened and closed between two checks is not seen. `--proc DIR` reads a
/proc-like tree instead (the self-test builds one).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import ipaddress
import os
import sys
import tempfile
from pathlib import Path

# /proc/net/tcp's `st` column (include/net/tcp_states.h).
STATES = {
    0x01: "ESTABLISHED", 0x02: "SYN_SENT", 0x03: "SYN_RECV", 0x04: "FIN_WAIT1",
    0x05: "FIN_WAIT2", 0x06: "TIME_WAIT", 0x07: "CLOSE", 0x08: "CLOSE_WAIT",
    0x09: "LAST_ACK", 0x0A: "LISTEN", 0x0B: "CLOSING", 0x0C: "NEW_SYN_RECV",
}
LISTEN = 0x0A


def decode_address(field: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """`0100007F:4C4A` (tcp) or 32 hex digits and a port (tcp6): each 32-bit word of the address
    is printed in the kernel's byte order (little-endian here), the port in big-endian."""
    host, port = field.split(":")
    raw = bytes.fromhex(host)
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw), int(port, 16)


def is_loopback(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """127.0.0.0/8, ::1, and IPv4-mapped loopback (::ffff:127.x.x.x: an IPv4 peer of an IPv6
    socket). Python's own `is_loopback` says False for the mapped form before 3.13."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def show(addr, port: int) -> str:
    if isinstance(addr, ipaddress.IPv6Address):
        mapped = addr.ipv4_mapped
        return f"[::ffff:{mapped}]:{port}" if mapped is not None else f"[{addr}]:{port}"
    return f"{addr}:{port}"


def group_pids(proc: Path, pgid: int) -> list[int]:
    pids = []
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses.
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid:
            pids.append(int(d.name))
    return sorted(pids)


def socket_inodes(proc: Path, pid: int) -> set[int]:
    inodes = set()
    try:
        fds = list((proc / str(pid) / "fd").iterdir())
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:["):-1]))
    return inodes


def tcp_sockets(proc: Path, pid: int) -> dict[int, tuple]:
    """inode -> (state, local, local port, remote, remote port) of the pid's network namespace."""
    out = {}
    for name in ("tcp", "tcp6"):
        try:
            lines = (proc / str(pid) / "net" / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            inode = int(f[9])
            if inode == 0:
                continue  # TIME_WAIT and the like: no process owns them
            local, lport = decode_address(f[1])
            remote, rport = decode_address(f[2])
            out[inode] = (int(f[3], 16), local, lport, remote, rport)
    return out


def check(proc: Path, pgid: int, label: str = "process group") -> int:
    pids = group_pids(proc, pgid)
    if not pids:
        print(f"loopback check: no process in {label} {pgid}", file=sys.stderr)
        return 2
    connected, listening = [], []
    sockets: dict[int, tuple] = {}
    for pid in pids:
        inodes = socket_inodes(proc, pid)
        if not inodes:
            continue
        table = tcp_sockets(proc, pid)
        for inode in inodes:
            if inode in table and inode not in sockets:
                sockets[inode] = table[inode] + (pid,)
    for state, local, lport, remote, rport, pid in sockets.values():
        (listening if state == LISTEN else connected).append((state, local, lport, remote, rport, pid))
    bad = [c for c in connected if not (is_loopback(c[1]) and is_loopback(c[3]))]
    by_state: dict[str, int] = {}
    for c in connected:
        name = STATES.get(c[0], hex(c[0]))
        by_state[name] = by_state.get(name, 0) + 1
    states = ", ".join(f"{n} {s}" for s, n in sorted(by_state.items()))
    binds = sorted({show(c[1], c[2]) for c in listening}, key=lambda s: (s.startswith("["), s))
    if bad:
        print(f"loopback check FAILED: {len(bad)} of the {len(connected)} TCP connections of {label} "
              f"{pgid} ({len(pids)} processes) leave loopback:", file=sys.stderr)
        for state, local, lport, remote, rport, pid in sorted(bad, key=lambda c: c[5]):
            print(f"  pid {pid} {STATES.get(state, hex(state))} {show(local, lport)} -> {show(remote, rport)}",
                  file=sys.stderr)
        return 1
    print(f"loopback check: {len(connected)} TCP connections of {label} {pgid} ({len(pids)} processes), "
          f"all loopback ({states or 'none'}); listening (information): {len(binds)} sockets: "
          f"{' '.join(binds) or 'none'}")
    return 0


def hex4(addr: str) -> str:
    raw = ipaddress.ip_address(addr).packed
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return raw.hex().upper()


def fake_proc(root: Path, pgid: int, conns: list[tuple[str, int, str, int, int]]) -> None:
    """A /proc-like tree: process `pgid` (its group's leader) owning `conns` (local, port,
    remote, port, state), and an unrelated process 2 owning a non-loopback connection."""
    for pid, group, rows in ((pgid, pgid, conns), (2, 2, [("10.1.2.3", 40000, "10.9.9.9", 443, 1)])):
        d = root / str(pid)
        (d / "fd").mkdir(parents=True)
        (d / "net").mkdir()
        (d / "stat").write_text(f"{pid} (milvus (x) y) S 1 {group} {group} 0 -1\n")
        tables = {"tcp": [], "tcp6": []}
        for i, (local, lport, remote, rport, state) in enumerate(rows):
            inode = pid * 1000 + i + 1
            os.symlink(f"socket:[{inode}]", d / "fd" / str(3 + i))
            name = "tcp6" if ":" in local else "tcp"
            tables[name].append(f"{i}: {hex4(local)}:{lport:04X} {hex4(remote)}:{rport:04X} {state:02X} "
                                f"00000000:00000000 00:00000000 00000000 0 0 {inode} 1 0 20 4 30 10 -1")
        for name, lines in tables.items():
            (d / "net" / name).write_text("  sl  local_address rem_address   st ...\n" + "".join(l + "\n" for l in lines))


def self_test() -> int:
    for a, want in [("127.0.0.1", True), ("127.255.0.9", True), ("::1", True), ("::ffff:127.0.0.1", True),
                    ("0.0.0.0", False), ("10.0.0.5", False), ("192.168.1.2", False), ("::", False),
                    ("::ffff:10.0.0.5", False), ("fe80::1", False), ("2001:db8::1", False)]:
        assert is_loopback(ipaddress.ip_address(a)) == want, a
    for a in ["127.0.0.1", "10.0.0.5", "::1", "::ffff:127.0.0.1", "2001:db8::1"]:
        assert decode_address(f"{hex4(a)}:4C4A") == (ipaddress.ip_address(a), 19530), a
    # Real lines as the kernel prints them (x86): 127.0.0.1:19530 and [::1]:2379.
    assert decode_address("0100007F:4C4A") == (ipaddress.ip_address("127.0.0.1"), 19530)
    assert decode_address("00000000000000000000000001000000:094B") == (ipaddress.ip_address("::1"), 2379)
    good = [("127.0.0.1", 19530, "127.0.0.1", 51000, 1), ("::ffff:127.0.0.1", 2379, "::ffff:127.0.0.1", 51001, 1),
            ("::1", 9091, "::1", 51002, 8), ("0.0.0.0", 19530, "0.0.0.0", 0, LISTEN), ("::", 9091, "::", 0, LISTEN)]
    cases = [(good, 0, "3 TCP connections", "all loopback (1 CLOSE_WAIT, 2 ESTABLISHED)",
              "2 sockets: 0.0.0.0:19530 [::]:9091"),
             (good + [("10.0.0.5", 53100, "10.0.0.5", 19530, 1)], 1,
              "ESTABLISHED 10.0.0.5:53100 -> 10.0.0.5:19530", "1 of the 4"),
             (good + [("127.0.0.1", 53100, "192.168.1.7", 2379, 2)], 1,
              "SYN_SENT 127.0.0.1:53100 -> 192.168.1.7:2379", "1 of the 4"),
             (good + [("::ffff:10.0.0.5", 21123, "::ffff:10.0.0.5", 53101, 1)], 1,
              "[::ffff:10.0.0.5]:21123 -> [::ffff:10.0.0.5]:53101", "1 of the 4")]
    for conns, want, *texts in cases:
        with tempfile.TemporaryDirectory() as tmp:
            fake_proc(Path(tmp), 4242, conns)
            text = io.StringIO()
            with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
                got = check(Path(tmp), 4242, "fake group")
                assert check(Path(tmp), 777, "fake group") == 2
            assert got == want, (conns[-1], got, text.getvalue())
            assert all(t in text.getvalue() for t in texts), text.getvalue()
    print("milvus_loopback self-test: ok (classifier, address decoding, 4 fake /proc trees: 1 clean, 3 failing)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pgid", type=int, nargs="?", help="the process group to check")
    ap.add_argument("--proc", default="/proc", help="the /proc tree to read")
    ap.add_argument("--label", default="process group", help="what the group is, in messages")
    ap.add_argument("--self-test", action="store_true", help="check this script on fake /proc trees")
    a = ap.parse_args()
    if a.self_test:
        return self_test()
    if a.pgid is None:
        ap.error("a process group id, or --self-test")
    return check(Path(a.proc), a.pgid, a.label)


if __name__ == "__main__":
    sys.exit(main())
