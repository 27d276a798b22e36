"""Flow parameters made from the engine's stage specs, and the full check of a spec.

A flow wires some spec fields itself (inputs that come from earlier stages, the output that the
task places by fingerprint). `stage_options(stage, omit=...)` is the stage's spec model without
those fields: the same types, bounds, defaults and descriptions, copied from the engine's model,
so the Prefect UI draws the same form and rejects the same bad values (a negative `iters`) before
the flow starts. The complete spec is validated by the engine's own model once the flow has
filled the wired fields (flows do this for every stage before the first submission).

The layout fields of the training stages (cluster/profiles.py: LayoutDefaults) are the one
difference: in the options they default to None, "the cluster profile's layout, else the
engine's default". A form sends every value it shows; with the engine's own defaults shown
(tensor_parallel 1), every run from the UI would override the profile's layout.
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator
from pydantic.fields import FieldInfo

from cluster.profiles import LayoutDefaults
from engine.errors import SpecError
from engine.registry import get_stage
from engine.spec import StageSpec, format_validation_error
from engine.train.spec import TrainSpec
from tasks.outputs import UNSET, check_written, given_location, with_location


def stage_options(stage: str, omit: frozenset[str] = frozenset(), name: str | None = None) -> type[BaseModel]:
    """The spec model of `stage` without the (dotted) fields in `omit`."""
    return _without(get_stage(stage).spec, frozenset(omit), name or f"{_camel(stage)}Options")


def section_options(section: type[BaseModel], omit: frozenset[str], name: str) -> type[BaseModel]:
    """A spec section's model (engine/train/spec.py: DistillSection) without the fields in
    `omit`: for a flow that wires those itself."""
    return _without(section, frozenset(omit), name)


LAYOUT = frozenset(LayoutDefaults.model_fields)


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _layout_none_is_not_given(self) -> "_Options":
        """So that flows pass on (tasks/fields.py: merged) only the layout the user chose."""
        for name in LAYOUT & set(type(self).model_fields):
            if getattr(self, name) is None:
                self.model_fields_set.discard(name)
        return self


@cache
def _without(model: type[BaseModel], omit: frozenset[str], name: str) -> type[BaseModel]:
    fields: dict[str, Any] = {}
    for field_name, info in model.model_fields.items():
        if field_name in omit:
            continue
        if field_name in LAYOUT and issubclass(model, TrainSpec):
            fields[field_name] = (info.annotation | None, _left_to_profile(info))
            continue
        nested = frozenset(o.split(".", 1)[1] for o in omit if o.startswith(field_name + "."))
        if not nested:
            fields[field_name] = (info.annotation, copy.copy(info))
            continue
        sub = _without(info.annotation, nested, f"{name}{_camel(field_name)}")
        optional = all(not f.is_required() for f in sub.model_fields.values())
        fields[field_name] = (sub, Field(default_factory=sub, description=info.description)
                              if optional else Field(description=info.description))
    doc = (model.__doc__ or "").strip()
    return create_model(name, __base__=_Options, __doc__=doc or None, **fields)


def _left_to_profile(info: FieldInfo) -> FieldInfo:
    field = copy.copy(info)
    field.default = None
    field.description = (f"{info.description}. None: the cluster profile's layout, else "
                         f"{info.default}")
    return field


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.replace("-", "_").split("_"))


def validate_spec(stage: str, data: dict[str, Any], location: str | None = None) -> StageSpec:
    """`data` through the engine's own model of `stage` (every validator; unknown fields refused;
    errors name each field, as the engine's CLI does), its output set to `location`, or to the
    one `data` names, or to a stand-in while the location is not known yet; what it writes must
    lie inside LMFORGE_HOME."""
    data = with_location(stage, data, location or given_location(stage, data) or UNSET)
    try:
        spec = get_stage(stage).spec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, f"<{stage} spec>")) from None
    check_written(stage, data)
    return spec
