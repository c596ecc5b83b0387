"""The inference engine against the plain decode loop (generate.py), token for token; the paged block
pool and prefix cache against their invariants; the sampler against its definitions; the async face."""

import asyncio
import copy
import functools
import math
import os
import random
import time
from pathlib import Path

import pytest
import torch

from lmforge.common import LmforgeError
from lmforge.engine import LLM, Completion, SamplingParams, model_runner
from lmforge.engine.async_engine import AsyncEngine, EngineError, Overloaded, Router
from lmforge.engine.fuse import fuse_projections
from lmforge.engine.process_engine import ProcessEngine
from lmforge.engine.sampler import apply_penalties
from lmforge.engine.sequence import Sequence
from lmforge.generate import generate
from lmforge.gpt2 import GPT2, GPT2Config
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import Tokenizer

CTX = 64
VOCAB = 64


@torch.no_grad()
def nudged(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Init weights, then push the matrices well off init: at init a tiny model's greedy output is one
    token repeated, which any bug in positions or attention would reproduce just as well. With this
    noise 40 greedy tokens hold ~15 distinct ids and the next-token entropy is ~2.6 nats."""
    model.init_weights(seed)
    generator = torch.Generator().manual_seed(seed + 1000)
    for p in model.parameters():
        if p.ndim > 1:
            p.add_(0.3 * torch.randn(p.shape, generator=generator))
    return model.eval()


def llama(num_key_value_heads: int = 4, sliding_window: int | None = None, vocab_size: int = VOCAB,
          seed: int = 0, context: int = CTX) -> Transformer:
    config = ModelConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=num_key_value_heads, intermediate_size=64,
                         max_position_embeddings=context, sliding_window=sliding_window)
    return nudged(Transformer(config), seed)


def gpt2(seed: int = 0) -> GPT2:
    config = GPT2Config(vocab_size=VOCAB, n_positions=CTX, n_embd=32, n_layer=2, n_head=4)
    return nudged(GPT2(config), seed)


@pytest.fixture(scope="module")
def model() -> Transformer:
    return llama()


def random_prompts(lengths: list[int], seed: int = 0, vocab_size: int = VOCAB) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(n)] for n in lengths]


def reference(model: torch.nn.Module, prompt: list[int], max_tokens: int, **kwargs) -> list[int]:
    return list(generate(model, prompt, max_tokens=max_tokens, temperature=0, **kwargs))


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, **kwargs)


def drive(llm: LLM, max_steps: int = 3000) -> dict[tuple[str, int], Completion]:
    """Step the engine until every queued request ends: (request id, index) -> its Completion.
    Bounded, so an engine that stops making progress fails the test instead of hanging it."""
    done, tokens, logprobs, prompt_logprobs = {}, {}, {}, {}
    for _ in range(max_steps):
        if not llm.has_unfinished():
            return done
        for out in llm.step():
            key = (out.request_id, out.index)
            tokens.setdefault(key, []).extend(out.token_ids)
            logprobs.setdefault(key, []).extend(out.logprobs)
            if out.prompt_logprobs is not None:
                prompt_logprobs[key] = out.prompt_logprobs
            if out.finished:
                done[key] = Completion(tokens[key], "", out.finish_reason, logprobs[key], prompt_logprobs.get(key),
                                       out.num_cached_tokens)
    raise AssertionError(f"the engine still has work after {max_steps} steps: it stopped making progress "
                         f"({len(llm.scheduler.running)} running, {len(llm.scheduler.waiting)} waiting, "
                         f"{llm.num_free_blocks} of {llm.block_manager.num_blocks} blocks free)")


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
        **kwargs) -> list[Completion]:
    """Submit prompts together, drive to the end; one Completion per prompt (n=1)."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    ids = [llm.add_request(p, sp, **kwargs) for p, sp in zip(prompts, params)]
    done = drive(llm)
    return [done[(rid, 0)] for rid in ids]


@torch.no_grad()
def full_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """(T, V) fp32 logits of a full forward pass without any cache: the reference for log-probabilities."""
    return model(torch.tensor([ids]))[0].float()


# ----------------------------------------------------------------------------- greedy parity

# Lengths mix a 1-token prompt, ones longer than a step's budget (the first one: under budget 8 the first
# step is only part of its prompt, nothing sampled) and one that runs into the context (34 + 30 > 64).
MIXED_LENGTHS = [17, 2, 34, 1, 9, 23, 5, 12]


@pytest.mark.parametrize("case", ["chunked_prefill", "block_size_7", "gqa", "sliding_window", "gpt2"])
def test_greedy_engine_equals_generate_for_a_mixed_batch(case):
    model, kwargs = {
        # budget 8: long prompts go in chunks that share steps with other sequences' decodes
        "chunked_prefill": (llama(), dict(block_size=4, max_num_batched_tokens=8)),
        "block_size_7": (llama(seed=1), dict(block_size=7)),  # divides none of the prompt lengths
        "gqa": (llama(num_key_value_heads=1, seed=2), dict(block_size=4, max_num_batched_tokens=16)),
        # window 6 < most prompts: prefill chunks, decodes and cached blocks all see only 6 keys
        "sliding_window": (llama(num_key_value_heads=2, sliding_window=6, seed=3),
                           dict(block_size=4, max_num_batched_tokens=12)),
        "gpt2": (gpt2(seed=4), dict(block_size=5, max_num_batched_tokens=12)),
    }[case]
    prompts = random_prompts(MIXED_LENGTHS, seed=len(case))
    expected = [reference(model, p, 30) for p in prompts]
    assert len({t for e in expected for t in e}) > 20  # outputs that depend on what came before
    outs = run(LLM(model, **kwargs), prompts, greedy(30))
    assert [o.token_ids for o in outs] == expected
    # Everything ran to max_tokens, except the prompt that filled the context.
    assert [o.finish_reason for o in outs] == ["length"] * len(prompts)
    assert [len(o.token_ids) for o in outs] == [min(30, CTX - len(p)) for p in prompts]


def test_llm_generate_equals_generate(model):
    """The offline face (LLM.generate) assembles the same completions as stepping by hand."""
    prompts = random_prompts([5, 20, 11])
    outs = LLM(model, block_size=4).generate(prompts, greedy(12))
    assert [o[0].token_ids for o in outs] == [reference(model, p, 12) for p in prompts]


def test_a_step_that_only_prefills_part_of_a_prompt(model):
    # No row of such a step needs logits: an empty index must still be an integer one.
    prompt = random_prompts([20])[0]
    outs = run(LLM(model, block_size=4, max_num_batched_tokens=8), [prompt], greedy(5))
    assert outs[0].token_ids == reference(model, prompt, 5)


def test_bf16_engine_first_token_matches_generate():
    # The prefill is the same computation as generate's, but packed with other prompts in one row;
    # bf16 matmuls may round a packed row differently, so a near tie (within bf16's resolution of the
    # logits, ~2^-7 relative) may flip. Later tokens are not compared: every bf16 step drifts further.
    prompts = random_prompts([3, 11, 18, 7], seed=5)
    for llm, dtype in [(LLM(llama(seed=5), dtype=torch.bfloat16), torch.bfloat16),  # fp32 weights, bf16 autocast
                       (LLM(llama(seed=5).to(torch.bfloat16)), torch.float32)]:  # bf16 weights, bf16 cache
        outs = run(llm, prompts, greedy(6))
        for prompt, out in zip(prompts, outs):
            assert len(out.token_ids) == 6
            if out.token_ids[0] != reference(llm.model, prompt, 1, dtype=dtype)[0]:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logits = full_logits(llm.model, prompt)[-1]
                assert logits[out.token_ids[0]] >= logits.max() - 0.02 * logits.abs().max()


# ----------------------------------------------------------------------------- prefix caching

def cached_floor(length: int, block_size: int) -> int:
    """Prompt tokens a prefix-cache hit can cover: the full blocks before the last token, whose logits
    must be computed to sample from."""
    return (length - 1) // block_size * block_size


def test_repeated_prompt_hits_the_prefix_cache_and_gives_the_same_output(model):
    lengths = [13, 16, 9, 3, 4, 5, 8]  # multiples of the block size and not, shorter than a block
    prompts = random_prompts(lengths, seed=7)
    llm = LLM(model, block_size=4)
    first = run(llm, prompts, greedy(10))
    again = run(llm, prompts, greedy(10))
    assert [o.num_cached_tokens for o in first] == [0] * len(prompts)
    assert [o.num_cached_tokens for o in again] == [cached_floor(n, 4) for n in lengths]
    assert [o.token_ids for o in again] == [o.token_ids for o in first] == [reference(model, p, 10) for p in prompts]


def test_salt_separates_tenants_in_the_prefix_cache(model):
    prompt = random_prompts([14], seed=8)[0]
    llm = LLM(model, block_size=4)
    plain = run(llm, [prompt], greedy(8))[0]
    other = run(llm, [prompt], greedy(8), salt=b"tenant-a")[0]
    other_again = run(llm, [prompt], greedy(8), salt=b"tenant-a")[0]
    plain_again = run(llm, [prompt], greedy(8))[0]
    assert (other.num_cached_tokens, other_again.num_cached_tokens, plain_again.num_cached_tokens) == (0, 12, 12)
    assert other.token_ids == other_again.token_ids == plain.token_ids == reference(model, prompt, 8)


@pytest.mark.parametrize("shared, block_size", [(10, 4), (12, 4), (3, 4), (11, 3)])
def test_prompts_sharing_a_prefix_reuse_exactly_the_shared_full_blocks(model, shared, block_size):
    head, tail_a, tail_b = random_prompts([shared, 7, 7], seed=shared)
    tail_b[0] = (tail_a[0] + 1) % VOCAB  # the prompts part at the first token after the shared prefix
    llm = LLM(model, block_size=block_size)
    run(llm, [head + tail_a], greedy(4))
    out = run(llm, [head + tail_b], greedy(6))[0]
    assert out.num_cached_tokens == shared // block_size * block_size
    assert out.token_ids == reference(model, head + tail_b, 6)


def test_same_tokens_after_a_different_prefix_are_not_a_hit(model):
    """A block's keys depend on everything before it: its name chains over its prefix, so a prompt that
    starts with another prompt's second block finds nothing."""
    first_block, second_block, tail = random_prompts([4, 4, 5], seed=29)
    llm = LLM(model, block_size=4)
    run(llm, [first_block + second_block + tail], greedy(3))
    out = run(llm, [second_block + tail], greedy(8))[0]
    assert out.num_cached_tokens == 0
    assert out.token_ids == reference(model, second_block + tail, 8)


def test_disabled_prefix_caching_caches_nothing(model):
    prompts = random_prompts([13, 9], seed=9)
    llm = LLM(model, block_size=4, enable_prefix_caching=False)
    run(llm, prompts, greedy(5))
    again = run(llm, prompts, greedy(5))
    assert [o.num_cached_tokens for o in again] == [0, 0]
    assert not llm.block_manager.cached and llm.block_manager.num_hits == 0
    assert [o.token_ids for o in again] == [reference(model, p, 5) for p in prompts]


def test_evicted_prefix_is_recomputed_correctly(model):
    """Cached blocks are reused memory: once a cache this small has recycled them for other prompts,
    a repeat of the first prompt must not find stale keys under its old hashes."""
    first, *others = random_prompts([16, 16, 16, 16, 16], seed=10)
    block_size, budget = 4, 32
    num_blocks = math.ceil((CTX + budget) / block_size)  # the floor: one full context plus one step
    llm = LLM(model, block_size=block_size, max_num_batched_tokens=budget, num_blocks=num_blocks)
    run(llm, [first], greedy(20))
    for p in others:  # one at a time: no preemption, only eviction of unused cached blocks
        run(llm, [p], greedy(20))
    out = run(llm, [first], greedy(20))[0]
    assert out.num_cached_tokens < cached_floor(16, block_size)  # its blocks were evicted, at least in part
    assert out.token_ids == reference(model, first, 20)
    assert llm.num_free_blocks == num_blocks


# ----------------------------------------------------------------------------- preemption and abort

def test_preemption_recomputes_identically_and_leaks_no_block(model):
    # Sixteen sequences growing to ~60 tokens need ~240 blocks of 4; the pool is the floor (one full
    # context plus one step's budget: 144) plus one, so the scheduler must preempt and recompute.
    # Prefix caching off here; the tests below preempt with it on.
    block_size, budget = 4, 512
    num_blocks = math.ceil((CTX + budget) / block_size) + 1
    prompts = random_prompts([random.Random(i).randrange(10, 21) for i in range(16)], seed=11)
    llm = LLM(model, block_size=block_size, num_blocks=num_blocks, max_num_batched_tokens=budget,
              enable_prefix_caching=False)
    outs = run(llm, prompts, greedy(44))
    assert llm.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == [reference(model, p, 44) for p in prompts]
    assert llm.num_free_blocks == llm.block_manager.num_blocks
    assert all(c == 0 for c in llm.block_manager.ref_count)


@pytest.mark.parametrize("budget, lengths, seed, max_tokens", [
    (512, [random.Random(i).randrange(10, 21) for i in range(16)], 11, 44),  # whole-prompt recomputes
    (16, [3, 13, 8, 11, 5, 12, 9, 4, 10, 7], 12, 40),  # recomputes in small chunks, pool at its floor (+1)
])
def test_preemption_with_prefix_caching_recomputes_identically(model, budget, lengths, seed, max_tokens):
    block_size = 4
    num_blocks = math.ceil((CTX + budget) / block_size) + 1
    prompts = random_prompts(lengths, seed=seed)
    llm = LLM(model, block_size=block_size, num_blocks=num_blocks, max_num_batched_tokens=budget)
    outs = run(llm, prompts, greedy(max_tokens))
    assert llm.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == [reference(model, p, max_tokens) for p in prompts]
    assert llm.num_free_blocks == llm.block_manager.num_blocks


def test_abort_frees_every_block_and_the_others_finish_identically(model):
    prompts = random_prompts([9, 14, 6, 11], seed=13)
    llm = LLM(model, block_size=4, max_num_seqs=3)  # the fourth request waits for a seat
    start = llm.num_free_blocks
    ids = [llm.add_request(p, greedy(25)) for p in prompts]
    early = {rid: [] for rid in ids}
    for _ in range(6):
        for out in llm.step():
            early[out.request_id] += out.token_ids
    victim = next(s for s in llm.scheduler.running if s.request_id == ids[1])
    held = len(victim.block_table)
    assert held >= 4 and victim.num_output_tokens > 0  # mid-generation
    free_before = llm.num_free_blocks
    llm.abort(ids[1])
    assert llm.num_free_blocks == free_before + held  # its blocks (shared with no one) are free at once
    llm.abort(ids[3])  # still waiting: it holds nothing, and leaves the queue
    assert llm.num_free_blocks == free_before + held and len(llm.scheduler.waiting) == 0
    done = drive(llm)
    assert set(done) == {(ids[0], 0), (ids[2], 0)}  # nothing more is reported for the aborted ones
    for i in (0, 2):
        assert early[ids[i]] + done[(ids[i], 0)].token_ids == reference(model, prompts[i], 25)
    assert llm.num_free_blocks == start


# ----------------------------------------------------------------------------- sampling

def test_seeded_sampling_is_independent_of_the_batch(model):
    prompt, *others = random_prompts([7, 12, 4, 9], seed=14)
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=123)
    alone = run(LLM(model), [prompt], params)[0].token_ids
    mixed = [SamplingParams(max_tokens=20, temperature=0.7, seed=5), greedy(20),
             SamplingParams(max_tokens=15, temperature=1.3, top_p=0.9)]  # one without a seed
    # Under budget 8 the others go in chunks and in different company from the run alone.
    outs = run(LLM(model, max_num_batched_tokens=8), [others[1], prompt, others[0], others[2], prompt],
               [mixed[1], params, mixed[0], mixed[2], params])
    assert outs[1].token_ids == outs[4].token_ids == alone
    other_seed = run(LLM(model), [prompt], SamplingParams(max_tokens=20, temperature=1.0, seed=124))[0]
    assert other_seed.token_ids != alone


