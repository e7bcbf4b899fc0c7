"""Chunked gated delta rule on the GPU: public entry point, custom ops and autograd.

Legend: B batch, T tokens, N sequences, NTOK = B * T flat tokens, NC chunks, H q/k heads,
HV value heads, K key size, V value size.

Forward: ``chunk_prep`` (per chunk, parallel: in-chunk decay cumsum, WY transform, causal Q K^T)
then ``chunk_fwd`` (sequential over chunks: output and states). Backward reuses the prep outputs,
reruns the state pass storing the state entering every chunk, carries the state gradient from the
last chunk to the first (``chunk_bwd_state``) and ends with chunk-local gradients
(``chunk_bwd_local``).

Both directions are ``torch.library`` custom ops (``hybridlm::chunk_gdr_fwd`` and
``hybridlm::chunk_gdr_bwd``), so ``torch.compile(fullgraph=True)`` traces through them.
The forward applies the q/k l2-norm inside its kernels (row scales of the products); the backward
normalises q and k in one Triton pass and takes the norm's gradient in another. The gate
g = -exp(A_log) softplus(g + dt_bias) runs as PyTorch ops before the custom op, so autograd
differentiates it.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from hybridlm.ops import _checks as ck
from hybridlm.ops.triton.chunk_bwd import chunk_bwd_state
from hybridlm.ops.triton.chunk_bwd_local import chunk_bwd_local
from hybridlm.ops.triton.chunk_fwd import chunk_fwd
from hybridlm.ops.triton.chunk_prep import chunk_prep, l2norm_rows, qk_grad
from hybridlm.ops.triton.utils import sequence_tables

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=64)
def _uniform_tables(B: int, T: int, device: torch.device):
    # building the equal-length tables takes about eight small launches, paid by every layer call
    return sequence_tables(B, T, None, device)


def _tables(q: torch.Tensor, cu_seqlens: Optional[torch.Tensor]):
    B, T = q.shape[:2]
    if cu_seqlens is None:
        return _uniform_tables(B, T, q.device)
    # the entry point skips reading the values when traced by torch.compile; they are checked here
    return sequence_tables(B, T, ck.check_cu_seqlens(cu_seqlens, B, T), q.device)


def _vec_chunks(q: torch.Tensor, cu_seqlens: Optional[torch.Tensor]) -> int:
    """Rows of ``chunk_prep``'s vec as the op allocates them: at least the chunk count, from shapes
    alone (packed sequences make the count itself data-dependent, which a fake kernel cannot know):
    each of N sequences adds at most one partial chunk to NTOK // 64 full ones."""
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return q.shape[0] * q.shape[1] // 64 + N


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).contiguous()


_Ten = torch.Tensor
FwdOut = tuple[_Ten, _Ten, _Ten, _Ten, _Ten, _Ten]  # o, final state, gc, t, m, vec
BwdOut = tuple[_Ten, _Ten, _Ten, _Ten, _Ten, _Ten]  # dq, dk, dv, dg, dbeta, dh0


@torch.library.custom_op("hybridlm::chunk_gdr_fwd", mutates_args=())
def chunk_gdr_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                  initial_state: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                  scale: float, use_qk_l2norm: bool) -> FwdOut:
    """(o [B, T, HV, V] in v's dtype, final state float32 [N, HV, K, V], then what the backward
    reuses: ``chunk_prep``'s gc, t, m, vec); inputs as the entry point.

    The q/k l2-norm is applied inside the kernels as row scales of their products, so no normalised
    copy of q or k is written (a separate pass took 0.134 ms of 1.71 at Qwen3-Next heads, B 1, T 32k,
    on an H200)."""
    cu, chunk_offsets, chunk_bounds = _tables(q, cu_seqlens)
    HV = v.shape[2]
    beta_f = _flat(beta)
    qf, kf = _flat(q), _flat(k)
    gc, t, m, vec = chunk_prep(qf, kf, _flat(g), beta_f, chunk_bounds, HV, l2norm=use_qk_l2norm,
                               vec_chunks=_vec_chunks(q, cu_seqlens))
    h0 = None if initial_state is None else initial_state.contiguous()
    o, ht, _ = chunk_fwd(qf, kf, _flat(v), vec, t, m, h0, cu, chunk_offsets, scale, l2norm=use_qk_l2norm)
    return o.view(v.shape), ht, gc, t, m, vec


