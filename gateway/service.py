"""Running one gateway process: what it starts, in which order, how it stops.

    SIGHUP           reload config, policy, secret file and TLS certificate, key
                     and client CA together; keep the old set if anything is
                     invalid; reopen the audit log (``reload_on_change: true``
                     does the same when a file changes, gateway/watch.py)
    SIGUSR1          only reopen the audit log (after logrotate moved it)
    SIGTERM/SIGINT   /readyz → 503, stop accepting, let in-flight requests
                     finish within shutdown_grace_s, exit 0 (another signal
                     while draining cuts nothing off)

``serve`` starts each resource in turn and registers it on one
``AsyncExitStack`` as soon as it is started:

    state → tracing → audit log → upstream session → admin listener
          → signal handlers and the file watcher → proxy listener (HTTPS with
          ``tls:``) → the mark that starts a drain

Every way out (a start that fails, the drain after SIGTERM, cancellation)
unwinds that one stack in reverse. Once the proxy listened, that begins with
the drain: ``/readyz`` says 503, the proxy stops accepting and lets in-flight
requests finish while the handlers stay (so a second signal cuts nothing
off); then the admin listener, the upstream session, the audit file and the
state go. The admin listener (gateway/admin.py)
starts before the proxy for that reason: it answers all through the drain.
``/readyz`` turns 200 only once the proxy listens.

A worker of ``serve --workers N`` is given its share (``state.Shared``) by its
supervisor: it binds the proxy port with ``SO_REUSEPORT`` and leaves the admin
port, the reload count, ``/status`` and the file watcher to the supervisor.

Every line about the process itself (started, reloaded, reload_failed,
draining, stopped) names its ``pid`` and ``process`` (``gateway``, or
``worker`` under a supervisor), so the lines of several workers sharing one
stderr can be told apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway import __version__, admin, config, logs, state, tls, tracing
from gateway.addresses import Address
from gateway.config import Settings
from gateway.metrics import Metrics
from gateway.protocol import GatewayServer
from gateway.server import Gateway, settle_after_start
from gateway.status import Status, Workers
from gateway.watch import Watcher
from gateway.yamlsource import ConfigError


class StartFailed(Exception):
    """Something could not be started: what was, is let go, and the process exits 1."""


def cannot_listen(address: Address, exc: OSError) -> str:
    return f"cannot listen on {address}: {exc.strerror or exc}"


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


def lifecycle(event: str, process: str, **fields: object) -> None:
    """A line about the process itself, naming which process it is."""
    logs.emit(event, pid=os.getpid(), process=process, **fields)


def reload(
    gateway: Gateway,
    started: Settings,
    *,
    count: bool = True,
    status: Status | None = None,
    process: str = "gateway",
) -> bool:
    """Re-read everything the running config was loaded from; swap only if all is valid.

    ``started`` is the set the process started with: its listeners are the ones bound.

    ``count`` is off in workers: their supervisor validated and counted this reload
    (and keeps ``status``). The audit log is reopened either way, so a logrotate
    ``postrotate`` SIGHUP works even while the config on disk is broken.
    """
    current = gateway.loaded.settings
    try:
        fresh = config.load(current.config_path)
        _reopen_audit(gateway, fresh.audit_log)
        reload_tls(gateway, fresh)
    except ConfigError as exc:
        return _reload_failed(gateway, count, [str(p) for p in exc.problems], status, process)
    except OSError as exc:
        why = f"{fresh.audit_log}: cannot open the audit log: {exc.strerror or exc}"
        return _reload_failed(gateway, count, [why], status, process)
    except tls.TlsError as exc:
        return _reload_failed(gateway, count, [f"tls: {exc}"], status, process)
    gateway.swap(fresh)
    gateway.metrics.principals = named_principals(fresh)
    if count:
        gateway.metrics.reloads.labels("success").inc()
    if status is not None:
        status.reloaded(fresh)
    moved = config.restart_needed_for(fresh, started)
    lifecycle(
        "reloaded",
        process,
        routes=len(fresh.policy.routes),
        principals=len(fresh.policy.principals),
        **({"restart_needed_for": moved} if moved else {}),
        **({"warnings": [str(w) for w in fresh.warnings]} if fresh.warnings else {}),
    )
    return True


def reload_tls(gateway: Gateway, settings: Settings) -> None:
    """Serve new handshakes with the certificate, key and client CA that ``settings``
    name, as the files are now (connections already open keep theirs). Raises
    ``tls.TlsError`` and changes nothing if they cannot be used. Nothing to do on a
    plain-HTTP port, or when ``tls:`` was removed (that takes a restart)."""
    if gateway.tls is not None and settings.tls is not None:
        gateway.tls.reload(settings.tls)


def _reload_failed(
    gateway: Gateway, count: bool, errors: list[str], status: Status | None, process: str
) -> bool:
    if count:
        gateway.metrics.reloads.labels("failure").inc()
    if status is not None:
        status.refused(errors)
    lifecycle("reload_failed", process, errors=errors)
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
    shared: state.Shared | None = None,
    ready: Callable[[Gateway], Awaitable[None]] | None = None,
) -> int:
    """Run until SIGTERM/SIGINT (or cancellation), then drain; return the exit code.

    ``shared``: what a worker's supervisor set up for all its workers (None for
    a lone process). ``ready`` is awaited once the proxy listens.
    """
    process = "worker" if shared else "gateway"
    try:
        async with contextlib.AsyncExitStack() as stack:
            gateway, stop = await _start(stack, settings, shared)
            settle_after_start()
            lifecycle(
                "started",
                process,
                version=__version__,
                listen=str(settings.listen),
                scheme="https" if settings.tls is not None else "http",
                **({} if shared else {"admin_listen": str(settings.admin_listen)}),
                upstream=str(settings.upstream.url),
                routes=len(settings.policy.routes),
                **({"warnings": list(settings.warnings)} if settings.warnings else {}),
            )
            if ready is not None:
                await ready(gateway)
            await stop.wait()
    except StartFailed as exc:
        lifecycle("start_failed", process, error=str(exc))
        return 1
    lifecycle("stopped", process)
    return 0


async def _start(
    stack: contextlib.AsyncExitStack, settings: Settings, shared: state.Shared | None
) -> tuple[Gateway, asyncio.Event]:
    """Start everything in order, each pushed on ``stack`` as it is started."""
    chosen = state.build(settings, shared)
    stack.push_async_callback(chosen.close)
    tracer = tracing.start(settings.tracing, __version__)
    stack.callback(tracer.close)  # after the drain: the last spans are sent
    metrics = Metrics(multiprocess_dir=shared.metrics_dir if shared else None)
    gateway = Gateway(settings, metrics, chosen, tracer)
    metrics.principals = named_principals(settings)
    if settings.tls is not None:
        try:
            gateway.tls = tls.ServerTls(settings.tls)
        except tls.TlsError as exc:  # the files changed since they were checked
            raise StartFailed(f"tls: {exc}") from None
    try:
        gateway.audit = open_audit(settings)
    except OSError as exc:
        raise StartFailed(f"cannot open audit_log: {exc.strerror or exc}") from None
    stack.callback(_close_audit, gateway)  # whichever file is open by then (SIGHUP swaps it)
    await gateway.upstream.start()
    stack.push_async_callback(gateway.upstream.close)

    listening = asyncio.Event()
    status: Status | None = None
    if shared is None:
        status = Status(settings)

        def ready() -> bool:
            return listening.is_set() and not gateway.draining

        def page(status: Status = status) -> dict[str, object]:
            return status.page(Workers(1, int(ready()), (os.getpid(),)))

        view = admin.View(metrics, ready, page)
        try:
            admin_runner = await admin.start(settings.admin_listen, view)
        except OSError as exc:
            raise StartFailed(cannot_listen(settings.admin_listen, exc)) from None
        stack.push_async_callback(admin_runner.cleanup)

    stop = asyncio.Event()
    _handle_signals(stack, gateway, settings, stop, status, count=shared is None)
    if shared is None:  # a worker's supervisor watches the files for all of them
        _watch_files(stack, gateway, settings, status)
    else:
        _outlive_no_supervisor(stack, stop)

    proxy = _proxy_runner(gateway, settings)
    await proxy.setup()
    # Stops accepting at once, then waits for in-flight requests up to the grace.
    stack.push_async_callback(proxy.cleanup)
    address = settings.listen
    try:
        await web.TCPSite(
            proxy,
            address.host,
            address.port,
            backlog=1024,
            reuse_port=shared is not None or None,
            ssl_context=gateway.tls.context if gateway.tls is not None else None,
        ).start()
    except OSError as exc:
        raise StartFailed(cannot_listen(address, exc)) from None
    stack.callback(_begin_drain, gateway, "worker" if shared else "gateway")
    listening.set()
    return gateway, stop


SUPERVISOR_CHECK_S = 1.0


def _outlive_no_supervisor(stack: contextlib.AsyncExitStack, stop: asyncio.Event) -> None:
    """A worker drains and exits once its supervisor is gone (killed with SIGKILL,
    say): otherwise it would go on serving the port with a config nobody reloads,
    its metrics summed by no one, and be left behind by every restart."""
    supervisor = os.getppid()

    async def watch() -> None:
        while os.getppid() == supervisor:
            await asyncio.sleep(SUPERVISOR_CHECK_S)
        lifecycle("supervisor_gone", "worker", supervisor=supervisor)
        stop.set()

    task = asyncio.get_running_loop().create_task(watch())
    stack.callback(task.cancel)


def _proxy_runner(gateway: Gateway, settings: Settings) -> web.ServerRunner:
    server = GatewayServer(
        gateway.handle,
        gateway.bad_request,
        send_timeout_s=lambda: gateway.loaded.settings.send_timeout_s,  # reloadable
        access_log=None,
        auto_decompress=False,  # the body is forwarded byte for byte
        # One timer bounds both an idle kept-alive connection and a caller
        # that never finishes sending its headers (see gateway/protocol.py).
        keepalive_timeout=settings.keepalive_timeout_s,
        # After a refusal, unread body bytes are drained this long at most, so
        # the caller can read the answer before the connection is closed.
        lingering_time=2.0,
    )
    return web.ServerRunner(
        server, handle_signals=False, shutdown_timeout=settings.shutdown_grace_s
    )


def _handle_signals(
    stack: contextlib.AsyncExitStack,
    gateway: Gateway,
    started: Settings,
    stop: asyncio.Event,
    status: Status | None,
    *,
    count: bool,
) -> None:
    # Installed before the proxy listens, so they are removed only once the drain is
    # over: Ctrl-C or systemd signal every process of the group, so a worker may get
    # SIGINT and then its supervisor's SIGTERM (or a logrotate SIGHUP), and the
    # default action of any of those would cut the requests in flight off.
    loop = asyncio.get_running_loop()
    handlers: dict[signal.Signals, Callable[[], object]] = {
        signal.SIGTERM: stop.set,
        signal.SIGINT: stop.set,
        signal.SIGHUP: lambda: reload(
            gateway, started, count=count, status=status, process="gateway" if count else "worker"
        ),
        signal.SIGUSR1: lambda: reopen_audit(gateway),
    }
    for sig, handler in handlers.items():
        loop.add_signal_handler(sig, handler)
        stack.callback(loop.remove_signal_handler, sig)


def _watch_files(
    stack: contextlib.AsyncExitStack, gateway: Gateway, started: Settings, status: Status | None
) -> None:
    """``reload_on_change``: poll the files of the running set, reload when they change.

    The task runs whatever the key says, and looks at it before each poll, so a
    reload can turn the key on or off."""

    def changed(paths: list[str]) -> None:
        lifecycle("files_changed", "gateway", files=paths)
        reload(gateway, started, status=status)

    watcher = Watcher(
        lambda: gateway.loaded.settings.watched_files(),
        changed,
        enabled=lambda: gateway.loaded.settings.reload_on_change,
    )
    task = asyncio.get_running_loop().create_task(watcher.run())
    stack.callback(task.cancel)


def _begin_drain(gateway: Gateway, process: str) -> None:
    gateway.draining = True  # /readyz → 503; a request still queued gets ShuttingDown
    lifecycle("draining", process, grace_s=gateway.loaded.settings.shutdown_grace_s)


def _close_audit(gateway: Gateway) -> None:
    if gateway.audit is not None:
        gateway.audit.close()
