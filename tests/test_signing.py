"""gateway/signing.py: headers as SOLAPI expects them, verified as SOLAPI verifies them."""

from __future__ import annotations

import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from solapi.lib.authenticator import Authenticator

from gateway import signing
from gateway.signing import Rejected, ReplayCache, Secret, Signer, Verifier

DATE = "2026-11-28T09:15:02Z"
SALT = "0123456789abcdef0123456789abcdef"
SECRET = "YOUR_API_SECRET"
KEY = "NCSXXXXXXXXXXXXX"
NOW = datetime(2026, 11, 28, 9, 15, 2, tzinfo=UTC).timestamp()


def seed_bash_signature(date: str, salt: str, secret: str) -> str:
    """The seed page's own bash line, run for real."""
    line = (
        f'DATE="{date}"; SALT="{salt}"; API_SECRET="{secret}"; '
        'echo -n "${DATE}${SALT}" | openssl dgst -sha256 -hmac "${API_SECRET}" '
        "| awk '{print $NF}'"
    )
    return subprocess.run(
        ["bash", "-c", line], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
@pytest.mark.parametrize(
    ("date", "salt", "secret"),
    [
        (DATE, SALT, SECRET),
        ("2026-11-28T09:15:02.123Z", "a" * 12, "s3cr3t with spaces"),
        ("2026-11-28T18:15:02.123456+09:00", "f" * 64, "한국어 비밀"),
    ],
)
def test_signature_matches_the_seed_bash_line(date: str, salt: str, secret: str) -> None:
    assert signing.signature(Secret(secret), date, salt) == seed_bash_signature(date, salt, secret)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_signature_matches_the_seed_node_snippet() -> None:
    script = (
        "const crypto = require('crypto');"
        f"const apiSecret = '{SECRET}'; const dateTime = '{DATE}'; const salt = '{SALT}';"
        "const signature = crypto.createHmac('sha256', apiSecret)"
        ".update(dateTime + salt).digest('hex');"
        "process.stdout.write(signature);"
    )
    out = subprocess.run(["node", "-e", script], capture_output=True, text=True, check=True)
    assert signing.signature(Secret(SECRET), DATE, SALT) == out.stdout


def test_header_has_the_contract_shape() -> None:
    header = Signer(KEY, Secret(SECRET)).header_for(DATE, SALT)
    sig = signing.signature(Secret(SECRET), DATE, SALT)
    assert header == f"HMAC-SHA256 apiKey={KEY}, date={DATE}, salt={SALT}, signature={sig}"
    assert re.fullmatch(r"[0-9a-f]{64}", sig)


def test_fresh_headers_differ_and_carry_a_current_utc_date() -> None:
    signer = Signer(KEY, Secret(SECRET))
    headers = [signing.parse(signer.fresh_header()) for _ in range(50)]
    assert len({h.salt for h in headers}) == 50
    for h in headers:
        assert re.fullmatch(r"[0-9a-f]{32}", h.salt)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", h.date)
        assert abs(h.timestamp - datetime.now(UTC).timestamp()) < 5


def test_secret_never_prints_itself() -> None:
    secret = Secret("super-secret-value")
    signer = Signer(KEY, secret)
    for text in (repr(secret), str(secret), f"{secret}", repr(signer), str([signer])):
        assert "super-secret-value" not in text
    assert secret == Secret("super-secret-value")
    assert secret != Secret("other")


# --- verifying -------------------------------------------------------------------


def verifier(**kwargs: object) -> Verifier:
    return Verifier({KEY: Secret(SECRET)}, **kwargs)  # type: ignore[arg-type]


def signed(date: str, salt: str = SALT, *, key: str = KEY, secret: str = SECRET) -> str:
    return signing.authorization(key, Secret(secret), date, salt)


@pytest.mark.parametrize(
    "header",
    [
        signed(DATE),  # the seed: Z, seconds
        signed("2026-11-28T09:15:02.123Z"),  # JS toISOString
        signed("2026-11-28T18:15:02+09:00", "aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dF"),  # Node SDK
        signed("2026-11-28T18:15:02.123456+09:00", "5c0ffee0a1b211efb6d40242ac120002"),
        signed("2026-11-28T09:15:02.123456789Z"),  # nanoseconds
        signed(DATE, "3f2c1a9e-0b7d-11ef-9c1a-0242ac120002"),  # uuid text salt
    ],
)
def test_every_sdk_dialect_verifies(header: str) -> None:
    assert verifier().verify(header, NOW).api_key == KEY


def test_python_sdk_spelling_verifies() -> None:
    header = Authenticator(KEY, SECRET).get_auth_info()
    assert "ApiKey=" in header and "Date=" in header
    creds = verifier().verify(header, datetime.now(UTC).timestamp())
    assert creds.api_key == KEY


@pytest.mark.parametrize(
    ("header", "code"),
    [
        ("", "Unauthorized"),
        ("Bearer abc", "Unauthorized"),
        (f"HMAC-SHA256 apiKey={KEY}, date={DATE}, salt={SALT}", "Unauthorized"),
        (signed("2026-11-28T09:15:02"), "Unauthorized"),  # no zone
        (signed("2026-11-28 09:15:02Z"), "Unauthorized"),
        (signed("2026-13-28T09:15:02Z"), "Unauthorized"),  # not a date
        (signed(DATE, "short"), "Unauthorized"),
        (signed(DATE, "x" * 65), "Unauthorized"),
        (signed(DATE, "bad_salt_with_underscore"), "Unauthorized"),
        (signed(DATE) + ", extra=1", "Unauthorized"),
        (signed(DATE).replace("salt=", "apiKey=x, salt="), "Unauthorized"),
        (signed(DATE, key="NCSUNKNOWN000000"), "InvalidAPIKey"),
        (signed(DATE, secret="wrong"), "SignatureDoesNotMatch"),
    ],
)
def test_bad_headers_are_rejected_with_solapis_code(header: str, code: str) -> None:
    with pytest.raises(Rejected) as err:
        verifier().verify(header, NOW)
    assert err.value.code == code


@pytest.mark.parametrize(("minutes", "ok"), [(14, True), (-14, True), (16, False), (-16, False)])
def test_skew_window_is_fifteen_minutes(minutes: int, ok: bool) -> None:
    date = (datetime.fromtimestamp(NOW, UTC) + timedelta(minutes=minutes)).isoformat()
    header = signed(date)
    if ok:
        verifier().verify(header, NOW)
    else:
        with pytest.raises(Rejected) as err:
            verifier().verify(header, NOW)
        assert err.value.code == "RequestTimeTooSkewed"


def test_offset_dates_compare_in_utc() -> None:
    kst = datetime.fromtimestamp(NOW, timezone(timedelta(hours=9))).isoformat()
    assert kst.endswith("+09:00")
    verifier().verify(signed(kst), NOW)


def test_reused_signature_or_salt_is_refused() -> None:
    v = verifier()
    v.verify(signed(DATE), NOW)
    with pytest.raises(Rejected) as err:
        v.verify(signed(DATE), NOW + 1)
    assert err.value.code == "DuplicatedSignature"
    # The same salt with a new date is a new signature, but still a reused salt.
    with pytest.raises(Rejected):
        v.verify(signed("2026-11-28T09:15:03Z"), NOW + 1)


def test_an_invalid_signature_does_not_burn_the_salt() -> None:
    v = verifier()
    with pytest.raises(Rejected):
        v.verify(signed(DATE, secret="wrong"), NOW)
    v.verify(signed(DATE), NOW)


def test_replay_memory_expires_and_is_bounded() -> None:
    cache = ReplayCache(window_s=900, max_entries=3)
    assert cache.check_and_add("a", 0) is None
    assert cache.check_and_add("a", 10) is not None
    assert cache.check_and_add("b", 10) is None
    assert cache.check_and_add("c", 10) is None
    assert cache.check_and_add("d", 10) == "replay memory full"  # fails closed
    assert cache.check_and_add("d", 1801) is None  # "a" has expired after 2 windows
    assert cache.check_and_add("a", 1805) == "replay memory full"  # b, c, d still live
    assert cache.check_and_add("a", 1811) is None  # b and c have expired too
    assert len(cache) == 2
    assert cache.check_and_add("e", 5000) is None
    assert len(cache) == 1


@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0x10FFFF), max_size=200))
def test_parse_never_crashes_on_garbage(header: str) -> None:
    try:
        signing.parse(header)
    except Rejected as exc:
        assert exc.code == "Unauthorized"


