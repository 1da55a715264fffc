"""``make bench``, part two: what rate limits and the shared state cost, in one run.

Three gateways (1 worker each, metrics and access log on) in front of the same
nginx upstream, posting 10 valid record IDs with a bearer token:

    none     no limits
    memory   one requests limit and one items limit, state.backend: memory
    redis    the same two limits, state.backend: redis (a local redis-server)

The limits are set high enough never to refuse: what is measured is the cost
of checking and consuming them. Runs are interleaved (``--repeats`` of each,
medians reported). Also measured: one ``consume`` round trip to Redis from
Python, and the replay memory's bytes per remembered salt at 1,000,000 salts,
in a process's memory and in the file ``serve --workers N`` shares.
Targets: memory >= 0.95x and Redis >= 0.80x the no-limits throughput at 16
connections; <= 64 bytes per salt.

    python bench/limits.py [--duration 8] [--repeats 3] [--salts 1000000] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

from common import (
    ROOT,
    free_port,
    machine,
    stop_all,
    wait_for,
    wait_port,
    write_gateway_config,
    write_section,
)

DOC = ROOT / "docs" / "state.md"
TOKEN = "bench-member-token"
ANSWER = '{"requestedCount":10,"restoredCount":10,"failedCount":0,"results":[]}'
LIMITS = """limits:
  - {name: calls, key: principal, routes: ["*"], requests_per_s: 1000000}
  - {name: records, key: principal, routes: [records-bulk-restore], items_per_s: 100000000}
"""


@dataclass(frozen=True)
class Run:
    rps: float
    p99_ms: float
    errors: int


def wrk(port: int, script: Path, conns: int, seconds: float) -> Run:
    text = subprocess.run(
        ["wrk", "--latency", "-t2", f"-c{conns}", f"-d{max(1, round(seconds))}s", "-s",
         str(script), f"http://127.0.0.1:{port}/crm-core/v1/records/bulk/restore"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    errors = sum(
        int(n) for n in re.findall(r"(?:Non-2xx or 3xx responses|timeout):?\s+(\d+)", text)
    )
    return Run(
        float(rps.group(1)) if rps else 0.0,
        float(p99.group(1)) * scale[p99.group(2)] if p99 else float("nan"),
        errors,
    )


def record_ids(n: int) -> list[str]:
    return [f"CRMRC{i:016d}BENCH{i % 1000000:06d}" for i in range(n)]


def start(tmp: Path, procs: list[subprocess.Popen[bytes]]) -> tuple[dict[str, int], str]:
    """The upstream, a Redis and three gateways; their ports by name, and the Redis URL."""

    def spawn(cmd: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(tmp / log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    up = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"worker_processes 1; daemon off; pid {tmp}/nginx.pid; error_log {tmp}/nginx.err warn;\n"
        "events { worker_connections 4096; }\n"
        f"http {{ access_log off; client_body_temp_path {tmp}/body; keepalive_requests 1000000;\n"
        f"  server {{ listen 127.0.0.1:{up} backlog=4096; keepalive_timeout 300s;\n"
        f"    location / {{ default_type application/json; return 200 '{ANSWER}'; }} }} }}\n"
    )
    spawn(["nginx", "-c", str(conf)], "nginx.log")
    redis_port = free_port()
    spawn(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
           "--appendonly", "no", "--dir", str(tmp)], "redis.log")  # fmt: skip
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    script = str(Path(sys.executable).parent / "solapi-gateway")
    ports = {}
    for name in ("none", "memory", "redis"):
        port, admin = free_port(), free_port()
        config = write_gateway_config(tmp / name, port, admin, f"http://127.0.0.1:{up}",
                                      "NCSBENCH00000001", TOKEN)  # fmt: skip
        if name != "none":
            policy = config.parent / "policy.yaml"
            policy.write_text(policy.read_text() + LIMITS)
        if name == "redis":
            state = {"backend": "redis", "url": redis_url, "timeout_s": 0.5}
            config.write_text(config.read_text() + f"state: {json.dumps(state)}\n")
        spawn([script, "serve", "--config", str(config)], f"gateway-{name}.log")
        wait_for(f"http://127.0.0.1:{admin}/readyz")
        ports[name] = port
    wait_port(up)
    wait_port(redis_port)
    return ports, redis_url


async def redis_round_trip_us(url: str, calls: int = 5000) -> float:
    """One ``consume`` (the Lua script, two buckets) awaited from Python, sequentially."""
    from gateway.config import StateURL
    from gateway.limits import charges
    from gateway.policy import parse_policy
    from gateway.stateredis import RedisState

    policy, problems = parse_policy(
        "roles: [A]\nroutes:\n  - {name: r, method: POST, path: /r, min_role: A,"
        " batch: {field: ids, max_items: 1000}}\n" + LIMITS.replace("records-bulk-restore", "r")
    )
    assert policy is not None, problems
    found = charges(policy.limits, "r", "bench", 10)
    store = RedisState(StateURL(url, url), "bench:", 1.0)
    for _ in range(200):
        await store.consume(found)
    started = time.perf_counter()
    for _ in range(calls):
        await store.consume(found)
    elapsed = time.perf_counter() - started
    await store.close()
    return elapsed / calls * 1e6


def replay_in_memory(salts: int) -> tuple[float, float, float]:
    """Bytes per salt at ``salts`` remembered: the new memory's tables (and every
    allocation it made, by tracemalloc), and the old single-dict cache's."""
    from gateway.replay import ReplayMemory
    from gateway.signing import ReplayCache

    now = time.time()
    tracemalloc.start()
    memory = ReplayMemory()
    for i in range(salts):
        t = now + i * 0.0009  # about 1100 a second: a million within the window
        memory.remember("NCSBENCH00000001", f"{i:032x}", t, t, salts + 1)
    traced = tracemalloc.get_traced_memory()[0]
    tables = memory.nbytes()
    memory.close()
    del memory
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    old = ReplayCache(max_entries=salts + 1)
    for i in range(salts):
        old.check_and_add(f"NCSBENCH00000001:{i:032x}", now + i * 0.0009)
    old_bytes = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return tables / salts, traced / salts, old_bytes / salts


