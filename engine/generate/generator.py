"""Batched decoding with a KV cache: prefill the left-padded prompts in one forward, then one
token per forward for every row until each has met its stop condition. A batch whose rows are
half finished is refilled with waiting prompts (see `Generator._run`); without waiting prompts,
finished rows leave the batch once they are a quarter of it. A completion ends at EOS (unless ignore_eos), at a stop
token or stop string, after max_tokens, or when the model's context (`context_length`) is full
("length").
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm import tqdm

from engine.data.tokenizer import Tokenizer
from engine.generate.cache import Step, decode_width, kv_cache, prefill_mask
from engine.generate.graphs import DecodeStep
from engine.generate.weights import stacked_mlp_weights
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
                 max_batch_tokens: int = 1 << 18, max_batch: int = 256, progress: bool = True,
                 cuda_graphs: bool = True):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.graphs = cuda_graphs and device.type == "cuda"
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
        total = sum(self._budget(r) for r in rows)
        with tqdm(total=total, desc=desc, unit="tok", unit_scale=True, leave=False,
                  disable=not self.progress) as bar, stacked_mlp_weights(self.model):
            for group in self._groups(rows):
                self._run(group, bar)
        completions, i = [], 0
        for p in per_prompt:
            completions.append([r.done for r in rows[i:i + p.n]])
            i += p.n
        return completions

    def _seed(self, params: SamplingParams, sample: int) -> int:
        return row_seed(random.getrandbits(63) if params.seed is None else params.seed, sample)

    def _room(self, row: Row) -> int:
        return self.context - len(row.prompt)

    def _budget(self, row: Row) -> int:
        """How many tokens the row may generate in all."""
        return min(row.params.max_tokens, self._room(row))

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

    def _groups(self, rows: list[Row]) -> list[list[Row]]:
        """Rows that may share batches: all; with dynamic-NTK RoPE only those of one prompt
        length (the frequencies depend on the batch's longest position)."""
        if not isinstance(self.cfg.rope_scaling, DynamicScaling):
            return [rows]
        groups: dict[int, list[Row]] = {}
        for row in rows:
            groups.setdefault(len(row.prompt), []).append(row)
        return list(groups.values())

    def _run(self, rows: list[Row], bar: tqdm) -> None:
        """Decode the rows, longest prompt first. Whenever half of a batch has finished and rows
        are waiting, the batch is refilled: the survivors (prompt + output so far) are prefilled
        again with the newcomers, which costs less than decoding on with a half-empty batch.
        (Not with dynamic NTK: a survivor's positions would set its neighbours' frequencies.)"""
        waiting = deque(sorted(rows, key=lambda r: -len(r.prompt)))
        refill = not isinstance(self.cfg.rope_scaling, DynamicScaling)
        running: list[Row] = []
        while waiting or running:
            while waiting and (not running or self._fits(running + [waiting[0]])):
                running.append(waiting.popleft())
            running = self._decode(running, bar, stop_at_half=refill and bool(waiting))

    def _fits(self, rows: list[Row]) -> bool:
        """rows × (longest sequence so far + most tokens still to come) within the budget."""
        width = (max(len(r.prompt) + len(r.out) for r in rows)
                 + max(self._budget(r) - len(r.out) for r in rows))
        return len(rows) <= self.max_batch and len(rows) * width <= self.max_batch_tokens

    def _decode(self, rows: list[Row], bar: tqdm, stop_at_half: bool) -> list[Row]:
        """Prefill the rows' sequences (prompt + output so far, left-padded), then a token per
        step; the unfinished rows when stopped at half, else none."""
        dev, vocab = self.device, self.cfg.vocab_size
        sequences = [r.prompt + r.out for r in rows]
        length = max(map(len, sequences))
        pad = torch.tensor([length - len(q) for q in sequences], device=dev)
        ids = torch.zeros(len(rows), length, dtype=torch.long, device=dev)
        for i, q in enumerate(sequences):
            ids[i, length - len(q):] = torch.tensor(q)
        at = torch.arange(length, device=dev)[None]
        steps = torch.tensor([len(r.out) for r in rows], device=dev)
        seen = torch.zeros(len(rows), vocab, device=dev).scatter_add_(
            1, ids, (at >= pad[:, None]).float()) > 0  # for the repetition penalty
        counts = torch.zeros(len(rows), vocab, device=dev).scatter_add_(
            1, ids, (at >= length - steps[:, None]).float())  # output tokens only
        settings = RowSettings.of([r.params for r in rows], [r.seed for r in rows], dev)
        slots = length + max(self._budget(r) - len(r.out) for r in rows)
        step = Step(torch.arange(length, device=dev), prefill_mask(pad, length))
        decode = DecodeStep(self.model, step, graphs=self.graphs)
        live = list(range(len(rows)))
        with kv_cache(self.model, step, slots) as caches:
            hidden = self.model.forward_hidden(ids, (at - pad[:, None]).clamp_min(0))
            logits = self.model.logits(hidden[:, -1]).float()
            for slot in range(length, slots):
                tokens = choose(logits, seen, counts, settings, steps)
                self._record(rows, live, tokens, logits)
                seen[torch.arange(len(live)), tokens] = True
                counts[torch.arange(len(live)), tokens] += 1
                steps += 1
                bar.update(len(live))
                alive = [j for j, i in enumerate(live) if rows[i].done is None]
                if not alive or (stop_at_half and len(alive) <= len(rows) // 2):
                    return [rows[live[j]] for j in alive]
                if len(alive) <= 0.75 * len(live):
                    keep = torch.tensor(alive, device=dev)
                    for cache in caches:
                        cache.keep(keep)
                    pad, tokens, seen, counts = pad[keep], tokens[keep], seen[keep], counts[keep]
                    steps, settings = steps[keep], settings.keep(keep)
                    live = [live[j] for j in alive]
                logits = decode(tokens, pad, slot, decode_width(slot, slots))
        return []

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
        if len(row.out) >= self._budget(row):
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
