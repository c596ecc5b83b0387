"""Feedback capture: responses kept with the official client's store=True, POST /v1/feedback and its
400/404 paths, the preference pairs made from feedback rule by rule, and `lmforge dpo --from-feedback`
training on them."""

import json
from datetime import datetime, timedelta, timezone

import openai
import pytest
import torch
from test_serve import ADMIN, CONTEXT, LiveServer, model, tokenizer  # noqa: F401 - fixtures

from lmforge.auth import KeyStore, MemoryRateLimiter
from lmforge.checkpoint import load_model, save_model_folder
from lmforge.cli import main
from lmforge.conversations import held_out
from lmforge.engine import LLM
from lmforge.engine.async_engine import AsyncEngine, Router
from lmforge.feedback import FeedbackStore, feedback_pairs
from lmforge.serve import Served

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def fib"}]


def start_server(model, tokenizer, db_url: str | None) -> LiveServer:  # noqa: F811
    """A live server on `db_url`, or with no database at all (as `--no-auth` runs) for None."""
    engine = Router([AsyncEngine(LLM(model, tokenizer, max_num_batched_tokens=64), max_pending=16)])
    if db_url is None:
        return LiveServer(Served(engine, tokenizer, "tiny", CONTEXT))
    keys = KeyStore(db_url)
    return LiveServer(Served(engine, tokenizer, "tiny", CONTEXT, keys, MemoryRateLimiter(), ADMIN,
                             FeedbackStore(keys)))


@pytest.fixture(scope="module")
def live(model, tokenizer, tmp_path_factory):  # noqa: F811
    server = start_server(model, tokenizer, f"sqlite:///{tmp_path_factory.mktemp('db') / 'lmforge.db'}")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def alice(live):
    return live.served.keys.create_key("alice")


@pytest.fixture(scope="module")
def stored(live, alice):
    """A chat response alice stored: two choices."""
    return live.client(alice[0]).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, n=2,
                                                         seed=1, store=True)


# ----------------------------------------------------------------------------- stored responses

def test_store_true_keeps_the_chat_response_for_its_key(live, alice, stored):
    kept = live.served.feedback.response(stored.id)
    assert stored.id.startswith("chatcmpl-") and kept.id == stored.id
    assert kept.key_id == alice[1].id and kept.model == "tiny"
    assert kept.messages == MESSAGES and kept.prompts is None and kept.prompt(1) == MESSAGES
    assert kept.choices == [c.message.content for c in stored.choices] and len(kept.choices) == 2
    assert datetime.now(timezone.utc) - kept.created_at < timedelta(minutes=1)
    unasked = live.client(alice[0]).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    assert live.served.feedback.response(unasked.id) is None  # store defaults to false


