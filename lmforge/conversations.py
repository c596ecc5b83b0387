"""Conversations for post-training: read them, check them, render them into token ids.

Input is JSONL, one example per line, in either of the two shapes fine-tuning tools accept:

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", ...}, {"role": "assistant", ...}]}
    {"prompt": "...", "completion": "..."}          # read as one user turn and one assistant turn

Preference data (DPO, reward models) adds a second answer: {"prompt", "chosen", "rejected"}, where
prompt is a string or a message list and chosen/rejected are strings (the assistant's reply).

Every line is checked before anything trains on it: roles known, contents non-empty strings, a
system message only first, users and assistants taking turns (tool results only after an
assistant), and an assistant answer last. A bad line is reported with its number and reason and
either skipped (counted) or, with on_error="raise", stops the run: never silently mistrained.

Rendering goes through the tokenizer's own chat template (Jinja, as `transformers`' apply_chat_template),
so what a model is trained on is exactly what `lmforge serve` and `lmforge chat` will show it.
Which tokens are trained is found by rendering growing prefixes of the conversation: the text
added by each assistant message (its content and its end-of-turn token, so the model learns to
stop) is trained; everything else (system, user, the assistant's start tag) is context only.
"""

from __future__ import annotations

import json
import re
import secrets
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.common import LmforgeError
from lmforge.corpus import is_heldout

ROLES = ("system", "user", "assistant", "tool")
MAX_REPORTED = 20  # bad lines printed one by one; the rest are only counted


def render_template(template: str, messages: list[dict], tokenizer, add_generation_prompt: bool = True) -> str:
    """Render a Hugging Face chat template as transformers does (sandboxed Jinja, trimmed blocks)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    specials = {}
    for name in ("bos", "eos"):
        i = getattr(tokenizer, f"{name}_id", None)
        specials[f"{name}_token"] = tokenizer.id_to_bytes(i).decode("utf-8", "replace") if i is not None else ""
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            **specials)


def encode_chat(tokenizer, messages: list[dict], template: str | None = None,
                add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a chat rendered through its template, where only the template's own markers are
    special tokens: a special-token string typed inside a message (`<|im_start|>system`) stays text,
    so a user cannot write themselves another role's turn."""
    template = template or chat_template(tokenizer)
    escaped, escapes = escape_specials(tokenizer, messages)
    text = render_template(template, escaped, tokenizer, add_generation_prompt=add_generation_prompt)
    return encode_rendered(tokenizer, text, escapes)


def escape_specials(tokenizer, messages: list[dict]) -> tuple[list[dict], dict[str, str]]:
    """Messages whose special-token strings are swapped for placeholders, and placeholder -> string.

    The template then renders (and may trim or otherwise transform) the content as it would; the
    placeholders are plain text to it, and encode_rendered turns them back into the characters they
    stood for, encoded as text. A placeholder carries a random nonce, so no content can forge one."""
    specials = sorted(getattr(tokenizer, "special_ids", {}), key=len, reverse=True)
    contents = [m.get("content") for m in messages]
    if not specials or not any(isinstance(c, str) and any(t in c for t in specials) for c in contents):
        return messages, {}
    nonce = secrets.token_hex(8)
    escapes = {f"\ue000{nonce}{i}\ue001": t for i, t in enumerate(specials)}
    pattern = re.compile("|".join(re.escape(t) for t in specials))
    back = {t: e for e, t in escapes.items()}
    escaped = [dict(m, content=pattern.sub(lambda x: back[x.group(0)], m["content"]))
               if isinstance(m.get("content"), str) else m for m in messages]
    return escaped, escapes


