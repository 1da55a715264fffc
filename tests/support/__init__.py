"""What the tests share, so that a test file holds only what it tests.

    processes      ``launch_sandbox``, ``launch_gateway``, ``launch_demo`` (the one
                   launcher of each), ``SandboxProc``/``GatewayProc``/``DemoProc``,
                   ``Proc`` for anything else; ``each_killed`` for a factory fixture;
                   ``poll``, ``free_ports``, ``answers`` (a readiness probe), ``cli``
    log lines      ``GatewayProc.events(name=None)``, ``access_lines()``,
                   ``worker_pids()``; ``json_lines(text)`` for any JSON-lines file:
                   complete lines only, a line still being written waits
    answers        ``Reply`` (from aiohttp, a bare socket or curl), ``parse_response``,
                   ``GatewayProc.metrics()`` and ``sample``/``family``/``labelled``
    config         ``Creds``, ``SdkKey``, ``gateway_policy``, ``shipped_policy``,
                   ``principal_yaml``, ``write_gateway_config`` (the one writer, bench/
                   uses it too), ``policy_from_text`` (the one way from text to Policy)
    upstream       ``FakeUpstream`` and its behaviours: ``ok``, ``replying``, ``reset``,
                   ``hang``
    records        ``random_id``, ``ids_body``

``tests/conftest.py`` wraps these in the fixtures; tests import the rest from here.
"""

from .configs import (
    MAX_BODY_BYTES,
    REPO,
    ROLES,
    TRUSTED_PRINCIPAL,
    TRUSTED_ROLE,
    Creds,
    SdkKey,
    demo_config,
    gateway_policy,
    policy_from_text,
    principal_yaml,
    shipped_policy,
    token_principals,
    write_gateway_config,
)
from .demo import DemoProc, launch_demo
from .fake_upstream import (
    OK_BODY,
    Behaviour,
    FakeUpstream,
    Received,
    answer,
    chunk,
    chunked_head,
    hang,
    ok,
    replying,
    reset,
)
from .procs import (
    TEST_SETTINGS,
    GatewayProc,
    Proc,
    SandboxProc,
    answers,
    cli,
    each_killed,
    free_port,
    free_ports,
    json_lines,
    launch_gateway,
    launch_sandbox,
    poll,
)
from .records import ids_body, random_id
from .replies import (
    Labels,
    Reply,
    Samples,
    family,
    http_request,
    labelled,
    parse_response,
    sample,
    samples_of,
)

__all__ = [
    "MAX_BODY_BYTES",
    "OK_BODY",
    "REPO",
    "ROLES",
    "TEST_SETTINGS",
    "TRUSTED_PRINCIPAL",
    "TRUSTED_ROLE",
    "Behaviour",
    "Creds",
    "DemoProc",
    "FakeUpstream",
    "GatewayProc",
    "Labels",
    "Proc",
    "Received",
    "Reply",
    "Samples",
    "SandboxProc",
    "SdkKey",
    "answer",
    "answers",
    "chunk",
    "chunked_head",
    "cli",
    "demo_config",
    "each_killed",
    "family",
    "free_port",
    "free_ports",
    "gateway_policy",
    "hang",
    "http_request",
    "ids_body",
    "json_lines",
    "labelled",
    "launch_demo",
    "launch_gateway",
    "launch_sandbox",
    "ok",
    "parse_response",
    "policy_from_text",
    "poll",
    "principal_yaml",
    "random_id",
    "replying",
    "reset",
    "sample",
    "samples_of",
    "shipped_policy",
    "token_principals",
    "write_gateway_config",
]  # fmt: skip
