"""Interpretability on lmforge's own models: hook points, lenses, embeddings, sparse autoencoders
and steering, applied from outside the model (model.py stays pure).
Import from the modules (`from lmforge.interp.hooks import HookedModel`): this package imports
nothing, so `lmforge --help` does not load torch.

    hooks.py       HookedModel: TransformerLens-named hook points, run_with_cache, run_with_hooks
    sae.py         TopK sparse autoencoders: training, metrics, SAELens format
    cli.py         the `lmforge inspect` command family
"""

