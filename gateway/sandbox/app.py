"""The sandbox's HTTP app: SOLAPI's signature checks in front of the records API.

Every API request is logged, then its ``Authorization`` verified, before it
is routed. Errors look like SOLAPI's, ``{"errorCode": ..., "errorMessage": ...}``:
401 ``Unauthorized`` (missing, repeated or garbled header; "권한이 없습니다."),
403 ``InvalidAPIKey``, ``SignatureDoesNotMatch``, ``RequestTimeTooSkewed``,
``DuplicatedSignature``; then 400 ``ValidationError``, 404 ``NotFound``
(unknown path or record), 405 ``MethodNotAllowed``.

Endpoints; the response shapes are the sandbox's own, not SOLAPI's::

    POST /crm-core/v1/records/bulk/restore  {"recordIds": [1-1000 strings]}
      200 {"requestedCount": n, "restoredCount": r, "failedCount": n - r,
           "results": [{"recordId": id, "result": R}, ...]}    (in request order)
      R: restored | notDeleted (not in the trash) | notFound
         | purged (deleted over 14 days ago, or permanently: gone for good)
    POST /crm-core/v1/records/bulk/delete   {"recordIds": [...], "permanent": false}
      200 {"requestedCount": n, "deletedCount": d, "failedCount": n - d, "results": [...]}
      R: deleted (moved to the trash) | purged (permanent) | notFound
         | alreadyDeleted (in the trash or purged already: unchanged)
    DELETE /crm-core/v1/records/{id}          200 {"recordId": id, "result": R}; 404
    POST /crm-core/v1/records/{id}/restore    200 {"recordId": id, "result": R}; 404
    GET /crm-core/v1/records/trash?limit=100&offset=0      (limit 1-1000, offset >= 0)
      200 {"totalCount": t, "limit": l, "offset": o,
           "records": [{"recordId": id, "deletedAt": "...Z", "purgeAt": "...Z"}, ...]}
      restorable records only, newest deletion first; ISO 8601 UTC with milliseconds.
    GET /cash/v1/balance
      200 {"balance": 50000, "point": 1000}   fixed values: enough for the official
      SDKs' own balance call (Python ``get_balance``, Node ``getBalance``) to work

Introspection for tests, unsigned and not counted as API requests::

    GET  /_sandbox/requests  {"count": n, "accepted": a, "distinct_salts": d,
                              "requests": [last 5000]}
      count includes rejected requests; accepted counts verified ones; distinct_salts
      counts the different salts among all of them (whose header parsed), kept whole
      since the start or the last reset, so that a load test can check one fresh salt
      per request far past the last 5000 entries (``bench/soak.py`` does). An entry has
      method, path (raw, no query), query (raw), headers (lowercased names, repeats
      joined with ", "), body_sha256, body_length, verified, status (null while
      still being answered), salt and api_key (null if the header did not parse).
    POST /_sandbox/reset     clears that log and its counters; the records stay.

The records are seeded relative to the clock at ``build_app`` (see
gateway/sandbox/records.py); the request log is gateway/sandbox/requestlog.py.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from gateway import logs
from gateway.sandbox.records import RETENTION_S, RecordStore
from gateway.sandbox.requestlog import RequestLog, received
from gateway.signing import MALFORMED, Rejected, Secret, Verifier

MAX_BATCH: Final = 1000
BALANCE: Final = {"balance": 50000, "point": 1000}
DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000
# Well above the gateway's own body limit, so that limit is the one tests see.
MAX_BODY_BYTES: Final = 16 * 1024 * 1024
INTROSPECTION_PREFIX: Final = "/_sandbox/"

_UNAUTHORIZED_MESSAGE: Final = "권한이 없습니다."
_REJECTION_MESSAGES: Final = {
    "InvalidAPIKey": "Invalid API key.",
    "SignatureDoesNotMatch": "Signature does not match.",
    "RequestTimeTooSkewed": "Request date is more than 15 minutes off the server time.",
    "DuplicatedSignature": "This signature was already used within 15 minutes.",
}
_DIGITS = re.compile(r"[0-9]{1,9}")
# ensure_ascii=False: the 401 message goes out as the Korean text SOLAPI sends.
_dumps = functools.partial(json.dumps, ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class SandboxState:
    verifier: Verifier
    clock: Callable[[], float]
    delay_s: float
    records: RecordStore
    log: RequestLog


STATE: Final = web.AppKey("sandbox_state", SandboxState)


class _ApiError(Exception):
    def __init__(self, message: str, status: int = 400, code: str = "ValidationError") -> None:
        super().__init__(message)
        self.message, self.status, self.code = message, status, code


def _json(data: dict[str, Any], status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=_dumps)


def _error(status: int, code: str, message: str) -> web.Response:
    return _json({"errorCode": code, "errorMessage": message}, status)


def _rejection(code: str) -> web.Response:
    if code == MALFORMED:
        return _error(401, MALFORMED, _UNAUTHORIZED_MESSAGE)
    # Fixed messages only: the verifier's reason text never reaches a caller.
    return _error(403, code, _REJECTION_MESSAGES.get(code, "Forbidden."))


def _http_error(exc: web.HTTPException) -> web.Response:
    codes = {404: "NotFound", 405: "MethodNotAllowed", 413: "PayloadTooLarge"}
    return _error(exc.status, codes.get(exc.status, "HTTPError"), exc.reason)


@web.middleware
async def _api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith(INTROSPECTION_PREFIX):
        return await handler(request)
    state = request.app[STATE]
    response: web.StreamResponse | None = None
    try:
        # Raw bytes first, so body_sha256 is of exactly what arrived.
        body = await request.read()
    except web.HTTPException as exc:  # larger than client_max_size
        body, response = b"", _http_error(exc)
    authorizations = request.headers.getall(hdrs.AUTHORIZATION, [])
    entry = received(request, body, authorizations)
    state.log.add(entry)
    if response is None:
        response = _refusal(state, authorizations)
    if response is None:
        entry.verified = True
        state.log.accepted += 1
        if state.delay_s:
            await asyncio.sleep(state.delay_s)
        response = await _routed(request, handler)
    entry.status = response.status
    return response


def _refusal(state: SandboxState, authorizations: list[str]) -> web.Response | None:
    """SOLAPI's answer to a header that does not verify; None if it does."""
    try:
        if len(authorizations) != 1:
            raise Rejected(MALFORMED, "expected exactly one Authorization header")
        state.verifier.verify(authorizations[0], state.clock())
    except Rejected as exc:
        return _rejection(exc.code)
    return None


