"""Lightning attention (MiniMax-01 / MiniMax-M1): linear attention with a constant decay per head.

Per value head h with slope s_h > 0 and state S [K, V]:

    S_t = exp(-s_h) S_{t-1} + k_t v_t^T          o_t = scale * S_t^T q_t

No feature map: MiniMax feeds SiLU-activated q, k, v from the layer, and applies no 1/sqrt(K)
(so ``scale`` defaults to 1.0 here). The block-wise form (MiniMax's "lightning" tiling: a masked,
decayed Q K^T inside a block, the state carried across blocks) is the chunked linear attention with
g = -s_h at every token; this module gives it its own name, its slope schedule, and its own token loop
so the two can be checked against each other.

Legend: B batch, T tokens, H q/k heads, HV value heads (a multiple of H), K key dim, V value dim.
"""

from __future__ import annotations

import torch

from hybridlm.ops import _checks as ck
from hybridlm.ops.linear_attention import linear_attention_chunked


def lightning_slopes(num_heads: int, layer_idx: int | None = None, num_layers: int | None = None) -> torch.Tensor:
    """MiniMax's per-head decay rates: a geometric sequence, optionally scaled down with depth.

    s_h = (2 ** (-8 / H)) ** (h + 1) for h = 0 .. H - 1 (ALiBi's slopes, for any H), times
    1 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5 when a layer is given, so the first layer
    forgets fastest and the last barely at all. This is MiniMax-Text-01's published schedule
    (its modeling code and transformers' ``MiniMaxLightningAttention.get_slope_rate``), with
    layer_idx counted over all layers of the model, attention layers included.

    Args:
        num_heads: H, a positive int.
        layer_idx: optional int in [0, num_layers); needs num_layers.
        num_layers: total number of layers of the model (>= 2 when layer_idx is given).
    Returns:
        [H] float32 slopes (positive); the decay per token is exp(-slope).

    Example::

        >>> lightning_slopes(8)[:2]
        tensor([0.5000, 0.2500])
    """
    for name, value in (("num_heads", num_heads), ("layer_idx", layer_idx), ("num_layers", num_layers)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    base = 1 / (2 ** (8 / num_heads))
    rate = base ** torch.arange(1, num_heads + 1)  # float32, as the published code computes it
    if layer_idx is None:
        if num_layers is not None:
            raise ValueError("num_layers is only used together with layer_idx; pass both or neither")
        return rate
    if num_layers is None or num_layers < 2 or not 0 <= layer_idx < num_layers:
        raise ValueError(f"layer_idx must lie in [0, num_layers) with num_layers >= 2, got layer_idx = {layer_idx}, "
                         f"num_layers = {num_layers}")
    return rate * (1 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5)


# --------------------------------------------------------------------------- checks
def _check_slope(slope, HV: int, ref: torch.Tensor) -> None:
    if not isinstance(slope, torch.Tensor):
        raise TypeError(f"slope must be a torch.Tensor [HV] of decay rates, got {type(slope).__name__}")
    if not slope.is_floating_point():
        raise TypeError(f"slope must have a floating-point dtype, got {slope.dtype}")
    if tuple(slope.shape) != (HV,):
        raise ValueError(f"slope must have shape [HV] = ({HV},), got {tuple(slope.shape)}")
    ck.check_same("slope", slope, "q", ref, dtype=False)


def _check(q, k, v, slope, scale, backend):
    _, _, _, HV, _ = ck.check_qkv(q, k, v, token_axis=q.dim() == 4)
    _check_slope(slope, HV, q)
    ck.check_backend(backend)
    ck.check_scale(scale)
    if backend == "triton":
        raise RuntimeError("backend='triton' is unavailable: no Triton kernel for lightning attention yet; "
                           "use backend='reference' or 'auto'")


def _positive(slope: torch.Tensor) -> None:
    if not bool((slope >= 0).all()):
        raise ValueError(f"slope must be >= 0 everywhere (decay exp(-slope) <= 1), got min {slope.min().item():.4g}")


# --------------------------------------------------------------------------- forms
_DOC_ARGS = """
    Args:
        q, k: [B, T, H, K] float tensors (any float dtype; computed in float32, float64 stays float64).
        v: [B, T, HV, V], same dtype as q; HV a multiple of H (value head i reads q/k head i // (HV // H)).
        slope: [HV] decay rate per value head (>= 0), any float dtype; see :func:`lightning_slopes`.
        scale: float, default 1.0 (MiniMax scales nothing).
        initial_state: optional [B, HV, K, V] (or [N, HV, K, V] with cu_seqlens), any float dtype.
        output_final_state: return the final state (float32, float64 for float64 inputs).
        cu_seqlens: optional int32/int64 [N + 1] boundaries of N sequences packed along T (B == 1).
        check_inputs: also check slope >= 0 (reads the values: a device sync).
    Returns:
        o [B, T, HV, V] in v's dtype, and the final state [B or N, HV, K, V] or None.

    Example::

        >>> q = k = torch.randn(1, 100, 4, 16); v = torch.randn(1, 100, 4, 16)
        >>> o, state = {call}(q, k, v, lightning_slopes(4), output_final_state=True)
        >>> o.shape, state.shape
        (torch.Size([1, 100, 4, 16]), torch.Size([1, 4, 16, 16]))
"""


def lightning_attention_naive(q, k, v, slope, *, scale=1.0, initial_state=None, output_final_state=False,
                              cu_seqlens=None, check_inputs=False):
    _check(q, k, v, slope, scale, "reference")
    if check_inputs:
        _positive(slope)
    B, T, HV, V = v.shape
    K = q.shape[-1]
    bounds, state_shape = ck.check_sequences_and_state(cu_seqlens, initial_state, B, T, (HV, K, V), q)
    starts = set(bounds[:-1]) if bounds is not None else {0}
    ct = ck.compute_dtype(q.dtype)
    q_, k_ = ck.heads_first(q, HV, ct), ck.heads_first(k, HV, ct)  # [B, HV, T, K]
    v_ = v.transpose(1, 2).to(ct)
    decay = torch.exp(-slope.to(ct))[:, None, None]  # [HV, 1, 1]
    zeros = torch.zeros(state_shape, dtype=ct, device=q.device)
    init = zeros if initial_state is None else initial_state.to(ct)
    outs, finals, seq, S = [], [], -1, None
    for t in range(T):
        if t in starts:  # a packed sequence begins: hand the last one's state over, load this one's
            if S is not None:
                finals.append(S)
            seq += 1
            S = init if bounds is None else init[seq : seq + 1]
        S = decay * S + k_[:, :, t, :, None] * v_[:, :, t, None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q_[:, :, t], S))
    finals.append(S)
    o = torch.stack(outs, 1).to(v.dtype)
    return o, (torch.cat(finals, 0) if output_final_state else None)


