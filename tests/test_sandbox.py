"""The sandbox upstream: SOLAPI's signature rules in every SDK dialect, and its records."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
import string
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from solapi.lib.authenticator import Authenticator  # type: ignore[import-untyped]

from gateway.sandbox import (
    ACTIVE_COUNT,
    PURGED_COUNT,
    TRASHED_COUNT,
    build_app,
    demo_record_id,
    requestlog,
    run_sandbox,
)
from gateway.signing import Secret, authorization

KEY = "NCSSANDBOXTEST01"
SECRET = "sandbox-test-secret-3f9a1c77b2e4"
START = datetime(2026, 11, 28, 9, 15, 2, tzinfo=UTC)
ID_PATTERN = re.compile(r"CRMRC[0-9]{16}[0-9A-Za-z]{11}")
ISO_MS_Z = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
UNAUTHORIZED = {"errorCode": "Unauthorized", "errorMessage": "권한이 없습니다."}
RESTORE = "/crm-core/v1/records/bulk/restore"
DELETE = "/crm-core/v1/records/bulk/delete"
TRASH = "/crm-core/v1/records/trash"

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]


class FakeClock:
    def __init__(self, start: datetime) -> None:
        self.now = start.timestamp()

    def __call__(self) -> float:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta).total_seconds()

    def datetime(self) -> datetime:
        return datetime.fromtimestamp(self.now, UTC)


def seed_header(when: datetime, *, key: str = KEY, secret: str = SECRET, ms: bool = False) -> str:
    """The seed page's own form: ``2026-11-28T09:15:02Z`` and a 32-hex salt."""
    date = when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    if ms:
        date += f".{when.microsecond // 1000:03d}"
    return authorization(key, Secret(secret), date + "Z", secrets.token_hex(16))


def node_header(when: datetime) -> str:
    """Node SDK 6.x: date-fns formatISO (local offset, no fraction), 32 alphanumerics."""
    date = when.astimezone(timezone(timedelta(hours=9))).isoformat(timespec="seconds")
    salt = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(32))
    return authorization(KEY, Secret(SECRET), date, salt)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
async def client(aiohttp_client: MakeClient, clock: FakeClock) -> Client:
    return await aiohttp_client(build_app({KEY: Secret(SECRET)}, clock=clock))


class Api:
    """Signs each call with the seed form at the fake clock's time."""

    def __init__(self, client: Client, clock: FakeClock) -> None:
        self.client, self.clock = client, clock

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": seed_header(self.clock.datetime())}
        async with self.client.request(method, path, json=body, headers=headers) as resp:
            return resp.status, await resp.json()

    async def restore(self, *ids: str) -> list[str]:
        status, body = await self.call("POST", RESTORE, {"recordIds": list(ids)})
        assert status == 200, body
        return [item["result"] for item in body["results"]]

    async def delete(self, *ids: str, permanent: bool = False) -> list[str]:
        payload = {"recordIds": list(ids), "permanent": permanent}
        status, body = await self.call("POST", DELETE, payload)
        assert status == 200, body
        return [item["result"] for item in body["results"]]


@pytest.fixture
def api(client: Client, clock: FakeClock) -> Api:
    return Api(client, clock)


async def post_restore(client: Client, header: str | None, ids: list[str] | None = None) -> Any:
    headers = {} if header is None else {"Authorization": header}
    body = {"recordIds": ids or [demo_record_id("ALIVE", 1)]}
    return await client.post(RESTORE, json=body, headers=headers)


TRASHED = demo_record_id("TRASH", 1)


# --- signing dialects -----------------------------------------------------------------


async def test_seed_form_is_accepted(client: Client, clock: FakeClock) -> None:
    header = seed_header(clock.datetime())
    assert "date=2026-11-28T09:15:02Z" in header
    resp = await post_restore(client, header, [TRASHED])
    assert resp.status == 200
    assert (await resp.json())["results"] == [{"recordId": TRASHED, "result": "restored"}]


async def test_seed_form_with_milliseconds_is_accepted(client: Client, clock: FakeClock) -> None:
    clock.now += 0.123
    header = seed_header(clock.datetime(), ms=True)
    assert "date=2026-11-28T09:15:02.123Z" in header
    assert (await post_restore(client, header)).status == 200