@chunk_gdr_fwd.register_fake
def _(q, k, v, g, beta, initial_state, cu_seqlens, scale, use_qk_l2norm):
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    NTOK, HV = q.shape[0] * q.shape[1], v.shape[2]
    state = q.new_empty(N, HV, q.shape[3], v.shape[3], dtype=torch.float32)
    t = q.new_empty(NTOK, HV, 64)
    vec = q.new_empty(_vec_chunks(q, cu_seqlens), HV, 64, 4, dtype=torch.float32)
    return torch.empty_like(v), state, q.new_empty(NTOK, HV, dtype=torch.float32), t, torch.empty_like(t), vec


@torch.library.custom_op("hybridlm::chunk_gdr_bwd", mutates_args=())
def chunk_gdr_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                  initial_state: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], scale: float,
                  use_qk_l2norm: bool, gc: torch.Tensor, t: torch.Tensor, m: torch.Tensor, vec: torch.Tensor,
                  do: torch.Tensor, dht: Optional[torch.Tensor]) -> BwdOut:
    """(dq, dk, dv, dg, dbeta, dh0) in the dtypes of (q, k, v, g, beta, float32 state)."""
    cu, chunk_offsets, chunk_bounds = _tables(q, cu_seqlens)
    NC = chunk_bounds.shape[0]
    qf, kf = _flat(q), _flat(k)
    if use_qk_l2norm:  # the backward's kernels take the normalised rows themselves
        qf, kf = l2norm_rows(qf), l2norm_rows(kf)
    vf, beta_f = _flat(v), _flat(beta)
    h0 = None if initial_state is None else initial_state.contiguous()
    _, _, h = chunk_fwd(qf, kf, vf, vec, t, m, h0, cu, chunk_offsets, scale, store_chunks=NC)
    dof = _flat(do.to(v.dtype))
    dh, dh0, dvn = chunk_bwd_state(qf, kf, dof, gc, beta_f, t, m, dht, cu, chunk_offsets, scale, NC)
    dq, dk, dv, dg, dbeta = chunk_bwd_local(qf, kf, vf, gc, beta_f, t, m, dof, h, dh, dvn, chunk_bounds, scale)
    # sum over each q/k head's value heads, through the l2-norm's gradient when it was applied
    dq, dk = qk_grad(_flat(q), dq, use_qk_l2norm), qk_grad(_flat(k), dk, use_qk_l2norm)
    return (dq.view(q.shape), dk.view(k.shape), dv.view(v.shape),
            dg.view(g.shape).to(g.dtype), dbeta.view(beta.shape).to(beta.dtype), dh0)


@chunk_gdr_bwd.register_fake
def _(q, k, v, g, beta, initial_state, cu_seqlens, scale, use_qk_l2norm, gc, t, m, vec, do, dht):
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    dh0 = q.new_empty(N, v.shape[2], q.shape[3], v.shape[3], dtype=torch.float32)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g),
            torch.empty_like(beta), dh0)


def _setup_context(ctx, inputs, output):
    q, k, v, g, beta, initial_state, cu_seqlens, scale, use_qk_l2norm = inputs
    saved = output[2:]
    ctx.mark_non_differentiable(*saved)
    ctx.save_for_backward(q, k, v, g, beta, initial_state, cu_seqlens, *saved)
    ctx.scale, ctx.use_qk_l2norm = scale, use_qk_l2norm


def _backward(ctx, do, dht, *_):
    q, k, v, g, beta, initial_state, cu_seqlens, gc, t, m, vec = ctx.saved_tensors
    dq, dk, dv, dg, dbeta, dh0 = chunk_gdr_bwd(q, k, v, g, beta, initial_state, cu_seqlens, ctx.scale,
                                               ctx.use_qk_l2norm, gc, t, m, vec, do.contiguous(),
                                               None if dht is None else dht.contiguous())
    return dq, dk, dv, dg, dbeta, (None if initial_state is None else dh0), None, None, None


