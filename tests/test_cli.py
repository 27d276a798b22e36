"""`python -m engine`: every spec field is a flag (nested sections by dots, lists as several
values) merged over the spec file; unknown flags and stages get a "did you mean"; input paths
that do not exist are named with their file, line and field before anything runs; the flow
process and the CLI's help never import torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from engine.__main__ import main, stage_parser
from engine.registry import COMMANDS, STAGES, get_stage
from engine.spec import load_spec

REPO = Path(__file__).resolve().parents[1]


def _spec(stage: str, argv: list[str], config: Path | None = None):
    parser, source = stage_parser(get_stage(stage))
    args = parser.parse_args([*(["--config", str(config)] if config else []), *argv])
    return load_spec(get_stage(stage).spec, args.config, source(parsed_args=args)())


def _flags(model: type[BaseModel], prefix: str = "") -> set[str]:
    """The flag of every leaf field of a spec, nested sections (and unions of them) included."""
    out = set()
    for name, field in model.model_fields.items():
        flag = prefix + name.replace("_", "-")
        sections = [t for t in getattr(field.annotation, "__args__", (field.annotation,))
                    if isinstance(t, type) and issubclass(t, BaseModel)]
        if sections:
            out.update(*(_flags(t, flag + ".") for t in sections))
        else:
            out.add(flag)
    return out


@pytest.mark.parametrize("stage", [*STAGES.values(), *COMMANDS.values()], ids=lambda s: s.name)
def test_every_field_is_a_flag(stage):
    parser, _ = stage_parser(stage)
    known = {flag.removeprefix("--") for action in parser._actions
             for flag in action.option_strings}
    assert _flags(stage.spec) - known == set()


def test_nested_flags_merge_over_the_spec_file(tmp_path):
    config = tmp_path / "pretrain.yaml"
    config.write_text("data: {blend: [A], seq_length: 32}\noptim: {lr: 0.1, warmup_iters: 7}\n"
                      "checkpoint: {save: out}\niters: 5\nglobal_batch_size: 2\n"
                      "model: {vocab_size: 64, hidden_size: 16, intermediate_size: 32, "
                      "num_layers: 1, num_heads: 2, num_kv_heads: 1, "
                      "max_position_embeddings: 64}\n")
    spec = _spec("pretrain", ["--optim.lr", "3e-4", "--data.blend", "0.3", "A", "0.7", "B",
                              "--model.rope-scaling.type", "linear", "--model.rope-scaling.factor",
                              "2", "--eval.initial", "--no-fused-loss", "--iters", "9"], config)
    assert spec.optim.lr == 3e-4 and spec.optim.warmup_iters == 7  # the file's other fields stay
    assert spec.data.blend == ["0.3", "A", "0.7", "B"] and spec.data.seq_length == 32
    assert spec.model.rope_scaling.type == "linear" and spec.model.rope_scaling.factor == 2
    assert spec.model.hidden_size == 16 and spec.eval.initial and not spec.fused_loss
    assert spec.iters == 9


def test_a_model_given_by_flags_alone_derives_its_head_dim(tmp_path):
    config = tmp_path / "pretrain.yaml"
    config.write_text("data: {blend: [A], seq_length: 32}\ncheckpoint: {save: out}\n"
                      "iters: 5\nglobal_batch_size: 2\n")
    spec = _spec("pretrain", ["--model.vocab-size", "64", "--model.hidden-size", "48",
                              "--model.intermediate-size", "32", "--model.num-layers", "1",
                              "--model.num-heads", "6", "--model.num-kv-heads", "2",
                              "--model.max-position-embeddings", "64"], config)
    assert spec.model.head_dim == 8


def test_a_bad_flag_value_names_the_flag(tmp_path, capsys):
    assert main(["generate-corpus", "--output", str(tmp_path / "c"), "--documents", "0"]) == 2
    assert "<command line>: --documents: Input should be greater than or equal to 1" in \
        capsys.readouterr().err


def test_unknown_flag_and_stage_say_what_was_meant(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["pretrain", "--optim.lrr", "3"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2
    assert "unrecognized arguments: --optim.lrr 3" in err
    assert "--optim.lrr: did you mean --optim.lr" in err
    with pytest.raises(SystemExit):
        main(["pretrian"])
    assert "unknown stage 'pretrian'; did you mean pretrain?" in capsys.readouterr().err


def test_missing_input_named_by_file_line_and_field(tmp_path, capsys):
    corpus = tmp_path / "a.jsonl"
    corpus.write_text('{"text": "hi"}\n')
    config = tmp_path / "tokenize.yaml"
    config.write_text(f"input:\n  - {corpus}\n  - {tmp_path}/gone.jsonl\n"
                      f"output_prefix: {tmp_path}/out\ntokenizer: {tmp_path}/no-tokenizer\n")
    assert main(["tokenize", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{config}:3: input.1: no such file or folder: {tmp_path}/gone.jsonl" in err
    assert f"{config}:5: tokenizer: no such file or folder: {tmp_path}/no-tokenizer" in err
    assert not (tmp_path / "out_text_document.bin").exists()


def test_help_shows_whole_stage_descriptions():
    out = subprocess.run([sys.executable, "-m", "engine", "--help"], cwd=REPO, text=True,
                         capture_output=True, timeout=60).stdout
    for name, stage in {**STAGES, **COMMANDS}.items():
        assert f"{name} {stage.doc}" in " ".join(out.split())


@pytest.mark.parametrize("code", ["import flows.lifecycle, flows.train, flows.evaluate, "
                                  "flows.data_prep, flows.compare, flows.synthesize, flows.reshard",
                                  "from engine.__main__ import _usage, stage_parser\n"
                                  "from engine.registry import COMMANDS, STAGES\n_usage()\n"
                                  "[stage_parser(s) for s in [*STAGES.values(), "
                                  "*COMMANDS.values()]]"])
def test_no_torch_in_the_flow_process_or_the_cli_help(code):
    probe = f"{code}\nimport sys\nassert 'torch' not in sys.modules, 'torch was imported'"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
