"""One decoding step's choice of the next token for every row, as vLLM's sampler makes it (see
engine/generate/params.py for the order). Parameters are per row, so rows with different
settings share a batch. A row's random draw is a pure function of (the row's seed, its step): a
counter-based uniform number computed for the whole batch at once, so a row's tokens do not
depend on its neighbours, and no per-row generator is called each step. (The draw is exact, but
not vLLM's stream of random numbers: equal seeds give other tokens there.)"""

from __future__ import annotations

import functools
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
    filters any row uses (a batch without them skips their passes over the vocabulary)."""

    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor
    min_p: torch.Tensor
    repetition: torch.Tensor
    frequency: torch.Tensor
    presence: torch.Tensor
    seeds: torch.Tensor
    random: torch.Tensor  # rows that draw (temperature > 0)
    uses_top_k: bool
    uses_top_p: bool
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
                   any(p.top_k > 0 for p in params), any(p.top_p < 1 for p in params),
                   any(p.min_p > 0 for p in params),
                   any((p.repetition_penalty, p.frequency_penalty, p.presence_penalty) != (1, 0, 0)
                       for p in params))

    def drawing(self) -> RowSettings:
        """The settings of the rows that draw."""
        r = self.random
        return RowSettings(self.temperature[r], self.top_p[r], self.top_k[r], self.min_p[r],
                           self.repetition[r], self.frequency[r], self.presence[r],
                           self.seeds[r], torch.arange(len(r), device=r.device), self.uses_top_k,
                           self.uses_top_p, self.uses_min_p, self.penalizes)

    def keep(self, rows: torch.Tensor) -> RowSettings:
        """The settings of the listed rows, in that order."""
        position = torch.full((len(self.seeds),), -1, dtype=torch.long, device=rows.device)
        position[rows] = torch.arange(len(rows), device=rows.device)
        random = position[self.random]
        return RowSettings(self.temperature[rows], self.top_p[rows], self.top_k[rows],
                           self.min_p[rows], self.repetition[rows], self.frequency[rows],
                           self.presence[rows], self.seeds[rows], random[random >= 0],
                           self.uses_top_k, self.uses_top_p, self.uses_min_p, self.penalizes)


def apply_penalties(logits: torch.Tensor, seen: torch.Tensor, output_counts: torch.Tensor,
                    rows: RowSettings) -> torch.Tensor:
    """Repetition penalty on tokens seen in the prompt or output (divide a positive logit,
    multiply a negative one), then frequency and presence penalties on output tokens."""
    penalty = torch.where(seen, rows.repetition[:, None], 1.0)
    logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    logits = logits - rows.frequency[:, None] * output_counts
    return logits - rows.presence[:, None] * (output_counts > 0)


def filter_logits(logits: torch.Tensor, rows: RowSettings) -> torch.Tensor:
    """Temperature, then min-p, top-k and top-p: the tokens a random draw may pick keep their
    (tempered) logits, the others become -inf. Nothing is sorted: top-k keeps what reaches the
    k-th largest logit, top-p what reaches the nucleus's least probability (`nucleus_floor`);
    ties at either edge all stay, where vLLM's sort keeps an arbitrary part of them."""
    logits = logits / rows.temperature.clamp_min(1e-6)[:, None]
    if rows.uses_min_p:
        probs = logits.softmax(dim=-1)
        too_unlikely = probs < rows.min_p[:, None] * probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(too_unlikely, float("-inf"))
    if rows.uses_top_k:
        k = rows.top_k.clamp(max=logits.shape[-1])  # 0: no top-k for that row
        largest = logits.topk(int(k.max()), dim=-1).values
        kth = largest.gather(1, (k - 1).clamp_min(0)[:, None])
        logits = logits.masked_fill((logits < kth) & (k[:, None] > 0), float("-inf"))
    if rows.uses_top_p:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < nucleus_floor(probs, rows.top_p), float("-inf"))
    return logits


def _mass_at_most(probs: torch.Tensor, ceiling: torch.Tensor) -> torch.Tensor:
    return torch.where(probs <= ceiling[:, None], probs, 0).sum(dim=-1)


@functools.cache
def _fused_mass_at_most():
    """_mass_at_most as one pass over the vocabulary (eager: three), compiled on first use."""
    return torch.compile(_mass_at_most, dynamic=True)


def nucleus_floor(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The least probability [batch, 1] of a row's top-p nucleus. vLLM drops, in ascending
    order, the tokens whose cumulative probability is at most 1 - top_p: a token of probability q
    stays iff the mass of all tokens of probability <= q exceeds 1 - top_p. That mass grows with
    q, so the least such q is found by bisection over the bit patterns of positive floats (which
    order as the floats do): 30 passes over the vocabulary where a sort takes longer. The most
    likely token always stays."""
    mass_at_most = _fused_mass_at_most() if probs.is_cuda else _mass_at_most
    low = torch.zeros(len(probs), dtype=torch.int32, device=probs.device)  # mass(0) <= 1 - p
    high = torch.full_like(low, _ONE_BITS)  # the ceiling of every probability
    drop = 1 - top_p
    for _ in range(_ONE_BITS.bit_length()):  # halves high - low down to 1
        middle = (low + high) // 2
        above = mass_at_most(probs, middle.view(torch.float32)) > drop
        high, low = torch.where(above, middle, high), torch.where(above, low, middle)
    floor = high.view(torch.float32)[:, None]
    return torch.minimum(floor, probs.amax(dim=-1, keepdim=True))


_ONE_BITS = 0x3F800000  # the bit pattern of 1.0f


def draw(logits: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """A token [batch] from softmax(logits) of each row by inverse CDF: the first token whose
    cumulative probability reaches the row's uniform(seed, step) share of the total. One random
    number a row, where a Gumbel or exponential race (vLLM's) needs one per vocabulary entry."""
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)
    target = uniform(seeds, steps).to(cdf.dtype)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target).clamp_max(cdf.shape[-1] - 1)[:, 0]


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
        kept = filter_logits(logits[rows.random], drawing)
        tokens[rows.random] = draw(kept, drawing.seeds, steps[rows.random])
    return tokens