@pytest.fixture(params=["UTC0", "KST-9", "EST5EDT"])
def local_zone(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    # The Python SDK signs with the process's local offset: try a few.
    monkeypatch.setenv("TZ", request.param)
    time.tzset()
    yield request.param
    monkeypatch.undo()
    time.tzset()


async def test_python_sdk_header_is_accepted(aiohttp_client: MakeClient, local_zone: str) -> None:
    client = await aiohttp_client(build_app({KEY: Secret(SECRET)}))  # real clock: the SDK's
    header = Authenticator(KEY, SECRET).get_auth_info()
    assert header.startswith("HMAC-SHA256 ApiKey=NCSSANDBOXTEST01, Date=")
    if local_zone == "KST-9":
        assert "+09:00, salt=" in header
    resp = await post_restore(client, header)
    assert resp.status == 200, await resp.text()


async def test_python_sdk_seoul_microseconds_uuid_salt(aiohttp_client: MakeClient) -> None:
    clock = FakeClock(START)
    client = await aiohttp_client(build_app({KEY: Secret(SECRET)}, clock=clock))
    date = "2026-11-28T18:15:02.654321+09:00"  # what the SDK sends in Seoul
    salt = Authenticator.unique_id()
    sig = Authenticator.get_signature(SECRET, date + salt)
    header = f"HMAC-SHA256 ApiKey={KEY}, Date={date}, salt={salt}, signature={sig}"
    assert (await post_restore(client, header)).status == 200


async def test_node_sdk_header_is_accepted(client: Client, clock: FakeClock) -> None:
    header = node_header(clock.datetime())
    assert "date=2026-11-28T18:15:02+09:00, salt=" in header
    assert (await post_restore(client, header)).status == 200


# --- rejections -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "HMAC-SHA256 garbage",
        "Bearer abc.def",
        "HMAC-SHA256 apiKey=NCSSANDBOXTEST01, date=2026-11-28T09:15:02Z",
        "HMAC-SHA256 apiKey=NCSSANDBOXTEST01, date=2026-11-28T09:15:02Z, salt=short, "
        "signature=" + "0" * 64,
    ],
)
async def test_missing_or_garbled_header_is_401(client: Client, header: str | None) -> None:
    resp = await post_restore(client, header)
    assert resp.status == 401
    assert await resp.json() == UNAUTHORIZED
    assert "권한이 없습니다." in await resp.text()  # the Korean text itself, not escapes


async def test_date_without_zone_is_401(client: Client) -> None:
    header = seed_header(START).replace("09:15:02Z", "09:15:02")
    resp = await post_restore(client, header)
    assert resp.status == 401
    assert await resp.json() == UNAUTHORIZED


async def test_two_authorization_headers_are_401(client: Client, clock: FakeClock) -> None:
    headers = [("Authorization", seed_header(clock.datetime())) for _ in range(2)]
    resp = await client.post(RESTORE, json={"recordIds": [TRASHED]}, headers=headers)
    assert resp.status == 401


async def expect_403(resp: aiohttp.ClientResponse, code: str) -> None:
    assert resp.status == 403
    body = await resp.json()
    assert body["errorCode"] == code
    assert isinstance(body["errorMessage"], str) and body["errorMessage"]


async def test_unknown_key_is_invalid_api_key(client: Client, clock: FakeClock) -> None:
    header = seed_header(clock.datetime(), key="NCSUNKNOWNKEY001")
    await expect_403(await post_restore(client, header), "InvalidAPIKey")


async def test_wrong_secret_is_signature_does_not_match(client: Client, clock: FakeClock) -> None:
    header = seed_header(clock.datetime(), secret="not-the-secret")
    await expect_403(await post_restore(client, header), "SignatureDoesNotMatch")


@pytest.mark.parametrize("minutes", [16, -16])
async def test_date_16_minutes_off_is_too_skewed(
    client: Client, clock: FakeClock, minutes: int
) -> None:
    header = seed_header(clock.datetime() + timedelta(minutes=minutes))
    await expect_403(await post_restore(client, header), "RequestTimeTooSkewed")


@pytest.mark.parametrize("minutes", [14, -14])
async def test_date_14_minutes_off_is_accepted(
    client: Client, clock: FakeClock, minutes: int
) -> None:
    header = seed_header(clock.datetime() + timedelta(minutes=minutes))
    assert (await post_restore(client, header)).status == 200


async def test_reused_header_is_duplicated_signature(client: Client, clock: FakeClock) -> None:
    header = seed_header(clock.datetime())
    assert (await post_restore(client, header)).status == 200
    clock.advance(minutes=5)
    await expect_403(await post_restore(client, header), "DuplicatedSignature")


async def test_signature_is_checked_before_the_path(client: Client, clock: FakeClock) -> None:
    resp = await client.get("/crm-core/v1/nowhere")
    assert resp.status == 401
    headers = {"Authorization": seed_header(clock.datetime())}
    resp = await client.get("/crm-core/v1/nowhere", headers=headers)
    assert resp.status == 404
    assert (await resp.json())["errorCode"] == "NotFound"


