"""``reload_on_change: true``: reload, as on SIGHUP, when a file of the running set changes.

The files are the ones the running ``Settings`` was read from
(``Settings.watched_files``: the config, the policy, the secret file, any
certificate a key names), asked afresh at every poll, since a reload may name
other files. Each is fingerprinted by ``os.stat`` through its symlinks plus its
resolved path:

    (realpath, device, inode, size, mtime)

so an edit in place, a file replaced by a rename (editors, ``kubectl cp``), and
Kubernetes' ConfigMap/Secret update, which writes a new timestamped folder and
then swaps the ``..data`` symlink to it, all count as a change; a file that
disappears does too (the reload then says what is missing).

Polling, every ``interval_s``: portable, no new dependency, and a few ``stat``
calls a second cost nothing. A change is acted on once the fingerprints have
stayed the same for one more poll, so a file written in several steps is read
once it is complete, and one swap that touches several files is one reload. A
reload that fails is not retried until the files change again.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable
from typing import Final

Fingerprint = tuple[str, int, int, int, int] | None
Snapshot = dict[str, Fingerprint]

INTERVAL_S: Final = 1.0


def fingerprint(path: str) -> Fingerprint:
    """What would tell a changed file apart, through symlinks; None if it is gone."""
    try:
        st = os.stat(path)
        return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        return None


def snapshot(paths: Iterable[str]) -> Snapshot:
    return {path: fingerprint(path) for path in paths}


class Watcher:
    """Calls ``on_change`` once the watched files changed and then held still."""

    def __init__(
        self,
        files: Callable[[], Iterable[str]],
        on_change: Callable[[list[str]], object],
        *,
        enabled: Callable[[], bool] = lambda: True,
        interval_s: float = INTERVAL_S,
    ) -> None:
        self.files, self.on_change, self.enabled = files, on_change, enabled
        self.interval_s = interval_s
        self.seen = snapshot(files())

    def poll(self, pending: Snapshot | None) -> Snapshot | None:
        """One look: the changed snapshot still settling (None when nothing is pending)."""
        now = snapshot(self.files())
        if pending is not None and now == pending:  # held still for a whole interval
            keys = now.keys() | self.seen.keys()
            changed = sorted(p for p in keys if now.get(p) != self.seen.get(p))
            self.on_change(changed)
            # The reload may name other files: the new baseline is what was just read.
            current = list(self.files())
            self.seen = {p: now[p] if p in now else fingerprint(p) for p in current}
            return None
        if now != self.seen:
            return now  # changed (or still changing): look again next time
        return None

    async def run(self) -> None:
        """Poll until cancelled; a disabled watcher keeps its baseline fresh."""
        pending: Snapshot | None = None
        while True:
            await asyncio.sleep(self.interval_s)
            if not self.enabled():
                self.seen, pending = snapshot(self.files()), None
                continue
            pending = self.poll(pending)
