"""Reading a checkpoint never runs code from it.

torch.distributed.checkpoint unpickles two things on load: the `.metadata` file (plain pickle) and
non-tensor values such as optimizer hyper-parameters (`torch.load(weights_only=False)`). A crafted
checkpoint could run arbitrary code through either, so loads go through `SafeReader` (the metadata
unpickled with an allow-list of checkpoint classes) and `SafePlanner` (values through
`torch.load(weights_only=True)`). RNG states are stored as tensors and numbers only, for the same
reason.
"""

from __future__ import annotations

import io
import pickle
import random
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import StorageMeta

from engine.errors import InputError

_DCP = "torch.distributed.checkpoint."
_ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
            ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        obj = super().find_class(module, name)
        if ((module + ".").startswith(_DCP) and isinstance(obj, type)) or (module, name) in _ALLOWED \
                or (module == "torch" and isinstance(obj, torch.dtype)):
            return obj
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


class SafeReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any):
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as exc:
            raise InputError(f"{path}: not a checkpoint's metadata: {exc}") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        # weights_only=True refuses anything but tensors and plain data; what passes is handed to
        # the default planner re-serialised from that plain data
        plain = io.BytesIO()
        torch.save(torch.load(value, weights_only=True), plain)
        plain.seek(0)
        super().load_bytes(read_item, plain)


def rng_state() -> dict[str, Any]:
    """Every generator a training step draws from, as tensors and numbers (loadable with
    weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, mt, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                       "has_gauss": has_gauss, "gauss": gauss},
             "python": {"version": version, "state": list(mt), "gauss": py_gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    n, p = state["numpy"], state["python"]
    torch.set_rng_state(state["torch"])
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
