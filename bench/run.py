"""``make bench``: the gateway against its baselines, in one run on one machine.

Targets, all in front of the same nginx upstream that answers a fixed JSON body:

    (a) upstream   the upstream directly: the limit for any proxy here
    (b) bare       bench/forwarder.py: aiohttp forwarding with no checks at all
    (c1) gateway   solapi-gateway serve, 1 worker, metrics and access log on
    (c2) gateway   solapi-gateway serve --workers 2
    (d) nginx      nginx proxy_pass, for reference

For each body (10 and 1000 valid record IDs) and each connection count (16, 64)
every target gets a warm-up and then ``--repeats`` measured ``wrk --latency`` runs
of ``--duration`` seconds, interleaved so drift hits every target alike; the
table shows medians. Results are printed and written into docs/performance.md
between the ``bench:begin``/``bench:end`` markers (the rest of that file is
hand-written analysis and is kept).

    python bench/run.py [--duration 10] [--repeats 3] [--warmup 2]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import (
    RESTORE,
    ROOT,
    free_port,
    gateway_folder,
    machine,
    rss_kib,
    stop_all,
    wait_for,
    write_section,
)

DOC = ROOT / "docs" / "performance.md"
TOKEN = "bench-member-token"
PATH = RESTORE
ANSWER = '{"requestedCount":10,"restoredCount":10,"failedCount":0,"results":[]}'


def wait_port(port: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"bench: port {port} did not open")


def record_ids(n: int) -> list[str]:
    return [f"CRMRC{i:016d}BENCH{i % 1000000:06d}" for i in range(n)]


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@dataclass
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


@dataclass
class Target:
    key: str
    label: str
    port: int
    runs: dict[tuple[int, int], list[Run]] = field(default_factory=dict)


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def parse_wrk(text: str) -> Run:
    def latency(pct: str) -> float:
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")

    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    errors = 0
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if bad:
        errors += int(bad.group(1))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sock:
        errors += sum(int(x) for x in sock.groups())
    return Run(float(rps.group(1)) if rps else 0.0, latency("50"), latency("99"), errors)


def wrk(port: int, script: Path, conns: int, seconds: float) -> Run:
    out = subprocess.run(
        ["wrk", "--latency", "-t2", f"-c{conns}", f"-d{max(1, round(seconds))}s", "-s", str(script),
         f"http://127.0.0.1:{port}{PATH}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return parse_wrk(out)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="sgw-bench-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.upstream_port = free_port()

    def spawn(self, cmd: list[str], log: str, **kwargs: object) -> subprocess.Popen[bytes]:
        with open(self.tmp / log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, **kwargs)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def nginx(self, name: str, server: str) -> None:
        folder = self.tmp / name
        folder.mkdir()
        conf = folder / "nginx.conf"
        conf.write_text(
            f"""
