"""Where the gateway's p99 comes from: the same load against variants of it.

Each variant is ``solapi-gateway serve`` (1 worker) started through
bench/probe.py, which times every garbage collection and can switch one part
off. They run in alternation under the same closed-loop load (10 IDs,
16 connections); the median of the rounds is reported. A part whose removal
moves p99 is part of the tail; GC pauses are reported as measured.

A py-spy profile of the shipped variant (if py-spy is installed) says where
its CPU goes: the functions holding the most samples, own time only.
"""

from __future__ import annotations

import collections
import json
import re
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from load import Run, wrk

ROOT = Path(__file__).resolve().parent.parent
VARIANTS: dict[str, str] = {
    "as shipped": "",
    "without gc.freeze()": "gc-freeze",
    "without the access log": "access-log",
    "without metrics": "metrics",
}


@dataclass
class Variant:
    label: str
    without: str
    port: int = 0
    pid: int = 0
    out: Path = Path()
    runs: list[Run] = field(default_factory=list)
    gc: dict[str, Any] = field(default_factory=dict)


def probe_prefix(out: Path, without: str) -> list[str]:
    """The command to put before ``serve --config ...``: bench/probe.py writing ``out``."""
    probe = str(ROOT / "bench" / "probe.py")
    return [sys.executable, probe, str(out), *(["--without", without] if without else [])]


def run_variants(
    start: Callable[[str, str], Variant],
    stop: Callable[[Variant], None],
    url_for: Callable[[Variant], str],
    script: Path,
    seconds: float,
    rounds: int,
) -> list[Variant]:
    """``start(label, without)`` starts one (returns it listening), ``stop`` ends it."""
    variants = [start(label, without) for label, without in VARIANTS.items()]
    try:
        for _ in range(rounds):
            for v in variants:
                v.runs.append(wrk(url_for(v), script, 16, seconds))
    finally:
        for v in variants:
            stop(v)
            try:
                v.gc = json.loads(v.out.read_text())
            except (OSError, ValueError):
                v.gc = {}
    return variants


def py_spy_top(pid: int, seconds: float, load: Callable[[], object], top: int = 15) -> list[str]:
    """The functions holding the most samples (own time) while ``load()`` runs."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        return []
    raw = Path(f"/tmp/sgw-bench-pyspy-{pid}.txt")
    proc = subprocess.Popen(
        [spy, "record", "--nonblocking", "-r", "400", "-f", "raw", "-o", str(raw),
         "-d", str(max(1, round(seconds))), "--pid", str(pid)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    load()
    proc.wait()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    try:
        lines = raw.read_text().splitlines()
    except OSError:
        return []
    finally:
        raw.unlink(missing_ok=True)
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frame = re.sub(r":\d+\)", ")", stack.split(";")[-1])
        own[frame] += int(count)
        total += int(count)
    return [f"{100 * n / total:5.1f}% {frame}" for frame, n in own.most_common(top)]


def render(variants: list[Variant], profile: list[str]) -> list[str]:
    lines = [
        "| variant | req/s | p50 ms | p99 ms | GC runs (gen 0/1/2) | GC max pause ms "
        "| GC total ms |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for v in variants:
        med = {
            k: statistics.median(getattr(r, k) for r in v.runs) for k in ("rps", "p50_ms", "p99_ms")
        }
        runs = v.gc.get("collections", {})
        counts = "/".join(str(runs.get(g, "?")) for g in ("0", "1", "2"))
        lines.append(
            f"| {v.label} | {med['rps']:.0f} | {med['p50_ms']:.2f} | {med['p99_ms']:.2f} | "
            f"{counts} | {v.gc.get('max_ms', float('nan')):.2f} | "
            f"{v.gc.get('total_ms', float('nan')):.1f} |"
        )
    if profile:
        lines += ["", "py-spy, the shipped variant under the same load (own time):", "", "```text"]
        lines += profile
        lines += ["```"]
    return lines
