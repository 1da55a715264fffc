"""The ``solapi-gateway`` command (also ``python -m gateway``).

    serve         run the gateway
    demo          the sandbox plus a gateway wired to it, with curl lines to paste
    sandbox       only the SOLAPI-compatible sandbox upstream
    check-config  validate config and policy (exit 2 listing every problem)
    sign          print an Authorization header for the configured credentials
    token new     mint a bearer token and its policy entry
    explain       walk one request through the policy, step by step, sending nothing

Exit codes: 0 fine, 1 could not run (e.g. a port in use), 2 bad config or usage;
``explain``: 0 would forward, 1 would refuse, 2 bad config or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import ipaddress
import os
import secrets
import ssl
import sys
import time
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any

from multidict import CIMultiDict

from gateway import (
    __version__,
    addresses,
    config,
    demo,
    logs,
    names,
    report,
    sandbox,
    service,
    state,
    supervisor,
    tls,
    walk,
)
from gateway.config import Settings
from gateway.identity import PeerCert, verifier_for
from gateway.principals import TrustedHeaders
from gateway.signing import Secret, format_date, new_salt, parse
from gateway.yamlsource import ConfigError

EXIT_CONFIG = 2


def _run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    result: int = uvloop.run(coro)
    return result


def _load(path: str, skip: frozenset[str] = frozenset()) -> Settings | None:
    try:
        return config.load(path, skip=skip)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


def _load_logged(path: str) -> Settings | None:
    """``_load`` for a serving process: its problems go out as one JSON log line."""
    logs.setup()
    try:
        return config.load(path)
    except ConfigError as exc:
        logs.emit("config_error", errors=[str(p) for p in exc.problems])
        return None


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _load_logged(args.config)
    if settings is None:
        return EXIT_CONFIG
    for warning in settings.warnings:  # once, here: not again in every worker
        logs.emit("config_warning", warning=str(warning))
    workers = args.workers if args.workers is not None else settings.workers
    if workers > 1:
        return _run(supervisor.supervise(settings, workers))
    return _run(service.serve(settings))


def cmd_worker(args: argparse.Namespace) -> int:
    """One of ``serve --workers N``'s processes (started by the supervisor)."""
    settings = _load_logged(args.config)
    if settings is None:
        return EXIT_CONFIG
    shared = state.Shared(args.state_file, args.metrics_dir)

    async def listening(_: object) -> None:
        supervisor.report_ready(args.ready_fd)

    return _run(service.serve(settings, shared=shared, ready=listening))


def cmd_demo(args: argparse.Namespace) -> int:
    logs.setup()
    settings = _load(args.config)
    if settings is None:
        return EXIT_CONFIG
    return _run(demo.run(settings, args.log_file))


def cmd_sandbox(args: argparse.Namespace) -> int:
    logs.setup()
    parsed = addresses.parse_address(args.listen)
    if isinstance(parsed, str):
        print(f"--listen: {parsed}", file=sys.stderr)
        return EXIT_CONFIG
    secret = demo.DEMO_API_SECRET
    if args.api_secret_file:
        try:
            with open(args.api_secret_file, encoding="utf-8") as fh:
                secret = fh.read().strip()
        except OSError as exc:
            print(f"--api-secret-file: cannot read it: {exc.strerror}", file=sys.stderr)
            return EXIT_CONFIG
    elif os.environ.get("SANDBOX_API_SECRET"):
        secret = os.environ["SANDBOX_API_SECRET"].strip()
    keys = {args.api_key: Secret(secret)}
    context = None
    if (args.tls_cert is None) != (args.tls_key is None):
        print("sandbox: --tls-cert and --tls-key go together", file=sys.stderr)
        return EXIT_CONFIG
    if args.tls_cert is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            print(f"--tls-cert/--tls-key: cannot use them: {exc}", file=sys.stderr)
            return EXIT_CONFIG

    async def main() -> int:
        try:
            await sandbox.run_sandbox(
                parsed.host, parsed.port, keys, delay_s=args.delay_s, ssl_context=context
            )
        except OSError as exc:
            logs.emit("start_failed", error=f"cannot listen on {parsed}: {exc.strerror or exc}")
            return 1
        return 0

    try:
        return _run(main())
    except KeyboardInterrupt:
        return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    if settings is None:
        return EXIT_CONFIG
    print(report.summary(settings))
    for warning in settings.warnings:
        print(f"warning: {warning}")
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    settings = _load(args.config, frozenset({config.POLICY_FILE}))  # it signs, nothing more
    if settings is None:
        return EXIT_CONFIG
    date = args.date or format_date(datetime.now(UTC))
    salt = args.salt or new_salt()
    header = settings.signer.header_for(date, salt)
    try:  # refuse to print what SOLAPI would reject as malformed
        parse(header)
    except Exception as exc:
        print(f"sign: {exc} (check --date and --salt)", file=sys.stderr)
        return EXIT_CONFIG
    print(header)
    return 0


