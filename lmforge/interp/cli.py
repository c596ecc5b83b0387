"""`lmforge inspect ...`: see inside a model from the command line.

Each family of commands adds its subcommands in its own function below; the work is done by the
library modules beside this file, imported only when a command runs (building the parser stays
cheap for every other lmforge command).
"""

from __future__ import annotations

import argparse


def _model_args(p: argparse.ArgumentParser) -> None:
    """--run / --model: the model to look inside (a run folder or a model folder)."""
    p.add_argument("--run", help="a run folder (runs/NAME) whose model to inspect")
    p.add_argument("--model", help="a model folder (config.json + model.safetensors + tokenizer.json), e.g. "
                                   "one `lmforge import` wrote")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")


def load_for_inspect(args):
    """(HookedModel, tokenizer) for --run/--model, in fp32 (the figures these commands print are fp32's)."""
    import torch

    from lmforge.checkpoint import load_model, resolve_model_folder
    from lmforge.common import get_device
    from lmforge.interp.hooks import HookedModel
    from lmforge.tokenizer import load_tokenizer

    folder, tokenizer_file = resolve_model_folder(args.run, args.model)
    model = load_model(folder, get_device(args.device), dtype=torch.float32).eval()
    return HookedModel(model), load_tokenizer(tokenizer_file)


def _add_hooks(isub) -> None:
    p = isub.add_parser("points", help="list the hook points of a model, with the shape each holds",
                        description="List every hook point (TransformerLens names) and the shape of its activation "
                                    "on a short prompt.")
    _model_args(p)
    p.add_argument("--prompt", default="Hello, world", help="text to run to get the shapes (default: %(default)r)")
    p.set_defaults(func=cmd_points)


def cmd_points(args) -> None:
    import torch

    hooked, tok = load_for_inspect(args)
    ids = torch.tensor([tok.encode(args.prompt)], device=hooked.model.lm_head.weight.device)
    with torch.no_grad():
        _, cache = hooked.run_with_cache(ids)
    for name, value in cache.items():
        print(f"{name:40s} {tuple(value.shape)}")


def add_inspect_parser(sub) -> None:
    p = sub.add_parser("inspect", help="look inside a model: hook points, lenses, attention, embeddings, SAEs, "
                                       "steering",
                       description="Interpretability on a run's or an imported model: every command loads the model "
                                   "in fp32 and reads it through named hook points (lmforge/interp).")
    isub = p.add_subparsers(dest="inspect_command", required=True, metavar="COMMAND")
    from lmforge.interp.cli_embeddings import _add_embeddings

    for add in (_add_hooks, _add_embeddings):
        add(isub)