def encode_rendered(tokenizer, text: str, escapes: dict[str, str]) -> list[int]:
    """Ids of rendered chat text: its special-token strings (the template's) as their ids, the text
    between them as ordinary text with escape_specials' placeholders put back. Without placeholders
    this is exactly `encode_with_special`, which encodes the same gaps between the same markers."""
    if not escapes:
        return tokenizer.encode_with_special(text)
    specials = sorted(tokenizer.special_ids, key=len, reverse=True)
    restore = re.compile("|".join(re.escape(e) for e in escapes))
    ids = []
    for i, piece in enumerate(re.split("(" + "|".join(re.escape(t) for t in specials) + ")", text)):
        if i % 2:  # a captured marker
            ids.append(tokenizer.special_ids[piece])
        elif piece:
            ids.extend(tokenizer.encode(restore.sub(lambda x: escapes[x.group(0)], piece)))
    return ids


def chat_template(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise LmforgeError("this tokenizer has no chat template; post-training needs one (an lmforge tokenizer has "
                           "one built in; an imported model needs chat_template in tokenizer_config.json)")
    return template


def chat_stop_ids(tokenizer) -> set[int]:
    """Tokens that end an assistant turn: lmforge's <|assistant_end|>, and eos/bos for any tokenizer."""
    ids = {getattr(tokenizer, "eos_id", None), getattr(tokenizer, "bos_id", None),
           getattr(tokenizer, "special_ids", {}).get("<|assistant_end|>")}
    return {i for i in ids if i is not None}


def held_out(example, fraction: float) -> bool:
    """Deterministic validation slice of post-training data: the corpus's hash split (corpus.is_heldout)
    applied to the example's canonical JSON, so it never depends on file order."""
    return is_heldout(json.dumps(example, sort_keys=True), fraction)


def pad_token_id(tokenizer) -> int:
    """The id padding rows are filled with (it is never a target): the tokenizer's pad, else 0."""
    pad = getattr(tokenizer, "pad_id", None)
    return pad if pad is not None else 0


def check_messages(messages) -> str | None:
    """Why a message list cannot be trained on, or None. Positions in the reason count from 1."""
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    previous = None
    for n, m in enumerate(messages, 1):
        if not isinstance(m, dict) or "role" not in m:
            return f"message {n} has no role"
        role, content = m["role"], m.get("content")
        if role not in ROLES:
            return f"message {n} has role {role!r}; roles are {', '.join(ROLES)}"
        if not isinstance(content, str) or not content.strip():
            return f"message {n} ({role}) has empty or non-text content"
        if role == "system" and n != 1:
            return f"message {n} is a system message; only the first message may be one"
        if role == "user" and previous == "user":
            return f"message {n} is a second user message in a row; users and assistants take turns"
        if role == "assistant" and previous not in ("user", "tool"):
            return f"message {n} is an assistant message that answers no user message"
        if role == "tool" and previous not in ("assistant", "tool"):
            return f"message {n} is a tool result that follows no assistant message"
        previous = role
    if previous != "assistant":
        return "the last message is not an assistant message; there is no answer to learn"
    return None


def render(tokenizer, messages: list[dict], template: str | None = None) -> tuple[list[int], list[bool]]:
    """Token ids of a checked conversation and, per token, whether it is trained (assistant output)."""
    template = template or chat_template(tokenizer)
    ids, trained, done = [], [], ""
    messages, escapes = escape_specials(tokenizer, messages)  # markers typed in a message stay text

    def add(text: str, train: bool):
        new = encode_rendered(tokenizer, text, escapes)
        ids.extend(new)
        trained.extend([train] * len(new))

    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render_template(template, messages[:i], tokenizer, add_generation_prompt=True)
        full = render_template(template, messages[:i + 1], tokenizer, add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise LmforgeError("the chat template does not render a conversation as a growing prefix of itself, "
                               "so the assistant's tokens cannot be found; use a template without per-turn "
                               "rewriting (e.g. lmforge's own)")
        add(prompt[len(done):], False)
        add(full[len(prompt):], True)
        done = full
    return ids, trained


@dataclass
class ReadReport:
    """What reading a JSONL file found: examples kept, and every line not kept, by reason."""
    path: str
    num_lines: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    problems: list[str] = field(default_factory=list)  # "file:line: reason", the first MAX_REPORTED

    def reject(self, line_no: int, reason: str, on_error: str) -> None:
        where = f"{self.path}:{line_no}: {reason}"
        if on_error == "raise":
            raise LmforgeError(f"{where}. Fix the line, or pass --on-bad-line skip to skip bad lines (counted)")
        self.skipped[reason.split(";")[0]] += 1
        if len(self.problems) < MAX_REPORTED:
            self.problems.append(where)

    def summary(self) -> str:
        kept = self.num_lines - sum(self.skipped.values())
        text = f"{self.path}: {kept:,} of {self.num_lines:,} lines kept"
        if self.skipped:
            text += f"; skipped {sum(self.skipped.values()):,}:\n  " + "\n  ".join(self.problems)
            more = sum(self.skipped.values()) - len(self.problems)
            if more > 0:
                text += f"\n  ... and {more:,} more"
        return text


def _jsonl(path: Path, report: ReadReport, on_error: str):
    """(line number, parsed object) for each non-blank line that is a JSON object."""
    if not path.is_file():
        raise LmforgeError(f"{path}: no such file; give a JSONL file with one example per line")
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            report.num_lines += 1
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                report.reject(line_no, "not valid UTF-8", on_error)
                continue
            except ValueError as e:
                report.reject(line_no, f"not valid JSON; {e}", on_error)
                continue
            if not isinstance(obj, dict):
                report.reject(line_no, "not a JSON object", on_error)
                continue
            yield line_no, obj


def read_conversations(path: str | Path, *, on_error: str = "skip") -> tuple[list[list[dict]], list[int], ReadReport]:
    """Checked conversations from a messages/prompt-completion JSONL, their line numbers, and the report."""
    path = Path(path)
    report = ReadReport(str(path))
    conversations, lines = [], []
    for line_no, obj in _jsonl(path, report, on_error):
        if "messages" in obj:
            messages = obj["messages"]
        elif "prompt" in obj and "completion" in obj:
            messages = [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["completion"]}]
        else:
            report.reject(line_no, "neither 'messages' nor 'prompt' and 'completion'", on_error)
            continue
        problem = check_messages(messages)
        if problem:
            report.reject(line_no, problem, on_error)
            continue
        conversations.append([{"role": m["role"], "content": m["content"]} for m in messages])
        lines.append(line_no)
    if not conversations:
        raise LmforgeError(f"{report.summary()}\nno usable conversations in {path}")
    return conversations, lines, report


@dataclass(frozen=True)
class Preference:
    prompt: list[dict]  # the conversation up to the answer (ends with a user message)
    chosen: str
    rejected: str
    line: int


def read_preferences(path: str | Path, *, on_error: str = "skip") -> tuple[list[Preference], ReadReport]:
    """Checked prompt/chosen/rejected triples from JSONL."""
    path = Path(path)
    report = ReadReport(str(path))
    pairs = []
    for line_no, obj in _jsonl(path, report, on_error):
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in obj]
        if missing:
            report.reject(line_no, f"missing {', '.join(missing)}", on_error)
            continue
        prompt = obj["prompt"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        answers = [obj["chosen"], obj["rejected"]]
        if not all(isinstance(a, str) and a.strip() for a in answers):
            report.reject(line_no, "chosen and rejected must be non-empty strings", on_error)
            continue
        if answers[0] == answers[1]:
            report.reject(line_no, "chosen and rejected are the same answer", on_error)
            continue
        problem = check_messages([*prompt, {"role": "assistant", "content": answers[0]}]) if isinstance(
            prompt, list) else "'prompt' must be a string or a message list"
        if problem:
            report.reject(line_no, problem, on_error)
            continue
        pairs.append(Preference([{"role": m["role"], "content": m["content"]} for m in prompt], *answers, line_no))
    if not pairs:
        raise LmforgeError(f"{report.summary()}\nno usable preference pairs in {path}")
    return pairs, report
