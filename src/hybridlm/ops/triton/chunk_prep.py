"""Per-chunk preparation of the chunked gated delta rule, parallel over chunks and value heads.

Legend: NTOK flat tokens (B * T), H q/k heads, HV value heads, K key size, V value size, C = 64 chunk
length.

For each chunk and value head it computes (reference: shared/reference/gated-delta-rule.md)

    gc    = cumsum(g) inside the chunk                                  (float32)
    A     = strictly-lower part of diag(beta) (K K^T * exp(gc_i - gc_j))
    T     = (I + A)^-1                                                   (unit lower-triangular)
    M     = Q K^T * exp(gc_i - gc_j), i >= j
    W     = T diag(beta exp(gc)) K,   U = T diag(beta) V                 (for the forward only)

T is the WY transform: the chunk's C rank-1 delta updates give V_new = U - W S for an entering state S
(``chunk_fwd``). Every [C, C] matrix here is lower block-triangular, so the kernel works on the chunk's
two 32-row halves: three 32 x 32 blocks per matrix, and T from the inverses of the two diagonal blocks
(recursive doubling, five levels of two 32 x 32 products) joined by T_ba = -T_bb A_ba T_aa. Inverting
the whole 64 x 64 by doubling (six levels of two 64 x 64 products, the previous design) spent most of
its products on blocks known to be zero: 6.3 of the kernel's 8.4 MFLOP per chunk and head, against
1.4 now.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybridlm.ops._checks import L2NORM_EPS
from hybridlm.ops.triton.utils import CHUNK


@triton.jit
def causal_decay(b_gc):
    """[C, C] exp(gc_i - gc_j) for i >= j, else 0 (masked before exp so nothing overflows)."""
    o = tl.arange(0, 64)
    causal = o[:, None] >= o[None, :]
    diff = b_gc[:, None] - b_gc[None, :]
    return tl.where(causal, tl.exp(tl.where(causal, diff, 0.0)), 0.0)


@triton.jit
def l2norm_rows_kernel(x_ptr, y_ptr, n_rows, D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr,
                       EPS: tl.constexpr):
    """y = x / sqrt(sum x^2 + eps) over the last dim, in float32, stored in x's dtype."""
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m = (o_r < n_rows)[:, None] & (o_d < D)[None, :]
    p = o_r[:, None].to(tl.int64) * D + o_d[None, :]
    x = tl.load(x_ptr + p, mask=m, other=0.0).to(tl.float32)
    y = x * tl.rsqrt(tl.sum(x * x, 1) + EPS)[:, None]
    tl.store(y_ptr + p, y.to(y_ptr.dtype.element_ty), mask=m)


def l2norm_rows(x: torch.Tensor) -> torch.Tensor:
    """l2-normalise the rows of a contiguous [..., D] tensor in one pass (``_checks.l2norm``, then a
    cast back to x's dtype): PyTorch's cast / square / sum / scale / cast take about six."""
    y = torch.empty_like(x)
    D = x.shape[-1]
    n_rows = x.numel() // D
    BR = 16
    l2norm_rows_kernel[(triton.cdiv(n_rows, BR),)](x, y, n_rows, D=D, BD=max(16, triton.next_power_of_2(D)),
                                                   BR=BR, EPS=L2NORM_EPS, num_warps=4)
    return y


@triton.jit
def qk_grad_kernel(x_ptr, dy_ptr, dx_ptr, n_rows, R: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                   BR: tl.constexpr, NORM: tl.constexpr, EPS: tl.constexpr):
    """dx = sum of the R value heads' gradients of a q/k row, then, with NORM, through the l2-norm:
    r (dy - y (y . dy)) with r = (sum x^2 + eps)^-1/2 and y = x r. Stored in dx's dtype."""
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m = (o_r < n_rows)[:, None] & (o_d < D)[None, :]
    p = o_r[:, None].to(tl.int64) * D + o_d[None, :]
    dy = tl.zeros([BR, BD], dtype=tl.float32)
    for j in tl.static_range(R):
        dy += tl.load(dy_ptr + (o_r[:, None].to(tl.int64) * R + j) * D + o_d[None, :], mask=m, other=0.0)
    if NORM:
        x = tl.load(x_ptr + p, mask=m, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, 1) + EPS)
        y = x * r[:, None]
        dy = r[:, None] * (dy - y * tl.sum(y * dy, 1)[:, None])
    tl.store(dx_ptr + p, dy.to(dx_ptr.dtype.element_ty), mask=m)


