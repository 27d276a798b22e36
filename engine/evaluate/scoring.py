"""Batched teacher-forced scoring of token sequences: the one forward loop every suite shares.

A `Request` is a token sequence and the index from which its tokens are scored. One forward pass
gives, per request: the summed NLL of the scored tokens, how many there were, how many of them
differ from the model's argmax (0 means greedy decoding would have produced exactly them), the
argmax token after the last one, and the logits of a few probe tokens at the last position.

Requests are sorted by length and cut into batches under a token budget, right-padded: attention
is causal, so padding after a sequence cannot change its logits. Only the positions that are
needed go through the output head, in chunks, so a 32k vocabulary over 16k positions never
materialises as one tensor. Across data-parallel ranks each rank scores every world_size-th
request of the length order (balanced work) and the results are summed over ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from engine.parallel import distributed

NLL, SCORED, MISMATCHES, NEXT_ID, PROBES = 0, 1, 2, 3, 4  # result columns; probes follow
_LOGIT_CHUNK_ELEMENTS = 1 << 25  # rows × vocab of one output-head chunk (128 MiB in fp32)


@dataclass(frozen=True)
class Request:
    """Score tokens[score_from:] (each from the tokens before it); score_from == len(tokens)
    scores nothing and only reads the last position. Without `read_last` the last token is only
    a target: the model runs over the tokens before it (a window of L positions scores L
    tokens), and the argmax and probes after it are not read (zeros)."""

    tokens: np.ndarray
    score_from: int
    read_last: bool = True

    def __post_init__(self) -> None:
        last = len(self.tokens) - (0 if self.read_last else 1)
        if not 1 <= self.score_from <= last:
            raise ValueError(f"score_from {self.score_from} outside 1..{last}")

    @property
    def positions(self) -> int:
        """How many positions the model runs over for this request."""
        return len(self.tokens) - (0 if self.read_last else 1)


@dataclass(frozen=True)
class Scorer:
    """How to run the model: where, in what batches, with what progress bar."""

    model: torch.nn.Module
    device: torch.device
    batch_tokens: int = 16384
    equal_length_batches: bool = False  # dynamic-NTK RoPE depends on the padded length
    progress: bool = True
    rank: int = 0
    world_size: int = 1

    @torch.inference_mode()
    def score(self, requests: Sequence[Request], probe_ids: Sequence[int] = (),
              desc: str = "score") -> np.ndarray:
        """Results [len(requests), 4 + len(probe_ids)] (float64) for the requests of this rank
        only, in the given order. No communication."""
        probes = torch.tensor(list(probe_ids), dtype=torch.long, device=self.device)
        out = torch.zeros(len(requests), PROBES + len(probe_ids), dtype=torch.float64,
                          device=self.device)
        lengths = np.array([r.positions for r in requests], dtype=np.int64)
        order = np.argsort(-lengths, kind="stable")
        bar = tqdm(total=int(lengths.sum()), desc=desc, unit="tok", unit_scale=True,
                   disable=not self.progress or self.rank != 0, leave=False)
        with bar:
            for batch in self._batches(order, lengths):
                out[torch.from_numpy(batch).to(self.device)] = self._score_batch(
                    [requests[i] for i in batch], probes)
                bar.update(int(lengths[batch].sum()))
        return out.cpu().numpy()

    def score_all(self, requests: Sequence[Request], probe_ids: Sequence[int] = (),
                  desc: str = "score") -> np.ndarray:
        """Results for every request, each rank scoring its share; every rank passes the same
        list and gets the same array."""
        lengths = np.array([r.positions for r in requests], dtype=np.int64)
        mine = np.argsort(-lengths, kind="stable")[self.rank::self.world_size]
        local = self.score([requests[i] for i in mine], probe_ids, desc)
        full = np.zeros((len(requests), PROBES + len(probe_ids)), dtype=np.float64)
        full[mine] = local
        return self.all_sum(full)

    def all_sum(self, array: np.ndarray) -> np.ndarray:
        """Sum a float64 array over ranks (rows a rank did not score are zeros there)."""
        if self.world_size == 1:
            return array
        t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64)).to(self.device)
        return distributed.all_reduce_sum(t).cpu().numpy()

    def _batches(self, order: np.ndarray, lengths: np.ndarray):
        """Longest first; a batch grows while (rows × its longest row) fits the token budget."""
        start = 0
        while start < len(order):
            longest = lengths[order[start]]
            rows = max(1, self.batch_tokens // max(int(longest), 1))
            end = min(start + rows, len(order))
            if self.equal_length_batches:
                same = lengths[order[start:end]] == longest
                end = start + int(np.argmin(same)) if not same.all() else end
            yield order[start:end]
            start = end

    def _score_batch(self, requests: list[Request], probes: torch.Tensor) -> torch.Tensor:
        n = np.array([len(r.tokens) for r in requests])
        ends = np.array([r.positions for r in requests])  # positions the model runs over
        first = np.array([r.score_from - 1 for r in requests])  # first position read
        width = int(n.max())
        ids = np.zeros((len(requests), width), dtype=np.int64)
        for i, r in enumerate(requests):
            ids[i, :n[i]] = r.tokens
        counts = ends - first  # positions read per row: the predictions (and the last position)
        rows = np.repeat(np.arange(len(requests)), counts)
        pos = np.concatenate([np.arange(f, m) for f, m in zip(first, ends)])
        has_target = pos + 1 < n[rows]
        targets = ids[rows, np.minimum(pos + 1, width - 1)]
        last = np.cumsum(counts) - 1  # index (among the positions read) of each row's last one

        dev = self.device
        ids_t = torch.from_numpy(ids[:, :int(ends.max())]).to(dev)
        rows_t, pos_t = torch.from_numpy(rows).to(dev), torch.from_numpy(pos).to(dev)
        targets_t = torch.from_numpy(targets).to(dev)
        has_target_t = torch.from_numpy(has_target).to(dev)
        hidden = self.model.forward_hidden(ids_t)[rows_t, pos_t]
        nll, argmax, probe_logits = [], [], []
        chunk = max(1, _LOGIT_CHUNK_ELEMENTS // _vocab_size(self.model, hidden))
        for s in range(0, len(hidden), chunk):
            logits = self.model.logits(hidden[s:s + chunk]).float()
            target_logit = logits.gather(1, targets_t[s:s + chunk, None]).squeeze(1)
            nll.append(torch.logsumexp(logits, dim=-1) - target_logit)
            argmax.append(logits.argmax(dim=-1))
            probe_logits.append(logits[:, probes])
        nll_t, argmax_t = torch.cat(nll), torch.cat(argmax)
        probe_t = torch.cat(probe_logits)

        zeros = torch.zeros(len(requests), dtype=torch.float64, device=dev)
        scored = has_target_t.double()
        mismatch = (has_target_t & (argmax_t != targets_t)).double()
        last_t = torch.from_numpy(last).to(dev)
        read_last = torch.tensor([r.read_last for r in requests], device=dev)[:, None]
        columns = [zeros.index_add(0, rows_t, torch.where(has_target_t, nll_t, 0).double()),
                   zeros.index_add(0, rows_t, scored),
                   zeros.index_add(0, rows_t, mismatch),
                   argmax_t[last_t].double()]
        after = torch.cat([torch.stack(columns[3:], dim=1), probe_t[last_t].double()], dim=1)
        return torch.cat([torch.stack(columns[:3], dim=1), after * read_last], dim=1)


def _vocab_size(model: torch.nn.Module, hidden: torch.Tensor) -> int:
    cfg = getattr(model, "cfg", None)
    return cfg.vocab_size if cfg is not None else model.logits(hidden[:1]).shape[-1]
