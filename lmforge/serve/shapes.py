"""The engine's outputs as OpenAI's JSON: a completion or chat response, or its stream's chunks.

A shaper accumulates one request's RequestOutputs per choice (choice index = prompt index x n +
the output's index) and counts its usage the same way whether the request streams or not: the
prompt once per prompt whatever n is, each choice's generated tokens as a running total (so a
choice cut short by a client that left counts what it made).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from lmforge.serve.generation import plain_messages

if TYPE_CHECKING:
    from lmforge.serve.workers import Served


def _token_text(tokenizer, token: int) -> str:
    return tokenizer.id_to_bytes(token).decode("utf-8", errors="replace")


class Shaper:
    """Accumulates a request's outputs per choice and writes OpenAI's JSON."""
    route = ""

    def __init__(self, served: Served, body, request_id: str, num_prompts: int = 1):
        self.served, self.body, self.request_id = served, body, request_id
        self.num_choices = num_prompts * body.n
        self.created = int(time.time())
        self.choices: dict[int, dict] = {}
        self.prompt_tokens = self.cached_tokens = 0
        self.num_outputs = 0
        self._counted: set[int] = set()
        self._texts: dict[int, str] = {}  # choice index -> generated text so far, streamed or gathered
        self._generated: dict[int, int] = {}  # choice index -> completion tokens so far
        self._finished: set[int] = set()

    def _choice_index(self, p: int, out) -> int:
        return p * self.body.n + out.index

    def _count(self, p: int, out) -> None:
        """Usage, and each choice's generated text (what store: true keeps), for add() and chunks() alike."""
        self.num_outputs += 1
        i = self._choice_index(p, out)
        self._texts[i] = self._texts.get(i, "") + out.text
        self._generated[i] = out.num_output_tokens  # a running total: a cut-short choice counts what it made
        if out.finished:
            self._finished.add(i)
        if p not in self._counted:  # the prompt counts once, whatever n is
            self._counted.add(p)
            self.prompt_tokens += out.num_prompt_tokens
            self.cached_tokens += out.num_cached_tokens

    def texts(self) -> list[str]:
        """The generated text of every choice, by index; a completion's echoed prompt is not part of it."""
        return [self._texts[i] for i in sorted(self._texts)]

    @property
    def finished(self) -> bool:
        """Every choice of every prompt ran to its end (not cut short by a client that left)."""
        return len(self._finished) == self.num_choices

    def usage(self) -> dict:
        completion_tokens = sum(self._generated.values())
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    def usage_chunk(self, usage: dict) -> dict:
        return {"id": self.request_id, "object": self.chunk_object, "created": self.created,
                "model": self.served.model_name, "choices": [], "usage": usage}


