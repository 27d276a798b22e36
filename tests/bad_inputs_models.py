"""Bad-input rows for the stages that read models and model specs: convert and evaluate given a
damaged HF model folder or native checkpoint, pretrain given a spec with a non-finite float or a
sequence longer than the model's positions.

An HF model folder keeps its manifest (an lmforge export: damage shows as a size or checksum
mismatch) or loses it (a foreign model: the damaged file itself must be reported)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml
from safetensors.torch import load_file, save_file

from tests.badinput import BadInput

SAFE = "model.safetensors"
DROPPED = "model.layers.1.mlp.up_proj.weight"  # the tensor the missing-tensor row removes


# ------------------------------------------------------------------ damaging copies of fixtures

def _hf(tmp: Path, fixtures: dict, manifest: bool = True) -> Path:
    """A copy of the exported HF model; without its manifest it stands for a foreign model."""
    folder = tmp / "model"
    shutil.copytree(fixtures["hf_model"], folder)
    if not manifest:
        (folder / "manifest.json").unlink()
    return folder


def _checkpoint(tmp: Path, fixtures: dict) -> Path:
    """A copy of the checkpoint; its latest iteration folder."""
    root = tmp / "ckpt"
    shutil.copytree(fixtures["checkpoint"], root)
    iteration = int((root / "latest_checkpointed_iteration.txt").read_text())
    return root / f"iter_{iteration:07d}"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _flip_bit(path: Path) -> None:
    """One bit in the middle of the file (tensor data): same size, different checksum."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _drop_tensor(path: Path) -> None:
    state = load_file(path)
    del state[DROPPED]
    save_file(state, path, metadata={"format": "pt"})


def _drop_config_field(folder: Path, key: str) -> None:
    config = json.loads((folder / "config.json").read_text())
    del config[key]
    (folder / "config.json").write_text(json.dumps(config))


# ------------------------------------------------------------------ command lines

def _convert(tmp: Path, src: Path, source: str, target: str) -> list[str]:
    return ["--load-dir", str(src), "--save-dir", str(tmp / "out"), "--source-format", source,
            "--target-format", target]


def _evaluate(tmp: Path, model: Path) -> list[str]:
    text = tmp / "doc.txt"
    text.write_text("Once upon a time there was a tiny model.\n")
    return ["--load-dir", str(model), "--output", str(tmp / "report"), "--ppl", str(text),
            "--device", "cpu", "--no-progress"]