def test_n_gives_independent_reproducible_completions(model):
    prompt = random_prompts([6], seed=15)[0]
    params = SamplingParams(max_tokens=12, temperature=1.0, n=3, seed=9)
    first = LLM(model).generate([prompt], params)[0]
    again = LLM(model).generate([prompt], params)[0]
    assert len(first) == 3 and all(len(c.token_ids) == 12 for c in first)
    assert len({tuple(c.token_ids) for c in first}) == 3
    assert [c.token_ids for c in again] == [c.token_ids for c in first]


def test_top_k_1_is_greedy(model):
    prompts = random_prompts([5, 13], seed=16)
    outs = run(LLM(model), prompts, SamplingParams(max_tokens=15, temperature=1.5, top_k=1))
    assert [o.token_ids for o in outs] == [reference(model, p, 15) for p in prompts]


@pytest.mark.parametrize("temperature", [0.7, 1.5])
def test_first_token_frequencies_match_softmax(temperature):
    small = llama(vocab_size=8, seed=17)
    prompt = [1, 2, 3]
    n = 3000
    params = [SamplingParams(max_tokens=1, temperature=temperature, seed=s) for s in range(n)]
    outs = run(LLM(small, max_num_seqs=256), [prompt] * n, params)
    counts = torch.bincount(torch.tensor([o.token_ids[0] for o in outs]), minlength=8).double()
    expected = n * (full_logits(small, prompt)[-1].double() / temperature).softmax(-1)
    assert expected.min() > 5  # every cell big enough for the chi-square approximation
    chi_square = ((counts - expected) ** 2 / expected).sum().item()
    assert chi_square < 24.32  # the 0.1% critical value for 7 degrees of freedom


