"""One rank of tests/test_plan.py's activation check under tensor and context parallelism: build
the training model as the engine does (gloo, CPU), run one forward with the fused loss, and print
what autograd keeps for the backward. It counts the bytes of the distinct storages of the saved
tensors (a DTensor's local shard), leaving out the parameters. The allocator cannot be read here:
gloo's threads free the buffers of collectives where torch's profiler does not see them. Also
printed: the bytes of the causal masks that SDPA materialises on the CPU for context parallel's
chunks (CUDA's kernels build none). Storages are counted as they are once the forward is done:
FSDP's gathered weights, saved by the matmuls, are freed by then (regathered for the backward).

    python -m tests.saved_activations TP CP PRECISION [DATA_PARALLEL]  (RANK, WORLD_SIZE, MASTER_*)
"""

from __future__ import annotations

import contextlib
import json
import sys

import torch
from torch.distributed.tensor import DTensor

from engine.model.config import ModelConfig
from engine.parallel.context_parallel import shard_sequence
from engine.parallel.distributed import setup
from engine.parallel.mesh import build_mesh
from engine.train.build import build
from engine.train.spec import PretrainSpec

CFG = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=344, num_layers=3,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=512)
TOKENS = 384


def _storage(t: torch.Tensor) -> torch.UntypedStorage:
    local = t._local_tensor if isinstance(t, DTensor) else t
    return getattr(local, "elem", local).untyped_storage()  # a collective's async wrapper


@contextlib.contextmanager
def saved_storages(skip: set[int]):
    """The distinct storages of the tensors autograd saves within the block (their data
    pointers not in `skip`), each with the shape of the first tensor saved on it."""
    saved: dict[int, tuple[torch.UntypedStorage, torch.Size]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = _storage(t)
        if storage.data_ptr() not in skip:
            saved.setdefault(storage.data_ptr(), (storage, t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


def main(tp: int, cp: int, precision: str, data_parallel: str = "ddp") -> None:
    env = setup("cpu")
    data_ranks = env.world_size // (tp * cp)
    spec = PretrainSpec.model_validate({
        "model": CFG.model_dump(), "data": {"blend": ["unused"], "seq_length": TOKENS},
        "checkpoint": {"save": "unused"}, "iters": 1, "global_batch_size": data_ranks,
        "tensor_parallel": tp, "context_parallel": cp, "data_parallel": data_parallel,
        "recompute": "none", "precision": precision, "device": "cpu"})
    model = build(CFG, spec, build_mesh(spec.layout(env.world_size), env.device), env.device).model
    params = {_storage(p).data_ptr() for p in model.parameters()}
    ids = torch.randint(0, CFG.vocab_size, (1, TOKENS), generator=torch.Generator().manual_seed(0))
    if cp > 1:
        ids = shard_sequence((ids,), cp, env.rank)[0]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" \
        else contextlib.nullcontext()
    with saved_storages(params) as saved, autocast:
        loss = model(ids, targets=ids)
    masks = sum(storage.nbytes() for storage, shape in saved.values()  # [chunk, keys]
                if cp > 1 and len(shape) == 2 and shape[0] == TOKENS // (2 * cp))
    print(json.dumps({"rank": env.rank, "saved": sum(s.nbytes() for s, _ in saved.values()),
                      "masks": masks}))
    del loss


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:])
