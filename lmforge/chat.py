"""`lmforge chat`: talk to a model in the terminal, streaming, with history.

Each turn renders the whole conversation through the model's chat template (as `lmforge serve`
does for /v1/chat/completions), generates until the model ends its turn, and keeps the answer in
the history. When the history no longer fits the context, the earliest exchanges are dropped
(the system message stays) and the user is told. `/reset` clears the history, `/exit` or Ctrl-D
leaves.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from lmforge.common import LmforgeError
from lmforge.conversations import chat_stop_ids, chat_template, encode_chat
from lmforge.generate import generate, stream_text


def prompt_ids(tokenizer, messages: list[dict], template: str) -> list[int]:
    return encode_chat(tokenizer, messages, template)


def fit_history(tokenizer, messages: list[dict], template: str, budget: int) -> tuple[list[dict], int]:
    """Drop the oldest exchanges (keeping a system message) until the prompt is at most `budget`
    tokens; returns the kept messages and how many were dropped."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest = messages[len(system):]
    dropped = 0
    while len(prompt_ids(tokenizer, system + rest, template)) > budget and len(rest) > 1:
        cut = next((i for i in range(1, len(rest)) if rest[i]["role"] == "user"), len(rest) - 1)
        rest, dropped = rest[cut:], dropped + cut
    return system + rest, dropped


def chat_loop(model: torch.nn.Module, tokenizer, *, system: str | None = None, max_tokens: int = 256,
              temperature: float = 0.7, top_k: int | None = None, top_p: float | None = 0.95,
              seed: int | None = None, device: torch.device | None = None, dtype: torch.dtype = torch.float32,
              read: Callable[[str], str] = input, write: Callable[[str], None] | None = None) -> list[dict]:
    """Run the conversation until /exit or end of input; returns the final history."""
    template = chat_template(tokenizer)
    write = write or (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    context = model.config.max_position_embeddings
    if max_tokens >= context:
        raise LmforgeError(f"--max-tokens {max_tokens} leaves no room for the conversation in the model's "
                           f"context of {context} tokens; lower it")
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    stops = chat_stop_ids(tokenizer)
    turn = 0
    while True:
        try:
            text = read("you> ").strip()
        except EOFError:
            write("\n")
            return messages
        if text in ("/exit", "/quit"):
            return messages
        if text == "/reset":
            messages = list(start)
            write("(history cleared)\n")
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        messages, dropped = fit_history(tokenizer, messages, template, context - max_tokens)
        if dropped:
            write(f"(dropped the {dropped} earliest messages to fit the {context}-token context)\n")
        ids = prompt_ids(tokenizer, messages, template)
        if len(ids) > context - max_tokens:
            messages.pop()
            write(f"(that message alone is longer than the context allows; {len(ids)} tokens)\n")
            continue
        write("model> ")
        tokens = generate(model, ids, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          seed=None if seed is None else seed + turn, stop_ids=stops, device=device, dtype=dtype,
                          num_tokens=tokenizer.vocab_size)
        answer = []
        for piece in stream_text(tokenizer, tokens):
            answer.append(piece)
            write(piece)
        write("\n")
        messages.append({"role": "assistant", "content": "".join(answer)})
        turn += 1
