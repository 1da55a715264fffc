"""The official SOLAPI SDKs, unchanged, through the gateway with an internal key pair.

A service keeps its SDK code and changes only the base URL and the key pair
(docs/identity.md, "Moving an SDK service onto the gateway"). The gateway verifies the
SDK's signature exactly as SOLAPI would, then signs afresh with the real key:
upstream (the sandbox) sees only the real key. A replayed header, a wrong
secret, a skewed date or an unknown key are 401, nothing is forwarded, and
the access log says why.

The Python SDK (``solapi`` 5.x, a test dependency) always runs. The Node SDK
(``solapi`` 6.x from npm) runs when node and npm are installed and npm can
reach its registry; otherwise its tests are skipped, saying which was missing.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from solapi import SolapiMessageService
from solapi.lib import authenticator
from solapi.lib.fetcher import RequestMethod, default_fetcher
from support import Creds, GatewayProc, SandboxProc, SdkKey, sample

pytestmark = pytest.mark.e2e

BALANCE = {"balance": 50000.0, "point": 1000.0}  # what the sandbox answers
UNAUTHORIZED = ("Unauthorized", "Authentication required or credentials not accepted.")


def sdk_service(gateway: GatewayProc, api_key: str, api_secret: str) -> SolapiMessageService:
    """The migration of docs/identity.md: the SDK as it is, another base URL and key pair."""
    service = SolapiMessageService(api_key, api_secret)
    service.base_url = gateway.url
    return service


@contextmanager
def recorded_headers() -> Iterator[list[str]]:
    """Every Authorization header the Python SDK makes inside the block."""
    made: list[str] = []
    original = authenticator.Authenticator.get_auth_info

    def recording(self: authenticator.Authenticator) -> str:
        header: str = original(self)
        made.append(header)
        return header

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(authenticator.Authenticator, "get_auth_info", recording)
        yield made


def rejections(gateway: GatewayProc, route: str, code: str) -> float:
    return sample(gateway.metrics(), "gateway_rejections_total", route=route, code=code)


def refused_quietly(
    gateway: GatewayProc, sandbox: SandboxProc, call: Any, reason: str
) -> dict[str, Any]:
    """``call()`` raises the SDK's 401 error, reaches nothing, and logs ``reason``."""
    before = rejections(gateway, "cash-balance", "Unauthorized")
    with sandbox.untouched(), pytest.raises(Exception) as info:
        call()
    assert info.value.args == UNAUTHORIZED  # the caller learns nothing more
    line = gateway.access_lines()[-1]
    assert (line["status"], line["errorCode"], line["route"]) == (
        401,
        "Unauthorized",
        "cash-balance",
    )
    assert line["reason"].startswith(reason), line
    assert "principal" not in line
    assert rejections(gateway, "cash-balance", "Unauthorized") == before + 1
    return line


# --- the Python SDK ------------------------------------------------------------------------


def test_python_sdk_balance_reaches_upstream_signed_with_the_real_key(
    shipped_gateway: GatewayProc, sandbox: SandboxProc, creds: Creds, sdk_key: SdkKey
) -> None:
    service = sdk_service(shipped_gateway, sdk_key.api_key, sdk_key.secret)
    sandbox.reset()

    with recorded_headers() as made:
        balance = service.get_balance()

    assert (balance.balance, balance.point) == (BALANCE["balance"], BALANCE["point"])
    (sdk_header,) = made
    assert sdk_header.startswith(f"HMAC-SHA256 ApiKey={sdk_key.api_key}, Date=")
    (seen,) = sandbox.requests()
    assert seen["verified"] is True
    assert (seen["method"], seen["path"]) == ("GET", "/cash/v1/balance")
    assert seen["api_key"] == creds.api_key
    assert seen["headers"]["authorization"].startswith(f"HMAC-SHA256 apiKey={creds.api_key}, ")
    assert sdk_key.api_key not in json.dumps(seen)  # the internal key stays at the gateway
    assert seen["salt"] not in sdk_header
    line = shipped_gateway.access_lines()[-1]
    assert (line["principal"], line["role"], line["via"], line["status"]) == (
        sdk_key.principal,
        "MEMBER",
        "hmac",
        200,
    )


