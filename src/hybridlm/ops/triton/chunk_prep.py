"""Per-chunk preparation of the chunked gated delta rule, parallel over chunks and value heads.

Legend: NTOK flat tokens (B * T), H q/k heads, HV value heads, K key size, C = 64 chunk length.

For each chunk and value head it computes (reference: shared/reference/gated-delta-rule.md)

    gc    = cumsum(g) inside the chunk                                  (float32)
    A     = strictly-lower part of diag(beta) (K K^T * exp(gc_i - gc_j))
    T     = (I + A)^-1                                                   (unit lower-triangular)

T is the WY transform: the state pass turns the chunk's C rank-1 delta updates into
V_new = T diag(beta) (V - diag(exp(gc)) K S), two matrix products. The inverse is built from
four 16 x 16 diagonal blocks (forward substitution, cheap at that size) joined by block
products, because substitution over all 64 rows would cost 16 times more arithmetic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybridlm.ops.triton.utils import CHUNK


@triton.jit
def _load_rows16(x_ptr, bos, eos, i_blk, stride, col0, BD: tl.constexpr, D, other):
    """Rows bos + 16 i_blk .. + 15 of a [NTOK, stride] view, columns col0 .. col0 + BD (masked to D)."""
    o_t = bos + i_blk * 16 + tl.arange(0, 16)
    o_d = tl.arange(0, BD)
    m = (o_t < eos)[:, None] & (o_d < D)[None, :]
    return tl.load(x_ptr + o_t[:, None].to(tl.int64) * stride + col0 + o_d[None, :], mask=m, other=other)


@triton.jit
def _load_vec16(x_ptr, bos, eos, i_blk, stride, col):
    o_t = bos + i_blk * 16 + tl.arange(0, 16)
    return tl.load(x_ptr + o_t.to(tl.int64) * stride + col, mask=o_t < eos, other=0.0).to(tl.float32)


@triton.jit
def causal_decay(b_gc):
    """[C, C] exp(gc_i - gc_j) for i >= j, else 0 (masked before exp so nothing overflows)."""
    o = tl.arange(0, 64)
    causal = o[:, None] >= o[None, :]
    diff = b_gc[:, None] - b_gc[None, :]
    return tl.where(causal, tl.exp(tl.where(causal, diff, 0.0)), 0.0)


@triton.jit
def _store_vec16(x_ptr, bos, eos, i_blk, stride, col, x):
    o_t = bos + i_blk * 16 + tl.arange(0, 16)
    tl.store(x_ptr + o_t.to(tl.int64) * stride + col, x, mask=o_t < eos)


@triton.jit
def _a_block(k_a, k_b, beta_a, gc_a, gc_b, DIAG: tl.constexpr, PREC: tl.constexpr):
    """One 16 x 16 block of A: beta_i (k_i . k_j) exp(gc_i - gc_j), strictly lower on the diagonal."""
    kk = tl.dot(k_a, tl.trans(k_b), input_precision=PREC)
    diff = gc_a[:, None] - gc_b[None, :]
    if DIAG:
        o = tl.arange(0, 16)
        low = o[:, None] > o[None, :]
        # masking before exp: above the diagonal gc_i - gc_j > 0 can overflow
        return tl.where(low, kk * tl.exp(tl.where(low, diff, 0.0)) * beta_a[:, None], 0.0)
    return kk * tl.exp(diff) * beta_a[:, None]


@triton.jit
def _inv_unit_lower16(a):
    """(I + a)^-1 for a strictly lower 16 x 16 a, by forward substitution on the rows of R = T - I:
    R_i = -a_i - a_i R (rows j < i of R are final when row i is formed)."""
    o = tl.arange(0, 16)
    r = tl.zeros([16, 16], dtype=tl.float32)
    for i in tl.static_range(1, 16):
        a_i = tl.sum(tl.where(o[:, None] == i, a, 0.0), 0)
        r_i = -a_i - tl.sum(a_i[:, None] * r, 0)
        r = tl.where(o[:, None] == i, r_i[None, :], r)
    return r + tl.where(o[:, None] == o[None, :], 1.0, 0.0)


@triton.jit
def _store_block(t_ptr, bos, eos, i_row, i_col, blk, HV: tl.constexpr, i_hv):
    o_t = bos + i_row * 16 + tl.arange(0, 16)
    o_c = i_col * 16 + tl.arange(0, 16)
    p = t_ptr + (o_t[:, None].to(tl.int64) * HV + i_hv) * 64 + o_c[None, :]
    tl.store(p, blk.to(t_ptr.dtype.element_ty), mask=(o_t < eos)[:, None])


@triton.jit
def chunk_prep_kernel(
    q_ptr, k_ptr, g_ptr, beta_ptr, gc_ptr, t_ptr, m_ptr, chunk_bounds,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
):
    i_c = tl.program_id(0)
    i_hv = tl.program_id(1)
    i_h = i_hv // (HV // H)
    bos = tl.load(chunk_bounds + 2 * i_c)
    eos = tl.load(chunk_bounds + 2 * i_c + 1)

    # cumulative log-decay per 16-row block, carried across the four blocks
    g0 = _load_vec16(g_ptr, bos, eos, 0, HV, i_hv)
    g1 = _load_vec16(g_ptr, bos, eos, 1, HV, i_hv)
    g2 = _load_vec16(g_ptr, bos, eos, 2, HV, i_hv)
    g3 = _load_vec16(g_ptr, bos, eos, 3, HV, i_hv)
    c0 = tl.cumsum(g0, 0)
    c1 = tl.cumsum(g1, 0) + tl.sum(g0, 0)
    c2 = tl.cumsum(g2, 0) + tl.sum(g0, 0) + tl.sum(g1, 0)
    c3 = tl.cumsum(g3, 0) + tl.sum(g0, 0) + tl.sum(g1, 0) + tl.sum(g2, 0)
    _store_vec16(gc_ptr, bos, eos, 0, HV, i_hv, c0)
    _store_vec16(gc_ptr, bos, eos, 1, HV, i_hv, c1)
    _store_vec16(gc_ptr, bos, eos, 2, HV, i_hv, c2)
    _store_vec16(gc_ptr, bos, eos, 3, HV, i_hv, c3)

    b0 = _load_vec16(beta_ptr, bos, eos, 0, HV, i_hv)
    b1 = _load_vec16(beta_ptr, bos, eos, 1, HV, i_hv)
    b2 = _load_vec16(beta_ptr, bos, eos, 2, HV, i_hv)
    b3 = _load_vec16(beta_ptr, bos, eos, 3, HV, i_hv)
    k0 = _load_rows16(k_ptr, bos, eos, 0, H * K, i_h * K, BK, K, 0.0)
    k1 = _load_rows16(k_ptr, bos, eos, 1, H * K, i_h * K, BK, K, 0.0)
    k2 = _load_rows16(k_ptr, bos, eos, 2, H * K, i_h * K, BK, K, 0.0)
    k3 = _load_rows16(k_ptr, bos, eos, 3, H * K, i_h * K, BK, K, 0.0)

    t00 = _inv_unit_lower16(_a_block(k0, k0, b0, c0, c0, True, PREC))
    t11 = _inv_unit_lower16(_a_block(k1, k1, b1, c1, c1, True, PREC))
    t22 = _inv_unit_lower16(_a_block(k2, k2, b2, c2, c2, True, PREC))
    t33 = _inv_unit_lower16(_a_block(k3, k3, b3, c3, c3, True, PREC))
    a10 = _a_block(k1, k0, b1, c1, c0, False, PREC)
    a20 = _a_block(k2, k0, b2, c2, c0, False, PREC)
    a21 = _a_block(k2, k1, b2, c2, c1, False, PREC)
    a30 = _a_block(k3, k0, b3, c3, c0, False, PREC)
    a31 = _a_block(k3, k1, b3, c3, c1, False, PREC)
    a32 = _a_block(k3, k2, b3, c3, c2, False, PREC)

    # block row b of (I + A) T = I below the diagonal: T_ba = -T_bb sum_{a <= c < b} A_bc T_ca
    t10 = -tl.dot(t11, tl.dot(a10, t00, input_precision=PREC), input_precision=PREC)
    t21 = -tl.dot(t22, tl.dot(a21, t11, input_precision=PREC), input_precision=PREC)
    t20 = -tl.dot(t22, tl.dot(a20, t00, input_precision=PREC) + tl.dot(a21, t10, input_precision=PREC),
                  input_precision=PREC)
    t32 = -tl.dot(t33, tl.dot(a32, t22, input_precision=PREC), input_precision=PREC)
    t31 = -tl.dot(t33, tl.dot(a31, t11, input_precision=PREC) + tl.dot(a32, t21, input_precision=PREC),
                  input_precision=PREC)
    t30 = -tl.dot(t33, tl.dot(a30, t00, input_precision=PREC) + tl.dot(a31, t10, input_precision=PREC)
                  + tl.dot(a32, t20, input_precision=PREC), input_precision=PREC)

    zero = tl.zeros([16, 16], dtype=tl.float32)
    _store_block(t_ptr, bos, eos, 0, 0, t00, HV, i_hv)
    _store_block(t_ptr, bos, eos, 0, 1, zero, HV, i_hv)
    _store_block(t_ptr, bos, eos, 0, 2, zero, HV, i_hv)
    _store_block(t_ptr, bos, eos, 0, 3, zero, HV, i_hv)
    _store_block(t_ptr, bos, eos, 1, 0, t10, HV, i_hv)
    _store_block(t_ptr, bos, eos, 1, 1, t11, HV, i_hv)
    _store_block(t_ptr, bos, eos, 1, 2, zero, HV, i_hv)
    _store_block(t_ptr, bos, eos, 1, 3, zero, HV, i_hv)
    _store_block(t_ptr, bos, eos, 2, 0, t20, HV, i_hv)
    _store_block(t_ptr, bos, eos, 2, 1, t21, HV, i_hv)
    _store_block(t_ptr, bos, eos, 2, 2, t22, HV, i_hv)
    _store_block(t_ptr, bos, eos, 2, 3, zero, HV, i_hv)
    _store_block(t_ptr, bos, eos, 3, 0, t30, HV, i_hv)
    _store_block(t_ptr, bos, eos, 3, 1, t31, HV, i_hv)
    _store_block(t_ptr, bos, eos, 3, 2, t32, HV, i_hv)
    _store_block(t_ptr, bos, eos, 3, 3, t33, HV, i_hv)

    # the causal, decayed Q K^T does not depend on the state: forming it here takes a [C, K] x [K, C]
    # product out of the sequential pass, which would otherwise repeat it per value block
    o_t = bos + tl.arange(0, 64)
    m_t = o_t < eos
    o_k = tl.arange(0, BK)
    row_qk = o_t[:, None].to(tl.int64) * (H * K) + i_h * K + o_k[None, :]
    m_qk = m_t[:, None] & (o_k < K)[None, :]
    b_q = tl.load(q_ptr + row_qk, mask=m_qk, other=0.0)
    b_k = tl.load(k_ptr + row_qk, mask=m_qk, other=0.0)
    b_gc = tl.cumsum(tl.load(g_ptr + o_t.to(tl.int64) * HV + i_hv, mask=m_t, other=0.0).to(tl.float32), 0)
    b_m = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * causal_decay(b_gc)
    o_c = tl.arange(0, 64)
    tl.store(m_ptr + (o_t[:, None].to(tl.int64) * HV + i_hv) * 64 + o_c[None, :],
             b_m.to(m_ptr.dtype.element_ty), mask=m_t[:, None])


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get exact float32 products; 16-bit inputs use the tensor cores (float32 sums)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def chunk_prep(q_NHK: torch.Tensor, k_NHK: torch.Tensor, g_NHV: torch.Tensor, beta_NHV: torch.Tensor,
               chunk_bounds: torch.Tensor, HV: int, num_warps: int = 4):
    """Cumulative in-chunk log-decay, the WY transform and the causal decayed Q K^T of every chunk.

    Args:
        q_NHK, k_NHK: [NTOK, H, K] queries and keys (flat tokens), float32/bfloat16/float16, contiguous.
        g_NHV: [NTOK, HV] log-decay, any float dtype. beta_NHV: [NTOK, HV] write strength.
        chunk_bounds: int32 [NC, 2] flat token range of each chunk (``utils.sequence_tables``).
    Returns:
        gc: float32 [NTOK, HV] cumulative sum of g from each chunk's start.
        t: [NTOK, HV, 64] row i of its chunk's (I + A)^-1, in k's dtype (float32 stays float32).
        m: [NTOK, HV, 64] row i of its chunk's (Q K^T * exp(gc_i - gc_j), i >= j), in k's dtype.
    """
    NTOK, H, K = k_NHK.shape
    gc = torch.empty(NTOK, HV, device=k_NHK.device, dtype=torch.float32)
    t = torch.empty(NTOK, HV, CHUNK, device=k_NHK.device, dtype=k_NHK.dtype)
    m = torch.empty_like(t)
    NC = chunk_bounds.shape[0]
    chunk_prep_kernel[(NC, HV)](
        q_NHK, k_NHK, g_NHV, beta_NHV, gc, t, m, chunk_bounds,
        H=H, HV=HV, K=K, BK=max(16, triton.next_power_of_2(K)), PREC=dot_precision(k_NHK.dtype),
        num_warps=num_warps,
    )
    return gc, t, m
