"""``make bench``: the gateway against its baselines, in one run on one machine.

Targets, all in front of the same nginx upstream stub (a fixed JSON answer for
the restore; a ~130 kB one for the trash listing):

    (a)  upstream   the stub directly: the limit for any proxy here
    (b)  bare       bench/forwarder.py: aiohttp forwarding with no checks at all
    (m)  minimal    bench/minimal.py: the smallest signing proxy doing the job
                    (token, orjson + joined regex, signing, pooled forward,
                    whole answers; no metrics, no log)
    (c1) gateway    solapi-gateway serve, 1 worker, metrics and access log on
    (c2) gateway    solapi-gateway serve --workers 2
    (d)  nginx      nginx proxy_pass, for reference

1. Throughput: for each body (10 and 1000 valid record IDs) and connection count
   (16, 64) every target gets a warm-up, then ``--repeats`` wrk runs of
   ``--duration`` seconds, alternating targets so drift hits all alike; medians.
2. Added latency: paced load at half of (c1)'s capacity, against (c1) and (a).
3. Abuse (bench/abuse.py): normal paced traffic before and during each scenario.
4. The tail (bench/tail.py): variants of the gateway, GC pauses, a profile.

Results are printed and written into docs/performance.md between the
``bench:begin``/``bench:end`` markers, with every target met or missed (the
rest of that file is hand-written analysis and is kept).

    python bench/run.py [--duration 8] [--repeats 3] [--warmup 2] [--micro-json F]
                        [--skip latency,abuse,tail] [--no-write]
    python bench/run.py --targets m,c1      # a quick look at two targets, nothing written
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import abuse
import report
import tail
from common import RESTORE, ROOT, TRASH, free_port, rss_kib, stop_all, wait_for, wait_port
from common import write_gateway_config as gateway_yaml
from load import request_script, wrk
from report import Paced, Runs

DOC = ROOT / "docs" / "performance.md"
TOKEN = "bench-member-token"
API_KEY = "NCSBENCH00000001"
ANSWER = '{"requestedCount":10,"restoredCount":10,"failedCount":0,"results":[]}'
BODIES = (10, 1000)
CONNS = (16, 64)
LABELS = {
    "a": "(a) upstream direct",
    "b": "(b) bare aiohttp forwarder",
    "m": "(m) minimal signing proxy",
    "c1": "(c1) gateway, 1 worker",
    "c2": "(c2) gateway, 2 workers",
    "d": "(d) nginx proxy_pass",
}


def record_ids(n: int) -> list[str]:
    return [f"CRMRC{i:016d}BENCH{i % 1000000:06d}" for i in range(n)]


def trash_answer() -> str:
    """A ~130 kB JSON page like the sandbox's trash listing at ?limit=1000."""
    records = [
        {"recordId": f"CRMRC{i:016d}TRASH{i:06d}", "deletedAt": "2026-11-28T09:15:02.000Z",
         "purgeAt": "2026-12-12T09:15:02.000Z"}
        for i in range(1000)
    ]  # fmt: skip
    return json.dumps({"totalCount": 1000, "limit": 1000, "offset": 0, "records": records})


