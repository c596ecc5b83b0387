"""Stored responses, feedback on them, and the preference pairs `lmforge dpo --from-feedback` trains on.

The server keeps a response when its request says `"store": true` (OpenAI's own field), and
`POST /v1/feedback` rates one of its choices or offers a better answer. Both live in the key
store's database (one SQLite file, or one PostgreSQL database shared by replicas) in two tables:

    lmforge_responses   a stored response: its id (chatcmpl-/cmpl-...), the key that made it, the
                        model, the chat messages or the completion prompts, each choice's text
    lmforge_feedback    one row per POST /v1/feedback: fb-... id, the response and choice, rating
                        (+1/-1), preferred answer, comment, the key that sent it

Pairs, as DPO's JSONL rows ({"prompt", "chosen", "rejected"}), from the feedback (`feedback_pairs`):

- A preferred answer makes (chosen = it, rejected = the choice it was written for).
- Ratings: an answer is one choice of one response, and its latest rating counts (earlier ones are
  counted as replaced). Among answers to the same prompt (the same model and the same messages or
  prompt text), every up-rated answer beats every down-rated one: one pair each.
- A rating with no opposite rating on its prompt makes no pair (counted as unpaired); neither does
  an up and a down rating of answers with the same text (counted). A pair made twice is kept once.

Every feedback row lands in the counts; none is dropped silently. A completion's prompt becomes a
string prompt, which DPO reads as one user turn, as it reads a hand-written prefs.jsonl's.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone

import sqlalchemy as sa

from lmforge.auth import KeyStore
from lmforge.common import LmforgeError, atomic_write_text, print0

metadata = sa.MetaData()

responses_table = sa.Table(
    "lmforge_responses", metadata,
    sa.Column("response_id", sa.String(64), primary_key=True),
    sa.Column("key_id", sa.String(64), nullable=False, index=True),  # the tenant: only it (or an admin) rates it
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("messages", sa.JSON, nullable=True),  # chat: [{"role", "content"}] as the chat template saw them
    sa.Column("prompts", sa.JSON, nullable=True),  # completions: one text per prompt
    sa.Column("choices", sa.JSON, nullable=False),  # the generated text of each choice, by index (no echo)
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

feedback_table = sa.Table(
    "lmforge_feedback", metadata,
    # The integer id orders the rows as they arrived (which rating is the latest); the fb- id is the public one.
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("feedback_id", sa.String(64), nullable=False, unique=True),
    sa.Column("response_id", sa.String(64), sa.ForeignKey(responses_table.c.response_id), nullable=False,
              index=True),
    sa.Column("choice_index", sa.Integer, nullable=False),
    sa.Column("rating", sa.SmallInteger, nullable=True),  # +1, -1, or NULL with a preferred answer only
    sa.Column("preferred", sa.Text, nullable=True),
    sa.Column("comment", sa.Text, nullable=True),
    sa.Column("key_id", sa.String(64), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("rating IN (-1, 1)", name="lmforge_feedback_rating"),
    sa.CheckConstraint("rating IS NOT NULL OR preferred IS NOT NULL", name="lmforge_feedback_something"),
)


@dataclass(frozen=True)
class StoredResponse:
    id: str
    key_id: str
    model: str
    messages: list[dict] | None  # chat
    prompts: list[str] | None  # completions
    choices: list[str]
    created_at: datetime

    def prompt(self, choice_index: int) -> list[dict] | str:
        """What choice `choice_index` answers. A completion request's choices run prompt by prompt,
        n per prompt (OpenAI's index = prompt * n + i)."""
        if self.messages is not None:
            return self.messages
        return self.prompts[choice_index // (len(self.choices) // len(self.prompts))]


def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t  # SQLite hands back naive datetimes


def _response(row) -> StoredResponse:
    return StoredResponse(row["response_id"], row["key_id"], row["model"], row["messages"], row["prompts"],
                          row["choices"], _utc(row["created_at"]))


def feedback_json(row) -> dict:
    """A feedback row as the API returns it."""
    return {"id": row["feedback_id"], "object": "feedback", "response_id": row["response_id"],
            "choice_index": row["choice_index"], "rating": row["rating"], "preferred": row["preferred"],
            "comment": row["comment"], "created": int(_utc(row["created_at"]).timestamp())}


class FeedbackStore:
    """Stored responses and their feedback, in the tables of a KeyStore's database (made on open)."""

    def __init__(self, keys: KeyStore):
        self.keys = keys
        keys.create_tables(metadata)

    def store_response(self, response_id: str, key_id: str, model: str, choices: list[str], *,
                       messages: list[dict] | None = None, prompts: list[str] | None = None) -> None:
        assert (messages is None) != (prompts is None) and choices
        assert prompts is None or len(choices) % len(prompts) == 0
        with self.keys.engine.begin() as conn:
            conn.execute(responses_table.insert().values(
                response_id=response_id, key_id=key_id, model=model, messages=messages, prompts=prompts,
                choices=choices, created_at=datetime.now(timezone.utc)))

    def response(self, response_id: str) -> StoredResponse | None:
        query = responses_table.select().where(responses_table.c.response_id == response_id)
        with self.keys.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else _response(row)

    def add_feedback(self, response_id: str, choice_index: int, key_id: str, rating: int | None = None,
                     preferred: str | None = None, comment: str | None = None) -> dict:
        """Store one feedback row (checked by the caller: the response exists and is the key's, the
        choice is one of its, rating is +1/-1 or None, at least one of rating/preferred); return its JSON."""
        row = {"feedback_id": f"fb-{uuid.uuid4().hex}", "response_id": response_id, "choice_index": choice_index,
               "rating": rating, "preferred": preferred, "comment": comment, "key_id": key_id,
               "created_at": datetime.now(timezone.utc)}
        with self.keys.engine.begin() as conn:
            conn.execute(feedback_table.insert().values(**row))
        return feedback_json(row)

    def feedback(self) -> list[tuple[dict, StoredResponse]]:
        """Every feedback row with its response, in the order the rows arrived."""
        query = (sa.select(feedback_table, *(c.label("r_" + c.name) for c in responses_table.c))
                 .join_from(feedback_table, responses_table)
                 .order_by(feedback_table.c.id))
        with self.keys.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [({c: row[c] for c in feedback_table.c.keys()}, _response({c: row["r_" + c] for c in
                                                                           responses_table.c.keys()}))
                for row in rows]


# ----------------------------------------------------------------------------- feedback -> pairs

@dataclass
class _Answer:
    prompt: list[dict] | str
    text: str
    rating: int
    feedback_id: str


def feedback_pairs(rows: list[tuple[dict, StoredResponse]]) -> tuple[list[dict], Counter]:
    """DPO's JSONL rows from feedback rows in arrival order (FeedbackStore.feedback()), by the rules
    in the module docstring, and the counts by reason. Each row also names its source and feedback ids."""
    counts = Counter(feedback_rows=len(rows))
    made: list[dict] = []
    latest: dict[tuple[str, int], _Answer] = {}  # (response, choice) -> its latest rating
    by_prompt: dict[str, list[tuple[str, int]]] = {}  # (model, prompt) -> its rated answers, first rated first
    for fb, response in rows:
        prompt, text = response.prompt(fb["choice_index"]), response.choices[fb["choice_index"]]
        if fb["preferred"] is not None:
            counts["alternative_pairs"] += 1
            made.append({"prompt": prompt, "chosen": fb["preferred"], "rejected": text, "source": "preferred",
                         "feedback": [fb["feedback_id"]]})
        if fb["rating"] is not None:
            counts["ratings"] += 1
            answer = (response.id, fb["choice_index"])
            if answer in latest:
                counts["replaced_ratings"] += 1
            else:
                by_prompt.setdefault(json.dumps([response.model, prompt], sort_keys=True), []).append(answer)
            latest[answer] = _Answer(prompt, text, fb["rating"], fb["feedback_id"])
    for answers in by_prompt.values():
        ups = [latest[a] for a in answers if latest[a].rating > 0]
        downs = [latest[a] for a in answers if latest[a].rating < 0]
        if not downs or not ups:
            counts["unpaired_up" if ups else "unpaired_down"] += len(ups or downs)
            continue
        for up in ups:
            for down in downs:
                if up.text == down.text:
                    counts["same_text_up_and_down"] += 1
                    continue
                counts["rating_pairs"] += 1
                made.append({"prompt": up.prompt, "chosen": up.text, "rejected": down.text, "source": "ratings",
                             "feedback": [up.feedback_id, down.feedback_id]})
    pairs, seen = [], set()
    for pair in made:
        key = json.dumps([pair["prompt"], pair["chosen"], pair["rejected"]], sort_keys=True)
        if key in seen:
            counts["duplicates"] += 1
            continue
        seen.add(key)
        pairs.append(pair)
    counts["pairs"] = len(pairs)
    return pairs, counts


def summary(counts: Counter, where: str) -> str:
    c = counts
    return (f"{where}: {c['feedback_rows']:,} feedback rows\n"
            f"  {c['alternative_pairs']:,} pairs from preferred answers\n"
            f"  {c['rating_pairs']:,} pairs from {c['ratings']:,} ratings (every up x every down on a prompt)\n"
            f"  {c['unpaired_up']:,} up and {c['unpaired_down']:,} down ratings unpaired: no opposite rating on "
            "the same prompt\n"
            f"  {c['replaced_ratings']:,} ratings replaced by a later rating of the same answer\n"
            f"  {c['same_text_up_and_down']:,} up x down on answers with the same text (no pair)\n"
            f"  {c['duplicates']:,} duplicate pairs kept once\n"
            f"  {c['pairs']:,} pairs")


def write_feedback_pairs(db_url: str | None, path) -> Counter:
    """Pairs from the feedback in the database at `db_url` (None: auth.default_db_url()) written to
    `path` as DPO's JSONL; the counts are printed and returned. No pair at all is an LmforgeError."""
    keys = KeyStore(db_url)
    try:
        pairs, counts = feedback_pairs(FeedbackStore(keys).feedback())
    finally:
        keys.close()
    if not counts["feedback_rows"]:
        raise LmforgeError(f"no feedback in {keys.url}; start `lmforge serve` on this database (--db), make "
                           "responses with \"store\": true and rate them with POST /v1/feedback")
    print0(summary(counts, keys.url))
    if not pairs:
        raise LmforgeError(f"no preference pairs from the {counts['feedback_rows']:,} feedback rows in {keys.url}: "
                           "a pair needs a preferred answer, or an up and a down rating of two answers to the same "
                           "prompt; send more feedback, or train on a --data prefs.jsonl")
    atomic_write_text(path, "".join(json.dumps(p) + "\n" for p in pairs))
    print0(f"wrote {len(pairs):,} pairs to {path}")
    return counts
