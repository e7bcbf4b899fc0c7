"""Softmax attention with GQA, positions (padding, caches, decode) and an optional sliding window.

A key is visible to a query when k_pos >= 0 (negative = padding or an empty cache slot),
k_pos <= q_pos (causal) and |q_pos - k_pos| < window (when set). A query that sees no key at all
(a padding query) gets zeros, never NaN.

Legend: B batch, T queries, S keys, H query heads, HKV key/value heads (H a multiple of HKV),
D head dim, Dv value head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridlm.ops import _checks as ck

SOFTMAX_BACKENDS = ("auto", "sdpa", "reference")


def _check(q, k, v, scale, causal, window, q_pos, k_pos, backend):
    ck.check_backend(backend, SOFTMAX_BACKENDS)
    B, T, H, D = ck.check_attention_qkv(q, k, v)
    ck.check_scale(scale)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    for name, pos, n in (("q_pos", q_pos, T), ("k_pos", k_pos, k.shape[1])):
        if pos is None:
            continue
        if not isinstance(pos, torch.Tensor) or pos.is_floating_point() or pos.is_complex() or pos.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor [B, {'T' if n == T else 'S'}], got "
                            f"{getattr(pos, 'dtype', type(pos).__name__)}")
        if tuple(pos.shape) != (B, n):
            raise ValueError(f"{name} must have shape {(B, n)}, got {tuple(pos.shape)}")
        ck.check_same(name, pos, "q", q, dtype=False)


def visibility_mask(q_pos, k_pos, causal: bool, window):
    """[B, T, S] bool: which key each query may attend to (see the module docstring)."""
    rel = q_pos[:, :, None] - k_pos[:, None, :]
    mask = (k_pos >= 0)[:, None, :].expand_as(rel)
    if causal:
        mask = mask & (rel >= 0)
    if window is not None:
        mask = mask & (rel.abs() < window)
    return mask


def _positions(q, k, q_pos, k_pos):
    B, T, S = q.shape[0], q.shape[1], k.shape[1]
    if q_pos is None:
        q_pos = (S - T + torch.arange(T, device=q.device)).expand(B, T)
    if k_pos is None:
        k_pos = torch.arange(S, device=q.device).expand(B, S)
    return q_pos, k_pos


def softmax_attention_reference(q, k, v, *, scale=None, causal=True, window=None, q_pos=None, k_pos=None):
    """Plain masked softmax attention in float32 (float64 for float64 inputs): the readable reference.

    Arguments and result as in :func:`softmax_attention`.
    """
    _check(q, k, v, scale, causal, window, q_pos, k_pos, "reference")
    ct = ck.compute_dtype(q.dtype)
    r = q.shape[2] // k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q_, k_, v_ = (x.transpose(1, 2).to(ct) for x in (q, k, v))
    k_, v_ = k_.repeat_interleave(r, 1), v_.repeat_interleave(r, 1)
    mask = visibility_mask(*_positions(q, k, q_pos, k_pos), causal, window)[:, None]
    scores = (q_ @ k_.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    # a row with no visible key is all -inf, and softmax gives NaN there; the contract says zeros
    p = torch.softmax(scores, -1).masked_fill(~mask.any(-1, keepdim=True), 0.0)
    return (p @ v_).transpose(1, 2).contiguous().to(v.dtype)


def _repeat_kv_heads(k_BHSD, v_BHSD, r):
    """Keys and values with each head repeated r times (head-major), and gqa=False for SDPA."""
    return k_BHSD.repeat_interleave(r, 1), v_BHSD.repeat_interleave(r, 1), False


def softmax_attention(q, k, v, *, scale=None, causal=True, window=None, q_pos=None, k_pos=None, backend="auto"):
    """Softmax attention over keys/values [B, S, HKV, D] for queries [B, T, H, D]; returns o [B, T, H, Dv].

    Args:
        q: [B, T, H, D] float; k: [B, S, HKV, D] and v: [B, S, HKV, Dv], q's dtype; H a multiple of HKV
            (query head h reads key/value head h // (H // HKV)).
        scale: float, default D ** -0.5.
        causal: mask keys at later positions than the query.
        window: optional positive int; a key is visible only when |q_pos - k_pos| < window.
        q_pos: optional integer [B, T], default S - T + arange(T) (queries are the last T positions).
        k_pos: optional integer [B, S], default arange(S); negative marks padding / an empty slot.
        backend: "auto" (= "sdpa", torch's scaled_dot_product_attention) or "reference".
    Returns:
        o [B, T, H, Dv] in q's dtype; zeros for a query that sees no key.

    Example::

        >>> q, k, v = torch.randn(1, 5, 4, 16), torch.randn(1, 5, 2, 16), torch.randn(1, 5, 2, 16)
        >>> softmax_attention(q, k, v, window=3).shape
        torch.Size([1, 5, 4, 16])
    """
    _check(q, k, v, scale, causal, window, q_pos, k_pos, backend)
    if backend == "reference":
        return softmax_attention_reference(q, k, v, scale=scale, causal=causal, window=window, q_pos=q_pos,
                                           k_pos=k_pos)
    T, S = q.shape[1], k.shape[1]
    gqa = q.shape[2] != k.shape[2]
    q_, k_, v_ = (x.transpose(1, 2) for x in (q, k, v))
    if q_pos is None and k_pos is None and window is None and (not causal or S == T):
        o = F.scaled_dot_product_attention(q_, k_, v_, is_causal=causal, scale=scale, enable_gqa=gqa)
        return o.transpose(1, 2).contiguous()
    if q_pos is None and k_pos is None and window is None and S > T:
        # queries at the last T positions (a chunk over a cache): causal aligned to the lower
        # right, which SDPA serves with its flash / memory-efficient kernels on CUDA
        if q.is_cuda:
            # imported here: the module imports Triton, which must not happen before a CPU test
            # session has chosen Triton's interpreter
            from torch.nn.attention.bias import causal_lower_right

            if gqa:  # that dispatch takes GQA through the materialised-mask path only
                k_, v_, gqa = _repeat_kv_heads(k_, v_, q.shape[2] // k.shape[2])
            mask = causal_lower_right(T, S)
        else:  # the same mask, built directly (CPU SDPA materialises it anyway)
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        o = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, scale=scale, enable_gqa=gqa)
        return o.transpose(1, 2).contiguous()
    mask = visibility_mask(*_positions(q, k, q_pos, k_pos), causal, window)
    seen = mask.any(-1, keepdim=True)  # [B, T, 1]
    # SDPA returns NaN for a fully masked row; open such rows to every key, then zero their output
    mask = (mask | ~seen)[:, None]
    if gqa and q.is_cuda:
        # With a mask, SDPA's GQA support is the math path only: it would materialise [B, H, T, S]
        # scores in float32 (17 GB for one 2k-token chunk over a 128k cache at 16 heads). Repeating
        # the key/value heads keeps the memory-efficient kernel, for a [B, H, S, D] copy per call.
        k_, v_, gqa = _repeat_kv_heads(k_, v_, q.shape[2] // k.shape[2])
    o = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return o.transpose(1, 2).contiguous() * seen[..., None].to(o.dtype)