class Bench:
    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="sgw-bench-"))
        # nginx's workers (user nobody when started as root) read the trash page here.
        self.tmp.chmod(0o755)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.upstream_port = free_port()
        self.ports: dict[str, int] = {}
        self.pids: dict[str, int] = {}

    def spawn(self, cmd: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(self.tmp / log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def nginx(self, name: str, server: str) -> None:
        folder = self.tmp / name
        folder.mkdir()
        temp = " ".join(
            f"{kind}_temp_path {folder}/{kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (folder / "nginx.conf").write_text(
            f"worker_processes 1; daemon off; pid {folder}/nginx.pid;\n"
            f"error_log {folder}/error.log warn; events {{ worker_connections 4096; }}\n"
            f"http {{ access_log off; {temp} client_max_body_size 2m;\n"
            "  client_body_buffer_size 2m; keepalive_requests 1000000;\n"
            f"  upstream up {{ server 127.0.0.1:{self.upstream_port}; keepalive 128; }}\n"
            f"  {server}\n}}\n"
        )
        self.spawn(["nginx", "-c", str(folder / "nginx.conf")], f"{name}.log")

    def gateway(
        self, key: str, workers: int = 1, *, upstream: dict[str, Any] | None = None,
        extra: str = "", command: list[str] | None = None,
    ) -> subprocess.Popen[bytes]:  # fmt: skip
        """A gateway on fresh ports; ``command`` replaces ``solapi-gateway`` (bench/probe.py)."""
        port, admin = free_port(), free_port()
        config = gateway_yaml(
            self.tmp / f"gw-{key}", port, admin, f"http://127.0.0.1:{self.upstream_port}",
            API_KEY, TOKEN, upstream=upstream,
        )  # fmt: skip
        if extra:
            config.write_text(config.read_text() + extra)
        cli = [str(Path(sys.executable).with_name("solapi-gateway"))]
        argv = [*(command or cli), "serve", "--config", str(config), "--workers", str(workers)]
        proc = self.spawn(argv, f"gateway-{key}.log")
        wait_for(f"http://127.0.0.1:{admin}/readyz", proc)
        self.ports[key], self.pids[key] = port, proc.pid
        return proc

    def start(self) -> None:
        up = self.upstream_port
        (self.tmp / "trash.json").write_text(trash_answer())
        self.nginx(
            "upstream",
            f"server {{ listen 127.0.0.1:{up} backlog=4096; keepalive_timeout 300s; "
            f"location = {TRASH} {{ default_type application/json; "
            f"alias {self.tmp}/trash.json; }} "
            f"location / {{ default_type application/json; return 200 '{ANSWER}'; }} }}",
        )
        self.ports["a"] = up
        python, bench = sys.executable, ROOT / "bench"
        upstream = f"http://127.0.0.1:{up}"
        self.ports["b"] = free_port()
        self.spawn([python, str(bench / "forwarder.py"), str(self.ports["b"]), upstream], "b.log")
        self.ports["m"] = free_port()
        self.spawn(
            [python, str(bench / "minimal.py"), str(self.ports["m"]), upstream, TOKEN, API_KEY,
             "bench-secret-" + "0" * 24], "m.log",
        )  # fmt: skip
        self.gateway("c1", 1)
        self.gateway("c2", 2)
        self.ports["d"] = free_port()
        self.nginx(
            "proxy",
            f"server {{ listen 127.0.0.1:{self.ports['d']} backlog=4096; keepalive_timeout 300s; "
            "location / { proxy_pass http://up; proxy_http_version 1.1; "
            'proxy_set_header Connection ""; } }',
        )
        for key in LABELS:
            wait_port(self.ports[key])

    def url(self, key: str, path: str = RESTORE) -> str:
        return f"http://127.0.0.1:{self.ports[key]}{path}"

    def rss(self, key: str) -> list[int]:
        """RSS (KiB) of each worker of gateway ``key``."""
        pid = self.pids[key]
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
        workers = [int(p) for p in out.split()] if key == "c2" else [pid]
        return [rss_kib(p) for p in workers]

    def stop(self) -> None:
        stop_all(self.procs, self.tmp, 5)


def throughput(bench: Bench, scripts: dict[int, Path], args: argparse.Namespace) -> dict[str, Any]:
    runs: Runs = {}
    rss_repeats: list[int] = []
    for repeat in range(args.repeats):
        for n in BODIES:
            for conns in CONNS:
                for key, label in LABELS.items():
                    if repeat == 0 and args.warmup > 0:
                        wrk(bench.url(key), scripts[n], conns, args.warmup)
                    run = wrk(bench.url(key), scripts[n], conns, args.duration)
                    runs.setdefault((key, n, conns), []).append(run)
                    print(
                        f"repeat {repeat + 1} body {n:>4} c{conns:<3} {label:<28} "
                        f"{run.rps:>8.0f} req/s  p50 {run.p50_ms:6.2f}  p99 {run.p99_ms:6.2f} ms"
                        f"  errors {run.errors}",
                        flush=True,
                    )
        rss_repeats.append(sum(bench.rss("c1")))
    return {"runs": runs, "rss_repeats": rss_repeats}


def latency(bench: Bench, runs: Runs, seconds: float) -> Paced:
    """Paced at half of (c1)'s capacity (16 connections), against (c1) and (a)."""
    rows: Paced = []
    for n in BODIES:
        capacity = statistics.median(r.rps for r in runs[("c1", n, 16)])
        rate = capacity / 2
        script = request_script(
            bench.tmp / f"paced-{n}.lua", "POST", TOKEN,
            json.dumps({"recordIds": record_ids(n)}), rate / 2,  # per thread, 2 threads
        )  # fmt: skip
        measured = {key: wrk(bench.url(key), script, 16, seconds) for key in ("a", "c1")}
        rows.append((n, rate, measured))
        print(f"paced {rate:.0f} req/s body {n}: {measured}", flush=True)
    return rows


def abuses(bench: Bench, normal: Path, rate: float, seconds: float) -> list[report.Abused]:
    rows: list[report.Abused] = []
    for scenario in abuse.SCENARIOS:
        key = f"abuse-{scenario.name}"
        proc = bench.gateway(
            key, 1, upstream={"max_concurrent": abuse.MAX_CONCURRENT},
            extra="send_timeout_s: 60\n" + scenario.config,  # the attack outlasts the run
        )  # fmt: skip
        victim = abuse.Victim(bench.ports[key], 0, proc.pid, TOKEN, abuse.MAX_CONCURRENT, bench.tmp)
        url = bench.url(key)
        wrk(url, normal, 16, 2)  # warm
        before, rss_before = wrk(url, normal, 16, seconds), rss_kib(proc.pid)
        scenario.start(victim)
        try:
            during = wrk(url, normal, 16, seconds)
            rss_during = rss_kib(proc.pid)
        finally:
            scenario.stop()
        rows.append(report.Abused(scenario, rate, before, during, rss_before, rss_during))
        print(f"abuse {scenario.name}: before {before}, during {during}", flush=True)
    return rows


def tail_runs(bench: Bench, script: Path, seconds: float) -> list[tail.Variant]:
    def start(label: str, without: str) -> tail.Variant:
        key = "tail-" + (without or "shipped")
        out = bench.tmp / f"{key}.json"
        proc = bench.gateway(key, 1, command=tail.probe_prefix(out, without))
        return tail.Variant(label, without, bench.ports[key], proc.pid, out)

    def stop(v: tail.Variant) -> None:
        for proc in bench.procs:
            if proc.pid == v.pid and proc.poll() is None:
                proc.terminate()
                proc.wait(10)

    return tail.run_variants(
        start, stop, lambda v: f"http://127.0.0.1:{v.port}{RESTORE}", script, seconds, 2
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measured run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--micro-json", type=Path, help="pytest-benchmark --benchmark-json output")
    parser.add_argument("--skip", default="", help="comma-separated: latency, abuse, tail")
    parser.add_argument(
        "--targets",
        default=",".join(LABELS),
        help="comma-separated subset, e.g. m,c1 (implies --no-write)",
    )
    parser.add_argument("--no-write", action="store_true", help="do not update docs/")
    args = parser.parse_args()
    skip = set(args.skip.split(","))
    chosen = args.targets.split(",")
    if set(chosen) != set(LABELS):  # a partial run is for looking, not for the record
        args.no_write = True
        skip |= {"latency", "abuse", "tail"}
        for key in set(LABELS) - set(chosen):
            del LABELS[key]
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench: {tool} is not installed (make bench installs it)")
    bench = Bench()
    try:
        bench.start()
        scripts = {
            n: request_script(bench.tmp / f"post-{n}.lua", "POST", TOKEN,
                              json.dumps({"recordIds": record_ids(n)}))
            for n in BODIES
        }  # fmt: skip
        rss_start = {k: bench.rss(k) for k in ("c1", "c2")}
        done = throughput(bench, scripts, args)
        rss_end = {k: bench.rss(k) for k in ("c1", "c2")}
        if "latency" in skip:
            print("\n".join(report.render_throughput(LABELS, done["runs"])))
            return 0
        paced = latency(bench, done["runs"], args.duration)
        abused = []
        if "abuse" not in skip:
            rate = paced[0][1]  # half of (c1)'s capacity with 10 IDs
            normal = request_script(
                bench.tmp / "normal.lua", "POST", TOKEN,
                json.dumps({"recordIds": record_ids(10)}), rate / 2,
            )  # fmt: skip
            abused = abuses(bench, normal, rate, args.duration)
        variants: list[tail.Variant] = []
        profile: list[str] = []
        if "tail" not in skip:
            variants = tail_runs(bench, scripts[10], args.duration)
            profile = tail.py_spy_top(
                bench.pids["c1"], args.duration,
                lambda: wrk(bench.url("c1"), scripts[10], 16, args.duration),
            )  # fmt: skip
        micro = json.loads(args.micro_json.read_text()) if args.micro_json else None
        text = report.render(
            LABELS, done, rss_start, rss_end, paced, abused, variants, profile, micro, args
        )
        print("\n" + text)
        if not args.no_write:
            report.write(DOC, text)
    finally:
        bench.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
