"""One rank of tests/test_plan_comm.py: the pretrain stage's training (engine.train.loop.train)
of the spec in a YAML file (gloo, CPU), its collectives recorded while the loop runs each step's
forwards and backwards (Trainer._forward_backward: FSDP's gathers and reduce-scatters, DDP's
all-reduce, MasterAdamW's reduction of its sums), each as the bytes of the whole tensor it
reduces or gathers. Printed as JSON: for each step, its list of [collective, bytes]. The loop's
control collectives (the token count, the loss sums, the flags, the gradient norm) run outside
that window; DDP's second step agrees on its bucket indices inside it (a few bytes' broadcast).

    python -m tests.comm_bytes SPEC.yaml  (RANK, WORLD_SIZE, MASTER_*)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import yaml
from torch.utils._python_dispatch import TorchDispatchMode

from engine.train.loop import Trainer, train
from engine.train.spec import PretrainSpec


class Collectives(TorchDispatchMode):
    """The c10d collectives dispatched within it (DDP's reducer and FSDP's hooks call them from
    the backward, which runs in this thread on the CPU), as [name, bytes of the whole tensor]."""

    def __init__(self):
        super().__init__()
        self.calls: list[list] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            self.calls.append([func._opname, _whole_bytes(func._opname, args)])
        return func(*args, **(kwargs or {}))


def _whole_bytes(name: str, args: tuple) -> int:
    """An all-gather's output, a reduce-scatter's input, the tensors all-reduced."""
    if name == "_allgather_base_":
        return args[0].nbytes
    if name == "_reduce_scatter_base_":
        return args[1].nbytes
    tensors = args[0] if isinstance(args[0], list) else [args[0]]
    return sum(t.nbytes for t in tensors)


def main(config: str) -> None:
    spec = PretrainSpec.model_validate(yaml.safe_load(Path(config).read_text()))
    steps = []
    forward_backward = Trainer._forward_backward

    def recorded(self, micro, count):
        with Collectives() as collectives:
            loss = forward_backward(self, micro, count)
        steps.append(collectives.calls)
        return loss

    with mock.patch.object(Trainer, "_forward_backward", recorded):
        train(spec, "pretrain")
    print(json.dumps(steps))


if __name__ == "__main__":
    main(sys.argv[1])