def cmd_token_new(args: argparse.Namespace) -> int:
    if not names.PRINCIPAL.fullmatch(args.principal):
        print(f"--principal: {names.PRINCIPAL_RULE}", file=sys.stderr)
        return EXIT_CONFIG
    if not names.ROLE.fullmatch(args.role):
        print(f"--role: {names.ROLE_RULE}", file=sys.stderr)
        return EXIT_CONFIG
    if not os.path.exists(args.config):
        print(
            f"note: {args.config} does not exist, so the role {args.role} was not checked"
            " against a policy (--config names the gateway.yaml to check it against)",
            file=sys.stderr,
        )
    else:
        settings = _load(args.config, frozenset({config.CREDENTIALS}))  # mints, signs nothing
        if settings is None:
            return EXIT_CONFIG
        roles = settings.policy.roles
        if args.role not in roles:
            print(
                f"--role: {args.role} is not a role of {settings.policy_path}"
                f" (roles: {', '.join(roles)})",
                file=sys.stderr,
            )
            return EXIT_CONFIG
    token = "sgw_" + secrets.token_urlsafe(32)
    digest = hashlib.sha256(token.encode()).hexdigest()
    print(token)
    print(
        "\n# The token above is shown once; only its SHA-256 is kept.",
        "# Add this entry under `principals:` in policy.yaml, then reload (SIGHUP):",
        f"  - name: {args.principal}",
        f"    role: {args.role}",
        f'    token_sha256: "{digest}"',
        sep="\n",
    )
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    """Walk one request through ``walk.decide``, the live gateway's own steps."""
    if (args.principal is None) != (args.role is None):
        print("explain: --principal and --role go together", file=sys.stderr)
        return EXIT_CONFIG
    version = _http_version(args.http_version)
    if version is None:
        print(f"--http-version: expected e.g. 1.1, got {args.http_version!r}", file=sys.stderr)
        return EXIT_CONFIG
    headers: CIMultiDict[str] = CIMultiDict()
    for line in args.header:
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            print(f"--header: expected 'Name: value', got {line!r}", file=sys.stderr)
            return EXIT_CONFIG
        headers.add(name.strip(), value.strip())
    body = b""
    if args.body is not None:
        try:
            if args.body == "-":
                body = sys.stdin.buffer.read()
            else:
                with open(args.body, "rb") as fh:
                    body = fh.read()
        except OSError as exc:
            print(f"--body: cannot read it: {exc.strerror}", file=sys.stderr)
            return EXIT_CONFIG
        headers.setdefault("Content-Type", "application/json")
    # explain never signs: the real API key and secret need not be at hand.
    settings = _load(args.config, frozenset({config.CREDENTIALS}))
    if settings is None:
        return EXIT_CONFIG
    policy, peer, assumed = settings.policy, args.peer, ""
    if args.token is not None:
        headers["Authorization"] = f"Bearer {args.token}"
    elif args.principal is not None:
        # As if sent with the trusted identity headers from a trusted peer. With
        # trusted headers off, a stand-in pair is switched on for this run only.
        trusted = policy.trusted_headers
        if trusted is None:
            stand_in = ipaddress.ip_network("127.0.0.1/32")
            trusted = TrustedHeaders(
                principal="X-Explain-Principal", role="X-Explain-Role", sources=(stand_in,)
            )
            policy = policy.model_copy(update={"trusted_headers": trusted})
            assumed = " [trusted headers are off in this policy: assumed for this run]"
        headers[trusted.principal] = args.principal
        headers[trusted.role] = args.role
        if peer is None:
            peer = str(trusted.sources[0].network_address)
    cert, handshake = None, None
    if args.cert is not None:
        checked = _client_certificate(args.cert, settings)
        if checked is None:
            return EXIT_CONFIG
        cert, handshake = checked
        if handshake.startswith("REFUSED"):
            print(report.handshake_refused(args.method, args.target, handshake))
            return 1
    decision = walk.decide(
        args.method,
        args.target,
        headers,
        peer or "127.0.0.1",
        body,
        policy,
        verifier_for(policy),
        time.time(),
        settings.max_body_bytes,
        cert,
        version,
    )
    print(report.explanation(decision, settings, assumed, handshake))
    return 0 if decision.would_forward else 1


def _client_certificate(path: str, settings: Settings) -> tuple[PeerCert, str] | None:
    """``explain --cert``: the certificate's names, and what the handshake would say
    of it ("REFUSED ..." or the line that it passed); None after a usage error."""
    client_ca = settings.tls.client_ca_file if settings.tls is not None else None
    if client_ca is None:
        print(
            "--cert: tls.client_ca_file is not set in this config, so the gateway asks"
            " for no client certificate",
            file=sys.stderr,
        )
        return None
    try:
        chain = tls.read_certificates(path)
    except tls.TlsError as exc:
        print(f"--cert: {exc}", file=sys.stderr)
        return None
    cert = tls.certificate_identity(chain[0])
    try:
        tls.verify_client(chain, client_ca, datetime.now(UTC))
    except tls.TlsError as exc:
        return cert, f"REFUSED  {cert}: {exc}"
    return cert, f"ok       {cert} (verified against {client_ca})"