@given(st.text(alphabet="0123456789abcdefABCDEF-", min_size=12, max_size=64))
def test_any_signed_header_round_trips(salt: str) -> None:
    header = signed(DATE, salt)
    try:
        creds = signing.parse(header)
    except Rejected:
        assert salt.startswith("-") or salt.endswith("-")
        return
    assert creds.salt == salt and creds.api_key == KEY and creds.date == DATE


# --- reasons never quote the header ---------------------------------------------------------

SECRET_PART = "sgwTokenXyZ123secret"  # what a caller put where a part should be
header_parts = st.sampled_from(
    [SECRET_PART, f"{SECRET_PART}=1", f"apiKey={SECRET_PART}", "apiKey=NCSX", f"date={SECRET_PART}",
     f"salt={SECRET_PART}", f"signature={SECRET_PART}", f"{SECRET_PART}=", f"ApiKey={SECRET_PART}",
     "date=2026-11-28T09:15:02Z", "salt=0123456789abcdef", "signature=" + "ab" * 32, ""]
)  # fmt: skip


@given(st.lists(header_parts, min_size=1, max_size=6), st.sampled_from([", ", ",", " , "]))
def test_no_reason_quotes_the_header(parts: list[str], comma: str) -> None:
    """A reason goes to the access log: whatever a caller put in the header, a token
    pasted under the wrong scheme included, it is never quoted there."""
    header = "HMAC-SHA256 " + comma.join(parts)
    try:
        signing.parse(header)
    except Rejected as exc:
        assert SECRET_PART not in exc.reason
        assert SECRET_PART[:8] not in exc.reason


def test_a_token_under_the_hmac_scheme_is_refused_by_position() -> None:
    with pytest.raises(Rejected) as err:
        signing.parse(f"HMAC-SHA256 {SECRET_PART}")
    assert err.value.reason == "part 1 of 1 is not apiKey=, date=, salt= or signature="
    with pytest.raises(Rejected) as err:
        signing.parse(f"HMAC-SHA256 ApiKey=a, apikey={SECRET_PART}")
    assert err.value.reason == "repeated part apikey"