def test_python_sdk_fetcher_restores_records(
    shipped_gateway: GatewayProc, sandbox: SandboxProc, sdk_key: SdkKey
) -> None:
    """The SDK's own fetcher on a records route: the internal key is a MEMBER."""
    ids = sandbox.trash_ids(2)
    answer = default_fetcher(
        {"api_key": sdk_key.api_key, "api_secret": sdk_key.secret},
        {
            "method": RequestMethod.POST,
            "url": shipped_gateway.url + "/crm-core/v1/records/bulk/restore",
        },
        {"recordIds": ids},
    )
    assert answer["results"] == [{"recordId": i, "result": "restored"} for i in ids]
    assert sandbox.last()["verified"] is True
    # A MEMBER key may not delete for good: the rule says OWNER.
    with pytest.raises(Exception) as info:
        default_fetcher(
            {"api_key": sdk_key.api_key, "api_secret": sdk_key.secret},
            {
                "method": RequestMethod.POST,
                "url": shipped_gateway.url + "/crm-core/v1/records/bulk/delete",
            },
            {"recordIds": ids, "permanent": True},
        )
    assert info.value.args[0] == "Forbidden"


def test_python_sdk_replayed_header_is_401_and_not_forwarded(
    shipped_gateway: GatewayProc,
    sandbox: SandboxProc,
    sdk_key: SdkKey,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service = sdk_service(shipped_gateway, sdk_key.api_key, sdk_key.secret)
    with recorded_headers() as made:
        service.get_balance()
    # The same SDK sends the very header it sent a moment ago.
    monkeypatch.setattr(authenticator.Authenticator, "get_auth_info", lambda self: made[0])
    refused_quietly(shipped_gateway, sandbox, service.get_balance, "hmac reused")


def test_python_sdk_with_a_wrong_secret_is_401(
    shipped_gateway: GatewayProc, sandbox: SandboxProc, sdk_key: SdkKey
) -> None:
    service = sdk_service(shipped_gateway, sdk_key.api_key, sdk_key.secret + "x")
    line = refused_quietly(shipped_gateway, sandbox, service.get_balance, "hmac bad signature")
    assert line["reason"].endswith(f"apiKey {sdk_key.api_key}")


def test_python_sdk_with_an_unknown_key_is_401(
    shipped_gateway: GatewayProc, sandbox: SandboxProc, sdk_key: SdkKey, creds: Creds
) -> None:
    # Even the real SOLAPI key pair is unknown here: it is not an internal key.
    service = sdk_service(shipped_gateway, creds.api_key, creds.secret)
    refused_quietly(shipped_gateway, sandbox, service.get_balance, "hmac unknown key")


@pytest.mark.parametrize(("minutes", "accepted"), [(-16, False), (16, False), (-14, True)])
def test_python_sdk_with_a_skewed_clock(
    shipped_gateway: GatewayProc,
    sandbox: SandboxProc,
    sdk_key: SdkKey,
    monkeypatch: pytest.MonkeyPatch,
    minutes: int,
    accepted: bool,
) -> None:
    def skewed() -> str:  # the SDK's own format: local offset, microseconds
        return (datetime.now().astimezone() + timedelta(minutes=minutes)).isoformat()

    monkeypatch.setattr(authenticator.Authenticator, "get_iso_datetime", staticmethod(skewed))
    service = sdk_service(shipped_gateway, sdk_key.api_key, sdk_key.secret)
    if accepted:
        assert service.get_balance().balance == BALANCE["balance"]
    else:
        refused_quietly(shipped_gateway, sandbox, service.get_balance, "hmac skewed")


# --- the Node SDK --------------------------------------------------------------------------

NPM_NETWORK = ("--fetch-timeout=30000", "--fetch-retries=1")  # offline: skip soon, not in minutes
NODE_CLIENT = r"""
// The service's own code would only construct the SDK and call it. SDK 6.x
// has no base-URL setting (baseUrl is a fixed field), so the migration is this
// one wrapper around fetch, before the SDK is used.
const GATEWAY = process.env.GATEWAY_URL;
const realFetch = globalThis.fetch;
const sent = [];
globalThis.fetch = (url, init) => {
  sent.push(init.headers.Authorization);
  return realFetch(String(url).replace("https://api.solapi.com", GATEWAY), init);
};

const { SolapiMessageService } = require("solapi");

async function main() {
  const out = {};
  const service = new SolapiMessageService(process.env.KEY, process.env.SECRET);
  out.balance = await service.getBalance();
  out.header = sent[sent.length - 1];
  const wrong = new SolapiMessageService(process.env.KEY, process.env.SECRET + "x");
  try {
    await wrong.getBalance();
    out.wrong = "accepted";
  } catch (error) {
    out.wrong = { errorCode: error.errorCode, errorMessage: error.errorMessage };
  }
  console.log(JSON.stringify(out));
}
main().catch((error) => { console.error(error); process.exit(1); });
"""


@pytest.fixture(scope="session")
def node_sdk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``solapi@6`` installed from npm (skips, saying why, if it cannot be)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip(f"the Node SDK test needs node and npm (node: {node}, npm: {npm})")
    home = tmp_path_factory.mktemp("node-sdk")
    (home / "package.json").write_text('{"name": "sdk-check", "private": true}\n')
    try:
        done = subprocess.run(
            [
                npm,
                "install",
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
                *NPM_NETWORK,
                "solapi@6",
            ],
            cwd=home,
            capture_output=True,
            text=True,
            timeout=180,
        )
    except subprocess.TimeoutExpired:
        pytest.skip("npm install solapi@6 took over 180 s (is the npm registry reachable?)")
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        pytest.skip(f"npm could not install solapi@6 (registry unreachable?): {' | '.join(tail)}")
    version = json.loads((home / "node_modules/solapi/package.json").read_text())["version"]
    assert version.startswith("6."), version
    (home / "client.js").write_text(NODE_CLIENT)
    return home


def test_node_sdk_balance_through_the_gateway_and_its_replay(
    node_sdk: Path,
    shipped_gateway: GatewayProc,
    sandbox: SandboxProc,
    creds: Creds,
    sdk_key: SdkKey,
) -> None:
    sandbox.reset()
    done = subprocess.run(
        ["node", "client.js"],
        cwd=node_sdk,
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "PATH": os.environ.get("PATH", ""),
            "GATEWAY_URL": shipped_gateway.url,
            "KEY": sdk_key.api_key,
            "SECRET": sdk_key.secret,
        },
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)

    assert out["balance"] == {"balance": 50000, "point": 1000}
    assert out["wrong"]["errorCode"] == "Unauthorized"
    header = out["header"]
    assert header.startswith(f"HMAC-SHA256 apiKey={sdk_key.api_key}, date=")
    (seen,) = sandbox.requests()  # only the good call got through
    assert seen["verified"] is True and seen["api_key"] == creds.api_key
    reasons = [line.get("reason", "") for line in shipped_gateway.access_lines()[-2:]]
    assert reasons[0] == "" and reasons[1].startswith("hmac bad signature")

    # The Node SDK's header, sent again as it is: refused, nothing forwarded.
    with sandbox.untouched():
        conn = http.client.HTTPConnection("127.0.0.1", shipped_gateway.port, timeout=10)
        try:
            conn.request("GET", "/cash/v1/balance", headers={"Authorization": header})
            reply = conn.getresponse()
            status, body = reply.status, json.loads(reply.read())
        finally:
            conn.close()
    assert (status, body["errorCode"]) == (401, "Unauthorized")
    assert shipped_gateway.access_lines()[-1]["reason"].startswith("hmac reused")
