"""Typed stage specs: one pydantic model per stage, loaded from YAML/JSON with errors that name the
file, line and field, and overridable from the command line."""

from __future__ import annotations

import glob
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

    def check_world(self, world_size: int) -> None:
        """Raise ValueError if the stage cannot run on `world_size` ranks (checked at
        submission, before a job is queued)."""


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
                            cli_fields: set[tuple] = frozenset()) -> str:
    """One line per problem: `file:line: field: message` (`file:line: message` for a check of the
    whole spec), or `<command line>: --flag: message` for a value that came from a flag
    (`cli_fields`: the field paths the command line set)."""
    out = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")  # our validators' messages say it all
        out.append(_where(loc, source, lines, cli_fields) + msg)
    return "\n".join(out)


def _where(loc: tuple, source: str, lines: dict[tuple, int] | None, cli_fields: set[tuple]) -> str:
    """`file:line: field: ` or `<command line>: --flag: ` for a field path."""
    flagged = next((n for n in range(len(loc), 0, -1) if loc[:n] in cli_fields), 0)
    if flagged:
        flag = "--" + ".".join(str(p).replace("_", "-") for p in loc[:flagged])
        return f"<command line>: {flag}{''.join(f'[{p}]' for p in loc[flagged:])}: "
    line = next((lines[loc[:n]] for n in range(len(loc), -1, -1) if lines and loc[:n] in lines),
                None)
    where = f"{source}:{line}" if line else source
    # a whole-spec check (a model validator) names its fields in the message
    return f"{where}: {'.'.join(map(str, loc))}: " if loc else f"{where}: "


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
              overrides: dict[str, Any] | None = None, check_inputs: bool = False) -> StageSpec:
    """Build a spec from a file (optional) and command-line overrides (nested sections as nested
    dicts, merged into the file's), naming the culprit on error. With `check_inputs`, every input
    path the spec names (fields marked `{"input": True}`) must exist."""
    data: dict[str, Any] = {}
    lines: dict[tuple, int] = {}
    source = "<command line>"
    if path is not None:
        data, lines = read_config(path)
        source = str(path)
    overrides = overrides or {}
    cli_fields = set(_leaf_paths(overrides))
    try:
        spec = model.model_validate(_merged(data, overrides))
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, source, lines, cli_fields)) from None
    if check_inputs:
        missing = [_where(loc, source, lines, cli_fields) + f"no such file or folder: {value}"
                   for loc, value in _input_values(spec) if not _exists(value)]
        if missing:
            raise SpecError("\n".join(missing))
    return spec


def _merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        both_sections = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both_sections else value
    return out


def _leaf_paths(values: dict[str, Any], prefix: tuple = ()) -> list[tuple]:
    return [path for key, value in values.items()
            for path in (_leaf_paths(value, prefix + (key,)) if isinstance(value, dict)
                         else [prefix + (key,)])]


def _input_values(model: BaseModel, prefix: tuple = ()) -> list[tuple[tuple, str]]:
    """(field path, path) of every input path the spec names; a blend's weights are skipped."""
    out = []
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out += _input_values(value, prefix + (name,))
        elif isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("input"):
            items = value if isinstance(value, list) else [value]
            out += [(prefix + (name, i) if isinstance(value, list) else prefix + (name,), item)
                    for i, item in enumerate(items) if item is not None and not _is_weight(item)]
    return out


def _is_weight(item: str) -> bool:
    try:
        float(item)
    except ValueError:
        return False
    return True


def _exists(path: str) -> bool:
    """A file or folder, a dataset prefix (PREFIX.idx), or a glob matching something."""
    return Path(path).exists() or Path(f"{path}.idx").exists() or bool(glob.glob(path))


def dump_spec(spec: StageSpec) -> str:
    return json.dumps(spec.model_dump(mode="json"), indent=2, sort_keys=True)