def allowed_tokens(logits: torch.Tensor, top_p: float = 1.0, min_p: float = 0.0) -> set[int]:
    """The tokens top-p / min-p may keep, by their definitions, from one row of logits (T = 1). Bounds
    are widened by 1e-4 so a token on the edge in fp32 rounding is not held against the engine."""
    probs = logits.double().softmax(-1)
    order = probs.argsort(descending=True)
    mass_before = probs[order].cumsum(0) - probs[order]
    keep = set(order[mass_before < top_p + 1e-4].tolist())
    return keep & set((probs >= min_p * probs.max() - 1e-4).nonzero()[:, 0].tolist())


@pytest.mark.parametrize("cut", [dict(top_p=0.5), dict(min_p=0.2), dict(top_p=0.8, min_p=0.1)])
def test_top_p_and_min_p_never_pick_outside_the_allowed_set(model, cut):
    prompt = random_prompts([6], seed=18)[0]
    outs = run(LLM(model), [prompt] * 20, [SamplingParams(max_tokens=8, seed=s, **cut) for s in range(20)])
    num_choices = 0
    for out in outs:
        ids = prompt + out.token_ids
        logits = full_logits(model, ids)
        for j, token in enumerate(out.token_ids):
            allowed = allowed_tokens(logits[len(prompt) + j - 1], **cut)
            assert token in allowed
            assert len(allowed) < VOCAB // 2  # the cut really cut
            num_choices += len(allowed) > 1
    assert num_choices > 20  # and the draws were not all forced
    assert len({tuple(o.token_ids) for o in outs}) > 5


