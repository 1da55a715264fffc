"""``make bench``, TLS part: what HTTPS on the proxy port costs, next to plain HTTP.

Two gateways, one worker each, identical but for ``tls:`` (an ECDSA P-256
certificate from a test CA, made here with trustme), in front of one nginx
upstream that answers a fixed JSON body. wrk posts 10 valid record IDs:

    keep-alive   64 connections kept open: requests per second
    handshakes   ``Connection: close`` on 16 connections: every request opens a
                 new connection (and, over TLS, makes a full handshake), so the
                 rate is new connections per second

Runs are interleaved (plain, TLS, plain, TLS…) so drift hits both alike; the
table shows medians and the ratio TLS/plain. Target: keep-alive TLS at least
0.80 of plain. Results are printed and written into docs/performance.md
between the ``tls:begin``/``tls:end`` markers.

    python bench/tls.py [--duration 5] [--repeats 3] [--warmup 1] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trustme
from common import (
    ROOT,
    free_port,
    machine,
    stop_all,
    wait_for,
    write_gateway_config,
    write_section,
)

DOC = ROOT / "docs" / "performance.md"
TOKEN = "bench-member-token"
PATH = "/crm-core/v1/records/bulk/restore"
ANSWER = '{"requestedCount":10,"restoredCount":10,"failedCount":0,"results":[]}'
TARGET_RATIO = 0.80
MODES = {"keep-alive": 64, "handshakes": 16}  # mode → connections


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rps(url: str, script: Path, conns: int, seconds: float) -> tuple[float, int]:
    """wrk's requests per second, and its errors (non-2xx and socket errors)."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "-s", str(script), url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = sum(
        int(n) for n in re.findall(r"(?:responses|connect|read|write|timeout):? (\d+)", out)
    )
    return (float(found.group(1)) if found else 0.0), errors


def lua(path: Path, close: bool) -> Path:
    body = json.dumps({"recordIds": [f"CRMRC{i:016d}BENCH{i:06d}" for i in range(10)]})
    path.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {TOKEN}"\n'
        + ('wrk.headers["Connection"] = "close"\n' if close else "")
        + f"wrk.body = [[{body}]]\n"
    )
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--no-write", action="store_true", help="do not update docs/")
    args = parser.parse_args()
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench: {tool} is not installed (make bench installs it)")
    tmp = Path(tempfile.mkdtemp(prefix="sgw-bench-tls-"))
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(cmd: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(tmp / log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    try:
        upstream = free_port()
        (tmp / "nginx").mkdir()
        conf = tmp / "nginx" / "nginx.conf"
        conf.write_text(
            f"worker_processes 1; daemon off; pid {tmp}/nginx/pid; error_log {tmp}/nginx/err;\n"
            "events { worker_connections 4096; }\n"
            f"http {{ access_log off; client_body_temp_path {tmp}/nginx/body;\n"
            f"  server {{ listen 127.0.0.1:{upstream} backlog=4096; keepalive_timeout 300s;\n"
            f"    location / {{ default_type application/json; return 200 '{ANSWER}'; }} }} }}\n"
        )
        spawn(["nginx", "-c", str(conf)], "nginx.log")

        ca = trustme.CA()
        leaf = ca.issue_cert("127.0.0.1")  # ECDSA P-256, as cert-manager's example issues
        urls: dict[str, str] = {}
        pids: dict[str, int] = {}
        script = str(Path(sys.executable).parent / "solapi-gateway")
        for name in ("plain", "tls"):
            port, admin = free_port(), free_port()
            config = write_gateway_config(
                tmp / name, port, admin, f"http://127.0.0.1:{upstream}", "NCSBENCH00000001", TOKEN
            )
            if name == "tls":
                leaf.cert_chain_pems[0].write_to_path(str(tmp / name / "tls.crt"))
                leaf.private_key_pem.write_to_path(str(tmp / name / "tls.key"))
                with config.open("a") as fh:
                    fh.write('tls:\n  cert_file: "tls.crt"\n  key_file: "tls.key"\n')
            proc = spawn([script, "serve", "--config", str(config)], f"gateway-{name}.log")
            wait_for(f"http://127.0.0.1:{admin}/readyz", proc)
            pids[name] = proc.pid
            scheme = "https" if name == "tls" else "http"
            urls[name] = f"{scheme}://127.0.0.1:{port}{PATH}"

        scripts = {mode: lua(tmp / f"{mode}.lua", mode == "handshakes") for mode in MODES}
        results: dict[tuple[str, str], list[float]] = {}
        cpu_us: dict[tuple[str, str], list[float]] = {}  # gateway CPU per request
        errors = 0
        for repeat in range(args.repeats):
            for mode, conns in MODES.items():
                for name, url in urls.items():
                    if repeat == 0 and args.warmup > 0:
                        rps(url, scripts[mode], conns, args.warmup)
                    before = cpu_s(pids[name])
                    rate, errs = rps(url, scripts[mode], conns, args.duration)
                    used = cpu_s(pids[name]) - before
                    errors += errs
                    results.setdefault((mode, name), []).append(rate)
                    served = rate * max(1, round(args.duration))
                    cpu_us.setdefault((mode, name), []).append(used / served * 1e6)
                    print(
                        f"repeat {repeat + 1} {mode:<10} c{conns:<3} {name:<5} {rate:>8.0f}/s"
                        f"  {cpu_us[(mode, name)][-1]:6.0f} µs CPU each  errors {errs}",
                        flush=True,
                    )
        report = render(results, cpu_us, errors, args)
        print("\n" + report)
        if not args.no_write:
            write_section(DOC, "tls", "Performance", report)
    finally:
        stop_all(procs, tmp, 5)
    return 0


def render(
    results: dict[tuple[str, str], list[float]],
    cpu_us: dict[tuple[str, str], list[float]],
    errors: int,
    args: argparse.Namespace,
) -> str:
    med = {key: statistics.median(runs) for key, runs in results.items()}
    cpu = {key: statistics.median(runs) for key, runs in cpu_us.items()}
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on: {machine()}.",
        f"wrk -t1, POST 10 IDs, {args.duration:g} s per run after a {args.warmup:g} s warm-up,"
        f" {args.repeats} repeats interleaved, medians; one gateway worker each;"
        f" {errors} errors in all.",
        "",
        "| what | conns | plain HTTP | HTTPS | HTTPS / plain | gateway CPU each, plain → HTTPS |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for mode, conns in MODES.items():
        plain, tls = med[(mode, "plain")], med[(mode, "tls")]
        unit = "req/s" if mode == "keep-alive" else "new connections/s"
        used = f"{cpu[(mode, 'plain')]:.0f} → {cpu[(mode, 'tls')]:.0f} µs"
        lines.append(
            f"| {mode} ({unit}) | {conns} | {plain:.0f} | {tls:.0f} | {tls / plain:.2f} | {used} |"
        )
    ratio = med[("keep-alive", "tls")] / med[("keep-alive", "plain")]
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    by_cpu = cpu[("keep-alive", "plain")] / cpu[("keep-alive", "tls")]
    target = f"Target: keep-alive HTTPS at least {TARGET_RATIO:.2f} of plain"
    lines += [
        "",
        f"{target}: {verdict} ({ratio:.2f}). By the gateway's own CPU per request, which"
        f" the load generator's TLS work on the same cores does not skew: {by_cpu:.2f}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
