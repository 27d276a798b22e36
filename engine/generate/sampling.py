"""One decoding step's choice of the next token for every row, as vLLM's sampler makes it (see
engine/generate/params.py for the order). Parameters are per row, so rows with different
settings share a batch. A row's random draw is a pure function of (the row's seed, its step): a
counter-based uniform number computed for the whole batch at once, so a row's tokens do not
depend on its neighbours, and no per-row generator is called each step. (The draw is exact, but
not vLLM's stream of random numbers: equal seeds give other tokens there.)"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from engine.generate.params import SamplingParams


def row_seed(seed: int, sample: int) -> int:
    """The seed of a prompt's `sample`-th completion: distinct for every (seed, sample) pair."""
    digest = hashlib.sha256(f"{seed}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


_M32 = 0xFFFFFFFF


def _times(x: torch.Tensor, c: int) -> torch.Tensor:
    """x × c mod 2**32 for x < 2**32 in int64, in two 16-bit halves of c so nothing overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser: every input bit flips each output bit with probability
    about 1/2."""
    x = x ^ (x >> 16)
    x = _times(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _times(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def uniform(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """U(0, 1) draws [batch], open at both ends, as a function of (row seed, row step) alone."""
    bits = _mix((seeds & _M32) ^ _mix((seeds >> 32) ^ _mix(steps & _M32)))
    return (bits.double() + 0.5) / 2**32


@dataclass
class RowSettings:
    """The sampling parameters of a batch's rows as tensors [batch] on the device, and which
    filters any row uses (so that a batch without top-k/top-p never sorts its vocabulary)."""

    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor
    min_p: torch.Tensor
    repetition: torch.Tensor
    frequency: torch.Tensor
    presence: torch.Tensor
    seeds: torch.Tensor
    random: torch.Tensor  # rows that draw (temperature > 0)
    sorts: bool
    uses_min_p: bool
    penalizes: bool

    @classmethod
    def of(cls, params: list[SamplingParams], seeds: list[int],
           device: torch.device) -> RowSettings:
        def column(values: list, dtype=torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(column([p.temperature for p in params]), column([p.top_p for p in params]),
                   column([max(p.top_k, 0) for p in params], torch.long),
                   column([p.min_p for p in params]),
                   column([p.repetition_penalty for p in params]),
                   column([p.frequency_penalty for p in params]),
                   column([p.presence_penalty for p in params]),
                   column(seeds, torch.long),
                   column([i for i, p in enumerate(params) if p.temperature > 0], torch.long),
                   any(p.top_k > 0 or p.top_p < 1 for p in params),
                   any(p.min_p > 0 for p in params),
                   any((p.repetition_penalty, p.frequency_penalty, p.presence_penalty) != (1, 0, 0)
                       for p in params))

    def drawing(self) -> RowSettings:
        """The settings of the rows that draw."""
        r = self.random
        return RowSettings(self.temperature[r], self.top_p[r], self.top_k[r], self.min_p[r],
                           self.repetition[r], self.frequency[r], self.presence[r],
                           self.seeds[r], torch.arange(len(r), device=r.device), self.sorts,
                           self.uses_min_p, self.penalizes)

    def keep(self, rows: torch.Tensor) -> RowSettings:
        """The settings of the listed rows, in that order."""
        position = torch.full((len(self.seeds),), -1, dtype=torch.long, device=rows.device)
        position[rows] = torch.arange(len(rows), device=rows.device)
        random = position[self.random]
        return RowSettings(self.temperature[rows], self.top_p[rows], self.top_k[rows],
                           self.min_p[rows], self.repetition[rows], self.frequency[rows],
                           self.presence[rows], self.seeds[rows], random[random >= 0],
                           self.sorts, self.uses_min_p, self.penalizes)


def apply_penalties(logits: torch.Tensor, seen: torch.Tensor, output_counts: torch.Tensor,
                    rows: RowSettings) -> torch.Tensor:
    """Repetition penalty on tokens seen in the prompt or output (divide a positive logit,
    multiply a negative one), then frequency and presence penalties on output tokens."""
    penalty = torch.where(seen, rows.repetition[:, None], 1.0)
    logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    logits = logits - rows.frequency[:, None] * output_counts
    return logits - rows.presence[:, None] * (output_counts > 0)


def filter_logits(logits: torch.Tensor,
                  rows: RowSettings) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Temperature, then min-p, top-k and top-p: the tokens a random draw may pick keep their
    (tempered) logits, the others become -inf. Returned in ascending order with the token ids of
    each column when top-k or top-p sorted them, else in vocabulary order with None."""
    logits = logits / rows.temperature.clamp_min(1e-6)[:, None]
    if rows.uses_min_p:
        probs = logits.softmax(dim=-1)
        too_unlikely = probs < rows.min_p[:, None] * probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(too_unlikely, float("-inf"))
    if not rows.sorts:
        return logits, None
    ordered, order = logits.sort(dim=-1)  # ascending, as vLLM's top-k/top-p
    vocab = logits.shape[-1]
    k = torch.where(rows.top_k > 0, rows.top_k, vocab).clamp(max=vocab)
    kth = ordered.gather(1, (vocab - k)[:, None])
    ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
    outside = cumulative <= 1 - rows.top_p[:, None]
    outside[:, -1] = False  # the most likely token always stays
    return ordered.masked_fill(outside, float("-inf")), order


def draw(logits: torch.Tensor, order: torch.Tensor | None, seeds: torch.Tensor,
         steps: torch.Tensor) -> torch.Tensor:
    """A token [batch] from softmax(logits) of each row by inverse CDF: the first column whose
    cumulative probability reaches the row's uniform(seed, step) share of the total. One random
    number a row, where a Gumbel or exponential race (vLLM's) needs one per vocabulary entry."""
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)
    target = uniform(seeds, steps).to(cdf.dtype)[:, None] * cdf[:, -1:]
    picked = torch.searchsorted(cdf, target).clamp_max(cdf.shape[-1] - 1)
    return (picked if order is None else order.gather(1, picked))[:, 0]


def choose(logits: torch.Tensor, seen: torch.Tensor, output_counts: torch.Tensor,
           rows: RowSettings, steps: torch.Tensor) -> torch.Tensor:
    """The next token of every row [batch]: argmax where temperature is 0, else a draw (the
    random number of a row's draw depends on its seed and `steps`, its tokens generated so far)."""
    logits = logits.float()
    if rows.penalizes:
        logits = apply_penalties(logits, seen, output_counts, rows)
    tokens = logits.argmax(dim=-1)
    if len(rows.random):
        drawing = rows.drawing()
        kept, order = filter_logits(logits[rows.random], drawing)
        tokens[rows.random] = draw(kept, order, drawing.seeds, steps[rows.random])
    return tokens
