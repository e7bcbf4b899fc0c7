"""A softmax-attention layer's decode-step prologue as one Triton pass: per-head RMSNorm of q and k,
partial rotary embedding of both, and the new key and value written into the cache slot.

Legend: B rows, H query heads, HKV key/value heads, D head dim, R rotated channels (R <= D, even),
S cache slots.

``layers.attention.GatedAttention`` computes, for its one new token per row: q_norm(q), k_norm(k)
(RMSNorm over each head's D channels, float32, rounded to the activations' dtype), the rotary
embedding of the first R channels of each (the "rotate_half" layout: channel i < R/2 pairs with
i + R/2; angles position * inv_freq in float32; rounded again), then ``index_copy_`` of k and v into
the cache at the step's slot. Compiled at batch 1 on an H200 (Qwen3-Next's step, fifth 12-03
session's 4-layer trace) that was ~10 kernels a layer (two norm reductions, two rotary kernels, two
concatenations, two index copies...), each 0.9-1.3 us plus its launch gap, for a few KB of data.

Here a program per (row, head) (H query heads, then HKV key heads that also move their value row)
loads its head's row and, for the rotated channels, the row again at each channel's partner
(i + R/2 or i - R/2), normalises both with the row's one rstd, rounds as the layer does, rotates,
and stores: queries to a new [B, H, D] tensor, keys and values to ``k_cache[b, slot]`` and
``v_cache[b, slot]`` in the cache's dtype. Every input is read where it lies (any row and head
strides, last dim contiguous): q, k, v come as column slices of the packed projection's output.

The angles' frequencies come in as a tensor (``inv_freq`` [R/2], computed once by torch as the
layer's rotary module computes them), so the angles equal the layer's bit for bit; the products and
sums may contract differently (float32), which moves a few results by one unit of the output dtype.

Registered with ``torch.library`` (``hybridlm::qk_norm_rope_decode``, mutating the two caches) so
``torch.compile(fullgraph=True)`` traces through it.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from hybridlm.ops._checks import check_kernel_device
from hybridlm.ops.triton.utils import next_power_of_2, pdl_launch, pdl_start


@triton.jit
def _norm_rope_row(src, w_ptr, o_d, m_d, partner, rot, sign, cos, sin, D, eps,
                   HAS_NORM: tl.constexpr, ZERO_CENTERED: tl.constexpr):
    """One head's row, normalised (rounded to its dtype) and rotated, in float32."""
    dt = src.dtype.element_ty
    x = tl.load(src + o_d, mask=m_d, other=0.0).to(tl.float32)
    xp = tl.load(src + partner, mask=m_d & rot, other=0.0).to(tl.float32)
    if HAS_NORM:
        rstd = tl.rsqrt(tl.sum(x * x, 0) / D + eps)
        w = tl.load(w_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)
        wp = tl.load(w_ptr + partner, mask=m_d & rot, other=0.0).to(tl.float32)
        if ZERO_CENTERED:
            w += 1.0
            wp += 1.0
        x = (x * rstd * w).to(dt).to(tl.float32)
        xp = (xp * rstd * wp).to(dt).to(tl.float32)
    return tl.where(rot, x * cos + sign * (xp * sin), x)


@triton.jit
def _qk_rope_kernel(q, k, v, q_w, k_w, inv_freq, pos_B, slot, q_out, k_cache, v_cache, H, D, eps,
                    s_qb, s_qh, s_kb, s_kh, s_vb, s_vh, s_ob, s_oh, s_kcb, s_kcs, s_kch, s_vcb, s_vcs, s_vch,
                    R: tl.constexpr, BD: tl.constexpr, HAS_NORM: tl.constexpr, ZERO_CENTERED: tl.constexpr,
                    USE_PDL: tl.constexpr):
    pdl_start(USE_PDL)
    i_b = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    half: tl.constexpr = R // 2
    first = o_d < half
    rot = o_d < R
    partner = tl.where(first, o_d + half, o_d - half)
    sign = tl.where(first, -1.0, 1.0)
    # the layer rotates pads (position -1) as position 0
    pos = tl.maximum(tl.load(pos_B + i_b), 0).to(tl.float32)
    freq = tl.load(inv_freq + tl.where(first, o_d, o_d - half), mask=rot, other=0.0)
    angle = pos * freq
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    if i_h < H:
        y = _norm_rope_row(q + i_b * s_qb + i_h * s_qh, q_w, o_d, m_d, partner, rot, sign, cos, sin, D, eps,
                           HAS_NORM, ZERO_CENTERED)
        tl.store(q_out + i_b * s_ob + i_h * s_oh + o_d, y.to(q_out.dtype.element_ty), mask=m_d)
    else:
        i_k = i_h - H
        y_k = _norm_rope_row(k + i_b * s_kb + i_k * s_kh, k_w, o_d, m_d, partner, rot, sign, cos, sin, D, eps,
                             HAS_NORM, ZERO_CENTERED)
        i_s = tl.load(slot).to(tl.int64)
        # the layer rounds k to the activations' dtype, then casts to the cache's
        b_k = y_k.to(k.dtype.element_ty).to(k_cache.dtype.element_ty)
        tl.store(k_cache + i_b * s_kcb + i_s * s_kcs + i_k * s_kch + o_d, b_k, mask=m_d)
        b_v = tl.load(v + i_b * s_vb + i_k * s_vh + o_d, mask=m_d, other=0.0)
        tl.store(v_cache + i_b * s_vcb + i_s * s_vcs + i_k * s_vch + o_d, b_v.to(v_cache.dtype.element_ty), mask=m_d)


