"""Request bodies, as pydantic models, with every list and string bounded.

A body is parsed only after the admission gate has authenticated it and cut it at the size limit
(admission.py), so the bounds here are the second line: they keep one accepted request from
asking the engine for unbounded work (a thousand stop strings checked at every token, a list of
100,000 embedding inputs, a message list longer than any context). Where OpenAI documents a limit
the bound is OpenAI's (4 stop sequences, 2,048 embedding inputs, n <= 128 in the engine); the
rest are generous for honest use and small next to what an attacker would need.

Field names and defaults are OpenAI's; fields beyond OpenAI's (top_k, min_p, repetition_penalty,
stop_token_ids, ignore_eos, skip_special_tokens) are vLLM's. An unknown field is a 400 naming it
(`extra="forbid"`), not silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_PROMPTS = 64  # completions' list-of-prompts form; each prompt still fits the context
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit
MAX_MESSAGES = 1024
MAX_CONTENT_PARTS = 256
MAX_TEXT_CHARS = 1 << 20  # one prompt, message or input; the body limit is usually hit first
MAX_TOKEN_IDS = 1 << 17  # token ids in one prompt/input/detokenize call: above any context served here
MAX_NAME_CHARS = 256
MAX_FEEDBACK_CHARS = 1 << 16
INT64 = 2 ** 63  # seeds are 64-bit, as OpenAI's; torch's generator takes them as they are

Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
Name = Annotated[str, Field(max_length=MAX_NAME_CHARS)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0, lt=INT64)]], Field(max_length=MAX_TOKEN_IDS)]
Stop = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: Name
    max_tokens: int | None = Field(default=None, ge=0, lt=INT64)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    user: Name | None = None
    logit_bias: dict[str, float] | None = Field(default=None, max_length=300)  # OpenAI: up to 300 tokens
    store: bool = False  # keep the response for /v1/feedback
    # Beyond OpenAI, as vLLM accepts them
    top_k: int | None = Field(default=None, ge=1, lt=INT64)
    min_p: float = Field(default=0.0, ge=0, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0, le=100)
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0, lt=INT64)]],
                              Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True  # false: special tokens appear in the text too


class CompletionRequest(_Sampling):
    prompt: Text | Annotated[list[Text], Field(max_length=MAX_PROMPTS)] | TokenIds \
        | Annotated[list[TokenIds], Field(max_length=MAX_PROMPTS)]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    suffix: Text | None = None
    best_of: int | None = Field(default=None, ge=1, le=16)


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class OtherPart(BaseModel):
    """A content part of a kind this server cannot read (image_url, input_audio, file): parsed only so
    the answer can name it (generation.py refuses it with a 400)."""
    model_config = ConfigDict(extra="allow")
    type: Name


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | Annotated[list[TextPart | OtherPart], Field(max_length=MAX_CONTENT_PARTS)] | None = None
    name: Name | None = None
    tool_call_id: Name | None = None


Messages = Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]


class ChatRequest(_Sampling):
    messages: Messages
    max_completion_tokens: int | None = Field(default=None, ge=0, lt=INT64)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class EmbeddingRequest(_Body):
    model: Name
    input: Text | Annotated[list[Text], Field(max_length=MAX_EMBEDDING_INPUTS)] | TokenIds \
        | Annotated[list[TokenIds], Field(max_length=MAX_EMBEDDING_INPUTS)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1, lt=INT64)
    user: Name | None = None


class TokenizeRequest(_Body):
    model: Name | None = None
    prompt: Text | None = None
    messages: Messages | None = None
    add_special_tokens: bool = False


class DetokenizeRequest(_Body):
    model: Name | None = None
    tokens: TokenIds


class FeedbackRequest(_Body):
    response_id: str = Field(min_length=1, max_length=64)
    choice_index: int = Field(default=0, ge=0, le=1 << 16)
    rating: Literal[1, -1, "up", "down"] | None = None
    preferred: str | None = Field(default=None, max_length=MAX_FEEDBACK_CHARS)  # a better answer, by the user
    comment: str | None = Field(default=None, max_length=MAX_FEEDBACK_CHARS)


class KeyCreateRequest(_Body):
    name: str = Field(min_length=1, max_length=100)
    models: Annotated[list[Name], Field(max_length=256)] | None = None
    rpm: int | None = Field(default=None, ge=1, lt=2 ** 31)  # the key store's columns are 32-bit
    tpm: int | None = Field(default=None, ge=1, lt=2 ** 31)
    token_budget: int | None = Field(default=None, ge=1, lt=INT64)
    admin: bool = False

