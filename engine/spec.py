"""Typed stage specs: one pydantic model per stage, loaded from YAML/JSON with errors that name the
file, line and field, and overridable from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import to_jsonable_python

from engine.errors import SpecError


class StageSpec(BaseModel):
    """Base of every stage spec: unknown fields are errors, values are validated on assignment,
    and no float may be inf or NaN (YAML's `.inf` passes `gt=0` and would reach the job).

    Fields marked `json_schema_extra={"affects_output": False}` (worker counts, the output's own
    path) and input paths marked `{"input": True}` (their content enters the fingerprint through
    engine.lineage instead) are left out of the stage fingerprint.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True,
                              allow_inf_nan=False)

    def fingerprint_fields(self) -> dict[str, Any]:
        """The spec's fields that change the output, as JSON-able data (nested sections too)."""
        return _output_fields(self)


def _output_fields(model: BaseModel) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, field in type(model).model_fields.items():
        extra = field.json_schema_extra
        if isinstance(extra, dict) and (extra.get("affects_output") is False or extra.get("input")):
            continue
        value = getattr(model, name)
        out[name] = _output_fields(value) if isinstance(value, BaseModel) else to_jsonable_python(value)
    return out


def _compose_with_lines(text: str, source: str) -> tuple[Any, dict[tuple, int]]:
    """Parse YAML (a superset of JSON) and remember the line of every key and item."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise SpecError(f"{where}: not valid YAML/JSON: {getattr(exc, 'problem', exc)}") from None
    lines: dict[tuple, int] = {}

    def build(node: yaml.Node, path: tuple) -> Any:
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            out = {}
            for key_node, value_node in node.value:
                key = key_node.value
                lines[path + (key,)] = key_node.start_mark.line + 1
                out[key] = build(value_node, path + (key,))
                lines[path + (key,)] = key_node.start_mark.line + 1
            return out
        if isinstance(node, yaml.SequenceNode):
            return [build(item, path + (i,)) for i, item in enumerate(node.value)]
        return yaml.safe_load(yaml.serialize(node))

    if root is None:
        return {}, lines
    return build(root, ()), lines


def format_validation_error(exc: ValidationError, source: str, lines: dict[tuple, int] | None = None,
                            cli_fields: set[str] = frozenset()) -> str:
    """One line per problem: `file:line: field: message` (`file:line: message` for a check of the
    whole spec), or `--flag: message` for a value that came from the command line."""
    out = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")  # our validators' messages say it all
        if loc and loc[0] in cli_fields:
            flag = "--" + str(loc[0]).replace("_", "-") + "".join(f"[{p}]" for p in loc[1:])
            out.append(f"<command line>: {flag}: {msg}")
            continue
        line = next((lines[loc[:n]] for n in range(len(loc), -1, -1) if lines and loc[:n] in lines),
                    None)
        where = f"{source}:{line}" if line else source
        # a whole-spec check (a model validator) names its fields in the message
        out.append(f"{where}: {'.'.join(map(str, loc))}: {msg}" if loc else f"{where}: {msg}")
    return "\n".join(out)


def read_config(path: str | Path) -> tuple[dict[str, Any], dict[tuple, int]]:
    """Read a YAML or JSON spec file into a dict plus the line of every field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"{path}: cannot read spec file: {exc.strerror}") from None
    data, lines = _compose_with_lines(text, str(path))
    if not isinstance(data, dict):
        raise SpecError(f"{path}:1: a spec must be a mapping of field names to values")
    return data, lines


def load_spec(model: type[StageSpec], path: str | Path | None = None,
              overrides: dict[str, Any] | None = None) -> StageSpec:
    """Build a spec from a file (optional) and command-line overrides, naming the culprit on error."""
    data: dict[str, Any] = {}
    lines: dict[tuple, int] = {}
    source = "<command line>"
    if path is not None:
        data, lines = read_config(path)
        source = str(path)
    overrides = overrides or {}
    data.update(overrides)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, source, lines, set(overrides))) from None


def dump_spec(spec: StageSpec) -> str:
    return json.dumps(spec.model_dump(mode="json"), indent=2, sort_keys=True)
