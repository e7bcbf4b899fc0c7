"""The gated delta rule (Gated DeltaNet, Qwen3-Next) and the delta rule (DeltaNet, g = 0).

Per value head, with state S [K, V] (math in shared/reference/gated-delta-rule.md):

    S_t = exp(g_t) S_{t-1};   S_t = S_t + beta_t k_t (v_t - S_t^T k_t)^T;   o_t = scale * S_t^T q_t

Three forms behind one signature: a token loop (the readable reference), the chunked WY / UT form
(the reference used for prefill and training), and one decode step.

Legend: B batch, T tokens, H q/k heads, HV value heads (a multiple of H), K key dim, V value dim,
N chunks, C chunk length. Internals are heads-first ([B, HV, T, D]) in the compute dtype
(float32, or float64 for float64 inputs).
"""

from __future__ import annotations

import torch

from hybridlm.ops import _checks as ck
from hybridlm.ops.linear_attention import chunk_decays, merge_chunks, split_chunks


# --------------------------------------------------------------------------- cores (heads-first)
def _naive_core(q, k, v, g, beta, S):
    """Token loop. q, k [B, HV, T, K] (q already scaled); v [B, HV, T, V]; g, beta [B, HV, T]; S [B, HV, K, V]."""
    outs = []
    for t in range(q.shape[2]):
        k_t = k[:, :, t]
        S = g[:, :, t, None, None].exp() * S
        # the surprise: what the state recalls at address k_t against what should be there
        u_t = beta[:, :, t, None] * (v[:, :, t] - torch.einsum("bhk,bhkv->bhv", k_t, S))
        S = S + k_t[..., :, None] * u_t[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
    return torch.stack(outs, 2), S


def _chunked_core(q, k, v, g, beta, S, C: int):
    """Chunked WY form. Every chunk's C rank-1 updates collapse to W [C, K] and U [C, V] with
    (I + A) [W | U] = [beta gamma K | beta V], A = strict-lower(diag(beta) (K K^T * Gamma)): solving
    that unit-triangular system is the UT transform T = (I + A)^-1 applied without forming T.
    W, U and the intra-chunk scores are computed for all chunks at once; only the state pass
    V_new = U - W S,  S' = gamma_C S + (K * gamma_C / gamma)^T V_new  runs chunk after chunk.
    """
    T = q.shape[2]
    qc, kc, vc, gc, bc = (split_chunks(x, C) for x in (q, k, v, g, beta))
    Gamma, to_start, to_end, whole = chunk_decays(gc)
    kb = kc * bc[..., None]
    # A's strict lower triangle; unitriangular=True reads the diagonal as 1 and ignores the upper part,
    # so no tril or added identity is needed (nor a gradient into the entries it ignores)
    A = (kb @ kc.transpose(-1, -2)) * Gamma
    W = torch.linalg.solve_triangular(A, kb * to_start[..., None], upper=False, unitriangular=True)
    U = torch.linalg.solve_triangular(A, vc * bc[..., None], upper=False, unitriangular=True)
    scores = (qc @ kc.transpose(-1, -2)) * Gamma  # causal incl. the diagonal
    k_end = (kc * to_end[..., None]).transpose(-1, -2)  # [B, HV, N, K, C]
    entering, v_new = [], []
    for n in range(qc.shape[2]):
        entering.append(S)
        v_new.append(U[:, :, n] - W[:, :, n] @ S)
        S = whole[:, :, n, None, None] * S + k_end[:, :, n] @ v_new[-1]
    o = (qc * to_start[..., None]) @ torch.stack(entering, 2) + scores @ torch.stack(v_new, 2)
    return merge_chunks(o, T), S


# --------------------------------------------------------------------------- shared driver
def _check(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm, backend, check_inputs):
    B, H, K, HV, V = ck.check_qkv(q, k, v)
    ck.check_backend(backend)
    ck.check_scale(scale)
    if not isinstance(use_qk_l2norm, bool):
        raise TypeError(f"use_qk_l2norm must be a bool, got {type(use_qk_l2norm).__name__}")
    T = q.shape[1]
    if g is not None:
        ck.check_gate("g", g, (B, T, HV), "[B, T, HV]", q)
    ck.check_gate("beta", beta, (B, T, HV), "[B, T, HV]", q)
    bounds, state_shape = ck.check_sequences_and_state(cu_seqlens, initial_state, B, T, (HV, K, V), q)
    if check_inputs:
        ck.check_value_ranges(g, beta)
    return bounds, state_shape


def _run(core, q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, bounds, state_shape):
    """Upcast, l2-normalise and scale, expand heads, run ``core`` per sequence, restore layout and dtype."""
    ct = ck.compute_dtype(q.dtype)
    HV = v.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q_, k_ = ck.heads_first(q, HV, ct), ck.heads_first(k, HV, ct)
    if use_qk_l2norm:
        q_, k_ = ck.l2norm(q_), ck.l2norm(k_)
    v_, beta_ = ck.heads_first(v, HV, ct), ck.heads_first(beta, HV, ct)
    g_ = torch.zeros_like(beta_) if g is None else ck.heads_first(g, HV, ct)
    S0 = torch.zeros(state_shape, dtype=ct, device=q.device) if initial_state is None else initial_state.to(ct)
    o, S = ck.run_per_sequence(core, [q_ * scale, k_, v_, g_, beta_], S0, bounds)
    # contiguous, so callers may .view() the result as [B, T, HV * V]
    o = o.transpose(1, 2).contiguous().to(v.dtype)
    return o, (S if output_final_state else None)


# --------------------------------------------------------------------------- public forms
_DOC_ARGS = """
    Args:
        q, k: [B, T, H, K] float tensors (any float dtype; computed in float32, float64 stays float64).
        v: [B, T, HV, V], same dtype as q; HV a multiple of H (value head i reads q/k head i // (HV // H)).
        g: [B, T, HV] log-decay (<= 0), any float dtype (gated forms only; DeltaNet has g = 0).
        beta: [B, T, HV] write strength in [0, 1], any float dtype.
        scale: float, default K ** -0.5.
        initial_state: optional [B, HV, K, V] (or [N, HV, K, V] with cu_seqlens), any float dtype.
        output_final_state: return the final state (float32, float64 for float64 inputs).
        cu_seqlens: optional int32/int64 [N + 1] boundaries of N sequences packed along T (B == 1);
            each sequence starts from its own initial state and none sees another.
        chunk_size (chunked forms): chunk length, a positive power of two (16, 32, 64 typical); it
            changes rounding only, never the result. The Triton kernels pick their own.
        use_qk_l2norm: l2-normalise q and k over K in float32 (eps 1e-6) inside the op.
        check_inputs: also check g <= 0 and 0 <= beta <= 1 (reads the values: a device sync).
        A_log, dt_bias (``gated_delta_rule`` only): optional [HV] float tensors; with them g is the raw
            gate input a and the log-decay is -exp(A_log) * softplus(a + dt_bias) (Qwen3-Next's
            gate), computed inside the op.
    Returns:
        o [B, T, HV, V] in v's dtype, and the final state [B or N, HV, K, V] or None.
"""
_EXAMPLE = """
    Example::

        >>> q, k = torch.randn(1, 100, 2, 16), torch.randn(1, 100, 2, 16)
        >>> v, g, beta = torch.randn(1, 100, 4, 16), -torch.rand(1, 100, 4), torch.rand(1, 100, 4)
        >>> o, state = {call}
        >>> o.shape, state.shape
        (torch.Size([1, 100, 4, 16]), torch.Size([1, 4, 16, 16]))
"""


def gated_delta_rule_naive(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                           cu_seqlens=None, use_qk_l2norm=False, check_inputs=False):
    bounds, shape = _check(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm, "reference",
                           check_inputs)
    return _run(_naive_core, q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm,
                bounds, shape)


def gated_delta_rule_chunked(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                             cu_seqlens=None, chunk_size=64, use_qk_l2norm=False, check_inputs=False):
    ck.check_chunk_size(chunk_size)
    bounds, shape = _check(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm, "reference",
                           check_inputs)
    core = lambda *xs: _chunked_core(*xs, chunk_size)  # noqa: E731
    return _run(core, q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, bounds, shape)


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                     cu_seqlens=None, chunk_size=64, use_qk_l2norm=False, backend="auto", check_inputs=False,
                     A_log=None, dt_bias=None):
    ck.check_chunk_size(chunk_size)
    # with the fused gate, g holds the raw gate input: its value range is checked once g is formed
    _check(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm, backend, check_inputs and A_log is None)
    ck.check_fused_gate(A_log, dt_bias, g, v.shape[2], q)
    kernel = ck.load_kernel("chunk_gated_delta_rule", backend, q)
    if kernel is not None:
        g = torch.zeros_like(beta, dtype=torch.float32) if g is None else g
        return kernel(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                      output_final_state=output_final_state, cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm,
                      A_log=A_log, dt_bias=dt_bias)
    if A_log is not None:
        g = ck.fused_gate(g, A_log, dt_bias)
        if check_inputs:
            ck.check_value_ranges(g, beta)
    return gated_delta_rule_chunked(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                    output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                    chunk_size=chunk_size, use_qk_l2norm=use_qk_l2norm)