worker_processes 1;
daemon off;
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {folder}/body;
  proxy_temp_path {folder}/proxy;
  fastcgi_temp_path {folder}/fastcgi;
  uwsgi_temp_path {folder}/uwsgi;
  scgi_temp_path {folder}/scgi;
  client_max_body_size 2m;
  client_body_buffer_size 2m;
  keepalive_requests 1000000;
  upstream up {{ server 127.0.0.1:{self.upstream_port}; keepalive 128; }}
  {server}
}}
"""
        )
        self.spawn(["nginx", "-c", str(conf)], f"{name}.log")

    def gateway_config(self, port: int, admin: int) -> Path:
        upstream = f"http://127.0.0.1:{self.upstream_port}"
        return gateway_folder(
            self.tmp / f"gw-{port}", port, admin, upstream, "NCSBENCH00000001", TOKEN
        )

    def start(self) -> dict[str, Target]:
        up = self.upstream_port
        self.nginx(
            "upstream",
            f"server {{ listen 127.0.0.1:{up} backlog=4096; keepalive_timeout 300s; "
            f"location / {{ default_type application/json; return 200 '{ANSWER}'; }} }}",
        )
        targets = {"a": Target("a", "(a) upstream direct", up)}
        bare = free_port()
        self.spawn([sys.executable, str(ROOT / "bench" / "forwarder.py"), str(bare),
                    f"http://127.0.0.1:{up}"], "bare.log")  # fmt: skip
        targets["b"] = Target("b", "(b) bare aiohttp forwarder", bare)
        script = str(Path(sys.executable).parent / "solapi-gateway")
        self.gateways: dict[str, int] = {}
        for key, workers in (("c1", 1), ("c2", 2)):
            port, admin = free_port(), free_port()
            config = self.gateway_config(port, admin)
            proc = self.spawn([script, "serve", "--config", str(config), "--workers",
                               str(workers)], f"gateway-{key}.log")  # fmt: skip
            self.gateways[key] = proc.pid
            targets[key] = Target(key, f"({key}) gateway, {workers} worker(s)", port)
            wait_for(f"http://127.0.0.1:{admin}/readyz")
        proxy = free_port()
        self.nginx(
            "proxy",
            f"server {{ listen 127.0.0.1:{proxy} backlog=4096; keepalive_timeout 300s; "
            "location / { proxy_pass http://up; proxy_http_version 1.1; "
            'proxy_set_header Connection ""; } }',
        )
        targets["d"] = Target("d", "(d) nginx proxy_pass", proxy)
        for t in targets.values():
            wait_port(t.port)
        return targets

    def worker_pids(self, key: str) -> list[int]:
        pid = self.gateways[key]
        return children(pid) if key == "c2" else [pid]

    def rss(self, key: str) -> list[int]:
        return [rss_kib(p) for p in self.worker_pids(key)]

    def stop(self) -> None:
        stop_all(self.procs, self.tmp, 5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--no-write", action="store_true", help="do not update docs/")
    args = parser.parse_args()
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench: {tool} is not installed (make bench installs it)")
    bench = Bench(args)
    try:
        targets = bench.start()
        scripts = {}
        for n in (10, 1000):
            script = bench.tmp / f"post-{n}.lua"
            body = json.dumps({"recordIds": record_ids(n)})
            script.write_text(
                'wrk.method = "POST"\n'
                'wrk.headers["Content-Type"] = "application/json"\n'
                f'wrk.headers["Authorization"] = "Bearer {TOKEN}"\n'
                f"wrk.body = [[{body}]]\n"
            )
            scripts[n] = script
        rss_start = {k: bench.rss(k) for k in ("c1", "c2")}
        rss_repeats: list[int] = []
        for repeat in range(args.repeats):
            for n in (10, 1000):
                for conns in (16, 64):
                    for t in targets.values():
                        if repeat == 0 and args.warmup > 0:
                            wrk(t.port, scripts[n], conns, args.warmup)
                        run = wrk(t.port, scripts[n], conns, args.duration)
                        t.runs.setdefault((n, conns), []).append(run)
                        print(
                            f"repeat {repeat + 1} body {n:>4} c{conns:<3} {t.label:<30} "
                            f"{run.rps:>9.0f} req/s  p50 {run.p50_ms:6.2f} ms  "
                            f"p99 {run.p99_ms:6.2f} ms  errors {run.errors}",
                            flush=True,
                        )
            rss_repeats.append(sum(bench.rss("c1")))
        rss_end = {k: bench.rss(k) for k in ("c1", "c2")}
        report = render(targets, rss_start, rss_end, rss_repeats, args)
        print("\n" + report)
        if not args.no_write:
            write_section(DOC, "bench", "Performance", report)
    finally:
        bench.stop()
    return 0


def median(runs: list[Run], attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in runs)


def render(
    targets: dict[str, Target],
    rss_start: dict[str, list[int]],
    rss_end: dict[str, list[int]],
    rss_repeats: list[int],
    args: argparse.Namespace,
) -> str:
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on: {machine()}; "
        + subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
        + ".",
        f"wrk -t2, {args.duration:g} s per run after a {args.warmup:g} s warm-up, "
        f"{args.repeats} repeats, medians.",
        "",
        "| body | conns | target | req/s | p50 ms | p99 ms | errors |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for n in (10, 1000):
        for conns in (16, 64):
            for t in targets.values():
                runs = t.runs[(n, conns)]
                errors = sum(r.errors for r in runs)
                lines.append(
                    f"| {n} IDs | {conns} | {t.label} | {median(runs, 'rps'):.0f} | "
                    f"{median(runs, 'p50_ms'):.2f} | {median(runs, 'p99_ms'):.2f} | {errors} |"
                )
    lines += [
        "",
        "| body | conns | c1/b | c1/a | c2/c1 | c2/b | d/a |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for n in (10, 1000):
        for conns in (16, 64):
            rps = {k: median(t.runs[(n, conns)], "rps") for k, t in targets.items()}
            ratios = [("c1", "b"), ("c1", "a"), ("c2", "c1"), ("c2", "b"), ("d", "a")]
            cells = " | ".join(f"{rps[x] / rps[y]:.2f}" for x, y in ratios)
            lines.append(f"| {n} IDs | {conns} | {cells} |")
    mib = 1024
    lines += [
        "",
        f"Gateway RSS, 1 worker: {sum(rss_start['c1']) / mib:.1f} MiB at start, "
        f"{sum(rss_end['c1']) / mib:.1f} MiB after the run; after each repeat: "
        + ", ".join(f"{r / mib:.1f}" for r in rss_repeats) + " MiB.",
        "Gateway RSS, 2 workers (per worker): "
        + ", ".join(f"{r / mib:.1f}" for r in rss_start["c2"]) + " MiB at start, "
        + ", ".join(f"{r / mib:.1f}" for r in rss_end["c2"]) + " MiB after the run.",
    ]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
