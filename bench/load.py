"""Load with wrk: closed-loop runs (as fast as the target answers) and paced runs
(a fixed offered rate), and what wrk printed, parsed.

wrk2 is not packaged in Debian, so pacing is done in wrk's own LuaJIT: every
thread keeps a schedule (one request per ``1/rate`` seconds, read off
``clock_gettime`` through the FFI) and ``delay()`` holds each request until its
slot. While a connection is free the schedule is kept whatever the latency;
latencies are measured from the actual send, so a target that falls behind its
schedule shows it as a lower achieved rate, which is reported next to them.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}

PACING = """
local ffi = require("ffi")
ffi.cdef[[
typedef struct {{ long tv_sec; long tv_nsec; }} bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local period_ms = {period_ms}
local next_at = nil
function delay()
  ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
  local now = tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
  if next_at == nil then next_at = now end
  next_at = next_at + period_ms
  local wait = next_at - now
  if wait < 0 then return 0 end
  return wait
end
"""


@dataclass
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int  # non-2xx/3xx answers and socket errors


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


def request_script(
    path: Path, method: str, token: str, body: str | None = None, rate: float | None = None
) -> Path:
    """A wrk script sending one request over and over; ``rate`` (per thread, per
    second) paces it."""
    lines = [f'wrk.method = "{method}"', f'wrk.headers["Authorization"] = "Bearer {token}"']
    if body is not None:
        lines += ['wrk.headers["Content-Type"] = "application/json"', f"wrk.body = [[{body}]]"]
    text = "\n".join(lines) + "\n"
    if rate is not None:
        text += PACING.format(period_ms=f"{1000.0 / rate:.6f}")
    path.write_text(text)
    return path


def wrk(
    url: str, script: Path, conns: int, seconds: float, threads: int = 2, timeout_s: int = 5
) -> Run:
    out = subprocess.run(
        ["wrk", "--latency", f"-t{threads}", f"-c{conns}", f"-d{max(1, round(seconds))}s",
         f"--timeout={timeout_s}s", "-s", str(script), url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return parse_wrk(out)
