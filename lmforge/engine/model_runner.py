"""Runs the model on one engine step's packed batch against the paged KV cache.

A step's batch is every scheduled sequence's new tokens laid end to end, as one row: (1, N).
The model cannot tell: it asks its cache for the tokens' positions and hands each attention layer
its queries, keys and values (the cache face model.KVCache documents). `PagedKVCache` answers with
each token's own position, writes the new keys/values into their slots in the block pool, and
computes attention per sequence:

    decoding sequences (1 new token each)  one batched attention over their cached keys, gathered
                                            into a padded (Bd, K, S_max, Hd) view with a length mask
    prefilling sequences (a chunk each)     causal attention of the chunk over its cached prefix

On CPU, for a fused fp32 Llama-family model (one the engine owns), the decoding sequences and the
prompt chunks of up to KERNEL_MAX_CHUNK tokens skip all of that: they go through one C++ call
(cpu_decode.py), which reads the pool through the block tables itself. Longer chunks in the same
step still take the eager path above.

Shape legend: N packed new tokens, Bd decoding sequences, S keys of a sequence, L layers,
K key/value heads, H query heads, Hd head_dim, V vocab_size.
"""

from __future__ import annotations

import ctypes
import sys

import torch
import torch.nn.functional as F

from lmforge.common import autocast, kv_cache_dtype
from lmforge.engine.cpu_decode import CpuDecoder
from lmforge.engine.sequence import Sequence
from lmforge.model import causal_attention


def _pool(shape: tuple[int, ...], device, dtype) -> torch.Tensor:
    """A zeroed pool; on Linux CPUs asked onto transparent huge pages before its first touch. A decode
    step reads every sequence's blocks, scattered over the pool, and with 4 KiB pages each block
    starts with a TLB miss and a cold prefetcher."""
    pool = torch.empty(shape, device=device, dtype=dtype)
    if pool.device.type == "cpu" and sys.platform == "linux":
        page = 2 << 20
        start = -(-pool.data_ptr() // page) * page
        end = (pool.data_ptr() + pool.nbytes) // page * page
        if end > start:
            ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start),
                                                      14)  # MADV_HUGEPAGE; refused or not, the pool works
    return pool.zero_()


