"""``serve --workers N``: N worker processes on one port, under one supervisor.

Each worker is ``python -m gateway _worker`` bound to the proxy port with
``SO_REUSEPORT``, so the kernel spreads connections over them. Its command line
names what the supervisor set up for all workers (``state.Shared``) and the
pipe on which it says "listening" (``report_ready``). The supervisor owns
everything that must exist once:

- the admin port (gateway/admin.py), with one ``/metrics`` summed over all
  workers (prometheus multiprocess mode: the folder, ``$PROMETHEUS_MULTIPROC_DIR``
  if set, else a temporary one, is cleaned at start, and a dead worker's live
  gauges are dropped);
- SIGHUP: the supervisor validates the new config once, counts the reload
  once, and only then tells every worker to reload; if it is invalid, the
  workers only reopen their audit file (SIGUSR1). ``reload_on_change`` is the
  supervisor's too: it polls the files and reloads as on SIGHUP;
- ``/status``: the set it validated last, the last reload, its workers' pids;
- with ``state.backend: memory``, the replay memory of internal HMAC signatures
  and the rate-limit buckets: one SQLite file that every worker opens, in a
  folder removed at exit, so a replayed header is refused and a limit holds
  whichever worker a request reaches (gateway/statefile.py);
- SIGTERM/SIGINT: ``/readyz`` turns 503 and every worker drains on its own;
- restarts: a worker that dies is replaced, unless workers die straight after
  starting again and again (a port taken, a broken install), when the
  supervisor gives up rather than spin.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass, field

from gateway import __version__, admin, config, logs, state
from gateway.config import Settings
from gateway.metrics import Metrics, mark_process_dead
from gateway.status import Status, Workers
from gateway.watch import Watcher
from gateway.yamlsource import ConfigError

_FAST_DEATH_S = 2.0  # a worker that dies sooner than this after starting counts as a crash loop
_MAX_FAST_DEATHS = 5


@dataclass(slots=True)
class Worker:
    index: int
    process: asyncio.subprocess.Process
    started: float
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class Supervisor:
    def __init__(self, settings: Settings, workers: int, shared: state.Shared) -> None:
        self.settings = settings
        self.started_with = settings  # whose listen and admin_listen are the ones bound
        self.count = workers
        self.shared = shared
        self.metrics = Metrics(multiprocess_dir=shared.metrics_dir)
        self.workers: dict[int, Worker] = {}
        self.draining = False
        self.fast_deaths = 0
        self.stop = asyncio.Event()
        self.exit_code = 0
        self.status = Status(settings)

    async def _spawn(self, index: int) -> Worker:
        read_fd, write_fd = os.pipe()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "_worker", "--config", self.settings.config_path,
            "--state-file", self.shared.state_file, "--metrics-dir", self.shared.metrics_dir,
            "--ready-fd", str(write_fd),
            pass_fds=(write_fd,),
        )  # fmt: skip
        os.close(write_fd)
        worker = Worker(index, process, time.monotonic())
        asyncio.get_running_loop().add_reader(read_fd, self._on_ready, worker, read_fd)
        return worker

    def _on_ready(self, worker: Worker, read_fd: int) -> None:
        # One byte means "listening"; end-of-file means it died before that.
        loop = asyncio.get_running_loop()
        loop.remove_reader(read_fd)
        with contextlib.suppress(OSError):
            if os.read(read_fd, 1):
                worker.ready.set()
        os.close(read_fd)

    def page(self) -> dict[str, object]:
        ready = [w for w in self.workers.values() if w.ready.is_set()]
        pids = tuple(w.process.pid for w in self.workers.values())
        return self.status.page(Workers(self.count, len(ready), pids))

    def _emit(self, event: str, **fields: object) -> None:
        logs.emit(event, pid=os.getpid(), process="supervisor", **fields)

    def ready(self) -> bool:
        return (
            not self.draining
            and len(self.workers) == self.count
            and all(w.ready.is_set() for w in self.workers.values())
        )

    async def _watch(self, index: int) -> None:
        """Keep worker ``index`` running until the supervisor drains."""
        while not self.draining:
            worker = await self._spawn(index)
            self.workers[index] = worker
            if self.draining:  # SIGTERM came while it was starting: it drains too
                worker.process.send_signal(signal.SIGTERM)
            code = await worker.process.wait()
            mark_process_dead(self.metrics, worker.process.pid)
            if self.draining:
                return
            lived = time.monotonic() - worker.started
            self.fast_deaths = self.fast_deaths + 1 if lived < _FAST_DEATH_S else 0
            logs.emit("worker_exited", worker=index, pid=worker.process.pid, code=code)
            if self.fast_deaths >= _MAX_FAST_DEATHS:
                logs.emit("giving_up", reason="workers keep dying right after they start")
                self.exit_code = 1
                self.stop.set()
                return
            if lived < _FAST_DEATH_S:
                await asyncio.sleep(0.5)

    def _signal_all(self, sig: int) -> None:
        # A worker installs its handlers before it reports ready: until then SIGHUP
        # or SIGUSR1 would kill it (it reads the config as it starts anyway).
        ready_only = sig in (signal.SIGHUP, signal.SIGUSR1)
        for worker in self.workers.values():
            if ready_only and not worker.ready.is_set():
                continue
            if worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(sig)

    def reload(self) -> None:
        try:
            fresh = config.load(self.settings.config_path)
        except ConfigError as exc:
            errors = [str(p) for p in exc.problems]
            self.metrics.reloads.labels("failure").inc()
            self.status.refused(errors)
            self._emit("reload_failed", errors=errors)
            # The workers keep their set, but logrotate's SIGHUP still needs the reopen.
            self._signal_all(signal.SIGUSR1)
            return
        self.metrics.reloads.labels("success").inc()
        self.status.reloaded(fresh)
        moved = config.restart_needed_for(fresh, self.started_with)
        self.settings = fresh
        self._emit(
            "reloading_workers",
            **({"restart_needed_for": moved} if moved else {}),
            **({"warnings": [str(w) for w in fresh.warnings]} if fresh.warnings else {}),
        )
        self._signal_all(signal.SIGHUP)

    def _files_changed(self, paths: list[str]) -> None:
        self._emit("files_changed", files=paths)
        self.reload()

    async def run(self) -> int:
        address = self.settings.admin_listen
        try:
            view = admin.View(self.metrics, self.ready, self.page)
            admin_runner = await admin.start(address, view)
        except OSError as exc:
            self._emit("start_failed", error=f"cannot listen on {address}: {exc.strerror or exc}")
            return 1
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop.set)
        loop.add_signal_handler(signal.SIGINT, self.stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.add_signal_handler(signal.SIGUSR1, self._signal_all, signal.SIGUSR1)
        watchers = [asyncio.create_task(self._watch(i)) for i in range(self.count)]
        files = Watcher(
            lambda: self.settings.watched_files(),
            self._files_changed,
            enabled=lambda: self.settings.reload_on_change,
        )
        watching = asyncio.create_task(files.run())
        self._emit(
            "supervisor_started", version=__version__, workers=self.count,
            listen=str(self.settings.listen), admin_listen=str(self.settings.admin_listen),
        )  # fmt: skip
        await self.stop.wait()
        watching.cancel()
        self.draining = True
        self._emit("draining", workers=len(self.workers))
        self._signal_all(signal.SIGTERM)
        grace = self.settings.shutdown_grace_s + 5
        try:
            await asyncio.wait_for(asyncio.gather(*watchers, return_exceptions=True), grace)
        except TimeoutError:
            self._signal_all(signal.SIGKILL)
        await admin_runner.cleanup()
        self._emit("stopped", workers=self.count)
        return self.exit_code


async def supervise(settings: Settings, workers: int) -> int:
    # An operator may choose the metrics folder (e.g. a volume); only its old files go.
    with state.prepare_shared(os.environ.get("PROMETHEUS_MULTIPROC_DIR")) as shared:
        return await Supervisor(settings, workers, shared).run()


def report_ready(fd: int) -> None:
    """Called by a worker once it listens: one byte on the pipe its supervisor gave it."""
    with contextlib.suppress(OSError):
        os.write(fd, b"1")
    with contextlib.suppress(OSError):
        os.close(fd)