def delta_rule(q, k, v, beta, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
               chunk_size=64, use_qk_l2norm=False, backend="auto", check_inputs=False):
    return gated_delta_rule(q, k, v, None, beta, scale=scale, initial_state=initial_state,
                            output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
                            use_qk_l2norm=use_qk_l2norm, backend=backend, check_inputs=check_inputs)


def delta_rule_naive(q, k, v, beta, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                     use_qk_l2norm=False, check_inputs=False):
    return gated_delta_rule_naive(q, k, v, None, beta, scale=scale, initial_state=initial_state,
                                  output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                  use_qk_l2norm=use_qk_l2norm, check_inputs=check_inputs)


def delta_rule_chunked(q, k, v, beta, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                       chunk_size=64, use_qk_l2norm=False, check_inputs=False):
    return gated_delta_rule_chunked(q, k, v, None, beta, scale=scale, initial_state=initial_state,
                                    output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                    chunk_size=chunk_size, use_qk_l2norm=use_qk_l2norm, check_inputs=check_inputs)


# --------------------------------------------------------------------------- decode step
def gated_delta_rule_step(q, k, v, g, beta, state, *, scale=None, use_qk_l2norm=False, inplace=False,
                          backend="auto", A_log=None, dt_bias=None, beta_is_logit=False, state_settled=False):
    """One decode token of the gated delta rule; returns (o [B, HV, V] in v's dtype, new state).

    Args:
        q, k: [B, H, K]; v: [B, HV, V] (same float dtype); g, beta: [B, HV] any float dtype.
        state: [B, HV, K, V], float32 (float64 for float64 inputs).
        scale, use_qk_l2norm: as in :func:`gated_delta_rule`.
        inplace: write the new state into ``state`` and return that tensor (fixed address, so a
            decode loop can be captured in a CUDA graph); otherwise ``state`` is left untouched.
        backend: "auto" | "reference" | "triton".
        A_log, dt_bias: optional [HV] float tensors of the fused gate, as in :func:`gated_delta_rule`
            (the Triton kernel computes it in registers; saves the gate's small kernels per step).
        beta_is_logit: ``beta`` is the write strength's logit; the step applies the sigmoid (in
            float32, or float64 for float64 inputs; the Triton kernel in registers).
        state_settled: the caller's promise that no kernel that can still be running writes ``state``
            (a kernel launched without programmatic dependent launch runs between its last write and
            this call, as the token embedding does in a static decode step). The Triton kernel then
            reads the state before waiting for the preceding kernel (see
            ``hybridlm.ops.triton.decode.fused_recurrent_gated_delta_rule_step``); the reference ignores it.

    On the Triton backend q, k, v, g and beta are read in place when each row's heads are packed
    (last dims contiguous; the row stride is free), as slices of a layer's projection are.

    Example::

        >>> q, k, v = torch.randn(2, 2, 16), torch.randn(2, 2, 16), torch.randn(2, 4, 16)
        >>> o, s = gated_delta_rule_step(q, k, v, -torch.rand(2, 4), torch.rand(2, 4), torch.zeros(2, 4, 16, 16))
    """
    ck.check_backend(backend)
    B, H, K, HV, V = ck.check_qkv(q, k, v, token_axis=False)
    if g is not None:
        ck.check_gate("g", g, (B, HV), "[B, HV]", q)
    ck.check_gate("beta", beta, (B, HV), "[B, HV]", q)
    ck.check_state("state", state, (B, HV, K, V), q)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    ck.check_fused_gate(A_log, dt_bias, g, HV, q)
    if not isinstance(beta_is_logit, bool):
        raise TypeError(f"beta_is_logit must be a bool, got {type(beta_is_logit).__name__}")
    if not isinstance(state_settled, bool):
        raise TypeError(f"state_settled must be a bool, got {type(state_settled).__name__}")
    kernel = ck.load_kernel("fused_recurrent_gated_delta_rule_step", backend, q)
    if kernel is not None:
        g = torch.zeros_like(beta, dtype=torch.float32) if g is None else g
        return kernel(q, k, v, g, beta, state, scale=scale, use_qk_l2norm=use_qk_l2norm, inplace=inplace,
                      A_log=A_log, dt_bias=dt_bias, beta_is_logit=beta_is_logit, state_settled=state_settled)
    if A_log is not None:
        g = ck.fused_gate(g, A_log, dt_bias)
    if beta_is_logit:
        beta = torch.sigmoid(beta.to(torch.promote_types(beta.dtype, torch.float32)))
    o, S = gated_delta_rule_naive(q[:, None], k[:, None], v[:, None], None if g is None else g[:, None],
                                  beta[:, None], scale=scale, initial_state=state, output_final_state=True,
                                  use_qk_l2norm=use_qk_l2norm)
    if inplace:
        return o[:, 0], state.copy_(S)
    return o[:, 0], S


