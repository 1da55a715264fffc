"""Running the gateway process: listeners, the admin port, signals.

    SIGHUP           reload config, policy and secret file together; keep the
                     old set if anything is invalid; reopen the audit log
    SIGUSR1          only reopen the audit log (after logrotate moved it)
    SIGTERM/SIGINT   /readyz → 503, stop accepting, let in-flight requests
                     finish within shutdown_grace_s, exit 0 (another signal
                     while draining cuts nothing off)

The admin listener (/healthz, /readyz, /metrics) is a separate aiohttp app on
its own address, and keeps answering while the proxy drains.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway import __version__, config, logs
from gateway.config import Settings
from gateway.metrics import CONTENT_TYPE, Metrics, render
from gateway.protocol import GatewayServer
from gateway.server import Gateway
from gateway.supervisor import signal_ready
from gateway.yamlsource import ConfigError

_METRICS = web.AppKey("metrics", Metrics)
_READY: web.AppKey[Callable[[], bool]] = web.AppKey("ready")


def admin_app(metrics: Metrics, ready: Callable[[], bool]) -> web.Application:
    app = web.Application()
    app[_METRICS] = metrics
    app[_READY] = ready

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        if not request.app[_READY]():
            return web.json_response({"status": "draining"}, status=503)
        return web.json_response({"status": "ready"})

    async def metrics_page(request: web.Request) -> web.Response:
        body = render(request.app[_METRICS])
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    return app


async def start_admin(
    settings: Settings, metrics: Metrics, ready: Callable[[], bool]
) -> web.AppRunner | None:
    """The admin listener, or None (logged) if its address cannot be bound."""
    runner = web.AppRunner(admin_app(metrics, ready), access_log=None, handle_signals=False)
    await runner.setup()
    address = settings.admin_listen
    try:
        await web.TCPSite(runner, address.host, address.port).start()
    except OSError as exc:
        logs.emit("start_failed", error=f"cannot listen on {address}: {exc.strerror or exc}")
        await runner.cleanup()
        return None
    return runner


def open_audit(settings: Settings) -> logs.AuditLog | None:
    """The configured audit file, opened for appending (None when not configured)."""
    return logs.AuditLog(settings.audit_log) if settings.audit_log else None


def _reopen_audit(gateway: Gateway, path: str | None) -> None:
    """Point the gateway at ``path``'s audit file, freshly opened (logrotate moved the old)."""
    audit = gateway.audit
    if path is None:
        gateway.audit = None
        if audit is not None:
            audit.close()
    elif audit is None:
        gateway.audit = logs.AuditLog(path)
    else:
        audit.reopen(path)


def reload(gateway: Gateway, started: Settings, *, count: bool = True) -> bool:
    """Re-read everything the running config was loaded from; swap only if all is valid.

    ``started`` is the set the process started with: its listeners are the ones bound.

    ``count`` is off in workers: their supervisor validated and counted this reload.
    The audit log is reopened either way, so a logrotate ``postrotate`` SIGHUP works
    even while the config on disk is broken.
    """
    current = gateway.loaded.settings
    try:
        fresh = config.load(current.config_path)
        _reopen_audit(gateway, fresh.audit_log)
    except ConfigError as exc:
        return _reload_failed(gateway, count, [str(p) for p in exc.problems])
    except OSError as exc:
        why = f"{fresh.audit_log}: cannot open the audit log: {exc.strerror or exc}"
        return _reload_failed(gateway, count, [why])
    gateway.swap(fresh)
    gateway.metrics.principals = named_principals(fresh)
    if count:
        gateway.metrics.reloads.labels("success").inc()
    moved = [
        name
        for name in ("listen", "admin_listen")
        if getattr(fresh, name) != getattr(started, name)
    ]
    logs.emit(
        "reloaded",
        routes=len(fresh.policy.routes),
        principals=len(fresh.policy.principals),
        **({"restart_needed_for": moved} if moved else {}),
    )
    return True


