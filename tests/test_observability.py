"""deploy/observability/: the alerting rules pass ``promtool test rules``, the dashboard
is sound, and every metric either reads is one a running gateway exports.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import GatewayProc

from gateway.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent
HERE = REPO / "deploy" / "observability"
RULES = HERE / "alerts.yaml"
RULE_TESTS = HERE / "alerts.test.yaml"
DASHBOARD = HERE / "dashboard.json"
# Series that Prometheus makes itself for every scrape target, not the gateway.
PROMETHEUS_OWN = {"up"}
_NAME = re.compile(r"\bgateway_[a-z_]+\b|\bup(?=\{)")


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing in CI: .ci/run installs the prometheus package")
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return found


def test_the_rules_are_valid_and_their_unit_tests_pass() -> None:
    tool = promtool()
    checked = subprocess.run([tool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [tool, "test", "rules", RULE_TESTS.name], cwd=HERE, capture_output=True, text=True
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_rule_is_tested_firing() -> None:
    rules = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    fired = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
        if case.get("exp_alerts")
    }
    assert rules == fired, rules ^ fired
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("page", "ticket"), rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]


def dashboard() -> dict[str, Any]:
    result: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return result


def test_the_dashboard_is_sound() -> None:
    board = dashboard()
    assert board["uid"] and board["title"]
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "job", "route"} <= variables
    covered: set[tuple[int, int]] = set()
    for panel in panels:
        box = panel["gridPos"]
        assert box["x"] >= 0 and box["x"] + box["w"] <= 24, panel["title"]
        cells = {(box["y"] + dy, box["x"] + dx) for dy in range(box["h"]) for dx in range(box["w"])}
        assert not cells & covered, f"{panel['title']} overlaps another panel"
        covered |= cells
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
            assert "$__rate_interval" in target["expr"] or "rate(" not in target["expr"]


def used_names() -> dict[str, str]:
    """Every series name a panel, a rule or a rule test reads → where."""
    found: dict[str, str] = {}
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", ()):
            for name in _NAME.findall(target["expr"]):
                found.setdefault(name, f"dashboard: {panel['title']}")
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            for name in _NAME.findall(rule["expr"]):
                found.setdefault(name, f"rule {rule['alert']}")
    for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for series in test["input_series"]:
            name = series["series"].partition("{")[0]
            found.setdefault(name, f"rule test {test['name']}")
    return found


def exported(text: str) -> set[str]:
    """The series names a scrape can hold, from its # TYPE lines."""
    names = set()
    for kind_line in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        name, kind = kind_line
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            names.add(name)
    return names


@pytest.mark.e2e
def test_every_metric_read_is_one_a_running_gateway_exports(gateway: GatewayProc) -> None:
    status, body = gateway.admin("/metrics")
    assert status == 200
    real = exported(body.decode())
    assert {"gateway_requests_total", "gateway_request_duration_seconds_bucket"} <= real
    used = used_names()
    for name in ("gateway_rate_limited_total", "gateway_in_flight_requests", "up"):
        assert name in used, f"nothing reads {name}"
    unknown = {n: where for n, where in used.items() if n not in real | PROMETHEUS_OWN}
    assert not unknown, unknown


def test_the_metrics_page_lists_every_metric() -> None:
    table = (REPO / "docs" / "metrics.md").read_text()
    listed = set(re.findall(r"^\| `(gateway_[a-z_]+)` \|", table, re.M))
    real = {
        m.name if m.type != "counter" else f"{m.name}_total" for m in Metrics().registry.collect()
    }
    assert real <= listed, real - listed
    assert listed <= real, listed - real
