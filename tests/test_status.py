"""gateway/status.py and ``GET /status``: the running set's fingerprint, never its values."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway import __version__, admin, config
from gateway.metrics import Metrics
from gateway.status import Status, Workers

MakeClient = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
HEX64 = re.compile(r"[0-9a-f]{64}")
SECRET = "status-secret-never-shown-4d1f"
HMAC_SECRET = "status-hmac-secret-never-shown-77aa"

CONFIG = """\
listen: "127.0.0.1:18080"
admin_listen: "127.0.0.1:19090"
upstream:
  url: "https://solapi.internal:8443"
credentials:
  api_key: "NCSSTATUSKEY0001"
  api_secret: "${STATUS_TEST_SECRET}"
forward_headers: [X-Trace-Tag]
"""
TOKEN_SHA256 = hashlib.sha256(b"a-token").hexdigest()
POLICY = f"""\
roles: [VIEWER, MEMBER]
principals:
  - name: billing-svc
    role: MEMBER
    token_sha256: "{TOKEN_SHA256}"
  - name: sdk-svc
    role: MEMBER
    hmac_key: NCSINTERNAL00042
    hmac_secret: "${{STATUS_TEST_HMAC}}"
routes:
  - name: restore
    method: POST
    path: /crm-core/v1/records/bulk/restore
    min_role: MEMBER
"""


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "gateway.yaml").write_text(CONFIG)
    (tmp_path / "policy.yaml").write_text(POLICY)
    os.environ["STATUS_TEST_SECRET"] = SECRET
    os.environ["STATUS_TEST_HMAC"] = HMAC_SECRET
    yield tmp_path
    del os.environ["STATUS_TEST_SECRET"], os.environ["STATUS_TEST_HMAC"]


def test_the_page_holds_hashes_of_the_files_and_no_value_of_them(folder: Path) -> None:
    settings = config.load(str(folder / "gateway.yaml"))
    status = Status(settings)
    page = status.page(Workers(1, 1, (os.getpid(),)))
    assert set(page) == {
        "version", "pid", "config_sha256", "policy_sha256", "loaded_at", "last_reload", "workers"
    }  # fmt: skip
    assert page["version"] == __version__
    assert page["config_sha256"] == hashlib.sha256(CONFIG.encode()).hexdigest()
    assert page["policy_sha256"] == hashlib.sha256(POLICY.encode()).hexdigest()
    assert ISO.fullmatch(page["loaded_at"])
    assert page["last_reload"] is None
    assert page["workers"] == {"configured": 1, "ready": 1, "pids": [os.getpid()]}

    shown = json.dumps(page)
    assert SECRET not in shown and HMAC_SECRET not in shown
    # No string the files hold shows up, beyond the version: only hashes of them.
    values = _strings(yaml.safe_load(CONFIG)) | _strings(yaml.safe_load(POLICY))
    leaked = [v for v in values if len(v) > 3 and v in shown]
    assert not leaked, leaked


def _strings(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set().union(*(_strings(v) | {str(k)} for k, v in node.items()))
    if isinstance(node, list):
        return set().union(set(), *(_strings(v) for v in node))
    return {str(node)}


def test_a_failed_reload_keeps_the_running_fingerprint_and_says_why(folder: Path) -> None:
    settings = config.load(str(folder / "gateway.yaml"))
    status = Status(settings)
    first = status.page(Workers(2, 2, (10, 11)))
    status.refused(["policy.yaml:3: routes[0].min_role: unknown role 'ADMIN'"])
    failed = status.page(Workers(2, 2, (10, 11)))
    assert {k: failed[k] for k in ("config_sha256", "policy_sha256", "loaded_at")} == {
        k: first[k] for k in ("config_sha256", "policy_sha256", "loaded_at")
    }
    assert failed["last_reload"]["result"] == "failure"
    assert failed["last_reload"]["error"] == [
        "policy.yaml:3: routes[0].min_role: unknown role 'ADMIN'"
    ]
    assert ISO.fullmatch(failed["last_reload"]["at"])

    (folder / "policy.yaml").write_text(POLICY.replace("min_role: MEMBER", "min_role: VIEWER"))
    status.reloaded(config.load(str(folder / "gateway.yaml")))
    good = status.page(Workers(2, 1, (10, 12)))
    assert good["last_reload"] == {"result": "success", "at": good["loaded_at"], "error": None}
    assert good["policy_sha256"] != first["policy_sha256"]
    assert HEX64.fullmatch(good["policy_sha256"])
    assert good["workers"] == {"configured": 2, "ready": 1, "pids": [10, 12]}


def test_the_hash_is_that_of_the_bytes_crlf_included(tmp_path: Path) -> None:
    text = CONFIG.replace("${STATUS_TEST_SECRET}", "s").replace("\n", "\r\n")
    (tmp_path / "gateway.yaml").write_bytes(text.encode())
    (tmp_path / "policy.yaml").write_text(POLICY.replace("${STATUS_TEST_HMAC}", "h"))
    settings = config.load(str(tmp_path / "gateway.yaml"))
    assert settings.config_sha256 == hashlib.sha256(text.encode()).hexdigest()


async def test_the_admin_port_serves_the_views_status(aiohttp_client: MakeClient) -> None:
    page = {"version": "x", "workers": {"configured": 1}}
    client = await aiohttp_client(admin.app(admin.View(Metrics(), lambda: True, lambda: page)))
    answer = await client.get("/status")
    assert answer.status == 200
    assert answer.headers["Cache-Control"] == "no-store"
    assert await answer.json() == page
    bare = await aiohttp_client(admin.app(admin.View(Metrics(), lambda: True)))
    assert (await bare.get("/status")).status == 404
