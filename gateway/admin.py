"""The admin port: ``/healthz``, ``/readyz``, ``/metrics`` and ``/status``, never on the
proxy port.

    GET /healthz   200 {"status": "ok"} while the process runs
    GET /readyz    200 {"status": "ready"}, or 503 {"status": "draining"} while the
                   process is not (or no longer) taking traffic
    GET /metrics   Prometheus text (summed over the workers under a supervisor)
    GET /status    JSON: version, config and policy SHA-256, when they were loaded,
                   the last reload's result, the workers (gateway/status.py)

The app knows the process only through one ``View``: whoever runs the admin port
(a lone gateway, or the supervisor of ``serve --workers N``) says what it shows.
Admin requests are not counted in the metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import hdrs, web

from gateway.addresses import Address
from gateway.metrics import CONTENT_TYPE, Metrics, render


@dataclass(frozen=True, slots=True)
class View:
    """What the admin port reports about the process that runs it."""

    metrics: Metrics
    ready: Callable[[], bool]  # taking traffic: listening, and not draining
    status: Callable[[], dict[str, Any]] | None = None  # the /status page, if it has one


_VIEW = web.AppKey("view", View)


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    if not request.app[_VIEW].ready():
        return web.json_response({"status": "draining"}, status=503)
    return web.json_response({"status": "ready"})


async def _status(request: web.Request) -> web.Response:
    page = request.app[_VIEW].status
    if page is None:
        return web.json_response({"status": "not available"}, status=404)
    return web.json_response(page(), headers={"Cache-Control": "no-store"})


async def _metrics(request: web.Request) -> web.Response:
    body = render(request.app[_VIEW].metrics)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def _no_server(request: web.Request, response: web.StreamResponse) -> None:
    # As on the proxy port (gateway/protocol.py): no software name and version
    # for a scanner to match against known flaws.
    response.headers.popall(hdrs.SERVER, None)


def app(view: View) -> web.Application:
    admin = web.Application()
    admin.on_response_prepare.append(_no_server)
    admin[_VIEW] = view
    admin.router.add_get("/healthz", _healthz)
    admin.router.add_get("/readyz", _readyz)
    admin.router.add_get("/metrics", _metrics)
    admin.router.add_get("/status", _status)
    return admin


async def start(address: Address, view: View) -> web.AppRunner:
    """The admin listener on ``address``; OSError (nothing left open) if it cannot bind."""
    runner = web.AppRunner(app(view), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, address.host, address.port).start()
    except OSError:
        await runner.cleanup()
        raise
    return runner
