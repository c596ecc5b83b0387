"""GGML's block quantisation, for the quantised GGUF export: the byte layouts llama.cpp reads, with a
per-block scale search in place of llama.cpp's plain rounding, optionally weighted by an importance
vector (mean squared activation of each input column, from a calibration text).

A quantised row is a run of blocks; each block stores integer levels q and one or two scales:

    type   block         levels     value                    scales stored
    Q8_0   32            -128..127  d*q                      d f16
    Q4_0   32            -8..7      d*q                      d f16
    Q5_0   32            -16..15    d*q                      d f16
    Q4_1   32            0..15      d*q + m                  d, m f16
    Q5_1   32            0..31      d*q + m                  d, m f16
    Q4_K   256 = 8 x 32  0..15      d*sc_j*q - dmin*m_j      d, dmin f16; sc_j, m_j 6-bit per 32
    Q5_K   256 = 8 x 32  0..31      d*sc_j*q - dmin*m_j      d, dmin f16; sc_j, m_j 6-bit per 32
    Q6_K   256 = 16 x 16 -32..31    d*sc_j*q                 d f16; sc_j int8 per 16

The search. Plain rounding (llama.cpp's reference quantisers, llama-quantize without an importance
matrix for the 32-wide types) maps the block's largest magnitude to the end level and rounds every
value to the nearest level. For fixed levels q, the scale minimising the weighted squared error
E = sum_i w_i (x_i - d q_i)^2 has a closed form, d = sum w x q / sum w q^2 (with an offset m: a 2x2
least-squares solve), so each candidate inverse scale on a grid around the plain one is cheap to
score: round, solve, measure. Per block the best candidate wins (llama.cpp's make_qx_quants and
make_qkx2_quants do this for its K-quants and its importance-matrix path); its scale is rounded to
f16 as stored, the levels are re-rounded at that stored scale (for a fixed scale the nearest level
is best) and refitted once more. A 32-wide block then keeps whichever of this and plain rounding
decodes with the smaller error, so there the search never does worse than plain rounding on E.
K-quants fit each sub-block so, round the sub-block scales to their 6-bit (Q6_K: int8) grid,
re-round the levels at those, and refit the two super-block scales by least squares over the 256
values.

Weights. With an importance vector h (C,) (mean x_c^2 of a matrix's input over calibration
tokens), w_rc = h_c: the diagonal of the layer's output-error form E[(dW x)^2] = dW H dW^T (the
GPTQ / llama.cpp-imatrix view), so errors in columns that see large activations count for more.
Squared error itself is the wrong target: on SmolLM2 (held-out perplexity of the dequantised
weights, Q4_0) plain rounding costs +15.3%, the search with uniform weights +17.8%, with
default_weights (no calibration) +12.6%, with importance +3.6%. quantize's weights=None is uniform.

In llama.cpp (BENCHMARKS.md, SmolLM2, 72 KB held out) against the F32 export: q8_0 +0.19%, q4_0
+7.9%, q4_k +3.5%, where llama-quantize from the same F32 file gives +0.52%, +23.9%, +6.6%.

All of it is vectorised over blocks in torch, a chunk of rows at a time (memory bounded).
"""

from __future__ import annotations

import codecs
import contextlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import numpy as np
import torch

from lmforge.common import LmforgeError

Q = gguf.GGMLQuantizationType
QK_K = 256
CHUNK_ELEMENTS = 1 << 18  # values quantised at once: temporaries near cache size (faster than 2**16 or 2**20)

# Candidate "levels from zero to the block's largest magnitude" tried per block, around the plain
# choice nmax (that value on the extra negative level, as GGML's reference puts it): the grid of
# llama.cpp's make_qx_quants (nmax +- 0.9 in 0.1) widened downwards, plus the other orientation
# (the largest value on the positive side, negative s). Tuned on SmolLM2's held-out perplexity:
# both orientations beat one (Q4_0 +3.6% vs +4.1%); reaching further down (5.0 for Q4_0) was worse.
def _steps(nmax: int, low: float, step: float) -> np.ndarray:
    positive = np.arange(low * nmax, nmax + 1 + 1e-6, step)
    return np.concatenate([positive, -np.arange((low - 0.05) * nmax, nmax + 1e-6, step)])


