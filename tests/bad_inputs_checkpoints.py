"""Bad-input rows for native checkpoints read by pretrain (resume), finetune (load) and reshard: a
damaged latest file, a shard changed after it was written, a folder missing a file, a checkpoint
crafted to run code when it is unpickled (its checksums made to match, as an attacker would), and
a layout its model does not divide."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import yaml

from engine.manifest import sha256_file
from tests.badinput import BadInput

LATEST = "latest_checkpointed_iteration.txt"


def _run(tmp: Path, fx: dict) -> Path:
    """A copy of the fixture's checkpoints as tmp/run, as a run still going would have them (no
    manifest); its latest iteration folder."""
    root = tmp / "run"
    shutil.copytree(fx["checkpoint"], root)
    (root / "manifest.json").unlink()
    return root / f"iter_{int((root / LATEST).read_text()):07d}"


def _spec(tmp: Path, fx: dict, stage: str) -> list[str]:
    """Resume tmp/run (pretrain, 2 more iterations) or finetune from it into tmp/tuned."""
    done = Path(fx["checkpoint"])
    iteration = int((done / LATEST).read_text())
    spec = {"data": {"blend": [str(fx["dataset"])], "seq_length": 32},
            "iters": iteration + 2, "global_batch_size": 2, "precision": "fp32", "device": "cpu"}
    if stage == "pretrain":
        spec["checkpoint"] = {"save": str(tmp / "run")}
        spec["model"] = json.loads((done / f"iter_{iteration:07d}" / "model_config.json").read_text())
    else:
        spec.update(load=str(tmp / "run"), checkpoint={"save": str(tmp / "tuned")})
    (tmp / "spec.yaml").write_text(yaml.safe_dump(spec))
    return ["--config", str(tmp / "spec.yaml")]


def _latest_garbage(tmp: Path, fx: dict) -> None:
    _run(tmp, fx)
    (tmp / "run" / LATEST).write_text("iter_0000002\n")


def _flipped_shard(tmp: Path, fx: dict) -> None:
    shard = _run(tmp, fx) / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))


def _shard_missing(tmp: Path, fx: dict) -> None:
    (_run(tmp, fx) / "__0_0.distcp").unlink()


class _Payload:
    """Unpickling this runs `touch <marker>`: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _crafted(name: str):
    def write(tmp: Path, fx: dict) -> None:
        folder = _run(tmp, fx)
        (folder / name).write_bytes(pickle.dumps(_Payload(tmp / "code-ran")))
        meta = json.loads((folder / "meta.json").read_text())
        meta["files"][name] = sha256_file(folder / name).model_dump()
        (folder / "meta.json").write_text(json.dumps(meta))
    return write


def _row(stage: str, case: str, damage, message: str, doc: str, outputs=()) -> BadInput:
    def argv(tmp: Path, fx: dict) -> list[str]:
        damage(tmp, fx)
        return _spec(tmp, fx, stage)
    return BadInput(stage, case, argv, message, ("run/manifest.json", "tuned", *outputs), doc)


def _reshard(case: str, damage, flags: list[str], message: str, doc: str) -> BadInput:
    def argv(tmp: Path, fx: dict) -> list[str]:
        damage(tmp, fx)
        return ["--input", str(tmp / "run"), "--output", str(tmp / "out"), *flags]
    return BadInput("reshard", case, argv, message, ("out",), doc)


ROWS: list[BadInput] = [
    _row("pretrain", "resume: latest_checkpointed_iteration.txt is not a number", _latest_garbage,
         r"{tmp}/run/latest_checkpointed_iteration\.txt: expected an iteration number",
         "…/run/latest_checkpointed_iteration.txt: expected an iteration number, found "
         "'iter_0000002'"),
    _row("pretrain", "resume: one bit flipped in a checkpoint shard", _flipped_shard,
         r"{tmp}/run/iter_\d+/__0_0\.distcp: checksum mismatch .* the file is corrupt",
         "…/run/iter_0000002/__0_0.distcp: checksum mismatch (sha256 75b200222f52b64a…, recorded "
         "b963af1b99dc419f…): the file is corrupt"),
    _row("finetune", "load: a checkpoint shard missing", _shard_missing,
         r"{tmp}/run/iter_\d+: the checkpoint named in .* is not complete \(.*__0_0\.distcp: "
         r"missing",
         "…/run/iter_0000002: the checkpoint named in …/run/latest_checkpointed_iteration.txt is "
         "not complete (…/run/iter_0000002/__0_0.distcp: missing (listed in the artifact's "
         "checksums)) and no older complete checkpoint is there"),
    _row("finetune", "load: .metadata crafted to run code (checksums matching)",
         _crafted(".metadata"),
         r"{tmp}/run/iter_\d+/\.metadata: not a checkpoint's metadata: posix\.system is not part "
         r"of a checkpoint's metadata",
         "…/run/iter_0000002/.metadata: not a checkpoint's metadata: posix.system is not part of "
         "a checkpoint's metadata", ("code-ran",)),
    _row("pretrain", "resume: RNG state crafted to run code (checksums matching)",
         _crafted("rng/rank_00000.pt"),
         r"{tmp}/run/iter_\d+/rng/rank_00000\.pt: refused: it holds more than tensors and plain "
         r"data",
         "…/run/iter_0000002/rng/rank_00000.pt: refused: it holds more than tensors and plain data",
         ("code-ran",)),
    _reshard("a checkpoint shard missing", _shard_missing, [],
             r"{tmp}/run/iter_\d+: the checkpoint named in .* is not complete \(.*__0_0\.distcp: "
             r"missing",
             "…/run/iter_0000002: the checkpoint named in …/run/latest_checkpointed_iteration.txt "
             "is not complete (…/run/iter_0000002/__0_0.distcp: missing (listed in the artifact's "
             "checksums)) and no older complete checkpoint is there"),
    _reshard("a tensor_parallel the model does not divide", _run, ["--tensor-parallel", "4"],
             r"<command line>: {tmp}/run: model num_kv_heads 2 is not divisible by "
             r"tensor_parallel 4$",
             "<command line>: …/run: model num_kv_heads 2 is not divisible by tensor_parallel 4"),
]
