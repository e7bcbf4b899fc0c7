"""Chunk-local gradients of the chunked gated delta rule, one program per (chunk, value head).

Legend: NTOK flat tokens, NC chunks, C = 64, H q/k heads, HV value heads, K key size, V value size.
Once the state entering each chunk (S, stored by the forward pass) and the gradient of the state
leaving it (dS', from ``chunk_bwd_state``) are known, every chunk's gradients are independent.
Forward per chunk (gamma = exp(gc), e = exp(gc_last - gc), G_ij = exp(gc_i - gc_j)):

    KS = K S;  X = diag(beta) (V - diag(gamma) KS);  V_new = T X
    T = (I + A)^-1,  A = diag(beta) (K K^T * G, i > j)
    O  = scale [diag(gamma) Q S + M V_new],  M = Q K^T * G, i >= j
    S' = exp(gc_last) S + (diag(e) K)^T V_new

Differentiated line by line in reverse (dV_new comes from the state pass):

    dX = T^T dV_new,  dT = dV_new X^T,  dA = -T^T dT T^T (strictly lower)
    dV = diag(beta) dX,  dM = scale dO V_new^T
    dQ = scale diag(gamma) dO S^T + (dM * G) K
    dK = -diag(beta gamma) dX S^T + (dP * G + (dP * G)^T) K + (dM * G)^T Q + diag(e) V_new dS'^T,
         dP = diag(beta) dA
and d(gc) collects every place gc appears; dg is its reverse cumulative sum inside the chunk.
Products that reduce over V are accumulated over blocks of BV value columns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybridlm.ops.triton.chunk_fwd import load_chunk_common
from hybridlm.ops.triton.chunk_prep import causal_decay, dot_precision
from hybridlm.ops.triton.utils import next_power_of_2


@triton.jit
def _chunk_rows(q_ptr, k_ptr, gc_ptr, beta_ptr, t_ptr, m_ptr, chunk_bounds, i_c, i_hv,
                H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr):
    """What every chunk-local kernel reads first, for one (chunk, value head): row masks and
    offsets, q, k, T, M, gc (padding rows at gc_last), gc_last and beta (``load_chunk_common``)."""
    i_h = i_hv // (HV // H)
    bos = tl.load(chunk_bounds + 2 * i_c)
    eos = tl.load(chunk_bounds + 2 * i_c + 1)
    b_q, b_k, b_gc, b_beta, b_t, b_m, b_gl = load_chunk_common(q_ptr, k_ptr, gc_ptr, beta_ptr, t_ptr, m_ptr, bos,
                                                               eos, i_h, i_hv, H, HV, K, BK)
    o_t = bos + tl.arange(0, 64)
    m_t = o_t < eos
    o_k = tl.arange(0, BK)
    m_qk = m_t[:, None] & (o_k < K)[None, :]
    row_hv = o_t.to(tl.int64) * HV + i_hv
    p_cc = row_hv[:, None] * 64 + tl.arange(0, 64)[None, :]
    return o_t, m_t, o_k, m_qk, row_hv, p_cc, b_q, b_k, b_gl, b_gc, b_beta, b_t, b_m


@triton.jit
def _block_loads(v_ptr, do_ptr, h_ptr, dh_ptr, dvn_ptr, state, v0, o_t, m_t, o_k, i_hv,
                 HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr):
    """One block of BV value columns: S and dS' [BK, BV] float32, v, dO, dV_new [C, BV]."""
    o_v = v0 + tl.arange(0, BV)
    m_tv = m_t[:, None] & (o_v < V)[None, :]
    m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
    p_kv = state + o_k[:, None] * V + o_v[None, :]
    b_s = tl.load(h_ptr + p_kv, mask=m_kv, other=0.0)
    b_ds = tl.load(dh_ptr + p_kv, mask=m_kv, other=0.0)
    row_v = (o_t[:, None].to(tl.int64) * HV + i_hv) * V + o_v[None, :]
    b_v = tl.load(v_ptr + row_v, mask=m_tv, other=0.0).to(tl.float32)
    b_do = tl.load(do_ptr + row_v, mask=m_tv, other=0.0)
    b_dvn = tl.load(dvn_ptr + row_v, mask=m_tv, other=0.0)
    return m_tv, row_v, b_s, b_ds, b_v, b_do, b_dvn