class CompletionShaper(Shaper):
    route, chunk_object = "completions", "text_completion"

    def __init__(self, served, body, prompts, request_id):
        super().__init__(served, body, request_id, len(prompts))
        self.prompts = prompts

    def stored_prompt(self) -> dict:
        """{"prompts": one text per prompt}: as sent, or decoded where the prompt was token ids."""
        raw = self.body.prompt
        if isinstance(raw, str) or all(isinstance(t, int) for t in raw):
            raw = [raw]
        return {"prompts": [p if isinstance(p, str) else self.served.tokenizer.decode(ids)
                            for p, ids in zip(raw, self.prompts)]}

    def _logprobs(self, tokens: list[int], logprobs: list, offset: int) -> dict:
        tok = self.served.tokenizer
        texts = [_token_text(tok, t) for t in tokens]
        offsets, at = [], offset
        for t in texts:
            offsets.append(at)
            at += len(t)
        return {"tokens": texts, "token_logprobs": [None if lp is None else lp[0] for lp in logprobs],
                "top_logprobs": [None if lp is None else {_token_text(tok, i): v for i, v in lp[1]}
                                 for lp in logprobs], "text_offset": offsets}

    def _echo(self, p: int, out) -> tuple[str, dict | None]:
        ids = self.prompts[p]
        text = self.served.tokenizer.decode(ids)
        lp = None
        if self.body.logprobs is not None:
            lp = self._logprobs(ids, out.prompt_logprobs or [None] * len(ids), 0)
        return text, lp

    def add(self, p: int, out) -> None:
        self._count(p, out)
        i = self._choice_index(p, out)
        choice = self.choices.setdefault(i, {"index": i, "text": "", "tokens": [], "logprobs": [],
                                             "finish_reason": None, "echo": None})
        if self.body.echo and choice["echo"] is None:
            choice["echo"] = self._echo(p, out)
        choice["text"] += out.text
        choice["tokens"] += out.token_ids
        choice["logprobs"] += out.logprobs
        choice["finish_reason"] = out.finish_reason

    def response(self, usage: dict) -> dict:
        choices = []
        for i in sorted(self.choices):
            c = self.choices[i]
            text, lp = c["text"], None
            if self.body.logprobs is not None:
                lp = self._logprobs(c["tokens"], c["logprobs"], 0)
            if c["echo"] is not None:
                echo_text, echo_lp = c["echo"]
                text = echo_text + text
                if lp is not None and echo_lp is not None:
                    shift = len(echo_text)
                    lp = {"tokens": echo_lp["tokens"] + lp["tokens"],
                          "token_logprobs": echo_lp["token_logprobs"] + lp["token_logprobs"],
                          "top_logprobs": echo_lp["top_logprobs"] + lp["top_logprobs"],
                          "text_offset": echo_lp["text_offset"] + [o + shift for o in lp["text_offset"]]}
            choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": c["finish_reason"]})
        return {"id": self.request_id, "object": "text_completion", "created": self.created,
                "model": self.served.model_name, "choices": choices, "usage": usage}

    def chunks(self, p: int, out) -> list[dict]:
        self._count(p, out)
        i = self._choice_index(p, out)
        text = out.text
        if self.body.echo and i not in self.choices:
            self.choices[i] = {}
            text = self._echo(p, out)[0] + text
        if not text and not out.finished:
            return []
        lp = self._logprobs(out.token_ids, out.logprobs, 0) if self.body.logprobs is not None else None
        return [{"id": self.request_id, "object": "text_completion", "created": self.created,
                 "model": self.served.model_name,
                 "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": out.finish_reason}]}]


class ChatShaper(Shaper):
    route, chunk_object = "chat", "chat.completion.chunk"

    def stored_prompt(self) -> dict:
        return {"messages": plain_messages(self.body.messages)}

    def _logprobs(self, tokens: list[int], logprobs: list) -> dict:
        tok = self.served.tokenizer

        def entry(token: int, value: float) -> dict:
            raw = tok.id_to_bytes(token)
            return {"token": raw.decode("utf-8", "replace"), "logprob": value, "bytes": list(raw)}

        return {"content": [{**entry(t, lp[0]), "top_logprobs": [entry(i, v) for i, v in lp[1]]}
                            for t, lp in zip(tokens, logprobs)]}

    def add(self, p: int, out) -> None:
        self._count(p, out)
        choice = self.choices.setdefault(out.index, {"text": "", "tokens": [], "logprobs": [], "finish_reason": None})
        choice["text"] += out.text
        choice["tokens"] += out.token_ids
        choice["logprobs"] += out.logprobs
        choice["finish_reason"] = out.finish_reason

    def response(self, usage: dict) -> dict:
        choices = [{"index": i, "message": {"role": "assistant", "content": c["text"]},
                    "logprobs": self._logprobs(c["tokens"], c["logprobs"]) if self.body.logprobs else None,
                    "finish_reason": c["finish_reason"]} for i, c in sorted(self.choices.items())]
        return {"id": self.request_id, "object": "chat.completion", "created": self.created,
                "model": self.served.model_name, "choices": choices, "usage": usage}

    def chunks(self, p: int, out) -> list[dict]:
        self._count(p, out)
        chunks = []
        base = {"id": self.request_id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.served.model_name}
        if out.index not in self.choices:  # the first chunk of a choice names the role
            self.choices[out.index] = {}
            chunks.append({**base, "choices": [{"index": out.index, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]})
        if out.text or out.finished:
            lp = self._logprobs(out.token_ids, out.logprobs) if self.body.logprobs else None
            delta = {"content": out.text} if out.text else {}
            chunks.append({**base, "choices": [{"index": out.index, "delta": delta, "logprobs": lp,
                                                "finish_reason": out.finish_reason}]})
        return chunks
