"""Reading Megatron's pickled files (`model_optim_rng.pt`, a torch_dist checkpoint's
`common.pt`) without running code from them.

They pickle an argparse.Namespace of the training arguments, and beside it enums and config
dataclasses of Megatron itself (ModelType, AttnBackend, OptimizerConfig, the rerun state
machine's state, EPFL's PositionEmbeddingType). `torch.load(weights_only=True)` refuses every
class it is not told about; the allow-list below names the plain-data classes that appear, and
maps each of Megatron's own classes onto `Foreign`, which keeps its arguments and state as data:
Megatron need not be installed, and nothing of it is imported or run."""

from __future__ import annotations

import argparse
import io
import pathlib
import pickle
import re
import signal
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.errors import InputError


class Foreign:
    """A Megatron object as data: the arguments it was rebuilt from (an enum's value) and the
    state pickled with it (a dataclass's fields)."""

    def __init__(self, *args: Any):
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"Foreign{self.args or ''}"


_MEGATRON_CLASSES = (
    "megatron.core.enums.ModelType",
    "megatron.core.transformer.enums.AttnBackend",
    "megatron.core.transformer.enums.AttnMaskType",
    "megatron.core.transformer.enums.CudaGraphScope",
    "megatron.core.optimizer.optimizer_config.OptimizerConfig",
    "megatron.core.rerun_state_machine.RerunDiagnostic",
    "megatron.core.rerun_state_machine.RerunMode",
    "megatron.core.rerun_state_machine.RerunState",
    "megatron.model.enums.PositionEmbeddingType",  # EPFL Megatron-LLM
    "megatron.model.enums.AttnMaskType",
    "megatron.legacy.model.enums.AttnMaskType",
)
try:  # numpy arrays in the RNG state; numpy 2 moved numpy.core to numpy._core
    from numpy._core.multiarray import _reconstruct as _NUMPY_RECONSTRUCT
except ImportError:
    from numpy.core.multiarray import _reconstruct as _NUMPY_RECONSTRUCT
ALLOWED = [argparse.Namespace, types.SimpleNamespace, pathlib.PosixPath, signal.Signals,
           io.BytesIO, np.ndarray, np.dtype, type(np.dtype(np.uint32)),
           (_NUMPY_RECONSTRUCT, "numpy.core.multiarray._reconstruct"),
           (_NUMPY_RECONSTRUCT, "numpy._core.multiarray._reconstruct"),
           *((Foreign, name) for name in _MEGATRON_CLASSES)]


def load_pickled(path: Path) -> dict[str, Any]:
    """A Megatron `.pt` file as a dict, through the allow-list; a class outside it, or a damaged
    file, is an InputError naming the file."""
    try:
        with torch.serialization.safe_globals(ALLOWED):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: missing") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        refused = re.search(r"GLOBAL (\S+)", str(exc))
        if refused:
            raise InputError(f"{path}: refuses to unpickle {refused[1]}: not a class Megatron "
                             "checkpoints hold (loading it could run code)") from None
        first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise InputError(f"{path}: not a loadable PyTorch file (truncated or corrupt): "
                         f"{first}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: holds a {type(data).__name__}, not a checkpoint dict")
    return data


def args_of(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """The training arguments a Megatron file carries, as a dict."""
    args = data.get("args")
    if isinstance(args, (argparse.Namespace, types.SimpleNamespace)):
        return vars(args)
    if isinstance(args, dict):
        return args
    raise InputError(f"{path}: no 'args' (the Megatron training arguments that give the model's "
                     "shape)")
