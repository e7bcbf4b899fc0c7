"""Multi-head latent attention (MLA: DeepSeek V2/V3, Kimi Linear) over a cache of latents.

The cache holds, per token, only the compressed latent c [R] (kv_lora_rank, already normalised) and one
rotary key k_rope [Dr] shared by all heads. The up-projection W = kv_b_proj.weight [H * (Dn + Dv), R]
(rows of head h: Dn rows W_k^h, then Dv rows W_v^h) makes the per-head keys and values:

    k^h_s = [W_k^h c_s ; k_rope_s]       v^h_s = W_v^h c_s
    o^h_t = sum_s softmax_s(scale * (q_nope^h_t . W_k^h c_s + q_rope^h_t . k_rope_s)) v^h_s

Two forms that must agree:
  expanded  build k^h, v^h for every cached token, then softmax attention (the readable reference;
            cheap when T is large, as in prefill);
  absorbed  q_nope^h . W_k^h c = (W_k^h^T q_nope^h) . c, so fold W_k into the query and W_v into the
            output: one shared key [c ; k_rope] (R + Dr) and one shared value c (R) for all heads, i.e.
            multi-query attention on the cache as stored (what decode does: nothing expanded per token).

Legend: B batch, T queries, S cached tokens, H heads, Dn / Dr query-key no-rope / rope dims, Dv value
dim, R latent rank (kv_lora_rank).
"""

from __future__ import annotations

import torch

from hybridlm.ops import _checks as ck
from hybridlm.ops.softmax_attention import softmax_attention, softmax_attention_reference


def _check(q_nope, q_rope, kv_latent, k_rope, w_kv_b, backend):
    ck.check_backend(backend)
    ck.check_float_tensor("q_nope", q_nope, 4, "[B, T, H, Dn]")
    ck.check_float_tensor("q_rope", q_rope, 4, "[B, T, H, Dr]")
    ck.check_float_tensor("kv_latent", kv_latent, 3, "[B, S, R]")
    ck.check_float_tensor("k_rope", k_rope, 3, "[B, S, Dr]")
    ck.check_float_tensor("w_kv_b", w_kv_b, 2, "[H * (Dn + Dv), R]")
    for name, x in (("q_rope", q_rope), ("kv_latent", kv_latent), ("k_rope", k_rope), ("w_kv_b", w_kv_b)):
        ck.check_same(name, x, "q_nope", q_nope, dtype=False)
    B, T, H, Dn = q_nope.shape
    if q_rope.shape[:3] != q_nope.shape[:3]:
        raise ValueError(f"q_rope must match q_nope in [B, T, H] = {tuple(q_nope.shape[:3])}, "
                         f"got {tuple(q_rope.shape)}")
    S, R = kv_latent.shape[1], kv_latent.shape[2]
    if kv_latent.shape[0] != B:
        raise ValueError(f"kv_latent must have batch size B = {B}, got shape {tuple(kv_latent.shape)}")
    if tuple(k_rope.shape) != (B, S, q_rope.shape[-1]):
        raise ValueError(f"k_rope must have shape [B, S, Dr] = {(B, S, q_rope.shape[-1])}, got {tuple(k_rope.shape)}")
    rows = w_kv_b.shape[0]
    if w_kv_b.shape[1] != R or rows % H or rows // H <= Dn:
        raise ValueError(f"w_kv_b must be kv_b_proj.weight [H * (Dn + Dv), R] with H = {H}, Dn = {Dn}, R = {R} "
                         f"and Dv >= 1, got shape {tuple(w_kv_b.shape)}")
    if backend == "triton":
        raise RuntimeError("backend='triton' is unavailable: no Triton kernel for MLA yet; "
                           "use backend='reference' or 'auto'")


def _attend(q, k, v, scale, causal, q_pos, k_pos, backend):
    if backend == "reference":
        return softmax_attention_reference(q, k, v, scale=scale, causal=causal, q_pos=q_pos, k_pos=k_pos)
    return softmax_attention(q, k, v, scale=scale, causal=causal, q_pos=q_pos, k_pos=k_pos)


def split_kv_b(w_kv_b: torch.Tensor, num_heads: int, nope_dim: int):
    """kv_b_proj.weight [H * (Dn + Dv), R] -> (W_k [H, Dn, R], W_v [H, Dv, R])."""
    w = w_kv_b.unflatten(0, (num_heads, -1))
    return w[:, :nope_dim], w[:, nope_dim:]