SYMMETRIC_STEPS = {8: _steps(8, 0.75, 0.1), 16: _steps(16, 0.8, 0.2), 32: _steps(32, 0.85, 0.25),
                   128: _steps(128, 0.97, 0.5)}
AFFINE_STEPS = {15: np.arange(12.0, 16.55, 0.15), 31: np.arange(27.0, 32.05, 0.25)}


# ----------------------------------------------------------------------------- level fits
# x, w: (..., B) values and weights of blocks of B; the fits return per-block scales (...,).

def _fit_symmetric(x: torch.Tensor, w: torch.Tensor, lo: int, hi: int, steps) -> torch.Tensor:
    """Scale d of x ~ d*q, q in lo..hi (lo = -hi - 1), best of the candidates q = round(-s x / xmax),
    xmax the signed largest-magnitude value (so it lands on the extra level lo, as in GGML)."""
    xmax = x.gather(-1, x.abs().argmax(-1, keepdim=True))
    inv = -1.0 / torch.where(xmax == 0, torch.ones_like(xmax), xmax)
    best_err = torch.full(x.shape[:-1], float("inf"))
    best_d = torch.zeros(x.shape[:-1])
    for s in steps:
        q = (x * (inv * float(s))).round_().clamp_(lo, hi)
        wq = w * q
        sq2 = (wq * q).sum(-1)
        d = (wq * x).sum(-1) / sq2.clamp_min(1e-30)
        err = (w * (x - d.unsqueeze(-1) * q).square_()).sum(-1)
        better = err < best_err
        best_err, best_d = torch.where(better, err, best_err), torch.where(better, d, best_d)
    return best_d


def _refit_symmetric(x, w, q):
    wq = w * q
    return (wq * x).sum(-1) / (wq * q).sum(-1).clamp_min(1e-30)


def _fit_affine(x: torch.Tensor, w: torch.Tensor, nmax: int, steps, nonpositive_min: bool):
    """(d, m) of x ~ d*q + m, q in 0..nmax, best of the candidates q = round(s (x - min) / (max - min)).
    nonpositive_min: m <= 0 (K-quants store -m unsigned)."""
    xmin = x.amin(-1, keepdim=True)
    if nonpositive_min:
        xmin = xmin.clamp(max=0)
    span = x.amax(-1, keepdim=True) - xmin
    inv = 1.0 / torch.where(span == 0, torch.ones_like(span), span)
    shifted = x - xmin
    best_err = torch.full(x.shape[:-1], float("inf"))
    best_d, best_m = torch.zeros(x.shape[:-1]), xmin.squeeze(-1).clone()
    for s in steps:
        q = (shifted * (inv * float(s))).round_().clamp_(0, nmax)
        d, m = _refit_affine(x, w, q, nonpositive_min)
        err = (w * (x - d.unsqueeze(-1) * q - m.unsqueeze(-1)).square_()).sum(-1)
        better = err < best_err
        best_err, best_d, best_m = (torch.where(better, a, b) for a, b in ((err, best_err), (d, best_d), (m, best_m)))
    return best_d, best_m


def _refit_affine(x, w, q, nonpositive_min: bool):
    """Weighted least-squares (d, m) of x ~ d*q + m for fixed levels q."""
    sw, swx = w.sum(-1), (w * x).sum(-1)
    wq = w * q
    sq, sq2, sxq = wq.sum(-1), (wq * q).sum(-1), (wq * x).sum(-1)
    det = sw * sq2 - sq * sq
    ok = det > 1e-30 * sw * sq2  # all levels equal: no slope to fit
    safe = torch.where(ok, det, torch.ones_like(det))
    d = torch.where(ok, (sw * sxq - swx * sq) / safe, torch.zeros_like(det))
    m = torch.where(ok, (sq2 * swx - sq * sxq) / safe, swx / sw.clamp_min(1e-30))
    if nonpositive_min:
        clipped = m > 0
        d = torch.where(clipped, sxq / sq2.clamp_min(1e-30), d)
        m = torch.where(clipped, torch.zeros_like(m), m)
    return d, m


def _f16(t: torch.Tensor) -> torch.Tensor:
    """t as stored: rounded to f16 (and back to f32 for arithmetic)."""
    return t.to(torch.float16).float()


