"""gateway/watch.py and ``reload_on_change: true``: a changed file is a reload, as on SIGHUP.

The end-to-end tests lay the config folder out as Kubernetes mounts a
ConfigMap or Secret (each name a symlink into ``..data``, itself a symlink to a
timestamped folder) and change it the way the kubelet does: a new folder, then
``..data`` swapped to it in one rename. A lone gateway and the supervisor of
``--workers 2`` both pick the change up, and ``/status`` says how it went.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support import (
    Creds,
    GatewayProc,
    Proc,
    SandboxProc,
    answers,
    cli,
    free_ports,
    gateway_policy,
    poll,
    write_gateway_config,
)

from gateway import config
from gateway.watch import Watcher, fingerprint

RESTORE = "/crm-core/v1/records/bulk/restore"
# Generous for a loaded machine: the watcher needs two polls (1 s apart) to act.
RELOAD_WITHIN_S = 20.0


# --- the watcher on its own ---------------------------------------------------------------


class Calls:
    def __init__(self) -> None:
        self.changes: list[list[str]] = []

    def __call__(self, paths: list[str]) -> None:
        self.changes.append(paths)


def touch(path: Path, text: str) -> None:
    path.write_text(text)
    later = time.time_ns() + 5_000_000_000  # a new mtime even on a coarse clock
    os.utime(path, ns=(later, later))


def test_an_edit_is_acted_on_once_it_holds_still(tmp_path: Path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("1")
    b.write_text("1")
    calls = Calls()
    watcher = Watcher(lambda: [str(a), str(b)], calls)
    assert watcher.poll(None) is None  # nothing changed
    touch(a, "2")
    pending = watcher.poll(None)
    assert pending is not None and calls.changes == []  # changed: wait for it to settle
    touch(a, "22")  # still being written
    pending = watcher.poll(pending)
    assert pending is not None and calls.changes == []
    assert watcher.poll(pending) is None  # held still for a whole poll
    assert calls.changes == [[str(a)]]
    assert watcher.poll(None) is None  # and once only


def test_a_removed_file_is_a_change(tmp_path: Path) -> None:
    a = tmp_path / "a.yaml"
    a.write_text("1")
    calls = Calls()
    watcher = Watcher(lambda: [str(a)], calls)
    a.unlink()
    assert fingerprint(str(a)) is None
    watcher.poll(watcher.poll(None))
    assert calls.changes == [[str(a)]]


def kubernetes_folder(root: Path, files: dict[str, str], version: int = 1) -> Path:
    """``root/NAME -> ..data/NAME``, ``..data -> ..<version>``, as the kubelet lays it out."""
    root.mkdir(exist_ok=True)
    swap_data(root, files, version)
    for name in files:
        (root / name).symlink_to(Path("..data") / name)
    return root


def swap_data(root: Path, files: dict[str, str], version: int) -> None:
    """A new timestamped folder, then ``..data`` pointed at it in one rename."""
    folder = root / f"..2026_11_30_09_00_{version:02d}.000000001"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    (root / "..data_tmp").symlink_to(folder.name)
    os.replace(root / "..data_tmp", root / "..data")


def test_a_configmap_swap_is_a_change_even_with_the_same_mtime(tmp_path: Path) -> None:
    root = kubernetes_folder(tmp_path / "conf", {"policy.yaml": "a"})
    policy = root / "policy.yaml"
    before = os.stat(policy)
    calls = Calls()
    watcher = Watcher(lambda: [str(policy)], calls)
    swap_data(root, {"policy.yaml": "b"}, 2)
    fresh = next(root.glob("..2026*02*")) / "policy.yaml"
    os.utime(fresh, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size, same mtime
    watcher.poll(watcher.poll(None))
    assert calls.changes == [[str(policy)]]


def test_the_files_a_config_depends_on_come_from_its_keys(tmp_path: Path) -> None:
    (tmp_path / "gateway.yaml").write_text(
        'listen: "127.0.0.1:18080"\nupstream: {url: "http://127.0.0.1:18089"}\n'
        'credentials: {api_key: "NCSTESTKEY000001", api_secret_file: "secret/api_secret"}\n'
        'policy: "rules/policy.yaml"\naudit_log: "audit.jsonl"\n'
    )
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "api_secret").write_text("s")
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "policy.yaml").write_text(
        "roles: [A]\nroutes: [{name: r, method: GET, path: /r, min_role: A}]\n"
    )
    settings = config.load(str(tmp_path / "gateway.yaml"))
    assert settings.watched_files() == (
        str(tmp_path / "gateway.yaml"),
        str(tmp_path / "secret/api_secret"),
        str(tmp_path / "rules/policy.yaml"),
    )  # and not the audit log, which the gateway writes itself
    assert settings.reload_on_change is False


# --- end to end: a Kubernetes-style config folder -------------------------------------------


def layout(workdir: Path, creds: Creds, upstream: str) -> tuple[Path, dict[str, str], int, int]:
    """The test config as a mounted ConfigMap: (folder, its files, port, admin port)."""
    port, admin_port = free_ports(2)
    scratch = workdir / "written"
    write_gateway_config(
        scratch,
        port=port,
        admin_port=admin_port,
        upstream_url=upstream,
        api_key=creds.api_key,
        secret_file="api_secret",
        policy=gateway_policy(creds),
        settings={"shutdown_grace_s": 5},
    )
    files = {
        "gateway.yaml": (scratch / "gateway.yaml").read_text() + "reload_on_change: true\n",
        "policy.yaml": (scratch / "policy.yaml").read_text(),
        "api_secret": creds.secret + "\n",
    }
    return kubernetes_folder(workdir / "conf", files), files, port, admin_port


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.kill()


def serve(conf: Path, port: int, admin_port: int, procs: list[Proc], *args: str) -> GatewayProc:
    config_path = conf / "gateway.yaml"
    command = [cli(), "serve", "--config", str(config_path), *args]
    proc = Proc(f"gateway :{port}", command, conf.parent / "gateway.stderr")
    procs.append(proc)
    proc.wait_ready(answers(admin_port, "/readyz"))
    return GatewayProc(proc, port, admin_port, config_path)


def status(gateway: GatewayProc) -> dict[str, Any]:
    code, body = gateway.admin("/status")
    assert code == 200, body
    result: dict[str, Any] = json.loads(body)
    return result


async def restore_status(gateway: GatewayProc, creds: Creds, role: str) -> int:
    body = json.dumps({"recordIds": ["CRMRC2026113000000000WATCH000001"]}).encode()
    headers = {"Authorization": creds.bearer(role), "Content-Type": "application/json"}
    # A new connection each time, so that under workers any of them may answer.
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(gateway.url + RESTORE, data=body, headers=headers) as answer,
    ):
        return answer.status


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.e2e
@pytest.mark.parametrize("workers", [1, 2], ids=["lone", "workers-2"])
async def test_a_configmap_swap_reloads_and_status_says_how_it_went(
    tmp_path: Path, creds: Creds, sandbox: SandboxProc, procs: list[Proc], workers: int
) -> None:
    conf, files, port, admin_port = layout(tmp_path, creds, sandbox.url)
    extra = ("--workers", "2") if workers == 2 else ()
    gateway = serve(conf, port, admin_port, procs, *extra)
    first = status(gateway)
    assert first["config_sha256"] == sha256(files["gateway.yaml"])
    assert first["policy_sha256"] == sha256(files["policy.yaml"])
    assert first["last_reload"] is None
    await poll(lambda: status(gateway)["workers"]["ready"] == workers)
    assert len(status(gateway)["workers"]["pids"]) == workers
    assert await restore_status(gateway, creds, "VIEWER") == 403

    # kubectl apply of a ConfigMap that lets VIEWERs restore: a new folder, ..data swapped.
    opened = dict(files, **{"policy.yaml": files["policy.yaml"].replace(
        "min_role: MEMBER\n    batch:", "min_role: VIEWER\n    batch:")})  # fmt: skip
    assert opened != files
    swap_data(conf, opened, 2)
    await poll(lambda: (status(gateway)["last_reload"] or {}).get("result") == "success",
               RELOAD_WITHIN_S)  # fmt: skip
    now = status(gateway)
    assert now["policy_sha256"] == sha256(opened["policy.yaml"]) != first["policy_sha256"]
    assert now["config_sha256"] == first["config_sha256"]
    assert now["loaded_at"] > first["loaded_at"]
    await poll(lambda: reloaded_everywhere(gateway, workers), RELOAD_WITHIN_S)
    assert [await restore_status(gateway, creds, "VIEWER") for _ in range(6)] == [200] * 6
    changed = [e for e in gateway.events() if e["event"] == "files_changed"]
    assert len(changed) == 1 and str(conf / "policy.yaml") in changed[0]["files"]

    # A broken one: refused, the old set keeps serving, /readyz stays ready, /status says why.
    swap_data(conf, dict(opened, **{"policy.yaml": "roles: [VIEWER]\nroutes: oops\n"}), 3)
    await poll(lambda: status(gateway)["last_reload"]["result"] == "failure", RELOAD_WITHIN_S)
    refused = status(gateway)
    assert refused["policy_sha256"] == now["policy_sha256"]
    assert refused["loaded_at"] == now["loaded_at"]
    (problem,) = refused["last_reload"]["error"]
    assert problem.startswith(f"{conf / 'policy.yaml'}:2: routes: ")
    assert gateway.admin("/readyz")[0] == 200
    assert await restore_status(gateway, creds, "VIEWER") == 200
    assert creds.secret not in json.dumps(refused)

    assert gateway.proc.stop(signal.SIGTERM) == 0
    stopped = [e for e in gateway.events() if e["event"] == "stopped"]
    assert len(stopped) == workers + (workers > 1)
    assert len({e["pid"] for e in stopped}) == len(stopped)  # each line says whose it is
    if workers > 1:
        assert sorted(e["process"] for e in stopped) == ["supervisor", "worker", "worker"]
        assert [e["pid"] for e in stopped if e["process"] == "supervisor"] == [gateway.proc.pid]


def reloaded_everywhere(gateway: GatewayProc, workers: int) -> bool:
    lines = [e for e in gateway.events() if e["event"] == "reloaded"]
    return len({e["pid"] for e in lines}) == workers