def qk_grad(x: torch.Tensor, dy: torch.Tensor, normalized: bool) -> torch.Tensor:
    """The gradient of q (or k) from the chunk-local kernel's per-value-head gradients, in one pass.

    Args:
        x: contiguous [NTOK, H, D] q or k as given to the op (before any l2-norm).
        dy: float32 contiguous [NTOK, HV, D], HV a multiple of H: the gradient each value head sends
            to its q/k head (value head i reads head i // (HV // H)), w.r.t. the normalised rows when
            ``normalized``.
    Returns:
        [NTOK, H, D] in x's dtype: the group sum, taken through y = x / sqrt(sum x^2 + eps) when
        ``normalized`` (PyTorch's sum, cast, square, reduce and scale took ~6.5 ms at 64k tokens x
        16 heads x 128 for q and k together on an H200; this reads and writes each element once).
    """
    NTOK, H, D = x.shape
    R = dy.shape[1] // H
    dx = torch.empty_like(x)
    n_rows = NTOK * H
    BR = 16
    qk_grad_kernel[(triton.cdiv(n_rows, BR),)](x, dy, dx, n_rows, R=R, D=D, BD=max(16, triton.next_power_of_2(D)),
                                               BR=BR, NORM=normalized, EPS=L2NORM_EPS, num_warps=4)
    return dx


@triton.jit
def causal_decay32(b_gc):
    """[32, 32] exp(gc_i - gc_j) for i >= j, else 0 (a diagonal half-block of ``causal_decay``)."""
    o = tl.arange(0, 32)
    causal = o[:, None] >= o[None, :]
    diff = b_gc[:, None] - b_gc[None, :]
    return tl.where(causal, tl.exp(tl.where(causal, diff, 0.0)), 0.0)


