"""Hook points by path on an lmforge model, applied from outside: cache, read and rewrite activations.

`HookedModel(model)` runs the same modules and weights as `model(input_ids)`, in the same order,
but through this file's forward pass, which passes each intermediate activation through a named
hook point (TransformerLens's names, so notebooks written for it read the same here):

    hook_embed                                         token embeddings              (B, T, D)
    blocks.{i}.hook_resid_pre                          residual stream into layer i   (B, T, D)
    blocks.{i}.ln1.hook_normalized                     input_layernorm(resid_pre)     (B, T, D)
    blocks.{i}.attn.hook_q / hook_k / hook_v           projections, before rotation   (B, T, H or K, Hd)
    blocks.{i}.attn.hook_rot_q / hook_rot_k            after the rotation (and QK-norm) (B, T, H or K, Hd)
    blocks.{i}.attn.hook_attn_scores                   scaled, masked scores          (B, H, T, T)
    blocks.{i}.attn.hook_pattern                       softmax of the scores          (B, H, T, T)
    blocks.{i}.attn.hook_z                             each head's mix of values      (B, T, H, Hd)
    blocks.{i}.hook_attn_out                           o_proj(z)                      (B, T, D)
    blocks.{i}.hook_resid_mid                          resid_pre + attn_out           (B, T, D)
    blocks.{i}.ln2.hook_normalized                     post_attention_layernorm(...)  (B, T, D)
    blocks.{i}.mlp.hook_pre / hook_pre_linear          gate and up projections        (B, T, F)
    blocks.{i}.mlp.hook_post                           silu(gate) * up                (B, T, F)
    blocks.{i}.hook_mlp_out                            down_proj(post)                (B, T, D)
    blocks.{i}.hook_resid_post                         resid_mid + mlp_out            (B, T, D)
    ln_final.hook_normalized                           the final norm: what the head reads (B, T, D)

The model file stays pure (no hook modules inside it), and a model without hooks pays nothing.
Attention runs through the fused `scaled_dot_product_attention` unless the scores or pattern are
cached or hooked; then it is computed eagerly (q k^T / sqrt(Hd), mask, softmax, @ v), as Hugging
Face's `attn_implementation="eager"` does, so the pattern exists to be read or patched.

A hook is `fn(activation, hook) -> tensor | None` (TransformerLens's signature): `hook.name` is the
point's path and `hook.layer` its layer (None outside the blocks); returning a tensor replaces the
activation, returning None keeps it (a read-only hook). A hook that edits a tensor in place must
still return it: at the attention scores and pattern, only a returned tensor switches the layer's
output from the fused attention to the edited pattern.

Shape legend: B batch, T tokens, D hidden_size, H query heads, K key/value heads, Hd head_dim,
F intermediate_size, V vocab_size.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge.common import LmforgeError
from lmforge.model import Transformer, apply_rotary, causal_attention

BLOCK_POINTS = ("hook_resid_pre", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v",
                "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z",
                "hook_attn_out", "hook_resid_mid", "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_pre_linear",
                "mlp.hook_post", "hook_mlp_out", "hook_resid_post")
EAGER_POINTS = ("attn.hook_attn_scores", "attn.hook_pattern")  # these exist only on the eager attention path


@dataclass(frozen=True)
class Hook:
    """What a hook function is told about the point it runs at."""
    name: str
    layer: int | None


HookFn = Callable[[torch.Tensor, Hook], "torch.Tensor | None"]
NamesFilter = Callable[[str], bool] | Iterable[str] | str | None


def hook_point_names(num_layers: int) -> list[str]:
    """Every hook point of a model with num_layers blocks, in the order the forward pass reaches them."""
    names = ["hook_embed"]
    for i in range(num_layers):
        names += [f"blocks.{i}.{p}" for p in BLOCK_POINTS]
    return names + ["ln_final.hook_normalized"]


def _name_test(names: NamesFilter, known: list[str]) -> Callable[[str], bool]:
    """A predicate over point names from a callable, one name, or a list of names (each checked)."""
    if names is None:
        return lambda name: True
    if callable(names):
        return names
    wanted = {names} if isinstance(names, str) else set(names)
    unknown = sorted(wanted - set(known))
    if unknown:
        raise LmforgeError(f"unknown hook point {unknown[0]!r}; points look like 'blocks.0.hook_resid_post' "
                           f"(see lmforge.interp.hooks.hook_point_names)")
    return wanted.__contains__


class ActivationCache(dict):
    """Activations by hook point name, detached, in the order the forward pass reached them."""

    def __init__(self, num_layers: int):
        super().__init__()
        self.num_layers = num_layers

    def stack(self, point: str, layers: Iterable[int] | None = None) -> torch.Tensor:
        """One block point over layers: `stack("hook_resid_post")` -> (L, B, T, D)."""
        layers = range(self.num_layers) if layers is None else layers
        return torch.stack([self[f"blocks.{i}.{point}"] for i in layers])

    def accumulated_resid(self) -> tuple[torch.Tensor, list[str]]:
        """The residual stream before each layer and after the last: (L + 1, B, T, D), with labels."""
        parts = [self[f"blocks.{i}.hook_resid_pre"] for i in range(self.num_layers)]
        parts.append(self[f"blocks.{self.num_layers - 1}.hook_resid_post"])
        labels = [f"{i}_pre" for i in range(self.num_layers)] + [f"{self.num_layers - 1}_post"]
        return torch.stack(parts), labels


class HookedModel:
    """An lmforge Transformer (the Llama family) run through named hook points; see the module doc."""

    def __init__(self, model: torch.nn.Module):
        from lmforge.checkpoint import unwrap

        model = unwrap(model)
        if not isinstance(model, Transformer):
            raise LmforgeError(f"hook points are defined for the Llama-family model (model.py); this is a "
                               f"{type(model).__name__}")
        self.model = model
        self.config = model.config
        self.hook_names = hook_point_names(self.config.num_hidden_layers)
        self._hooks: dict[str, list[HookFn]] = {}

    # -- hooks ------------------------------------------------------------------------------------

    def add_hook(self, name: str | Callable[[str], bool], fn: HookFn) -> None:
        """Run fn at the point `name` (or at every point the predicate accepts) until reset_hooks()."""
        test = _name_test(name, self.hook_names)
        for point in self.hook_names:
            if test(point):
                self._hooks.setdefault(point, []).append(fn)

    def reset_hooks(self) -> None:
        self._hooks.clear()

    def run_with_hooks(self, input_ids: torch.Tensor, fwd_hooks: list[tuple[str | Callable[[str], bool], HookFn]],
                       **kwargs) -> torch.Tensor:
        """Logits (B, T, V) with these hooks in place for one forward pass (removed afterwards, even on error)."""
        saved = {k: list(v) for k, v in self._hooks.items()}
        try:
            for name, fn in fwd_hooks:
                self.add_hook(name, fn)
            return self(input_ids, **kwargs)
        finally:
            self._hooks = saved

    def run_with_cache(self, input_ids: torch.Tensor, names_filter: NamesFilter = None,
                       fwd_hooks: list | None = None, **kwargs) -> tuple[torch.Tensor, ActivationCache]:
        """Logits and the activations at every point names_filter accepts (all by default). Hooks in
        fwd_hooks run first; the cache holds what they return, as the next computation sees it."""
        test = _name_test(names_filter, self.hook_names)
        cache = ActivationCache(self.config.num_hidden_layers)

        def keep(x, hook):
            cache[hook.name] = x.detach()

        logits = self.run_with_hooks(input_ids, list(fwd_hooks or []) + [(test, keep)], **kwargs)
        return logits, cache

    def _point(self, name: str, x: torch.Tensor, layer: int | None = None,
               replaced: list | None = None) -> torch.Tensor:
        """x through the hooks at this point; `replaced` (if given) gets the name when one rewrote x."""
        for fn in self._hooks.get(name, ()):
            out = fn(x, Hook(name, layer))
            if out is not None:
                if out.shape != x.shape:
                    raise LmforgeError(f"hook at {name} returned shape {tuple(out.shape)}; it must keep "
                                       f"{tuple(x.shape)}")
                x = out
                if replaced is not None:
                    replaced.append(name)
        return x

    def _hooked(self, name: str) -> bool:
        return name in self._hooks

    # -- the forward pass, the same maths as model.Transformer's ------------------------------------

    def __call__(self, input_ids: torch.Tensor, start_at_layer: int | None = None,
                 stop_at_layer: int | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V). With start_at_layer, input_ids is instead the residual
        stream (B, T, D) entering that layer; with stop_at_layer, the residual stream entering that
        layer is returned instead of logits (TransformerLens's two arguments)."""
        m, c = self.model, self.config
        if start_at_layer is None:
            x, first = self._point("hook_embed", m.model.embed_tokens(input_ids)), 0
        else:
            x, first = input_ids, start_at_layer
        T = x.size(1)
        if T > c.max_position_embeddings:
            raise LmforgeError(f"sequence of {T} tokens exceeds the model's context of {c.max_position_embeddings}")
        cos, sin = m.rope_cos[:T], m.rope_sin[:T]
        last = c.num_hidden_layers if stop_at_layer is None else stop_at_layer
        for i in range(first, last):
            x = self._block(i, x, cos, sin)
        if stop_at_layer is not None:
            return x
        x = self._point("ln_final.hook_normalized", m.model.norm(x))
        return m.lm_head(x)

    def _block(self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        layer, p = self.model.model.layers[i], f"blocks.{i}."
        x = self._point(p + "hook_resid_pre", x, i)
        h = self._point(p + "ln1.hook_normalized", layer.input_layernorm(x), i)
        attn_out = self._point(p + "hook_attn_out", self._attention(i, layer.self_attn, h, cos, sin), i)
        x = self._point(p + "hook_resid_mid", x + attn_out, i)
        h = self._point(p + "ln2.hook_normalized", layer.post_attention_layernorm(x), i)
        mlp = layer.mlp
        if hasattr(mlp, "gate_up"):
            gate, up = mlp.gate_up(h)  # (B, T, F) each
            gate = self._point(p + "mlp.hook_pre", gate, i)
            up = self._point(p + "mlp.hook_pre_linear", up, i)
            post = self._point(p + "mlp.hook_post", F.silu(gate) * up, i)
            mlp_out = mlp.down_proj(post)
        else:  # a swapped-in block (an attention-only model's zero MLP): no inner points
            mlp_out = mlp(h)
        mlp_out = self._point(p + "hook_mlp_out", mlp_out, i)
        return self._point(p + "hook_resid_post", x + mlp_out, i)

    def _attention(self, i: int, attn, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = h.shape
        p = f"blocks.{i}.attn."
        q, k, v = attn.project(h)
        q = self._point(p + "hook_q", q.view(B, T, attn.n_head, attn.head_dim), i)  # (B, T, H, Hd)
        k = self._point(p + "hook_k", k.view(B, T, attn.n_kv_head, attn.head_dim), i)  # (B, T, K, Hd)
        v = self._point(p + "hook_v", v.view(B, T, attn.n_kv_head, attn.head_dim), i)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q = apply_rotary(q.transpose(1, 2), cos, sin)  # (B, H, T, Hd)
        k = apply_rotary(k.transpose(1, 2), cos, sin)  # (B, K, T, Hd)
        q = self._point(p + "hook_rot_q", q.transpose(1, 2), i).transpose(1, 2)
        k = self._point(p + "hook_rot_k", k.transpose(1, 2), i).transpose(1, 2)
        v = v.transpose(1, 2)  # (B, K, T, Hd)
        y = None
        if any(self._hooked(p + n.split(".", 1)[1]) for n in EAGER_POINTS):
            y = self._eager_attention(i, q, k, v, attn.sliding_window)  # None when the hooks only read
        if y is None:
            y = causal_attention(q, k, v, window=attn.sliding_window)  # (B, H, T, Hd)
        z = self._point(p + "hook_z", y.transpose(1, 2), i)  # (B, T, H, Hd)
        return attn.o_proj(z.reshape(B, T, attn.n_head * attn.head_dim))

    def _eager_attention(self, i: int, q, k, v, window: int | None) -> torch.Tensor | None:
        """softmax(q k^T / sqrt(Hd) + causal mask) v, with the scores and pattern passed through their
        points. When no hook there replaced either, None: the caller keeps the fused attention's output,
        so reading the pattern leaves the logits exactly as they are without hooks (the eager sum rounds
        differently: about 5e-5 on SmolLM2's logits)."""
        p = f"blocks.{i}.attn."
        replaced = []
        T, groups = q.size(2), q.size(1) // k.size(1)
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, T, Hd)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.size(-1))  # (B, H, T, T)
        pos = torch.arange(T, device=q.device)
        visible = pos[None, :] <= pos[:, None]  # (T, T): key j <= query i
        if window is not None:
            visible &= pos[None, :] > pos[:, None] - window
        scores = self._point(p + "hook_attn_scores", scores.masked_fill(~visible, float("-inf")), i, replaced)
        pattern = self._point(p + "hook_pattern", torch.softmax(scores.float(), dim=-1).to(q.dtype), i, replaced)
        return pattern @ v if replaced else None  # (B, H, T, Hd)


def layer_of(name: str) -> int | None:
    """The layer a point name belongs to: 'blocks.3.hook_resid_post' -> 3; None outside the blocks."""
    m = re.match(r"blocks\.(\d+)\.", name)
    return int(m.group(1)) if m else None