@triton.jit
def _block_forward(b_k, b_t, b_s, b_v, b_dvn, b_beta, b_gamma, DT: tl.constexpr, PREC: tl.constexpr):
    """The forward's products of one value block again: K S, X / beta, X, V_new and dX = T^T dV_new."""
    b_sd = b_s.to(DT)
    b_ks = tl.dot(b_k, b_sd, input_precision=PREC)
    b_r = b_v - b_gamma[:, None] * b_ks                     # X / beta
    b_x = (b_beta[:, None] * b_r).to(DT)
    b_vn = tl.dot(b_t, b_x, input_precision=PREC)
    b_dx = tl.dot(tl.trans(b_t), b_dvn.to(DT), input_precision=PREC)
    return b_sd, b_ks, b_r, b_x, b_vn, b_dx


@triton.jit
def _cc_gradients(b_k, b_t, b_m, b_gc, b_beta, b_dt, b_dm, o_c, scale, DT: tl.constexpr, PREC: tl.constexpr):
    """From dT and dO V_new^T: dA's row scale dP and its products, as the [C, C] factors of dK and dQ."""
    b_dm = b_dm * scale
    b_decay = causal_decay(b_gc)
    strict = o_c[:, None] > o_c[None, :]
    b_kks = tl.where(strict, tl.dot(b_k, tl.trans(b_k), input_precision=PREC) * b_decay, 0.0)
    b_tt = tl.trans(b_t)
    b_da = -tl.dot(b_tt, tl.dot(b_dt.to(DT), b_tt, input_precision=PREC).to(DT), input_precision=PREC)
    b_da = tl.where(strict, b_da, 0.0)
    b_dp = b_beta[:, None] * b_da
    b_dkk = (b_dp * b_decay).to(DT)
    b_dqk = (b_dm * b_decay).to(DT)
    b_mm = b_dm * b_m
    b_pk = b_dp * b_kks
    b_dgc_cc = tl.sum(b_mm, 1) - tl.sum(b_mm, 0) + tl.sum(b_pk, 1) - tl.sum(b_pk, 0)
    return b_dkk, b_dqk, tl.sum(b_da * b_kks, 1), b_dgc_cc


@triton.jit
def _store_dg(dg_ptr, dbeta_ptr, row_hv, m_t, o_c, b_dgc, b_dgamma, b_gamma, b_de, b_e, b_dlast, b_gl, b_dbeta):
    b_dgc = b_dgc + b_dgamma * b_gamma - b_de * b_e
    # gc_last: a padding row carries it too, so adding at row 63 reaches every real row in the reverse cumsum
    d_last = tl.sum(b_de * b_e, 0) + tl.sum(b_dlast, 0) * tl.exp(b_gl)
    b_dgc += tl.where(o_c == 63, d_last, 0.0)
    tl.store(dg_ptr + row_hv, tl.cumsum(b_dgc, 0, reverse=True), mask=m_t)
    tl.store(dbeta_ptr + row_hv, b_dbeta, mask=m_t)