# --- records ----------------------------------------------------------------------------


def test_demo_record_ids_have_the_documented_shape() -> None:
    assert demo_record_id("TRASH", 1) == "CRMRC2026112800000000TRASH000001"
    assert demo_record_id("TRASH", TRASHED_COUNT) == "CRMRC2026112800000000TRASH001500"
    for kind, count in (("TRASH", TRASHED_COUNT), ("PURGE", PURGED_COUNT), ("ALIVE", ACTIVE_COUNT)):
        assert ID_PATTERN.fullmatch(demo_record_id(kind, count))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        demo_record_id("OTHER", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        demo_record_id("TRASH", 0)


async def test_restore_results(api: Api) -> None:
    purged, alive = demo_record_id("PURGE", 1), demo_record_id("ALIVE", 1)
    unknown = "CRMRC1260422100000000REC11122233"
    assert await api.restore(TRASHED, purged, unknown, alive) == [
        "restored",
        "purged",
        "notFound",
        "notDeleted",
    ]
    assert await api.restore(TRASHED) == ["notDeleted"]


async def test_restore_counts_and_order(api: Api) -> None:
    ids = [demo_record_id("PURGE", 2), demo_record_id("TRASH", 2), demo_record_id("TRASH", 3)]
    status, body = await api.call("POST", RESTORE, {"recordIds": ids})
    assert status == 200
    assert body["requestedCount"] == 3
    assert body["restoredCount"] == 2
    assert body["failedCount"] == 1
    assert [item["recordId"] for item in body["results"]] == ids


async def test_restore_of_1000_ids_in_one_call(api: Api) -> None:
    ids = [demo_record_id("TRASH", n) for n in range(1, 1001)]
    status, body = await api.call("POST", RESTORE, {"recordIds": ids})
    assert status == 200
    assert body["restoredCount"] == 1000
    assert {item["result"] for item in body["results"]} == {"restored"}


async def test_trash_older_than_14_days_becomes_purged(api: Api, clock: FakeClock) -> None:
    oldest, newest = demo_record_id("TRASH", TRASHED_COUNT), demo_record_id("TRASH", 1)
    clock.advance(days=2)  # the oldest was trashed 13 days before start
    assert await api.restore(oldest, newest) == ["purged", "restored"]


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        [],
        {},
        {"recordIds": "CRMRC2026112800000000TRASH000001"},
        {"recordIds": []},
        {"recordIds": [1]},
        {"recordIds": [TRASHED] * 1001},
    ],
)
async def test_bad_restore_body_is_validation_error(api: Api, body: Any) -> None:
    status, answer = await api.call("POST", RESTORE, body)
    assert status == 400
    assert answer["errorCode"] == "ValidationError"


async def test_bulk_delete(api: Api) -> None:
    alive = [demo_record_id("ALIVE", n) for n in (1, 2)]
    unknown = "CRMRC0000000000000000NOSUCH00001"
    assert await api.delete(*alive, unknown) == ["deleted", "deleted", "notFound"]
    assert await api.delete(alive[0], TRASHED) == ["alreadyDeleted", "alreadyDeleted"]
    assert await api.restore(alive[0]) == ["restored"]
    status, body = await api.call("POST", DELETE, {"recordIds": [alive[0]], "permanent": "yes"})
    assert (status, body["errorCode"]) == (400, "ValidationError")


async def test_permanent_bulk_delete_purges(api: Api) -> None:
    alive, trashed = demo_record_id("ALIVE", 3), demo_record_id("TRASH", 7)
    payload = {"recordIds": [alive, trashed], "permanent": True}
    status, body = await api.call("POST", DELETE, payload)
    assert status == 200
    assert body["deletedCount"] == 2
    assert [item["result"] for item in body["results"]] == ["purged", "purged"]
    assert await api.restore(alive, trashed) == ["purged", "purged"]
    assert await api.delete(alive, permanent=True) == ["alreadyDeleted"]