async def replay_on_disk(folder: Path, salts: int) -> float:
    from gateway.statefile import StateFile

    path = folder / "state.sqlite3"
    store = StateFile(str(path), 5.0)
    now = time.time()
    for i in range(salts):
        t = now + i * 0.0009
        await store.remember("NCSBENCH00000001", f"{i:032x}", t, t, salts + 1)
    await store.close()  # the last connection checkpoints the log into the file
    size = sum(p.stat().st_size for p in folder.glob("state.sqlite3*"))
    return size / salts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--conns", type=int, default=16)
    parser.add_argument("--salts", type=int, default=1_000_000)
    parser.add_argument("--no-write", action="store_true", help="do not update docs/state.md")
    args = parser.parse_args()
    for tool in ("wrk", "nginx", "redis-server"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench: {tool} is not installed (make bench installs it)")
    tmp = Path(tempfile.mkdtemp(prefix="sgw-limits-"))
    procs: list[subprocess.Popen[bytes]] = []
    runs: dict[str, list[Run]] = {}
    try:
        ports, redis_url = start(tmp, procs)
        script = tmp / "post-10.lua"
        body = json.dumps({"recordIds": record_ids(10)})
        script.write_text(
            'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            f'wrk.headers["Authorization"] = "Bearer {TOKEN}"\nwrk.body = [[{body}]]\n'
        )
        for port in ports.values():
            wrk(port, script, args.conns, 2)  # warm-up
        for repeat in range(args.repeats):
            for name, port in ports.items():
                run = wrk(port, script, args.conns, args.duration)
                runs.setdefault(name, []).append(run)
                print(f"repeat {repeat + 1} {name:<7} {run.rps:>8.0f} req/s  p99 "
                      f"{run.p99_ms:6.2f} ms  errors {run.errors}", flush=True)  # fmt: skip
        round_trip = asyncio.run(redis_round_trip_us(redis_url))
    finally:
        stop_all(procs, tmp, 5)
    folder = Path(tempfile.mkdtemp(prefix="sgw-replay-"))
    try:
        tables, traced, old = replay_in_memory(args.salts)
        on_disk = asyncio.run(replay_on_disk(folder, args.salts))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    report = render(runs, round_trip, (tables, traced, old, on_disk), args)
    print("\n" + report)
    if not args.no_write:
        write_section(DOC, "limits-bench", "Shared state", report)
    return 0


def render(
    runs: dict[str, list[Run]], round_trip: float, salt: tuple[float, ...], args: argparse.Namespace
) -> str:
    rps = {name: statistics.median(r.rps for r in rs) for name, rs in runs.items()}
    p99 = {name: statistics.median(r.p99_ms for r in rs) for name, rs in runs.items()}
    errors = {name: sum(r.errors for r in rs) for name, rs in runs.items()}
    redis_cost = (1 / rps["redis"] - 1 / rps["none"]) * 1e6
    memory_cost = (1 / rps["memory"] - 1 / rps["none"]) * 1e6
    tables, traced, old, on_disk = salt

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()}; load average at the end "
        f"{os.getloadavg()[0]:.1f} (the machine is shared: absolute numbers move, ratios less).",
        f"`wrk -c{args.conns}`, 10 record IDs per POST, {args.repeats} interleaved runs of "
        f"{args.duration:g} s each, medians.",
        "",
        "| gateway | req/s | ratio to no limits | p99 ms | errors | target |",
        "|---|---:|---:|---:|---:|---|",
        f"| no limits | {rps['none']:,.0f} | 1.00 | {p99['none']:.2f} | {errors['none']} | |",
        f"| 2 limits, memory | {rps['memory']:,.0f} | {rps['memory'] / rps['none']:.2f} | "
        f"{p99['memory']:.2f} | {errors['memory']} | ≥ 0.95: "
        f"{verdict(rps['memory'] >= 0.95 * rps['none'])} |",
        f"| 2 limits, redis | {rps['redis']:,.0f} | {rps['redis'] / rps['none']:.2f} | "
        f"{p99['redis']:.2f} | {errors['redis']} | ≥ 0.80: "
        f"{verdict(rps['redis'] >= 0.80 * rps['none'])} |",
        "",
        f"- Cost per request, from the throughputs: memory {_cost(memory_cost)}, "
        f"Redis {_cost(redis_cost)} (one round trip: the Lua script checks and consumes both "
        "limits; on this machine Redis's own CPU is taken from the same 2 cores).",
        f"- One `consume` awaited alone from Python against the local Redis: {round_trip:.0f} µs.",
        f"- Replay memory at {args.salts:,} salts: {tables:.1f} bytes per salt in its tables, "
        f"{traced:.1f} counting every allocation it made (target ≤ 64: "
        f"{verdict(traced <= 64)}); the former single-dict cache took {old:.0f}.",
        f"- The file `serve --workers N` shares: {on_disk:.1f} bytes per salt on disk "
        f"(target ≤ 64: {verdict(on_disk <= 64)}).",
    ]
    return "\n".join(lines)


def _cost(us: float) -> str:
    return f"{us:.0f} µs" if us > 0 else "none measurable (within the noise)"


if __name__ == "__main__":
    sys.exit(main())