def test_streamed_and_completion_responses_are_stored(live, alice, tokenizer):  # noqa: F811
    client = live.client(alice[0])
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, n=2, seed=2,
                                            stream=True, store=True)
    texts, ids = ["", ""], set()
    for chunk in stream:  # the client has read [DONE] when this loop ends: the response is stored by then
        ids.add(chunk.id)
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    (response_id,) = ids
    assert live.served.feedback.response(response_id).choices == texts

    # Two prompts, two choices each: choice 2 * p + i answers prompt p; the echoed prompt is not stored
    prompts = ["def fib(", "The quick"]
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=4, n=2, seed=3, echo=True,
                                  extra_body={"store": True})
    kept = live.served.feedback.response(r.id)
    assert r.id.startswith("cmpl-") and kept.prompts == prompts and kept.messages is None
    assert kept.choices == [c.text[len(prompts[c.index // 2]):] for c in r.choices]
    assert [kept.prompt(i) for i in range(4)] == [prompts[0]] * 2 + [prompts[1]] * 2
    r = client.completions.create(model="tiny", prompt=tokenizer.encode("def fib("), max_tokens=2,
                                  extra_body={"store": True})
    assert live.served.feedback.response(r.id).prompts == ["def fib("]  # token ids stored as their text


# ----------------------------------------------------------------------------- POST /v1/feedback

def test_feedback_rows_are_stored_and_returned(live, alice, stored):
    key = alice[0]
    status, _, better = live.post("/v1/feedback", {"response_id": stored.id, "preferred": "(n): return n",
                                                   "comment": "too long"}, key)
    assert status == 200, better
    assert better["id"].startswith("fb-") and better["object"] == "feedback"
    assert {k: better[k] for k in ("response_id", "choice_index", "rating", "preferred", "comment")} == {
        "response_id": stored.id, "choice_index": 0, "rating": None, "preferred": "(n): return n",
        "comment": "too long"}
    status, _, up = live.post("/v1/feedback", {"response_id": stored.id, "choice_index": 1, "rating": "up"}, key)
    assert status == 200 and up["rating"] == 1 and up["preferred"] is None
    status, _, down = live.post("/v1/feedback", {"response_id": stored.id, "rating": -1}, key)
    assert status == 200 and down["rating"] == -1
    rows = {fb["feedback_id"]: fb for fb, response in live.served.feedback.feedback() if response.id == stored.id}
    assert set(rows) >= {better["id"], up["id"], down["id"]}
    assert rows[up["id"]]["choice_index"] == 1 and rows[up["id"]]["key_id"] == alice[1].id
    assert rows[better["id"]]["preferred"] == "(n): return n" and rows[better["id"]]["comment"] == "too long"
    assert rows[down["id"]]["rating"] == -1 and rows[down["id"]]["preferred"] is None


@pytest.mark.parametrize("body, param", [
    ({}, "rating"),  # neither a rating nor a better answer
    ({"comment": "meh"}, "rating"),
    ({"rating": 2}, "rating"),
    ({"rating": "sideways"}, "rating"),
    ({"preferred": "   "}, "preferred"),
    ({"rating": 1, "choice_index": 2}, "choice_index"),  # the response has choices 0 and 1
    ({"rating": 1, "choice_index": -1}, "choice_index"),
    ({"rating": 1, "surprise": True}, "surprise"),
])
def test_bad_feedback_is_400(live, alice, stored, body, param):
    status, _, answer = live.post("/v1/feedback", {"response_id": stored.id, **body}, alice[0])
    assert status == 400, answer
    assert answer["error"]["param"] == param and answer["error"]["type"] == "invalid_request_error"


def test_preferred_equal_to_the_answer_is_400(live, alice, stored):
    status, _, answer = live.post("/v1/feedback", {"response_id": stored.id, "choice_index": 1,
                                                   "preferred": stored.choices[1].message.content}, alice[0])
    assert status == 400 and answer["error"]["param"] == "preferred" and "rating 'up'" in answer["error"]["message"]


def test_a_key_cannot_rate_or_see_another_keys_response(live, stored):
    bob = live.served.keys.create_key("bob")[0]
    status, _, unknown = live.post("/v1/feedback", {"response_id": "chatcmpl-nope", "rating": 1}, bob)
    assert status == 404 and unknown["error"]["code"] == "response_not_found"
    status, _, theirs = live.post("/v1/feedback", {"response_id": stored.id, "rating": 1}, bob)
    assert status == 404 and theirs["error"] == {**unknown["error"], "message": unknown["error"]["message"].replace(
        "chatcmpl-nope", stored.id)}  # word for word the answer for an id that does not exist
    assert not any(fb["key_id"] == live.served.keys.get_key("bob").id for fb, _ in live.served.feedback.feedback())
    status, _, _ = live.post("/v1/feedback", {"response_id": stored.id, "rating": 1})
    assert status == 401
    admin_key = live.served.keys.create_key("ops", admin=True)[0]
    for key in (ADMIN, admin_key):  # the environment's admin key and a stored one rate any response
        status, _, row = live.post("/v1/feedback", {"response_id": stored.id, "rating": 1}, key)
        assert status == 200 and row["response_id"] == stored.id


def test_without_a_database_store_and_feedback_are_400(model, tokenizer):  # noqa: F811
    server = start_server(model, tokenizer, None)
    try:
        client = server.client(None)
        assert client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).choices
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, store=True)
        assert e.value.body["code"] == "store_unavailable" and e.value.body["param"] == "store"
        assert "--no-auth" in e.value.body["message"]
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="tiny", prompt="def", max_tokens=2, stream=True,
                                      extra_body={"store": True})
        status, _, answer = server.post("/v1/feedback", {"response_id": "chatcmpl-x", "rating": 1})
        assert status == 400 and answer["error"]["code"] == "store_unavailable"
    finally:
        server.stop()


# ----------------------------------------------------------------------------- feedback -> pairs

def test_pairs_follow_the_rules_and_every_row_is_counted(db_url):
    keys = KeyStore(db_url)
    store = FeedbackStore(keys)
    q = [{"role": "user", "content": "q"}]
    store.store_response("chatcmpl-1", "k1", "tiny", ["a1", "a2"], messages=q)
    store.store_response("chatcmpl-2", "k2", "tiny", ["a3"], messages=q)  # same prompt, another key and request
    store.store_response("chatcmpl-3", "k1", "other", ["b1"], messages=q)  # same prompt, another model
    store.store_response("cmpl-4", "k1", "tiny", ["x0", "x1", "y0", "y1"], prompts=["p", "r"])  # n=2: x for p
    store.store_response("chatcmpl-5", "k1", "tiny", ["same", "same"], messages=[{"role": "user", "content": "s"}])
    ids = [store.add_feedback(*args, **kw)["id"] for args, kw in [
        (("chatcmpl-1", 0, "k1"), {"rating": 1}),  # 0: a1 up
        (("chatcmpl-1", 1, "k1"), {"rating": -1}),  # 1: a2 down
        (("chatcmpl-2", 0, "k2"), {"rating": 1}),  # 2: a3 up -> a1 > a2 and a3 > a2
        (("chatcmpl-1", 0, "k1"), {"preferred": "best", "comment": "c"}),  # 3: best > a1
        (("chatcmpl-1", 0, "k1"), {"preferred": "best"}),  # 4: best > a1 again: a duplicate
        (("chatcmpl-1", 1, "k1"), {"preferred": "a1"}),  # 5: a1 > a2, which the ratings make too: a duplicate
        (("chatcmpl-3", 0, "k1"), {"rating": -1}),  # 6: other model, nothing up: unpaired down
        (("cmpl-4", 2, "k1"), {"rating": 1}),  # 7: y0 up
        (("cmpl-4", 3, "k1"), {"rating": -1}),  # 8: y1 down ...
        (("cmpl-4", 3, "k1"), {"rating": 1}),  # 9: ... replaced by y1 up: prompt r has two ups, no down
        (("cmpl-4", 0, "k1"), {"rating": 1}),  # 10: x0 up
        (("cmpl-4", 1, "k1"), {"rating": -1, "preferred": "x2"}),  # 11: x0 > x1, and x2 > x1
        (("chatcmpl-5", 0, "k1"), {"rating": 1}),  # 12: the same text up and down: no pair
        (("chatcmpl-5", 1, "k1"), {"rating": -1}),  # 13
    ]]
    pairs, counts = feedback_pairs(store.feedback())
    keys.close()
    got = [(p["prompt"], p["chosen"], p["rejected"], p["source"], p["feedback"]) for p in pairs]
    assert got == [  # preferred answers in arrival order, then each prompt's up x down in first-rated order
        (q, "best", "a1", "preferred", [ids[3]]),
        (q, "a1", "a2", "preferred", [ids[5]]),
        ("p", "x2", "x1", "preferred", [ids[11]]),
        (q, "a3", "a2", "ratings", [ids[2], ids[1]]),  # a1 > a2 from ratings [0, 1] was made by row 5 already
        ("p", "x0", "x1", "ratings", [ids[10], ids[11]]),
    ]
    assert dict(counts) == {"feedback_rows": 14, "alternative_pairs": 4, "ratings": 11, "rating_pairs": 3,
                            "replaced_ratings": 1, "unpaired_up": 2, "unpaired_down": 1, "same_text_up_and_down": 1,
                            "duplicates": 2, "pairs": 5}


# ----------------------------------------------------------------------------- lmforge dpo --from-feedback

@pytest.fixture(scope="module")
def model_folder(model, tokenizer, tmp_path_factory):  # noqa: F811
    return save_model_folder(tmp_path_factory.mktemp("tiny") / "model", model, tokenizer)


def test_dpo_trains_on_feedback_from_the_server(model, tokenizer, model_folder, tmp_path, capsys):  # noqa: F811
    url = f"sqlite:///{tmp_path / 'lmforge.db'}"
    server = start_server(model, tokenizer, url)
    try:
        client = server.client(server.served.keys.create_key("carol")[0])
        good, bad = (client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, seed=seed,
                                                    store=True) for seed in (1, 2))
        good_text, bad_text = good.choices[0].message.content, bad.choices[0].message.content
        assert good_text.strip() and bad_text.strip() and good_text != bad_text
        for response, body in ((good, {"rating": "up"}), (bad, {"rating": "down", "preferred": "(n): return n"})):
            assert server.post("/v1/feedback", {"response_id": response.id, **body}, client.api_key)[0] == 200
    finally:
        server.stop()
    assert not held_out(MESSAGES, 0.1)  # the one prompt lands in training, not in DPO's held-out slice

    out = tmp_path / "dpo"
    argv = ["dpo", "--model", str(model_folder), "--from-feedback", url, "--out", str(out), "--steps", "2",
            "--batch-size", "2", "--warmup-steps", "1", "--lr", "1e-3", "--device", "cpu", "--dtype", "fp32",
            "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "2 feedback rows" in printed and "1 pairs from preferred answers" in printed
    assert "1 pairs from 2 ratings" in printed and "wrote 2 pairs" in printed
    rows = [json.loads(line) for line in (out / "feedback_pairs.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [
        (MESSAGES, "(n): return n", bad_text), (MESSAGES, good_text, bad_text)]
    summary = json.loads((out / "dpo.json").read_text())
    assert summary["steps"] == 2 and summary["counts"]["train_pairs"] == 2
    assert summary["config"]["data"] == str(out / "feedback_pairs.jsonl")
    trained = load_model(out / "model")
    assert not all(torch.equal(a, b) for a, b in zip(trained.parameters(), model.parameters()))


def one_line_error(capsys, argv, match) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and match in err, err


def test_dpo_from_feedback_mistakes_are_one_line(model_folder, tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'lmforge.db'}"
    base = ["dpo", "--model", str(model_folder), "--out", str(tmp_path / "dpo"), "--device", "cpu"]
    one_line_error(capsys, [*base, "--from-feedback", url], "no feedback in")
    keys = KeyStore(url)
    store = FeedbackStore(keys)
    store.store_response("chatcmpl-1", "k1", "tiny", ["a"], messages=MESSAGES)
    store.add_feedback("chatcmpl-1", 0, "k1", rating=1)
    keys.close()
    one_line_error(capsys, [*base, "--from-feedback", "--db", url], "no preference pairs from the 1 feedback rows")
    one_line_error(capsys, [*base, "--data", "prefs.jsonl", "--db", url], "go with --from-feedback")
    with pytest.raises(SystemExit):  # argparse: not both
        main([*base, "--data", "prefs.jsonl", "--from-feedback", url])
    assert "not allowed with argument" in capsys.readouterr().err