async def _routed(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except _ApiError as exc:
        return _error(exc.status, exc.code, exc.message)
    except web.HTTPException as exc:  # the router's own 404/405
        return _http_error(exc)


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        payload = json.loads((await request.read()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _ApiError("body must be JSON") from exc
    if not isinstance(payload, dict):
        raise _ApiError("body must be a JSON object")
    return payload


def _record_ids(payload: dict[str, Any]) -> list[str]:
    ids = payload.get("recordIds")
    if not isinstance(ids, list) or not 1 <= len(ids) <= MAX_BATCH:
        raise _ApiError(f"recordIds must be a list of 1 to {MAX_BATCH} ids")
    if not all(isinstance(record_id, str) for record_id in ids):
        raise _ApiError("every recordId must be a string")
    return ids


def _bulk(ids: list[str], results: list[str], count_name: str, success: set[str]) -> web.Response:
    done = sum(result in success for result in results)
    return _json(
        {
            "requestedCount": len(ids),
            count_name: done,
            "failedCount": len(ids) - done,
            "results": [{"recordId": i, "result": r} for i, r in zip(ids, results, strict=True)],
        }
    )


async def _bulk_restore(request: web.Request) -> web.Response:
    state = request.app[STATE]
    ids = _record_ids(await _json_object(request))
    now = state.clock()
    results = [state.records.restore(record_id, now) for record_id in ids]
    return _bulk(ids, results, "restoredCount", {"restored"})


async def _bulk_delete(request: web.Request) -> web.Response:
    state = request.app[STATE]
    payload = await _json_object(request)
    ids = _record_ids(payload)
    permanent = payload.get("permanent", False)
    if not isinstance(permanent, bool):
        raise _ApiError("permanent must be true or false")
    now = state.clock()
    results = [state.records.delete(i, now, permanent=permanent) for i in ids]
    return _bulk(ids, results, "deletedCount", {"deleted", "purged"})


async def _one_record(request: web.Request) -> web.Response:
    """DELETE one record, or POST .../restore it."""
    state, record_id = request.app[STATE], request.match_info["recordId"]
    if request.method == hdrs.METH_DELETE:
        result = state.records.delete(record_id, state.clock(), permanent=False)
    else:
        result = state.records.restore(record_id, state.clock())
    if result == "notFound":
        raise _ApiError("record not found", 404, "NotFound")
    return _json({"recordId": record_id, "result": result})


def _query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not _DIGITS.fullmatch(raw) or not low <= int(raw) <= high:
        raise _ApiError(f"{name} must be an integer from {low} to {high}")
    return int(raw)


def _iso(timestamp: float) -> str:
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def _trash(request: web.Request) -> web.Response:
    state = request.app[STATE]
    limit = _query_int(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    offset = _query_int(request, "offset", 0, 0, 999_999_999)
    found = state.records.trash(state.clock())
    page = [
        {"recordId": record_id, "deletedAt": _iso(deleted), "purgeAt": _iso(deleted + RETENTION_S)}
        for record_id, deleted in found[offset : offset + limit]
    ]
    return _json({"totalCount": len(found), "limit": limit, "offset": offset, "records": page})


async def _balance(request: web.Request) -> web.Response:
    return _json(dict(BALANCE))


async def _requests(request: web.Request) -> web.Response:
    return _json(request.app[STATE].log.as_json())


async def _reset(request: web.Request) -> web.Response:
    log = request.app[STATE].log
    log.reset()
    return _json({"count": log.count, "accepted": log.accepted})


def build_app(
    keys: dict[str, Secret],
    *,
    delay_s: float = 0.0,
    clock: Callable[[], float] = time.time,
) -> web.Application:
    """The sandbox upstream, accepting signatures made with ``keys`` (apiKey → secret).

    ``delay_s`` holds every verified request that long before it is answered, to
    stand in for a slow upstream; rejections are answered at once.
    """
    if delay_s < 0:
        raise ValueError("delay_s must not be negative")
    app = web.Application(middlewares=[_api_middleware], client_max_size=MAX_BODY_BYTES)
    app[STATE] = SandboxState(
        verifier=Verifier(dict(keys)),  # a ReplayCache of its own, per app
        clock=clock,
        delay_s=delay_s,
        records=RecordStore.seeded(clock()),
        log=RequestLog(),
    )
    # "bulk" first: the {recordId} template below would match it too.
    app.router.add_post("/crm-core/v1/records/bulk/restore", _bulk_restore)
    app.router.add_post("/crm-core/v1/records/bulk/delete", _bulk_delete)
    app.router.add_get("/crm-core/v1/records/trash", _trash)
    app.router.add_delete("/crm-core/v1/records/{recordId}", _one_record)
    app.router.add_post("/crm-core/v1/records/{recordId}/restore", _one_record)
    app.router.add_get("/cash/v1/balance", _balance)
    app.router.add_get(INTROSPECTION_PREFIX + "requests", _requests)
    app.router.add_post(INTROSPECTION_PREFIX + "reset", _reset)
    return app


async def run_sandbox(
    host: str,
    port: int,
    keys: dict[str, Secret],
    *,
    delay_s: float = 0.0,
    ready: Callable[[int], None] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """Serve the sandbox on host:port (0 picks a free port) until cancelled;
    HTTPS with ``ssl_context`` (an upstream behind an internal CA, for tests)."""
    runner = web.AppRunner(build_app(keys, delay_s=delay_s), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
        actual = int(runner.addresses[0][1])
        shown = f"[{host}]" if ":" in host else host
        scheme = "https" if ssl_context is not None else "http"
        logs.emit("sandbox_ready", listen=f"{shown}:{actual}", scheme=scheme)
        if ready is not None:
            ready(actual)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        logs.emit("sandbox_stopped")
