"""Supervised fine-tuning: conversation checks, the assistant-only mask, packing, the loop's exact
resume, and the chat loop."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.chat import chat_loop, fit_history
from lmforge.checkpoint import save_model_folder
from lmforge.common import LmforgeError
from lmforge.conversations import check_messages, read_conversations, read_preferences, render
from lmforge.model import ModelConfig, Transformer
from lmforge.posttrain import FitConfig, fit_to_context, pack
from lmforge.sft import SFTConfig, load_settings, sft
from lmforge.tokenizer import CHAT_TEMPLATE, Tokenizer

CLI = [sys.executable, "-m", "lmforge.cli"]


@pytest.fixture(scope="module")
def tokenizer(small_data) -> Tokenizer:
    return Tokenizer.load(small_data / "tokenizer.json")


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, tokenizer) -> Path:
    config = ModelConfig.from_depth(1, tokenizer.vocab_size, 128, head_dim=16, aspect_ratio=32)
    model = Transformer(config)
    model.init_weights(seed=0)
    return save_model_folder(tmp_path_factory.mktemp("base") / "model", model, tokenizer)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def reversal_chats(n: int, seed: int = 0) -> list[dict]:
    """A task a tiny model learns in a few steps: say the word back reversed."""
    g = torch.Generator().manual_seed(seed)
    words = ["".join(chr(97 + int(c)) for c in torch.randint(0, 6, (4,), generator=g)) for _ in range(n)]
    return [{"messages": [{"role": "user", "content": f"reverse {w}"}, {"role": "assistant", "content": w[::-1]}]}
            for w in words]


def test_assistant_only_mask_on_a_hand_built_conversation(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def fib"},
                {"role": "assistant", "content": "(n): pass"}, {"role": "user", "content": "again"},
                {"role": "assistant", "content": "ok"}]
    ids, trained = render(tokenizer, messages)
    s = tokenizer.special_token_id
    enc = tokenizer.encode
    expected = [  # (tokens, trained) by hand, from lmforge's chat format
        ([s("<|bos|>"), s("<|system_start|>")], False), (enc("Be brief."), False), ([s("<|system_end|>")], False),
        ([s("<|user_start|>")], False), (enc("def fib"), False), ([s("<|user_end|>"), s("<|assistant_start|>")], False),
        (enc("(n): pass"), True), ([s("<|assistant_end|>")], True),
        ([s("<|user_start|>")], False), (enc("again"), False), ([s("<|user_end|>"), s("<|assistant_start|>")], False),
        (enc("ok"), True), ([s("<|assistant_end|>")], True)]
    assert ids == [t for tokens, _ in expected for t in tokens]
    assert trained == [flag for tokens, flag in expected for _ in tokens]
    # the rendering is the template's own: the same ids as rendering the whole conversation at once
    from lmforge.conversations import render_template
    assert ids == tokenizer.encode_with_special(render_template(CHAT_TEMPLATE, messages, tokenizer, False))


@pytest.mark.parametrize("messages, reason", [
    ([], "non-empty"),
    ([{"content": "hi"}, {"role": "assistant", "content": "x"}], "message 1 has no role"),
    ([{"role": "bot", "content": "hi"}], "role 'bot'"),
    ([{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}], "message 1 (user) has empty"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "assistant", "content": "c"}],
     "only the first"),
    ([{"role": "assistant", "content": "a"}], "answers no user"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
     "in a row"),
    ([{"role": "user", "content": "a"}], "last message is not an assistant"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}, {"role": "assistant", "content": "c"}],
     "tool result"),
])
def test_bad_conversations_are_named(messages, reason):
    assert reason in check_messages(messages)


def test_bad_lines_are_reported_with_line_numbers_and_counted(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [good, "{not json", {"messages": [{"content": "x"}]}, "",
                                              {"prompt": "p", "completion": "c"}, {"text": "no"}, "[1]",
                                              {"messages": [{"role": "assistant", "content": "first"}]}])
    conversations, lines, report = read_conversations(path)
    assert lines == [1, 5]  # the blank line 4 is not a line of data
    assert conversations[1] == [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]
    assert report.num_lines == 7 and sum(report.skipped.values()) == 5
    summary = report.summary()
    for where in (":2: not valid JSON", ":3: message 1 has no role", ":6: neither", ":7: not a JSON object",
                  ":8: message 1 is an assistant message"):
        assert where in summary
    with pytest.raises(LmforgeError, match=r"c.jsonl:2: not valid JSON"):
        read_conversations(path, on_error="raise")
    (tmp_path / "bad.jsonl").write_bytes(b'{"prompt": "\xff", "completion": "x"}\n')
    with pytest.raises(LmforgeError, match="no usable conversations.*|not valid UTF-8"):
        read_conversations(tmp_path / "bad.jsonl")


def test_preference_lines_are_checked(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "a"},
        {"prompt": "q", "chosen": "a"},
        {"prompt": [{"role": "assistant", "content": "q"}], "chosen": "a", "rejected": "b"}])
    pairs, report = read_preferences(path)
    assert [p.line for p in pairs] == [1] and pairs[0].prompt == [{"role": "user", "content": "q"}]
    assert ["same answer" in report.summary(), "missing rejected" in report.summary()] == [True, True]
    assert sum(report.skipped.values()) == 3


def test_too_long_conversations_are_dropped_or_truncated_and_counted():
    short = ([1, 2, 3], [False, True, True])
    long_ = (list(range(20)), [False] * 5 + [True] * 15)
    late = (list(range(20)), [False] * 15 + [True] * 5)  # its answer starts past the cut
    counts: dict = {}
    assert fit_to_context([short, long_, late], 9, "drop", counts) == [short]
    assert counts == {"too_long_dropped": 2}
    counts = {}
    kept = fit_to_context([short, long_, late], 9, "truncate", counts)
    assert kept == [short, (list(range(10)), [False] * 5 + [True] * 5)]
    assert counts == {"too_long_truncated": 1, "too_long_dropped": 1}


def test_packing_keeps_examples_whole_and_trains_only_their_answers():
    examples = [([100 + i] * n, [False] + [True] * (n - 1)) for i, n in enumerate([7, 3, 5, 4, 8, 2, 6, 9])]
    inputs, targets = pack(examples, seq_len=8, pad_id=0)
    assert inputs.shape[1] == 8 and inputs.shape[0] < len(examples)  # shared rows
    rows = torch.cat([inputs, targets[:, -1:].clamp(min=0)], 1)  # + the token after the last input (trained, or pad)
    for i, (tokens, _) in enumerate(examples):  # every example lies whole in exactly one row
        assert sum(int((row == 100 + i).sum()) == len(tokens) for row in rows) == 1
    want = sum(sum(mask[1:]) for _, mask in examples)  # an example's first token is never a target
    assert int((targets >= 0).sum()) == want
    assert torch.all(targets[targets >= 0] >= 100)  # no target is padding or crosses into another example's prompt


def _sft_config(data: Path, out: Path, **fit) -> SFTConfig:
    return SFTConfig(data=str(data), seq_len=64, val_fraction=0.2, device="cpu", dtype="fp32",
                     fit=FitConfig(out_dir=str(out), batch_size=4, lr=3e-3, warmup_steps=2, eval_every=1000,
                                   log_every=1, progress=False, **fit))


def test_sft_learns_the_answers_and_resumes_exactly(tmp_path, base_model):
    data = write_jsonl(tmp_path / "train.jsonl", reversal_chats(120))
    whole = sft(base_model, base_model / "tokenizer.json", _sft_config(data, tmp_path / "whole", max_steps=30,
                                                                       ckpt_every=15))
    assert whole["final"]["val_loss"] < 0.7 * whole["first"]["val_loss"]
    assert whole["counts"]["train_conversations"] + whole["counts"]["val_conversations"] == 120

    part = tmp_path / "part"
    sft(base_model, base_model / "tokenizer.json", _sft_config(data, part, max_steps=30, ckpt_every=15))
    # as if the disk lost the tail of the last checkpoint, the model and the end of the log: latest still
    # names step 30, which is broken, so the run resumes from step 15
    import shutil
    trainable = part / "checkpoints" / "step_000030" / "trainable.safetensors"
    trainable.write_bytes(trainable.read_bytes()[:-8])
    shutil.rmtree(part / "model")
    with open(part / "metrics.jsonl", "a") as f:
        f.write('{"step": 31, "loss"')
    folder, tok, cfg = load_settings(part)
    assert folder == base_model and cfg.fit.max_steps == 30
    sft(folder, tok, cfg, resume=True)

    a, b = (load_file(run / "model" / "model.safetensors") for run in (tmp_path / "whole", part))
    assert all(torch.equal(a[k], b[k]) for k in a)

    def losses(run):
        return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert losses(part) == losses(tmp_path / "whole") and len(losses(part)) == 30


def test_chat_loop_keeps_history_and_fits_the_context(tokenizer, base_model):
    from lmforge.checkpoint import load_model

    model = load_model(base_model)
    said = []
    inputs = iter(["hello", "/reset", "again", "/exit"])
    history = chat_loop(model, tokenizer, system="sys", max_tokens=5, temperature=0, read=lambda _: next(inputs),
                        write=said.append)
    assert [m["role"] for m in history] == ["system", "user", "assistant"]  # /reset dropped the first exchange
    assert history[1]["content"] == "again" and "(history cleared)\n" in said

    long_history = [{"role": "system", "content": "s"}] + [
        {"role": r, "content": "word " * 20} for _ in range(10) for r in ("user", "assistant")] + [
        {"role": "user", "content": "last"}]
    kept, dropped = fit_history(tokenizer, long_history, CHAT_TEMPLATE, budget=100)
    assert kept[0]["role"] == "system" and kept[-1]["content"] == "last" and kept[1]["role"] == "user"
    assert dropped > 0 and dropped % 2 == 0 and len(kept) == len(long_history) - dropped


def test_sft_cli_errors_are_one_line(tmp_path, base_model):
    out = subprocess.run(CLI + ["sft", "--model", str(base_model), "--data", str(tmp_path / "missing.jsonl"),
                                "--out", str(tmp_path / "o"), "--quiet"], capture_output=True, text=True)
    assert out.returncode == 2 and "missing.jsonl: no such file" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run(CLI + ["sft", "--out", str(tmp_path / "o"), "--resume"], capture_output=True, text=True)
    assert out.returncode == 2 and "not a fine-tuning run folder" in out.stderr


def test_lora_sft_trains_only_adapters_and_merges_into_the_model(tmp_path, base_model):
    from lmforge.checkpoint import load_model
    from lmforge.lora import load_adapter

    data = write_jsonl(tmp_path / "train.jsonl", reversal_chats(60))
    cfg = _sft_config(data, tmp_path / "lora", max_steps=6, ckpt_every=100)
    cfg.lora_rank, cfg.lora_targets = 4, ("q_proj", "v_proj")
    summary = sft(base_model, base_model / "tokenizer.json", cfg)
    c = load_model(base_model).config
    per_layer = 4 * (c.hidden_size + c.num_attention_heads * c.head_dim) + 4 * (
        c.hidden_size + c.num_key_value_heads * c.head_dim)
    assert summary["num_trainable"] == c.num_hidden_layers * per_layer
    ckpt = load_file(tmp_path / "lora" / "checkpoints" / "step_000006" / "trainable.safetensors")
    assert all("lora_" in k for k in ckpt)  # a LoRA checkpoint holds the adapters only
    merged = load_model(tmp_path / "lora" / "model")
    adapted = load_model(base_model)
    load_adapter(adapted, tmp_path / "lora" / "adapter")
    ids = torch.randint(0, c.vocab_size, (2, 24))
    with torch.no_grad():
        assert (merged(ids) - adapted(ids)).abs().max() < 1e-5
        assert (merged(ids) - load_model(base_model)(ids)).abs().max() > 1e-4  # the adapters did learn something
