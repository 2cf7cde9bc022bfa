#!/usr/bin/env python3
"""Benchmark the sidecar against nginx as the same kind of proxy, on loopback.

    python3 bench/run.py              # full run (3 x 5 s per cell), writes bench/RESULTS.md
    python3 bench/run.py --quick      # smoke run (1 x 2 s per cell), prints only
    python3 bench/run.py --profile 10 # py-spy profile of the sidecar under load, prints a summary

See bench/README.md for what each cell measures and how to read the table.
Everything generated (PKI, bodies, configs, logs) goes to a temp dir that is
removed at the end; every process started is stopped, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
MiB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ installation


def have_module(name: str, python: str = sys.executable) -> bool:
    r = subprocess.run([python, "-c", f"import {name}"], capture_output=True)
    return r.returncode == 0


# The peers measured next to nginx: variant key -> (label, Debian package, binaries).
PEERS = {
    "stunnel": ("stunnel", "stunnel4", ("stunnel4", "stunnel")),
    "haproxy": ("haproxy", "haproxy", ("haproxy",)),
}


def peer_binary(key: str) -> str | None:
    return next(filter(None, map(shutil.which, PEERS[key][2])), None)


def ensure_tools(need_pyspy: bool, peers: Iterable[str] = ()) -> None:
    """Install nginx, wrk, the peers asked for (Debian) and the `speed` extra when missing."""
    missing = [
        pkg
        for tool, pkg in (
            ("nginx", "nginx-light"),
            ("wrk", "wrk"),
            ("curl", "curl"),
            ("taskset", "util-linux"),
        )
        if shutil.which(tool) is None
    ] + [PEERS[key][1] for key in peers if peer_binary(key) is None]
    if missing:
        if os.geteuid() != 0:
            sys.exit(f"bench: missing {', '.join(missing)}; install them (apt-get) or run as root")
        log(f"installing Debian packages: {' '.join(missing)}")
        # Keep the packages' init scripts from starting a system nginx on port 80, a
        # haproxy or a stunnel (invoke-rc.d asks policy-rc.d first).
        policy = Path("/usr/sbin/policy-rc.d")
        created = not policy.exists()
        if created:
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
        try:
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
            subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)
        finally:
            if created:
                policy.unlink(missing_ok=True)
    if not (have_module("sidecar.cli") and have_module("uvloop")):
        log("installing the sidecar with the `speed` extra: pip install -e '.[speed]'")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "-e", ".[speed]"], cwd=REPO, check=True
        )
    if need_pyspy and shutil.which("py-spy") is None:
        log("installing py-spy")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)


# ------------------------------------------------------------------ processes


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def cpu_seconds(pids: Iterable[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def status_kb(pids: Iterable[int], key: str) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def reset_peak_rss(pids: Iterable[int]) -> bool:
    """Start VmHWM afresh from the current RSS (Linux: clear_refs 5); False if refused."""
    ok = True
    for pid in pids:
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            ok = False
    return ok


def fd_count(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return total


@dataclass
class Server:
    """One started process tree (an nginx master and its workers, or a sidecar)."""

    name: str
    proc: subprocess.Popen[bytes]
    known: set[int] = field(default_factory=set)

    def pids(self) -> list[int]:
        pids = [self.proc.pid, *children(self.proc.pid)]
        self.known.update(pids)
        return pids

    def stop(self) -> None:
        self.pids()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        for pid in self.known - {self.proc.pid}:  # workers left behind by a killed master
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class Processes:
    def __init__(self) -> None:
        self.servers: list[Server] = []

    def start(
        self,
        name: str,
        argv: list[str],
        *,
        cpu: str | None,
        log_file: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Server:
        if cpu is not None:
            argv = ["taskset", "-c", cpu, *argv]
        with open(log_file, "ab") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
                cwd=cwd,
            )
        server = Server(name, proc)
        self.servers.append(server)
        return server

    def stop_all(self) -> None:
        for server in reversed(self.servers):
            try:
                server.stop()
            except Exception as exc:  # keep stopping the others
                log(f"stopping {server.name}: {exc}")
        self.servers.clear()


def wait_http(
    url: str,
    server: Server,
    log_file: Path,
    timeout: float = 30.0,
    ctx: ssl.SSLContext | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            sys.exit(
                f"bench: {server.name} exited ({server.proc.returncode}); log:\n"
                f"{log_file.read_text(errors='replace')[-3000:]}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2, context=ctx) as r:
                if r.status == 200:
                    r.read()
                    return
        except Exception as exc:
            last = exc
        time.sleep(0.1)
    sys.exit(f"bench: {server.name} not ready at {url}: {last}")


# ------------------------------------------------------------------ fixture files


def odata_entry(base: str, i: int) -> dict[str, Any]:
    return {
        "__metadata": {"uri": f"{base}/odata/v2/User('u{i:05d}')", "type": "SFOData.User"},
        "userId": f"u{i:05d}",
        "firstName": "Maria",
        "lastName": "Schneider",
        "email": f"maria.schneider{i}@example.com",
        "status": "active",
    }


def write_bodies(data: Path, upstream_base: str, stream_mib: int) -> dict[str, int]:
    """~300-byte JSON, 64 KiB JSON (OData-like, with upstream links), big binary body."""
    data.mkdir()
    small = json.dumps({"d": odata_entry(upstream_base, 1)}, separators=(",", ":")).encode()
    small = small[:-1] + b',"pad":"' + b"x" * max(0, 300 - len(small) - 9) + b'"}'
    entries: list[dict[str, Any]] = []
    body = b""
    while True:
        entries.append(odata_entry(upstream_base, len(entries)))
        body = json.dumps({"d": {"results": entries}}, separators=(",", ":")).encode()
        if len(body) > 64 * 1024 - 400:
            break
    body = body[:-2] + b',"__next":"' + b"x" * (64 * 1024 - len(body) - 12) + b'"}}'
    assert len(body) == 64 * 1024, len(body)
    json.loads(body), json.loads(small)
    (data / "small.json").write_bytes(small)
    (data / "64k.json").write_bytes(body)
    chunk = os.urandom(MiB)  # incompressible
    with open(data / "big.bin", "wb") as f:
        for _ in range(stream_mib):
            f.write(chunk)
    return {"small": len(small), "64k": len(body), "big": stream_mib * MiB}


def render(template: str, out: Path, values: dict[str, Any]) -> None:
    text = (BENCH / template).read_text()
    for k, v in values.items():
        text = text.replace(f"@{k}@", str(v))
    left = re.findall(r"@[A-Z_]+@", text)
    assert not left, left
    out.write_text(text)


def split_bundle(bundle: Path, cert_out: Path, key_out: Path) -> None:
    text = bundle.read_text()
    key = re.search(
        r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----\n", text, re.S
    )
    assert key is not None
    key_out.write_text(key.group(0))
    key_out.chmod(0o600)
    cert_out.write_text(text.replace(key.group(0), ""))


SIDECAR_PURE = """\
log: {level: warning, format: text, access_log: false}
routes:
  - name: bench
    listen: 127.0.0.1:@PORT@
    upstream: https://127.0.0.1:@UPSTREAM_PORT@
    company_id: BENCH
    credentials: {pem: @PKI@/client-bundle.pem}
    tls: {ca_file: @PKI@/ca.pem}
    rewrite_links: false
    timeouts: {shutdown: 1s}
