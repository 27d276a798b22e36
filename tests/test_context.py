"""Context extension in finetune: the real stories260K (trained at 512 positions) extended to
1,024 by position interpolation and trained briefly on a book; its perplexity over 1,024-token
windows of another book against the base model's, the HF export's logits against transformers',
and the extensions that are refused before any job."""

from __future__ import annotations

import json
import random

import pytest
import torch
from pydantic import ValidationError

from conftest import shared
from engine.convert import stage as convert
from engine.convert.native import load_native
from engine.data import tokenize
from engine.evaluate.spec import Spec as EvaluateSpec
from engine.evaluate.stage import run as evaluate
from engine.model.config import DynamicScaling, Llama3Scaling, LinearScaling, YarnScaling
from engine.model.llama import LlamaModel
from engine.spec import load_spec
from engine.train.context import ContextSection, extended_config
from engine.train.loop import train
from engine.train.spec import FinetuneSpec


def _book_chunks(name: str, paragraphs: int = 40) -> list[str]:
    text = shared("text", "gutenberg", name).read_text(encoding="utf-8")
    paras = [p.strip() for p in text.split("\n\n") if p.strip()]
    return ["\n\n".join(paras[i:i + paragraphs]) for i in range(0, len(paras), paragraphs)]


@pytest.fixture(scope="module")
def books(tmp_path_factory) -> dict:
    """stories260K as a native checkpoint; Alice in Wonderland tokenized with its tokenizer
    (training), the start of A Tale of Two Cities as JSONL (held out)."""
    root = tmp_path_factory.mktemp("context")
    convert.run(convert.Spec(load_dir=str(shared("tiny-llama", "hf")), save_dir=str(root / "parent"),
                             source_format="hf", target_format="native"))
    (root / "alice.jsonl").write_text("".join(json.dumps({"text": c}) + "\n"
                                              for c in _book_chunks("pg11.txt")))
    (root / "heldout.jsonl").write_text("".join(json.dumps({"text": c}) + "\n"
                                                for c in _book_chunks("pg98.txt")[:6]))
    tokenize.run(tokenize.Spec(input=[str(root / "alice.jsonl")], output_prefix=str(root / "alice"),
                               tokenizer=str(root / "parent" / "tokenizer" / "tokenizer.model"),
                               add_bos=True, progress=False))
    return {"root": root, "parent": root / "parent", "data": str(root / "alice_text_document"),
            "heldout": str(root / "heldout.jsonl")}


def _finetune(books, save, iters: int, context: dict | None, **extra) -> dict:
    spec = {"load": str(books["parent"]), "checkpoint": {"save": str(save)},
            "data": {"blend": [books["data"]], "seq_length": 1024, "split": "95,5,0"},
            "iters": iters, "global_batch_size": 4, "micro_batch_size": 4, "precision": "fp32",
            "device": "cpu", "optim": {"lr": 2e-3, "warmup_iters": 3}, **extra}
    if context is not None:
        spec["context"] = context
    return spec


def _ppl(model_dir, out, books) -> dict[str, float]:
    spec = load_spec(EvaluateSpec, None, {
        "load_dir": str(model_dir), "output": str(out), "ppl": [books["heldout"]],
        "windows": ["512:512", "1024:1024"], "progress": False,
        "tokenizer": str(books["parent"] / "tokenizer")})
    evaluate(spec)
    report = json.loads((out / "report.json").read_text())
    return {f"{r['seq_length']}": r["ppl"] for r in report["records"]}


def test_factor_one_is_the_identity(books):
    cfg, model, _, _ = load_native(books["parent"])
    same = extended_config(cfg, ContextSection(max_length=cfg.max_position_embeddings))
    assert same.rope_scaling == LinearScaling(factor=1.0)
    extended = LlamaModel(same)
    extended.load_state_dict(model.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 512), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(extended(ids), model(ids))


def test_extension_lowers_long_window_ppl_and_loads_in_transformers(books, tmp_path):
    """PI × 2 and 30 steps on Alice: perplexity over 1,024-token windows of another book falls
    below the base model's (which extrapolates), and the extended model's 1,024 is below the
    base's own 512. The checkpoint records the new RoPE; its HF export gives our logits in
    transformers at every position up to 1,024."""
    import transformers

    spec = FinetuneSpec.model_validate(_finetune(books, tmp_path / "ext", 30,
                                                 {"max_length": 1024, "method": "linear"}))
    train(spec, "finetune")
    cfg, ours, _, _ = load_native(tmp_path / "ext")
    assert cfg.rope_scaling == LinearScaling(factor=2.0) and cfg.max_position_embeddings == 1024
    base = _ppl(books["parent"], tmp_path / "eval-base", books)
    extended = _ppl(tmp_path / "ext", tmp_path / "eval-ext", books)
    assert extended["1024"] < base["1024"] and extended["1024"] < base["512"], (base, extended)

    convert.run(convert.Spec(load_dir=str(tmp_path / "ext"), save_dir=str(tmp_path / "hf"),
                             source_format="native", target_format="hf",
                             tokenizer=str(books["parent"] / "tokenizer")))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.max_position_embeddings == 1024
    ids = torch.randint(0, cfg.vocab_size, (1, 1024), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)


