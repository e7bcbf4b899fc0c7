"""Kimi delta attention (KDA, Kimi Linear): the gated delta rule with a decay per key channel.

Per value head, with state S [K, V] and a log-decay vector g_t [K] (math in
shared/reference/gated-delta-rule.md, with diag(exp(g_t)) in place of the scalar exp(g_t)):

    S_t = diag(exp(g_t)) S_{t-1};   S_t = S_t + beta_t k_t (v_t - S_t^T k_t)^T;   o_t = scale * S_t^T q_t

Chunked form. Inside a chunk let G_i = sum_{j<=i} g_j (a K-vector, cumsum in the compute dtype).
Unrolling the recurrence from the state S entering the chunk gives the gated delta rule's WY form with
every scalar decay ratio exp(G_i - G_j) replaced by a per-channel one inside the key dot products:

    A_ij   = beta_i sum_c k_ic k_jc exp(G_ic - G_jc)              (j < i)
    (I + A) [W | U] = [beta (exp(G) * K) | beta V]                 (the UT transform)
    V_new  = U - W S
    O      = (exp(G) * Q) S + P V_new,   P_ij = sum_c q_ic k_jc exp(G_ic - G_jc)   (j <= i)
    S'     = diag(exp(G_C)) S + (exp(G_C - G) * K)^T V_new

The decayed products A and P are where overflow lurks: exp(G_i) exp(-G_j) would need exp(+|G_j|).
They are formed in sub-chunks of 16: a row block I scales its queries by exp(G_i - G_p) and the
earlier columns by exp(G_p - G_j), with p the first row of I, so both factors are <= 1; the 16 x 16
diagonal blocks take the exact pairwise exponent. Only non-positive numbers are ever exponentiated.

Legend: B batch, T tokens, H q/k heads, HV value heads (a multiple of H), K key dim, V value dim,
N chunks, C chunk length, n sub-chunks of c rows. Internals are heads-first ([B, HV, T, D]).
"""

from __future__ import annotations

import torch

from hybridlm.ops import _checks as ck
from hybridlm.ops.delta_rule import _check as _check_delta_inputs
from hybridlm.ops.delta_rule import _run as _run_delta_core
from hybridlm.ops.linear_attention import merge_chunks, split_chunks

SUB_CHUNK = 16


