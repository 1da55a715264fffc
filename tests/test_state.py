"""gateway/state.py: the shared state is chosen once, at start-up, and handed down;
its failures are answered as the contract says, and nobody waits past the timeout."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict

from gateway import config, state, walk
from gateway.config import Settings
from gateway.errors import RateLimited, StateUnavailable, Unauthorized
from gateway.identity import verifier_for
from gateway.limits import Charge, Verdict, charges
from gateway.metrics import Metrics
from gateway.policy import Policy
from gateway.server import Gateway
from gateway.signing import Secret, authorization, format_date, new_salt
from gateway.statefile import StateError, StateFile

DEMO_CONFIG = Path(__file__).parent.parent / "config" / "demo" / "gateway.yaml"
LIMITED = """
limits:
  - name: two-a-minute
    key: principal
    routes: ["*"]
    requests_per_min: 2
"""


@pytest.fixture(scope="module")
def settings() -> Settings:
    return config.load(str(DEMO_CONFIG))


@pytest.fixture
def limited(tmp_path: Path) -> Settings:
    """The demo config with one limit: two requests a minute per caller."""
    source = DEMO_CONFIG.parent
    for name in ("gateway.yaml", "api_secret"):
        (tmp_path / name).write_bytes((source / name).read_bytes())
    (tmp_path / "policy.yaml").write_text((source / "policy.yaml").read_text() + LIMITED)
    return config.load(str(tmp_path / "gateway.yaml"))


def worker_share(folder: Path) -> state.Shared:
    return state.Shared(str(folder / "state.sqlite3"), str(folder))


def test_a_lone_process_keeps_its_state_in_memory(settings: Settings) -> None:
    chosen = state.build(settings)
    assert isinstance(chosen.store, state.MemoryState)
    assert state.build(settings).store is not chosen.store  # nothing global


def test_workers_given_the_same_file_share_one_state(settings: Settings, tmp_path: Path) -> None:
    shared = worker_share(tmp_path)
    first, second = state.build(settings, shared), state.build(settings, shared)
    assert isinstance(first.store, StateFile) and first.store.path == shared.state_file
    assert isinstance(second.store, StateFile) and second.store is not first.store


def test_a_redis_backend_is_chosen_by_the_config(tmp_path: Path) -> None:
    source = DEMO_CONFIG.parent
    for name in ("policy.yaml", "api_secret"):
        (tmp_path / name).write_bytes((source / name).read_bytes())
    text = (source / "gateway.yaml").read_text()
    text += 'state: {backend: redis, url: "redis://:pw-never-shown@127.0.0.1:1/0"}\n'
    (tmp_path / "gateway.yaml").write_text(text)
    chosen = state.build(config.load(str(tmp_path / "gateway.yaml")))
    assert type(chosen.store).__name__ == "RedisState"
    assert "pw-never-shown" not in repr(chosen.store.url)  # type: ignore[attr-defined]


def hmac_decision(policy: Policy) -> walk.Decision:
    """A request by the demo's internal key, walked up to the identity step."""
    (principal,) = [p for p in policy.principals if p.hmac_key]
    assert principal.hmac_key is not None and isinstance(principal.hmac_secret, Secret)
    date = format_date(datetime.now(UTC))
    header = authorization(principal.hmac_key, principal.hmac_secret, date, new_salt())
    d = walk.Decision("GET", "/cash/v1/balance")
    headers = CIMultiDict({"Authorization": header})
    walk.locate(d, headers, policy)
    walk.identify(d, headers, None, policy, verifier_for(policy), time.time())
    return d


async def test_a_reused_salt_turns_the_identity_step_into_a_401(settings: Settings) -> None:
    chosen, metrics = state.build(settings), Metrics()
    d = hmac_decision(settings.policy)
    await chosen.remember(d, settings, metrics)  # new: nothing to say
    assert d.error is None
    again = walk.Decision("GET", "/cash/v1/balance", caller=d.caller)
    again.steps.append(walk.Step("identity", True, ""))
    with pytest.raises(Unauthorized) as err:
        await chosen.remember(again, settings, metrics)
    assert (err.value.reason or "").startswith("hmac reused (DuplicatedSignature)")
    assert [(s.name, s.ok) for s in again.steps] == [("identity", False)]


