"""``make soak``: the gateway under steady load for a minute, then the books are checked.

Starts ``solapi-gateway sandbox`` (the SOLAPI look-alike: every signature verified,
a reused salt refused) and ``solapi-gateway serve`` (1 worker) in front of it with a
bearer token, then runs ``--clients`` aiohttp clients for ``--duration`` seconds,
each sending valid bulk restores of ``--ids`` fresh random record IDs back to back
(IDs the sandbox does not know: 200, every result ``notFound``).

What it checks (exit 1 if any fails), prints, and writes into docs/soak.md between
the ``soak:begin``/``soak:end`` markers (the rest of that file is kept):

    errors           non-200 answers and client exceptions: 0
    salts            requests served = requests the sandbox received = distinct
                     salts it saw (its own count, not its 5000-entry log): one
                     fresh signature per request, none reused, none lost
    memory           gateway RSS at the end within 10% of RSS after the warm-up

    python bench/soak.py [--duration 60] [--clients 200] [--ids 10] [--warmup 10] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import string
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from common import (
    RESTORE,
    ROOT,
    free_port,
    machine,
    rss_kib,
    stop_all,
    wait_for,
    write_gateway_config,
    write_section,
)

DOC = ROOT / "docs" / "soak.md"
TOKEN = "soak-member-token"
API_KEY = "NCSSOAK000000001"
MAX_GROWTH = 0.10  # of the RSS after the warm-up
ID_CHARS = string.ascii_letters + string.digits


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def revision() -> str:
    """The commit measured, as ``git describe`` says it (``-dirty``: with local changes)."""
    try:
        done = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except OSError:
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 else "unknown"


class Processes:
    """The sandbox and the gateway, in a temporary folder removed at the end."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="sgw-soak-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.script = str(Path(sys.executable).with_name("solapi-gateway"))

    def spawn(self, args: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(self.tmp / log, "wb") as out:
            proc = subprocess.Popen(
                [self.script, *args], stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
        self.procs.append(proc)
        return proc

    def start(self) -> tuple[str, str, subprocess.Popen[bytes]]:
        """Start both; return the sandbox URL, the gateway URL and the gateway process."""
        sandbox_port, port, admin = free_port(), free_port(), free_port()
        sandbox_url = f"http://127.0.0.1:{sandbox_port}"
        config = write_gateway_config(self.tmp, port, admin, sandbox_url, API_KEY, TOKEN)
        sandbox = self.spawn(
            ["sandbox", "--listen", f"127.0.0.1:{sandbox_port}", "--api-key", API_KEY,
             "--api-secret-file", str(self.tmp / "secret")],
            "sandbox.log",
        )  # fmt: skip
        wait_for(sandbox_url + "/_sandbox/requests", sandbox)
        gateway = self.spawn(["serve", "--config", str(config), "--workers", "1"], "gateway.log")
        wait_for(f"http://127.0.0.1:{admin}/readyz", gateway)
        return sandbox_url, f"http://127.0.0.1:{port}", gateway

    def stop(self) -> None:
        stop_all(self.procs, self.tmp, 10)


@dataclass
class Load:
    served: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what)


def random_ids(rng: random.Random, n: int) -> list[str]:
    return [
        "CRMRC" + "".join(rng.choices(string.digits, k=16)) + "".join(rng.choices(ID_CHARS, k=11))
        for _ in range(n)
    ]


async def client(
    session: aiohttp.ClientSession, url: str, ids: int, until: float, load: Load
) -> None:
    rng = random.Random()
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    while time.monotonic() < until:
        body = json.dumps({"recordIds": random_ids(rng, ids)})
        started = time.perf_counter()
        try:
            async with session.post(url, data=body, headers=headers) as r:
                data = await r.read()
                if r.status != 200:
                    load.error(f"{r.status} {data[:200]!r}")
                    continue
                answer = json.loads(data)
                if answer.get("requestedCount") != ids or answer.get("failedCount") != ids:
                    load.error(f"unexpected answer {data[:200]!r}")
                    continue
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            load.error(f"{type(exc).__name__}: {exc}")
            continue
        load.latencies_ms.append((time.perf_counter() - started) * 1000)
        load.served += 1


async def run_load(
    url: str, gateway_pid: int, args: argparse.Namespace
) -> tuple[Load, float, list[tuple[float, float]]]:
    """Drive the load; return it, its real duration and RSS samples (second, MiB)."""
    load = Load()
    samples: list[tuple[float, float]] = []
    started = time.monotonic()
    until = started + args.duration

    async def sample() -> None:
        while time.monotonic() < until:
            samples.append((time.monotonic() - started, rss_kib(gateway_pid) / 1024))
            await asyncio.sleep(min(5.0, args.warmup))

    connector = aiohttp.TCPConnector(limit=args.clients)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        sampler = asyncio.create_task(sample())
        await asyncio.gather(
            *(client(session, url + RESTORE, args.ids, until, load) for _ in range(args.clients))
        )
        await sampler
    return load, time.monotonic() - started, samples


def rss_at(samples: list[tuple[float, float]], second: float) -> float:
    """The first sample taken at or after ``second`` (the last one if none was)."""
    return next((mib for at, mib in samples if at >= second), samples[-1][1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--clients", type=int, default=200, help="concurrent clients")
    parser.add_argument("--ids", type=int, default=10, help="record IDs per request")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds before RSS counts")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/soak.md")
    args = parser.parse_args()
    if args.duration <= args.warmup:
        raise SystemExit("soak: --duration must be longer than --warmup")

    procs = Processes()
    try:
        sandbox_url, url, gateway = procs.start()
        # The sandbox's books start now: nothing before the load is in them.
        urllib.request.urlopen(sandbox_url + "/_sandbox/reset", b"", timeout=10).close()
        rss_start = rss_kib(gateway.pid) / 1024
        when, load_before = time.gmtime(), os.getloadavg()[0]
        load, seconds, samples = asyncio.run(run_load(url, gateway.pid, args))
        rss_end = rss_kib(gateway.pid) / 1024
        books = get_json(sandbox_url + "/_sandbox/requests")
    finally:
        procs.stop()

    samples.append((seconds, rss_end))
    rss_warm = rss_at(samples, args.warmup)
    growth = (rss_end - rss_warm) / rss_warm
    checks = {
        "no errors": load.errors == 0,
        "served = received = distinct salts": (
            load.served == books["count"] == books["accepted"] == books["distinct_salts"]
        ),
        f"RSS growth after the warm-up < {MAX_GROWTH:.0%}": growth < MAX_GROWTH,
    }
    report = render(
        args, when, seconds, load, books, rss_start, rss_warm, rss_end, growth, load_before
    )
    report += "\n\n" + "\n".join(
        f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in checks.items()
    )
    if load.error_samples:
        report += "\n\nFirst errors:\n" + "\n".join(f"    {e}" for e in load.error_samples)
    print(report)
    if not args.no_write:
        write_section(DOC, "soak", "Soak", report)
    return 0 if all(checks.values()) else 1


def render(
    args: argparse.Namespace,
    when: time.struct_time,
    seconds: float,
    load: Load,
    books: dict[str, Any],
    rss_start: float,
    rss_warm: float,
    rss_end: float,
    growth: float,
    load_before: float,
) -> str:
    latencies = sorted(load.latencies_ms) or [float("nan")]
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    rows = [
        ("requests served (200)", f"{load.served}"),
        ("throughput", f"{load.served / seconds:.0f} req/s"),
        ("latency p50 / p99", f"{statistics.median(latencies):.1f} / {p99:.1f} ms"),
        ("errors (non-200 or exception)", f"{load.errors}"),
        ("requests the sandbox received", f"{books['count']}"),
        ("... of which verified", f"{books['accepted']}"),
        ("distinct salts the sandbox saw", f"{books['distinct_salts']}"),
        ("gateway RSS at start", f"{rss_start:.1f} MiB"),
        (f"gateway RSS after the {args.warmup:g} s warm-up", f"{rss_warm:.1f} MiB"),
        ("gateway RSS at the end", f"{rss_end:.1f} MiB"),
        ("growth after the warm-up", f"{growth:+.1%}"),
    ]
    return "\n".join(
        [
            f"Run {time.strftime('%Y-%m-%d %H:%M UTC', when)} at commit {revision()} "
            f"on: {machine()}; load average {load_before:.2f} before the run.",
            f"`python bench/soak.py --duration {args.duration:g} --clients {args.clients} "
            f"--ids {args.ids} --warmup {args.warmup:g}`: {seconds:.1f} s of load; "
            "load generator, gateway and sandbox on the same machine.",
            "",
            "| figure | value |",
            "|---|---:|",
            *(f"| {name} | {value} |" for name, value in rows),
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
