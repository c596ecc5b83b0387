"""The OpenAI-compatible server, live: the official `openai` client, raw HTTP for what clients hide,
keys and limits, bad input, and a load test that checks the KV cache is whole afterwards."""

import asyncio
import concurrent.futures
import copy
import functools
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch
import uvicorn
from conftest import REDIS_URL

from lmforge.auth import KeyStore, MemoryRateLimiter, parse_key
from lmforge.engine import LLM, SamplingParams
from lmforge.engine.async_engine import AsyncEngine, Router
from lmforge.engine.fuse import fuse_projections
from lmforge.engine.process_engine import ProcessEngine
from lmforge.generate import generate
from lmforge.model import ModelConfig, Transformer
from lmforge.serve import Served, create_app
from lmforge.tokenizer import Tokenizer

CONTEXT = 256
ADMIN = "admin-" + "x" * 40


@pytest.fixture(scope="module")
def tokenizer():
    text = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\nThe quick brown fox. Ünïcödé ✓\n"
    return Tokenizer.train([text] * 50, vocab_size=300)


@pytest.fixture(scope="module")
def model(tokenizer):
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=CONTEXT)
    model = Transformer(config)
    model.init_weights(seed=0)
    generator = torch.Generator().manual_seed(1)  # the same model whichever tests ran before
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model.eval()


class LiveServer:
    def __init__(self, served: Served):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.served = served
        self.server = uvicorn.Server(uvicorn.Config(create_app(served), host="127.0.0.1", port=self.port,
                                                    log_level="info"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key: str | None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0)

    def post(self, path: str, body: bytes | dict, key: str | None = None) -> tuple[int, dict, dict]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"content-type": "application/json"}
        if key:
            headers["authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url + path, data=raw, headers=headers)
        try:
            with urllib.request.urlopen(request) as r:
                return r.status, dict(r.headers), json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), json.loads(e.read())

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def live(model, tokenizer, tmp_path_factory):
    keys = KeyStore(f"sqlite:///{tmp_path_factory.mktemp('db') / 'keys.db'}")
    # the worker in its own process with its projections merged, as `lmforge serve` runs it (on CPU its
    # steps then go through the C++ decode kernel, engine/cpu_decode.py)
    engine = Router([ProcessEngine(functools.partial(LLM, fuse_projections(copy.deepcopy(model)), tokenizer,
                                                     max_num_batched_tokens=64), max_pending=128)])
    server = LiveServer(Served(engine, tokenizer, "tiny", CONTEXT, keys, MemoryRateLimiter(), ADMIN))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def key(live):
    return live.served.keys.create_key("team-a")[0]


def greedy_text(model, tokenizer, prompt_ids, n):
    """The plain decode loop's text, special tokens left out as the server leaves them out."""
    ids = generate(model, prompt_ids, max_tokens=n, temperature=0, stop_ids={tokenizer.eos_id, tokenizer.bos_id})
    special = set(tokenizer.special_ids.values())
    return tokenizer.decode([i for i in ids if i not in special])


# ----------------------------------------------------------------------------- the openai client

