"""One request's failure is that request's alone: in a step's model call, in its sampling, in a worker
process adding it; and embeddings share a worker with generation without starving it."""

import asyncio
import functools

import pytest
import torch
from test_engine import greedy, llama, random_prompts, reference

from lmforge.engine import LLM, SamplingParams
from lmforge.engine.async_engine import AsyncEngine, EngineError, Overloaded
from lmforge.engine.process_engine import ProcessEngine


@pytest.fixture(scope="module")
def model():
    return llama()


def _poison_runs(llm: LLM, poisoned_first_token: int) -> None:
    """The model raises on any batch holding the sequence whose prompt starts with this token."""
    real = llm.runner.run

    def run(batch, rows):
        if any(seq.token_ids[0] == poisoned_first_token for seq, _ in batch):
            raise RuntimeError("boom")
        return real(batch, rows)

    llm.runner.run = run


def _drive(llm: LLM) -> dict[str, list]:
    outs: dict[str, list] = {}
    for _ in range(500):
        if not llm.has_unfinished():
            break
        for out in llm.step():
            outs.setdefault(out.request_id, []).append(out)
    return outs


def test_a_request_that_breaks_the_model_fails_alone(model):
    prompts = random_prompts([5, 7, 9], seed=3)
    prompts[1][0] = 63  # the poisoned one
    for p in (prompts[0], prompts[2]):
        assert p[0] != 63
    llm = LLM(model, block_size=4)
    _poison_runs(llm, 63)
    ids = [llm.add_request(p, greedy(8, ignore_eos=True)) for p in prompts]
    outs = _drive(llm)
    bad = outs[ids[1]]
    assert bad[-1].finish_reason == "error" and "boom" in bad[-1].error
    for rid, p in ((ids[0], prompts[0]), (ids[2], prompts[2])):  # the batch mates: as if alone
        assert [t for o in outs[rid] for t in o.token_ids] == reference(model, p, 8)
        assert outs[rid][-1].finish_reason == "length"
    assert llm.num_free_blocks == llm.block_manager.num_blocks and not llm.request_ids  # nothing leaked
    later = llm.add_request(prompts[0], greedy(4, ignore_eos=True))  # the engine goes on
    assert [t for o in _drive(llm)[later] for t in o.token_ids] == reference(model, prompts[0], 4)


def test_a_request_whose_sampling_raises_fails_alone(model, monkeypatch):
    from lmforge.engine import llm as llm_module

    real = llm_module.sample

    def sample(logits, seqs):
        if any(s.params.top_k == 7 for s in seqs):  # the poisoned request's own setting
            raise RuntimeError("bad row")
        return real(logits, seqs)

    monkeypatch.setattr(llm_module, "sample", sample)
    llm = LLM(model, block_size=4)
    prompts = random_prompts([6, 6], seed=4)
    good = llm.add_request(prompts[0], greedy(6, ignore_eos=True))
    bad = llm.add_request(prompts[1], SamplingParams(max_tokens=6, top_k=7, ignore_eos=True))
    outs = _drive(llm)
    assert outs[bad][-1].finish_reason == "error"
    assert [t for o in outs[good] for t in o.token_ids] == reference(model, prompts[0], 6)


def test_llm_generate_names_the_failed_request(model):
    llm = LLM(model, block_size=4)
    _poison_runs(llm, 5)
    with pytest.raises(Exception, match="failed in the engine: RuntimeError: boom"):
        llm.generate([[5, 1, 2]], greedy(3))


class AddFails(LLM):
    """An engine whose add_request raises a non-LmforgeError for one prompt (as a torch call can)."""

    def add_request(self, prompt_ids, params, **kwargs):
        if prompt_ids[0] == 62:
            raise RuntimeError("Overflow when unpacking long")
        return super().add_request(prompt_ids, params, **kwargs)


def test_a_request_the_worker_cannot_add_fails_alone_and_the_worker_lives(model):
    engine = ProcessEngine(functools.partial(AddFails, model, block_size=4))

    async def go():
        with pytest.raises(EngineError, match="could not take this request"):
            async for _ in engine.generate([62, 1, 2], greedy(3)):
                pass
        outs = [o async for o in engine.generate([1, 2, 3], greedy(3, ignore_eos=True))]
        await engine.shutdown()
        return outs

    outs = asyncio.run(go())
    assert [t for o in outs for t in o.token_ids] == reference(model, [1, 2, 3], 3)
    assert engine.num_restarts == 0 and engine.error is None


def test_seed_outside_64_bits_is_refused_before_the_worker(model):
    engine = ProcessEngine(functools.partial(LLM, model, block_size=4))

    async def go():
        with pytest.raises(Exception, match="seed"):
            async for _ in engine.generate([1, 2, 3], SamplingParams(max_tokens=2, seed=2**64)):
                pass
        outs = [o async for o in engine.generate([1, 2, 3], SamplingParams(max_tokens=2, seed=-1))]
        await engine.shutdown()
        return outs

    assert len(asyncio.run(go())) >= 1
    assert engine.error is None


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_embeddings_wait_their_turn_beside_generation(model, kind):
    """32 embeddings queued before a generation: the generation ends before they all have. (The
    worker ran every embedding it had been sent before its next step, so generation waited for all.)"""
    make = functools.partial(LLM, model, block_size=4)
    engine = AsyncEngine(make()) if kind == "thread" else ProcessEngine(make)
    order = []

    async def embed(i):
        await engine.embed(list(range(1, 60)))
        order.append(f"e{i}")

    async def gen():
        async for _ in engine.generate([1, 2, 3], greedy(6, ignore_eos=True)):
            pass
        order.append("gen")

    async def go():
        tasks = [asyncio.create_task(embed(i)) for i in range(32)]
        await asyncio.sleep(0)  # the embeddings are sent first
        tasks.append(asyncio.create_task(gen()))
        await asyncio.gather(*tasks)
        await engine.shutdown()

    asyncio.run(go())
    assert order.index("gen") < 32


def test_embeddings_count_toward_max_pending(model):
    engine = AsyncEngine(LLM(model, block_size=4), max_pending=2)

    async def go():
        first = [asyncio.create_task(engine.embed([1, 2, 3])) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await engine.embed([1, 2, 3])
        vectors = await asyncio.gather(*first)
        await engine.shutdown()
        return vectors

    vectors = asyncio.run(go())
    assert len(vectors) == 2 and torch.tensor(vectors[0]).norm().item() == pytest.approx(1.0, abs=1e-4)