def qk_norm_rope_into(q_BHD, k_BHD, v_BHD, pos_B, slot, k_cache, v_cache, q_out, inv_freq, q_weight, k_weight,
                      eps, zero_centered) -> None:
    """Launch on validated tensors (see :func:`qk_norm_rope_decode`)."""
    B, H, D = q_BHD.shape
    HKV = k_BHD.shape[1]
    if B == 0:
        return
    has_norm = q_weight is not None
    bd = next_power_of_2(D)
    _qk_rope_kernel[(B, H + HKV)](
        q_BHD, k_BHD, v_BHD, q_weight if has_norm else q_BHD, k_weight if has_norm else k_BHD, inv_freq, pos_B,
        slot, q_out, k_cache, v_cache, H, D, float(eps),
        q_BHD.stride(0), q_BHD.stride(1), k_BHD.stride(0), k_BHD.stride(1), v_BHD.stride(0), v_BHD.stride(1),
        q_out.stride(0), q_out.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        R=2 * inv_freq.shape[0], BD=bd, HAS_NORM=has_norm, ZERO_CENTERED=bool(zero_centered),
        num_warps=max(1, min(4, bd // 128)), **pdl_launch(q_BHD.device, "qk_rope"))


@torch.library.custom_op("hybridlm::qk_norm_rope_decode", mutates_args=("k_cache", "v_cache"))
def _qk_rope_op(q_BHD: torch.Tensor, k_BHD: torch.Tensor, v_BHD: torch.Tensor, pos_B: torch.Tensor,
                slot: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, inv_freq: torch.Tensor,
                q_weight: Optional[torch.Tensor], k_weight: Optional[torch.Tensor], eps: float,
                zero_centered: bool) -> torch.Tensor:
    q_out = torch.empty(q_BHD.shape, dtype=q_BHD.dtype, device=q_BHD.device)
    qk_norm_rope_into(q_BHD, k_BHD, v_BHD, pos_B, slot, k_cache, v_cache, q_out, inv_freq, q_weight, k_weight,
                      eps, zero_centered)
    return q_out


@_qk_rope_op.register_fake
def _(q_BHD, k_BHD, v_BHD, pos_B, slot, k_cache, v_cache, inv_freq, q_weight, k_weight, eps, zero_centered):
    return torch.empty(q_BHD.shape, dtype=q_BHD.dtype, device=q_BHD.device)


def _check(q_BHD, k_BHD, v_BHD, pos_B, slot, k_cache, v_cache, inv_freq, q_weight, k_weight) -> None:
    for name, t in (("q_BHD", q_BHD), ("k_BHD", k_BHD), ("v_BHD", v_BHD)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-D float tensor [B, heads, D], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.stride(2) != 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride 1), got strides {t.stride()}")
    B, H, D = q_BHD.shape
    if k_BHD.shape[0] != B or k_BHD.shape[2] != D or v_BHD.shape != k_BHD.shape:
        raise ValueError(f"k_BHD and v_BHD must be [B, HKV, D] with B = {B}, D = {D} as in q_BHD, got "
                         f"{tuple(k_BHD.shape)} and {tuple(v_BHD.shape)}")
    if k_BHD.dtype != q_BHD.dtype or v_BHD.dtype != q_BHD.dtype:
        raise TypeError(f"q_BHD, k_BHD and v_BHD must share one dtype, got {q_BHD.dtype}, {k_BHD.dtype}, {v_BHD.dtype}")
    HKV = k_BHD.shape[1]
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(c, torch.Tensor) or c.dim() != 4 or c.shape[0] != B or c.shape[2:] != (HKV, D):
            raise ValueError(f"{name} must be [B, S, HKV, D] = [{B}, S, {HKV}, {D}], got "
                             f"{tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__}")
        if c.stride(3) != 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride 1), got strides {c.stride()}")
    if not isinstance(pos_B, torch.Tensor) or pos_B.shape != (B,) or pos_B.is_floating_point():
        raise ValueError(f"pos_B must be an integer tensor [B] = [{B}] of positions")
    if not isinstance(slot, torch.Tensor) or slot.numel() != 1 or slot.is_floating_point():
        raise ValueError("slot must be an integer tensor of one element (the cache slot written)")
    if (not isinstance(inv_freq, torch.Tensor) or inv_freq.dim() != 1 or inv_freq.dtype != torch.float32
            or not 1 <= inv_freq.shape[0] <= D // 2):
        raise ValueError(f"inv_freq must be a float32 tensor [R / 2] with 0 < R <= D = {D}")
    if (q_weight is None) != (k_weight is None):
        raise ValueError("q_weight and k_weight go together: both (per-head RMSNorm weights [D]) or neither")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w is not None and (w.shape != (D,) or not w.is_floating_point()):
            raise ValueError(f"{name} must be a float tensor [D] = [{D}], got {tuple(w.shape)}")
    for name, t in (("k_BHD", k_BHD), ("v_BHD", v_BHD), ("pos_B", pos_B), ("slot", slot), ("k_cache", k_cache),
                    ("v_cache", v_cache), ("inv_freq", inv_freq), ("q_weight", q_weight), ("k_weight", k_weight)):
        if t is not None and t.device != q_BHD.device:
            raise ValueError(f"{name} must be on q_BHD's device ({q_BHD.device}), got {t.device}")


def qk_norm_rope_decode(q_BHD, k_BHD, v_BHD, pos_B, slot, k_cache, v_cache, inv_freq, q_weight=None,
                        k_weight=None, eps=1e-6, zero_centered=False):
    """A decode step's attention prologue: returns the normed, rotated queries [B, H, D] and writes the
    normed, rotated keys and the values into ``k_cache[:, slot]`` and ``v_cache[:, slot]``.

    Args:
        q_BHD: [B, H, D] the new token's queries (any row/head strides, last dim contiguous).
        k_BHD, v_BHD: [B, HKV, D] its keys and values (same dtype as q).
        pos_B: int [B] rotary positions (negative ones rotate as 0, as the layer's pads do).
        slot: int tensor of one element, the cache slot written (a device tensor: no host sync).
        k_cache, v_cache: [B, S, HKV, D] the layer's cache, written in place (any float dtype).
        inv_freq: float32 [R / 2] the rotary frequencies of the first R channels (R <= D).
        q_weight, k_weight: per-head RMSNorm weights [D], or None for no norm.
        eps: the norm's epsilon; zero_centered: the weights are offsets from one (Qwen3-Next).

    Example (CUDA tensors; CPU ones only under TRITON_INTERPRET=1):
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
        >>> q, k, v = torch.randn(1, 4, 16, device=dev), torch.randn(1, 2, 16, device=dev), torch.randn(1, 2, 16, device=dev)
        >>> kc, vc = torch.zeros(1, 8, 2, 16, device=dev), torch.zeros(1, 8, 2, 16, device=dev)
        >>> inv = 10000.0 ** -(torch.arange(0, 8, 2, device=dev, dtype=torch.float32) / 8)
        >>> q_rot = qk_norm_rope_decode(q, k, v, torch.tensor([5], device=dev), torch.tensor([5], device=dev), kc, vc, inv)
        >>> torch.equal(vc[:, 5], v)
        True
    """
    _check(q_BHD, k_BHD, v_BHD, pos_B, slot, k_cache, v_cache, inv_freq, q_weight, k_weight)
    check_kernel_device("q_BHD", q_BHD)
    if q_BHD.dtype == torch.float64:
        raise TypeError("q_BHD must be float32, bfloat16 or float16 for the Triton kernel, got torch.float64")
    if not torch.compiler.is_compiling():
        # eager calls launch directly: the custom-op dispatch costs more host time than the kernel
        q_out = torch.empty(q_BHD.shape, dtype=q_BHD.dtype, device=q_BHD.device)
        qk_norm_rope_into(q_BHD, k_BHD, v_BHD, pos_B, slot, k_cache, v_cache, q_out, inv_freq, q_weight, k_weight,
                          eps, zero_centered)
        return q_out
    return _qk_rope_op(q_BHD, k_BHD, v_BHD, pos_B, slot, k_cache, v_cache, inv_freq, q_weight, k_weight,
                       float(eps), bool(zero_centered))