def test_penalties_change_logits_exactly_as_defined():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 3.0, 0.0],
                           [2.0, -1.0, 0.5, -0.5, 3.0, 0.0],
                           [2.0, -1.0, 0.5, -0.5, 3.0, 0.0]])
    before = logits.clone()

    def seq(prompt, output, **params):
        s = Sequence(prompt, SamplingParams(**params))
        s.token_ids += output
        return s

    seqs = [seq([0, 1, 9], [1, 2, 2], repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
            seq([0, 1], [1, 2, 2]),  # no penalties: untouched
            seq([4], [], presence_penalty=1.0, frequency_penalty=1.0)]  # no output yet: nothing to count
    out = apply_penalties(logits, seqs)
    # Row 0: seen (prompt + output) {0, 1, 2}; id 9 is past this row's vocabulary and ignored.
    # Repetition (CTRL): positive logits divided by 2, negative ones multiplied by 2:
    #   [1.0, -2.0, 0.25, -0.5, 3.0, 0.0]
    # then over the output only (OpenAI): minus 0.25 * count minus 0.5 if present:
    #   id 1 (count 1): -2.0 - 0.25 - 0.5 = -2.75; id 2 (count 2): 0.25 - 0.5 - 0.5 = -0.75
    assert out[0].tolist() == [1.0, -2.75, -0.75, -0.5, 3.0, 0.0]
    assert out[1].tolist() == before[1].tolist()
    assert out[2].tolist() == before[2].tolist()
    assert torch.equal(logits, before)  # the caller's logits are left alone


def test_greedy_with_penalties_follows_the_definition_step_by_step(model):
    prompt = random_prompts([8], seed=19)[0]
    params = greedy(15, repetition_penalty=1.8, presence_penalty=0.7, frequency_penalty=0.4)
    out = run(LLM(model), [prompt], params)[0].token_ids
    ids, expected = list(prompt), []
    for _ in range(15):
        logits = full_logits(model, ids)[-1].double()
        for t in set(ids):
            logits[t] = logits[t] / 1.8 if logits[t] > 0 else logits[t] * 1.8
        for t in set(expected):
            logits[t] -= 0.4 * expected.count(t) + 0.7
        expected.append(logits.argmax().item())
        ids.append(expected[-1])
    assert out == expected
    assert out != reference(model, prompt, 15)  # the penalties changed something


# ----------------------------------------------------------------------------- log-probabilities

@pytest.mark.parametrize("k", [0, 3])
def test_logprobs_are_the_models_log_softmax(model, k):
    prompt = random_prompts([9], seed=20)[0]
    ks = [k, 5 - k]  # different k in one batch: each gets its own
    prompts = [prompt, prompt[:3]]
    outs = run(LLM(model, max_num_batched_tokens=8), prompts,
               [SamplingParams(max_tokens=10, temperature=1.0, seed=1, logprobs=ks[0]), greedy(10, logprobs=ks[1])])
    for p, out, k in zip(prompts, outs, ks):
        reference_lp = full_logits(model, p + out.token_ids).log_softmax(-1)
        assert len(out.logprobs) == len(out.token_ids) == 10
        for j, (token, (lp, top)) in enumerate(zip(out.token_ids, out.logprobs)):
            row = reference_lp[len(p) + j - 1]
            assert lp == pytest.approx(row[token].item(), abs=1e-4)
            assert len(top) == k
            assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
            values, top_ids = row.topk(k)
            assert [i for i, _ in top] == top_ids.tolist()
            assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-4)


@pytest.mark.parametrize("budget", [512, 8])  # in one piece, and in chunks of 8
def test_prompt_logprobs_score_the_prompt(model, budget):
    prompt = random_prompts([21], seed=21)[0]
    llm = LLM(model, block_size=4, max_num_batched_tokens=budget)
    score = SamplingParams(max_tokens=0, prompt_logprobs=2)
    for _ in range(2):  # the second time the prompt's blocks are cached, and must not be skipped
        out, other = run(llm, [prompt, prompt[:5]], [score, greedy(12)])
        assert (out.token_ids, out.finish_reason) == ([], "length")
        assert other.token_ids == reference(model, prompt[:5], 12)
        reference_lp = full_logits(model, prompt).log_softmax(-1)
        assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
        for p in range(1, len(prompt)):
            lp, top = out.prompt_logprobs[p]
            assert lp == pytest.approx(reference_lp[p - 1, prompt[p]].item(), abs=1e-4)
            assert [i for i, _ in top] == reference_lp[p - 1].topk(2).indices.tolist()


# ----------------------------------------------------------------------------- stops and lengths

def test_stop_token_ends_the_output_without_it(model):
    prompt = random_prompts([7], seed=22)[0]
    free = reference(model, prompt, 30)
    stop = free[10]
    cut = free.index(stop)
    out = run(LLM(model), [prompt], greedy(30, stop_token_ids=[stop]))[0]
    assert (out.token_ids, out.finish_reason) == (free[:cut], "stop")


def test_max_tokens_and_the_context_give_length(model):
    short, long = random_prompts([5, CTX - 4], seed=23)
    outs = run(LLM(model), [short, long], greedy(50))
    assert [len(o.token_ids) for o in outs] == [50, 4]  # the long one fills the context
    assert [o.finish_reason for o in outs] == ["length", "length"]
    assert [o.token_ids for o in outs] == [reference(model, short, 50), reference(model, long, 50)]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    text = ("The quick brown fox jumps over the lazy dog. def fib(n): return n if n < 2 else fib(n - 1) "
            "+ fib(n - 2)\n") * 20
    return Tokenizer.train([text, text.upper()], vocab_size=300)


