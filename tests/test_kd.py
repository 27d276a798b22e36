"""Knowledge distillation: the chunked loss against full logits, and a run through the loop."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_MODEL, engine_ranks

from engine.checkpoint import store as ckpt
from engine.checkpoint.safe_load import SafeReader
from engine.errors import InputError
from engine.model.config import ModelConfig
from engine.model.llama import LlamaModel
from engine.parallel.mesh import build_mesh
from engine.model.fused_loss import linear_cross_entropy
from engine.model.kd_loss import TeacherTarget, linear_distillation_loss
from engine.train.loop import Trainer, train
from engine.manifest import read_manifest
from engine.train.spec import DistillSpec, PretrainSpec
from engine.data.provenance import checkpoint_tokenizers, dataset_tokenizers
from engine.train.teacher import load_teacher

V, H, HT, N = 96, 16, 24, 37


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.randn(V, H, generator=g, dtype=torch.float64).requires_grad_()
    teacher_hidden = torch.randn(N, HT, generator=g, dtype=torch.float64)
    teacher_weight = torch.randn(V, HT, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (N,), generator=g)
    mask = torch.rand(N, generator=g) > 0.2
    return hidden, weight, teacher_hidden, teacher_weight, targets, mask


def _direct(hidden, weight, teacher_hidden, teacher_weight, targets, mask, alpha, tau, top_k):
    """The definition over full logits, by autograd."""
    s, t = hidden @ weight.t(), teacher_hidden @ teacher_weight.t()
    ce = (F.cross_entropy(s, targets, reduction="none") * mask).sum()
    log_q = F.log_softmax(s / tau, dim=-1)
    if top_k is None:
        kl = F.kl_div(log_q, F.log_softmax(t / tau, dim=-1), log_target=True,
                      reduction="none").sum(-1)
    else:
        values, index = (t / tau).topk(top_k, dim=-1)
        log_p = F.log_softmax(values, dim=-1)
        kl = (log_p.exp() * (log_p - log_q.gather(1, index))).sum(-1)
    kd = tau ** 2 * (kl * mask).sum()
    return alpha * ce + (1 - alpha) * kd, ce, kd


@pytest.mark.parametrize("top_k", [None, 5, V])
def test_chunked_kd_equals_full_logits(top_k):
    hidden, weight, th, tw, targets, mask = _inputs()
    alpha, tau = 0.3, 2.0
    loss, parts = linear_distillation_loss(hidden, weight, TeacherTarget(th, tw, alpha, tau, top_k),
                                           targets, mask, chunk_rows=8)
    loss.backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref, ce, kd = _direct(hidden, weight, th, tw, targets, mask, alpha, tau, top_k)
    ref.backward()
    assert torch.allclose(loss.double(), ref, rtol=1e-6), (loss, ref)
    assert torch.allclose(parts.double(), torch.stack((ce, kd)).detach(), rtol=1e-6)
    assert kd > 0
    for a, b in zip(got, (hidden.grad, weight.grad)):
        assert (a - b).abs().max() < 1e-6 * b.abs().max(), (a - b).abs().max()


def test_top_k_of_whole_vocabulary_is_full_kl():
    hidden, weight, th, tw, targets, mask = _inputs(1)
    full = linear_distillation_loss(hidden, weight, TeacherTarget(th, tw, 0.0, 1.5), targets, mask)
    every = linear_distillation_loss(hidden, weight, TeacherTarget(th, tw, 0.0, 1.5, V), targets, mask)
    assert torch.allclose(full[0], every[0], rtol=1e-9)


def test_alpha_one_is_plain_cross_entropy():
    hidden, weight, th, tw, targets, mask = _inputs(2)
    hidden, weight = hidden.float().detach().requires_grad_(), weight.float().detach().requires_grad_()
    loss, parts = linear_distillation_loss(hidden, weight, TeacherTarget(th.float(), tw.float(), 1.0, 2.0),
                                           targets, mask, chunk_rows=16)
    loss.backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ce = linear_cross_entropy(hidden, weight, targets, mask, chunk_rows=16)
    ce.backward()
    assert torch.equal(loss, ce) and torch.equal(parts[0], ce)
    assert torch.equal(got[0], hidden.grad) and torch.equal(got[1], weight.grad)


def test_teacher_tensors_get_no_gradient():
    hidden, weight, th, tw, targets, mask = _inputs(3)
    th.requires_grad_(), tw.requires_grad_()
    loss, _ = linear_distillation_loss(hidden, weight, TeacherTarget(th, tw, 0.5, 1.0), targets, mask)
    loss.backward()
    assert th.grad is None and tw.grad is None and hidden.grad is not None


def _distill_spec(fixtures, save, vocab_size=512, **distill):
    student = {**TINY_MODEL, "hidden_size": 32, "intermediate_size": 64,  # smaller than the teacher
               "vocab_size": vocab_size}
    return PretrainSpec.model_validate({
        "model": student, "data": {"blend": [fixtures["dataset"]], "seq_length": 32},
        "checkpoint": {"save": str(save)}, "iters": 6, "global_batch_size": 4,
        "micro_batch_size": 2, "optim": {"lr": 1e-2, "warmup_iters": 0, "min_lr": 1e-3},
        "log_interval": 1, "precision": "fp32", "device": "cpu",
        "distill": {"teacher": str(fixtures["checkpoint"]), "alpha": 0.5, "temperature": 2.0,
                    **distill}})


def test_distillation_run_trains_the_student_only(fixtures, tmp_path, monkeypatch):
    """Through the real loop: the teacher is frozen, outside the optimizer and the checkpoint,
    and the loss (with its CE and KD parts logged) goes down."""
    trainers = []
    init = Trainer.__init__
    monkeypatch.setattr(Trainer, "__init__",
                        lambda self, *a: (init(self, *a), trainers.append(self))[0])
    train(_distill_spec(fixtures, tmp_path / "run", top_k=8), "pretrain")
    (trainer,) = trainers
    teacher = list(trainer.teacher.parameters())
    assert teacher and all(not p.requires_grad and p.grad is None for p in teacher)
    optimized = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in optimized}.isdisjoint(id(p) for p in teacher)
    assert sum(p.numel() for p in optimized) == trainer.n_params
    assert all(id(p) in {id(q) for q in optimized} for p in trainer.optimizer.state)

    path = ckpt.checkpoint_path(tmp_path / "run")
    stored = SafeReader(str(path)).read_metadata().state_dict_metadata
    student = dict(trainer.model.named_parameters())
    model_keys = {k.removeprefix("model.") for k in stored if k.startswith("model.")}
    assert model_keys == set(student)
    assert all(stored[f"model.{k}"].size == p.shape for k, p in student.items())
    optim_keys = {k for k in stored if k.startswith("optim.")}
    assert optim_keys and all(any(f".{name}." in k or k.endswith(f".{name}") for name in student)
                              for k in optim_keys)

    steps = _logged(tmp_path / "run")
    assert len(steps) == 6
    for m in steps:
        assert m["loss"] == pytest.approx(0.5 * m["loss_ce"] + 0.5 * m["loss_kd"], rel=1e-6)
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.3, [m["loss"] for m in steps]

    # two ranks under FSDP, the teacher sharded as the student: the same run
    spec = _distill_spec(fixtures, tmp_path / "fsdp", top_k=8).model_dump(mode="json")
    config = tmp_path / "fsdp.json"
    config.write_text(json.dumps({**spec, "data_parallel": "fsdp"}))
    engine_ranks(["pretrain", "--config", str(config)], ranks=2)
    for one, two in zip(steps, _logged(tmp_path / "fsdp"), strict=True):
        for key in ("loss", "loss_ce", "loss_kd"):
            assert abs(one[key] - two[key]) < 1e-5, (key, one, two)


def test_distill_stage_of_a_student_that_is_its_teacher(fixtures, tmp_path):
    """`python -m engine distill`: a student started from the teacher's weights has no KL to
    close at its first step (KD alone: α 0); the stage needs a teacher."""
    spec = {"load": str(fixtures["checkpoint"]), "checkpoint": {"save": str(tmp_path / "run")},
            "data": {"blend": [fixtures["dataset"]], "seq_length": 32}, "iters": 2,
            "global_batch_size": 2, "log_interval": 1, "precision": "fp32", "device": "cpu",
            "distill": {"teacher": str(fixtures["checkpoint"]), "alpha": 0.0}}
    with pytest.raises(ValueError, match="distill\n  Field required"):
        DistillSpec.model_validate({k: v for k, v in spec.items() if k != "distill"})
    config = tmp_path / "distill.json"
    config.write_text(json.dumps(spec))
    engine_ranks(["distill", "--config", str(config)], ranks=1)
    first, second = _logged(tmp_path / "run")
    assert first["loss"] == first["loss_kd"] and first["loss_kd"] < 1e-6
    assert first["loss_ce"] > 1.0 and second["loss"] == second["loss_kd"]
    assert read_manifest(tmp_path / "run").stage == "distill"


def _logged(save) -> list[dict]:
    lines = (save / "metrics.jsonl").read_text().splitlines()
    return [m["data"] for m in map(json.loads, lines) if "loss_kd" in m["data"]]


def test_teacher_loads_in_bf16(fixtures, tmp_path):
    """The checkpoint's fp32 weights are read into a bf16 teacher (training in bf16)."""
    spec = _distill_spec(fixtures, tmp_path).model_copy(update={"precision": "bf16"})
    cpu = torch.device("cpu")
    teacher = load_teacher(spec, spec.model, build_mesh(spec.layout(1), cpu), cpu)
    path = ckpt.checkpoint_path(fixtures["checkpoint"])
    with torch.device("meta"):
        fp32 = LlamaModel(ModelConfig.model_validate(ckpt.read_model_config(path)))
    fp32.to_empty(device=cpu)
    ckpt.load_checkpoint(path, fp32, restore_rng=False)
    for (name, p), q in zip(teacher.named_parameters(), fp32.parameters(), strict=True):
        assert p.dtype == torch.bfloat16 and not p.requires_grad, name
        assert torch.equal(p, q.to(torch.bfloat16)), name
    assert not teacher.training


