"""prune: a model → a smaller native checkpoint (weights only, iteration 0).

The source (an HF folder, or a native checkpoint of any training layout: it loads by global
names) is loaded whole into one process, importance is measured on the calibration data (engine/prune/importance.py), the plan
chosen (plan.py) and the weights sliced (slicing.py). The output holds the pruned checkpoint
(model_config.json has the new shape, meta.json what was removed and from what), the source's
tokenizer, and `pruning/`: every score (scores.safetensors) and every index kept (plan.json).
Finetune or pretrain `load` it like any checkpoint; recovery distils from the source.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.atomic import check_output_free, staged_dir
from engine.convert.loading import copy_model_tokenizer, load_model
from engine.convert.native import write_native
from engine.errors import InputError
from engine.lineage import stage_fingerprint
from engine.manifest import Manifest, complete, sha256_file, write_manifest
from engine.model.config import ModelConfig
from engine.model.llama import LlamaModel
from engine.prune import importance
from engine.prune.calibration import calibration_tokens
from engine.prune.plan import Plan, kept_layers, make_plan, top
from engine.prune.slicing import norm_scales, prune_state
from engine.prune.spec import Spec, input_paths

log = logging.getLogger(__name__)
PRUNING_DIR = "pruning"
_FROM_SAVE = ("files", "iteration", "world_size", "has_optimizer", "layout", "resharded_from")


def run(spec: Spec) -> Manifest:
    started = time.perf_counter()
    out = Path(spec.output)
    fp, inputs = stage_fingerprint("prune", spec, input_paths(spec))
    done = complete(out)
    if done is not None and done.fingerprint == fp:
        log.info("prune already finished: %s holds it; nothing to do", out)
        return done
    check_output_free(out)
    cfg, model, meta, source = load_model(spec.input)
    try:
        target = spec.pruned_shape(cfg)
    except ValueError as exc:
        raise InputError(f"{source}: {exc}") from None
    seq = spec.seq_length or min(cfg.max_position_embeddings, 4096)
    tokens = calibration_tokens(spec.calibration, source, cfg.vocab_size,
                                spec.calibration_samples, seq, spec.text_key, spec.tokenizer)
    model.to(_device(spec.device))

    clock = time.perf_counter()
    measured = importance.measure(model, tokens, spec.batch_size, spec.progress)
    width = {"activation": lambda: measured.width,
             "magnitude": lambda: importance.magnitude_scores(model),
             "random": lambda: importance.random_scores(model, spec.seed)}[spec.method]()
    layers, depth_scores = _layers(spec, model, cfg, target, measured, tokens)
    seconds = {"importance": time.perf_counter() - clock}
    plan = make_plan(cfg, target, width, layers,
                     spec.tensor_parallel if spec.prune_type == "balance" else 1)
    scales = (norm_scales(measured.energy, plan.hidden) if spec.rescale_norms
              else torch.ones(measured.energy.shape[0]))
    pruned = _pruned_model(model, cfg, target, plan, scales)
    loss = importance.calibration_loss(pruned, tokens, spec.batch_size)
    log.info("pruned %s: %s -> %s parameters; calibration loss %.4f -> %.4f",
             source, f"{cfg.num_parameters():,}", f"{target.num_parameters():,}",
             measured.loss, loss)

    record = {"method": spec.method, "prune_type": spec.prune_type,
              "depth_method": spec.depth_method if depth_scores else None,
              "rescale_norms": spec.rescale_norms, "removed": _removed(cfg, target, plan)}
    out_meta = {**{k: v for k, v in meta.items() if k not in _FROM_SAVE},
                "pruned_from": {"path": str(source), "iteration": meta.get("iteration"),
                                "model": cfg.model_dump(mode="json")},
                "pruning": record}
    scores = {"hidden": width.hidden, "heads": width.heads, "neurons": width.neurons,
              "block_importance": measured.blocks, "norm_input_energy": measured.energy,
              "norm_scale": scales.cpu(), **depth_scores}
    with staged_dir(out) as tmp:
        clock = time.perf_counter()
        final = write_native(tmp, pruned.cpu(), target, out_meta)
        _write_scores(tmp / PRUNING_DIR, scores, plan.record(cfg))
        copy_model_tokenizer(source, tmp)
        seconds["save"] = time.perf_counter() - clock
        seconds["total"] = time.perf_counter() - started
        summary = {"parameters": {"before": cfg.num_parameters(), "after": target.num_parameters()},
                   "shape": {name: [getattr(cfg, name), getattr(target, name)]
                             for name in ("hidden_size", "num_heads", "num_kv_heads",
                                          "intermediate_size", "num_layers")},
                   **record,
                   "calibration": {"sequences": tokens.shape[0], "seq_length": seq,
                                   "loss_before": measured.loss, "loss_after": loss},
                   "seconds": {k: round(v, 3) for k, v in seconds.items()}}
        files = {str(p.relative_to(tmp)): sha256_file(p)
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = Manifest(kind="checkpoint", stage="prune", inputs=inputs, fingerprint=fp,
                            spec=spec.model_dump(mode="json"), summary=summary, files=files)
        write_manifest(tmp, manifest)
    log.info("wrote %s (%s) in %.1f s", out, final.name, seconds["total"])
    return manifest


def _device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise InputError("device cuda: no GPU is visible")
    return torch.device("cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu")


def _layers(spec: Spec, model: LlamaModel, cfg: ModelConfig, target: ModelConfig,
            measured: importance.Measured,
            tokens: torch.Tensor) -> tuple[list[int], dict[str, torch.Tensor]]:
    """The source layers kept, and the depth scores that chose them (none when the user
    named the layers, or none go)."""
    if spec.drop_layers or target.num_layers == cfg.num_layers:
        return kept_layers(cfg, spec.drop_layers), {}
    if spec.depth_method == "block-importance":
        return top(measured.blocks, target.num_layers).tolist(), {}
    clock = time.perf_counter()
    removed, losses = importance.removal_losses(model, tokens, spec.batch_size,
                                                cfg.num_layers - target.num_layers)
    log.info("layers removed by calibration loss, in order (%.1f s): %s",
             time.perf_counter() - clock,
             ", ".join(f"{i} ({losses[step, i]:.4f})" for step, i in enumerate(removed)))
    return kept_layers(cfg, removed), {"removal_losses": losses}


def _pruned_model(model: LlamaModel, cfg: ModelConfig, target: ModelConfig, plan: Plan,
                  scales: torch.Tensor) -> LlamaModel:
    state = prune_state({k: v.detach() for k, v in model.state_dict().items()}, cfg, plan,
                        scales.to(model.norm.weight.device))
    with torch.device("meta"):
        pruned = LlamaModel(target.model_copy(update={"attention_backend": "sdpa"}))
    pruned.to_empty(device=model.norm.weight.device)
    pruned.load_state_dict(state, strict=True)
    return pruned.eval()


def _removed(cfg: ModelConfig, target: ModelConfig, plan: Plan) -> dict:
    return {"layers": [i for i in range(cfg.num_layers) if i not in plan.layers],
            "hidden_channels": cfg.hidden_size - target.hidden_size,
            "heads_per_layer": cfg.num_heads - target.num_heads,
            "kv_heads_per_layer": cfg.num_kv_heads - target.num_kv_heads,
            "neurons_per_layer": cfg.intermediate_size - target.intermediate_size}


def _write_scores(folder: Path, scores: dict[str, torch.Tensor], plan: dict) -> None:
    folder.mkdir()
    save_file({k: v.float().contiguous() for k, v in scores.items()},
              str(folder / "scores.safetensors"))
    (folder / "plan.json").write_text(json.dumps(plan) + "\n", encoding="utf-8")
