"""Softmax attention for decoding: one query per sequence against a preallocated KV cache.

Visibility follows :mod:`hybridlm.ops.softmax_attention`: a key is visible to the query when
k_pos >= 0 (negative = an empty cache slot), k_pos <= q_pos and, with a window, q_pos - k_pos < window.
A query that sees no key gets zeros, never NaN.

Legend: B batch, S cache slots, H query heads, HKV key/value heads (H a multiple of HKV), D head dim,
Dv value head dim.
"""

from __future__ import annotations

import torch

from hybridlm.ops import _checks as ck
from hybridlm.ops.softmax_attention import softmax_attention_reference


def _check_positions(name: str, pos, shape: tuple, layout: str, q: torch.Tensor) -> None:
    if not isinstance(pos, torch.Tensor) or pos.is_floating_point() or pos.is_complex() or pos.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor {layout}, got {getattr(pos, 'dtype', type(pos).__name__)}")
    if tuple(pos.shape) != shape:
        raise ValueError(f"{name} must have shape {layout} = {shape}, got {tuple(pos.shape)}")
    ck.check_same(name, pos, "q", q, dtype=False)


def check_decode_attention(q, k, v, q_pos, k_pos, scale, window) -> None:
    """Shapes, dtypes and devices of :func:`softmax_attention_decode`'s arguments (reads no values)."""
    ck.check_float_tensor("q", q, 3, "[B, H, D]")
    ck.check_float_tensor("k", k, 4, "[B, S, HKV, D]")
    ck.check_float_tensor("v", v, 4, "[B, S, HKV, Dv]")
    ck.check_same("k", k, "q", q)
    ck.check_same("v", v, "q", q)
    B, H, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k must be [B, S, HKV, D] with B = {B}, D = {D} as in q, got {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must match k in [B, S, HKV] = {tuple(k.shape[:3])}, got {tuple(v.shape)}")
    if k.shape[2] < 1 or H % k.shape[2]:
        raise ValueError(f"k must have a number of heads HKV dividing q's H = {H}, got HKV = {k.shape[2]}")
    _check_positions("q_pos", q_pos, (B,), "[B]", q)
    _check_positions("k_pos", k_pos, (B, k.shape[1]), "[B, S]", q)
    ck.check_scale(scale)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")


def softmax_attention_decode(q, k, v, *, q_pos, k_pos, scale=None, window=None, backend="auto"):
    """Attention of one decode query per sequence over a KV cache [B, S, HKV, D]; returns o [B, H, Dv].

    Args:
        q: [B, H, D] float, the new token's queries.
        k: [B, S, HKV, D] and v: [B, S, HKV, Dv] in q's dtype, the cache (views such as
            ``cache_k[:, :S]`` are fine); query head h reads key/value head h // (H // HKV).
        q_pos: integer [B], each query's position.
        k_pos: integer [B, S], each slot's position; negative marks an empty slot.
        scale: float, default D ** -0.5.
        window: optional positive int; a key is visible only when q_pos - k_pos < window.
        backend: "auto" (the Triton split-KV kernel for CUDA tensors that are not float64, the
            reference elsewhere), "triton" (RuntimeError when it cannot run) or "reference".
    Returns:
        o [B, H, Dv] in q's dtype (softmax in float32, float64 for float64 inputs); zeros for a
        query that sees no key.

    The kernel never reads a slot that no query sees, so empty slots may hold anything (even NaN);
    the reference multiplies them by zero weights, so there they must be finite.

    Example::

        >>> q, k, v = torch.randn(2, 4, 16), torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)
        >>> k_pos = torch.tensor([[0, 1, 2, -1, -1, -1, -1, -1], [0, 1, 2, 3, 4, 5, -1, -1]])
        >>> softmax_attention_decode(q, k, v, q_pos=torch.tensor([2, 5]), k_pos=k_pos, window=4).shape
        torch.Size([2, 4, 16])
    """
    ck.check_backend(backend)
    check_decode_attention(q, k, v, q_pos, k_pos, scale, window)
    kernel = ck.load_kernel("split_kv_decode_attention", backend, q)
    if kernel is not None:
        return kernel(q, k, v, q_pos=q_pos, k_pos=k_pos, scale=scale, window=window)
    o = softmax_attention_reference(q[:, None], k, v, scale=scale, causal=True, window=window,
                                    q_pos=q_pos[:, None], k_pos=k_pos)
    return o[:, 0].to(q.dtype)