def test_stop_string_cuts_the_text_before_it(tokenizer):
    model = llama(vocab_size=tokenizer.vocab_size, seed=24)
    llm = LLM(model, tokenizer)
    prompt = tokenizer.encode("def fib(n):")
    shown = dict(ignore_eos=True, skip_special_tokens=False)  # this random model writes chat markers too
    free = llm.generate([prompt], greedy(40, **shown))[0][0]
    assert free.finish_reason == "length"
    assert free.text == tokenizer.decode(free.token_ids)  # streamed pieces add up to the whole text
    # A stop string from the middle of that text: two printable characters.
    start = next(i for i in range(len(free.text) // 3, len(free.text) - 2)
                 if free.text[i:i + 2].isprintable() and "\ufffd" not in free.text[i:i + 2])
    stop = free.text[start:start + 2]
    out = llm.generate([prompt], greedy(40, stop=[stop], **shown))[0][0]
    assert out.finish_reason == "stop"
    assert out.text == free.text[:free.text.find(stop)]
    assert free.token_ids[:len(out.token_ids)] == out.token_ids


def test_eos_ends_the_output_unless_ignore_eos(tokenizer):
    model = llama(vocab_size=tokenizer.vocab_size, seed=25)
    prompt = tokenizer.encode("def fib(n):")
    free = reference(model, prompt, 20)
    with torch.no_grad():  # make <|eos|> the favourite wherever free[8] was: 1.5 times its (positive) logit
        model.lm_head.weight[tokenizer.eos_id] = 1.5 * model.lm_head.weight[free[8]]
    specials = {tokenizer.eos_id, tokenizer.bos_id}
    llm = LLM(model, tokenizer)
    stopped = llm.generate([prompt], greedy(20))[0][0]
    kept = llm.generate([prompt], greedy(20, ignore_eos=True))[0][0]
    assert stopped.finish_reason == "stop" and len(stopped.token_ids) <= 8
    assert stopped.token_ids == reference(model, prompt, 20, stop_ids=specials)
    assert kept.token_ids == reference(model, prompt, 20) and tokenizer.eos_id in kept.token_ids


def test_special_tokens_count_but_add_no_text_unless_asked(tokenizer):
    model = llama(vocab_size=tokenizer.vocab_size, seed=25)
    prompt = tokenizer.encode("def fib(n):")
    free = reference(model, prompt, 20)
    marker = tokenizer.special_token_id("<|user_start|>")
    with torch.no_grad():  # make a chat marker the favourite wherever free[5] was
        model.lm_head.weight[marker] = 1.5 * model.lm_head.weight[free[5]]
    llm = LLM(model, tokenizer)
    skipped = llm.generate([prompt], greedy(20, ignore_eos=True))[0][0]
    shown = llm.generate([prompt], greedy(20, ignore_eos=True, skip_special_tokens=False))[0][0]
    assert skipped.token_ids == shown.token_ids and marker in shown.token_ids  # the same tokens, counted alike
    assert "<|user_start|>" in shown.text and shown.text == tokenizer.decode(shown.token_ids)
    assert "<|" not in skipped.text
    assert skipped.text == tokenizer.decode([t for t in skipped.token_ids if t not in tokenizer.special_ids.values()])


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("prompt, match", [([], "empty"), (list(range(CTX)), "context"),
                                           ([1, VOCAB], "vocabulary"), ([-1, 2], "vocabulary")])
def test_bad_prompts_raise(model, prompt, match):
    llm = LLM(model)
    with pytest.raises(LmforgeError, match=match):
        llm.add_request(prompt, greedy(4))
    assert not llm.has_unfinished()


@pytest.mark.parametrize("field, value", [
    ("temperature", -1.0), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5), ("top_k", 0),
    ("min_p", 1.5), ("n", 0), ("max_tokens", -1), ("repetition_penalty", 0.0), ("presence_penalty", 3.0),
    ("frequency_penalty", -2.5), ("logprobs", 21), ("prompt_logprobs", -1), ("stop_token_ids", [VOCAB]),
    ("stop", [""]),
])
def test_bad_sampling_params_raise_naming_the_field(model, field, value):
    llm = LLM(model)
    with pytest.raises(LmforgeError, match=f"^{field}="):
        llm.add_request([1, 2, 3], SamplingParams(**{field: value}))
    assert not llm.has_unfinished()


def test_stop_strings_without_a_tokenizer_and_reused_ids_raise(model):
    llm = LLM(model)
    with pytest.raises(LmforgeError, match="tokenizer"):
        llm.add_request([1, 2], SamplingParams(stop=["x"]))
    llm.add_request([1, 2], greedy(2), request_id="a")
    with pytest.raises(LmforgeError, match="'a'"):
        llm.add_request([3, 4], greedy(2), request_id="a")


def test_more_logprobs_than_the_vocabulary_raise_naming_the_field():
    llm = LLM(llama(vocab_size=8))
    with pytest.raises(LmforgeError, match="^logprobs="):
        llm.add_request([1, 2], greedy(2, logprobs=10))
        drive(llm)


def test_a_pool_too_small_for_one_context_is_refused(model):
    with pytest.raises(LmforgeError, match="num_blocks"):
        llm = LLM(model, block_size=4, num_blocks=2)
        llm.add_request(list(range(10)), greedy(3))
        drive(llm, max_steps=50)


# ----------------------------------------------------------------------------- async engine

async def collect(stream) -> list[int]:
    tokens = []
    async for out in stream:
        tokens += out.token_ids
    return tokens


async def settle(engine: AsyncEngine, seconds: float = 10.0) -> None:
    """Wait until nothing is pending or running (aborts from closed streams land a moment later)."""
    for _ in range(int(seconds / 0.01)):
        if not engine.num_pending and not engine.llm.has_unfinished():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the engine did not settle")


def test_async_stream_equals_llm_generate(model):
    prompts = random_prompts([6, 15], seed=25)
    params = [greedy(12), SamplingParams(max_tokens=12, temperature=1.0, seed=3)]
    expected = [o[0].token_ids for o in LLM(model).generate(prompts, params)]

    async def main():
        engine = AsyncEngine(LLM(model))
        try:
            return await asyncio.gather(*(collect(engine.generate(p, sp)) for p, sp in zip(prompts, params)))
        finally:
            await engine.shutdown(drain_seconds=1)

    assert asyncio.run(main()) == expected