def test_yarn_and_llama3_configs_and_a_resumed_extension(books):
    cfg, _, _, _ = load_native(books["parent"])
    yarn = extended_config(cfg, ContextSection(max_length=2048, method="yarn", beta_fast=16))
    assert yarn.rope_scaling == YarnScaling(factor=4.0, original_max_position_embeddings=512,
                                            beta_fast=16)
    assert extended_config(yarn, ContextSection(max_length=2048, method="yarn",
                                                beta_fast=16)) == yarn  # resumed: as it is
    llama3 = extended_config(cfg, ContextSection(max_length=4096, method="llama3", factor=4))
    assert llama3.rope_scaling.factor == 4 and llama3.max_position_embeddings == 4096


@pytest.mark.parametrize("context, extra, message", [
    ({"max_length": 1024, "factor": 3}, {}, "context.factor 3 × the checkpoint's length 512 is 1536"),
    ({"max_length": 256}, {}, "context.max_length 256 is below the checkpoint's length 512"),
    ({"max_length": 768}, {}, "data.seq_length (1024) is above context.max_length (768)"),
    ({"max_length": 1024, "method": "dynamic"}, {}, "context.method 'dynamic' is not trained"),
    ({"max_length": 1024, "method": "ntk-by-parts"}, {},  # a name transformers has no loader for
     "context.method\n  Input should be 'linear', 'dynamic', 'yarn' or 'llama3'"),
    (None, {}, "data.seq_length 1024 is above the checkpoint's max_position_embeddings 512"),
])
def test_extensions_that_cannot_work_are_refused(books, tmp_path, context, extra, message):
    data = _finetune(books, tmp_path / "x", 2, context, **extra)
    if context is None:  # no extension: the loop refuses the long sequences when it reads the model
        with pytest.raises(Exception, match="above the checkpoint's max_position_embeddings 512"):
            train(FinetuneSpec.model_validate(data), "finetune")
        return
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        FinetuneSpec.model_validate(data)


def test_long_documents_only_are_counted_and_a_window_no_document_fills_is_refused(books,
                                                                                   tmp_path):
    """data.documents 'long' at 4,096 (PI × 8) trains on the chunks of Alice that fill a window,
    and the run records how many of the train split's they are; at 8,192 none does: refused
    before any job, naming the longest."""
    from engine.data.indexed import IndexedDataset
    from engine.data.samples import parse_split, split_ranges

    lengths = IndexedDataset(books["data"]).sequence_lengths
    beg, end = split_ranges(parse_split("95,5,0"), len(lengths))[0]
    long = int((lengths[beg:end] >= 4097).sum())
    assert 0 < long < end - beg  # the books fixture has both kinds
    spec = _finetune(books, tmp_path / "long", 2, {"max_length": 4096}, global_batch_size=1,
                     micro_batch_size=1)
    spec["data"] |= {"seq_length": 4096, "documents": "long"}
    manifest = train(FinetuneSpec.model_validate(spec), "finetune")
    assert manifest.summary["documents"]["train"] == {"used": long, "of": end - beg}
    spec["context"]["max_length"] = spec["data"]["seq_length"] = 8192
    longest = int(lengths[beg:end].max())
    with pytest.raises(ValidationError, match=rf"data\n.*documents 'long': {books['data']}: no "
                       rf"document of its train split holds 8193 tokens \(the longest holds "
                       rf"{longest}\); lower seq_length"):
        FinetuneSpec.model_validate(spec)


def test_an_extended_checkpoint_is_not_extended_again(books, tmp_path):
    cfg, _, _, _ = load_native(books["parent"])
    once = extended_config(cfg, ContextSection(max_length=1024))
    with pytest.raises(ValueError, match="already extended \\(linear, max_position_embeddings 1024"):
        extended_config(once, ContextSection(max_length=2048))