def _http_version(text: str) -> tuple[int, int] | None:
    """``1.1`` or ``HTTP/1.1`` → (1, 1), as a request line would say it."""
    major, dot, minor = text.upper().removeprefix("HTTP/").partition(".")
    if not dot or not major.isdigit() or not minor.isdigit():
        return None
    return int(major), int(minor)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="solapi-gateway",
        description="The auth-signing gateway in front of the SOLAPI API"
        " (also run as python -m gateway).",
        epilog="Exit codes: 0 fine, 1 could not run (e.g. a port in use), 2 bad config or usage.",
    )
    p.add_argument("--version", action="version", version=f"solapi-gateway {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(name: str, help_text: str, default: str = config.DEFAULT_CONFIG) -> Any:
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("--config", default=default, help=f"config file (default {default})")
        return cmd

    serve = with_config("serve", "run the gateway")
    serve.add_argument(
        "--workers", type=int, help="worker processes (default: `workers:` in config, else 1)"
    )
    serve.set_defaults(func=cmd_serve)
    # No help=: a parser added without one is left out of the command list.
    worker = sub.add_parser("_worker")
    worker.add_argument("--config", required=True)
    worker.add_argument("--state-file", required=True)
    worker.add_argument("--metrics-dir", required=True)
    worker.add_argument("--ready-fd", type=int, required=True)
    worker.set_defaults(func=cmd_worker)
    demo_cmd = with_config("demo", "sandbox + gateway with demo credentials", demo.DEMO_CONFIG)
    demo_cmd.add_argument(
        "--log-file",
        default=demo.DEMO_LOG,
        help="where log lines go once the curl lines are printed ('-': stderr;"
        " default %(default)s)",
    )
    demo_cmd.set_defaults(func=cmd_demo)
    sb = sub.add_parser("sandbox", help="run only the SOLAPI-compatible sandbox upstream")
    sb.add_argument("--listen", default="127.0.0.1:8089", help="HOST:PORT (default %(default)s)")
    sb.add_argument("--api-key", default=demo.DEMO_API_KEY, help="accepted key (default: demo)")
    sb.add_argument(
        "--api-secret-file",
        help="file holding the accepted secret (else $SANDBOX_API_SECRET, else the demo secret)",
    )
    sb.add_argument("--delay-s", type=float, default=0.0, help="answer this much later")
    sb.add_argument("--tls-cert", help="serve HTTPS with this PEM certificate (with --tls-key)")
    sb.add_argument("--tls-key", help="its PEM private key")
    sb.set_defaults(func=cmd_sandbox)
    with_config("check-config", "validate config and policy").set_defaults(func=cmd_check_config)
    sign = with_config("sign", "print an Authorization header")
    sign.add_argument("--date", help="ISO 8601 date to sign (default: now, UTC)")
    sign.add_argument("--salt", help="salt to sign (default: 32 random hex digits)")
    sign.set_defaults(func=cmd_sign)
    token = sub.add_parser("token", help="bearer tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    new = token_sub.add_parser("new", help="print a new random token and its policy entry")
    new.add_argument("--principal", required=True, help="the caller's name in the policy")
    new.add_argument("--role", required=True, help="one of the policy's roles")
    new.add_argument(
        "--config",
        default=config.DEFAULT_CONFIG,
        help=f"the role is checked against this config's policy (default {config.DEFAULT_CONFIG})",
    )
    new.set_defaults(func=cmd_token_new)
    explain = with_config("explain", "walk one request through the policy; sends nothing")
    who = explain.add_mutually_exclusive_group()
    who.add_argument("--token", help="as a caller with this bearer token")
    who.add_argument("--principal", help="with --role: as if sent with trusted identity headers")
    explain.add_argument("--role", help="the role for --principal")
    explain.add_argument(
        "--cert",
        metavar="FILE",
        help="as if this PEM client certificate (chain) came with the TLS handshake;"
        " it is checked against tls.client_ca_file first",
    )
    explain.add_argument("--body", help="file holding the request body ('-': stdin)")
    explain.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="a request header, as curl -H (repeatable); --body implies"
        " Content-Type: application/json unless one is given",
    )
    explain.add_argument(
        "--peer",
        help="the caller's address (default: a trusted source with --principal, else 127.0.0.1)",
    )
    explain.add_argument(
        "--http-version",
        default="1.1",
        metavar="VERSION",
        help="the version the request line names, e.g. 1.0 (default %(default)s)",
    )
    explain.add_argument("method", metavar="METHOD", help="e.g. POST (case-sensitive, as sent)")
    explain.add_argument("target", metavar="PATH", help="the request target, query included")
    explain.set_defaults(func=cmd_explain)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    workers = getattr(args, "workers", None)
    if workers is not None and workers < 1:
        print("--workers: must be at least 1", file=sys.stderr)
        return EXIT_CONFIG
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