def _levels(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | float, lo: int, hi: int) -> torch.Tensor:
    """Nearest levels for x ~ scale*q + offset (scale, offset broadcast over the last dim); 0 where scale is 0."""
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = ((x - offset) / safe).round_().clamp_(lo, hi)
    return torch.where(scale == 0, torch.zeros_like(q), q)


def _error(x, w, values):
    return (w * (x - values).square()).sum(-1)


# ----------------------------------------------------------------------------- 32-wide types

def _symmetric_block(x, w, lo: int, hi: int, search: bool):
    """(d f16 (N,), q (N, 32), values (N, 32)) for Q8_0 / Q4_0 / Q5_0 blocks x (N, 32)."""
    xmax = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)
    # The reference: the largest magnitude lands on the end level lo (Q8_0's: on +-127).
    plain_d = xmax.abs() / 127 if lo == -128 else xmax / lo
    plain_q = _levels(x, plain_d.unsqueeze(-1), 0.0, lo, hi)
    plain_d = _f16(plain_d)
    if not search:
        return plain_d, plain_q, plain_d.unsqueeze(-1) * plain_q
    d = _f16(_fit_symmetric(x, w, lo, hi, SYMMETRIC_STEPS[-lo]))
    q = _levels(x, d.unsqueeze(-1), 0.0, lo, hi)
    d2 = _f16(_refit_symmetric(x, w, q))
    q2 = _levels(x, d2.unsqueeze(-1), 0.0, lo, hi)
    best_d, best_q = d, q
    for cand_d, cand_q in ((d2, q2), (plain_d, plain_q)):
        keep = _error(x, w, cand_d.unsqueeze(-1) * cand_q) < _error(x, w, best_d.unsqueeze(-1) * best_q)
        best_d, best_q = torch.where(keep, cand_d, best_d), torch.where(keep.unsqueeze(-1), cand_q, best_q)
    return best_d, best_q, best_d.unsqueeze(-1) * best_q


def _affine_block(x, w, nmax: int, search: bool):
    """(d f16, m f16 (N,), q (N, 32), values) for Q4_1 / Q5_1 blocks: x ~ d*q + m."""
    xmin, xmax = x.amin(-1), x.amax(-1)
    plain_d = (xmax - xmin) / nmax
    plain_q = _levels(x, plain_d.unsqueeze(-1), xmin.unsqueeze(-1), 0, nmax)
    plain_d, plain_m = _f16(plain_d), _f16(xmin)

    def values(d, m, q):
        return d.unsqueeze(-1) * q + m.unsqueeze(-1)  # GGML's order: (d*q) + m

    if not search:
        return plain_d, plain_m, plain_q, values(plain_d, plain_m, plain_q)
    d, m = (_f16(t) for t in _fit_affine(x, w, nmax, AFFINE_STEPS[nmax], nonpositive_min=False))
    q = _levels(x, d.unsqueeze(-1), m.unsqueeze(-1), 0, nmax)
    d2, m2 = (_f16(t) for t in _refit_affine(x, w, q, nonpositive_min=False))
    q2 = _levels(x, d2.unsqueeze(-1), m2.unsqueeze(-1), 0, nmax)
    best = (d, m, q)
    for cand in ((d2, m2, q2), (plain_d, plain_m, plain_q)):
        keep = _error(x, w, values(*cand)) < _error(x, w, values(*best))
        best = tuple(torch.where(keep.view(-1, *([1] * (a.dim() - 1))), a, b) for a, b in zip(cand, best))
    return (*best, values(*best))


# ----------------------------------------------------------------------------- K-quants

