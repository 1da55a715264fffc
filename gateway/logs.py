"""Everything the gateway writes to stderr: one JSON object per line.

``emit`` writes an event with one write(2), so lines from concurrent
requests (and from several workers sharing stderr) never interleave. The
access lines of one event-loop turn are gathered (``access``) and written
together, in writes of whole lines of at most ``PIPE_BUF`` bytes, which a
pipe never interleaves either: one syscall for a turn's lines instead of one
each. ``flush`` writes them at once; an exiting process writes what is left. Library
log records (aiohttp's, asyncio's) are turned into the same JSON lines by
``JsonHandler``, so an operator's log pipeline parses every line.

``AuditLog`` is the opt-in ``audit_log:`` file: one JSON line per batch that
passed validation, naming the caller and every record ID it sent. It is
opened in append mode, written with one ``write(2)`` per line (so workers
sharing the file never interleave), and reopened on SIGHUP so that logrotate
can move it away.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import select
import sys
import time
import traceback
from collections.abc import Mapping
from typing import Any, Final

import orjson
from aiohttp.http_exceptions import HttpProcessingError

_second: list[Any] = [-1, ""]  # the last whole second formatted, and its text


def now_iso() -> str:
    t = time.time()
    second = int(t)
    if second != _second[0]:  # strftime once a second, not once a line
        _second[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))]
    return f"{_second[1]}.{int((t - second) * 1000):03d}Z"


def emit(event: str, **fields: Any) -> None:
    record = {"time": now_iso(), "event": event, **fields}
    line = orjson.dumps(record, default=str, option=orjson.OPT_APPEND_NEWLINE)
    flush()  # the access lines gathered so far go first
    _write(line)


def _write(data: bytes) -> None:
    try:
        sys.stderr.flush()  # anything written through the text layer goes first
        view = memoryview(data)
        while view:
            view = view[os.write(2, view) :]
    except (OSError, ValueError):  # a closed stderr must not take a request down with it
        pass


# Writes up to this size are never interleaved with other writers' on a pipe.
_ATOMIC: Final = select.PIPE_BUF


class _Gathered:
    """The access lines of the current event-loop turn, not yet written."""

    __slots__ = ("lines", "loop", "scheduled", "size")

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.size = 0
        self.scheduled = False
        # The loop last seen running: asking asyncio each time costs a getpid(2) on 3.11.
        self.loop: asyncio.AbstractEventLoop | None = None


_gathered = _Gathered()


def access(line: dict[str, Any]) -> None:
    """Write one access line by the end of this event-loop turn (at once if no
    loop runs). ``line`` is the whole record, ``time`` and ``event`` first."""
    data = orjson.dumps(line, default=str, option=orjson.OPT_APPEND_NEWLINE)
    gathered = _gathered
    if gathered.size + len(data) > _ATOMIC:
        flush()
    gathered.lines.append(data)
    gathered.size += len(data)
    loop = gathered.loop
    if loop is None or not loop.is_running():  # first line, or a loop that has ended
        try:
            loop = gathered.loop = asyncio.get_running_loop()
        except RuntimeError:
            flush()
            return
        gathered.scheduled = False
    if not gathered.scheduled:
        gathered.scheduled = True
        loop.call_soon(flush)


def flush() -> None:
    """Write the gathered access lines now."""
    gathered = _gathered
    gathered.scheduled = False
    if gathered.lines:
        data = b"".join(gathered.lines)
        gathered.lines.clear()
        gathered.size = 0
        # No sys.stderr.flush() here, unlike emit(): the text layer is line-buffered,
        # so whole lines written through it are out already.
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(2, view) :]
        except OSError:
            pass


atexit.register(flush)


# What an audit line keeps of the access-log line (absent ones are left out).
AUDIT_FIELDS: Final = (
    "request_id", "principal", "role", "via", "route", "method", "path",
    "status", "errorCode", "upstream_status", "attempts",
)  # fmt: skip


class AuditLog:
    """An append-only JSON-lines file; ``reopen`` after it was rotated."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = self._open(path)

    @staticmethod
    def _open(path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def write_batch(self, access: Mapping[str, Any], record_ids: list[str]) -> None:
        """The audit line of one batch: who, where, what upstream said, and every ID."""
        record = {"time": now_iso(), **{k: access[k] for k in AUDIT_FIELDS if k in access}}
        record["record_ids"] = record_ids
        self.write(record)

    def write(self, record: dict[str, Any]) -> None:
        line = orjson.dumps(record, default=str) + b"\n"
        try:
            written = os.write(self._fd, line)
        except OSError as exc:  # a full disk must not take the request down with it
            emit("audit_log_failed", path=self.path, error=exc.strerror or str(exc))
            return
        if written != len(line):
            emit("audit_log_failed", path=self.path, error="short write")

    def reopen(self, path: str | None = None) -> None:
        """Open ``path`` (default: the same name again), then close the old file.

        Raises OSError, keeping the old file, if the new one cannot be opened.
        """
        path = self.path if path is None else path
        fd = self._open(path)
        old, self._fd, self.path = self._fd, fd, path
        os.close(old)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class JsonHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        fields: dict[str, Any] = {
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            fields["error"] = type(exc).__name__
            if isinstance(exc, HttpProcessingError):
                # A request aiohttp could not parse. Its text quotes the offending
                # bytes, e.g. a whole "Authorization: Bearer ..." line: name the
                # fault, never the bytes.
                fields["status"] = exc.code
            else:
                fields["traceback"] = "".join(traceback.format_exception(exc)).rstrip()
        emit("log", **fields)


def setup(level: int = logging.WARNING) -> None:
    """Route every library logger to JSON lines on stderr."""
    root = logging.getLogger()
    root.handlers[:] = [JsonHandler()]
    root.setLevel(level)
    # aiohttp's access logger would write a second, non-JSON line per request.
    logging.getLogger("aiohttp.access").disabled = True
