"""The decode forward of a batch: every row's next-token logits from its last token. On CUDA each
(rows, width) is captured once as a CUDA graph and replayed for the steps that follow: a decode
step is some thirty small kernels per layer, whose launches take longer than they run
(docs/benchmarks.md has the numbers)."""

from __future__ import annotations

import torch
from torch import nn

from engine.generate.cache import Step, decode_mask


class DecodeStep:
    """Call with the rows' last tokens [rows], their left padding [rows], the cache slot the
    tokens go to and the width of slots to attend over; returns fp32 logits [rows, vocab]."""

    def __init__(self, model: nn.Module, step: Step, graphs: bool):
        self.model, self.step, self.graphs = model, step, graphs
        self.captured: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, tuple]] = {}
        self.pool = None
        self.logits: torch.Tensor | None = None  # the graphs' output, outside their memory pool

    def __call__(self, tokens: torch.Tensor, pad: torch.Tensor, slot: int,
                 width: int) -> torch.Tensor:
        if not self.graphs:
            return self._forward(tokens, pad, torch.tensor([slot], device=tokens.device), width)
        key = (len(tokens), width)
        if key not in self.captured:
            self.captured[key] = self._capture(tokens, pad, slot, width)
        graph, (tokens_in, pad_in, slot_in) = self.captured[key]
        tokens_in.copy_(tokens)
        pad_in.copy_(pad)
        slot_in.fill_(slot)
        graph.replay()
        return self.logits[:len(tokens)]

    def _forward(self, tokens: torch.Tensor, pad: torch.Tensor, slot: torch.Tensor,
                 width: int) -> torch.Tensor:
        self.step.write, self.step.mask = slot, decode_mask(pad, slot, width)
        hidden = self.model.forward_hidden(tokens[:, None], (slot - pad)[:, None])
        return self.model.logits(hidden[:, -1]).float()

    def _capture(self, tokens: torch.Tensor, pad: torch.Tensor, slot: int,
                 width: int) -> tuple[torch.cuda.CUDAGraph, tuple]:
        inputs = (tokens.clone(), pad.clone(), torch.tensor([slot], device=tokens.device))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # a first run outside the graph: lazy initialisation
            logits = self._forward(*inputs, width)
        torch.cuda.current_stream().wait_stream(side)
        if self.logits is None:  # the first capture has the most rows: rows only ever leave
            self.logits = torch.empty_like(logits)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.logits[:len(tokens)].copy_(self._forward(*inputs, width))
        self.pool = graph.pool()
        return graph, inputs