def lightning_attention_chunked(q, k, v, slope, *, scale=1.0, initial_state=None, output_final_state=False,
                                cu_seqlens=None, chunk_size=64, check_inputs=False):
    _check(q, k, v, slope, scale, "reference")
    if check_inputs:
        _positive(slope)
    g = (-slope).to(ck.compute_dtype(q.dtype)).expand(*v.shape[:3])  # [B, T, HV]: the same log-decay every token
    return linear_attention_chunked(q, k, v, g, feature_map="identity", scale=scale, initial_state=initial_state,
                                    output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                    chunk_size=chunk_size)


def lightning_attention(q, k, v, slope, *, scale=1.0, initial_state=None, output_final_state=False,
                        cu_seqlens=None, chunk_size=64, backend="auto", check_inputs=False):
    _check(q, k, v, slope, scale, backend)
    return lightning_attention_chunked(q, k, v, slope, scale=scale, initial_state=initial_state,
                                       output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                       chunk_size=chunk_size, check_inputs=check_inputs)


def lightning_attention_step(q, k, v, slope, state, *, scale=1.0, inplace=False, backend="auto"):
    """One decode token of lightning attention; returns (o [B, HV, V] in v's dtype, new state).

    Args:
        q, k: [B, H, K]; v: [B, HV, V] (same float dtype); slope: [HV] decay rates.
        state: [B, HV, K, V], float32 (float64 for float64 inputs).
        scale: float, default 1.0.
        inplace: write the new state into ``state`` and return that tensor (fixed address for CUDA graphs).
        backend: "auto" | "reference" ("triton" raises: no kernel yet).

    Example::

        >>> q = k = torch.randn(2, 4, 16); v = torch.randn(2, 4, 16)
        >>> o, s = lightning_attention_step(q, k, v, lightning_slopes(4), torch.zeros(2, 4, 16, 16))
    """
    _check(q, k, v, slope, scale, backend)
    B, HV, V = v.shape
    ck.check_state("state", state, (B, HV, q.shape[-1], V), q)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    ct = ck.compute_dtype(q.dtype)
    q_, k_ = ck.heads_first(q[:, None], HV, ct)[:, :, 0], ck.heads_first(k[:, None], HV, ct)[:, :, 0]  # [B, HV, K]
    S = torch.exp(-slope.to(ct))[:, None, None] * state.to(ct) + k_[..., :, None] * v.to(ct)[..., None, :]
    o = (scale * torch.einsum("bhk,bhkv->bhv", q_, S)).to(v.dtype)
    if inplace:
        return o, state.copy_(S)
    return o, S


lightning_attention_naive.__doc__ = "Lightning attention as a token loop: the readable reference.\n" + _DOC_ARGS.format(
    call="lightning_attention_naive")
lightning_attention_chunked.__doc__ = (
    "Lightning attention block-wise (``chunk_size`` a power of two): masked decayed products inside a\n"
    "    block, the state carried across blocks.\n" + _DOC_ARGS.format(call="lightning_attention_chunked"))
lightning_attention.__doc__ = ("Lightning attention. ``backend``: 'auto' or 'reference' (the block-wise form); "
                               "'triton'\n    raises RuntimeError (no kernel yet).\n"
                               + _DOC_ARGS.format(call="lightning_attention"))
