"""Decoding with the KV cache (engine/generate) against Hugging Face transformers' `generate`
(greedy, token for token, fp32) on stories260K and on random models of every layout and RoPE
variant with ragged batches; sampling against direct implementations of vLLM's formulas; seeds,
stop conditions, log-probabilities and bad prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import random_hf_model, shared
from engine.data.tokenizer import load_tokenizer
from engine.generate.generator import Generator
from engine.generate.params import SamplingParams
from engine.generate.sampling import RowSettings, apply_penalties, draw, filter_logits
from engine.model.hf_names import load_hf_state_dict
from engine.model.llama import LlamaModel
from tests.test_model import config

transformers = pytest.importorskip("transformers")
CPU = torch.device("cpu")
GREEDY = SamplingParams(temperature=0, max_tokens=24)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(shared("tiny-llama", "hf"))


@pytest.fixture(scope="module")
def stories(tokenizer):
    from engine.convert.hf import load_hf
    hf_dir = shared("tiny-llama", "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return load_hf(hf_dir)[2].eval(), hf


def hf_greedy(hf, prompt: list[int], max_new: int, eos: int | None) -> list[int]:
    """transformers' generate on one prompt alone (no padding), the new tokens."""
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                      eos_token_id=eos, pad_token_id=0, attention_mask=torch.ones(1, len(prompt)))
    return out[0, len(prompt):].tolist()


def prompts_of(tokenizer, texts: list[str]) -> list[list[int]]:
    return [[tokenizer.bos_id] + list(ids) for ids in tokenizer.encode(texts)]


def test_greedy_equals_transformers_on_stories260k(stories, tokenizer):
    model, hf = stories
    prompts = prompts_of(tokenizer, ["Once upon a time", "The little dog ran to the park and",
                                     "Lily", "One day, a girl named Sue found a big red ball. She"])
    params = SamplingParams(temperature=0, max_tokens=60)
    out = Generator(model, tokenizer, CPU, progress=False).generate(prompts, params)
    for prompt, (completion,) in zip(prompts, out):
        assert completion.token_ids == hf_greedy(hf, prompt, 60, tokenizer.eod_id)
        assert completion.prompt_tokens == len(prompt)
    for text, (completion,) in zip(["Once upon a time", "Lily"], [out[0], out[2]]):
        ids = completion.token_ids[:-1] if completion.finish_reason == "stop" else completion.token_ids
        # the completion's text keeps the space before its first word
        assert text + completion.text == tokenizer.decode(prompts_of(tokenizer, [text])[0][1:] + ids)


@pytest.mark.parametrize("case", ["llama-gqa", "llama-mha-tied", "llama-linear", "llama-dynamic",
                                  "llama-yarn", "llama-llama3", "qwen2-bias-tied",
                                  "mistral-head-dim-32"])
def test_greedy_equals_transformers_on_random_models(case, tokenizer):
    cfg = config(case)
    hf = random_hf_model(cfg)
    model = LlamaModel(cfg)
    load_hf_state_dict(model, hf.state_dict())
    model.eval()
    rng = np.random.default_rng(0)
    lengths = [5, 5, 5] if "dynamic" in case else [3, 11, 7]
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in lengths]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    out = Generator(model, tokenizer, CPU, progress=False).generate(prompts, params)
    for prompt, (completion,) in zip(prompts, out):  # beyond 32 positions for dynamic NTK
        assert completion.token_ids == hf_greedy(hf, prompt, 30, None), case


def vllm_penalties(logits, prompt, output, repetition, frequency, presence):
    """vLLM's apply_penalties for one row, written out."""
    logits = logits.copy()
    for token in set(prompt) | set(output):
        logits[token] = logits[token] / repetition if logits[token] > 0 else logits[token] * repetition
    for token in set(output):
        logits[token] -= frequency * output.count(token) + presence
    return logits


def vllm_filter(logits, temperature, min_p, top_k, top_p):
    """Temperature, min-p, top-k, top-p for one row, as vLLM's sampler orders them."""
    logits = logits / temperature
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    logits = np.where(probs < min_p * probs.max(), -np.inf, logits)
    if top_k > 0:
        logits = np.where(logits < np.sort(logits)[-top_k], -np.inf, logits)
    order = np.argsort(logits)
    probs = np.exp(logits[order] - logits.max())
    probs /= probs.sum()
    drop = np.cumsum(probs) <= 1 - top_p
    drop[-1] = False
    out = logits.copy()
    out[order[drop]] = -np.inf
    return out