def delta_rule_step(q, k, v, beta, state, *, scale=None, use_qk_l2norm=False, inplace=False, backend="auto",
                    state_settled=False):
    """One decode token of the delta rule (g = 0); arguments as in :func:`gated_delta_rule_step`."""
    return gated_delta_rule_step(q, k, v, None, beta, state, scale=scale, use_qk_l2norm=use_qk_l2norm,
                                 inplace=inplace, backend=backend, state_settled=state_settled)


gated_delta_rule_naive.__doc__ = ("Gated delta rule as a token loop: the readable reference.\n" + _DOC_ARGS
                                  + _EXAMPLE.format(call="gated_delta_rule_naive(q, k, v, g, beta, "
                                                         "output_final_state=True)"))
gated_delta_rule_chunked.__doc__ = ("Gated delta rule in chunks of ``chunk_size`` (a power of two), WY / UT form;\n"
                                    "    T need not be a multiple of the chunk.\n" + _DOC_ARGS
                                    + _EXAMPLE.format(call="gated_delta_rule_chunked(q, k, v, g, beta, "
                                                           "chunk_size=32, output_final_state=True)"))
gated_delta_rule.__doc__ = ("Gated delta rule. ``backend``: 'auto' (Triton kernels on CUDA tensors when they import,\n"
                            "    else the chunked reference), 'reference', or 'triton' (raises RuntimeError when\n"
                            "    the kernels cannot run).\n" + _DOC_ARGS
                            + _EXAMPLE.format(call="gated_delta_rule(q, k, v, g, beta, output_final_state=True)"))
_DELTA = "    Delta rule (DeltaNet): the gated delta rule with g = 0; arguments as there, without g.\n"
delta_rule.__doc__ = _DELTA + "    Dispatches like :func:`gated_delta_rule`."
delta_rule_naive.__doc__ = _DELTA + "    Token loop, see :func:`gated_delta_rule_naive`."
delta_rule_chunked.__doc__ = _DELTA + "    Chunked WY form, see :func:`gated_delta_rule_chunked`."