@triton.jit
def _inv_unit_lower32(a, PREC: tl.constexpr):
    """(I + a)^-1 for a strictly lower 32 x 32 a by recursive doubling of the diagonal blocks:
    with D the inverse of the diagonal s x s blocks and E the part of a that joins pairs of them,
    [[X1, 0], [L21, X2^-1]]^-1 gives D <- D - D E D for the 2s x 2s blocks (as LAPACK's trtri)."""
    o = tl.arange(0, 32)
    d = tl.where(o[:, None] == o[None, :], 1.0, 0.0)
    for lvl in tl.static_range(5):
        s = 1 << lvl
        join = ((o[:, None] // (2 * s)) == (o[None, :] // (2 * s))) & ((o[:, None] // s) != (o[None, :] // s))
        e = tl.where(join, a, 0.0)
        d = d - tl.dot(d, tl.dot(e, d, input_precision=PREC), input_precision=PREC)
    return d


@triton.jit
def _store_halves(ptr, row_a, row_b, m_a, m_b, x_aa, x_ba, x_bb):
    """Store a lower block-triangular [64, 64] matrix given as its three 32 x 32 blocks
    (rows of the first half: [x_aa | 0]; of the second: [x_ba | x_bb]) to rows of 64."""
    o = tl.arange(0, 32)
    DT = ptr.dtype.element_ty
    tl.store(ptr + row_a[:, None] * 64 + o[None, :], x_aa.to(DT), mask=m_a[:, None])
    tl.store(ptr + row_a[:, None] * 64 + 32 + o[None, :], tl.zeros([32, 32], dtype=DT), mask=m_a[:, None])
    tl.store(ptr + row_b[:, None] * 64 + o[None, :], x_ba.to(DT), mask=m_b[:, None])
    tl.store(ptr + row_b[:, None] * 64 + 32 + o[None, :], x_bb.to(DT), mask=m_b[:, None])


@triton.jit
def chunk_prep_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, gc_ptr, t_ptr, m_ptr, w_ptr, u_ptr, chunk_bounds,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
    BVV: tl.constexpr, STORE_T: tl.constexpr, STORE_WU: tl.constexpr, PREC: tl.constexpr,
):
    # value heads vary fastest, so the heads of one q/k group read their shared q, k tiles from L2
    i_hv = tl.program_id(0)
    i_c = tl.program_id(1)
    i_h = i_hv // (HV // H)
    bos = tl.load(chunk_bounds + 2 * i_c)
    eos = tl.load(chunk_bounds + 2 * i_c + 1)
    DT = k_ptr.dtype.element_ty
    # the chunk as two halves a (rows 0..31) and b (rows 32..63): every [64, 64] matrix here is lower
    # block-triangular, so it is three 32 x 32 blocks (aa, ba, bb) and its upper-right block is zero
    o_h = tl.arange(0, 32)
    t_a = bos + o_h
    t_b = bos + 32 + o_h
    m_a = t_a < eos
    m_b = t_b < eos
    o_k = tl.arange(0, BK)
    row_qk_a = t_a[:, None].to(tl.int64) * (H * K) + i_h * K + o_k[None, :]
    row_qk_b = t_b[:, None].to(tl.int64) * (H * K) + i_h * K + o_k[None, :]
    m_qk_a = m_a[:, None] & (o_k < K)[None, :]
    m_qk_b = m_b[:, None] & (o_k < K)[None, :]
    b_ka = tl.load(k_ptr + row_qk_a, mask=m_qk_a, other=0.0)
    b_kb = tl.load(k_ptr + row_qk_b, mask=m_qk_b, other=0.0)
    row_a = t_a.to(tl.int64) * HV + i_hv
    row_b = t_b.to(tl.int64) * HV + i_hv
    b_ga = tl.load(g_ptr + row_a, mask=m_a, other=0.0).to(tl.float32)
    b_gb = tl.load(g_ptr + row_b, mask=m_b, other=0.0).to(tl.float32)
    b_gca = tl.cumsum(b_ga, 0)
    b_gcb = tl.cumsum(b_gb, 0) + tl.sum(b_ga, 0)
    tl.store(gc_ptr + row_a, b_gca, mask=m_a)
    tl.store(gc_ptr + row_b, b_gcb, mask=m_b)
    b_betaa = tl.load(beta_ptr + row_a, mask=m_a, other=0.0).to(tl.float32)
    b_betab = tl.load(beta_ptr + row_b, mask=m_b, other=0.0).to(tl.float32)

    b_daa = causal_decay32(b_gca)
    b_dbb = causal_decay32(b_gcb)
    # every row of b comes after every row of a: gc_b - gc_a <= 0 for a log-decay g <= 0
    b_dba = tl.exp(b_gcb[:, None] - b_gca[None, :])

    # M = Q K^T * decay, i >= j
    b_qa = tl.load(q_ptr + row_qk_a, mask=m_qk_a, other=0.0)
    b_qb = tl.load(q_ptr + row_qk_b, mask=m_qk_b, other=0.0)
    _store_halves(m_ptr, row_a, row_b, m_a, m_b,
                  tl.dot(b_qa, tl.trans(b_ka), input_precision=PREC) * b_daa,
                  tl.dot(b_qb, tl.trans(b_ka), input_precision=PREC) * b_dba,
                  tl.dot(b_qb, tl.trans(b_kb), input_precision=PREC) * b_dbb)

    # T = (I + A)^-1, A = strictly-lower diag(beta) (K K^T * decay), by blocks:
    # [[I + A_aa, 0], [A_ba, I + A_bb]]^-1 = [[T_aa, 0], [-T_bb A_ba T_aa, T_bb]]
    strict = o_h[:, None] > o_h[None, :]
    b_aaa = tl.where(strict, tl.dot(b_ka, tl.trans(b_ka), input_precision=PREC) * b_daa * b_betaa[:, None], 0.0)
    b_abb = tl.where(strict, tl.dot(b_kb, tl.trans(b_kb), input_precision=PREC) * b_dbb * b_betab[:, None], 0.0)
    b_aba = tl.dot(b_kb, tl.trans(b_ka), input_precision=PREC) * b_dba * b_betab[:, None]
    b_taa = _inv_unit_lower32(b_aaa, PREC)
    b_tbb = _inv_unit_lower32(b_abb, PREC)
    b_tba = -tl.dot(b_tbb, tl.dot(b_aba, b_taa, input_precision=PREC), input_precision=PREC)
    if STORE_T:
        _store_halves(t_ptr, row_a, row_b, m_a, m_b, b_taa, b_tba, b_tbb)

    if STORE_WU:
        # W = T diag(beta exp(gc)) K [C, K] and U = T diag(beta) V [C, V]: the forward state pass
        # then forms V_new = U - W S with one product on its sequential path instead of two
        b_taa16 = b_taa.to(DT)
        b_tba16 = b_tba.to(DT)
        b_tbb16 = b_tbb.to(DT)
        b_kba = (b_ka * (b_betaa * tl.exp(b_gca))[:, None]).to(DT)
        b_kbb = (b_kb * (b_betab * tl.exp(b_gcb))[:, None]).to(DT)
        tl.store(w_ptr + row_a[:, None] * K + o_k[None, :],
                 tl.dot(b_taa16, b_kba, input_precision=PREC).to(DT), mask=m_qk_a)
        b_wb = tl.dot(b_tbb16, b_kbb, acc=tl.dot(b_tba16, b_kba, input_precision=PREC), input_precision=PREC)
        tl.store(w_ptr + row_b[:, None] * K + o_k[None, :], b_wb.to(DT), mask=m_qk_b)
        o_v = tl.arange(0, BVV)
        m_va = m_a[:, None] & (o_v < V)[None, :]
        m_vb = m_b[:, None] & (o_v < V)[None, :]
        p_va = row_a[:, None] * V + o_v[None, :]
        p_vb = row_b[:, None] * V + o_v[None, :]
        b_va = (tl.load(v_ptr + p_va, mask=m_va, other=0.0).to(tl.float32) * b_betaa[:, None]).to(DT)
        b_vb = (tl.load(v_ptr + p_vb, mask=m_vb, other=0.0).to(tl.float32) * b_betab[:, None]).to(DT)
        tl.store(u_ptr + p_va, tl.dot(b_taa16, b_va, input_precision=PREC).to(DT), mask=m_va)
        b_ub = tl.dot(b_tbb16, b_vb, acc=tl.dot(b_tba16, b_va, input_precision=PREC), input_precision=PREC)
        tl.store(u_ptr + p_vb, b_ub.to(DT), mask=m_vb)


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get exact float32 products; 16-bit inputs use the tensor cores (float32 sums)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def chunk_prep(q_NHK: torch.Tensor, k_NHK: torch.Tensor, g_NHV: torch.Tensor, beta_NHV: torch.Tensor,
               chunk_bounds: torch.Tensor, HV: int, v_NHV: torch.Tensor | None = None, store_t: bool = True,
               num_warps: int = 4):
    """Cumulative in-chunk log-decay, the WY transform and the causal decayed Q K^T of every chunk.

    Args:
        q_NHK, k_NHK: [NTOK, H, K] queries and keys (flat tokens), float32/bfloat16/float16, contiguous.
        g_NHV: [NTOK, HV] log-decay, any float dtype. beta_NHV: [NTOK, HV] write strength.
        chunk_bounds: int32 [NC, 2] flat token range of each chunk (``utils.sequence_tables``).
        v_NHV: [NTOK, HV, V] values (k's dtype, contiguous), to also form W and U; or None.
        store_t: also store T (the backward reads it; the W/U forward does not).
    Returns:
        gc: float32 [NTOK, HV] cumulative sum of g from each chunk's start.
        t: [NTOK, HV, 64] row i of its chunk's (I + A)^-1, in k's dtype (float32 stays float32);
            an empty tensor without ``store_t``.
        m: [NTOK, HV, 64] row i of its chunk's (Q K^T * exp(gc_i - gc_j), i >= j), in k's dtype.
        w: [NTOK, HV, K] rows of T diag(beta exp(gc)) K, and u: [NTOK, HV, V] rows of T diag(beta) V,
            in k's dtype; both None without ``v_NHV``.
    """
    NTOK, H, K = k_NHK.shape
    dev, dt = k_NHK.device, k_NHK.dtype
    gc = torch.empty(NTOK, HV, device=dev, dtype=torch.float32)
    t = torch.empty(NTOK, HV, CHUNK, device=dev, dtype=dt) if store_t else k_NHK.new_empty(0)
    m = torch.empty(NTOK, HV, CHUNK, device=dev, dtype=dt)
    w = u = None
    V = 1
    if v_NHV is not None:
        V = v_NHV.shape[2]
        w = torch.empty(NTOK, HV, K, device=dev, dtype=dt)
        u = torch.empty(NTOK, HV, V, device=dev, dtype=dt)
    NC = chunk_bounds.shape[0]
    chunk_prep_kernel[(HV, NC)](
        q_NHK, k_NHK, v_NHV, g_NHV, beta_NHV, gc, t, m, w, u, chunk_bounds,
        H=H, HV=HV, K=K, V=V, BK=max(16, triton.next_power_of_2(K)), BVV=max(16, triton.next_power_of_2(V)),
        STORE_T=store_t, STORE_WU=v_NHV is not None, PREC=dot_precision(dt),
        num_warps=num_warps,
    )
    return gc, t, m, w, u
