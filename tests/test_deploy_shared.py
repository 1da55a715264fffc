"""deploy/shared-gateway/ and deploy/kubernetes/shared.yaml: three replicas and
a Redis. The files parse, have what a shared gateway needs, and the gateway config each
replica reads passes ``check-config`` as mounted (its Redis URL from the environment)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from support import cli

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO / "deploy" / "shared-gateway"
SECRET_URL = "redis://:not-for-your-eyes@redis:6379/0"


def check_config(folder: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "SGW_REDIS_URL": SECRET_URL,
        "SOLAPI_API_KEY": "NCSSHARED0000001",
        "POD_IP": "10.1.2.3",
    }
    return subprocess.run(
        [cli(), "check-config", "--config", str(folder / "gateway.yaml")],
        capture_output=True, text=True, env=env, timeout=30,
    )  # fmt: skip


def test_the_compose_file_runs_three_replicas_on_one_redis_with_health_checks(
    tmp_path: Path,
) -> None:
    compose: dict[str, Any] = yaml.safe_load((SHARED / "docker-compose.yaml").read_text())
    services = compose["services"]
    replicas = [name for name in services if name.startswith("gateway-")]
    assert len(replicas) == 3
    assert all("healthcheck" in services[name] for name in ("redis", "sandbox"))
    for name in replicas:
        depends = services[name]["depends_on"]
        assert depends["redis"] == {"condition": "service_healthy"}
    # The config as mounted: the demo folder, then this folder's two files over it.
    for name in ("api_secret",):
        shutil.copy(REPO / "config" / "demo" / name, tmp_path / name)
    for name in ("gateway.yaml", "policy.yaml"):
        shutil.copy(SHARED / name, tmp_path / name)
    done = check_config(tmp_path)
    assert done.returncode == 0, done.stderr
    assert "state.backend                redis" in done.stdout
    assert "3 rate limit(s):" in done.stdout
    assert "not-for-your-eyes" not in done.stdout + done.stderr


def test_the_kubernetes_file_is_a_3_replica_deployment_on_a_redis_it_names(
    tmp_path: Path,
) -> None:
    docs = list(yaml.safe_load_all((REPO / "deploy" / "kubernetes" / "shared.yaml").read_text()))
    kinds = {doc["kind"]: doc for doc in docs if doc}
    assert set(kinds) >= {"ConfigMap", "Deployment", "Service"}
    deployment = kinds["Deployment"]
    assert deployment["spec"]["replicas"] == 3
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["SGW_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "solapi-gateway-redis"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for name, text in kinds["ConfigMap"]["data"].items():
        (tmp_path / name).write_text(text)
    gateway = (tmp_path / "gateway.yaml").read_text()
    secret = tmp_path / "api_secret"
    secret.write_text("s3cret\n")
    (tmp_path / "gateway.yaml").write_text(
        gateway.replace("/run/secrets/solapi/api_secret", str(secret))
    )
    done = check_config(tmp_path)
    assert done.returncode == 0, done.stderr
    assert "not-for-your-eyes" not in done.stdout + done.stderr