def _grid(scales: torch.Tensor, top: int, lo: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Super-block scale D f16 (N,) and integer sub-scales (N, S) in lo..top with scales ~ D * ints:
    the largest magnitude maps to the end of the grid (top, or lo when it is negative and lo < 0)."""
    if lo < 0:  # signed (Q6_K): map the largest-magnitude scale to lo = -128, the extra level, as GGML does
        big = scales.gather(-1, scales.abs().argmax(-1, keepdim=True)).squeeze(-1)
        D = _f16(big / lo)
    else:
        D = _f16(scales.amax(-1) / top)
    return D, _levels(scales, D.unsqueeze(-1), 0.0, lo, top)


def _kquant_affine(x, w, nmax: int, search: bool):
    """Q4_K / Q5_K super-blocks x (N, 8, 32): (d, dmin f16 (N,), sc, mn 6-bit (N, 8), q (N, 8, 32), values)."""
    if search:
        sub_d, sub_m = _fit_affine(x, w, nmax, AFFINE_STEPS[nmax], nonpositive_min=True)
    else:  # plain: x ~ d*q + min over the sub-block, min <= 0
        sub_m = x.amin(-1).clamp(max=0)
        sub_d = (x.amax(-1) - sub_m) / nmax
    sub_d = sub_d.clamp(min=0)
    d, sc = _grid(sub_d, 63)
    dmin, mn = _grid(-sub_m, 63)

    def decode(d, dmin):
        scale = (d.unsqueeze(-1) * sc).unsqueeze(-1)  # GGML's order: (d*sc)*q - (dmin*m)
        offset = (dmin.unsqueeze(-1) * mn).unsqueeze(-1)
        return scale, offset

    scale, offset = decode(d, dmin)
    q = _levels(x, scale, -offset, 0, nmax)
    if search:  # refit (d, dmin) jointly over the super-block: x ~ d*(sc_j q) - dmin*m_j
        a, b = (sc.unsqueeze(-1) * q).flatten(1), (-mn).unsqueeze(-1).expand_as(q).flatten(1)
        wf, xf = w.flatten(1), x.flatten(1)
        saa, sbb, sab = (wf * a * a).sum(-1), (wf * b * b).sum(-1), (wf * a * b).sum(-1)
        sxa, sxb = (wf * xf * a).sum(-1), (wf * xf * b).sum(-1)
        det = saa * sbb - sab * sab
        ok = det > 1e-12 * saa * sbb
        safe = torch.where(ok, det, torch.ones_like(det))
        d2 = torch.where(ok, (sxa * sbb - sxb * sab) / safe, d)
        dmin2 = torch.where(ok, (sxb * saa - sxa * sab) / safe, dmin)
        d2, dmin2 = _f16(d2.clamp(min=0)), _f16(dmin2.clamp(min=0))
        scale2, offset2 = decode(d2, dmin2)
        q2 = _levels(x, scale2, -offset2, 0, nmax)
        err = (w * (x - (scale * q - offset)).square()).sum((-1, -2))
        keep = (w * (x - (scale2 * q2 - offset2)).square()).sum((-1, -2)) < err
        d, dmin, q = torch.where(keep, d2, d), torch.where(keep, dmin2, dmin), torch.where(keep.view(-1, 1, 1), q2, q)
        scale, offset = decode(d, dmin)
    return d, dmin, sc, mn, q, (scale * q - offset).flatten(1)


def _kquant_q6(x, w, search: bool):
    """Q6_K super-blocks x (N, 16, 16): (d f16 (N,), sc int8 (N, 16), q -32..31 (N, 16, 16), values)."""
    if search:
        sub_d = _fit_symmetric(x, w, -32, 31, SYMMETRIC_STEPS[32])
    else:
        sub_d = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1) / -32
    d, sc = _grid(sub_d, 127, lo=-128)

    def scale_of(d):
        return (d.unsqueeze(-1) * sc).unsqueeze(-1)  # GGML's order: (d*sc)*q

    scale = scale_of(d)
    q = _levels(x, scale, 0.0, -32, 31)
    if search:  # refit d over the super-block: x ~ d*(sc_j q)
        a, wf, xf = (sc.unsqueeze(-1) * q).flatten(1), w.flatten(1), x.flatten(1)
        d2 = _f16((wf * xf * a).sum(-1) / (wf * a * a).sum(-1).clamp_min(1e-30))
        scale2 = scale_of(d2)
        q2 = _levels(x, scale2, 0.0, -32, 31)
        keep = (w * (x - scale2 * q2).square()).sum((-1, -2)) < (w * (x - scale * q).square()).sum((-1, -2))
        d, q = torch.where(keep, d2, d), torch.where(keep.view(-1, 1, 1), q2, q)
        scale = scale_of(d)
    return d, sc, q, (scale * q).flatten(1)


# ----------------------------------------------------------------------------- packing (GGML's byte order)

def _u8(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.uint8).numpy()


def _f16_bytes(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float16).numpy().view(np.uint8).reshape(len(t), 2)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(N, 32) levels 0..15 (low 4 bits used) -> (N, 16) bytes: byte j = q[j] | q[j + 16] << 4."""
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _high_bits32(q: np.ndarray) -> np.ndarray:
    """(N, 32) levels 0..31 -> (N, 4) bytes: bit j of the little-endian uint32 is bit 4 of q[j]."""
    return np.packbits((q >> 4) & 1, axis=-1, bitorder="little")


def _pack_kscales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins (N, 8) -> GGML's 12 bytes (get_scale_min_k4's inverse)."""
    out = np.empty((len(sc), 12), np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return out


def _kquant_low_nibbles(q: np.ndarray) -> np.ndarray:
    """(N, 256) levels -> (N, 128): per 64 values, byte l = q[l] | q[l + 32] << 4 (low 4 bits each)."""
    q = q.reshape(len(q), 4, 2, 32) & 0x0F
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(len(q), 128)


def _encode(x: torch.Tensor, w: torch.Tensor, qtype, search: bool) -> tuple[np.ndarray, torch.Tensor]:
    """Blocks of x (N, block) -> (bytes (N, type_size), values (N, block))."""
    if qtype in (Q.Q8_0, Q.Q4_0, Q.Q5_0):
        hi = {Q.Q8_0: 127, Q.Q4_0: 7, Q.Q5_0: 15}[qtype]
        d, q, values = _symmetric_block(x, w, -hi - 1, hi, search)
        if qtype == Q.Q8_0:
            return np.concatenate([_f16_bytes(d), q.to(torch.int8).numpy().view(np.uint8)], axis=1), values
        u = _u8(q + hi + 1)
        parts = [_f16_bytes(d)] + ([_high_bits32(u)] if qtype == Q.Q5_0 else []) + [_nibbles(u)]
        return np.concatenate(parts, axis=1), values
    if qtype in (Q.Q4_1, Q.Q5_1):
        d, m, q, values = _affine_block(x, w, 15 if qtype == Q.Q4_1 else 31, search)
        u = _u8(q)
        parts = [_f16_bytes(d), _f16_bytes(m)] + ([_high_bits32(u)] if qtype == Q.Q5_1 else []) + [_nibbles(u)]
        return np.concatenate(parts, axis=1), values
    if qtype in (Q.Q4_K, Q.Q5_K):
        nmax = 15 if qtype == Q.Q4_K else 31
        d, dmin, sc, mn, q, values = _kquant_affine(x.view(-1, 8, 32), w.view(-1, 8, 32), nmax, search)
        u = _u8(q).reshape(len(x), QK_K)
        parts = [_f16_bytes(d), _f16_bytes(dmin), _pack_kscales(_u8(sc), _u8(mn))]
        if qtype == Q.Q5_K:  # qh byte l, bit k: bit 4 of value 32k + l
            high = ((u.reshape(len(u), 8, 32) >> 4) & 1) << np.arange(8, dtype=np.uint8)[None, :, None]
            parts.append(np.bitwise_or.reduce(high, axis=1))
        parts.append(_kquant_low_nibbles(u))
        return np.concatenate(parts, axis=1), values
    if qtype == Q.Q6_K:
        d, sc, q, values = _kquant_q6(x.view(-1, 16, 16), w.view(-1, 16, 16), search)
        u = _u8(q + 32).reshape(len(x), 2, 4, 32)  # two halves of 128: four runs of 32
        ql = (u[:, :, :2] & 0x0F) | ((u[:, :, 2:] & 0x0F) << 4)  # byte l of run r (r < 2): runs r and r + 2
        qh = np.bitwise_or.reduce((u >> 4) << np.array([0, 2, 4, 6], np.uint8)[None, None, :, None], axis=2)
        return np.concatenate([ql.reshape(len(x), 128), qh.reshape(len(x), 64),
                               sc.to(torch.int8).numpy().view(np.uint8), _f16_bytes(d)], axis=1), values
    raise ValueError(f"no quantiser for {qtype!r}")


def default_weights(x: torch.Tensor) -> torch.Tensor:
    """Per-value weights (R, C) for a matrix with no importance vector: sqrt(mean x^2 of the row + x^2),
    llama.cpp's factor in its importance-matrix path, which leans on the large weights. On SmolLM2,
    Q4_0 with the search: +12.6% perplexity with these, +17.8% with uniform weights (plain rounding +15.3%)."""
    x = x.float()
    return (x.square().mean(-1, keepdim=True) + x.square()).sqrt_()


@contextlib.contextmanager
def _one_thread_per_op():
    """torch ops on one thread while inside (restored after). The search runs ~50 small ops per chunk;
    with intra-op threads each op ends in a barrier, and on a loaded machine a descheduled thread
    stalls it: one SmolLM2 layer took 0.5-0.7 s on one thread but 3.5-38 s on two (load 7 on 2 cores).
    Chunks run on a thread pool instead (torch releases the GIL inside ops), which degrades gracefully."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield before
    finally:
        torch.set_num_threads(before)