def test_completions_match_plain_generation_and_report_usage(live, key, model, tokenizer):
    client = live.client(key)
    r = client.completions.create(model="tiny", prompt="def fib(", max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    ids = tokenizer.encode("def fib(")
    assert r.choices[0].text == greedy_text(model, tokenizer, ids, 12)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == len(ids) + 12


def test_completion_logprobs_and_echo_score_the_prompt(live, key, model, tokenizer):
    text = "def fib(n):\n    return n"
    ids = tokenizer.encode(text)
    r = live.client(key).completions.create(model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == text and len(lp.token_logprobs) == len(ids) and lp.token_logprobs[0] is None
    with torch.no_grad():
        expected = model(torch.tensor([ids]))[0].log_softmax(-1)  # (T, V)
    want = [expected[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    # top_logprobs maps token text to log-probability: tokens whose bytes decode alike share a key
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs[1:])


def test_chat_uses_the_template_and_logprobs(live, key, model, tokenizer):
    r = live.client(key).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    prompt = tokenizer.encode_with_special("<|bos|><|user_start|>hi<|user_end|><|assistant_start|>")
    assert r.usage.prompt_tokens == len(prompt)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    tokens = [t for t in generate(model, prompt, max_tokens=6, temperature=0)]
    assert len(choice.logprobs.content) == r.usage.completion_tokens <= len(tokens)
    assert all(len(c.top_logprobs) == 3 for c in choice.logprobs.content)


def test_streaming_chat_ends_with_usage_then_done(live, key):
    stream = live.client(key).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    # The wire format itself: server-sent events closed by [DONE]
    request = urllib.request.Request(live.url + "/v1/completions", data=json.dumps(
        {"model": "tiny", "prompt": "def", "max_tokens": 3, "stream": True}).encode(),
        headers={"content-type": "application/json", "authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request) as r:
        events = [line for line in r.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_embeddings_are_unit_vectors_per_input(live, key, model):
    r = live.client(key).embeddings.create(model="tiny", input=["def fib", "the quick brown fox"])
    vectors = torch.tensor([d.embedding for d in r.data])
    assert vectors.shape == (2, model.config.hidden_size)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(vectors[0], vectors[1]) and r.usage.prompt_tokens > 0


def test_models_tokenize_detokenize(live, key, tokenizer):
    assert [m.id for m in live.client(key).models.list()] == ["tiny"]
    status, _, body = live.post("/tokenize", {"prompt": "def fib"}, key)
    assert status == 200 and body["tokens"] == tokenizer.encode("def fib")
    status, _, body = live.post("/detokenize", {"tokens": body["tokens"]}, key)
    assert body == {"prompt": "def fib"}


# ----------------------------------------------------------------------------- keys and limits

def test_missing_and_invalid_keys_are_401(live):
    with pytest.raises(openai.AuthenticationError):
        live.client(None).models.list()
    with pytest.raises(openai.AuthenticationError):
        live.client("lmf-0000-notakey").models.list()
    status, _, body = live.post("/v1/completions", {"model": "tiny", "prompt": "x"})
    assert status == 401 and body["error"]["code"] == "missing_api_key"
    assert urllib.request.urlopen(live.url + "/health").status == 200  # the one public route


def test_key_without_the_model_is_403_and_unknown_model_404(live, key):
    other = live.served.keys.create_key("only-base", models=["base"])[0]
    with pytest.raises(openai.PermissionDeniedError):
        live.client(other).completions.create(model="tiny", prompt="x", max_tokens=1)
    with pytest.raises(openai.NotFoundError) as e:
        live.client(key).completions.create(model="gpt-4", prompt="x", max_tokens=1)
    assert e.value.body["code"] == "model_not_found"


def test_requests_per_minute_limit_is_429_with_retry_after(live):
    limited = live.served.keys.create_key("limited", rpm=2)[0]
    for _ in range(2):
        live.client(limited).completions.create(model="tiny", prompt="x", max_tokens=1)
    status, headers, body = live.post("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1}, limited)
    assert status == 429 and int(headers["retry-after"]) >= 1 and body["error"]["code"] == "rate_limit_exceeded"
    with pytest.raises(openai.RateLimitError):
        live.client(limited).completions.create(model="tiny", prompt="x", max_tokens=1)


def test_tokens_per_minute_hold_concurrent_requests_to_the_limit(live):
    """Each request holds its prompt plus max_tokens from admission until it ends, so requests
    arriving together cannot overshoot the key's tokens/minute (checked and counted only at the end,
    all six were let in)."""
    limited = live.served.keys.create_key("tpm-limited", tpm=100)[0]
    prompt = live.served.tokenizer.encode("def fib(")
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 30, "ignore_eos": True}  # may use len(prompt) + 30
    fit = 100 // (len(prompt) + 30)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: live.post("/v1/completions", body, limited), range(6)))
    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [200] * fit + [429] * (6 - fit)
    assert all(a[2]["usage"]["total_tokens"] == len(prompt) + 30 for a in answers if a[0] == 200)
    status, _, error = live.post("/v1/completions", {**body, "max_tokens": 200}, limited)
    assert status == 429 and "more than the key's limit of 100 tokens per minute" in error["error"]["message"]


def test_token_budget_holds_what_a_request_may_use(live):
    budget = live.served.keys.create_key("budget", token_budget=5)[0]
    key_id = parse_key(budget)[0]
    with pytest.raises(openai.RateLimitError) as e:  # its prompt plus 4 tokens may pass 5: refused before it runs
        live.client(budget).completions.create(model="tiny", prompt="def fib(n):", max_tokens=4)
    assert e.value.body["code"] == "insufficient_quota" and live.served.keys.tokens_used(key_id) == 0
    used = live.client(budget).completions.create(model="tiny", prompt="x", max_tokens=1).usage.total_tokens
    assert live.served.keys.tokens_used(key_id) == used


def test_token_budget_holds_under_concurrency(live):
    """16 requests at once, each of which may use 1 + 8 tokens, against a budget of 40: at most 4 run.
    Checking what was used before each request let all 16 through (144 tokens billed)."""
    budget = live.served.keys.create_key("budget-concurrent", token_budget=40)[0]
    client = live.client(budget)

    def one(_):
        try:
            return client.completions.create(model="tiny", prompt="x", max_tokens=8, temperature=0,
                                             extra_body={"ignore_eos": True}).usage.total_tokens
        except openai.RateLimitError as e:
            assert e.body["code"] == "insufficient_quota"
            return 0

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        used = list(pool.map(one, range(16)))
    assert 1 <= sum(u > 0 for u in used) <= 4
    assert live.served.keys.tokens_used(parse_key(budget)[0]) == sum(used) <= 40


def test_admin_routes_need_an_admin_key_and_manage_keys(live, key):
    status, _, _ = live.post("/v1/admin/keys", {"name": "nope"}, key)
    assert status == 403
    status, _, made = live.post("/v1/admin/keys", {"name": "made-by-api", "rpm": 10}, ADMIN)
    assert status == 200 and made["key"].startswith("lmf-")
    assert live.client(made["key"]).completions.create(model="tiny", prompt="x", max_tokens=1).usage.total_tokens
    request = urllib.request.Request(live.url + "/v1/admin/usage?by=key", headers={"authorization": f"Bearer {ADMIN}"})
    rows = json.loads(urllib.request.urlopen(request).read())["data"]
    assert any(r.get("name") == "made-by-api" or r.get("key_id") == made["id"] for r in rows)


def test_prefix_cache_is_shared_within_a_key_and_never_across_keys(live, key):
    prompt = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n" * 3
    first, again = (live.client(key).completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0)
                    for _ in range(2))
    other = live.served.keys.create_key("tenant-b")[0]
    theirs = live.client(other).completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens >= 16
    assert theirs.usage.prompt_tokens_details.cached_tokens == 0
    assert first.choices[0].text == again.choices[0].text == theirs.choices[0].text


def test_keys_never_reach_the_logs(live):
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    # The server's side: uvicorn's access and error logs (they do not propagate), the app, SQLAlchemy
    loggers = [logging.getLogger(n) for n in ("uvicorn.access", "uvicorn.error", "lmforge", "sqlalchemy")]
    handler = Keep(logging.DEBUG)
    for logger in loggers:
        logger.addHandler(handler)
    try:
        secret = live.served.keys.create_key("logged")[0]
        live.client(secret).completions.create(model="tiny", prompt="x", max_tokens=1)
        live.post("/v1/completions", {"model": "tiny", "prompt": "x"}, secret + "tampered")
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert any("/v1/completions" in line for line in seen)  # the access log did run
    assert not any(parse_key(secret)[1] in line for line in seen)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b'{"model": "tiny", "prompt": "\xff\xfe"}', None),  # invalid UTF-8
    ({"model": "tiny", "prompt": "x", "temperature": "hot"}, "temperature"),
    ({"model": "tiny", "prompt": "x", "frobnicate": 1}, "frobnicate"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 10_000}, "max_tokens"),
    ({"model": "tiny", "prompt": ""}, "prompt"),
    ({"model": "tiny", "prompt": [99999]}, "prompt"),
    ({"model": "tiny", "prompt": "x", "n": 0}, "n"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x"}, "model"),
])
def test_bad_completion_requests_are_400_in_openai_shape(live, key, body, param):
    status, _, answer = live.post("/v1/completions", body, key)
    assert status == 400, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["message"]
    assert answer["error"]["param"] == param


@pytest.mark.parametrize("messages", [[], [{"role": "user", "content": ""}], [{"role": "robot", "content": "x"}],
                                      [{"role": "user"}], "hello"])
def test_bad_chat_requests_are_400(live, key, messages):
    status, _, answer = live.post("/v1/chat/completions", {"model": "tiny", "messages": messages}, key)
    assert status == 400 and answer["error"]["type"] == "invalid_request_error"


# ----------------------------------------------------------------------------- under load

async def _stream(port: int, key: str, prompt: str, max_tokens: int, hang_up_after: int | None):
    """A raw streaming client; returns the parsed events, or None if it hung up on purpose."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                          "ignore_eos": True, "temperature": 0.8, "seed": 1}).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nAuthorization: "
                 b"Bearer %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (key.encode(), len(payload))
                 + payload)
    events = []
    while line := await asyncio.wait_for(reader.readline(), timeout=60):
        if line.startswith(b"data: "):
            events.append(line[6:].strip())
            if hang_up_after is not None and len(events) >= hang_up_after:
                writer.close()
                return None
    writer.close()
    return events


def _ledger(live, key) -> dict:
    key_id = parse_key(key)[0]
    rows = live.served.keys.usage("key")
    return next((r for r in rows if r["key_id"] == key_id), {"requests": 0, "completion_tokens": 0})


def test_load_with_disconnects_loses_nothing_and_leaks_no_blocks(live, key):
    engine = live.served.engine.workers[0]
    start_free = engine.stats()["free_blocks"]
    before = _ledger(live, key)

    async def run_all():
        return await asyncio.gather(*(_stream(live.port, key, f"def f{i}(", 24, 3 if i % 4 == 0 else None)
                                      for i in range(64)))

    results = asyncio.run(run_all())
    finished = [r for r in results if r is not None]
    assert len(finished) == 48
    for events in finished:
        assert events[-1] == b"[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    for _ in range(100):  # aborts of the hung-up streams land within an engine step or two
        if engine.num_pending == 0 and engine.stats()["free_blocks"] == start_free:
            break
        time.sleep(0.05)
    stats = engine.stats()  # as the worker reported it on going idle
    assert engine.num_pending == 0 and stats["running"] == stats["waiting"] == 0
    assert stats["free_blocks"] == start_free
    # Every request is in the ledger once, the 16 that hung up with the tokens made before they left.
    for _ in range(100):
        after = _ledger(live, key)
        if after["requests"] - before["requests"] == 64:
            break
        time.sleep(0.05)
    assert after["requests"] - before["requests"] == 64
    cut_short_tokens = after["completion_tokens"] - before["completion_tokens"] - 48 * 24
    assert 16 * 3 <= cut_short_tokens <= 16 * 24


def test_a_client_that_leaves_a_non_streaming_request_is_still_billed(live, key):
    before = _ledger(live, key)
    payload = json.dumps({"model": "tiny", "prompt": "def g(", "max_tokens": CONTEXT - 8, "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", live.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nAuthorization: "
                  b"Bearer %s\r\nContent-Length: %d\r\n\r\n" % (key.encode(), len(payload)) + payload)
        time.sleep(0.05)  # it is generating (about a token a millisecond here): leave
    for _ in range(200):
        after = _ledger(live, key)
        if after["requests"] > before["requests"]:
            break
        time.sleep(0.05)
    assert after["requests"] == before["requests"] + 1
    assert 0 < after["completion_tokens"] - before["completion_tokens"] < CONTEXT - 8  # stopped early, billed
    engine = live.served.engine.workers[0]
    for _ in range(100):
        if engine.stats()["running"] == 0:
            break
        time.sleep(0.05)
    assert engine.num_pending == 0 and engine.stats()["running"] == engine.stats()["waiting"] == 0


def test_engine_stream_equals_batch_generate(model, tokenizer):
    llm = LLM(model, tokenizer)
    expected = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0][0]
    engine = AsyncEngine(LLM(model, tokenizer))

    async def collect():
        return [t async for out in engine.generate([1, 2, 3], SamplingParams(max_tokens=10, temperature=0,
                                                                              ignore_eos=True)) for t in out.token_ids]

    assert asyncio.run(collect()) == expected.token_ids
    asyncio.run(engine.shutdown())


# ----------------------------------------------------------------------------- two replicas

def test_two_replicas_share_keys_limits_and_ledger(model, tokenizer, pg_url, redis_prefix):
    """Two servers on one PostgreSQL and one Redis: a key made through one works on the other, a
    requests/minute limit holds for both together, and the ledger counts every request once."""
    from lmforge.auth import RedisRateLimiter

    servers = [LiveServer(Served(Router([AsyncEngine(LLM(model, tokenizer))]), tokenizer, "tiny", CONTEXT,
                                 KeyStore(pg_url), RedisRateLimiter(REDIS_URL, prefix=redis_prefix), ADMIN))
               for _ in range(2)]
    try:
        a, b = servers
        status, _, made = a.post("/v1/admin/keys", {"name": "shared", "rpm": 5}, ADMIN)
        assert status == 200
        # ignore_eos: a sampled end-of-text would make an answer shorter than 2 tokens now and then
        body = {"model": "tiny", "prompt": "x", "max_tokens": 2, "ignore_eos": True}
        codes = [s.post("/v1/completions", body, made["key"])[0] for s in (a, b, a, b, b, a, b)]
        assert codes == [200] * 5 + [429] * 2  # five per minute across both replicas
        rows = b.served.keys.usage("key")
        row = next(r for r in rows if r.get("name") == "shared" or r.get("key_id") == made["id"])
        assert row["requests"] == 5 and row["completion_tokens"] == 10
    finally:
        for s in servers:
            s.stop()


def test_lmforge_serve_runs_its_worker_in_a_process_that_answers_alike(model, tokenizer, tmp_path):
    from lmforge.checkpoint import save_model_folder
    from lmforge.serve import build_served

    folder = save_model_folder(tmp_path / "model", model, tokenizer)
    served = build_served(folder, folder / "tokenizer.json", name="tiny", device="cpu", auth=False,
                          max_num_batched_tokens=64)  # what `lmforge serve --no-auth` builds
    (worker,) = served.engine.workers
    server = LiveServer(served)
    try:
        client = server.client(None)
        r = client.completions.create(model="tiny", prompt="def fib(", max_tokens=12, temperature=0)
        chunks = list(client.completions.create(model="tiny", prompt="The quick", max_tokens=8, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        metrics = urllib.request.urlopen(server.url + "/metrics").read().decode()
    finally:
        server.stop()
    assert r.choices[0].text == greedy_text(model, tokenizer, tokenizer.encode("def fib("), 12)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == greedy_text(
        model, tokenizer, tokenizer.encode("The quick"), 8)
    generated = r.usage.completion_tokens + chunks[-1].usage.completion_tokens
    assert f"lmforge_engine_generated_tokens {generated}\n" in metrics  # the worker's own count
    assert not worker._process.is_alive()  # the server's shutdown stopped it


def test_auto_workers_one_per_core_while_the_weights_fit(tmp_path, monkeypatch):
    import os

    from lmforge.serve import auto_workers

    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    cpu = torch.device("cpu")
    assert auto_workers(tmp_path, cpu) == len(os.sched_getaffinity(0))
    assert auto_workers(tmp_path, torch.device("cuda")) == 1  # one GPU unless told N
    assert auto_workers(tmp_path, cpu, engine_process=False) == 1  # threads share one interpreter
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_PAGE_SIZE": 1, "SC_PHYS_PAGES": 7_999}[name])
    assert auto_workers(tmp_path, cpu) == 1  # a quarter of 7,999 bytes holds one 1,000-byte copy


def test_health_is_503_once_no_worker_can_serve(model, tokenizer):
    worker = ProcessEngine(functools.partial(LLM, model, tokenizer))
    server = LiveServer(Served(Router([worker]), tokenizer, "tiny", CONTEXT))
    try:
        assert json.loads(urllib.request.urlopen(server.url + "/health").read())["status"] == "ok"
        worker._process.kill()
        worker._process.join()
        status, _, body = server.post("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2})
        with pytest.raises(urllib.error.HTTPError) as health:
            urllib.request.urlopen(server.url + "/health")
    finally:
        server.stop()
    assert health.value.code == 503
    assert json.loads(health.value.read())["workers"] == {"running": 0, "total": 1}
    assert status == 503 and "none of the 1 engine workers is running" in body["error"]["message"]