class PagedKVCache:
    """Keys and values of every layer in one pool of token slots: (L, num_blocks * block_size, K, Hd)."""

    def __init__(self, config, num_blocks: int, block_size: int, device, dtype):
        shape = (config.num_hidden_layers, num_blocks * block_size, config.num_key_value_heads, config.head_dim)
        self.k = _pool(shape, device, dtype)
        self.v = _pool(shape, device, dtype)
        self.block_size = block_size
        self.window = getattr(config, "sliding_window", None)
        self.device = device

    @staticmethod
    def bytes_per_block(config, block_size: int, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * config.head_dim * element

    def prepare(self, batch: list[tuple[Sequence, int]]) -> None:
        """Lay out one step: batch holds (sequence, number of new tokens), in packed order. Positions
        and slots are Python ints until one tensor each: per-sequence tensors cost more than the
        arithmetic: 0.18 instead of 0.77 ms a step at 32 decoding sequences (cProfile, CPU)."""
        dev, bs, positions, slots = self.device, self.block_size, [], []
        decode, self.prefills = [], []  # decode: (row, length, table); prefills: (first row, end row, start, table)
        row = 0
        for seq, n in batch:
            start, table = seq.num_computed, seq.block_table
            pos = range(start, start + n)
            positions.extend(pos)
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            if n == 1 and start > 0:
                decode.append((row, start + 1, table))
            else:
                self.prefills.append((row, row + n, start, torch.tensor(table, device=dev)))
            row += n
        self.num_tokens = row
        self._positions = torch.tensor(positions, device=dev)  # (N,)
        self.slot_mapping = torch.tensor(slots, device=dev)  # (N,)
        self.decode_rows = None
        if decode:
            rows, lengths, tables = zip(*decode)
            width = -(-max(lengths) // bs)
            padded = [(t + [0] * width)[:width] for t in tables]  # (Bd, blocks); padding is masked
            key_pos = torch.arange(width * bs)  # (S_max,), whole blocks
            lengths = torch.tensor(lengths)
            mask = key_pos < lengths[:, None]  # (Bd, S_max)
            if self.window is not None:  # the new token sits at lengths - 1 and sees `window` keys back
                mask &= key_pos > (lengths[:, None] - 1 - self.window)
            self.decode_rows = torch.tensor(rows, device=dev)
            self.decode_tables = torch.tensor(padded, device=dev)
            # One sequence on consecutive blocks (a lone stream's usual layout: the free list hands
            # them out in order) is read in place: no copy of its whole cache at every layer.
            first = padded[0][0]
            self.decode_span = ((first * bs, (first + width) * bs)
                                if len(decode) == 1 and padded[0] == list(range(first, first + width)) else None)
            self.decode_mask = mask[:, None, None, :].to(dev)  # (Bd, 1, 1, S_max)

    def _gather(self, pool: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """Keys or values of whole blocks: pool (slots, K, Hd), tables (B, n) -> (B, K, n * block_size, Hd).
        Copying block by block moves block_size contiguous rows at a time, not one slot at a time, and
        index_select on the flattened table beats indexing with the (B, n) table itself: 0.36 vs 0.45 ms
        a call in the engine at 32 sequences (bench/serve.py's shape, CPU; 4x when the pool is in cache)."""
        B, n = tables.shape
        blocks = pool.view(-1, self.block_size, *pool.shape[1:]).index_select(0, tables.reshape(-1))
        return blocks.view(B, n * self.block_size, *pool.shape[1:]).transpose(1, 2)

    # -- the cache face the model calls (see model.KVCache) --------------------------------------

    def positions(self, num_tokens: int) -> torch.Tensor:
        assert num_tokens == self.num_tokens, "the model must run the batch prepare() laid out"
        return self._positions

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int | None = None, scale: float | None = None) -> torch.Tensor:
        """q (1, H, N, Hd); k, v (1, K, N, Hd) for the packed new tokens. Returns (1, H, N, Hd)."""
        k_pool, v_pool = self.k[layer], self.v[layer]  # (slots, K, Hd)
        k_pool.index_copy_(0, self.slot_mapping, k[0].transpose(0, 1).to(k_pool.dtype))
        v_pool.index_copy_(0, self.slot_mapping, v[0].transpose(0, 1).to(v_pool.dtype))
        gqa = {"enable_gqa": True} if k.size(1) != q.size(1) else {}
        y = torch.empty_like(q)
        if self.decode_rows is not None:
            rows = self.decode_rows
            qd = q[0, :, rows].transpose(0, 1).unsqueeze(2)  # (Bd, H, 1, Hd)
            if self.decode_span is not None:
                first, end = self.decode_span
                kd, vd = k_pool[first:end].transpose(0, 1)[None], v_pool[first:end].transpose(0, 1)[None]
            else:
                kd = self._gather(k_pool, self.decode_tables)  # (Bd, K, S_max, Hd)
                vd = self._gather(v_pool, self.decode_tables)
            yd = F.scaled_dot_product_attention(qd, kd.to(qd.dtype), vd.to(qd.dtype), attn_mask=self.decode_mask,
                                                scale=scale, **gqa)  # (Bd, H, 1, Hd)
            y[0, :, rows] = yd[:, :, 0].transpose(0, 1)
        for first, end, start, table in self.prefills:
            if start == 0:  # nothing cached before the chunk: its own keys are all there is
                kp, vp = k[:, :, first:end], v[:, :, first:end]
            else:
                S = start + end - first
                used = table[:-(-S // self.block_size)][None]  # (1, blocks holding positions 0 .. S-1)
                kp = self._gather(k_pool, used)[:, :, :S].to(q.dtype)  # (1, K, S, Hd)
                vp = self._gather(v_pool, used)[:, :, :S].to(q.dtype)
            y[:, :, first:end] = causal_attention(q[:, :, first:end], kp, vp, start, window, scale)
        return y

    def advance(self, num_tokens: int) -> None:
        pass  # the scheduler moves each sequence's num_computed once the step is done


# Prompt chunks up to this many tokens go through the CPU kernel with the decoding sequences; longer ones
# through the eager model, whose fused attention beats the kernel's row-by-row walk over a long chunk.
# A lone prompt's prefill at bench/serve.py's shape (2-core EPYC, one thread), eager vs kernel: 32 tokens
# 2.1 vs 1.1 ms, 128 tokens 4.9 vs 4.5, 256 tokens 9.8 vs 11.2, 512 tokens 21.8 vs 33.0.
KERNEL_MAX_CHUNK = 128


class ModelRunner:
    """Owns the model and the KV pool; turns a scheduled batch into logits for the rows asked."""

    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, device: torch.device,
                 dtype: torch.dtype):
        self.model, self.device, self.dtype = model, device, dtype
        kv_dtype = kv_cache_dtype(model, dtype)
        self.cache = PagedKVCache(model.config, num_blocks, block_size, device, kv_dtype)
        # On CPU, decoding sequences and short prompt chunks go through one C++ call a step (cpu_decode.py).
        self.decoder = CpuDecoder.for_model(model, kv_dtype) if dtype == torch.float32 else None

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]], logit_rows: list[int]) -> torch.Tensor:
        """Compute the batch's new tokens into the cache; return fp32 logits (len(logit_rows), V)."""
        if self.decoder is None:
            return self._eager(batch, logit_rows)
        short = [n <= KERNEL_MAX_CHUNK for _, n in batch]
        if all(short):
            return self._kernel(batch, logit_rows)
        if not any(short):
            return self._eager(batch, logit_rows)
        # Long prompt chunks go through the eager model (its attention is one fused matmul-shaped op per
        # chunk), the rest through the kernel in the same step (they share no cache slots); the logits
        # are put back in the batch's row order.
        parts, where = ([], []), []  # parts: (eager, kernel) batches; where[packed row] = (part, row in it)
        num_rows = [0, 0]
        for (seq, n), in_kernel in zip(batch, short):
            parts[in_kernel].append((seq, n))
            where.extend((in_kernel, num_rows[in_kernel] + r) for r in range(n))
            num_rows[in_kernel] += n
        rows = ([], [])
        for r in logit_rows:
            rows[where[r][0]].append(where[r][1])
        logits = (self._eager(parts[0], rows[0]), self._kernel(parts[1], rows[1]))
        taken = [0, 0]
        picked = []
        for r in logit_rows:
            part = where[r][0]
            picked.append(logits[part][taken[part]])
            taken[part] += 1
        return torch.stack(picked)

    def _eager(self, batch: list[tuple[Sequence, int]], logit_rows: list[int]) -> torch.Tensor:
        ids = [t for seq, n in batch for t in seq.token_ids[seq.num_computed:seq.num_computed + n]]
        self.cache.prepare(batch)
        input_ids = torch.tensor([ids], device=self.device)  # (1, N)
        rows = torch.tensor(logit_rows, dtype=torch.long, device=self.device)  # may be empty (a mid-prompt chunk)
        with autocast(self.device, self.dtype):
            logits = self.model(input_ids, kv_cache=self.cache, logits_at=rows)  # (1, n, V)
        return logits[0].float()

    def _kernel(self, batch: list[tuple[Sequence, int]], logit_rows: list[int]) -> torch.Tensor:
        """The batch through the C++ kernel: one row per new token, each with its sequence's block table."""
        bs = self.cache.block_size
        tokens, positions, seqs, slots, tables = [], [], [], [], []
        for i, (seq, n) in enumerate(batch):
            start, table = seq.num_computed, seq.block_table
            pos = range(start, start + n)
            tokens.extend(seq.token_ids[start:start + n])
            positions.extend(pos)
            seqs.extend([i] * n)
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            tables.append(table)
        width = max(map(len, tables))
        tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])  # (S, W); padding is never read
        return self.decoder.step(torch.tensor(tokens), torch.tensor(positions), torch.tensor(seqs), tables,
                                 torch.tensor(slots), torch.tensor(logit_rows, dtype=torch.long), self.cache.k,
                                 self.cache.v, bs)  # (R, V)

    @torch.inference_mode()
    def embed(self, ids: list[int]) -> torch.Tensor:
        """Mean of the final hidden states over the tokens: (D,) fp32, unit length."""
        with autocast(self.device, self.dtype):
            hidden = self.model.hidden_states(torch.tensor([ids], device=self.device))  # (1, T, D)
        return F.normalize(hidden[0].float().mean(0), dim=0)
