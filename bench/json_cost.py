"""What a JSON body can cost the event loop (a measurement, not a test).

    .venv/bin/python bench/json_cost.py            # this checkout
    .venv/bin/python bench/json_cost.py --e2e      # and other callers' latency beside it
    .venv/bin/python bench/json_cost.py --tree DIR # another checkout's gateway/, e.g. to
                                                   # compare with: git archive main gateway

Part 1 reads bodies of up to 1 MiB (the default ``max_body_bytes``) the way the
batch route's body step does (``batch.checked_items``), on one thread, and
reports the fastest and median time of each: that time is the event loop's,
every other request of the process waits through it. The shapes are what a
caller controls: many small values, a ':' in a string (which once sent the body
to the slow strict reader), escapes, numbers, duplicate keys.

Part 2 (``--e2e``) runs a sandbox and a gateway and measures a normal caller's
restore latency alone, then while 4 connections send 1 MiB bodies in a loop:
first one long string (cheap to read: what moving the bytes costs), then the
small objects with a ':' in a string (what reading them costs on top).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MIB = 1 << 20
ID = b"CRMRC1260422100000000REC11122233"


def fill(start: bytes, unit: bytes, end: bytes, size: int = MIB - 64, most: int = 1 << 30) -> bytes:
    """``start`` + as many ``unit``s (joined by commas, at most ``most``) as fit in
    ``size`` + ``end``."""
    count = min(most, (size - len(start) - len(end)) // (len(unit) + 1))
    return start + b",".join([unit] * count) + end


def shapes() -> dict[str, bytes]:
    head = b'{"recordIds": ["' + ID + b'"], "x": ['
    ids = b",".join(b'"CRMRC%016dABCDEFGHIJK"' % n for n in range(1000))
    return {
        "1000 IDs (the usual batch)": b'{"recordIds": [' + ids + b"]}",
        "small objects + ':' in a string": fill(head, b'{"a":1}', b'], "n": "a:b"}'),
        "small objects, no ':' in strings": fill(head, b'{"a":1}', b"]}"),
        "objects with a float": fill(head, b'{"a":1.5}', b'], "n": "a:b"}'),
        "empty arrays": fill(head, b"[]", b"]}"),
        "short strings": fill(head, b'""', b"]}"),
        "small ints": fill(head, b"1", b"]}"),
        "one 1 MiB string of ':'": b'{"recordIds": ["'
        + ID
        + b'"], "n": "'
        + b":" * (MIB - 80)
        + b'"}',
        "one string of \\u003a escapes": b'{"recordIds": ["'
        + ID
        + b'"], "n": "'
        + b"\\u003a" * ((MIB - 80) // 6)
        + b'"}',
        "small objects + a duplicate key": fill(head, b'{"a":1}', b'], "x": 1}'),
        "small objects, then garbage": fill(head, b'{"a":1}', b"]}x"),
        "digits runs in strings": fill(head, b'"1234567890123456789012"', b"]}"),
        # Just under the bound of 4096 values: the most a walk or the strict reader sees.
        "2000 small objects + ':' in a string": fill(
            head, b'{"a":1}', b'], "n": "a:b"}', most=2000
        ),
        "2000 float objects + a 19-digit number": fill(
            head, b'{"a":1.5}', b'], "n": 1234567890123456789}', most=2000
        ),
        "2000 float objects, then garbage": fill(head, b'{"a":1.5}', b"]}x", most=2000),
    }


def time_each(read: Callable[[bytes], Any], body: bytes, runs: int) -> tuple[float, float]:
    """The fastest and the median read, in ms (the slowest says more about the
    machine's other work than about the body)."""
    took = []
    for _ in range(runs):
        started = time.perf_counter()
        with contextlib.suppress(Exception):  # a refusal costs the loop as much as a pass
            read(body)
        took.append(time.perf_counter() - started)
    return min(took) * 1000, statistics.median(took) * 1000


def use_tree(tree: str | None) -> None:
    """Import ``gateway`` from ``tree`` instead of this checkout's editable install."""
    if tree is None:
        return
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path.insert(0, str(Path(tree).resolve()))


def micro(runs: int) -> None:
    import re

    from gateway import batch
    from gateway.batch import BatchRule

    rule = BatchRule(
        field="recordIds",
        max_items=1000,
        item_pattern=re.compile(r"^CRMRC[0-9]{16}[0-9A-Za-z]{11}$"),
        unique=True,
    )
    print(f"gateway.batch from {batch.__file__}")
    print(f"{'body':<40} {'bytes':>8} {'fastest ms':>10} {'median ms':>10}  outcome")
    for name, body in shapes().items():
        fastest, median = time_each(lambda b: batch.checked_items(b, rule), body, runs)
        try:
            outcome = f"{len(batch.checked_items(body, rule))} item(s)"
        except Exception as exc:  # the refusal is the outcome
            outcome = getattr(exc, "code", type(exc).__name__)
        print(f"{name:<40} {len(body):>8} {fastest:>10.2f} {median:>10.2f}  {outcome}")


async def e2e(tree: str | None, seconds: float) -> None:
    import aiohttp

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import RESTORE, free_port, stop_all, wait_for, write_gateway_config

    tmp = Path(tempfile.mkdtemp(prefix="json-cost-"))
    api_key, token = "NCSBENCHJSON0001", "bench-json-token"
    sandbox_port, port, admin = free_port(), free_port(), free_port()
    config = write_gateway_config(
        tmp, port, admin, f"http://127.0.0.1:{sandbox_port}", api_key, token
    )
    prelude = "import sys; " + (
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
        f"sys.path.insert(0, {str(Path(tree).resolve())!r}); "
        if tree
        else ""
    )
    run = prelude + "from gateway.cli import main; sys.exit(main(sys.argv[1:]))"
    secret = (tmp / "secret").read_text().strip()
    env = {**os.environ, "SANDBOX_API_SECRET": secret}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", run, "sandbox", "--listen", f"127.0.0.1:{sandbox_port}",
             "--api-key", api_key],
            env=env, stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [sys.executable, "-c", run, "serve", "--config", str(config)],
            stderr=subprocess.DEVNULL,
        ),
    ]  # fmt: skip
    try:
        wait_for(f"http://127.0.0.1:{admin}/readyz", procs[1])
        url = f"http://127.0.0.1:{port}{RESTORE}"
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        normal = b'{"recordIds": ["' + ID + b'"]}'
        attack = shapes()["small objects + ':' in a string"]
        # The same size, cheap to read: what moving 1 MiB bodies costs by itself.
        control = b'{"recordIds": ["' + ID + b'"], "n": "' + b"x" * (len(attack) - 60) + b'"}'
        async with aiohttp.ClientSession() as session:

            async def probe(duration: float) -> list[float]:
                took, end = [], time.monotonic() + duration
                while time.monotonic() < end:
                    started = time.perf_counter()
                    async with session.post(url, data=normal, headers=headers) as r:
                        await r.read()
                    took.append((time.perf_counter() - started) * 1000)
                    await asyncio.sleep(0.01)
                return took

            async def hammer(body: bytes, end: float) -> int:
                sent = 0
                while time.monotonic() < end:
                    async with session.post(url, data=body, headers=headers) as r:
                        await r.read()
                    sent += 1
                return sent

            async def beside(body: bytes) -> tuple[list[float], int]:
                end = time.monotonic() + seconds
                senders = [asyncio.create_task(hammer(body, end)) for _ in range(4)]
                took = await probe(seconds)
                return took, sum(await asyncio.gather(*senders))

            alone = await probe(seconds)
            cheap, cheap_bodies = await beside(control)
            costly, costly_bodies = await beside(attack)

        def line(label: str, took: list[float]) -> str:
            q = statistics.quantiles(took, n=100)
            return f"{label:<34} p50 {q[49]:7.2f} ms   p99 {q[98]:7.2f} ms   ({len(took)} requests)"

        print(line("normal restores alone", alone))
        print(line("beside 4 senders of 1 MiB strings", cheap))
        print(f"  ({cheap_bodies} bodies of {len(control)} bytes in {seconds:g} s)")
        print(line("beside 4 senders of 1 MiB objects", costly))
        print(f"  ({costly_bodies} bodies of {len(attack)} bytes in {seconds:g} s)")
    finally:
        stop_all(procs, tmp, 5.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", help="a checkout whose gateway/ to measure instead")
    parser.add_argument("--runs", type=int, default=20, help="reads of each body")
    parser.add_argument("--e2e", action="store_true", help="also measure other callers")
    parser.add_argument("--seconds", type=float, default=5.0, help="per e2e phase")
    args = parser.parse_args()
    use_tree(args.tree)
    micro(args.runs)
    if args.e2e:
        asyncio.run(e2e(args.tree, args.seconds))


if __name__ == "__main__":
    main()