def test_penalties_and_filters_equal_vllm_formulas():
    rng = np.random.default_rng(0)
    vocab = 50
    logits = rng.normal(0, 2, (4, vocab)).astype(np.float32)
    prompts = [rng.integers(0, vocab, 8).tolist() for _ in range(4)]
    outputs = [rng.integers(0, vocab, 12).tolist() for _ in range(4)]
    params = [SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=-0.5,
                             temperature=0.7, min_p=0.05, top_k=10, top_p=0.8),
              SamplingParams(repetition_penalty=0.8, temperature=1.5, top_p=0.5),
              SamplingParams(frequency_penalty=-1.0, top_k=3),
              SamplingParams(presence_penalty=2.0, min_p=0.3, top_k=-1)]
    rows = RowSettings.of(params, [1, 2, 3, 4], CPU)
    seen = torch.zeros(4, vocab, dtype=torch.bool)
    counts = torch.zeros(4, vocab)
    for i, (prompt, output) in enumerate(zip(prompts, outputs)):
        seen[i, prompt + output] = True
        counts[i] = torch.bincount(torch.tensor(output), minlength=vocab).float()
    penalised = apply_penalties(torch.from_numpy(logits), seen, counts, rows)
    filtered = filter_logits(penalised, rows).numpy()
    for i, p in enumerate(params):
        expected = vllm_penalties(logits[i], prompts[i], outputs[i], p.repetition_penalty,
                                  p.frequency_penalty, p.presence_penalty)
        np.testing.assert_allclose(penalised[i].numpy(), expected, rtol=1e-6)
        kept = vllm_filter(expected, p.temperature, p.min_p, p.top_k, p.top_p)
        assert (np.isfinite(filtered[i]) == np.isfinite(kept)).all(), i
        np.testing.assert_allclose(filtered[i][np.isfinite(kept)], kept[np.isfinite(kept)],
                                   rtol=1e-5)
        assert 1 <= np.isfinite(kept).sum() < vocab


def test_seeded_sampling_does_not_depend_on_the_batch(stories, tokenizer):
    model, _ = stories
    generator = Generator(model, tokenizer, CPU, progress=False)
    prompts = prompts_of(tokenizer, ["Tom had a", "The sun was hot and the children",
                                     "Once"])
    mine = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=20, seed=7, n=3)
    alone = generator.generate(prompts[:1], mine)[0]
    others = [SamplingParams(temperature=0.8, max_tokens=30, seed=1),
              SamplingParams(temperature=0, max_tokens=5)]
    batched = generator.generate(prompts[1:2] + prompts[:1] + prompts[2:],
                                 [others[0], mine, others[1]])[1]
    assert [c.token_ids for c in alone] == [c.token_ids for c in batched]
    assert len({tuple(c.token_ids) for c in alone}) == 3  # n samples differ from each other
    other_seed = generator.generate(prompts[:1], mine.model_copy(update={"seed": 8}))[0]
    assert [c.token_ids for c in other_seed] != [c.token_ids for c in alone]
    # top_k = 1 leaves only the argmax: sampling equals greedy
    greedy = generator.generate(prompts, SamplingParams(temperature=0, max_tokens=15))
    top1 = generator.generate(prompts, SamplingParams(temperature=1.3, top_k=1, max_tokens=15))
    assert [c[0].token_ids for c in greedy] == [c[0].token_ids for c in top1]


def test_stop_strings_tokens_logprobs_and_context(stories, tokenizer):
    model, _ = stories
    generator = Generator(model, tokenizer, CPU, progress=False)
    prompt = prompts_of(tokenizer, ["Once upon a time"])
    (free,), = generator.generate(prompt, SamplingParams(temperature=0, max_tokens=40,
                                                         ignore_eos=True, logprobs=True))
    assert free.finish_reason == "length" and len(free.token_ids) == 40
    # log-probabilities: those of a plain forward over prompt + completion
    with torch.no_grad():
        full = torch.tensor([prompt[0] + free.token_ids])
        expected = model(full)[0, len(prompt[0]) - 1:-1].log_softmax(-1)
    expected = expected.gather(1, torch.tensor(free.token_ids)[:, None])[:, 0]
    np.testing.assert_allclose(free.logprobs, expected.numpy(), atol=1e-5)

    stop = free.text[12:17]
    (cut,), = generator.generate(prompt, SamplingParams(temperature=0, max_tokens=40,
                                                        ignore_eos=True, stop=[stop]))
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == free.text[:free.text.index(stop)]
    assert cut.token_ids == free.token_ids[:len(cut.token_ids)] and len(cut.token_ids) < 40

    token = free.token_ids[5]
    (by_id,), = generator.generate(prompt, SamplingParams(temperature=0, max_tokens=40,
                                                          ignore_eos=True,
                                                          stop_token_ids=[token]))
    first = free.token_ids.index(token)
    assert by_id.token_ids == free.token_ids[:first + 1] and by_id.stop_reason == token
    assert by_id.text == generator.generate(prompt, SamplingParams(
        temperature=0, max_tokens=first, ignore_eos=True))[0][0].text

    # the context (512) ends a completion before max_tokens
    long_prompt = [tokenizer.bos_id] + free.token_ids * 12 + [5] * 28  # 509 tokens
    (edge,), = generator.generate([long_prompt], SamplingParams(temperature=0, max_tokens=10,
                                                                 ignore_eos=True))
    assert edge.finish_reason == "length" and len(edge.token_ids) == 512 - len(long_prompt)


