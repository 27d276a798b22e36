"""The extend stage's spec (torch-free): a model and the context section that finetune takes,
checked against the model's shape where it is visible, before a job is queued."""

from __future__ import annotations

from pydantic import Field, model_validator

from engine.reshard.spec import model_config_of
from engine.spec import StageSpec
from engine.train.context import ContextSection, extended_config


class Spec(StageSpec):
    """A model's RoPE scaling and maximum length rewritten for a longer context, the weights as
    they are: for the methods that work without training (dynamic NTK, YaRN, llama3; PI needs
    training: finetune's context section) and as the start of an extension trained elsewhere."""

    input: str = Field(description="the model: a native checkpoint folder, an iter_* folder or "
                                   "an HF model folder", json_schema_extra={"input": True})
    output: str = Field(description="output folder (must not exist or be empty)",
                        json_schema_extra={"affects_output": False})
    context: ContextSection = Field(description="the new maximum length and the RoPE method")

    @model_validator(mode="after")
    def _fits_source(self) -> Spec:
        found = model_config_of(self.input)
        if found is not None:
            try:
                extended_config(found, self.context)
            except ValueError as exc:
                raise ValueError(f"{self.input}: {exc}") from None
        return self


def input_paths(spec: Spec) -> dict[str, str]:
    return {"source": spec.input}
