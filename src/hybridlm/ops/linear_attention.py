"""Linear attention with a feature map, optional per-head decay and optional normaliser.

    S_t = exp(g_t) S_{t-1} + phi(k_t) v_t^T          o_t = scale * phi(q_t)^T S_t

re-associated as phi(Q) (phi(K)^T V), so the state is [K, V] whatever T is. With ``g`` this is
lightning attention (MiniMax); without it, plain linear attention (Katharopoulos et al. 2020).

Legend: B batch, T tokens, H q/k heads, HV value heads (a multiple of H), K key dim, V value dim,
N chunks, C chunk length. Internals are heads-first ([B, HV, T, D]) in the compute dtype
(float32, or float64 for float64 inputs). The chunk helpers here are shared with the delta rule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridlm.ops import _checks as ck

FEATURE_MAPS = ("identity", "elu", "relu")
NORMALIZE_EPS = 1e-6


# --------------------------------------------------------------------------- chunk helpers
def split_chunks(x_BHT: torch.Tensor, C: int) -> torch.Tensor:
    """[B, HV, T, *D] -> [B, HV, N, C, *D], zero-padding T up to a multiple of C.

    Zero padding is inert for every rule here: k = 0 writes nothing, g = 0 decays nothing and
    beta = 0 corrects nothing, so the final state is that of the last real token.
    """
    T = x_BHT.shape[2]
    pad = -T % C
    if pad:
        tail = [0, 0] * (x_BHT.dim() - 3) + [0, pad]
        x_BHT = F.pad(x_BHT, tail)
    return x_BHT.unflatten(2, (x_BHT.shape[2] // C, C))


def merge_chunks(x_BHNCD: torch.Tensor, T: int) -> torch.Tensor:
    """Inverse of split_chunks: [B, HV, N, C, D] -> [B, HV, T, D]."""
    return x_BHNCD.flatten(2, 3)[:, :, :T]


def chunk_decays(g_BHNC: torch.Tensor):
    """Decay factors of the chunked form, from the in-chunk cumulative log-decay.

    Returns (Gamma [.., C, C], to_start [.., C], to_end [.., C], whole [..]):
    Gamma_ij = exp(G_i - G_j) for i >= j else 0, to_start_i = exp(G_i), to_end_i = exp(G_C - G_i),
    whole = exp(G_C), with G the cumsum of g inside the chunk. Only non-positive numbers are ever
    exponentiated (the upper triangle is masked to -inf *before* exp), so nothing overflows.
    """
    G = g_BHNC.cumsum(-1)
    C = G.shape[-1]
    causal = torch.ones(C, C, dtype=torch.bool, device=G.device).tril()
    Gamma = torch.exp((G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")))
    return Gamma, G.exp(), (G[..., -1:] - G).exp(), G[..., -1].exp()


# --------------------------------------------------------------------------- cores (heads-first)
def _naive_core(q, k, v, g, S):
    """Token loop. q, k [B, HV, T, K]; v [B, HV, T, V']; g [B, HV, T]; S [B, HV, K, V']."""
    outs = []
    for t in range(q.shape[2]):
        S = g[:, :, t, None, None].exp() * S + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
    return torch.stack(outs, 2), S


def _chunked_core(q, k, v, g, S, C: int):
    """Chunked form: all intra-chunk products at once, then a cheap elementwise pass over chunks."""
    T = q.shape[2]
    qc, kc, vc, gc = (split_chunks(x, C) for x in (q, k, v, g))
    Gamma, to_start, to_end, whole = chunk_decays(gc)
    o = ((qc @ kc.transpose(-1, -2)) * Gamma) @ vc
    writes = (kc * to_end[..., None]).transpose(-1, -2) @ vc  # [B, HV, N, K, V']
    entering = []
    for n in range(qc.shape[2]):
        entering.append(S)
        S = whole[:, :, n, None, None] * S + writes[:, :, n]
    o = o + (qc * to_start[..., None]) @ torch.stack(entering, 2)
    return merge_chunks(o, T), S


# --------------------------------------------------------------------------- shared driver
def _feature(x: torch.Tensor, feature_map: str) -> torch.Tensor:
    if feature_map == "elu":
        return F.elu(x) + 1
    if feature_map == "relu":
        return F.relu(x)
    return x


def _check(q, k, v, g, feature_map, normalize, scale, initial_state, cu_seqlens, backend, check_inputs):
    B, H, K, HV, V = ck.check_qkv(q, k, v)
    ck.check_choice("feature_map", feature_map, FEATURE_MAPS)
    ck.check_backend(backend)
    ck.check_scale(scale)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    T = q.shape[1]
    if g is not None:
        ck.check_gate("g", g, (B, T, HV), "[B, T, HV]", q)
    bounds, state_shape = ck.check_sequences_and_state(cu_seqlens, initial_state, B, T,
                                                        (HV, K, V + int(normalize)), q)
    if check_inputs:
        ck.check_value_ranges(g, None)
    return bounds, state_shape


def _run(core, q, k, v, g, feature_map, normalize, scale, initial_state, output_final_state, bounds, state_shape):
    """Upcast, apply phi and the scale, add the normaliser column, run ``core`` per sequence."""
    ct = ck.compute_dtype(q.dtype)
    HV, V = v.shape[2], v.shape[3]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q_ = _feature(ck.heads_first(q, HV, ct), feature_map) * scale
    k_ = _feature(ck.heads_first(k, HV, ct), feature_map)
    v_ = ck.heads_first(v, HV, ct)
    if normalize:  # z = sum of decayed phi(k) rides along as one more value column
        v_ = torch.cat([v_, torch.ones_like(v_[..., :1])], -1)
    g_ = torch.zeros_like(v_[..., 0]) if g is None else ck.heads_first(g, HV, ct)
    S0 = torch.zeros(state_shape, dtype=ct, device=q.device) if initial_state is None else initial_state.to(ct)
    o, S = ck.run_per_sequence(core, [q_, k_, v_, g_], S0, bounds)
    if normalize:
        o = o[..., :V] / (o[..., V:] + NORMALIZE_EPS)
    # contiguous, so callers may .view() the result as [B, T, HV * V]
    o = o.transpose(1, 2).contiguous().to(v.dtype)
    return o, (S if output_final_state else None)


# --------------------------------------------------------------------------- public forms
_DOC_ARGS = """
    Args:
        q, k: [B, T, H, K] float tensors (any float dtype; computed in float32, float64 stays float64).
        v: [B, T, HV, V], same dtype as q; HV a multiple of H (value head i reads q/k head i // (HV // H)).
        g: optional [B, T, HV] log-decay (<= 0), any float dtype. None means no decay.
        feature_map: "identity", "elu" (elu(x) + 1) or "relu", applied to q and k.
        normalize: divide by the scaled phi(q_t)^T z_t + 1e-6, z_t the decayed sum of phi(k);
            the state then carries z as an extra value column, [.., K, V + 1]. The scale then
            cancels (but for the eps), as in flash-linear-attention.
        scale: float, default K ** -0.5.
        initial_state: optional [B, HV, K, V(+1)] (or [N, ...] with cu_seqlens), any float dtype.
        output_final_state: return the final state (float32, float64 for float64 inputs).
        cu_seqlens: optional int32/int64 [N + 1] boundaries of N sequences packed along T (B == 1).
        chunk_size (chunked forms): chunk length, a positive power of two.
        check_inputs: also check g <= 0 (reads the values: a device sync).
    Returns:
        o [B, T, HV, V] in v's dtype, and the final state [B or N, HV, K, V(+1)] or None.
"""


def linear_attention_naive(q, k, v, g=None, *, feature_map="identity", normalize=False, scale=None,
                           initial_state=None, output_final_state=False, cu_seqlens=None, check_inputs=False):
    bounds, shape = _check(q, k, v, g, feature_map, normalize, scale, initial_state, cu_seqlens, "reference",
                           check_inputs)
    return _run(_naive_core, q, k, v, g, feature_map, normalize, scale, initial_state, output_final_state,
                bounds, shape)


def linear_attention_chunked(q, k, v, g=None, *, feature_map="identity", normalize=False, scale=None,
                             initial_state=None, output_final_state=False, cu_seqlens=None, chunk_size=64,
                             check_inputs=False):
    ck.check_chunk_size(chunk_size)
    bounds, shape = _check(q, k, v, g, feature_map, normalize, scale, initial_state, cu_seqlens, "reference",
                           check_inputs)
    core = lambda *xs: _chunked_core(*xs, chunk_size)  # noqa: E731
    return _run(core, q, k, v, g, feature_map, normalize, scale, initial_state, output_final_state, bounds, shape)


def linear_attention(q, k, v, g=None, *, feature_map="identity", normalize=False, scale=None, initial_state=None,
                     output_final_state=False, cu_seqlens=None, chunk_size=64, backend="auto",
                     check_inputs=False):
    ck.check_chunk_size(chunk_size)
    _check(q, k, v, g, feature_map, normalize, scale, initial_state, cu_seqlens, backend, check_inputs)
    kernel = ck.load_kernel("chunk_linear_attention", backend, q)
    if kernel is not None:
        return kernel(q, k, v, g, feature_map=feature_map, normalize=normalize, scale=scale,
                      initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    return linear_attention_chunked(q, k, v, g, feature_map=feature_map, normalize=normalize, scale=scale,
                                    initial_state=initial_state, output_final_state=output_final_state,
                                    cu_seqlens=cu_seqlens, chunk_size=chunk_size)


def linear_attention_step(q, k, v, state, g=None, *, feature_map="identity", normalize=False, scale=None,
                          backend="auto"):
    """One decode token of linear attention; returns (o [B, HV, V] in v's dtype, new state).

    Args:
        q, k: [B, H, K]; v: [B, HV, V] (same float dtype); g: optional [B, HV] log-decay.
        state: [B, HV, K, V] (V + 1 with normalize), float32 (float64 for float64 inputs); not modified.
        feature_map, normalize, scale: as in :func:`linear_attention`.
        backend: "auto" | "reference" | "triton" (no Triton kernel exists for this step yet).

    Example::

        >>> q = k = torch.randn(1, 2, 8); v = torch.randn(1, 2, 8)
        >>> o, s = linear_attention_step(q, k, v, torch.zeros(1, 2, 8, 8))
    """
    ck.check_backend(backend)
    ck.check_qkv(q, k, v, token_axis=False)
    if g is not None:
        ck.check_gate("g", g, v.shape[:2], "[B, HV]", q)
    kernel = ck.load_kernel("fused_recurrent_linear_attention_step", backend, q)
    if kernel is not None:
        return kernel(q, k, v, state, g, feature_map=feature_map, normalize=normalize, scale=scale)
    o, S = linear_attention_naive(q[:, None], k[:, None], v[:, None], None if g is None else g[:, None],
                                  feature_map=feature_map, normalize=normalize, scale=scale, initial_state=state,
                                  output_final_state=True)
    return o[:, 0], S


_EXAMPLE = """
    Example::

        >>> q = k = torch.randn(1, 100, 2, 16); v = torch.randn(1, 100, 2, 16)
        >>> o, state = {name}(q, k, v, feature_map="elu", output_final_state=True)
        >>> o.shape, state.shape
        (torch.Size([1, 100, 2, 16]), torch.Size([1, 2, 16, 16]))
"""
linear_attention_naive.__doc__ = ("Linear attention as a token loop: the readable reference.\n" + _DOC_ARGS
                                  + _EXAMPLE.format(name="linear_attention_naive"))
linear_attention_chunked.__doc__ = ("Linear attention in chunks of ``chunk_size`` (a power of two): masked\n"
                                    "    intra-chunk products plus the state carried between chunks.\n" + _DOC_ARGS
                                    + _EXAMPLE.format(name="linear_attention_chunked"))
linear_attention.__doc__ = ("Linear attention; ``backend`` 'auto' | 'reference' | 'triton' picks the implementation\n"
                            "    (the reference is the chunked form).\n" + _DOC_ARGS
                            + _EXAMPLE.format(name="linear_attention"))