def test_async_cancelled_streams_free_their_blocks(model):
    prompts = random_prompts([random.Random(i).randrange(3, 20) for i in range(16)], seed=26)
    expected = [reference(model, p, 30) for p in prompts[:8]]
    dropped = [f"drop-{i}" for i in range(8)]

    async def consume(stream, started: asyncio.Event, leave_after: int | None = None):
        async for out in stream:
            started.set()
            if leave_after is not None and out.num_output_tokens >= leave_after:
                break  # the client went away: the stream is dropped, not drained

    async def main():
        llm = LLM(model, block_size=4, max_num_batched_tokens=64)
        ended = set()  # requests the engine itself ran to their end

        def step():  # the worker thread calls llm.step: note who finishes there
            outputs = LLM.step(llm)
            ended.update(o.request_id for o in outputs if o.finished)
            return outputs

        llm.step = step
        engine = AsyncEngine(llm)
        start = llm.num_free_blocks
        try:
            finishers = [asyncio.create_task(collect(engine.generate(p, greedy(30)))) for p in prompts[:8]]
            # The dropped ones would run to the context: long after the finishers, unless aborted.
            started = [asyncio.Event() for _ in range(8)]
            leavers = [asyncio.create_task(consume(engine.generate(p, greedy(CTX), request_id=rid), event, 3))
                       for p, rid, event in zip(prompts[8:12], dropped[:4], started[:4])]
            cancelled = [asyncio.create_task(consume(engine.generate(p, greedy(CTX), request_id=rid), event))
                         for p, rid, event in zip(prompts[12:], dropped[4:], started[4:])]
            for event in started:
                await event.wait()
            for task in cancelled:  # mid-stream: each has had at least one output
                task.cancel()
            results = await asyncio.gather(*finishers)
            await asyncio.gather(*leavers)
            outcomes = await asyncio.gather(*cancelled, return_exceptions=True)
            await settle(engine)
            return results, outcomes, ended, start, llm.num_free_blocks, engine.error
        finally:
            await engine.shutdown(drain_seconds=1)

    results, outcomes, ended, start, end, error = asyncio.run(main())
    assert results == expected
    assert all(isinstance(o, asyncio.CancelledError) for o in outcomes)
    assert not ended & set(dropped)  # every dropped stream was aborted, not left to run on
    assert error is None and end == start


def test_async_admission_is_bounded(model):
    async def main():
        engine = AsyncEngine(LLM(model), max_pending=2)
        try:
            held = [engine.generate([1, 2, 3], greedy(1)) for _ in range(2)]
            for stream in held:
                await stream.__anext__()  # in flight until the caller closes it
            assert engine.num_pending == 2
            with pytest.raises(Overloaded, match="limit is 2"):
                await engine.generate([4, 5], greedy(1)).__anext__()
            for stream in held:
                await stream.aclose()
            assert engine.num_pending == 0
            return await collect(engine.generate([4, 5], greedy(3)))
        finally:
            await engine.shutdown(drain_seconds=1)

    assert asyncio.run(main()) == reference(model, [4, 5], 3)


def test_router_prefers_the_prefix_holder_unless_it_is_much_busier(model):
    block_size = 4
    prefix, p_tail, q = random_prompts([8, 3, 10], seed=27)

    async def hold(worker: AsyncEngine):
        stream = worker.generate([1, 2], greedy(1))
        await stream.__anext__()  # one request in flight on this worker until closed
        return stream

    async def main():
        w0, w1 = (AsyncEngine(LLM(model, block_size=block_size), name=f"w{i}") for i in range(2))
        router = Router([w0, w1], affinity_slack=1)
        try:
            busy = await hold(w0)
            assert router.pick(prefix + p_tail) is w1  # nobody holds it: the least loaded
            await busy.aclose()
            first = await collect(router.generate(prefix + p_tail, greedy(4)))  # runs on w1, fills its cache
            busy = [await hold(w1)]
            assert router.pick(prefix + [5, 6]) is w1  # same first block: w1, though w0 is idle
            assert router.pick(q) is w0  # another prefix: the least loaded
            assert router.pick(prefix[:block_size]) is w0  # no full block before the end: least loaded
            hits = []
            async for out in router.generate(prefix + p_tail, greedy(4)):
                hits.append(out.num_cached_tokens)
            busy.append(await hold(w1))
            busy.append(await hold(w1))
            assert router.pick(prefix + p_tail) is w0  # 3 > 0 + slack: the holder is too busy
            for stream in busy:
                await stream.aclose()
            return first, hits
        finally:
            await router.shutdown(drain_seconds=1)

    first, hits = asyncio.run(main())
    assert first == reference(model, prefix + p_tail, 4)
    assert hits[0] == cached_floor(len(prefix + p_tail), block_size)  # routed to the cache that held it


# ----------------------------------------------------------------------------- a worker in its own process

@pytest.fixture(scope="module")
def worker(model):
    engine = ProcessEngine(functools.partial(LLM, model, block_size=4, max_num_batched_tokens=64), name="proc")
    yield engine
    asyncio.run(engine.shutdown(drain_seconds=1))


async def settle_process(engine: ProcessEngine, free_blocks: int, seconds: float = 10.0) -> None:
    """Wait until nothing is pending and the worker reports free_blocks free (it reports on going idle)."""
    for _ in range(int(seconds / 0.01)):
        stats = engine.stats()
        if not engine.num_pending and not stats["running"] and stats["free_blocks"] == free_blocks:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the worker did not settle: {engine.stats()}")


def test_process_worker_streams_equal_llm_generate(model, worker):
    prompts = random_prompts([6, 15, 9], seed=28)
    params = [greedy(12), SamplingParams(max_tokens=12, temperature=1.0, seed=3),
              SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, n=2, seed=11)]
    llm = LLM(model, block_size=4)
    expected = [[c.token_ids for c in o] for o in llm.generate(prompts, params)]
    expected_embedding = llm.runner.embed(prompts[1]).tolist()

    async def run(p, sp):
        per_index = [[] for _ in range(sp.n)]
        async for out in worker.generate(p, sp):
            per_index[out.index] += out.token_ids
        return per_index

    async def main():
        streams = await asyncio.gather(*(run(p, sp) for p, sp in zip(prompts, params)))
        return streams, await worker.embed(prompts[1])

    streams, embedding = asyncio.run(main())
    assert streams == expected
    assert embedding == pytest.approx(expected_embedding, abs=1e-6)


def test_process_worker_frees_the_blocks_of_callers_that_leave():
    model = llama(context=1024)
    prompts = random_prompts([5, 11, 7, 13], seed=29)

    async def leave_after(prompt, n):
        stream = worker.generate(prompt, greedy(1000))  # would run ~1,000 steps
        async for out in stream:
            if out.num_output_tokens >= n:
                break
        await stream.aclose()  # as the server does for a client that hung up

    async def main():
        start = worker.stats()
        kept = asyncio.create_task(collect(worker.generate(prompts[0], greedy(10))))
        await asyncio.gather(*(leave_after(p, 2 + i) for i, p in enumerate(prompts[1:])))
        result = await kept
        await settle_process(worker, start["free_blocks"])
        return result, worker.stats()["generated_tokens"] - start["generated_tokens"]

    worker = ProcessEngine(functools.partial(LLM, model, block_size=4, max_num_batched_tokens=64))
    try:
        result, generated = asyncio.run(main())
    finally:
        asyncio.run(worker.shutdown(drain_seconds=1))
    assert result == reference(model, prompts[0], 10)
    # Unaborted, the three leavers would make ~3,000 tokens. Aborted after 2, 3 and 4, they make a few
    # more each: the worker does not wait for its reader, so how many depends on the event loop's lag.
    assert generated < 10 + 3 * 300