def test_teacher_of_another_tokenizer_is_refused(fixtures, tmp_path):
    recorded = checkpoint_tokenizers(ckpt.checkpoint_path(fixtures["checkpoint"]))
    assert recorded and recorded == dataset_tokenizers([fixtures["dataset"]])  # compared above
    bigger = _distill_spec(fixtures, tmp_path / "a", vocab_size=1024)
    with pytest.raises(InputError, match="vocabulary of 512 tokens, the student's has 1024"):
        train(bigger, "pretrain")
    other = tmp_path / "other-teacher"
    shutil.copytree(fixtures["checkpoint"], other)
    (other / "tokenizer").mkdir()
    (other / "tokenizer" / "tokenizer.model").write_bytes(b"another tokenizer")
    spec = _distill_spec(fixtures, tmp_path / "b", teacher=str(other))
    with pytest.raises(InputError, match="teacher and the student's data were made with different "
                                         "tokenizers.*can only supply synthetic data"):
        train(spec, "pretrain")
    spec = _distill_spec(fixtures, tmp_path / "c", teacher=str(fixtures["hf_model"]))
    with pytest.raises(InputError, match="Hugging Face model; convert it"):
        train(spec, "pretrain")


def test_distill_spec_refuses_bad_values_and_tensor_parallel(fixtures, tmp_path):
    spec = _distill_spec(fixtures, tmp_path).model_dump()
    for bad, match in (({"alpha": 1.5}, "less than or equal to 1"),
                       ({"temperature": 0}, "greater than 0"), ({"top_k": 0}, "greater than or equal to 1")):
        with pytest.raises(ValueError, match=match):
            PretrainSpec.model_validate({**spec, "distill": {**spec["distill"], **bad}})
    with pytest.raises(ValueError, match="distill is not supported with tensor_parallel"):
        PretrainSpec.model_validate({**spec, "tensor_parallel": 2, "precision": "bf16"})