def _reload_failed(gateway: Gateway, count: bool, errors: list[str]) -> bool:
    if count:
        gateway.metrics.reloads.labels("failure").inc()
    logs.emit("reload_failed", errors=errors)
    reopen_audit(gateway)  # logrotate's postrotate SIGHUP needs it whatever the config says
    return False


def reopen_audit(gateway: Gateway) -> None:
    """Reopen the current audit file under its name, e.g. after logrotate moved it."""
    path = gateway.loaded.settings.audit_log
    try:
        _reopen_audit(gateway, path)
    except OSError as exc:
        logs.emit("audit_log_failed", path=path, error=exc.strerror or str(exc))


def named_principals(settings: Settings) -> frozenset[str]:
    return frozenset(p.name for p in settings.policy.principals)


async def serve(
    settings: Settings,
    *,
    ready: Callable[[Gateway], Awaitable[None]] | None = None,
    worker: bool = False,
) -> int:
    """Run until SIGTERM/SIGINT (or cancellation), then drain and return the exit code.

    As one of several workers (``worker=True``) the process shares the proxy port
    and leaves the admin port and the reload count to the supervisor.
    """
    gateway = Gateway(settings, Metrics())
    gateway.metrics.principals = named_principals(settings)
    try:
        gateway.audit = open_audit(settings)
    except OSError as exc:
        logs.emit("start_failed", error=f"cannot open audit_log: {exc.strerror or exc}")
        return 1
    await gateway.upstream.start()
    proxy = web.ServerRunner(
        GatewayServer(
            gateway.handle,
            gateway.bad_request,
            access_log=None,
            auto_decompress=False,  # the body is forwarded byte for byte
            # One timer bounds both an idle kept-alive connection and a caller
            # that never finishes sending its headers (see gateway/protocol.py).
            keepalive_timeout=settings.keepalive_timeout_s,
            # After a refusal, unread body bytes are drained this long at most, so
            # the caller can read the answer before the connection is closed.
            lingering_time=2.0,
        ),
        handle_signals=False,
        shutdown_timeout=settings.shutdown_grace_s,
    )
    await proxy.setup()

    async def abandon() -> int:
        await proxy.cleanup()
        await gateway.upstream.close()
        if gateway.audit is not None:
            gateway.audit.close()
        return 1

    address = settings.listen
    try:
        await web.TCPSite(
            proxy, address.host, address.port, backlog=1024, reuse_port=worker or None
        ).start()
    except OSError as exc:
        logs.emit("start_failed", error=f"cannot listen on {address}: {exc.strerror or exc}")
        return await abandon()
    admin = None
    if not worker:
        admin = await start_admin(settings, gateway.metrics, lambda: not gateway.draining)
        if admin is None:
            return await abandon()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(
        signal.SIGHUP, lambda: reload(gateway, settings, count=not worker) and None
    )
    loop.add_signal_handler(signal.SIGUSR1, reopen_audit, gateway)
    logs.emit(
        "started",
        version=__version__,
        pid=os.getpid(),
        listen=str(settings.listen),
        **({} if worker else {"admin_listen": str(settings.admin_listen)}),
        upstream=str(settings.upstream.url),
        routes=len(settings.policy.routes),
    )
    try:
        if worker:
            signal_ready()
        if ready is not None:
            await ready(gateway)
        await stop.wait()
    finally:
        # The handlers stay until the drain is over: Ctrl-C or systemd signal every
        # process of the group, so a worker may get SIGINT and then its supervisor's
        # SIGTERM (or a logrotate SIGHUP), and the default action of any of those
        # would cut the requests in flight off.
        gateway.draining = True
        logs.emit("draining", grace_s=gateway.loaded.settings.shutdown_grace_s)
        # Stops accepting at once, then waits for in-flight requests up to the grace.
        await proxy.cleanup()
        await gateway.upstream.close()
        if admin is not None:
            await admin.cleanup()
        if gateway.audit is not None:
            gateway.audit.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            loop.remove_signal_handler(sig)
        logs.emit("stopped")
    return 0