def test_process_worker_and_a_stalled_reader_do_not_wait_on_each_other():
    """The event loop stalls while 50 streams decode, so the worker fills the pipe and blocks writing;
    then 200 long prompts arrive at once. Were the loop to write them itself, it would block on the
    other pipe and neither side would read again."""
    import threading
    import time

    worker = ProcessEngine(functools.partial(LLM, llama(context=1024), max_num_seqs=256,
                                             max_num_batched_tokens=2048), max_pending=1000)
    watchdog = threading.Timer(60, worker._process.kill)  # a deadlock becomes a failure, not a hang
    long_prompts = random_prompts([900] * 200, seed=31)

    async def main():
        decoding = [asyncio.create_task(collect(worker.generate([1, 2, 3], greedy(600, logprobs=20))))
                    for _ in range(50)]
        await asyncio.sleep(0.5)
        time.sleep(0.5)  # a stall: nothing reads the worker's outputs meanwhile
        burst = [asyncio.create_task(collect(worker.generate(p, greedy(1)))) for p in long_prompts]
        return await asyncio.gather(*decoding, *burst)

    watchdog.start()
    try:
        results = asyncio.run(main())
    finally:
        watchdog.cancel()
        asyncio.run(worker.shutdown(drain_seconds=1))
    assert [len(r) for r in results] == [600] * 50 + [1] * 200


def test_a_worker_process_that_dies_is_started_again_when_asked(model):
    engine = ProcessEngine(functools.partial(LLM, model), restart=True)

    async def restarted(n: int) -> None:
        for _ in range(300):
            if engine.num_restarts == n and engine.alive:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"no restart {n}")

    async def main():
        engine.attach()  # what a server does at start-up: a death is seen with no request in flight
        engine._process.kill()
        await restarted(1)
        stream = engine.generate([1, 2, 3], greedy(CTX - 3))
        await stream.__anext__()
        engine._process.kill()
        with pytest.raises(EngineError, match="engine process exited"):
            await collect(stream)  # what was in flight is lost; its caller is told
        await restarted(2)
        tokens = await collect(engine.generate([4, 5], greedy(6)))
        await engine.shutdown(drain_seconds=1)
        return tokens

    assert asyncio.run(main()) == reference(model, [4, 5], 6)
    assert engine.num_restarts == 2 and not engine._process.is_alive()


def test_process_worker_outlives_ctrl_c_so_the_server_can_drain(model, worker):
    import os
    import signal

    os.kill(worker._process.pid, signal.SIGINT)  # what Ctrl-C sends the whole process group
    assert asyncio.run(collect(worker.generate([4, 5], greedy(6)))) == reference(model, [4, 5], 6)


def test_process_worker_refuses_bad_requests_in_the_caller(worker):
    async def main():
        with pytest.raises(LmforgeError, match="context is 64"):
            await collect(worker.generate(list(range(CTX)), greedy(1)))
        with pytest.raises(LmforgeError, match="temperature"):
            await collect(worker.generate([1, 2], SamplingParams(temperature=-1)))
        with pytest.raises(LmforgeError, match="stop strings need"):
            await collect(worker.generate([1, 2], SamplingParams(stop=["x"])))
        return await collect(worker.generate([1, 2], greedy(2)))  # the worker carries on

    assert len(asyncio.run(main())) == 2


def test_a_dead_or_unloadable_worker_is_an_engine_error(model, tmp_path):
    with pytest.raises(EngineError, match="could not load its model"):
        ProcessEngine(functools.partial(LLM.from_folder, tmp_path / "missing", device="cpu"))
    engine = ProcessEngine(functools.partial(LLM, model))

    live = AsyncEngine(LLM(model))

    async def main():
        stream = engine.generate([1, 2, 3], greedy(CTX - 3))
        await stream.__anext__()
        engine._process.kill()  # out of memory, say
        with pytest.raises(EngineError, match="engine process exited"):
            await collect(stream)
        with pytest.raises(EngineError, match="is gone"):
            await collect(engine.generate([1, 2], greedy(1)))
        assert not engine.alive and live.alive
        both = Router([engine, live])
        routed = [await collect(both.generate([1, 2, k], greedy(3))) for k in range(4)]  # all to the live one
        with pytest.raises(Overloaded, match="none of the 1 engine workers is running"):
            Router([engine]).pick([1, 2])
        await both.shutdown(drain_seconds=1)
        return routed

    routed = asyncio.run(main())
    assert routed == [reference(model, [1, 2, k], 3) for k in range(4)]


def test_a_lone_sequence_on_consecutive_blocks_is_read_in_place_and_decodes_alike(model):
    llm = LLM(model, block_size=4)
    prompt = random_prompts([9], seed=30)[0]
    first = llm.generate([prompt], greedy(20))[0][0].token_ids
    assert llm.runner.cache.decode_span is not None  # fresh blocks 0, 1, ...: no gather
    again = llm.generate([prompt], greedy(20))[0][0].token_ids  # the prompt's 2 full blocks come from
    assert llm.runner.cache.decode_span is None  # the cache, the rest from later blocks: gathered
    assert first == again == reference(model, prompt, 20)


# ----------------------------------------------------------------------------- merged projections

@pytest.mark.parametrize("overrides", [{}, {"num_key_value_heads": 2, "qkv_bias": True, "mlp_bias": True},
                                       {"qk_norm": True, "model_type": "qwen3"}])
def test_merged_projections_give_the_same_logits_and_tokens(overrides):
    config = ModelConfig(**{**dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, intermediate_size=64, max_position_embeddings=CTX),
                            **overrides})
    model = nudged(Transformer(config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.3)  # biases start at 0, which would hide a bias left out of the merge
    fused = fuse_projections(copy.deepcopy(model))
    ids = torch.tensor(random_prompts([20, 20], seed=32))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids), model(ids), atol=1e-5, rtol=1e-5)
    prompts = random_prompts([7, 12], seed=33)
    assert [o[0].token_ids for o in LLM(fused).generate(prompts, greedy(12))] == \
        [reference(model, p, 12) for p in prompts]
    attn = fused.model.layers[0].self_attn
    assert attn.q_proj.weight.data_ptr() == attn.qkv_weight.data_ptr()  # views into the merged weight


