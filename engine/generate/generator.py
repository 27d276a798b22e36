"""Batched decoding with a KV cache: prefill the left-padded prompts in one forward, then one
token per forward for every row until each has met its stop condition. Rows that finish leave the
batch (their cache rows are dropped) once they are a quarter of it.

Prompts are grouped into batches under a token budget (rows × (longest prompt + new tokens)),
longest first; with dynamic-NTK RoPE only prompts of one length share a batch (its frequencies
depend on the batch's longest position). A completion ends at EOS (unless ignore_eos), at a stop
token or stop string, after max_tokens, or when the model's context (`context_length`) is full
("length").
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm import tqdm

from engine.data.tokenizer import Tokenizer
from engine.generate.cache import Step, decode_mask, kv_cache, prefill_mask
from engine.generate.params import Completion, SamplingParams
from engine.generate.sampling import RowSettings, choose, row_seed
from engine.model.config import DynamicScaling, ModelConfig

_CONTEXT_TOKENS = 4  # prompt tokens decoded before a completion, so its first space survives


def continuation_text(tokenizer: Tokenizer, before: Sequence[int], tokens: Sequence[int]) -> str:
    """The text `tokens` add after `before` (a decoder may drop a leading space of a text that
    starts with them)."""
    context = list(before[-_CONTEXT_TOKENS:])
    head, whole = tokenizer.decode(context), tokenizer.decode(context + list(tokens))
    return whole[len(head):] if whole.startswith(head) else tokenizer.decode(tokens)


@dataclass
class Row:
    """One completion being generated."""

    prompt: list[int]
    params: SamplingParams
    seed: int
    out: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    done: Completion | None = None


def context_length(cfg: ModelConfig) -> int:
    """How many positions a completion may reach: the trained length, times the factor for
    dynamic NTK (which exists to run beyond it; vLLM's limit too)."""
    if isinstance(cfg.rope_scaling, DynamicScaling):
        return int(cfg.max_position_embeddings * cfg.rope_scaling.factor)
    return cfg.max_position_embeddings


class Generator:
    """Continue token prompts with a Llama-family model (on its device, in its dtype)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, device: torch.device,
                 max_batch_tokens: int = 1 << 18, max_batch: int = 256, progress: bool = True):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.cfg = model.cfg
        self.context = context_length(self.cfg)
        self.max_batch_tokens, self.max_batch, self.progress = max_batch_tokens, max_batch, progress

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams],
                 desc: str = "generate") -> list[list[Completion]]:
        """`params.n` completions of every prompt (token ids as given: BOS included if wanted)."""
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else params
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(per_prompt)} sampling params")
        rows = [Row(list(map(int, prompt)), p, self._seed(p, i))
                for prompt, p in zip(prompts, per_prompt) for i in range(p.n)]
        for row in rows:
            self._check(row)
        total = sum(min(r.params.max_tokens, self._room(r)) for r in rows)
        with tqdm(total=total, desc=desc, unit="tok", unit_scale=True, leave=False,
                  disable=not self.progress) as bar:
            for batch in self._batches(rows):
                self._decode(batch, bar)
        completions, i = [], 0
        for p in per_prompt:
            completions.append([r.done for r in rows[i:i + p.n]])
            i += p.n
        return completions

    def _seed(self, params: SamplingParams, sample: int) -> int:
        return row_seed(random.getrandbits(63) if params.seed is None else params.seed, sample)

    def _room(self, row: Row) -> int:
        return self.context - len(row.prompt)

    def _check(self, row: Row) -> None:
        if not row.prompt:
            raise ValueError("an empty prompt: give at least one token (e.g. BOS)")
        if self._room(row) < 1:
            raise ValueError(f"a prompt of {len(row.prompt)} tokens leaves no room in the "
                             f"model's context of {self.context}")
        top = max(row.prompt)
        if top >= self.cfg.vocab_size or min(row.prompt) < 0:
            raise ValueError(f"token id {top} is outside the model's vocabulary "
                             f"({self.cfg.vocab_size})")

    def _batches(self, rows: list[Row]):
        """Longest prompt first; rows × (longest prompt + longest output) within the budget."""
        order = sorted(rows, key=lambda r: -len(r.prompt))
        same_length = isinstance(self.cfg.rope_scaling, DynamicScaling)
        batch: list[Row] = []
        for row in order:
            grown = batch + [row]
            width = len(grown[0].prompt) + max(min(r.params.max_tokens, self._room(r))
                                               for r in grown)
            fits = len(grown) <= self.max_batch and len(grown) * width <= self.max_batch_tokens
            if batch and (not fits or (same_length and len(row.prompt) != len(batch[0].prompt))):
                yield batch
                grown = [row]
            batch = grown
        if batch:
            yield batch

    def _decode(self, rows: list[Row], bar: tqdm) -> None:
        dev, vocab = self.device, self.cfg.vocab_size
        length = len(rows[0].prompt)
        pad = torch.tensor([length - len(r.prompt) for r in rows], device=dev)
        ids = torch.zeros(len(rows), length, dtype=torch.long, device=dev)
        for i, r in enumerate(rows):
            ids[i, length - len(r.prompt):] = torch.tensor(r.prompt)
        real = torch.arange(length, device=dev)[None] >= pad[:, None]
        seen = torch.zeros(len(rows), vocab, dtype=torch.long, device=dev).scatter_add_(
            1, ids, real.long()) > 0  # the prompt's tokens, for the repetition penalty
        counts = torch.zeros(len(rows), vocab, device=dev)
        settings = RowSettings.of([r.params for r in rows], [r.seed for r in rows], dev)
        slots = length + max(min(r.params.max_tokens, self._room(r)) for r in rows)
        step = Step(0, prefill_mask(pad, length))
        positions = (torch.arange(length, device=dev)[None] - pad[:, None]).clamp_min(0)
        live = list(range(len(rows)))
        with kv_cache(self.model, step, slots) as caches:
            logits = self._logits(ids, positions)
            for t in range(slots - length):
                tokens = choose(logits, seen, counts, settings)
                self._record(rows, live, tokens, logits)
                seen[torch.arange(len(live)), tokens] = True
                counts[torch.arange(len(live)), tokens] += 1
                bar.update(len(live))
                alive = [j for j, i in enumerate(live) if rows[i].done is None]
                if not alive:
                    return
                if len(alive) <= 0.75 * len(live):
                    keep = torch.tensor(alive, device=dev)
                    for cache in caches:
                        cache.keep(keep)
                    pad, tokens, seen, counts = pad[keep], tokens[keep], seen[keep], counts[keep]
                    settings = settings.keep(keep)
                    live = [live[j] for j in alive]
                step.start, step.mask = length + t, decode_mask(pad, length + t + 1)
                logits = self._logits(tokens[:, None], (length + t - pad)[:, None])

    def _logits(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.model.forward_hidden(ids, positions)
        return self.model.logits(hidden[:, -1]).float()

    def _record(self, rows: list[Row], live: list[int], tokens: torch.Tensor,
                logits: torch.Tensor) -> None:
        """Append each live row's token; finish the rows whose stop condition it meets."""
        logprobs = None
        if any(rows[i].params.logprobs for i in live):
            logprobs = logits.log_softmax(dim=-1).gather(1, tokens[:, None])[:, 0].tolist()
        for j, (i, token) in enumerate(zip(live, tokens.tolist())):
            row = rows[i]
            if row.done is not None:
                continue
            row.out.append(token)
            if logprobs is not None and row.params.logprobs:
                row.logprobs.append(logprobs[j])
            row.done = self._finished(row)

    def _finished(self, row: Row) -> Completion | None:
        p, token = row.params, row.out[-1]
        if token in p.stop_token_ids or (token == self.tokenizer.eod_id and not p.ignore_eos):
            return self._completion(row, row.out[:-1], "stop", token)
        if p.stop:
            found = self._stop_string(row)
            if found is not None:
                return found
        if len(row.out) >= min(p.max_tokens, self._room(row)):
            return self._completion(row, row.out, "length", None)
        return None

    def _stop_string(self, row: Row) -> Completion | None:
        """A stop string in the text the last tokens added: the completion's text ends before
        it (its token ids run to the token that completed it)."""
        window = max(map(len, row.params.stop)) + 8
        before = row.prompt + row.out[:-window]
        tail = continuation_text(self.tokenizer, before, row.out[-window:])
        if not any(s in tail for s in row.params.stop):
            return None
        text = continuation_text(self.tokenizer, row.prompt, row.out)
        cut, stop = min((text.find(s), s) for s in row.params.stop if s in text)
        return self._completion(row, row.out, "stop", stop, text[:cut])

    def _completion(self, row: Row, text_ids: list[int], reason: str, stop: str | int | None,
                    text: str | None = None) -> Completion:
        if text is None:
            text = continuation_text(self.tokenizer, row.prompt, text_ids)
        return Completion(list(row.out), text, reason, stop,
                          row.logprobs if row.params.logprobs else None, len(row.prompt))
