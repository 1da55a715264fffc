"""gateway/logs.py: JSON lines on stderr, and the opt-in audit file with its config key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import logs
from gateway.config import load
from gateway.yamlsource import ConfigError

CONFIG = """\
listen: "127.0.0.1:18080"
admin_listen: "127.0.0.1:19090"
upstream:
  url: "http://127.0.0.1:18089"
credentials:
  api_key: "NCSTESTKEY000001"
  api_secret_file: "api_secret"
"""
POLICY = """\
roles: [VIEWER, MEMBER, OWNER]
routes:
  - name: r
    method: POST
    path: /a
    min_role: MEMBER
"""


def config_folder(tmp_path: Path, extra: str) -> Path:
    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "gateway.yaml").write_text(CONFIG + extra, encoding="utf-8")
    (folder / "policy.yaml").write_text(POLICY, encoding="utf-8")
    (folder / "api_secret").write_text("s3cr3t-for-the-audit-tests\n", encoding="utf-8")
    return folder / "gateway.yaml"


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(str(path))
    return [str(p) for p in info.value.problems]


# --- stderr -----------------------------------------------------------------------------


def test_emit_writes_one_json_object_per_line(capfd: pytest.CaptureFixture[str]) -> None:
    logs.emit("access", request_id="r1", path="/a\nb", status=200)
    logs.emit("reloaded", routes=1)
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 2  # the newline in the path stays escaped inside its line
    first = json.loads(lines[0])
    assert (first["event"], first["request_id"], first["path"]) == ("access", "r1", "/a\nb")
    assert first["time"].endswith("Z")


# --- the audit file ---------------------------------------------------------------------


def test_audit_lines_are_appended_and_keep_only_the_audit_fields(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text('{"earlier": true}\n', encoding="utf-8")
    audit = logs.AuditLog(str(path))
    access = {
        "request_id": "r1", "principal": "billing-svc", "role": "MEMBER", "via": "token",
        "route": "records-bulk-restore", "method": "POST", "path": "/x", "status": 200,
        "upstream_status": 200, "attempts": 1, "peer": "10.0.0.7", "duration_ms": 3.2,
    }  # fmt: skip
    audit.write_batch(access, ["CRMRC1", "CRMRC2"])
    audit.close()

    earlier, line = (json.loads(x) for x in path.read_text(encoding="utf-8").splitlines())
    assert earlier == {"earlier": True}
    assert line["record_ids"] == ["CRMRC1", "CRMRC2"]
    assert {k: line[k] for k in logs.AUDIT_FIELDS if k in line} == {
        k: access[k] for k in logs.AUDIT_FIELDS if k in access
    }
    assert "peer" not in line and "duration_ms" not in line
    assert oct(path.stat().st_mode & 0o777) != oct(0o666)


def test_reopen_follows_the_name_after_a_rotation(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = logs.AuditLog(str(path))
    audit.write({"n": 1})
    path.rename(tmp_path / "audit.jsonl.1")
    audit.write({"n": 2})  # still the old file, as logrotate expects until the signal
    audit.reopen()
    audit.write({"n": 3})
    audit.close()
    assert (tmp_path / "audit.jsonl.1").read_text() == '{"n":1}\n{"n":2}\n'
    assert path.read_text() == '{"n":3}\n'


def test_reopen_that_fails_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = logs.AuditLog(str(path))
    with pytest.raises(OSError):
        audit.reopen(str(tmp_path / "no" / "such" / "folder.jsonl"))
    audit.write({"still": "here"})
    audit.close()
    assert path.read_text() == '{"still":"here"}\n'


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_failed_audit_write_is_logged_not_raised(capfd: pytest.CaptureFixture[str]) -> None:
    audit = logs.AuditLog("/dev/full")
    audit.write_batch({"request_id": "r1"}, ["CRMRC1"])
    audit.close()
    line = json.loads(capfd.readouterr().err)
    assert (line["event"], line["path"]) == ("audit_log_failed", "/dev/full")


# --- the audit_log key ------------------------------------------------------------------


def test_audit_log_is_off_by_default(tmp_path: Path) -> None:
    assert load(str(config_folder(tmp_path, ""))).audit_log is None


def test_audit_log_is_relative_to_the_config_file(tmp_path: Path) -> None:
    path = config_folder(tmp_path, 'audit_log: "audit.jsonl"\n')
    assert load(str(path)).audit_log == str(tmp_path / "conf" / "audit.jsonl")
    assert not (tmp_path / "conf" / "audit.jsonl").exists()  # checking creates nothing


def test_audit_log_takes_environment_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GW_AUDIT_DIR", str(tmp_path))
    path = config_folder(tmp_path, 'audit_log: "${GW_AUDIT_DIR}/audit.jsonl"\n')
    assert load(str(path)).audit_log == str(tmp_path / "audit.jsonl")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('"missing/audit.jsonl"', "the folder {conf}/missing does not exist"),
        ('"."', "{conf}/. is a folder, not a file"),
        ('""', "is empty"),
        ("[a, b]", "must be a string"),
        ("12", "must be a string"),
    ],
)
def test_bad_audit_log_values_name_file_line_and_key(
    tmp_path: Path, value: str, message: str
) -> None:
    path = config_folder(tmp_path, f"audit_log: {value}\n")
    line = CONFIG.count("\n") + 1
    expected = f"{path}:{line}: audit_log: {message.format(conf=path.parent)}"
    assert problems(path) == [expected]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_audit_folder_is_an_error(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    path = config_folder(tmp_path, f'audit_log: "{locked}/audit.jsonl"\n')
    (found,) = problems(path)
    assert found.endswith("the folder is not writable")


def test_check_config_reports_a_bad_audit_log_like_every_key(tmp_path: Path) -> None:
    path = config_folder(tmp_path, 'audit_log: "nowhere/audit.jsonl"\n')
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    line = CONFIG.count("\n") + 1
    expected = f"{path}:{line}: audit_log: the folder {path.parent}/nowhere does not exist\n"
    assert done.stderr == expected


# --- access lines: gathered for one event-loop turn, written in whole atomic pieces -----------


async def test_a_turns_access_lines_go_out_together_by_its_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio

    writes: list[bytes] = []
    monkeypatch.setattr(logs.os, "write", lambda fd, data: writes.append(bytes(data)) or len(data))
    for n in range(3):
        logs.access({"time": "t", "event": "access", "request_id": f"r{n}"})
    assert writes == []  # the turn is not over
    await asyncio.sleep(0)
    (written,) = writes
    assert [json.loads(line)["request_id"] for line in written.splitlines()] == ["r0", "r1", "r2"]


async def test_no_write_passes_pipe_buf_and_every_write_holds_whole_lines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio
    import select

    writes: list[bytes] = []
    monkeypatch.setattr(logs.os, "write", lambda fd, data: writes.append(bytes(data)) or len(data))
    for n in range(40):
        logs.access({"time": "t", "event": "access", "request_id": f"r{n}", "pad": "x" * 300})
    await asyncio.sleep(0)
    assert len(writes) > 1 and all(len(w) <= select.PIPE_BUF for w in writes)
    lines = [json.loads(line) for w in writes for line in w.splitlines()]  # each parses whole
    assert [line["request_id"] for line in lines] == [f"r{n}" for n in range(40)]


async def test_an_event_goes_after_the_access_lines_before_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    writes: list[bytes] = []
    monkeypatch.setattr(logs.os, "write", lambda fd, data: writes.append(bytes(data)) or len(data))
    logs.access({"time": "t", "event": "access", "request_id": "r1"})
    logs.emit("reloaded", routes=1)
    assert [json.loads(w)["event"] for w in writes] == ["access", "reloaded"]


def test_without_a_running_loop_an_access_line_is_written_at_once(
    capfd: pytest.CaptureFixture[str],
) -> None:
    logs.access({"time": "t", "event": "access", "request_id": "r1"})
    assert json.loads(capfd.readouterr().err)["request_id"] == "r1"