# ----------------------------------------------------------------------------- the CPU decode kernel

def kernel_or_skip():
    from lmforge.engine.cpu_decode import load_kernel

    if load_kernel() is None:
        pytest.skip("the C++ decode kernel did not build here (no compiler or ninja); the eager path serves")


def biased(model: Transformer) -> Transformer:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.3)  # biases start at 0, which would hide one the kernel leaves out
    return model


@pytest.mark.parametrize("overrides", [
    {},
    {"num_key_value_heads": 1},  # grouped-query attention: 4 query heads on one key/value head
    {"num_key_value_heads": 2, "sliding_window": 6},
    {"num_key_value_heads": 2, "qkv_bias": True, "o_proj_bias": True, "mlp_bias": True},
    {"qk_norm": True, "model_type": "qwen3", "head_dim": 16},  # QK-norm; heads wider than width / heads
    # head_dim 32 and 64: the kernel's attention compiled for those sizes (the others run a generic loop)
    {"hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1},
    {"hidden_size": 64, "num_attention_heads": 1, "num_key_value_heads": 1, "sliding_window": 6},
])
def test_cpu_kernel_decodes_as_the_eager_model(overrides):
    """A fused fp32 model on CPU runs every step with prompt chunks of at most KERNEL_MAX_CHUNK tokens
    through the C++ kernel. At every step of a mixed batch (block size 4, prompts chunked under budget 12,
    so steps hold decodes, first chunks and continuing chunks), the kernel's logits at every row and the
    keys/values it writes match the eager path's from the same cache; the greedy tokens match plain
    generation."""
    kernel_or_skip()
    config = ModelConfig(**{**dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, intermediate_size=64, max_position_embeddings=CTX),
                            **overrides})
    model = biased(nudged(Transformer(config), seed=7))
    llm = LLM(fuse_projections(copy.deepcopy(model)), block_size=4, max_num_batched_tokens=12)
    runner, cache = llm.runner, llm.runner.cache
    assert runner.decoder is not None
    kinds = set()  # what the steps held: "decode", "first chunk", "later chunk"

    def both(batch, logit_rows):
        rows = list(range(sum(n for _, n in batch)))
        before = cache.k.clone(), cache.v.clone()
        fast = runner._kernel(batch, rows)
        written = cache.k.clone(), cache.v.clone()
        cache.k.copy_(before[0]), cache.v.copy_(before[1])
        torch.testing.assert_close(fast, runner._eager(batch, rows), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(written, (cache.k, cache.v), atol=1e-4, rtol=1e-4)
        kinds.update("decode" if n == 1 and s.num_computed else "later chunk" if s.num_computed else "first chunk"
                     for s, n in batch)
        return fast[logit_rows]

    runner.run = both
    prompts = random_prompts(MIXED_LENGTHS, seed=8)
    outs = run(llm, prompts, greedy(30))
    assert [o.token_ids for o in outs] == [reference(model, p, 30) for p in prompts]
    assert kinds == {"decode", "first chunk", "later chunk"}


def test_cpu_kernel_shares_steps_with_long_prompt_chunks_and_log_probabilities(model, monkeypatch):
    """Prompt chunks longer than KERNEL_MAX_CHUNK (here 4; some scoring every prompt position) go through
    the eager model in the same step as the kernel's rows; log-probabilities and tokens match the eager
    engine's."""
    kernel_or_skip()
    monkeypatch.setattr(model_runner, "KERNEL_MAX_CHUNK", 4)
    prompts = random_prompts([5, 19, 8, 13, 3], seed=10)
    params = [greedy(12, logprobs=2), SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=2),
              greedy(12), SamplingParams(max_tokens=0, prompt_logprobs=1), greedy(12, logprobs=0)]
    fused = LLM(fuse_projections(copy.deepcopy(model)), block_size=4, max_num_batched_tokens=10)
    steps = []  # per step, the paths it took
    runner = fused.runner
    step_run, eager_run, kernel_run = runner.run, runner._eager, runner._kernel
    runner.run = lambda *a: steps.append(set()) or step_run(*a)
    runner._eager = lambda *a: steps[-1].add("eager") or eager_run(*a)
    runner._kernel = lambda *a: steps[-1].add("kernel") or kernel_run(*a)
    got, want = run(fused, prompts, params), run(LLM(model, block_size=4, max_num_batched_tokens=10), prompts, params)
    assert {"eager", "kernel"} in steps and {"kernel"} in steps
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        for lp_g, lp_w in zip(g.logprobs + (g.prompt_logprobs or [])[1:], w.logprobs + (w.prompt_logprobs or [])[1:]):
            assert lp_g[0] == pytest.approx(lp_w[0], abs=1e-4)
            assert [t for t, _ in lp_g[1]] == [t for t, _ in lp_w[1]]


def test_cpu_kernel_load_clears_a_stale_build_lock():
    """A first build killed midway leaves torch's lock file, on which the next load would wait for ever."""
    from torch.utils.cpp_extension import get_default_build_root

    from lmforge.engine import cpu_decode

    kernel_or_skip()  # built: the load below finds it and only has to get past the lock
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    lock = Path(root) / f"lmforge_cpu_decode_{cpu_decode._build_tag()}" / "lock"
    if lock.exists():
        pytest.skip("a build is in progress")
    lock.touch()
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    cpu_decode.load_kernel.cache_clear()
    try:
        assert cpu_decode.load_kernel() is not None
        assert not lock.exists()
    finally:
        lock.unlink(missing_ok=True)
        cpu_decode.load_kernel.cache_clear()


def test_cpu_kernel_is_only_for_models_the_engine_owns(model):
    """A model handed to LLM as it is (RL samples from the policy it is training) keeps the eager path,
    which reads the current weights at every step; the kernel holds the weights it was given."""
    kernel_or_skip()
    assert LLM(model).runner.decoder is None
    assert LLM(fuse_projections(copy.deepcopy(model))).runner.decoder is not None
    assert LLM(fuse_projections(copy.deepcopy(model)), dtype=torch.bfloat16).runner.decoder is None
    assert LLM(fuse_projections(gpt2())).runner.decoder is None
