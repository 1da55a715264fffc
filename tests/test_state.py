"""gateway/state.py: the shared state is chosen once, at start-up, and handed down."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from gateway import config, state
from gateway.config import Settings
from gateway.metrics import Metrics
from gateway.replay import SharedReplayCache
from gateway.server import Gateway
from gateway.signing import REPLAY_REUSED, ReplayCache

DEMO_CONFIG = Path(__file__).parent.parent / "config" / "demo" / "gateway.yaml"


@pytest.fixture(scope="module")
def settings() -> Settings:
    return config.load(str(DEMO_CONFIG))


def worker_share(folder: Path) -> state.Shared:
    return state.Shared(str(folder / "replay.sqlite3"), str(folder))


def test_a_lone_process_keeps_its_replay_memory_in_memory(settings: Settings) -> None:
    chosen = state.build(settings)
    assert isinstance(chosen.replay, ReplayCache)
    assert state.build(settings).replay is not chosen.replay  # nothing global


def test_workers_given_the_same_file_share_one_replay_memory(
    settings: Settings, tmp_path: Path
) -> None:
    shared = worker_share(tmp_path)
    first, second = state.build(settings, shared), state.build(settings, shared)
    assert isinstance(first.replay, SharedReplayCache)
    assert first.replay.path == shared.replay_file
    now = time.time()
    assert first.replay.check_and_add("NCSKEY:salt-seen-by-the-first", now) is None
    assert second.replay.check_and_add("NCSKEY:salt-seen-by-the-first", now) == REPLAY_REUSED


async def test_closing_a_workers_state_lets_go_of_its_file(
    settings: Settings, tmp_path: Path
) -> None:
    shared = worker_share(tmp_path)
    chosen = state.build(settings, shared)
    assert chosen.replay.check_and_add("NCSKEY:salt", time.time()) is None
    assert Path(shared.replay_file + "-wal").exists()
    await chosen.close()
    # The last connection to a WAL database checkpoints it and removes the log.
    assert not Path(shared.replay_file + "-wal").exists()
    await state.build(settings).close()  # an in-memory one closes too


async def test_the_gateway_uses_the_state_it_is_given_across_reloads(settings: Settings) -> None:
    chosen = state.build(settings)
    gateway = Gateway(settings, Metrics(), chosen)
    assert gateway.loaded.verifier.replay is chosen.replay
    gateway.swap(config.load(str(DEMO_CONFIG)))  # what SIGHUP does
    assert gateway.loaded.verifier.replay is chosen.replay


def test_a_supervisor_prepares_folders_for_one_run_and_removes_them() -> None:
    with state.prepare_shared() as shared:
        replay_dir = os.path.dirname(shared.replay_file)
        assert os.path.isdir(replay_dir)
        assert os.path.isdir(shared.metrics_dir)
        assert not os.path.exists(shared.replay_file)  # the first worker creates it
    assert not os.path.exists(replay_dir)
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
