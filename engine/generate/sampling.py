"""One decoding step's choice of the next token for every row, as vLLM's sampler makes it (see
engine/generate/params.py for the order). Parameters are per row, so rows with different
settings share a batch; random draws come from each row's own generator, so a row's tokens do
not depend on its neighbours."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from engine.generate.params import SamplingParams


def row_seed(seed: int, sample: int) -> int:
    """The seed of a prompt's `sample`-th completion: distinct for every (seed, sample) pair."""
    digest = hashlib.sha256(f"{seed}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class RowSettings:
    """The sampling parameters of a batch's rows as tensors [batch] on the device."""

    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor
    min_p: torch.Tensor
    repetition: torch.Tensor
    frequency: torch.Tensor
    presence: torch.Tensor
    generators: list[torch.Generator | None]

    @classmethod
    def of(cls, params: list[SamplingParams], seeds: list[int],
           device: torch.device) -> RowSettings:
        def column(values: list[float], dtype=torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        generators = [None if p.temperature == 0
                      else torch.Generator(device=device).manual_seed(seed)
                      for p, seed in zip(params, seeds)]
        return cls(column([p.temperature for p in params]), column([p.top_p for p in params]),
                   column([max(p.top_k, 0) for p in params], torch.long),
                   column([p.min_p for p in params]),
                   column([p.repetition_penalty for p in params]),
                   column([p.frequency_penalty for p in params]),
                   column([p.presence_penalty for p in params]), generators)

    def keep(self, rows: torch.Tensor) -> RowSettings:
        kept = rows.tolist()
        return RowSettings(self.temperature[rows], self.top_p[rows], self.top_k[rows],
                           self.min_p[rows], self.repetition[rows], self.frequency[rows],
                           self.presence[rows], [self.generators[i] for i in kept])


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
    (tempered) logits, the others become -inf."""
    logits = logits / rows.temperature.clamp_min(1e-6)[:, None]
    probs = logits.softmax(dim=-1)
    too_unlikely = probs < rows.min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    logits = logits.masked_fill(too_unlikely, float("-inf"))
    ordered, order = logits.sort(dim=-1)  # ascending, as vLLM's top-k/top-p
    vocab = logits.shape[-1]
    k = torch.where(rows.top_k > 0, rows.top_k, vocab).clamp(max=vocab)
    kth = ordered.gather(1, (vocab - k)[:, None])
    ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
    outside = cumulative <= 1 - rows.top_p[:, None]
    outside[:, -1] = False  # the most likely token always stays
    ordered = ordered.masked_fill(outside, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, ordered)


def choose(logits: torch.Tensor, seen: torch.Tensor, output_counts: torch.Tensor,
           rows: RowSettings) -> torch.Tensor:
    """The next token of every row [batch]: argmax where temperature is 0, else a draw."""
    logits = apply_penalties(logits.float(), seen, output_counts, rows)
    tokens = logits.argmax(dim=-1)
    random = [i for i, g in enumerate(rows.generators) if g is not None]
    if random:
        probs = filter_logits(logits[random], rows.keep(torch.tensor(random))).softmax(dim=-1)
        # probs / q with q ~ Exp(1) picks token t with probability probs[t] (vLLM's draw)
        q = torch.stack([torch.empty_like(probs[0]).exponential_(generator=rows.generators[i])
                         for i in random])
        tokens[random] = (probs / q).argmax(dim=-1)
    return tokens
