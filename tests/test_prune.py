"""The prune stage: what importance chooses, the sliced weights, the real stories260K model
pruned by each method, HF in and out, the Cookbook's flags and bad input."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from conftest import TINY_MODEL, engine_ranks, shared
from engine.__main__ import kebab_flags, stage_parser
from engine.convert import stage as convert
from engine.convert.native import load_native
from engine.data import tokenize
from engine.data.tokenizer import load_tokenizer
from engine.errors import InputError, SpecError
from engine.generate.generator import Generator
from engine.generate.params import SamplingParams
from engine.model.config import ModelConfig
from engine.model.llama import LlamaModel
from engine.prune import stage as prune
from engine.prune.calibration import calibration_tokens
from engine.prune.importance import Width, calibration_loss, measure, random_scores
from engine.prune.plan import make_plan, top
from engine.prune.shape import Targets, pruned_shape
from engine.prune.slicing import norm_scales, prune_state
from engine.prune.spec import Spec
from engine.registry import get_stage
from engine.spec import load_spec
from engine.train.loop import train
from engine.train.spec import FinetuneSpec

WIDTH = {"hidden_size": 56, "num_kv_heads": 2, "intermediate_size": 100}  # 49% of non-embedding


@pytest.fixture(scope="module")
def stories(tmp_path_factory) -> dict:
    """stories260K as a native checkpoint, and its own samples from BOS (in-domain text) as
    calibration and held-out JSONL."""
    root = tmp_path_factory.mktemp("prune")
    convert.run(convert.Spec(load_dir=str(shared("tiny-llama", "hf")), save_dir=str(root / "parent"),
                             source_format="hf", target_format="native"))
    _, model, _, _ = load_native(root / "parent")
    tok = load_tokenizer(root / "parent" / "tokenizer")
    params = [SamplingParams(temperature=1.0, max_tokens=127, seed=i) for i in range(96)]
    texts = [c[0].text for c in Generator(model, tok, torch.device("cpu"), progress=False)
             .generate([[tok.bos_id]] * 96, params)]
    for name, rows in (("calibration", texts[:64]), ("heldout", texts[64:])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    return {"root": root, "parent": root / "parent", "calibration": root / "calibration.jsonl",
            "heldout": calibration_tokens(str(root / "heldout.jsonl"), root / "parent" / "iter_0000000",
                                          512, 32, 127)}


def _prune(stories, out, **targets):
    spec = Spec(input=str(stories["parent"]), output=str(stories["root"] / out),
                calibration=str(stories["calibration"]), calibration_samples=64, seq_length=127,
                **targets)
    return prune.run(spec), stories["root"] / out


def test_keeping_everything_changes_nothing(stories):
    manifest, out = _prune(stories, "same", hidden_size=64, num_layers=5)
    _, parent, _, _ = load_native(stories["parent"])
    _, pruned, meta, _ = load_native(out)
    ids = stories["heldout"][:4]
    assert torch.equal(parent(ids), pruned(ids))
    assert manifest.summary["parameters"] == {"before": 260_032, "after": 260_032}
    plan = json.loads((out / "pruning" / "plan.json").read_text())
    assert plan["layers_removed"] == [] and plan["hidden_kept"] == list(range(64))
    assert meta["pruned_from"]["model"]["hidden_size"] == 64 and meta["hf_token_ids"]


def test_importance_beats_random_on_stories260k(stories):
    """Half the non-embedding parameters by width, and 2 of 5 layers by depth: held-out loss
    right after pruning. Importance beats every random draw by width, and the expected loss of
    a random choice of layers (all ten choices) by depth; greedy ppl finds the best choice."""
    def heldout_loss(out) -> float:
        return calibration_loss(load_native(out)[1], stories["heldout"], 32)

    width = {name: heldout_loss(_prune(stories, f"width-{name}", **WIDTH, **method)[1])
             for name, method in (("activation", {}), ("magnitude", {"method": "magnitude"}),
                                  *((f"random-{s}", {"method": "random", "seed": s})
                                    for s in range(3)))}
    best_random = min(v for k, v in width.items() if k.startswith("random"))
    assert width["activation"] < best_random - 0.2 and width["magnitude"] < best_random, width

    depth = {name: heldout_loss(_prune(stories, f"depth-{name}", num_layers=3,
                                       depth_method=name)[1])
             for name in ("block-importance", "ppl")}
    cfg, parent, _, _ = load_native(stories["parent"])
    target = cfg.model_copy(update={"num_layers": 3})
    every = []
    for layers in itertools.combinations(range(5), 3):
        plan = make_plan(cfg, target, random_scores(parent, 0), list(layers), 1)
        model = LlamaModel(target)
        model.load_state_dict(prune_state(parent.state_dict(), cfg, plan, torch.ones(11)))
        every.append(calibration_loss(model, stories["heldout"], 32))
    assert depth["ppl"] == pytest.approx(min(every), abs=1e-6), (depth, every)
    assert depth["block-importance"] < sum(every) / len(every), (depth, every)


def _carrying_nothing(cfg: ModelConfig, seed: int = 0):
    """A random model in which some hidden channels, heads (or KV groups) and neurons carry
    nothing: their removal must leave the logits as they are."""
    torch.manual_seed(seed)
    model = LlamaModel(cfg)
    model.init_weights(seed)
    dead_hidden = torch.tensor([1, 5, 6, 30])
    dead_kv = torch.tensor([1])
    dead_neurons = torch.tensor([0, 7, 8, 40])
    rows = (dead_kv[:, None] * cfg.head_dim + torch.arange(cfg.head_dim)).flatten()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)  # attention far from uniform
        model.embed.weight[:, dead_hidden] = 0
        for block in model.layers.values():
            block.attn.wo.weight[dead_hidden] = 0
            block.mlp.w_down.weight[dead_hidden] = 0
            block.attn.wv.weight[rows] = 0  # the group's heads output nothing
            if block.attn.wv.bias is not None:
                block.attn.wv.bias[rows] = 0
            block.mlp.w_up.weight[dead_neurons] = 0
    return model, dead_hidden, dead_kv, dead_neurons


@pytest.mark.parametrize("fields", [
    {"num_heads": 4, "num_kv_heads": 2},                                 # GQA, untied
    {"num_heads": 4, "num_kv_heads": 4, "tie_word_embeddings": True},    # MHA, tied
    {"num_heads": 4, "num_kv_heads": 2, "family": "qwen2"},              # q/k/v biases
])
def test_removing_units_that_carry_nothing_keeps_the_logits(fields):
    """Activation importance finds exactly the units that carry nothing, and slicing them away
    (norms rescaled) leaves the logits unchanged; the pruned model trains."""
    # eps ~0: the norms' epsilon is the one term the rescale does not carry over
    cfg = ModelConfig.model_validate({**TINY_MODEL, "num_layers": 3, "rms_norm_eps": 1e-12,
                                      **fields})
    model, hidden, kv, neurons = _carrying_nothing(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (6, 17), generator=torch.Generator().manual_seed(1))
    measured = measure(model, tokens, 4)
    group = cfg.num_heads // cfg.num_kv_heads
    target = pruned_shape(cfg, Targets(hidden_size=60, num_kv_heads=cfg.num_kv_heads - 1,
                                       num_heads=cfg.num_heads - group, intermediate_size=124))
    plan = make_plan(cfg, target, measured.width, [0, 1, 2], 1)
    assert set(plan.hidden.tolist()).isdisjoint(hidden.tolist())
    assert all(set(n.tolist()).isdisjoint(neurons.tolist()) for n in plan.neurons)
    assert all(k.tolist() == [g for g in range(cfg.num_kv_heads) if g not in kv] for k in plan.kv_heads)
    scales = norm_scales(measured.energy, plan.hidden)
    assert (scales > 1).all()  # fewer channels, the same energy: rms over them grows
    pruned = LlamaModel(target)
    pruned.load_state_dict(prune_state(model.state_dict(), cfg, plan, scales))
    ids = tokens[:, :-1]
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids), model(ids), rtol=1e-4, atol=1e-4)
    loss = pruned(ids, targets=tokens[:, 1:])
    loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in pruned.parameters())
    unscaled = LlamaModel(target)
    unscaled.load_state_dict(prune_state(model.state_dict(), cfg, plan, torch.ones_like(scales)))
    with torch.no_grad():
        assert (unscaled(ids) - model(ids)).abs().max() > 1e-2  # the rescale is what keeps them


def test_gqa_heads_and_tensor_parallel_balance():
    cfg = ModelConfig.model_validate({**TINY_MODEL, "num_layers": 1, "num_heads": 8,
                                      "num_kv_heads": 4, "intermediate_size": 8})
    heads = torch.tensor([[9., 1, 8, 3, 0, 2, 4, 5]])  # groups (0,1) (2,3) (4,5) (6,7): 10 11 2 9
    neurons = torch.tensor([[9., 8, 7, 6, 1, 2, 3, 4]])
    width = Width(torch.ones(cfg.hidden_size), heads, neurons)
    target = pruned_shape(cfg, Targets(num_heads=2, num_kv_heads=2, intermediate_size=4,
                                       tensor_parallel=2))
    unbalanced = make_plan(cfg, target, width, [0], 1)
    assert unbalanced.kv_heads[0].tolist() == [0, 1] and unbalanced.heads[0].tolist() == [0, 2]
    assert unbalanced.neurons[0].tolist() == [0, 1, 2, 3]
    balanced = make_plan(cfg, target, width, [0], 2)  # each rank's half keeps one group, 2 neurons
    assert balanced.kv_heads[0].tolist() == [1, 3] and balanced.heads[0].tolist() == [2, 7]
    assert balanced.neurons[0].tolist() == [0, 1, 6, 7]
    within = pruned_shape(cfg, Targets(num_heads=4))  # GQA: query heads go within the groups
    assert (within.num_heads, within.num_kv_heads) == (4, 4)
    assert make_plan(cfg, within, width, [0], 1).heads[0].tolist() == [0, 2, 5, 7]
    assert top(torch.tensor([1., 3, 2, 0]), 2).tolist() == [1, 2]


def test_hf_in_pruned_hf_out_and_recovery_at_tensor_parallel_2(stories, tmp_path):
    """HF stories260K → pruned (depth, width, GQA groups, Cookbook flags) → HF: the export loads
    in transformers with our logits; the pruned checkpoint finetunes at TP 2."""
    import transformers

    out = tmp_path / "pruned"
    argv = ["--input", str(shared("tiny-llama", "hf")), "--output", str(out), "--calibration",
            str(stories["calibration"]), "--calibration-samples", "16", "--seq_length", "127",
            "--hidden_size_remain", "48", "--num_attention_heads_remain", "4",
            "--num_kv_heads", "2", "--ffn_hidden_size_remain", "128", "--drop_layers", "1,3",
            "--tensor_parallel", "2", "--prune_type", "balance"]
    assert engine_main(["prune", *argv]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["summary"]["removed"]["layers"] == [1, 3]
    assert (out / "tokenizer" / "tokenizer.model").is_file()  # carried from the HF folder
    convert.run(convert.Spec(load_dir=str(out), save_dir=str(tmp_path / "hf"),
                             source_format="native", target_format="hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    _, ours, _, _ = load_native(out)
    ids = stories["heldout"][:2]
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-5, atol=1e-5)
    assert hf.config.num_hidden_layers == 3 and hf.config.num_key_value_heads == 2

    dataset = _dataset(stories, tmp_path)
    config = tmp_path / "recover.json"
    config.write_text(json.dumps({
        "load": str(out), "data": {"blend": [dataset], "seq_length": 64, "split": "100,0,0"},
        "checkpoint": {"save": str(tmp_path / "tp2")}, "iters": 2, "global_batch_size": 2,
        "tensor_parallel": 2, "precision": "fp32", "device": "cpu"}))
    engine_ranks(["finetune", "--config", str(config)], ranks=2)
    assert (tmp_path / "tp2" / "iter_0000002").is_dir()


def test_recovery_by_distillation_from_the_parent(stories, tmp_path):
    """The pruned student (hidden 48) learns from its parent (hidden 64) through the KD loss."""
    _, out = _prune(stories, "recover", **WIDTH)
    dataset = _dataset(stories, tmp_path)
    spec = FinetuneSpec.model_validate({
        "load": str(out), "data": {"blend": [dataset], "seq_length": 127, "split": "100,0,0"},
        "checkpoint": {"save": str(tmp_path / "kd")}, "iters": 12, "global_batch_size": 8,
        "micro_batch_size": 8, "precision": "fp32", "device": "cpu",
        "optim": {"lr": 3e-3, "warmup_iters": 2},
        "distill": {"teacher": str(stories["parent"]), "alpha": 0.0}})
    train(spec, "finetune")
    _, before, _, _ = load_native(out)
    _, after, _, _ = load_native(tmp_path / "kd")
    assert (calibration_loss(after, stories["heldout"], 32)
            < calibration_loss(before, stories["heldout"], 32) - 0.05)


def _dataset(stories, tmp_path) -> str:
    tokenize.run(tokenize.Spec(input=[str(stories["calibration"])],
                               output_prefix=str(tmp_path / "cal"), add_bos=True, progress=False,
                               tokenizer=str(stories["parent"] / "tokenizer" / "tokenizer.model")))
    return str(tmp_path / "cal_text_document")


def engine_main(argv: list[str]) -> int:
    from engine.__main__ import main
    return main(argv)


def _spec(argv: list[str]) -> Spec:
    parser, source = stage_parser(get_stage("prune"))
    return load_spec(Spec, None, source(parsed_args=parser.parse_args(kebab_flags(argv)))())


def test_cookbook_flags_by_their_names(stories):
    spec = _spec(["--input", str(stories["parent"]), "--output", "x", "--calibration", "c",
                  "--hidden_size_remain", "48", "--num_attention_heads_remain", "4",
                  "--ffn_hidden_size_remain", "96", "--drop_layers", "1,3",
                  "--prune_type", "unbalance"])
    assert (spec.hidden_size, spec.num_heads, spec.intermediate_size) == (48, 4, 96)
    assert spec.drop_layers == [1, 3] and spec.prune_type == "unbalance"


@pytest.mark.parametrize("flags, message", [
    (["--hidden-size", "50", "--multiple-of", "16"], "hidden_size 50 is not a multiple of multiple_of 16"),
    (["--num-heads", "6"], "num_heads 6 with num_kv_heads 4"),
    (["--num-kv-heads", "2", "--tensor-parallel", "3"], "num_heads 8 is not divisible by tensor_parallel 3"),
    (["--drop-layers", "0,1,2,3,4"], "removes all 5 layers"),
    (["--drop-layers", "5"], "drop_layers [5] outside the model's layers 0..4"),
    (["--num-layers", "2", "--drop-layers", "1"], "num_layers or drop_layers, not both"),
    (["--hidden-size", "80"], "hidden_size 80: must be between 1 and the model's 64"),
    (["--target-parameters", "1000"], "target_parameters 1,000 is below the smallest shape"),
    ([], "nothing to prune"),
])
def test_targets_that_cannot_be_met_are_refused_before_any_work(stories, flags, message):
    with pytest.raises(SpecError, match="prune|nothing") as info:
        _spec(["--input", str(stories["parent"]), "--output", "x", "--calibration", "c", *flags])
    assert message in str(info.value)


def test_target_parameters_picks_the_largest_shape_under_it(stories):
    cfg = ModelConfig.model_validate_json(
        (stories["parent"] / "iter_0000000" / "model_config.json").read_text())
    shape = pruned_shape(cfg, Targets(target_parameters=150_000, multiple_of=8))
    assert shape.num_parameters() <= 150_000 and shape.hidden_size % 8 == 0
    bigger = shape.model_copy(update={"hidden_size": shape.hidden_size + 8})
    assert bigger.num_parameters() > 150_000


def test_calibration_in_another_tokenizer_is_refused(stories, tmp_path, llama2_sp):
    tokenize.run(tokenize.Spec(input=[str(stories["calibration"])], output_prefix=str(tmp_path / "l2"),
                               tokenizer=str(llama2_sp), progress=False))
    with pytest.raises(InputError, match="model and the calibration data were made with different"):
        prune.run(Spec(input=str(stories["parent"]), output=str(tmp_path / "out"), num_layers=4,
                       calibration=str(tmp_path / "l2_text_document")))
    with pytest.raises(InputError, match="is not the checkpoint's"):
        prune.run(Spec(input=str(stories["parent"]), output=str(tmp_path / "out"), num_layers=4,
                       calibration=str(stories["calibration"]), tokenizer=str(llama2_sp)))
    assert not (tmp_path / "out").exists()
