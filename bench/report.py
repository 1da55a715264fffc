"""The generated part of docs/performance.md: every figure of one bench/run.py run,
and each target, met or missed, computed from them."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import abuse
from common import machine, write_section
from load import Run
from tail import Variant
from tail import render as render_tail

Runs = dict[tuple[str, int, int], list[Run]]
Paced = list[tuple[int, float, dict[str, Run]]]
BODIES = (10, 1000)
CONNS = (16, 64)
MIB = 1024  # KiB

# The targets (issue: "Fast as the simplest signing proxy, with every check on").
MIN_RATIO_TO_MINIMAL = 0.90
MAX_P99_TO_MINIMAL = 1.3
MAX_VALIDATE_1000_US = 100.0
MAX_RSS_MIB = 60.0


@dataclass
class Abused:
    scenario: abuse.Scenario
    rate: float
    before: Run
    during: Run
    rss_before_kib: int
    rss_during_kib: int


def median(runs: list[Run], attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in runs)


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def micro_us(micro: dict[str, Any] | None, name: str) -> float | None:
    """The median of a pytest-benchmark test, in µs."""
    for bench in (micro or {}).get("benchmarks", []):
        if bench["name"] == name:
            return float(bench["stats"]["median"]) * 1e6
    return None


def render(
    labels: dict[str, str],
    done: dict[str, Any],
    rss_start: dict[str, list[int]],
    rss_end: dict[str, list[int]],
    paced: Paced,
    abused: list[Abused],
    variants: list[Variant],
    profile: list[str],
    micro: dict[str, Any] | None,
    args: argparse.Namespace,
) -> str:
    runs: Runs = done["runs"]
    rps = {key: median(r, "rps") for key, r in runs.items()}
    p99 = {key: median(r, "p99_ms") for key, r in runs.items()}
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on: {machine()}; {nginx}.",
        f"wrk -t2, {args.duration:g} s per run after a {args.warmup:g} s warm-up, "
        f"{args.repeats} alternating repeats, medians.",
        "",
        "### Throughput",
        "",
        *render_throughput(labels, runs),
    ]
    lines += ["", "### Added latency at half of the gateway's capacity", ""]
    lines += [
        "Paced load (16 connections) at half of what (c1) managed above, against (c1) and",
        "the upstream directly; the gateway's own share is the difference.",
        "",
        "| body | offered req/s | target | achieved req/s | p50 ms | p99 ms |",
        "|---|---:|---|---:|---:|---:|",
    ]
    added = []
    for n, rate, measured in paced:
        for key in ("a", "c1"):
            r = measured[key]
            lines.append(
                f"| {n} IDs | {rate:.0f} | {labels[key]} | {r.rps:.0f} | {r.p50_ms:.2f} | "
                f"{r.p99_ms:.2f} |"
            )
        a, c = measured["a"], measured["c1"]
        added.append((n, c.p50_ms - a.p50_ms, c.p99_ms - a.p99_ms))
    lines.append("")
    lines += [f"Added by the gateway, {n} IDs: p50 +{p50:.2f} ms, p99 +{p99v:.2f} ms."
              for n, p50, p99v in added]  # fmt: skip

    if abused:
        lines += ["", "### Abusive callers beside normal traffic", ""]
        lines += [
            f"Normal traffic: 10-ID restores paced at {abused[0].rate:.0f} req/s, 16 connections, "
            f"to a gateway of its own (upstream.max_concurrent {abuse.MAX_CONCURRENT}, "
            "send_timeout_s 60 so that the attack outlasts the measurement).",
            "",
            "| scenario | what | normal p50 ms before → during | p99 ms before → during "
            "| errors during | RSS MiB before → during |",
            "|---|---|---|---|---:|---|",
        ]
        for row in abused:
            b, d = row.before, row.during
            lines.append(
                f"| {row.scenario.name} | {row.scenario.what} | {b.p50_ms:.2f} → {d.p50_ms:.2f} "
                f"| {b.p99_ms:.2f} → {d.p99_ms:.2f} | {d.errors} | "
                f"{row.rss_before_kib / MIB:.1f} → {row.rss_during_kib / MIB:.1f} |"
            )

    if variants:
        lines += ["", "### The tail", ""]
        lines += [
            "The same closed-loop load (10 IDs, 16 connections, 2 alternating rounds, medians)",
            "against variants of (c1) run through bench/probe.py, which also times every",
            "garbage collection while serving.",
            "",
        ]
        lines += render_tail(variants, profile)

    validate = micro_us(micro, "test_parse_and_validate_1000_ids")
    if micro:
        lines += ["", "### Micro-benchmarks (pytest-benchmark, medians)", ""]
        lines += ["| benchmark | median µs |", "|---|---:|"]
        for bench in micro.get("benchmarks", []):
            lines.append(f"| {bench['name']} | {float(bench['stats']['median']) * 1e6:.1f} |")

    lines += ["", "### Targets", "", "| target | measured | |", "|---|---|---|"]
    for n in BODIES:
        for conns in CONNS:
            ratio = rps[("c1", n, conns)] / rps[("m", n, conns)]
            lines.append(
                f"| (c1) ≥ {MIN_RATIO_TO_MINIMAL:.2f} × (m), {n} IDs, {conns} connections | "  # noqa: RUF001
                f"{ratio:.3f} | {verdict(ratio >= MIN_RATIO_TO_MINIMAL)} |"
            )
    for n in BODIES:
        for conns in CONNS:
            ratio = p99[("c1", n, conns)] / p99[("m", n, conns)]
            lines.append(
                f"| (c1) p99 ≤ {MAX_P99_TO_MINIMAL} × (m) p99, {n} IDs, {conns} connections | "  # noqa: RUF001
                f"{ratio:.3f} | {verdict(ratio <= MAX_P99_TO_MINIMAL)} |"
            )
    for n, p50, p99v in added:
        lines.append(
            f"| added latency at half capacity, {n} IDs (reported) | p50 +{p50:.2f} ms, "
            f"p99 +{p99v:.2f} ms | — |"
        )
    if validate is not None:
        lines.append(
            f"| parse + validate 1000 IDs ≤ {MAX_VALIDATE_1000_US:.0f} µs | {validate:.0f} µs | "
            f"{verdict(validate <= MAX_VALIDATE_1000_US)} |"
        )
    end = [k / MIB for k in rss_end["c1"] + rss_end["c2"]]
    repeats = [r / MIB for r in done["rss_repeats"]]
    flat = max(repeats) - min(repeats) <= 0.05 * max(repeats)
    lines.append(
        f"| RSS ≤ {MAX_RSS_MIB:.0f} MiB per worker after the run, flat across repeats | "
        f"{max(end):.1f} MiB at most; (c1) after each repeat: "
        + ", ".join(f"{r:.1f}" for r in repeats)
        + f" MiB | {verdict(max(end) <= MAX_RSS_MIB and flat)} |"
    )
    lines += [
        "",
        "RSS at start: (c1) " + ", ".join(f"{k / MIB:.1f}" for k in rss_start["c1"])
        + " MiB, (c2) " + ", ".join(f"{k / MIB:.1f}" for k in rss_start["c2"]) + " MiB per worker.",
    ]  # fmt: skip
    return "\n".join(lines)


def render_throughput(labels: dict[str, str], runs: Runs) -> list[str]:
    """Medians of whatever targets ran (a partial run, bench/run.py --targets)."""
    lines = [
        "| body | conns | target | req/s | p50 ms | p99 ms | errors |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for n in BODIES:
        for conns in CONNS:
            for key, label in labels.items():
                r = runs[(key, n, conns)]
                lines.append(
                    f"| {n} IDs | {conns} | {label} | {median(r, 'rps'):.0f} | "
                    f"{median(r, 'p50_ms'):.2f} | {median(r, 'p99_ms'):.2f} | "
                    f"{sum(x.errors for x in r)} |"
                )
    return [*lines, "", *render_ratios(runs)]


def render_ratios(runs: Runs) -> list[str]:
    """Throughput ratios between the targets that ran, and (c1)'s p99 over (m)'s."""
    rps = {key: median(r, "rps") for key, r in runs.items()}
    p99 = {key: median(r, "p99_ms") for key, r in runs.items()}
    ran = {key for key, _, _ in runs}
    pairs = [
        (x, y)
        for x, y in [("c1", "m"), ("c1", "b"), ("m", "b"), ("c2", "c1"), ("d", "a")]
        if x in ran and y in ran
    ]
    tail = {"c1", "m"} <= ran
    lines = [
        "| body | conns | " + " | ".join(f"{x}/{y}" for x, y in pairs)
        + (" | p99 c1/m |" if tail else " |"),
        "|---|---|" + "---:|" * (len(pairs) + tail),
    ]  # fmt: skip
    for n in BODIES:
        for conns in CONNS:
            cells = [f"{rps[(x, n, conns)] / rps[(y, n, conns)]:.2f}" for x, y in pairs]
            if tail:
                cells.append(f"{p99[('c1', n, conns)] / p99[('m', n, conns)]:.2f}")
            lines.append(f"| {n} IDs | {conns} | " + " | ".join(cells) + " |")
    return lines


def write(doc: Path, text: str) -> None:
    write_section(doc, "bench", "Performance", text)