"""

# Everything at its default (access log at info, links rewritten) but the
# mandatory settings; the log goes to a file in the temp dir.
SIDECAR_DEFAULTS = """\
routes:
  - name: bench
    listen: 127.0.0.1:@PORT@
    upstream: https://127.0.0.1:@UPSTREAM_PORT@
    company_id: BENCH
    credentials: {pem: @PKI@/client-bundle.pem}
    tls: {ca_file: @PKI@/ca.pem}
    timeouts: {shutdown: 1s}
"""

# Runs the real CLI with `import uvloop` made to fail, so `_event_loop_runner`
# falls back to asyncio.run: the sidecar's own code is unchanged.
ASYNCIO_LAUNCHER = (
    "import sys; sys.modules['uvloop'] = None; "
    "from sidecar.cli import run_main; sys.argv[0] = 'mtls-sidecar'; run_main()"
)


# ------------------------------------------------------------------ variants


@dataclass
class Variant:
    key: str
    label: str
    url: str  # base URL the load generator sends to
    server: Server | None  # the proxy process tree (None for the direct upstream)
    curl_tls: list[str] = field(default_factory=list)
    notes: str = ""
    idle_rss_kb: int = 0
    idle_fds: int = 0

    def pids(self) -> list[int]:
        return self.server.pids() if self.server else []


def uses_uvloop(pid: int) -> bool:
    try:
        return "uvloop" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


# ------------------------------------------------------------------ load generators


@dataclass
class Cell:
    key: str
    path: str
    conns: int
    close: bool = False


WRK_CELLS = [
    Cell("small-c1", "/small.json", 1),
    Cell("small-c10", "/small.json", 10),
    Cell("small-c100", "/small.json", 100),
    Cell("64k-c1", "/64k.json", 1),
    Cell("64k-c10", "/64k.json", 10),
    Cell("64k-c100", "/64k.json", 100),
    Cell("close-c1", "/small.json", 1, close=True),
    Cell("close-c10", "/small.json", 10, close=True),
    Cell("small-c1000", "/small.json", 1000),
]


class Runner:
    def __init__(self, args: argparse.Namespace, load_cpu: str | None, upstream: Server) -> None:
        self.args = args
        self.load_cpu = load_cpu
        self.upstream = upstream

    def pin(self, argv: list[str]) -> list[str]:
        return ["taskset", "-c", self.load_cpu, *argv] if self.load_cpu is not None else argv

    def wrk(self, v: Variant, cell: Cell, duration: float) -> dict[str, Any]:
        argv = [
            "wrk",
            "-t1",
            f"-c{cell.conns}",
            f"-d{max(1, round(duration))}s",
            "--timeout",
            "10s",
            "--latency",
            "-s",
            str(BENCH / "report.lua"),
        ]
        if cell.close:
            argv += ["-H", "Connection: close"]
        argv.append(v.url + cell.path)
        pids, up = v.pids(), self.upstream.pids()
        cpu0, up0 = cpu_seconds(pids), cpu_seconds(up)
        r = subprocess.run(self.pin(argv), capture_output=True, text=True, timeout=duration + 60)
        cpu1, up1 = cpu_seconds(pids), cpu_seconds(up)
        m = re.search(r"^WRKJSON (.*)$", r.stdout, re.M)
        if r.returncode != 0 or m is None:
            raise RuntimeError(f"wrk failed ({r.returncode}): {r.stdout[-500:]} {r.stderr[-500:]}")
        res: dict[str, Any] = json.loads(m.group(1))
        n = max(res["requests"], 1)
        res["rps"] = res["requests"] / (res["duration_us"] / 1e6)
        res["errors"] = sum(res[k] for k in ("connect", "read", "write", "status", "timeout"))
        res["cpu_us"] = (cpu1 - cpu0) * 1e6 / n if pids else None
        res["up_cpu_us"] = (up1 - up0) * 1e6 / n
        return res

    def curl(self, v: Variant, direction: str, big: Path, size: int) -> dict[str, Any]:
        argv = [
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "--max-time",
            "300",
            *v.curl_tls,
            "-w",
            "%{http_code} %{size_download} %{size_upload} %{time_total}",
        ]
        if direction == "down":
            argv.append(v.url + "/big.bin")
            want = ("200", size, 0)
        else:
            argv += [
                "-X",
                "POST",
                "-H",
                "Expect:",
                "-H",
                "Content-Type: application/octet-stream",
                "-T",
                str(big),
                v.url + "/upload",
            ]
            want = ("204", 0, size)
        pids, up = v.pids(), self.upstream.pids()
        cpu0, up0 = cpu_seconds(pids), cpu_seconds(up)
        r = subprocess.run(self.pin(argv), capture_output=True, text=True, timeout=330)
        cpu1, up1 = cpu_seconds(pids), cpu_seconds(up)
        try:
            code, down, upl, total = r.stdout.split()
            ok = (code, int(down), int(upl)) == want and r.returncode == 0
            seconds = float(total)
        except ValueError:
            ok, seconds, code = False, 0.0, "?"
        return {
            "mibps": size / MiB / seconds if ok and seconds else 0.0,
            "errors": 0 if ok else 1,
            "status": code,
            "cpu_ms": (cpu1 - cpu0) * 1e3 if pids else None,
            "up_cpu_ms": (up1 - up0) * 1e3,
        }


# ------------------------------------------------------------------ statistics and table


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def fmt_num(x: float | None, unit: str) -> str:
    if x is None:
        return "–"
    if unit == "rps":
        return f"{x:,.0f}"
    if unit == "ms":
        return f"{x:.2f}" if x < 10 else f"{x:.1f}"
    if unit in ("us", "mib/s", "ms-cpu", "fds"):
        return f"{x:,.0f}"
    if unit == "MiB":
        return f"{x:.1f}"
    return f"{x:g}"


@dataclass
class Row:
    label: str
    unit: str
    values: dict[str, list[float]]  # variant key -> one value per repetition
    errors: dict[str, int] = field(default_factory=dict)


def build_rows(
    results: dict[tuple[str, str], list[dict[str, Any]]],
    variants: list[Variant],
    stream: dict[tuple[str, str], list[dict[str, Any]]],
    mem: dict[str, dict[str, float]],
    settle: float,
) -> list[Row]:
    rows: list[Row] = []

    def collect(cell: str, key: str, scale: float = 1.0) -> dict[str, list[float]]:
        out = {}
        for v in variants:
            xs = [r[key] for r in results.get((v.key, cell), []) if r.get(key) is not None]
            if xs:
                out[v.key] = [x * scale for x in xs]
        return out

    def errs(cell: str, source: dict[tuple[str, str], list[dict[str, Any]]]) -> dict[str, int]:
        return {v.key: sum(r["errors"] for r in source.get((v.key, cell), [])) for v in variants}

    names = {
        "small": "small JSON (~300 B)",
        "64k": "64 KiB JSON",
        "close": "small JSON, `Connection: close`",
    }
    for cell in WRK_CELLS:
        kind, conns = cell.key.split("-c")
        title = f"{names[kind]}, {conns} conn"
        e = errs(cell.key, results)
        rows.append(Row(f"{title}: requests/s", "rps", collect(cell.key, "rps"), e))
        rows.append(Row(f"{title}: p50 latency (ms)", "ms", collect(cell.key, "p50_us", 1e-3)))
        rows.append(Row(f"{title}: p99 latency (ms)", "ms", collect(cell.key, "p99_us", 1e-3)))
    # The 1-connection target: p50 added over the direct upstream.
    direct = [r["p50_us"] for r in results.get(("direct", "small-c1"), [])]
    if direct:
        base = med(direct)
        vals = {
            v.key: [(r["p50_us"] - base) * 1e-3 for r in results.get((v.key, "small-c1"), [])]
            for v in variants
            if v.key != "direct"
        }
        rows.append(
            Row(
                "small JSON, 1 conn: p50 added over upstream direct (ms)",
                "ms",
                {k: x for k, x in vals.items() if x},
            )
        )
    for key in ("small-c10", "small-c100", "64k-c10", "close-c1"):
        kind, conns = key.split("-c")
        rows.append(
            Row(
                f"proxy CPU µs per request ({names[kind]}, {conns} conn)",
                "us",
                collect(key, "cpu_us"),
            )
        )
    rows.append(
        Row(
            "upstream CPU µs per request (small JSON, 10 conn)",
            "us",
            collect("small-c10", "up_cpu_us"),
        )
    )
    for d, title in (("down", "download"), ("up", "upload")):
        vals = {v.key: [r["mibps"] for r in stream.get((v.key, d), [])] for v in variants}
        rows.append(
            Row(
                f"100 MiB {title}: MiB/s",
                "mib/s",
                {k: x for k, x in vals.items() if x},
                errs(d, stream),
            )
        )
        cpu = {
            v.key: [r["cpu_ms"] for r in stream.get((v.key, d), []) if r["cpu_ms"] is not None]
            for v in variants
        }
        rows.append(
            Row(f"100 MiB {title}: proxy CPU ms", "ms-cpu", {k: x for k, x in cpu.items() if x})
        )
        peak = {
            v.key: [r["peak_rss"] for r in stream.get((v.key, d), []) if "peak_rss" in r]
            for v in variants
        }
        rows.append(
            Row(f"100 MiB {title}: peak RSS (MiB)", "MiB", {k: x for k, x in peak.items() if x})
        )
        growth = {
            v.key: [r["rss_growth"] for r in stream.get((v.key, d), []) if "rss_growth" in r]
            for v in variants
        }
        rows.append(
            Row(
                f"100 MiB {title}: RSS growth during the transfer (MiB)",
                "MiB",
                {k: x for k, x in growth.items() if x},
            )
        )
    for key, title, unit in (
        ("idle_rss", "RSS idle (MiB)", "MiB"),
        ("peak_rss", "RSS peak, whole run (MiB)", "MiB"),
        ("after_rss", "RSS after the load (MiB)", "MiB"),
        ("idle_fds", "open fds idle", "fds"),
        ("after_fds", "open fds after the load", "fds"),
        ("settled_rss", f"RSS {settle:g} s after the load (MiB)", "MiB"),
        ("settled_fds", f"open fds {settle:g} s after the load", "fds"),
    ):
        rows.append(Row(title, unit, {k: [m[key]] for k, m in mem.items() if key in m}))
    return rows


# The targets of the [performance-2] issue: (what, row label, kind, bound); kind "ratio" is
# to nginx, "ratio:KEY" to another column (a peer), "abs<=" / "max<=" an absolute bound,
# "vs-idle:ROW" a factor of the idle value, "vs-idle+:ROW" MiB above it.
TARGETS = [
    ("small JSON, 1 conn: ≥ 0.60× nginx req/s", "small JSON (~300 B), 1 conn: requests/s",
     "ratio", 0.60),
    ("small JSON, 100 conn: ≥ 0.35× nginx req/s, no errors",
     "small JSON (~300 B), 100 conn: requests/s", "ratio", 0.35),
    ("small JSON, 100 conn: proxy CPU ≤ 70 µs per request",
     "proxy CPU µs per request (small JSON (~300 B), 100 conn)", "abs<=", 70.0),
    ("`Connection: close`, 1 conn: ≥ 0.50× nginx req/s",
     "small JSON, `Connection: close`, 1 conn: requests/s", "ratio", 0.50),
    ("`Connection: close`, 1 conn: ≥ 5× stunnel req/s",
     "small JSON, `Connection: close`, 1 conn: requests/s", "ratio:stunnel", 5.0),
    ("100 MiB download: ≥ 0.90× nginx MiB/s", "100 MiB download: MiB/s", "ratio", 0.90),
    ("100 MiB upload: ≥ 0.90× nginx MiB/s", "100 MiB upload: MiB/s", "ratio", 0.90),
    ("RSS idle ≤ 40 MiB", "RSS idle (MiB)", "abs<=", 40.0),
    ("peak RSS of the whole run (1,000 connections included) ≤ 80 MiB",
     "RSS peak, whole run (MiB)", "abs<=", 80.0),
    ("RSS {settle} s after the load within 10 MiB of idle",
     "RSS {settle} s after the load (MiB)", "vs-idle+:RSS idle (MiB)", 10.0),
    ("1,000 connections held without error",
     "small JSON (~300 B), 1000 conn: requests/s", "no-errors", 0),
    ("open fds back to the idle count after the load",
     "open fds {settle} s after the load", "vs-idle:open fds idle", 1.0),
]  # fmt: skip


def target_table(rows: list[Row], variants: list[Variant], settle: float) -> list[str]:
    by_label = {r.label: r for r in rows}
    sidecars = [v for v in variants if v.key.startswith("sc-")]
    if not sidecars or not any(v.key == "nginx" for v in variants):
        return []
    out = [
        "## Targets of the [performance-2] issue (medians of this run)",
        "",
        "| target | " + " | ".join(v.label for v in sidecars) + " |",
        "|---|" + "---|" * len(sidecars),
    ]
    for what, label, kind, bound in TARGETS:
        what = what.format(settle=f"{settle:g}")
        row = by_label.get(label.format(settle=f"{settle:g}"))
        if row is None:
            continue
        relative = kind.startswith("vs-idle")  # "vs-idle:ROW" (a factor) or "vs-idle+:ROW"
        idle = by_label.get(kind.partition(":")[2]) if relative else None
        cells = []
        ref = kind.removeprefix("ratio:") if kind.startswith("ratio:") else "nginx"
        if ref not in {v.key for v in variants}:  # a peer left out with --variants
            cells = [f"n/a (no {ref} column in this run)"] * len(sidecars)
            out.append(f"| {what} | " + " | ".join(cells) + " |")
            continue
        for v in sidecars:
            xs, base = row.values.get(v.key), row.values.get(ref)
            if relative:
                base = idle.values.get(v.key) if idle else None
            if not xs or (kind not in ("abs<=", "max<=", "no-errors") and not base):
                cells.append("–")
                continue
            if kind == "no-errors":
                n = row.errors.get(v.key, 0)
                ok, text = n == 0, f"{n:,} errors"
            elif base and relative:
                x, idle_x = med(xs), med(base)
                ok = x <= idle_x + bound if kind.startswith("vs-idle+") else x <= idle_x * bound
                text = f"{x:.0f} vs {idle_x:.0f} idle"
            elif kind == "max<=":
                x = max(xs)
                ok, text = x <= bound, f"{x:.0f} (max)"
            elif kind.startswith("ratio") and base:
                x = med(xs) / med(base)
                ok = x >= bound and not row.errors.get(v.key)
                text = f"{x:.2f}×"
            else:
                x = med(xs)
                ok = x <= bound
                text = f"{x:.2f}" if x < 10 else f"{x:.0f}"
            cells.append(f"{text} {'met' if ok else '**not met**'}")
        out.append(f"| {what} | " + " | ".join(cells) + " |")
    return [*out, ""]


def tables(rows: list[Row], variants: list[Variant]) -> tuple[str, str]:
    head = "| cell | " + " | ".join(v.label for v in variants) + " |"
    sep = "|---|" + "---|" * len(variants)
    main, spread = [head, sep], [head, sep]
    for row in rows:
        if not any(row.values.values()):
            continue  # a cell left out with --cells
        base = med(row.values["nginx"]) if row.values.get("nginx") else None
        cells, sp = [], []
        for v in variants:
            xs = row.values.get(v.key)
            if not xs:
                cells.append("–")
                sp.append("–")
                continue
            m = med(xs)
            text = fmt_num(m, row.unit)
            if v.key != "nginx" and base:
                text += f" ({m / base:.2f}×)"
            e = row.errors.get(v.key, 0)
            if e:
                text += f" **{e} err**"
            cells.append(text)
            sp.append(
                f"{fmt_num(min(xs), row.unit)}–{fmt_num(max(xs), row.unit)}"
                if len(xs) > 1
                else fmt_num(xs[0], row.unit)
            )
        main.append(f"| {row.label} | " + " | ".join(cells) + " |")
        spread.append(f"| {row.label} | " + " | ".join(sp) + " |")
    return "\n".join(main), "\n".join(spread)


# ------------------------------------------------------------------ machine facts


def first_line(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    return ((r.stdout or r.stderr).strip().splitlines() or ["?"])[0]


def py_version(module: str, python: str = sys.executable) -> str:
    code = f"import importlib.metadata as m; print(m.version({module!r}))"
    r = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else "not installed"


def peer_version(key: str) -> str:
    binary = peer_binary(key)
    if binary is None:
        return "not installed"
    # stunnel prints its version to stderr, after a line about inetd mode.
    r = subprocess.run([binary, "-version" if key == "stunnel" else "-v"], capture_output=True)
    text = (r.stdout + r.stderr).decode(errors="replace")
    m = re.search(r"^(?:stunnel|HAProxy version) (\S+)", text, re.M)
    return m.group(1) if m else "?"


def machine_facts(python: str) -> dict[str, str]:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    git = first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "sidecar"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "kernel": platform.release(),
        "python (the sidecar's)": first_line([python, "--version"]).removeprefix("Python "),
        "aiohttp": py_version("aiohttp", python),
        "uvloop": py_version("uvloop", python),
        "openssl (python)": ssl.OPENSSL_VERSION,
        "nginx": first_line(["nginx", "-v"]).replace("nginx version: ", ""),
        **{key: peer_version(key) for key in PEERS},
        "wrk": first_line(["wrk", "-v"]).split(" [")[0],
        "curl": " ".join(first_line(["curl", "--version"]).split()[:2]),
        "sidecar": f"{git}{' + uncommitted changes in sidecar/' if dirty else ''}",
        "load average at start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


# ------------------------------------------------------------------ the run


def start_all(
    args: argparse.Namespace,
    tmp: Path,
    procs: Processes,
    server_cpu: str | None,
    only_sidecar: str | None = None,
    peers: Iterable[str] = (),
) -> tuple[Server, list[Variant], dict[str, int], dict[str, Any]]:
    from sidecar.demo.pki import write_demo_pki  # the project's own throwaway PKI

    pki = tmp / "pki"
    write_demo_pki(pki)
    ports = free_ports(10)
    up_port, direct_port, sink_port, proxy_port, stunnel_port, haproxy_port = ports[:6]
    sc_ports = ports[6:]
    sizes = write_bodies(tmp / "data", f"https://127.0.0.1:{up_port}", args.stream_mib)
    split_bundle(pki / "client-bundle.pem", tmp / "client-cert.pem", tmp / "client-key.pem")
    values = {
        "TMP": tmp,
        "PKI": pki,
        "DATA": tmp / "data",
        "UPSTREAM_PORT": up_port,
        "DIRECT_PORT": direct_port,
        "SINK_PORT": sink_port,
        "PROXY_PORT": proxy_port,
        "STUNNEL_PORT": stunnel_port,
        "HAPROXY_PORT": haproxy_port,
        # Workers run as root too when we are root: the temp dir is private (0700).
        "USER_LINE": "user root;" if os.geteuid() == 0 else "",
        "KEEPALIVE": args.nginx_keepalive,
    }
    render("nginx-upstream.conf.in", tmp / "upstream.conf", values)
    render("nginx-upstream-locations.conf.in", tmp / "upstream-locations.conf", values)
    render("nginx-proxy.conf.in", tmp / "proxy.conf", values)
    render("stunnel.conf.in", tmp / "stunnel.conf", values)
    render("haproxy.cfg.in", tmp / "haproxy.cfg", values)
    ca_ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))

    logf = tmp / "upstream.log"
    upstream = procs.start(
        "upstream nginx",
        ["nginx", "-c", str(tmp / "upstream.conf"), "-e", str(tmp / "upstream-error.log")],
        cpu=server_cpu,
        log_file=logf,
    )
    wait_http(f"https://127.0.0.1:{direct_port}/small.json", upstream, logf, ctx=ca_ctx)

    variants: list[Variant] = []
    uvloop_ok = have_module("uvloop", args.python)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    sidecars = [("sc-asyncio", "sidecar asyncio", SIDECAR_PURE, "asyncio")]
    if uvloop_ok:
        sidecars.insert(0, ("sc-uvloop", "sidecar uvloop", SIDECAR_PURE, "installed"))
    sidecars.append(
        (
            "sc-default",
            "sidecar defaults" + (" (uvloop)" if uvloop_ok else ""),
            SIDECAR_DEFAULTS,
            "installed",
        )
    )
    if only_sidecar:
        sidecars = [s for s in sidecars if s[0] == only_sidecar]
        if not sidecars:
            sys.exit(f"bench: no sidecar variant {only_sidecar!r} (uvloop importable: {uvloop_ok})")
    if not only_sidecar:
        logf = tmp / "proxy.log"
        proxy = procs.start(
            "nginx proxy",
            ["nginx", "-c", str(tmp / "proxy.conf"), "-e", str(tmp / "proxy-error.log")],
            cpu=server_cpu,
            log_file=logf,
        )
        wait_http(f"http://127.0.0.1:{proxy_port}/small.json", proxy, logf)
        variants.append(Variant("nginx", "nginx proxy", f"http://127.0.0.1:{proxy_port}", proxy))
        peer_argv = {
            "stunnel": ([str(peer_binary("stunnel")), str(tmp / "stunnel.conf")], stunnel_port),
            # -db: foreground; no `log` line in the config, so nothing is logged.
            "haproxy": (
                [str(peer_binary("haproxy")), "-db", "-f", str(tmp / "haproxy.cfg")],
                haproxy_port,
            ),
        }
        for key in PEERS:
            if key not in peers:
                continue
            if peer_binary(key) is None:
                sys.exit(f"bench: {key} not found; install Debian's {PEERS[key][1]}")
            argv, port = peer_argv[key]
            logf = tmp / f"{key}.log"
            server = procs.start(key, argv, cpu=server_cpu, log_file=logf)
            wait_http(f"http://127.0.0.1:{port}/small.json", server, logf)
            variants.append(Variant(key, PEERS[key][0], f"http://127.0.0.1:{port}", server))
    for (key, label, template, loop), port in zip(sidecars, sc_ports, strict=False):
        cfg = tmp / f"{key}.yaml"
        text = template
        for k, v in {**values, "PORT": port}.items():
            text = text.replace(f"@{k}@", str(v))
        cfg.write_text(text)
        if loop == "asyncio":
            argv = [args.python, "-c", ASYNCIO_LAUNCHER, "run", "-c", str(cfg)]
        else:
            argv = [args.python, "-m", "sidecar", "run", "-c", str(cfg)]
        logf = tmp / f"{key}.log"
        server = procs.start(label, argv, cpu=server_cpu, log_file=logf, env=env, cwd=tmp)
        wait_http(f"http://127.0.0.1:{port}/-/ready", server, logf)
        on_uvloop = uses_uvloop(server.proc.pid)
        if (loop == "asyncio") == on_uvloop:
            sys.exit(f"bench: {label}: expected {loop} loop, uvloop loaded = {on_uvloop}")
        variants.append(
            Variant(
                key,
                label,
                f"http://127.0.0.1:{port}",
                server,
                notes=f"event loop: {'uvloop' if on_uvloop else 'asyncio'}",
            )
        )
    if not only_sidecar:
        variants.append(
            Variant(
                "direct",
                "upstream direct",
                f"https://127.0.0.1:{direct_port}",
                None,
                curl_tls=["--cacert", str(pki / "ca.pem")],
            )
        )
    info = {"uvloop_importable": uvloop_ok, "ports": values}
    return upstream, variants, sizes, info


def warm(v: Variant, ctx: ssl.SSLContext | None) -> None:
    for path in ("/small.json", "/64k.json", "/small.json"):
        with urllib.request.urlopen(v.url + path, timeout=10, context=ctx) as r:
            r.read()


SIDECAR_VARIANTS = ("sc-uvloop", "sc-asyncio", "sc-default")


def wanted_peers(args: argparse.Namespace) -> list[str]:
    """The peers --variants asks for (all of them without it; none in profile mode)."""
    if args.profile is not None:
        return []
    return [k for k in PEERS if not args.variants or k in args.variants.split(",")]


def run_bench(args: argparse.Namespace, tmp: Path, procs: Processes) -> None:
    ncpu = os.cpu_count() or 1
    load_cpu, server_cpu = ("0", "1") if ncpu >= 2 else (None, None)
    if load_cpu is None:
        log("fewer than 2 CPUs: no pinning")
    else:
        os.sched_setaffinity(0, {0})  # this script too stays off the servers' core
    facts = machine_facts(args.python)
    log(f"load average at start: {facts['load average at start']}")
    upstream, variants, sizes, info = start_all(
        args, tmp, procs, server_cpu, peers=wanted_peers(args)
    )
    if args.variants:
        keep = set(args.variants.split(",")) | {"nginx"}
        variants = [v for v in variants if v.key in keep]
    ctx = ssl.create_default_context(cafile=str(tmp / "pki" / "ca.pem"))
    mem: dict[str, dict[str, float]] = {}
    for v in variants:
        warm(v, ctx if v.key == "direct" else None)
    time.sleep(1.0)
    for v in variants:
        if v.server:
            mem[v.key] = {
                "idle_rss": status_kb(v.pids(), "VmRSS") / 1024,
                "idle_fds": fd_count(v.pids()),
            }
    runner = Runner(args, load_cpu, upstream)
    log(f"warming up {len(variants)} variants")
    for v in variants:
        if args.warmup > 0:  # --warmup 0 skips it
            runner.wrk(v, WRK_CELLS[2], args.warmup)
            runner.wrk(v, WRK_CELLS[4], args.warmup)

    cells = [c for c in WRK_CELLS if not args.cells or c.key in args.cells.split(",")]
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    stream: dict[tuple[str, str], list[dict[str, Any]]] = {}
    total = (args.reps * len(cells) + 2 * args.stream_reps) * len(variants)
    done = 0
    started = time.monotonic()
    for rep in range(args.reps):
        order = variants[rep % len(variants) :] + variants[: rep % len(variants)]
        for cell in cells:
            for v in order:
                res = runner.wrk(v, cell, args.duration)
                results.setdefault((v.key, cell.key), []).append(res)
                done += 1
                log(
                    f"[{done}/{total}] rep {rep + 1} {cell.key:11} {v.label:28} "
                    f"{res['rps']:9,.0f} req/s p50 {res['p50_us'] / 1e3:6.2f} ms "
                    f"p99 {res['p99_us'] / 1e3:6.2f} ms errors {res['errors']}"
                )
        # The streaming transfers are short (a fraction of a second): spread
        # args.stream_reps of them over the repetitions.
        n = args.stream_reps // args.reps + (rep < args.stream_reps % args.reps)
        # The peak RSS of the streaming itself ("whatever the body size"), apart from the
        # connection-heavy cells: VmHWM restarts before each transfer.
        for d in ("down", "up"):
            for _ in range(n):
                for v in order:
                    fresh = v.server is not None and reset_peak_rss(v.pids())
                    before = status_kb(v.pids(), "VmRSS") / 1024 if fresh else 0.0
                    res = runner.curl(v, d, tmp / "data" / "big.bin", sizes["big"])
                    if fresh:
                        res["peak_rss"] = status_kb(v.pids(), "VmHWM") / 1024
                        res["rss_growth"] = res["peak_rss"] - before
                    stream.setdefault((v.key, d), []).append(res)
                    done += 1
                log(
                    f"[{done}/{total}] rep {rep + 1} {d:11} {v.label:28} "
                    f"{res['mibps']:9,.0f} MiB/s (HTTP {res['status']})"
                )
    time.sleep(2.0)
    for v in variants:
        if v.server:
            pids = v.pids()
            mem[v.key].update(
                peak_rss=status_kb(pids, "VmHWM") / 1024,
                after_rss=status_kb(pids, "VmRSS") / 1024,
                after_fds=fd_count(pids),
            )
    if args.settle > 0:
        # The sidecar closes idle upstream connections after 30 s and gives memory back
        # once a load has ended; nginx keeps its upstream keep-alive ones for 300 s.
        log(f"waiting {args.settle:g} s for the proxies to settle after the load")
        time.sleep(args.settle)
        for v in variants:
            if v.server:
                pids = v.pids()
                mem[v.key].update(
                    settled_rss=status_kb(pids, "VmRSS") / 1024, settled_fds=fd_count(pids)
                )
    elapsed = time.monotonic() - started
    load_end = Path("/proc/loadavg").read_text().split()[:3]
    rows = build_rows(results, variants, stream, mem, args.settle)
    main, spread = tables(rows, variants)
    report = render_report(
        args, facts, load_end, elapsed, variants, sizes, info, main, spread, rows
    )
    print(report)
    out = args.output or (None if args.quick else BENCH / "RESULTS.md")
    if out and not args.no_write:
        Path(out).write_text(report)
        log(f"wrote {out}")


def render_report(
    args: argparse.Namespace,
    facts: dict[str, str],
    load_end: list[str],
    elapsed: float,
    variants: list[Variant],
    sizes: dict[str, int],
    info: dict[str, Any],
    main: str,
    spread: str,
    rows: list[Row],
) -> str:
    targets = target_table(rows, variants, args.settle)
    lines = [
        "# Benchmark results",
        "",
        f"Produced by `python3 bench/run.py{' --quick' if args.quick else ''}` on "
        f"{facts['date']}; see bench/README.md for what each cell measures.",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in facts.items() if k != "date"],
        f"- load average at end: {' '.join(load_end)}",
        f"- run: {args.reps} repetition(s) × {args.duration:g} s per wrk cell, "
        f"{args.warmup:g} s warm-up; streaming: {args.stream_reps} × {args.stream_mib} MiB "
        "each way with curl; "
        f"{elapsed / 60:.1f} min in all",
        "- pinning: wrk and curl on CPU 0; the upstream nginx and every proxy (stunnel and "
        "haproxy included) on CPU 1 "
        "(they share it, as a sidecar shares a container's CPU limit with nothing else here)",
        f"- bodies: small {sizes['small']} B and {sizes['64k']} B of OData-like JSON with "
        f"upstream links; {sizes['big'] // MiB} MiB of random bytes",
        "- uvloop importable: " + ("yes" if info["uvloop_importable"] else "no"),
        *[f"- {v.label}: {v.notes}" for v in variants if v.notes],
        "",
        "## Columns",
        "",
        "- **nginx proxy**: nginx as the same kind of proxy (plain HTTP in, mTLS out with "
        "`proxy_ssl_certificate`, `proxy_ssl_verify on`, `proxy_ssl_session_reuse on`, "
        f"`upstream {{ keepalive {args.nginx_keepalive}; }}`, a `successfactors-companyid` "
        "header added, no request buffering, response buffered in memory only), one worker.",
        "- **stunnel** (Debian's stunnel4, bench/stunnel.conf.in): `client = yes`, the same "
        "client certificate, `verifyChain` against the demo CA, `checkHost = localhost`, "
        "TLS sessions resumed. A TCP tunnel, not an HTTP proxy: it adds no "
        "`successfactors-companyid` header and gives every client connection an upstream "
        "TLS connection of its own (no pool), so a `Connection: close` client costs an "
        "upstream handshake per request. One thread per connection.",
        "- **haproxy** (bench/haproxy.cfg.in): `mode http`, server `ssl verify required` "
        "with the demo CA and the client bundle as `crt`, `sni str(localhost)`, the header "
        "added with `http-request set-header`, `http-reuse always` (a new client's first "
        "request may use an idle upstream connection, as with nginx's pool; the default "
        "`safe` would open one per client connection), TLS sessions reused, `nbthread 1`, "
        "no logging.",
        "- **sidecar uvloop / asyncio**: `mtls-sidecar run` with `rewrite_links: false` and "
        "`log.access_log: false` (the pure proxy cost); asyncio is forced by starting the "
        "same CLI with `import uvloop` made to fail (the CLI has no switch for it).",
        "- **sidecar defaults**: the same with every default on (access log at info to a file, "
        "link rewriting of the JSON bodies), event loop as installed.",
        "- **upstream direct**: the ceiling, wrk/curl straight to the upstream nginx over "
        "https, on a server block that asks no client certificate (wrk cannot present one). "
        "In `Connection: close` cells it pays a full TLS handshake per request, so it is "
        "no ceiling there.",
        "- Uploads: curl `-X POST -T file`; the upstream reads the whole body into memory "
        "before it answers 204 (see bench/nginx-upstream-locations.conf.in).",
        "- CPU: utime+stime of the proxy's processes from /proc over the cell, divided by "
        f"the requests; the clock ticks at {CLK_TCK} Hz, so streaming CPU is ±10 ms.",
        "- RSS: VmRSS/VmHWM from /proc (nginx: master + worker summed; stunnel and haproxy "
        "are one process each); idle = after start and three requests; peak = VmHWM over "
        "the whole run.",
        "",
        "Other test suites may have been running on this 2-core machine at the same time; "
        "the load averages above tell how busy it was. Compare columns within this run, "
        "not with other runs.",
        "",
        *targets,
        "## Medians (ratio to nginx in parentheses)",
        "",
        "Ratios are value ÷ nginx's value: above 1 is better for requests/s and MiB/s, "
        "worse for latency, CPU, RSS and fds.",
        "",
        main,
        "",
        "## Spread (min–max over the repetitions)",
        "",
        spread,
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------ profile mode


def run_profile(args: argparse.Namespace, tmp: Path, procs: Processes) -> None:
    ncpu = os.cpu_count() or 1
    load_cpu, server_cpu = ("0", "1") if ncpu >= 2 else (None, None)
    if load_cpu is not None:
        os.sched_setaffinity(0, {0})
    upstream, variants, _, _ = start_all(
        args, tmp, procs, server_cpu, only_sidecar=args.profile_variant
    )
    v = variants[0]
    assert v.server is not None
    pid = v.server.proc.pid
    warm(v, None)
    runner = Runner(args, load_cpu, upstream)
    runner.wrk(v, WRK_CELLS[1], 1)
    raw = tmp / "profile.txt"
    cell = next(c for c in WRK_CELLS if c.key == args.profile_cell)
    argv = runner.pin(
        [
            "wrk",
            "-t1",
            f"-c{cell.conns}",
            f"-d{args.profile + 3:g}s",
            "--timeout",
            "10s",
            *(["-H", "Connection: close"] if cell.close else []),
            "-s",
            str(BENCH / "report.lua"),
            v.url + cell.path,
        ]
    )
    log(f"profiling {v.label} (pid {pid}, {v.notes}) for {args.profile:g} s under {cell.key}")
    load = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(1.0)
        spy = [
            "py-spy",
            "record",
            "-p",
            str(pid),
            "-d",
            f"{args.profile:g}",
            "-r",
            "250",
            "-F",
            "--idle",
            *(["--native"] if args.profile_native else []),
            "-f",
            "raw",
            "-o",
            str(raw),
        ]
        r = subprocess.run(runner.pin(spy), capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"py-spy failed: {r.stderr[-2000:]}")
    finally:
        out, _ = load.communicate(timeout=args.profile + 60)
    m = re.search(r"^WRKJSON (.*)$", out, re.M)
    if m:
        res = json.loads(m.group(1))
        log(f"load: {res['requests'] / (res['duration_us'] / 1e6):,.0f} req/s during the profile")
    print(summarize_profile(raw, args.top))
    if args.profile_out:
        shutil.copy(raw, args.profile_out)
        log(f"raw collapsed stacks copied to {args.profile_out}")


def summarize_profile(raw: Path, top: int) -> str:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    self_n: dict[str, int] = {}
    incl_n: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [
            f
            for f in stack.split(";")
            if not f.startswith("process ") and not f.startswith("thread ")
        ]
        frames = [shorten(f) for f in frames]
        if frames:
            self_n[frames[-1]] = self_n.get(frames[-1], 0) + n
        for f in set(frames):
            incl_n[f] = incl_n.get(f, 0) + n

    def table(d: dict[str, int], title: str) -> list[str]:
        out = [f"{title} (of {total} samples)", f"{'%':>6}  function"]
        # Frames on (nearly) every stack (main, click, the loop runner) say nothing.
        rows = [(name, n) for name, n in d.items() if n < 0.97 * total or d is self_n]
        for name, n in sorted(rows, key=lambda kv: -kv[1])[:top]:
            out.append(f"{100 * n / total:6.1f}  {name}")
        return out

    return "\n".join(
        [
            *table(self_n, f"top {top} by self time"),
            "",
            *table(incl_n, f"top {top} by inclusive time"),
        ]
    )


def shorten(frame: str) -> str:
    # "f (/x/site-packages/aiohttp/web_protocol.py:12)" -> "f (aiohttp/web_protocol.py:12)"
    return re.sub(r"\((?:[^()]*/)?(site-packages|lib/python3\.\d+|work/main)/", "(", frame)


# ------------------------------------------------------------------ main


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--reps", type=int, default=3, help="repetitions of every cell (median reported)"
    )
    p.add_argument("--duration", type=float, default=5.0, help="seconds per wrk cell")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up load per variant")
    p.add_argument("--stream-mib", type=int, default=100, help="size of the streamed body")
    p.add_argument(
        "--stream-reps", type=int, default=5, help="100 MiB transfers per direction and variant"
    )
    p.add_argument(
        "--nginx-keepalive",
        type=int,
        default=128,
        help="idle upstream connections the nginx proxy keeps (`keepalive N`); below the "
        "largest client connection count nginx opens and closes mTLS connections per request",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 repetition of 2 s, 1 s warm-up; prints, writes no file",
    )
    p.add_argument("--cells", help="comma-separated subset of wrk cells, e.g. small-c1,close-c1")
    p.add_argument(
        "--variants",
        help="comma-separated subset: stunnel,haproxy,sc-uvloop,sc-asyncio,sc-default,direct "
        "(nginx is always measured)",
    )
    p.add_argument(
        "--output", help="write the report here (default bench/RESULTS.md, not with --quick)"
    )
    p.add_argument("--no-write", action="store_true", help="print the report only")
    p.add_argument("--no-install", action="store_true", help="do not install missing tools")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    p.add_argument(
        "--profile",
        type=float,
        metavar="SECONDS",
        help="instead of the table: py-spy profile of the sidecar (pure config, "
        "event loop as installed) under load (--profile-cell; default small JSON, 10 conn)",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=35.0,
        help="seconds to wait after the load before the last RSS and fd reading (the "
        "sidecar closes idle upstream connections after 30 s); 0 skips it",
    )
    p.add_argument(
        "--python",
        default=sys.executable,
        help="the interpreter that runs the sidecar (with the package and its speed extra "
        "installed), e.g. a venv of another Python version; default: this one",
    )
    p.add_argument("--top", type=int, default=20, help="functions shown by --profile")
    p.add_argument(
        "--profile-cell",
        default="small-c10",
        choices=[c.key for c in WRK_CELLS],
        help="the wrk cell --profile runs (default: small-c10)",
    )
    p.add_argument(
        "--profile-variant",
        default=None,
        choices=SIDECAR_VARIANTS,
        help="which sidecar --profile runs (default: sc-uvloop when uvloop is installed)",
    )
    p.add_argument(
        "--profile-native", action="store_true", help="py-spy --native: show C frames too"
    )
    p.add_argument("--profile-out", help="also copy py-spy's raw collapsed stacks here")
    args = p.parse_args()
    if args.quick:
        args.reps, args.duration, args.warmup, args.stream_reps = 1, 2.0, 1.0, 1
    if args.variants:
        unknown = set(args.variants.split(",")) - {"nginx", "direct", *PEERS, *SIDECAR_VARIANTS}
        if unknown:
            p.error(f"--variants: unknown {', '.join(sorted(unknown))}")
    if not args.no_install:
        ensure_tools(need_pyspy=args.profile is not None, peers=wanted_peers(args))
    if args.profile is not None and args.profile_variant is None:
        args.profile_variant = "sc-uvloop" if have_module("uvloop", args.python) else "sc-asyncio"
    sys.path.insert(0, str(REPO))

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    signal.signal(signal.SIGINT, on_signal)  # also when started with SIGINT ignored
    tmp = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
    procs = Processes()
    try:
        if args.profile is not None:
            run_profile(args, tmp, procs)
        else:
            run_bench(args, tmp, procs)
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        sys.exit(130)
    finally:
        procs.stop_all()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
