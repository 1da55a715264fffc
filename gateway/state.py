"""What the processes of one gateway share, chosen once when a process starts.

Today the state is the replay memory of internal HMAC signatures (a salt seen
within the window is refused):

    a lone process (serve, demo)       an in-memory ``ReplayCache``
    a worker of serve --workers N      the SQLite ``SharedReplayCache`` file that its
                                       supervisor made for all workers (gateway/replay.py)

``build`` is the one place that decides. The process's start-up code
(gateway/service.py) calls it once and hands the ``State`` to the ``Gateway``,
whose verifier keeps using it across reloads; nothing in the request's walk
reads the environment or opens a file to find it. A backend shared across
machines would be one more branch in ``build``, and rate-limit counters one
more field of ``State``.

``Shared`` is what a supervisor sets up for its workers (``prepare_shared``) and
names on each worker's command line: the replay file, and the folder where the
workers' metrics are summed (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from gateway.config import Settings
from gateway.replay import SharedReplayCache
from gateway.signing import ReplayCache, ReplayMemory


@dataclass(frozen=True, slots=True)
class Shared:
    """What the supervisor of ``serve --workers N`` set up for all its workers."""

    replay_file: str  # the SQLite file of the replay memory every worker uses
    metrics_dir: str  # where each worker writes its metrics, summed on /metrics


@dataclass(frozen=True, slots=True)
class State:
    """The state a serving process uses; closed once, after its last request."""

    replay: ReplayMemory

    @classmethod
    def in_memory(cls) -> State:
        """A lone process's state, kept in its own memory."""
        return cls(ReplayCache())

    async def close(self) -> None:
        self.replay.close()


def build(settings: Settings, shared: Shared | None = None) -> State:
    """The state of a serving process: its own (``shared`` None), or a worker's share.

    ``settings`` is where a choice of backend would be read from; there is one today.
    """
    if shared is None:
        return State.in_memory()
    return State(SharedReplayCache(shared.replay_file))


@contextlib.contextmanager
def prepare_shared(metrics_dir: str | None = None) -> Iterator[Shared]:
    """Folders for one run of a supervisor's workers, removed when it ends.

    ``metrics_dir`` is a folder the operator chose for the metrics files; it is
    kept, but the files of an earlier run are removed (they would be summed in).
    """
    with contextlib.ExitStack() as stack:
        if metrics_dir:
            os.makedirs(metrics_dir, exist_ok=True)
            for name in os.listdir(metrics_dir):
                if name.endswith(".db"):
                    os.unlink(os.path.join(metrics_dir, name))
        else:
            metrics_dir = stack.enter_context(_folder("solapi-gateway-metrics-"))
        replay_dir = stack.enter_context(_folder("solapi-gateway-replay-"))
        yield Shared(os.path.join(replay_dir, "replay.sqlite3"), metrics_dir)


@contextlib.contextmanager
def _folder(prefix: str) -> Iterator[str]:
    path = tempfile.mkdtemp(prefix=prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
