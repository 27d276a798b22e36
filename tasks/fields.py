"""Spec data as plain dicts with dotted field names (`checkpoint.save`, `data.blend`): how flows
wire one stage's output into the next stage's spec."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def get_field(data: dict[str, Any], dotted: str, default: Any = None) -> Any:
    for key in dotted.split("."):
        if not isinstance(data, dict) or key not in data:
            return default
        data = data[key]
    return data


def set_field(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of `data` with the (dotted) field set; parent sections are created as needed."""
    head, _, rest = dotted.partition(".")
    out = dict(data)
    out[head] = set_field(out.get(head) or {}, rest, value) if rest else value
    return out


def merged(options: BaseModel | dict[str, Any] | None, **wired: Any) -> dict[str, Any]:
    """Options as plain data — the fields they name, so that what they leave to defaults (a
    cluster profile's layout: cluster/profiles.py) stays left — with the wired fields set
    (`data__blend=` sets `data.blend`)."""
    data = (options.model_dump(mode="json", exclude_unset=True) if isinstance(options, BaseModel)
            else dict(options or {}))
    for key, value in wired.items():
        data = set_field(data, key.replace("__", "."), value)
    return data