class Broken:
    """A store that fails (``StateError``) or never answers (``hang``)."""

    def __init__(self, *, hang: bool = False) -> None:
        self.hang = hang

    async def remember(self, *args: Any) -> str | None:
        return await self._fail()

    async def consume(self, charges: list[Charge]) -> Verdict:
        return await self._fail()

    async def _fail(self) -> Any:
        if self.hang:
            await asyncio.sleep(3600)
        raise StateError("redis: ConnectionError: refused")

    async def close(self) -> None:
        pass


def value(metrics: Metrics, op: str) -> float:
    return float(metrics.registry.get_sample_value("gateway_state_errors_total", {"op": op}) or 0)


@pytest.mark.parametrize("hang", [False, True], ids=["failing", "silent"])
async def test_an_hmac_caller_gets_503_when_the_state_cannot_answer(
    settings: Settings, hang: bool
) -> None:
    chosen, metrics = state.State(Broken(hang=hang), timeout_s=0.05), Metrics()
    d = hmac_decision(settings.policy)
    started = time.monotonic()
    with pytest.raises(StateUnavailable):
        await chosen.remember(d, settings, metrics)
    assert time.monotonic() - started < 2  # timeout_s is 0.05: a loaded machine's margin
    assert d.error is not None and d.error.code == "StateUnavailable"
    assert value(metrics, "replay") == 1


def charged(settings: Settings) -> walk.Decision:
    d = walk.Decision("GET", "/cash/v1/balance")
    d.charges = charges(settings.policy.limits, "cash-balance", "demo-viewer", 0)
    assert d.charges
    return d


@pytest.mark.parametrize("on_error", ["open", "closed"])
async def test_limits_follow_on_error_when_the_state_fails(
    limited: Settings, on_error: str
) -> None:
    tuned = limited.model_copy(
        update={"state": limited.state.model_copy(update={"on_error": on_error})}
    )
    chosen, metrics = state.State(Broken(), timeout_s=0.05), Metrics()
    if on_error == "open":
        await chosen.consume(charged(tuned), tuned, metrics)  # allowed
    else:
        with pytest.raises(StateUnavailable):
            await chosen.consume(charged(tuned), tuned, metrics)
    assert value(metrics, "limits") == 1


async def test_a_lone_process_counts_limits_and_refuses_with_429(limited: Settings) -> None:
    chosen, metrics = state.build(limited), Metrics()
    for _ in range(2):
        await chosen.consume(charged(limited), limited, metrics)
    with pytest.raises(RateLimited) as err:
        await chosen.consume(charged(limited), limited, metrics)
    assert err.value.headers["RateLimit"] == '"two-a-minute";r=0;t=30'
    assert err.value.headers["Retry-After"] == "30"


async def test_the_gateway_uses_the_state_it_is_given_across_reloads(settings: Settings) -> None:
    chosen = state.build(settings)
    gateway = Gateway(settings, Metrics(), chosen)
    gateway.swap(config.load(str(DEMO_CONFIG)))  # what SIGHUP does
    assert gateway.state is chosen


def test_a_supervisor_prepares_folders_for_one_run_and_removes_them() -> None:
    with state.prepare_shared() as shared:
        state_dir = os.path.dirname(shared.state_file)
        assert os.path.isdir(state_dir)
        assert os.path.isdir(shared.metrics_dir)
        assert not os.path.exists(shared.state_file)  # the first worker creates it
    assert not os.path.exists(state_dir)
    assert not os.path.exists(shared.metrics_dir)


def test_a_metrics_folder_the_operator_chose_is_kept_but_its_old_counts_go(
    tmp_path: Path,
) -> None:
    given = tmp_path / "metrics"
    given.mkdir()
    (given / "counter_4242.db").write_bytes(b"counts of an earlier run")
    (given / "README").write_text("not ours to remove")
    with state.prepare_shared(str(given)) as shared:
        assert shared.metrics_dir == str(given)
        assert sorted(os.listdir(given)) == ["README"]
    assert sorted(os.listdir(given)) == ["README"]
