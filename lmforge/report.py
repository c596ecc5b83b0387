"""The run report: report.md with a loss-curve picture and the held-out figures beside baselines."""

from __future__ import annotations

from pathlib import Path

from lmforge.base import read_metrics


def plot_loss(metrics_path: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    records = [record for record, _ in read_metrics(metrics_path)[0]]  # a cut last line is skipped
    train = [(r["tokens"] / 1e6, r["loss"]) for r in records if "loss" in r]
    val = [r for r in records if "val_bpb" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss (nats/token)", color="tab:blue", linewidth=1)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("train loss (nats/token)")
    ax.grid(alpha=0.3)
    if val:
        tokens_per_step = train[-1][0] / max(1, [r["step"] for r in records if "loss" in r][-1]) if train else 0
        ax2 = ax.twinx()
        ax2.plot([r["step"] * tokens_per_step for r in val], [r["val_bpb"] for r in val], "o-", color="tab:red",
                 label="held-out bits/byte", markersize=3)
        ax2.set_ylabel("held-out bits per byte", color="tab:red")
        ax2.set_ylim(top=min(8.0, max(r["val_bpb"] for r in val)) * 1.02)
    fig.legend(loc="upper right", bbox_to_anchor=(0.88, 0.88), fontsize=8)
    ax.set_title("lmforge run: loss curve")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)


def rate_text(figures: dict, key: str = "pass") -> str:
    """'k/n = p% (95% CI lo-hi)' of codetask.score's figures: key 'pass' or 'doctest'."""
    if key == "pass":
        k, n, (lo, hi) = figures["passed"], figures["n"], figures["pass_rate_ci95"]
    else:
        k, n, (lo, hi) = figures["doctests_passed"], figures["doctest_tasks"], figures["doctest_rate_ci95"]
    return f"{k}/{n} = {k / max(1, n):.1%} (95% CI {lo:.1%}-{hi:.1%})"


def code_section(code: dict | None) -> list[str]:
    """The SFT stage's figures: held-out code requests answered by the base and the chat model."""
    if not code:
        return []
    base, chat, sft = code["base"], code["chat"], code["sft"]
    if base["passed"]:
        versus = f"The chat model passes {chat['pass_rate'] / base['pass_rate']:.1f}x as often as the base model."
    else:
        versus = (f"The base model passes none (95% upper bound {base['pass_rate_ci95'][1]:.1%}): it has never seen "
                  "the chat format.")
    lines = [
        "## Chat model: writing functions on request (chat/)",
        "",
        f"Fine-tuned on {code['train_tasks']:,} \"write a Python function `name(args)` that ...\" tasks made from "
        f"the stdlib's own functions (loss on the answers only, {sft['steps']} steps; validation loss "
        f"{sft['final'].get('val_loss', float('nan')):.3f}), then asked {code['val_tasks']} held-out requests "
        "(greedy, repetition penalty 1.1, the same for both models). "
        "An answer passes when it ends its turn, parses, and defines the requested function.",
        "",
        "| model | passed | doctests passed |",
        "|---|---|---|",
        f"| base (prompted the same way) | {rate_text(base)} | {rate_text(base, 'doctest')} |",
        f"| **chat** | **{rate_text(chat)}** | {rate_text(chat, 'doctest')} |",
        "",
        f"{versus} Held-out requests are a hash slice of the tasks ({code['val_from_heldout_files']} of them from "
        "files pretraining never saw): the base model read most of these functions' code in pretraining, as the "
        "chat model did, so this measures answering unseen requests in chat form, not writing code never seen. "
        "Answers: `chat/code_eval.json`.",
        "",
    ]
    shown = next((a for a in code["answers"] if a["chat"].strip()), None)
    if shown:
        lines += ["Example:", "", f"> {shown['prompt']}", "", "```python", shown["chat"].strip(), "```", ""]
    return lines


def write_report(run_dir: Path, facts: dict) -> Path:
    """facts: the dict `lmforge run` collects (corpus, tokenizer, model, train, eval, samples, timings)."""
    plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png")
    data, train, ev, model = facts["data"], facts["train"], facts["eval"], facts["model"]
    split = data["splits"]
    lines = [
        f"# lmforge run: {run_dir.name}",
        "",
        f"Trained from nothing on `{data['corpus']}` in {facts['total_minutes']:.1f} minutes on {facts['machine']}.",
        "",
        "## Held-out quality (bits per byte, lower is better)",
        "",
        f"On the held-out split: {split['val']['num_documents']:,} documents, {ev['num_bytes']:,} bytes.",
        "",
        "| predictor | bits/byte |",
        "|---|---|",
        f"| **this model** | **{ev['bpb']:.3f}** |",
        *(f"| {name} | {bpb:.3f} |" for name, bpb in ev["compressors"].items()),
        "",
        f"The model needs {ev['bpb'] / ev['compressors']['xz -9']:.1%} of the bits xz -9 needs for these bytes. "
        "How compressible the held-out documents are varies with which ones the hash picks, so compare "
        "models with each other and with the compressors on the same split, not across corpora.",
        "",
        "![loss curve](loss.png)",
        "",
        *code_section(facts.get("code")),
        "## Recipe",
        "",
        f"- corpus: {split['train']['num_documents']:,} train documents ({split['train']['num_bytes'] / 1e6:.1f} MB, "
        f"{split['train']['num_tokens']:,} tokens); held out by hash of the document id (2%)",
        *([f"- data pipeline: {facts['pipeline']['documents_in']:,} documents in, "
           f"{sum(facts['pipeline']['dropped'].values()):,} dropped ("
           + ", ".join(f"{n:,} {r}" for r, n in sorted(facts["pipeline"]["dropped"].items(), key=lambda x: -x[1]))
           + f"), PII values redacted: {facts['pipeline']['redacted']:,}; every count in "
           "[data/data_card.md](data/data_card.md)"] if facts.get("pipeline") else []),
        f"- tokenizer: byte-level BPE, {facts['tokenizer']['vocab_size']:,} tokens, "
        f"{facts['tokenizer']['bytes_per_token']:.2f} bytes/token on the training split",
        f"- model: Llama-style decoder, {model['num_hidden_layers']} layers, width {model['hidden_size']}, "
        f"{model['num_attention_heads']} heads ({model['num_key_value_heads']} key/value), SwiGLU "
        f"{model['intermediate_size']}, context {model['max_position_embeddings']}, "
        f"{'tied' if model['tie_word_embeddings'] else 'untied'} embeddings; "
        f"{train['num_params'] / 1e6:.2f}M parameters",
        f"- training: {facts['recipe']}",
        f"- ran {train['steps']:,} steps, {train['tokens'] / 1e6:.1f}M tokens "
        f"({train['tokens'] / max(1, split['train']['num_tokens']):.2f} epochs) in {train['elapsed_s'] / 60:.1f} "
        f"min: {train['tokens_per_s']:,.0f} tokens/s, MFU {100 * train['mfu']:.1f}% of measured matmul peak",
        "",
        "## Time per stage",
        "",
        "| stage | seconds |",
        "|---|---|",
        *(f"| {stage} | {sec:.1f} |" for stage, sec in facts["timings"].items()),
        "",
        "## Samples",
        "",
        f"Sampling: {facts['sampling']}.",
        "",
    ]
    for prompt, text in facts["samples"]:
        lines += [f"**Prompt** `{prompt!r}`", "", "```", prompt + text, "```", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