# --------------------------------------------------------------------------- cores (heads-first)
def _naive_core(q, k, v, g, beta, S):
    """Token loop. q, k [B, HV, T, K] (q already scaled); v [B, HV, T, V]; g [B, HV, T, K]; beta [B, HV, T]."""
    outs = []
    for t in range(q.shape[2]):
        k_t = k[:, :, t]
        S = g[:, :, t, :, None].exp() * S  # each key row of the state forgets at its own rate
        u_t = beta[:, :, t, None] * (v[:, :, t] - torch.einsum("bhk,bhkv->bhv", k_t, S))
        S = S + k_t[..., :, None] * u_t[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
    return torch.stack(outs, 2), S


def _masked_exp(diff, keep):
    """exp(diff) where ``keep``, else 0; the mask goes in before exp so a masked +large never overflows."""
    return diff.masked_fill(~keep, float("-inf")).exp()


def decayed_products(xs_NCK: list, y_NCK, G_NCK) -> list:
    """M_ij = sum_c x_ic y_jc exp(G_ic - G_jc) for j <= i, else 0: one [.., C, C] per x in ``xs``.

    G is the in-chunk cumulative log-decay (non-increasing along C). Built from sub-chunks of 16
    rows so that nothing but non-positive numbers is exponentiated (see the module docstring); the
    y side (and its exponentials) is shared by every x.
    """
    C = y_NCK.shape[-2]
    c = min(SUB_CHUNK, C)
    n = C // c
    dev = y_NCK.device
    ys, Gs = y_NCK.unflatten(-2, (n, c)), G_NCK.unflatten(-2, (n, c))  # [.., n, c, K]
    # diagonal c x c blocks: the exact pairwise exponent, masked to the causal part
    tri = torch.ones(c, c, dtype=torch.bool, device=dev).tril()
    y_decay = ys[..., None, :, :] * _masked_exp(Gs[..., :, None, :] - Gs[..., None, :, :], tri[..., None])
    # columns before the row block: pivot p = first row of the block, both factors <= 1
    Gp = Gs[..., :, :1, :]  # [.., n, 1, K]
    to_pivot = (Gs - Gp).exp()
    before = torch.arange(C, device=dev)[None, :] < (torch.arange(n, device=dev) * c)[:, None]  # [n, C]
    y_scaled = y_NCK[..., None, :, :] * _masked_exp(Gp - G_NCK[..., None, :, :], before[..., None])  # [.., n, C, K]
    eye_n = torch.eye(n, dtype=y_NCK.dtype, device=dev)[:, None, :, None]
    out = []
    for x in xs_NCK:
        x_blocks = x.unflatten(-2, (n, c))
        diag = (x_blocks[..., :, None, :] * y_decay).sum(-1)  # [.., n, c, c]
        off = (x_blocks * to_pivot) @ y_scaled.transpose(-1, -2)  # [.., n, c, C]
        out.append((off + (diag[..., :, :, None, :] * eye_n).flatten(-2)).flatten(-3, -2))
    return out


def _chunked_core(q, k, v, g, beta, S, C: int):
    """Chunked WY form with per-channel decay (formulas in the module docstring)."""
    T = q.shape[2]
    qc, kc, vc, gc, bc = (split_chunks(x, C) for x in (q, k, v, g, beta))
    G = gc.cumsum(-2)  # [B, HV, N, C, K]
    kb = kc * bc[..., None]
    kk, P = decayed_products([kb, qc], kc, G)
    A = kk.tril(-1)  # the UT transform needs the strictly lower part
    eye = torch.eye(C, dtype=A.dtype, device=A.device)
    rhs = torch.cat([kb * G.exp(), vc * bc[..., None]], -1)
    WU = torch.linalg.solve_triangular(A + eye, rhs, upper=False, unitriangular=True)
    W, U = WU.split([kc.shape[-1], vc.shape[-1]], -1)
    G_end = G[..., -1:, :]  # [B, HV, N, 1, K]
    k_end = (kc * (G_end - G).exp()).transpose(-1, -2)  # [B, HV, N, K, C]
    whole = G_end.squeeze(-2).exp()  # [B, HV, N, K]
    entering, v_new = [], []
    for n in range(qc.shape[2]):
        entering.append(S)
        v_new.append(U[:, :, n] - W[:, :, n] @ S)
        S = whole[:, :, n, :, None] * S + k_end[:, :, n] @ v_new[-1]
    o = (qc * G.exp()) @ torch.stack(entering, 2) + P @ torch.stack(v_new, 2)
    return merge_chunks(o, T), S


# --------------------------------------------------------------------------- shared driver
def _check(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm, backend, check_inputs):
    bounds, state_shape = _check_delta_inputs(q, k, v, None, beta, scale, initial_state, cu_seqlens,
                                              use_qk_l2norm, backend, False)
    B, T, HV = beta.shape
    ck.check_gate("g", g, (B, T, HV, q.shape[-1]), "[B, T, HV, K]", q)
    if check_inputs:
        ck.check_value_ranges(g, beta)
    return bounds, state_shape


def _no_kernel(backend: str) -> None:
    if backend == "triton":
        raise RuntimeError("backend='triton' is unavailable: no Triton kernel for Kimi delta attention yet; "
                           "use backend='reference' or 'auto'")


_DOC_ARGS = """
    Args:
        q, k: [B, T, H, K] float tensors (any float dtype; computed in float32, float64 stays float64).
        v: [B, T, HV, V], same dtype as q; HV a multiple of H (value head i reads q/k head i // (HV // H)).
        g: [B, T, HV, K] log-decay per key channel (<= 0), any float dtype.
        beta: [B, T, HV] write strength in [0, 1], any float dtype.
        scale: float, default K ** -0.5.
        initial_state: optional [B, HV, K, V] (or [N, HV, K, V] with cu_seqlens), any float dtype.
        output_final_state: return the final state (float32, float64 for float64 inputs).
        cu_seqlens: optional int32/int64 [N + 1] boundaries of N sequences packed along T (B == 1).
        use_qk_l2norm: l2-normalise q and k over K inside the op (Kimi Linear does).
        check_inputs: also check g <= 0 and 0 <= beta <= 1 (reads the values: a device sync).
    Returns:
        o [B, T, HV, V] in v's dtype, and the final state [B or N, HV, K, V] or None.

    Example::

        >>> q, k = torch.randn(1, 100, 2, 16), torch.randn(1, 100, 2, 16)
        >>> v, beta = torch.randn(1, 100, 4, 16), torch.rand(1, 100, 4)
        >>> g = -torch.rand(1, 100, 4, 16)
        >>> o, state = {call}(q, k, v, g, beta, output_final_state=True)
        >>> o.shape, state.shape
        (torch.Size([1, 100, 4, 16]), torch.Size([1, 4, 16, 16]))
"""


def kda_naive(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
              use_qk_l2norm=False, check_inputs=False):
    bounds, shape = _check(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm, "reference",
                           check_inputs)
    return _run_delta_core(_naive_core, q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm,
                           bounds, shape)


def kda_chunked(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                chunk_size=64, use_qk_l2norm=False, check_inputs=False):
    ck.check_chunk_size(chunk_size)
    bounds, shape = _check(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm, "reference",
                           check_inputs)
    core = lambda *xs: _chunked_core(*xs, chunk_size)  # noqa: E731
    return _run_delta_core(core, q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, bounds,
                           shape)


def kda(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
        chunk_size=64, use_qk_l2norm=False, backend="auto", check_inputs=False):
    _check(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm, backend, check_inputs)
    _no_kernel(backend)
    return kda_chunked(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                       output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
                       use_qk_l2norm=use_qk_l2norm)


def kda_step(q, k, v, g, beta, state, *, scale=None, use_qk_l2norm=False, inplace=False, backend="auto"):
    """One decode token of Kimi delta attention; returns (o [B, HV, V] in v's dtype, new state).

    Args:
        q, k: [B, H, K]; v: [B, HV, V] (same float dtype); g: [B, HV, K] log-decay; beta: [B, HV].
        state: [B, HV, K, V], float32 (float64 for float64 inputs).
        scale, use_qk_l2norm: as in :func:`kda`.
        inplace: write the new state into ``state`` and return that tensor (fixed address for CUDA graphs).
        backend: "auto" | "reference" ("triton" raises: no kernel yet).

    Example::

        >>> q, k, v = torch.randn(2, 2, 16), torch.randn(2, 2, 16), torch.randn(2, 4, 16)
        >>> o, s = kda_step(q, k, v, -torch.rand(2, 4, 16), torch.rand(2, 4), torch.zeros(2, 4, 16, 16))
    """
    ck.check_backend(backend)
    _no_kernel(backend)
    B, H, K, HV, V = ck.check_qkv(q, k, v, token_axis=False)
    ck.check_gate("g", g, (B, HV, K), "[B, HV, K]", q)
    ck.check_gate("beta", beta, (B, HV), "[B, HV]", q)
    ck.check_state("state", state, (B, HV, K, V), q)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    o, S = kda_naive(q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None], scale=scale, initial_state=state,
                     output_final_state=True, use_qk_l2norm=use_qk_l2norm)
    if inplace:
        return o[:, 0], state.copy_(S)
    return o[:, 0], S


kda_naive.__doc__ = "Kimi delta attention as a token loop: the readable reference.\n" + _DOC_ARGS.format(
    call="kda_naive")
kda_chunked.__doc__ = ("Kimi delta attention in chunks of ``chunk_size`` (a power of two), WY / UT form with\n"
                       "    per-channel decay; T need not be a multiple of the chunk.\n" + _DOC_ARGS.format(
                           call="kda_chunked"))
kda.__doc__ = ("Kimi delta attention. ``backend``: 'auto' or 'reference' (the chunked form); 'triton' raises\n"
               "    RuntimeError (no kernel yet).\n" + _DOC_ARGS.format(call="kda"))