@triton.jit
def chunk_bwd_local_cc_kernel(
    q_ptr, k_ptr, v_ptr, gc_ptr, beta_ptr, t_ptr, m_ptr, do_ptr, h_ptr, dh_ptr, dvn_ptr, chunk_bounds,
    dv_ptr, dg_ptr, dbeta_ptr, dkk_ptr, dqk_ptr, scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """The first of the two kernels, one (chunk, value head): dv, dg and dbeta, from the [C, C]
    accumulators dT = dV_new X^T and dM = dO V_new^T; it stores dP * G and dM * G for
    ``chunk_bwd_local_kq_kernel``."""
    i_hv = tl.program_id(0)
    i_c = tl.program_id(1)
    DT = q_ptr.dtype.element_ty
    o_t, m_t, o_k, m_qk, row_hv, p_cc, b_q, b_k, b_gl, b_gc, b_beta, b_t, b_m = _chunk_rows(
        q_ptr, k_ptr, gc_ptr, beta_ptr, t_ptr, m_ptr, chunk_bounds, i_c, i_hv, H, HV, K, BK)
    b_m = b_m.to(tl.float32)
    o_c = tl.arange(0, 64)
    b_gamma = tl.exp(b_gc)
    b_e = tl.exp(b_gl - b_gc)
    state = (i_c.to(tl.int64) * HV + i_hv) * K * V
    b_dt = tl.zeros([64, 64], dtype=tl.float32)     # dV_new X^T
    b_dm = tl.zeros([64, 64], dtype=tl.float32)     # dO V_new^T
    b_dbeta = tl.zeros([64], dtype=tl.float32)
    b_dgamma = tl.zeros([64], dtype=tl.float32)
    b_de = tl.zeros([64], dtype=tl.float32)
    b_dlast = tl.zeros([BK], dtype=tl.float32)      # column sums of S * dS'
    for v0 in range(0, V, BV):
        m_tv, row_v, b_s, b_ds, b_v, b_do, b_dvn = _block_loads(
            v_ptr, do_ptr, h_ptr, dh_ptr, dvn_ptr, state, v0, o_t, m_t, o_k, i_hv, HV, K, V, BV)
        b_sd, b_ks, b_r, b_x, b_vn, b_dx = _block_forward(b_k, b_t, b_s, b_v, b_dvn, b_beta, b_gamma, DT, PREC)
        b_qs = tl.dot(b_q, b_sd, input_precision=PREC)
        tl.store(dv_ptr + row_v, (b_beta[:, None] * b_dx).to(dv_ptr.dtype.element_ty), mask=m_tv)
        b_dt += tl.dot(b_dvn.to(DT), tl.trans(b_x), input_precision=PREC)
        b_dm += tl.dot(b_do, tl.trans(b_vn.to(DT)), input_precision=PREC)
        b_de += tl.sum(b_vn * tl.dot(b_k, b_ds.to(DT), input_precision=PREC), 1)
        b_dbeta += tl.sum(b_dx * b_r, 1)
        b_dgamma += scale * tl.sum(b_do.to(tl.float32) * b_qs, 1) - b_beta * tl.sum(b_dx * b_ks, 1)
        b_dlast += tl.sum(b_s * b_ds, 1)
    b_dkk, b_dqk, b_dbeta_a, b_dgc = _cc_gradients(b_k, b_t, b_m, b_gc, b_beta, b_dt, b_dm, o_c, scale, DT, PREC)
    tl.store(dkk_ptr + p_cc, b_dkk, mask=m_t[:, None])
    tl.store(dqk_ptr + p_cc, b_dqk, mask=m_t[:, None])
    _store_dg(dg_ptr, dbeta_ptr, row_hv, m_t, o_c, b_dgc, b_dgamma, b_gamma, b_de, b_e, b_dlast, b_gl,
              b_dbeta + b_dbeta_a)


@triton.jit
def chunk_bwd_local_kq_kernel(
    q_ptr, k_ptr, v_ptr, gc_ptr, beta_ptr, t_ptr, do_ptr, h_ptr, dh_ptr, dvn_ptr, chunk_bounds,
    dkk_ptr, dqk_ptr, dq_ptr, dk_ptr, scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """dq and dk of one (chunk, value head) after ``chunk_bwd_local_cc_kernel``: the value blocks'
    K S, V_new and dX formed again (three small products per block), so neither kernel holds all
    four accumulators."""
    i_hv = tl.program_id(0)
    i_c = tl.program_id(1)
    DT = q_ptr.dtype.element_ty
    # no M here: t_ptr stands in for m_ptr, and the unused load is dropped by the compiler
    o_t, m_t, o_k, m_qk, row_hv, p_cc, b_q, b_k, b_gl, b_gc, b_beta, b_t, _ = _chunk_rows(
        q_ptr, k_ptr, gc_ptr, beta_ptr, t_ptr, t_ptr, chunk_bounds, i_c, i_hv, H, HV, K, BK)
    b_gamma = tl.exp(b_gc)
    b_e = tl.exp(b_gl - b_gc)
    state = (i_c.to(tl.int64) * HV + i_hv) * K * V
    b_dq = tl.zeros([64, BK], dtype=tl.float32)
    b_dk = tl.zeros([64, BK], dtype=tl.float32)
    for v0 in range(0, V, BV):
        m_tv, row_v, b_s, b_ds, b_v, b_do, b_dvn = _block_loads(
            v_ptr, do_ptr, h_ptr, dh_ptr, dvn_ptr, state, v0, o_t, m_t, o_k, i_hv, HV, K, V, BV)
        b_sd, b_ks, b_r, b_x, b_vn, b_dx = _block_forward(b_k, b_t, b_s, b_v, b_dvn, b_beta, b_gamma, DT, PREC)
        b_dq += tl.dot(b_do, tl.trans(b_sd), input_precision=PREC)
        b_dk += tl.dot((-(b_beta * b_gamma)[:, None] * b_dx).to(DT), tl.trans(b_sd), input_precision=PREC)
        b_dk += tl.dot((b_e[:, None] * b_vn).to(DT), tl.trans(b_ds.to(DT)), input_precision=PREC)
    b_dkk = tl.load(dkk_ptr + p_cc, mask=m_t[:, None], other=0.0)
    b_dqk = tl.load(dqk_ptr + p_cc, mask=m_t[:, None], other=0.0)
    b_dq = scale * b_gamma[:, None] * b_dq + tl.dot(b_dqk, b_k, input_precision=PREC)
    b_dk += tl.dot(b_dkk, b_k, input_precision=PREC) + tl.dot(tl.trans(b_dkk), b_k, input_precision=PREC)
    b_dk += tl.dot(tl.trans(b_dqk), b_q, input_precision=PREC)
    p_qk = (o_t[:, None].to(tl.int64) * HV + i_hv) * K + o_k[None, :]
    tl.store(dq_ptr + p_qk, b_dq, mask=m_qk)
    tl.store(dk_ptr + p_qk, b_dk, mask=m_qk)


def chunk_bwd_local(q, k, v, gc, beta, t, m, do, h, dh, dvn, chunk_bounds, scale: float,
                    block_v: int = 16, num_warps: int = 4, num_stages: int = 3):
    """Gradients of q, k, v, g and beta from the chunk states and the state-gradient pass.

    Two kernels per (chunk, value head). The first keeps the [C, C] accumulators (dT, dM), writes
    dv, dg and dbeta, and stores dP * G and dM * G in q's dtype; the second forms each value block's
    K S, V_new and dX again and keeps the [C, K] dq and dk. One kernel holding all four accumulators
    spilled 1,144 bytes a thread at 255 registers (sm_90, Triton 3.6) and took 9.22 ms at Qwen3-Next
    heads, B 4, T 16k on an H200; the two take 6.70 ms at 3 stages (7.71 at 2) with 96 and 0 bytes
    of spills (benchmarks/RESULTS.md, "Sixth 2026-12-02 session").

    Args:
        q, k: [NTOK, H, K]; v, do: [NTOK, HV, V] (one dtype); gc, beta: [NTOK, HV];
        t, m: [NTOK, HV, 64] (``chunk_prep``); h: float32 [NC, HV, K, V] state entering each chunk;
        dh: float32 [NC, HV, K, V] gradient of the state leaving it; dvn: float32 [NTOK, HV, V]
        gradient of V_new (``chunk_bwd_state``); chunk_bounds: int32 [NC, 2].
        block_v, num_warps, num_stages: launch shape of both kernels. BV 16 with 8 warps and BV 32
            with 4 or 8 warps faulted (illegal address) in the former one kernel on Hopper with
            Triton 3.6; only BV 16 at 4 warps is tested on the GPU.
    Returns:
        dq, dk float32 [NTOK, HV, K], each value head's part (a group's heads add up to the gradient
        of their q/k head: ``chunk_prep.qk_grad``); dv [NTOK, HV, V] in v's dtype; dg, dbeta float32
        [NTOK, HV].
    """
    NTOK, H, K = q.shape
    HV, V = v.shape[1:]
    NC = chunk_bounds.shape[0]
    dq = torch.empty(NTOK, HV, K, device=q.device, dtype=torch.float32)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(v)
    dg = torch.empty(NTOK, HV, device=q.device, dtype=torch.float32)
    dbeta = torch.empty_like(dg)
    BK, BV = max(16, next_power_of_2(K)), min(block_v, max(16, next_power_of_2(V)))
    dkk, dqk = torch.empty_like(t), torch.empty_like(t)
    launch = dict(H=H, HV=HV, K=K, V=V, BK=BK, BV=BV, PREC=dot_precision(q.dtype), num_warps=num_warps,
                  num_stages=num_stages)
    chunk_bwd_local_cc_kernel[(HV, NC)](q, k, v, gc, beta, t, m, do, h, dh, dvn, chunk_bounds, dv, dg, dbeta,
                                        dkk, dqk, scale, **launch)
    chunk_bwd_local_kq_kernel[(HV, NC)](q, k, v, gc, beta, t, do, h, dh, dvn, chunk_bounds, dkk, dqk, dq, dk,
                                        scale, **launch)
    return dq, dk, dv, dg, dbeta