chunk_gdr_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check(q, k, v, g, beta, scale, initial_state, cu_seqlens, chunk_size, A_log, dt_bias):
    B, H, K, HV, V = ck.check_qkv(q, k, v)
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"q must be float32, bfloat16 or float16 for the Triton kernel, got {q.dtype} "
                        "(use backend='reference' for float64)")
    if chunk_size != 64:
        raise ValueError(f"chunk_size must be 64 for the Triton kernel, got {chunk_size}")
    if K > 128 or V > 128 or K < 1 or V < 1:
        raise ValueError(f"q's key size K and v's value size V must lie in 1..128, got K = {K}, V = {V}")
    ck.check_scale(scale)
    T = q.shape[1]
    ck.check_gate("g", g, (B, T, HV), "[B, T, HV]", q)
    ck.check_gate("beta", beta, (B, T, HV), "[B, T, HV]", q)
    # traced by torch.compile the values cannot be read (a host sync); the custom op checks them
    ck.check_cu_seqlens(cu_seqlens, B, T, values=not torch.compiler.is_compiling())
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if initial_state is not None:
        ck.check_state("initial_state", initial_state, (N, HV, K, V), q)
    ck.check_fused_gate(A_log, dt_bias, g, HV, q)


def chunk_gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                           cu_seqlens=None, chunk_size=64, use_qk_l2norm=False, A_log=None, dt_bias=None):
    """Chunked gated delta rule (Triton): S = exp(g) S; S += beta k (v - S^T k)^T; o = scale S^T q.

    Args:
        q, k: [B, T, H, K] float32/bfloat16/float16 (one dtype with v), K <= 128.
        v: [B, T, HV, V], HV a multiple of H (value head i reads q/k head i // (HV // H)), V <= 128.
        g: [B, T, HV] log-decay (<= 0), any float dtype; with ``A_log`` and ``dt_bias`` it is the raw
            gate input and the log-decay is -exp(A_log) * softplus(g + dt_bias).
        beta: [B, T, HV] write strength in [0, 1], any float dtype.
        scale: float, default K ** -0.5.
        initial_state: optional [B, HV, K, V] (or [N, HV, K, V] with cu_seqlens), read as float32.
        output_final_state: also return the final state, float32 [B or N, HV, K, V].
        cu_seqlens: optional int32/int64 [N + 1] boundaries of N sequences packed along T (B == 1).
        chunk_size: must be 64.
        use_qk_l2norm: l2-normalise q and k over K (float32, eps 1e-6) first.
        A_log, dt_bias: optional [HV] float tensors of the fused gate (see g).
    Returns:
        o [B, T, HV, V] in v's dtype and the final state (or None). Differentiable in q, k, v, g, beta,
        initial_state, A_log and dt_bias.

    Example::

        >>> q, k = torch.randn(1, 100, 2, 64, device="cuda"), torch.randn(1, 100, 2, 64, device="cuda")
        >>> v, g = torch.randn(1, 100, 4, 64, device="cuda"), -torch.rand(1, 100, 4, device="cuda")
        >>> o, s = chunk_gated_delta_rule(q, k, v, g, torch.rand(1, 100, 4, device="cuda"),
        ...                               use_qk_l2norm=True, output_final_state=True)
    """
    _check(q, k, v, g, beta, scale, initial_state, cu_seqlens, chunk_size, A_log, dt_bias)
    ck.check_kernel_device("q", q)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if A_log is not None:
        g = ck.fused_gate(g, A_log, dt_bias)
    h0 = None if initial_state is None else initial_state.float()
    o, final_state, *_ = chunk_gdr_fwd(q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(),
                                       beta.contiguous(), h0, cu_seqlens, scale, bool(use_qk_l2norm))
    return o, (final_state if output_final_state else None)