def test_passkey_prompts_and_retrieval_as_greedy_decoding(books, tmp_path):
    """Prompts fill their length with the number at its depth; the stage's retrieval decision
    for every trial is what greedy decoding with the generator (KV cache) produces."""
    from engine.data.tokenizer import load_tokenizer
    from engine.evaluate import passkey
    from engine.generate.generator import Generator
    from engine.generate.params import SamplingParams

    tok = load_tokenizer(books["parent"] / "tokenizer")
    for depth in (0.0, 0.5, 1.0):
        request = passkey.build_request(tok, tok.bos_id, 1024, depth, "31415")
        filler = len(tok.encode([passkey.FILLER])[0])
        assert 1024 - filler < len(request.tokens) <= 1024
        text = tok.decode(request.tokens[:request.score_from].tolist())
        share = text.index("31415") / text.index("What is the pass key")
        assert abs(share - depth) < 0.1, (depth, share)

    spec = load_spec(EvaluateSpec, None, {
        "load_dir": str(books["parent"]), "output": str(tmp_path / "pk"), "passkey": [128, 256],
        "passkey_depths": [0.0, 1.0], "passkey_trials": 3, "progress": False})
    evaluate(spec)
    report = json.loads((tmp_path / "pk" / "report.json").read_text())
    assert set(report["metrics"]) == {"passkey/128/accuracy", "passkey/256/accuracy"}
    assert "## Passkey retrieval" in (tmp_path / "pk" / "report.md").read_text()

    _, model, _, _ = load_native(books["parent"])
    generator = Generator(model, tok, torch.device("cpu"), progress=False)
    draw = random.Random(1234)
    for record in report["records"]:
        keys = [(depth, str(draw.randrange(10_000, 100_000))) for depth in (0.0, 1.0)
                for _ in range(3)]
        requests = [passkey.build_request(tok, tok.bos_id, record["length"], d, k) for d, k in keys]
        prompts = [r.tokens[:r.score_from].tolist() for r in requests]
        answers = [r.tokens[r.score_from:].tolist() for r in requests]
        greedy = generator.generate(prompts, [SamplingParams(temperature=0, max_tokens=len(a))
                                              for a in answers])
        found = [list(c[0].token_ids) == a for c, a in zip(greedy, answers)]
        assert record["accuracy"] == pytest.approx(sum(found) / len(found))
        assert record["by_depth"]["0.0"] == pytest.approx(sum(found[:3]) / 3)


@pytest.mark.parametrize("method, scaling, drift", [
    ("yarn", YarnScaling(factor=4.0, original_max_position_embeddings=512), True),
    ("dynamic", DynamicScaling(factor=4.0), False),  # plain RoPE up to the trained length
    ("llama3", Llama3Scaling(factor=4.0, original_max_position_embeddings=512,
                             low_freq_factor=1.0, high_freq_factor=4.0), True),
])
def test_extend_stage_without_training_hf_in_and_out(tmp_path, method, scaling, drift):
    """The HF stories260K extended ×4 with no training: a native checkpoint whose HF export
    gives our logits in transformers over 2,048 positions; a bad factor is refused before the
    stage runs."""
    import transformers

    from engine.extend import stage as extend
    from engine.extend.spec import Spec as ExtendSpec

    hf_in = shared("tiny-llama", "hf")
    manifest = extend.run(ExtendSpec(input=str(hf_in), output=str(tmp_path / "ext"),
                                     context={"max_length": 2048, "method": method}))
    assert manifest.summary["max_length"] == [512, 2048]
    assert (manifest.summary["max_abs_logit_change"] > 0) == drift
    cfg, ours, meta, _ = load_native(tmp_path / "ext")
    assert cfg.rope_scaling == scaling
    assert meta["extended_from"]["model"]["max_position_embeddings"] == 512
    convert.run(convert.Spec(load_dir=str(tmp_path / "ext"), save_dir=str(tmp_path / "hf"),
                             source_format="native", target_format="hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 2048), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)
    if method != "llama3":  # llama3's factor is free (Llama 3.1: 8, and 16 × the length)
        with pytest.raises(ValidationError, match="context.factor 2 × the checkpoint's length 512"):
            ExtendSpec(input=str(hf_in), output=str(tmp_path / "bad"),
                       context={"max_length": 2048, "factor": 2, "method": method})


def test_an_extension_killed_mid_run_resumes_exactly(books, tmp_path):
    """SIGKILL as the second checkpoint is written, then the same command again: it resumes
    from its own (already extended) checkpoint and ends with the weights of an unbroken run."""
    from conftest import forked_engine

    def run(save, faults=()):
        spec = _finetune(books, save, 4, {"max_length": 1024}, checkpoint={"save": str(save),
                                                                            "interval": 2})
        config = tmp_path / f"{save.name}.json"
        config.write_text(json.dumps(spec))
        proc = forked_engine(["finetune", "--config", str(config)], faults)
        _, err = proc.communicate(timeout=300)
        return proc.returncode, err

    assert run(tmp_path / "whole")[0] == 0
    code, err = run(tmp_path / "broken", ("kill@engine.checkpoint.store:_write_shards#2",))
    assert code == -9, err[-2000:]
    code, err = run(tmp_path / "broken")
    assert code == 0 and "resumed from" in err, err[-2000:]
    _, whole, _, _ = load_native(tmp_path / "whole")
    _, resumed, _, _ = load_native(tmp_path / "broken")
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