def expand_latents(kv_latent, k_rope, w_k, w_v):
    """Per-head keys [B, S, H, Dn + Dr] and values [B, S, H, Dv] of cached latents.

    kv_latent [B, S, R], k_rope [B, S, Dr]; w_k [H, Dn, R], w_v [H, Dv, R] from :func:`split_kv_b`.
    """
    k_nope = torch.einsum("bsr,hdr->bshd", kv_latent, w_k)
    v = torch.einsum("bsr,hdr->bshd", kv_latent, w_v)
    return torch.cat([k_nope, k_rope[:, :, None, :].expand(-1, -1, w_k.shape[0], -1)], -1), v


def _expanded(q_nope, q_rope, kv_latent, k_rope, w_k, w_v, **attn):
    k, v = expand_latents(kv_latent, k_rope, w_k, w_v)
    return _attend(torch.cat([q_nope, q_rope], -1), k, v, **attn)


def _absorbed(q_nope, q_rope, kv_latent, k_rope, w_k, w_v, **attn):
    q_latent = torch.einsum("bthd,hdr->bthr", q_nope, w_k)  # W_k folded into the query
    q = torch.cat([q_latent, q_rope], -1)  # [B, T, H, R + Dr]
    k = torch.cat([kv_latent, k_rope], -1)[:, :, None]  # [B, S, 1, R + Dr]: one key head for all
    o_latent = _attend(q, k, kv_latent[:, :, None], **attn)  # [B, T, H, R]
    return torch.einsum("bthr,hdr->bthd", o_latent, w_v)  # W_v folded into the output


def mla_attention(q_nope, q_rope, kv_latent, k_rope, w_kv_b, *, scale=None, causal=True, q_pos=None, k_pos=None,
                  absorb=False, backend="auto"):
    """Multi-head latent attention of T queries over S cached latents; returns o [B, T, H, Dv].

    Args:
        q_nope: [B, T, H, Dn] float, the query part matched against the up-projected latent.
        q_rope: [B, T, H, Dr], the rotary part of the query (rotary embedding already applied).
        kv_latent: [B, S, R], the cached latents (after the kv_a norm), any float dtype.
        k_rope: [B, S, Dr], the cached rotary key shared by all heads (rotary already applied).
        w_kv_b: [H * (Dn + Dv), R], kv_b_proj.weight as stored in DeepSeek / Kimi checkpoints
            (per head: Dn key rows, then Dv value rows).
        scale: float, default (Dn + Dr) ** -0.5 (DeepSeek's YaRN mscale, if any, is the caller's).
        causal, q_pos, k_pos: visibility as in :func:`hybridlm.ops.softmax_attention` (q_pos [B, T] and
            k_pos [B, S] integer; negative k_pos marks an empty or padded cache slot).
        absorb: False: expand K and V per head (reference); True: fold the up-projection into the
            query and output (decode form). Both give the same result.
        backend: "auto" (softmax via SDPA) | "reference" (masked softmax in float32); "triton" raises.
    Returns:
        o [B, T, H, Dv] in q_nope's dtype, computed in float32 (float64 for float64 inputs).

    Example::

        >>> B, T, H, Dn, Dr, Dv, R = 1, 5, 4, 16, 8, 16, 32
        >>> w = torch.randn(H * (Dn + Dv), R) / R ** 0.5
        >>> o = mla_attention(torch.randn(B, T, H, Dn), torch.randn(B, T, H, Dr), torch.randn(B, T, R),
        ...                   torch.randn(B, T, Dr), w, absorb=True)
        >>> o.shape
        torch.Size([1, 5, 4, 16])
    """
    _check(q_nope, q_rope, kv_latent, k_rope, w_kv_b, backend)
    if not isinstance(absorb, bool):
        raise TypeError(f"absorb must be a bool, got {type(absorb).__name__}")
    ck.check_scale(scale)
    ct = ck.compute_dtype(q_nope.dtype)
    H, Dn = q_nope.shape[2], q_nope.shape[3]
    scale = (Dn + q_rope.shape[-1]) ** -0.5 if scale is None else scale
    w_k, w_v = split_kv_b(w_kv_b.to(ct), H, Dn)
    form = _absorbed if absorb else _expanded
    o = form(q_nope.to(ct), q_rope.to(ct), kv_latent.to(ct), k_rope.to(ct), w_k, w_v, scale=scale, causal=causal,
             q_pos=q_pos, k_pos=k_pos, backend=backend)
    return o.to(q_nope.dtype)