def test_bad_prompts_are_refused(stories, tokenizer):
    model, _ = stories
    generator = Generator(model, tokenizer, CPU, progress=False)
    with pytest.raises(ValueError, match="empty prompt"):
        generator.generate([[]], GREEDY)
    with pytest.raises(ValueError, match="leaves no room in the model's context of 512"):
        generator.generate([[1] * 512], GREEDY)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generator.generate([[1, 600]], GREEDY)
    with pytest.raises(ValueError, match="2 prompts but 1 sampling params"):
        generator.generate([[1], [1]], [GREEDY])


def test_the_sort_free_nucleus_equals_vllms_sorted_one():
    """Top-k and top-p by thresholds keep the tokens vLLM's sort keeps, over a wide vocabulary,
    flat and peaked rows, tiny and whole nuclei."""
    rng = np.random.default_rng(1)
    vocab = 4096
    logits = rng.normal(0, 1, (8, vocab)) * np.array([0.1, 1, 3, 8, 1, 3, 0.5, 2])[:, None]
    params = [SamplingParams(top_p=p, top_k=k, temperature=t) for p, k, t in
              ((0.9, 0, 0.7), (0.5, 0, 1.0), (0.99, 0, 1.0), (0.01, 0, 1.0), (1.0, 50, 1.0),
               (0.3, 1000, 0.5), (0.999, 0, 2.0), (0.9, 4096, 1.0))]
    filtered = filter_logits(torch.tensor(logits, dtype=torch.float32),
                             RowSettings.of(params, list(range(8)), CPU)).numpy()
    for i, p in enumerate(params):
        kept = vllm_filter(logits[i].astype(np.float32), p.temperature, p.min_p, p.top_k, p.top_p)
        assert (np.isfinite(filtered[i]) == np.isfinite(kept)).all(), i
    assert np.isfinite(filtered[3]).sum() < 10 < np.isfinite(filtered[6]).sum() < vocab


def test_counter_based_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    seeds = torch.arange(40_000, dtype=torch.long) * 7919 + 12345
    logits = probs.log()[None].expand(len(seeds), 5)
    picks = [draw(logits, seeds, torch.full_like(seeds, step)) for step in (0, 1)]
    for drawn in picks:
        frequency = torch.bincount(drawn, minlength=5).double() / len(seeds)
        sigma = (probs * (1 - probs) / len(seeds)).sqrt()
        assert ((frequency - probs).abs() < 4.5 * sigma).all(), frequency
    # two steps of one row are independent draws: both pick token 0 with probability 1/4
    both = ((picks[0] == 0) & (picks[1] == 0)).double().mean().item()
    assert abs(both - 0.25) < 4.5 * (0.25 * 0.75 / len(seeds)) ** 0.5
    # a pure function of (seed, step)
    one = torch.ones_like(seeds)
    again = draw(logits[:5], seeds[:5], one[:5])
    assert torch.equal(again, draw(logits, seeds, one)[:5])


def test_a_refilled_batch_gives_the_same_completions(stories, tokenizer):
    """max_batch 2: whenever one of two rows ends, the survivor is prefilled again together with
    the next prompt; the completions are those of one big batch."""
    model, _ = stories
    texts = ["Once upon a time", "The cat", "Tim and Sam went to the", "A bird", "She was happy",
             "The big tree"]
    prompts = prompts_of(tokenizer, texts)
    for base in (SamplingParams(temperature=0), SamplingParams(temperature=0.9, top_p=0.9, seed=3)):
        # rows end at different steps, so refills happen
        params = [base.model_copy(update={"max_tokens": n}) for n in (40, 12, 30, 25, 8, 33)]
        one = Generator(model, tokenizer, CPU, progress=False).generate(prompts, params)
        refilled = Generator(model, tokenizer, CPU, max_batch=2,
                             progress=False).generate(prompts, params)
        assert [c[0].token_ids for c in refilled] == [c[0].token_ids for c in one]
        assert [len(c[0].token_ids) for c in one] == [40, 12, 30, 25, 8, 33]
