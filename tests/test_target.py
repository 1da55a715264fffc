"""gateway/target.py: only canonical origin-form targets pass, never decoded."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import InvalidPath
from gateway.target import split_target

RESTORE = "/crm-core/v1/records/bulk/restore"


@pytest.mark.parametrize(
    ("raw", "path", "query"),
    [
        (RESTORE, RESTORE, ""),
        (RESTORE + "?dryRun=true&x=%2F..", RESTORE, "dryRun=true&x=%2F.."),
        ("/", "/", ""),
        (RESTORE + "/", RESTORE + "/", ""),
        ("/a;b=c/d", "/a;b=c/d", ""),
        ("/a/.b/..c/...", "/a/.b/..c/...", ""),
    ],
)
def test_canonical_targets_pass_unchanged(raw: str, path: str, query: str) -> None:
    assert split_target(raw) == (path, query)


@pytest.mark.parametrize(
    "raw",
    [
        "/crm-core/v1/records/bulk/../bulk/restore",
        "/./crm-core/v1/records/bulk/restore",
        "/crm-core/v1/records/bulk/restore/.",
        "/crm-core/v1/records/bulk/restore/..",
        "/crm-core/v1/records/%2e%2e/restore",
        "/crm-core/v1/records/bulk%2Frestore",
        "/crm-core/v1/records/bulk/restor%65",
        "/crm-core/v1/records/bulk/%25",
        "/crm-core/v1/records/bulk%5Crestore",
        "/crm-core\\v1/records/bulk/restore",
        "//crm-core/v1/records/bulk/restore",
        "/crm-core//v1/records/bulk/restore",
        "/crm-core/v1/records/bulk/restore#frag",
        "/crm-core/v1/records/bulk/restore?x=1#frag",
        "/crm-core/v1/records/bulk/restore%00",
        "/crm-core/v1/records/bulk/restore\x00",
        "/crm-core/v1/records/bulk/rest ore",
        "/crm-core/v1/records/bulk/résumé",
        "http://evil.example/crm-core/v1/records/bulk/restore",
        "api.solapi.com:443",
        "*",
        "",
        "crm-core/v1/records/bulk/restore",
    ],
)
def test_everything_else_is_invalid_path(raw: str) -> None:
    with pytest.raises(InvalidPath) as err:
        split_target(raw)
    assert err.value.status == 400 and err.value.code == "InvalidPath"


@given(st.text(max_size=80))
def test_whatever_passes_is_plain_and_unchanged(raw: str) -> None:
    try:
        path, query = split_target(raw)
    except InvalidPath:
        return
    assert raw == path + ("?" + query if query or raw.endswith("?") else "")
    assert path.startswith("/") and "//" not in path
    assert not set(path) & set("%\\#") and path.isascii()
    assert all(segment not in (".", "..") for segment in path.split("/"))


@given(st.text(alphabet=st.sampled_from("/a.%#?\\ \x7f\x00é;=&"), max_size=40))
def test_the_quick_path_and_the_full_check_agree(raw: str) -> None:
    from gateway.target import _refuse

    try:
        quick: tuple[str, str] | str = split_target(raw)
    except InvalidPath as exc:
        quick = exc.message
    try:
        full: tuple[str, str] | str = _refuse(raw)
    except InvalidPath as exc:
        full = exc.message
    assert quick == full