async def test_single_delete_and_restore(api: Api) -> None:
    alive = demo_record_id("ALIVE", 4)
    one = f"/crm-core/v1/records/{alive}"
    assert await api.call("DELETE", one) == (200, {"recordId": alive, "result": "deleted"})
    assert await api.call("DELETE", one) == (200, {"recordId": alive, "result": "alreadyDeleted"})
    restored = await api.call("POST", one + "/restore")
    assert restored == (200, {"recordId": alive, "result": "restored"})
    again = await api.call("POST", one + "/restore")
    assert again == (200, {"recordId": alive, "result": "notDeleted"})
    purged = demo_record_id("PURGE", 3)
    answer = await api.call("POST", f"/crm-core/v1/records/{purged}/restore")
    assert answer == (200, {"recordId": purged, "result": "purged"})
    unknown = "/crm-core/v1/records/CRMRC0000000000000000NOSUCH00001"
    for method, path in (("DELETE", unknown), ("POST", unknown + "/restore")):
        status, body = await api.call(method, path)
        assert (status, body["errorCode"]) == (404, "NotFound")


async def test_trash_listing(api: Api, clock: FakeClock) -> None:
    status, body = await api.call("GET", TRASH)
    assert status == 200
    assert body["totalCount"] == TRASHED_COUNT
    assert len(body["records"]) == 100
    first = body["records"][0]
    assert first["recordId"] == TRASHED  # the most recently deleted
    assert ISO_MS_Z.fullmatch(first["deletedAt"]) and ISO_MS_Z.fullmatch(first["purgeAt"])
    deleted = datetime.fromisoformat(first["deletedAt"])
    assert deleted == clock.datetime() - timedelta(hours=1)
    assert datetime.fromisoformat(first["purgeAt"]) - deleted == timedelta(days=14)

    status, body = await api.call("GET", TRASH + "?limit=1000&offset=1400")
    assert status == 200
    assert [r["recordId"] for r in body["records"]][-1] == demo_record_id("TRASH", TRASHED_COUNT)
    assert len(body["records"]) == 100

    await api.restore(TRASHED)
    await api.delete(demo_record_id("ALIVE", 5))
    clock.advance(days=2)
    status, body = await api.call("GET", TRASH + "?limit=1")
    assert body["records"][0]["recordId"] == demo_record_id("ALIVE", 5)
    assert 1 < body["totalCount"] < TRASHED_COUNT  # the oldest have been purged meanwhile
    purged_ids = {demo_record_id("PURGE", n) for n in range(1, PURGED_COUNT + 1)}
    status, body = await api.call("GET", TRASH + "?limit=1000")
    assert not purged_ids & {r["recordId"] for r in body["records"]}


@pytest.mark.parametrize(
    "query", ["limit=0", "limit=1001", "limit=abc", "offset=-1", "limit=\u0661"]
)
async def test_bad_trash_query_is_validation_error(api: Api, query: str) -> None:
    status, body = await api.call("GET", f"{TRASH}?{query}")
    assert (status, body["errorCode"]) == (400, "ValidationError")


# --- introspection ----------------------------------------------------------------------


async def received(client: Client) -> Any:
    resp = await client.get("/_sandbox/requests")
    assert resp.status == 200
    return await resp.json()


