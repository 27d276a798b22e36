"""synthesize: corpus + teacher -> a corpus of completions (JSONL shards), filtered.

Every rank (RANK of WORLD_SIZE, exported by cluster/ or torchrun) reads the whole corpus, cut into
the same work shards (engine.synthesize.documents), and generates the unfinished shards k with
k % WORLD_SIZE == RANK into `<output>/generated/` (engine.synthesize.shards); no process group
is needed, so vLLM's own stays the only one. Rank 0 then waits for every shard, filters the rows
in corpus order, writes `part-<k>.jsonl` and `samples.json` under temporary names, renames them,
writes the manifest last and removes the work folder. A killed or requeued run resumes: finished
shards are skipped, the one in progress is generated again.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import torch

from engine.data.tokenize import resolve_inputs
from engine.data.tokenizer import Tokenizer, load_tokenizer
from engine.errors import InputError
from engine.evaluate.source import load_source
from engine.formats import tokenizer_path
from engine.lineage import stage_inputs
from engine.manifest import Manifest, complete, fingerprint
from engine.signals import StopSignals
from engine.model.config import ModelConfig
from engine.synthesize.backends import Backend, EngineBackend, VllmBackend, choose, hf_config
from engine.synthesize.documents import read_documents, shards
from engine.synthesize.output import write_corpus
from engine.synthesize.prompts import Prompt, make_prompts
from engine.synthesize.shards import ShardStore
from engine.synthesize.spec import Spec, input_paths

log = logging.getLogger(__name__)
WAIT_S = 5.0  # rank 0 polls for the other ranks' shards this often


def run(spec: Spec) -> Manifest | None:
    out = Path(spec.output)
    if complete(out) is not None:
        raise InputError(f"{out}: holds a finished corpus already (manifest.json); choose "
                         "another output folder")
    files = resolve_inputs(spec.input)
    inputs = stage_inputs(input_paths(spec))
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = _device(spec.device)
    backend, cfg, tok = _backend(spec, device)
    store = ShardStore(out)
    store.open(_plan(spec, inputs))
    log.info("synthesize: rank %d of %d, backend %s on %s, %d input file(s)", rank, world,
             backend.name, device, len(files))
    started = time.perf_counter()
    with StopSignals(signal.SIGINT, signal.SIGTERM, signal.SIGUSR2,
                     note="stopping after this shard") as stop:
        count = 0
        for k, docs in shards(read_documents(files, spec.text_key, spec.id_key),
                              spec.shard_documents):
            count = k + 1
            if k % world != rank or store.done(k):
                continue
            generate_shard(spec, k, docs, tok, backend, cfg.max_position_embeddings,
                           inputs["teacher"], store, rank)
            if stop.received is not None:
                raise stop.as_exception()
        if count == 0:
            raise InputError(f"{', '.join(map(str, files))}: no documents")
        if rank != 0:
            return None
        _wait_for(store, count, stop)
    manifest = write_corpus(spec, store, count, inputs,
                            fingerprint("synthesize", spec.fingerprint_fields(), inputs),
                            wall_s=time.perf_counter() - started)
    shutil.rmtree(store.root)
    return manifest


def check_teacher(spec: Spec, cfg: ModelConfig, tok: Tokenizer) -> None:
    """Fail before any generation on a tokenizer the teacher cannot read or prompts its context
    cannot hold."""
    if tok.vocab_size > cfg.vocab_size:
        raise InputError(f"{tok.path}: the tokenizer has {tok.vocab_size} tokens, the teacher "
                         f"{spec.teacher} embeds {cfg.vocab_size}: not the teacher's tokenizer")
    if spec.add_bos and tok.bos_id is None:
        raise InputError(f"{tok.path}: add_bos, but the tokenizer has no BOS token")
    longest = spec.prefix_tokens + int(spec.add_bos)
    context = cfg.max_position_embeddings
    if longest >= context:
        raise InputError(f"prefix_tokens {spec.prefix_tokens}: prompts of up to {longest} "
                         f"tokens leave no room to generate in the teacher's context of "
                         f"{context} positions; lower prefix_tokens")


def _plan(spec: Spec, inputs: dict[str, str]) -> dict:
    """What the shards depend on: everything but the filters and the shown samples."""
    fields = {k: v for k, v in spec.fingerprint_fields().items() if k != "filters"}
    return {"fingerprint": fingerprint("synthesize-shards", fields, inputs),
            "shard_documents": spec.shard_documents}


def _device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _backend(spec: Spec, device: torch.device) -> tuple[Backend, ModelConfig, Tokenizer]:
    """The backend, the teacher's config and tokenizer, checked before any weight is loaded
    into this process (vLLM loads its own: here, only config.json is read)."""
    if choose(spec, device) == "vllm":
        cfg, tok = hf_config(spec.teacher), _hf_tokenizer(spec)
        check_teacher(spec, cfg, tok)
        return VllmBackend(spec), cfg, tok
    source = load_source(spec.teacher, spec.tokenizer)
    tok = source.tokenizer()
    check_teacher(spec, source.cfg, tok)
    return EngineBackend(source, tok, spec, device), source.cfg, tok


def _hf_tokenizer(spec: Spec) -> Tokenizer:
    path = tokenizer_path(spec.teacher, spec.tokenizer)
    if path is None:
        raise InputError(f"{spec.teacher}: no tokenizer found beside the model (tokenizer.json "
                         f"or tokenizer.model); set tokenizer")
    return load_tokenizer(path)


def generate_shard(spec: Spec, k: int, docs: list, tok: Tokenizer, backend: Backend,
                   context: int, teacher: str, store: ShardStore, rank: int) -> None:
    """Generate shard k, whole (its last partial batch too), and write it."""
    prompts, counts = make_prompts(docs, tok, spec.prefix_tokens,
                                   spec.short_documents == "whole", spec.seed)
    bos = [tok.bos_id] if spec.add_bos else []
    ids = [bos + p.prefix_ids for p in prompts]
    params = [spec.sampling.model_copy(update={
        "seed": p.seed, "max_tokens": min(spec.sampling.max_tokens, context - len(i))})
        for p, i in zip(prompts, ids)]
    counts["max_tokens_cut"] = sum(p.max_tokens < spec.sampling.max_tokens for p in params)
    start = time.perf_counter()
    outputs = backend.generate(ids, params, desc=f"shard {k}") if prompts else []
    seconds = time.perf_counter() - start
    rows = [_row(p, len(i), prm, j, c, teacher)
            for p, i, prm, completions in zip(prompts, ids, params, outputs)
            for j, c in enumerate(completions)]
    tokens = sum(r["completion_tokens"] for r in rows)
    stats = {"documents": len(docs), "prompts": len(prompts), "completions": len(rows),
             "generated_tokens": tokens, "seconds": seconds, "rank": rank,
             "backend": backend.name, **counts,
             "finish_reasons": dict(Counter(r["finish_reason"] for r in rows))}
    store.write(k, rows, stats)
    log.info("shard %d: %d prompts, %d completions, %d tokens in %.1f s (%.0f tok/s, %.2f "
             "prompts/s)", k, len(prompts), len(rows), tokens, seconds,
             tokens / max(seconds, 1e-9), len(prompts) / max(seconds, 1e-9))


def _row(p: Prompt, prompt_tokens: int, params, j: int, c, teacher: str) -> dict:
    row = {"id": f"{p.document.id}#{j}", "document": p.document.id,
           "document_index": p.document.index, "sample": j,
           "prefix": p.prefix, "prefix_token_ids": p.prefix_ids, "completion": c.text,
           "text": p.prefix + c.text, "finish_reason": c.finish_reason,
           "stop_reason": c.stop_reason, "prompt_tokens": prompt_tokens,
           "completion_tokens": len(c.token_ids), "teacher": teacher,
           "sampling": params.model_dump(mode="json")}
    if c.logprobs is not None:
        row["logprobs"] = c.logprobs
    return row


def _wait_for(store: ShardStore, count: int, stop: StopSignals) -> None:
    """Until every shard is finished (the other ranks' too; a rank that dies takes the job
    down: srun --kill-on-bad-exit)."""
    last_report = time.monotonic()
    while missing := [k for k in range(count) if not store.done(k)]:
        if stop.received is not None:
            raise stop.as_exception()
        if time.monotonic() - last_report > 60:
            log.info("waiting for %d shard(s) of other ranks: %s", len(missing), missing[:10])
            last_report = time.monotonic()
        time.sleep(WAIT_S)
