"""Reading YAML so that every problem can name its file, line and key.

PyYAML's plain loader forgets where values came from, and it silently lets a
later duplicate key win. Config and policy are instead read from the composed
node tree: each reader takes a node and its key path, returns a plain Python
value (or None), and on a problem records ``FILE:LINE: key.path: message`` in a
shared ``Problems`` list instead of raising. So one run reports every error.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import yaml

T = TypeVar("T")

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.path}: {self.message}"


class ConfigError(Exception):
    """Raised once, at the end of a load, with every problem found."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


@dataclass(slots=True)
class Problems:
    items: list[Problem] = field(default_factory=list)

    def add(self, file: str, line: int, path: str, message: str) -> None:
        self.items.append(Problem(file, line, path, message))

    def __bool__(self) -> bool:
        return bool(self.items)


class Source:
    """One YAML file being read: its name as given, and where problems go."""

    def __init__(self, name: str, problems: Problems) -> None:
        self.name = name
        self.problems = problems
        self._constructor = yaml.SafeLoader("")

    def error(self, node: yaml.Node | None, path: str, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else 1
        self.problems.add(self.name, line, path or "(top)", message)

    def compose(self, text: str) -> yaml.Node | None:
        try:
            return yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else 1
            self.problems.add(self.name, line, "(top)", f"not valid YAML: {exc.problem}")
        except yaml.YAMLError as exc:
            self.problems.add(self.name, 1, "(top)", f"not valid YAML: {exc}")
        return None

    # --- structure ---------------------------------------------------------------

    def mapping(
        self,
        node: yaml.Node | None,
        path: str,
        *,
        required: tuple[str, ...] = (),
        optional: tuple[str, ...] = (),
    ) -> dict[str, yaml.Node] | None:
        """The keys of a mapping node; unknown, duplicate and missing keys are problems."""
        if not isinstance(node, yaml.MappingNode):
            self.error(node, path, "must be a mapping")
            return None
        allowed = set(required) | set(optional)
        out: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                self.error(key_node, path, "keys must be plain strings")
                continue
            here = join(path, key)
            if key not in allowed:
                self.error(key_node, here, f"unknown key (allowed: {', '.join(sorted(allowed))})")
            elif key in out:
                self.error(key_node, here, "duplicate key")
            else:
                out[key] = value_node
        for key in required:
            if key not in out:
                self.error(node, join(path, key), "required key is missing")
        return out

    def sequence(self, node: yaml.Node, path: str) -> Iterator[tuple[str, yaml.Node]]:
        if not isinstance(node, yaml.SequenceNode):
            self.error(node, path, "must be a list")
            return
        for index, item in enumerate(node.value):
            yield f"{path}[{index}]", item

    # --- scalars -----------------------------------------------------------------

    def _scalar(self, node: yaml.Node, path: str, tag: str, kind: str) -> object | None:
        if not isinstance(node, yaml.ScalarNode) or node.tag != tag:
            self.error(node, path, f"must be {kind}")
            return None
        value: object = self._constructor.construct_object(node)
        return value

    def string(self, node: yaml.Node, path: str, *, env: bool = False) -> str | None:
        """A string; with ``env``, ``${VAR}`` references are replaced from the environment."""
        value = self._scalar(node, path, "tag:yaml.org,2002:str", "a string")
        if not isinstance(value, str):
            return None
        if not env:
            return value
        missing = [name for name in _ENV_REF.findall(value) if name not in os.environ]
        if missing:
            self.error(node, path, f"environment variable {', '.join(missing)} is not set")
            return None
        return _ENV_REF.sub(lambda m: os.environ[m.group(1)], value)

    def integer(self, node: yaml.Node, path: str, *, minimum: int = 0) -> int | None:
        value = self._scalar(node, path, "tag:yaml.org,2002:int", "an integer")
        if not isinstance(value, int):
            return None
        if value < minimum:
            self.error(node, path, f"must be at least {minimum}")
            return None
        return value

    def number(self, node: yaml.Node, path: str, *, positive: bool = True) -> float | None:
        value: object | None
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:int":
            value = self._scalar(node, path, "tag:yaml.org,2002:int", "a number")
        else:
            value = self._scalar(node, path, "tag:yaml.org,2002:float", "a number")
        if not isinstance(value, int | float) or not math.isfinite(value):
            if value is not None:
                self.error(node, path, "must be a finite number")
            return None
        if value < 0 or (positive and value == 0):
            self.error(node, path, "must be greater than 0" if positive else "must be 0 or more")
            return None
        return float(value)

    def integer_at(
        self, keys: dict[str, yaml.Node], prefix: str, key: str, default: int, *, minimum: int = 0
    ) -> int | None:
        """The optional integer ``key`` of a mapping read with ``mapping``, else ``default``."""
        if key not in keys:
            return default
        return self.integer(keys[key], join(prefix, key), minimum=minimum)

    def number_at(
        self,
        keys: dict[str, yaml.Node],
        prefix: str,
        key: str,
        default: float,
        *,
        positive: bool = True,
    ) -> float | None:
        """The optional number ``key`` of a mapping read with ``mapping``, else ``default``."""
        if key not in keys:
            return default
        return self.number(keys[key], join(prefix, key), positive=positive)

    def boolean(self, node: yaml.Node, path: str) -> bool | None:
        value = self._scalar(node, path, "tag:yaml.org,2002:bool", "true or false")
        return value if isinstance(value, bool) else None

    def strings(self, node: yaml.Node, path: str) -> list[tuple[str, yaml.Node, str]]:
        """A list of strings, as (path, node, value) for the ones that are strings."""
        out = []
        for item_path, item in self.sequence(node, path):
            value = self.string(item, item_path)
            if value is not None:
                out.append((item_path, item, value))
        return out

    def checked(
        self, node: yaml.Node, path: str, value: T | None, check: Callable[[T], str | None]
    ) -> T | None:
        """Apply ``check`` (returns a problem or None) to a value that was read."""
        if value is None:
            return None
        message = check(value)
        if message is not None:
            self.error(node, path, message)
            return None
        return value


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
