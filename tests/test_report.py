"""What the commands print follows from the schema: the summary and the key reference."""

from __future__ import annotations

import shutil
from pathlib import Path

from gateway import report
from gateway.config import Settings, load
from gateway.policy import Policy

REPO = Path(__file__).resolve().parent.parent


def keys(model: type[Settings] | type[Policy]) -> list[str]:
    """Every key path of a schema model, nested mappings included."""
    return [row.split("`")[1] for row in report.reference(model)]


def test_the_reference_page_is_generated_from_the_schema(tmp_path: Path) -> None:
    page = tmp_path / "config.md"
    shutil.copy(REPO / "docs" / "config.md", page)
    changed = report.write_reference(str(page))
    assert not changed, "docs/config.md is out of date with the schema: run `make docs`"
    text = page.read_text()
    for key in keys(Settings) + keys(Policy):
        assert f"| `{key}` |" in text, key


def test_every_config_key_is_in_the_summary_with_defaults_marked() -> None:
    settings = load(str(REPO / "config" / "demo" / "gateway.yaml"))
    text = report.summary(settings)
    shown = {line.split()[0] for line in text.splitlines()[1:] if line.startswith("  ")}
    for key in keys(Settings):
        nested = key in ("upstream", "credentials", "state")
        # An optional mapping that is absent (tracing:, tls:) is one row: "tls  -  (default)".
        absent = "." in key and getattr(settings, key.split(".")[0]) is None
        assert nested or absent or key in shown, key
    assert "  workers" in text and "1  (default)" in text


def test_every_key_has_a_one_line_description() -> None:
    for row in report.reference(Settings) + report.reference(Policy):
        description = row.split(" | ")[-1].rstrip(" |")
        assert description.strip(), f"no description: {row}"
