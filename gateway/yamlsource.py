"""Reading YAML so that every problem can name its file, line and key.

PyYAML's plain loader forgets where values came from, and it silently lets a
later duplicate key win. Here a file is composed into its node tree and turned
into plain data (a ``Document``) that remembers the line of every value and
every key. The schema's pydantic models then validate that data, and each
problem they find is mapped back to ``FILE:LINE: key.path: message``: all of
them, for both files, in one run.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from gateway.schema import Invalid, Invalids, Loc, Reported

M = TypeVar("M", bound=BaseModel)

_MAX_DEPTH: Final = 64
_TYPE_MESSAGES: Final = {
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "int_parsing": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "missing": "required key is missing",
}


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
class Document:
    """One YAML file as plain data, with the line of each value and key."""

    name: str  # the file as given, for problems
    data: Any = None
    lines: dict[Loc, int] = field(default_factory=dict)  # where each value starts
    key_lines: dict[Loc, int] = field(default_factory=dict)  # where each key is written
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)  # see schema.warn

    def error(
        self, loc: Loc, message: str, *, key_line: bool = False, near: str | None = None
    ) -> None:
        if near is not None and loc not in self.lines and loc:
            sibling = (*loc[:-1], near)
            line = self.lines[sibling] if sibling in self.lines else self.line(loc)
        else:
            line = self.line(loc, key_line=key_line)
        self.problems.append(Problem(self.name, line, path(loc), message))

    def line(self, loc: Loc, *, key_line: bool = False) -> int:
        """The line of ``loc``'s key (or value), else of the nearest enclosing value."""
        if key_line and loc in self.key_lines:
            return self.key_lines[loc]
        while loc not in self.lines and loc:
            loc = loc[:-1]
        return self.lines.get(loc, 1)


def path(loc: Loc) -> str:
    """``("routes", 0, "min_role")`` → ``routes[0].min_role``; ``()`` → ``(top)``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "(top)"


def read(name: str, text: str) -> Document:
    """Compose ``text``; a syntax error or an empty file is a problem of the document."""
    doc = Document(name)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        doc.problems.append(Problem(name, line, "(top)", f"not valid YAML: {exc.problem}"))
        return doc
    except yaml.YAMLError as exc:
        doc.problems.append(Problem(name, 1, "(top)", f"not valid YAML: {exc}"))
        return doc
    if root is None:
        doc.error((), "the file is empty")
        return doc
    doc.data = _Reader(doc).value(root, ())
    return doc


class _Reader:
    def __init__(self, doc: Document) -> None:
        self.doc = doc
        self.constructor = yaml.SafeLoader("")

    def value(self, node: yaml.Node, loc: Loc) -> Any:
        self.doc.lines[loc] = node.start_mark.line + 1
        if len(loc) > _MAX_DEPTH:
            self.doc.error(loc, "nested too deeply (or refers to itself)")
            return None
        if isinstance(node, yaml.MappingNode):
            return self.mapping(node, loc)
        if isinstance(node, yaml.SequenceNode):
            return [self.value(item, (*loc, i)) for i, item in enumerate(node.value)]
        return self.constructor.construct_object(node)

    def mapping(self, node: yaml.MappingNode, loc: Loc) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str) or key_node.tag != "tag:yaml.org,2002:str":
                line = key_node.start_mark.line + 1
                self.doc.problems.append(
                    Problem(self.doc.name, line, path(loc), "keys must be plain strings")
                )
                continue
            here = (*loc, key)
            if key in out:
                self.doc.problems.append(
                    Problem(
                        self.doc.name, key_node.start_mark.line + 1, path(here), "duplicate key"
                    )
                )
                continue
            self.doc.key_lines[here] = key_node.start_mark.line + 1
            out[key] = self.value(value_node, here)
        return out


def validate(model: type[M], doc: Document, context: dict[str, Any]) -> M | None:
    """``model`` from the document's data, or None with every problem recorded in it.
    The warnings its validators noted (``schema.warn``) go to ``doc.warnings``."""
    if doc.data is None and doc.problems:
        return None
    try:
        valid = model.model_validate(doc.data, context=context)
    except ValidationError as exc:
        for error in exc.errors(include_url=False, include_input=False):
            _record(doc, model, error)
        return None
    for loc, message in context.get("warnings", ()):
        doc.warnings.append(Problem(doc.name, doc.line(loc, key_line=True), path(loc), message))
    return valid


def _record(doc: Document, model: type[BaseModel], error: ErrorDetails) -> None:
    loc: Loc = tuple(error["loc"])
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, Reported):
        return
    if isinstance(cause, Invalids | Invalid):
        for one in cause.problems if isinstance(cause, Invalids) else [cause]:
            doc.error((*loc, *one.at), one.message, key_line=one.key_line, near=one.near)
        return
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = ", ".join(sorted(_model_at(model, loc[:-1]).model_fields))
        doc.error(loc, f"unknown key (allowed: {allowed})", key_line=True)
    elif kind in _TYPE_MESSAGES:
        doc.error(loc, _TYPE_MESSAGES[kind])
    elif kind in ("greater_than", "greater_than_equal", "less_than_equal"):
        doc.error(loc, _bound(kind, (error.get("ctx") or {})))
    else:
        doc.error(loc, error["msg"])


def _bound(kind: str, ctx: dict[str, Any]) -> str:
    if kind == "greater_than":
        return f"must be greater than {ctx['gt']:g}"
    if kind == "less_than_equal":
        return f"must be at most {ctx['le']:g}"
    return "must be 0 or more" if ctx["ge"] == 0 else f"must be at least {ctx['ge']:g}"


def _model_at(model: type[BaseModel], loc: Loc) -> type[BaseModel]:
    """The model that validates the mapping at ``loc`` below ``model``."""
    current: Any = model
    for part in loc:
        if isinstance(part, str) and _is_model(current):
            current = current.model_fields[part].annotation
        else:  # an index into a list, or a key of a dict of models
            current = _item_type(current)
        current = _model_in(current)
    return current if _is_model(current) else model


def _is_model(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, BaseModel)


def _model_in(kind: Any) -> Any:
    """Strip Annotated and Optional down to the type that matters."""
    while typing.get_origin(kind) is typing.Annotated:
        kind = typing.get_args(kind)[0]
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        kind = options[0] if len(options) == 1 else kind
    return kind


def _item_type(kind: Any) -> Any:
    args = typing.get_args(kind)
    return args[-1] if typing.get_origin(kind) is dict else (args[0] if args else kind)