async def test_requests_log_counts_every_api_request(client: Client, clock: FakeClock) -> None:
    body = b'{"recordIds": ["CRMRC2026112800000000TRASH000002"]}'
    header = seed_header(clock.datetime())
    headers = [
        ("Authorization", header),
        ("Content-Type", "application/json"),
        ("X-Request-ID", "req-1"),
        ("X-Dup", "a"),
        ("X-Dup", "b"),
    ]
    assert (await client.post(RESTORE, data=body, headers=headers)).status == 200
    assert (await client.post(RESTORE, data=body)).status == 401
    wrong_key = seed_header(clock.datetime(), key="NCSUNKNOWNKEY001")
    resp = await client.get(TRASH + "?limit=5&offset=0", headers={"Authorization": wrong_key})
    assert resp.status == 403

    log = await received(client)
    assert (log["count"], log["accepted"], log["distinct_salts"]) == (3, 1, 2)
    ok, missing, unknown = log["requests"]
    assert ok["method"] == "POST" and ok["path"] == RESTORE and ok["query"] == ""
    assert ok["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert ok["body_length"] == len(body)
    assert ok["headers"]["authorization"] == header
    assert ok["headers"]["x-request-id"] == "req-1"
    assert ok["headers"]["x-dup"] == "a, b"
    assert ok["headers"]["content-type"] == "application/json"
    assert (ok["verified"], ok["status"]) == (True, 200)
    assert ok["api_key"] == KEY and ok["salt"] == header.split("salt=")[1].split(",")[0]
    assert (missing["verified"], missing["status"], missing["salt"]) == (False, 401, None)
    assert (unknown["path"], unknown["query"]) == (TRASH, "limit=5&offset=0")
    assert (unknown["status"], unknown["api_key"]) == (403, "NCSUNKNOWNKEY001")
    assert unknown["body_length"] == 0
    assert unknown["body_sha256"] == hashlib.sha256(b"").hexdigest()

    assert (await received(client))["count"] == 3  # introspection is not counted


async def test_raw_target_is_logged_undecoded(client: Client, clock: FakeClock) -> None:
    # A raw socket: an HTTP client library would normalise %41 in the query.
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    header = seed_header(clock.datetime())
    writer.write(
        b"GET /crm-core/v1/a%2Fb?x=%41&y HTTP/1.1\r\nHost: sandbox\r\n"
        + f"Authorization: {header}\r\nConnection: close\r\n\r\n".encode()
    )
    assert (await reader.readline()).startswith(b"HTTP/1.1 404 ")
    writer.close()
    entry = (await received(client))["requests"][-1]
    assert (entry["path"], entry["query"]) == ("/crm-core/v1/a%2Fb", "x=%41&y")


async def test_distinct_salts_are_counted_past_the_kept_entries(
    aiohttp_client: MakeClient, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(requestlog, "LOG_CAPACITY", 2)
    client = await aiohttp_client(build_app({KEY: Secret(SECRET)}, clock=clock))
    headers = [seed_header(clock.datetime()) for _ in range(4)]
    statuses = [
        (await post_restore(client, header)).status
        for header in [*headers, headers[0]]  # the last replays the first
    ]
    assert statuses == [200, 200, 200, 200, 403]

    log = await received(client)
    assert (log["count"], log["accepted"], log["distinct_salts"]) == (5, 4, 4)
    assert len(log["requests"]) == 2
    assert (await client.post("/_sandbox/reset")).status == 200
    assert (await received(client))["distinct_salts"] == 0


async def test_reset_clears_the_log_but_not_the_records(api: Api, client: Client) -> None:
    assert await api.restore(TRASHED) == ["restored"]
    resp = await client.post("/_sandbox/reset")
    assert resp.status == 200
    log = await received(client)
    assert (log["count"], log["accepted"], log["requests"]) == (0, 0, [])
    assert await api.restore(TRASHED) == ["notDeleted"]
    assert (await received(client))["count"] == 1


async def test_delay_holds_the_answer_and_the_log_shows_it_in_flight(
    aiohttp_client: MakeClient, clock: FakeClock
) -> None:
    client = await aiohttp_client(build_app({KEY: Secret(SECRET)}, delay_s=0.2, clock=clock))
    pending = asyncio.ensure_future(post_restore(client, seed_header(clock.datetime())))
    for _ in range(100):
        log = await received(client)
        if log["count"]:
            break
        await asyncio.sleep(0.005)
    assert (log["count"], log["requests"][0]["status"]) == (1, None)
    assert not pending.done()
    assert (await pending).status == 200
    assert (await received(client))["requests"][0]["status"] == 200


async def test_no_response_contains_the_secret(api: Api, client: Client, clock: FakeClock) -> None:
    texts: list[str] = []
    for header in (
        None,
        "HMAC-SHA256 junk",
        seed_header(clock.datetime(), secret="wrong"),
        seed_header(clock.datetime(), key="NCSUNKNOWNKEY001"),
        seed_header(clock.datetime() - timedelta(hours=1)),
        seed_header(clock.datetime()),
    ):
        texts.append(await (await post_restore(client, header, [TRASHED])).text())
    texts.append(json.dumps(await api.call("GET", TRASH)))
    texts.append(json.dumps(await api.call("GET", "/nowhere")))
    texts.append(await (await client.get("/_sandbox/requests")).text())
    assert all(SECRET not in text for text in texts)


async def test_run_sandbox_listens_reports_and_stops(capfd: pytest.CaptureFixture[str]) -> None:
    ports: asyncio.Queue[int] = asyncio.Queue()
    task = asyncio.create_task(
        run_sandbox("127.0.0.1", 0, {KEY: Secret(SECRET)}, ready=ports.put_nowait)
    )
    port = await asyncio.wait_for(ports.get(), 5)
    url = f"http://127.0.0.1:{port}{RESTORE}"
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": seed_header(datetime.now(UTC))}
        async with session.post(url, json={"recordIds": [TRASHED]}, headers=headers) as resp:
            assert resp.status == 200
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.post(url, json={})
    err = capfd.readouterr().err
    lines = [json.loads(line) for line in err.splitlines()]
    assert all(set(line) >= {"time", "event"} for line in lines)  # the gateway's own JSON lines
    assert (lines[0]["event"], lines[0]["listen"]) == ("sandbox_ready", f"127.0.0.1:{port}")
    assert lines[-1]["event"] == "sandbox_stopped"
    assert SECRET not in err
