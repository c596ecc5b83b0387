"""Schema-driven fuzzing of the live server: schemathesis generates requests for every route from the
app's own OpenAPI schema, both valid ones and ones that break it (wrong types, missing fields, values
past their bounds), and sends them over HTTP to a server whose worker runs in its own process, as
`lmforge serve` runs it. Whatever arrives, the answer is never a 5xx and the worker never dies."""

import collections
import copy
import functools
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from test_serve import ADMIN, CONTEXT, LiveServer, model, tokenizer  # noqa: F401 - fixtures

from lmforge.auth import KeyStore, MemoryRateLimiter
from lmforge.engine import LLM
from lmforge.engine.async_engine import Router
from lmforge.engine.fuse import fuse_projections
from lmforge.engine.process_engine import ProcessEngine
from lmforge.feedback import FeedbackStore
from lmforge.serve import Served, create_app

schemathesis = pytest.importorskip("schemathesis")
EXAMPLES = {"positive": 140, "negative": 140}  # per operation and mode; routes with few inputs have fewer


@pytest.fixture(scope="module")
def fuzzed(model, tokenizer, tmp_path_factory):  # noqa: F811
    keys = KeyStore(f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'keys.db'}")
    engine = Router([ProcessEngine(functools.partial(LLM, fuse_projections(copy.deepcopy(model)), tokenizer,
                                                     max_num_batched_tokens=64), max_pending=64)])
    server = LiveServer(Served(engine, tokenizer, "tiny", CONTEXT, keys, MemoryRateLimiter(), ADMIN,
                               FeedbackStore(keys), max_body_bytes=1 << 20))
    yield server
    server.stop()


def test_fuzzed_requests_on_every_route_get_no_5xx_and_kill_no_worker(fuzzed):
    torch.manual_seed(0)
    user = fuzzed.served.keys.create_key("fuzz-user-7f3a9c", rpm=100_000, tpm=10_000_000,
                                         token_budget=10 ** 12)[0]
    schema = schemathesis.openapi.from_dict(create_app(fuzzed.served).openapi())
    counts: collections.Counter = collections.Counter()
    server_errors = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 14  # every route and method of the app
    def fuzz(op, key: str, mode: str, examples: int) -> None:
        @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
        def send(case):
            if op.method == "delete":
                case.path_parameters["name"] = f"x{case.path_parameters['name']}"  # never the fuzz key's name
            if mode == "positive" and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = "tiny"  # a valid request reaches the engine, not only the 404 for its name
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {key}"}
            response = case.call(base_url=fuzzed.url, timeout=60)
            counts[(op.method.upper(), op.path, mode, response.status_code // 100)] += 1
            if response.status_code >= 500:
                server_errors.append((op.method, op.path, mode, response.status_code, response.text[:300],
                                      str(case.body)[:300]))

        try:
            send()
        except Unsatisfiable:  # nothing to break: a negative case of a route without inputs
            assert mode == "negative", op.label
            unbreakable.append(op.label)

    unbreakable: list[str] = []
    for op in operations:
        key = ADMIN if "/admin/" in op.path or op.path == "/metrics" else user
        for mode, examples in EXAMPLES.items():
            fuzz(op, key, mode, examples)
    total = sum(counts.values())
    by_route = collections.Counter()
    for (method, path, _, _), n in counts.items():
        by_route[f"{method} {path}"] += n
    classes = collections.Counter()
    for (*_, c), n in counts.items():
        classes[f"{c}xx"] += n
    print(f"fuzzing: {total} requests; by route: {dict(by_route)}; by status class: {dict(classes)}; "
          f"no negative case for: {unbreakable}")
    assert not server_errors, server_errors[:5]
    assert total >= 2000 and len(by_route) == len(operations)
    worker = fuzzed.served.workers[0]
    assert worker.alive and worker.num_restarts == 0
    for _ in range(100):  # every generation ended or was aborted: the pool is whole again
        stats = worker.stats()
        if stats["free_blocks"] == stats["total_blocks"] and not stats["pending"]:
            break
        time.sleep(0.05)
    assert stats["free_blocks"] == stats["total_blocks"]
