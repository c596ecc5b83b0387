"""PLACEHOLDER, to be replaced by the vocab branch (h-vocab), which writes the real module.

GGUF tokenizer metadata (tokenizer.ggml.*) as tokenizer.json + tokenizer_config.json: byte-level
BPE ("gpt2" model) only, for the pre-tokenizers lmforge's export writes and SmolLM2's. Just enough
for import_gguf.py to be tested end to end; no SentencePiece-style vocabularies, no post-processor.
"""

from __future__ import annotations

import gguf

from lmforge.common import LmforgeError
from lmforge.export_gguf import GPT2_SPLIT_PATTERN, LLAMA3_SPLIT_PATTERN, QWEN2_SPLIT_PATTERN

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}


def _pre_tokenizer(pre: str) -> dict | None:
    def split(pattern: str) -> dict:
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {**_BYTE_LEVEL, "use_regex": False}]}

    if pre == "gpt-2":
        return {**_BYTE_LEVEL, "use_regex": True}
    if pre == "smollm":  # llama.cpp: single digits, then GPT-2's regex
        return {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                      {**_BYTE_LEVEL, "use_regex": True}]}
    return {"llama-bpe": split(LLAMA3_SPLIT_PATTERN), "qwen2": split(QWEN2_SPLIT_PATTERN),
            "default": split(GPT2_SPLIT_PATTERN)}.get(pre)


def gguf_tokenizer_files(reader: gguf.GGUFReader) -> dict[str, dict]:
    fields = reader.fields
    K = gguf.Keys.Tokenizer

    def value(key, default=None):
        return fields[key].contents() if key in fields else default

    model, pre = value(K.MODEL), value(K.PRE, "default")
    pre_tokenizer = _pre_tokenizer(pre)
    if model != "gpt2" or pre_tokenizer is None:
        raise LmforgeError(f"tokenizer {model!r} / pre-tokenizer {pre!r}: not handled by this placeholder")
    tokens, types = value(K.LIST), value(K.TOKEN_TYPE) or []
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": t == gguf.TokenType.CONTROL}
             for i, t in enumerate(types) if t in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)]
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": pre_tokenizer, "post_processor": None,
            "decoder": {**_BYTE_LEVEL, "add_prefix_space": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": pre == "llama-bpe", "vocab": vocab, "merges": value(K.MERGES) or []}}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": bool(value(K.ADD_BOS, False))}
    for kind, key in (("bos", K.BOS_ID), ("eos", K.EOS_ID), ("pad", K.PAD_ID), ("unk", K.UNK_ID)):
        if value(key) is not None:
            config[f"{kind}_token"] = tokens[value(key)]
    if value(K.CHAT_TEMPLATE) is not None:
        config["chat_template"] = value(K.CHAT_TEMPLATE)
    return {"tokenizer.json": spec, "tokenizer_config.json": config}