def quantize(x: torch.Tensor, qtype, weights: torch.Tensor | None = None, *,
             search: bool = True) -> tuple[np.ndarray, torch.Tensor]:
    """Quantise the rows of x (R, C) to GGML type `qtype`: (bytes (R, C / block * type_size) uint8 in
    GGML's layout, values (R, C) float32 those bytes decode to). weights: of each value's squared
    error, an importance vector (C,) or one weight per value (R, C); None: uniform. search=False is
    plain rounding (llama.cpp's reference quantisers for the 32-wide types, byte for byte)."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    R, C = x.shape
    assert C % block == 0, (qtype, x.shape)
    x = x.detach().float()
    out = np.empty((R, C // block * type_size), np.uint8)
    values = torch.empty(R, C)
    rows = max(1, CHUNK_ELEMENTS // C)

    def run(r: int) -> None:  # rows r .. r + rows; chunks write disjoint slices
        xs = x[r:r + rows]
        if weights is None:
            ws = torch.ones_like(xs)
        else:
            ws = (weights[r:r + rows] if weights.dim() == 2 else weights.expand_as(xs)).float().contiguous()
        n = len(xs)
        data, vals = _encode(xs.reshape(-1, block), ws.reshape(-1, block), qtype, search)
        out[r:r + n] = data.reshape(n, -1)
        values[r:r + n] = vals.reshape(n, C)

    with torch.no_grad(), _one_thread_per_op() as num_threads:
        if num_threads == 1 or R <= rows:
            for r in range(0, R, rows):
                run(r)
        else:
            with ThreadPoolExecutor(num_threads) as pool:
                list(pool.map(run, range(0, R, rows)))
    return out, values


# ----------------------------------------------------------------------------- which type for which tensor

# --quant name -> (GGML type of the matrices, general.file_type). q4_k and q5_k are llama-quantize's
# Q4_K_M and Q5_K_M mixes (its default K-quant recipes), q6_k its Q6_K.
QUANTS = {"q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0), "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
          "q4_1": (Q.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1), "q5_0": (Q.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0),
          "q5_1": (Q.Q5_1, gguf.LlamaFileType.MOSTLY_Q5_1), "q4_k": (Q.Q4_K, gguf.LlamaFileType.MOSTLY_Q4_K_M),
          "q5_k": (Q.Q5_K, gguf.LlamaFileType.MOSTLY_Q5_K_M), "q6_k": (Q.Q6_K, gguf.LlamaFileType.MOSTLY_Q6_K)}
# A K-quant whose rows are not a multiple of 256 values: llama-quantize's substitute (tensor_type_fallback).
K_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}


def _more_bits(layer: int, num_layers: int) -> bool:
    # llama-quantize's use_more_bits: the first and last eighth of the layers, and every third between.
    return layer < num_layers // 8 or layer >= 7 * num_layers // 8 or (layer - num_layers // 8) % 3 == 2


def tensor_qtype(quant: str, name: str, num_cols: int, num_layers: int, is_output: bool):
    """(GGML type, the type wanted before a row-length fallback) of matrix `name` (GGUF name, rows of
    num_cols values) under --quant `quant`, chosen as llama-quantize chooses for the same type:
    the output head (the token embedding when it doubles as the head) Q6_K (Q8_0 under q8_0); under
    q4_k/q5_k (Q4_K_M/Q5_K_M) attn_v (GPT-2's fused attn_qkv) and ffn_down Q6_K in the layers
    use_more_bits picks; every other matrix the base type. Rows that do not split into whole blocks
    fall back: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and a 32-wide type that does not fit -> F16."""
    base = QUANTS[quant][0]
    wanted = base
    if is_output:
        wanted = Q.Q8_0 if base == Q.Q8_0 else Q.Q6_K
    elif quant in ("q4_k", "q5_k") and any(f".{kind}." in name for kind in ("attn_v", "attn_qkv", "ffn_down")):
        layer = int(name.split(".")[1])  # blk.{i}.
        if _more_bits(layer, num_layers):
            wanted = Q.Q6_K
    qtype = wanted
    if num_cols % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = K_FALLBACK.get(qtype, Q.F16)
    if num_cols % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = Q.F16
    return qtype, wanted


# ----------------------------------------------------------------------------- calibration

CALIBRATION_TOKENS = 4096  # ~20 s of SmolLM2-135M forward passes on one core; enough for a diagonal statistic
CALIBRATION_SHARE = 0.01  # of the default corpus's documents, by id hash, next to the held-out share
CALIBRATION_DOC_CHARS = 2000  # the start of each, so the slice spans many files
MAX_CALIBRATION_FILE_BYTES = 4 << 20  # of a user file, only this much is read (far more than is tokenized)
MIN_CALIBRATION_TOKENS = 256


def calibration_text(source: str) -> Iterable[str]:
    """The calibration documents: source "stdlib" is the default corpus's calibration slice (documents
    whose id hash falls in the 1% just above the held-out 2%, so never held-out text; their first
    2,000 characters each, in corpus order, as many as are needed); anything else is a UTF-8 text file."""
    from lmforge.corpus import DEFAULT_CORPUS, HELDOUT_FRACTION, Corpus, is_heldout

    if source == DEFAULT_CORPUS:
        return (d.text[:CALIBRATION_DOC_CHARS] for d in Corpus(DEFAULT_CORPUS).documents()
                if is_heldout(d.id, HELDOUT_FRACTION + CALIBRATION_SHARE) and not is_heldout(d.id))
    path = Path(source)
    if not path.is_file():
        raise LmforgeError(f"--calibration {source}: not a file; give a text file, '{DEFAULT_CORPUS}' (a slice of "
                           "the default corpus) or 'none'")
    with open(path, "rb") as f:
        data = f.read(MAX_CALIBRATION_FILE_BYTES)
    try:  # final=False: a character cut at the read limit is left out, not an error
        return [codecs.getincrementaldecoder("utf-8")().decode(data, final=False)]
    except UnicodeDecodeError as e:
        raise LmforgeError(f"--calibration {source}: byte {e.start} is not UTF-8; give a text file") from None


def calibration_windows(tokenizer, docs, seq_len: int, num_tokens: int = CALIBRATION_TOKENS) -> list[list[int]]:
    """The first num_tokens tokens of docs (each document opened by bos where the tokenizer has one),
    cut into windows of seq_len."""
    ids: list[int] = []
    for doc in docs:
        ids += ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(doc)
        if len(ids) >= num_tokens:
            break
    if len(ids) < MIN_CALIBRATION_TOKENS:
        raise LmforgeError(f"calibration text: {len(ids)} tokens, fewer than {MIN_CALIBRATION_TOKENS}; give a longer "
                           "text file (a few KB) or --calibration none")
    ids = ids[:num_tokens]
    return [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]


@torch.no_grad()
def collect_importance(model: torch.nn.Module, windows: list[list[int]]) -> dict[str, torch.Tensor]:
    """Importance vectors: for each matrix the model multiplies by (nn.Linear, GPT-2's Conv1D), the
    mean square of each input column over every token of `windows` (lists of token ids run one at a
    time), keyed by the parameter's name ("model.layers.0.mlp.down_proj.weight"; the head is
    "lm_head.weight" even when tied). Forward hooks, removed afterwards; the model is not changed."""
    from lmforge.gpt2 import Conv1D

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(key):
        def record(module, inputs, output):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])  # (tokens, in)
            sums[key] = sums.get(key, 0) + x.square().sum(0)
            counts[key] = counts.get(key, 0) + len(x)
        return record

    handles = [m.register_forward_hook(hook(f"{name}.weight")) for name, m in model.named_modules()
               if isinstance(m, (torch.nn.Linear, Conv1D))]
    was_training = model.training
    model.eval()
    try:
        for ids in windows:
            model(torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {k: sums[k] / counts[k] for k in sums}