def _pretrain(tmp: Path, fixtures: dict, model: dict | None = None, **fields) -> list[str]:
    """A minimal pretrain spec (the checkpoint fixture's architecture) with `fields` merged into
    its sections, written to tmp/spec.yaml."""
    model = model or _model_config(fixtures)
    spec = {"model": model, "data": {"blend": [str(fixtures["dataset"])], "seq_length": 32},
            "checkpoint": {"save": str(tmp / "run")}, "optim": {"lr": 3e-3},
            "iters": 2, "global_batch_size": 2, "precision": "fp32", "device": "cpu"}
    for key, value in fields.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) else value
    (tmp / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return ["--config", str(tmp / "spec.yaml")]


def _model_config(fixtures: dict) -> dict:
    root = Path(fixtures["checkpoint"])
    iteration = int((root / "latest_checkpointed_iteration.txt").read_text())
    return json.loads((root / f"iter_{iteration:07d}" / "model_config.json").read_text())


def _truncated_foreign(tmp: Path, fixtures: dict) -> Path:
    folder = _hf(tmp, fixtures, manifest=False)
    _truncate(folder / SAFE)
    return folder


def _flipped_export(tmp: Path, fixtures: dict) -> Path:
    folder = _hf(tmp, fixtures)
    _flip_bit(folder / SAFE)
    return folder


def _truncated_export(tmp: Path, fixtures: dict) -> Path:
    folder = _hf(tmp, fixtures)
    _truncate(folder / SAFE)
    return folder


def _config_not_json(tmp: Path, fixtures: dict) -> Path:
    folder = _hf(tmp, fixtures, manifest=False)
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    return folder


def _config_without_hidden_size(tmp: Path, fixtures: dict) -> Path:
    folder = _hf(tmp, fixtures, manifest=False)
    _drop_config_field(folder, "hidden_size")
    return folder


def _tensor_missing(tmp: Path, fixtures: dict) -> Path:
    folder = _hf(tmp, fixtures, manifest=False)
    _drop_tensor(folder / SAFE)
    return folder


def _flipped_shard(tmp: Path, fixtures: dict) -> Path:
    iteration = _checkpoint(tmp, fixtures)
    _flip_bit(iteration / "__0_0.distcp")
    return iteration.parent


def _truncated_shard(tmp: Path, fixtures: dict) -> Path:
    iteration = _checkpoint(tmp, fixtures)
    _truncate(iteration / "__0_0.distcp")
    return iteration


NOT_SAFETENSORS = (r"{tmp}/model/model\.safetensors: not a valid safetensors file \(truncated or "
                   r"corrupt\): Error while deserializing header")
TRUNCATED = (r"{tmp}/model/model\.safetensors: \d+ bytes, the recorded size is \d+: the file is "
             r"truncated or was changed")
CHECKSUM = r"{tmp}/model/model\.safetensors: checksum mismatch \(sha256 \w+…, recorded \w+…\)"

ROWS: list[BadInput] = [
    BadInput(
        "convert", "HF source: model.safetensors truncated (a model without a manifest)",
        lambda tmp, fx: _convert(tmp, _truncated_foreign(tmp, fx), "hf", "native"),
        NOT_SAFETENSORS, ("out",),
        "…/model/model.safetensors: not a valid safetensors file (truncated or corrupt): Error "
        "while deserializing header: incomplete metadata, file not fully covered"),
    BadInput(
        "convert", "HF source: model.safetensors truncated (an lmforge export)",
        lambda tmp, fx: _convert(tmp, _truncated_export(tmp, fx), "hf", "hf"),
        TRUNCATED, ("out",),
        "…/model/model.safetensors: 280244 bytes, the recorded size is 560488: the file is "
        "truncated or was changed"),
    BadInput(
        "convert", "HF source: one bit flipped in model.safetensors (an lmforge export)",
        lambda tmp, fx: _convert(tmp, _flipped_export(tmp, fx), "hf", "native"),
        CHECKSUM, ("out",),
        "…/model/model.safetensors: checksum mismatch (sha256 3ac7b6fd2500329c…, recorded "
        "e0981df7162c3908…): the file is corrupt"),
    BadInput(
        "convert", "HF source: config.json is not JSON",
        lambda tmp, fx: _convert(tmp, _config_not_json(tmp, fx), "hf", "native"),
        r"{tmp}/model/config\.json: not valid JSON: Expecting property name", ("out",),
        "…/model/config.json: not valid JSON: Expecting property name enclosed in double quotes: "
        "line 1 column 40 (char 39)"),
    BadInput(
        "convert", "HF source: config.json lacks a required field",
        lambda tmp, fx: _convert(tmp, _config_without_hidden_size(tmp, fx), "hf", "hf"),
        r"{tmp}/model/config\.json: HF config lacks hidden_size", ("out",),
        "…/model/config.json: HF config lacks hidden_size"),
    BadInput(
        "convert", "HF source: a tensor missing from model.safetensors",
        lambda tmp, fx: _convert(tmp, _tensor_missing(tmp, fx), "hf", "native"),
        r"{tmp}/model/model\.safetensors: does not fit the model config: missing tensors "
        r"model\.layers\.1\.mlp\.up_proj\.weight", ("out",),
        f"…/model/model.safetensors: does not fit the model config: missing tensors {DROPPED}"),
    BadInput(
        "convert", "native source: one bit flipped in a checkpoint shard",
        lambda tmp, fx: _convert(tmp, _flipped_shard(tmp, fx), "native", "hf"),
        r"{tmp}/ckpt/iter_\d+/__0_0\.distcp: checksum mismatch", ("out",),
        "…/ckpt/iter_0000002/__0_0.distcp: checksum mismatch (sha256 f89b6c836441b1fd…, "
        "recorded bd070e9972253228…): the file is corrupt"),
    BadInput(
        "convert", "native source: a checkpoint shard truncated",
        lambda tmp, fx: _convert(tmp, _truncated_shard(tmp, fx), "native", "hf"),
        r"{tmp}/ckpt/iter_\d+/__0_0\.distcp: \d+ bytes, the recorded size is \d+", ("out",),
        "…/ckpt/iter_0000002/__0_0.distcp: 295726 bytes, the recorded size is 591453: the file "
        "is truncated or was changed"),
    BadInput(
        "evaluate", "model.safetensors truncated (a model without a manifest)",
        lambda tmp, fx: _evaluate(tmp, _truncated_foreign(tmp, fx)),
        NOT_SAFETENSORS, ("report",),
        "…/model/model.safetensors: not a valid safetensors file (truncated or corrupt): Error "
        "while deserializing header: incomplete metadata, file not fully covered"),
    BadInput(
        "evaluate", "one bit flipped in model.safetensors (an lmforge export)",
        lambda tmp, fx: _evaluate(tmp, _flipped_export(tmp, fx)),
        CHECKSUM, ("report",),
        "…/model/model.safetensors: checksum mismatch (sha256 3ac7b6fd2500329c…, recorded "
        "e0981df7162c3908…): the file is corrupt"),
    BadInput(
        "pretrain", "optim.lr: .inf",
        lambda tmp, fx: _pretrain(tmp, fx, optim={"lr": float("inf")}),
        r"{tmp}/spec\.yaml:\d+: optim\.lr: Input should be a finite number", ("run",),
        "…/spec.yaml:26: optim.lr: Input should be a finite number"),
    BadInput(
        "pretrain", "a NaN in the model config (model.rms_norm_eps: .nan)",
        lambda tmp, fx: _pretrain(tmp, fx, model={**_model_config(fx), "rms_norm_eps": float("nan")}),
        r"{tmp}/spec\.yaml:\d+: model\.rms_norm_eps: Input should be a finite number", ("run",),
        "…/spec.yaml:11: model.rms_norm_eps: Input should be a finite number"),
    BadInput(
        "pretrain", "data.seq_length above model.max_position_embeddings",
        lambda tmp, fx: _pretrain(tmp, fx, data={
            "seq_length": 2 * _model_config(fx)["max_position_embeddings"]}),
        r"{tmp}/spec\.yaml:1: data\.seq_length \(\d+\) is above model\.max_position_embeddings "
        r"\(\d+\)", ("run",),
        "…/spec.yaml:1: data.seq_length (256) is above model.max_position_embeddings (128)"),
]
