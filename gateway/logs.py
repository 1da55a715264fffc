"""Everything the gateway writes to stderr: one JSON object per line.

``emit`` writes an event with one buffered write, so lines from concurrent
requests (and from several workers sharing stderr) never interleave. Library
log records (aiohttp's, asyncio's) are turned into the same JSON lines by
``JsonHandler``, so an operator's log pipeline parses every line.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from typing import Any

import orjson
from aiohttp.http_exceptions import HttpProcessingError


def now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def emit(event: str, **fields: Any) -> None:
    record = {"time": now_iso(), "event": event, **fields}
    line = orjson.dumps(record, default=str).decode() + "\n"
    try:
        sys.stderr.write(line)
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed stderr must not take a request down with it
        pass


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
