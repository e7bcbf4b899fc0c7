"""Backward state pass of the chunked gated delta rule: the state gradient, carried from the last
chunk to the first.

Legend as in ``chunk_fwd``. With dS' the gradient of the state leaving a chunk and dO the output
gradient, the chunk's own products give (forward in ``chunk_fwd``'s docstring)

    dV_new = scale (Q K^T * exp(gc_i - gc_j), i >= j)^T dO + (K * exp(gc_last - gc)) dS'
    dS     = exp(gc_last) dS' + scale (diag(exp(gc)) Q)^T dO - (diag(beta exp(gc)) K)^T (T^T dV_new)

(the last term is W^T dV_new with W = T diag(beta exp(gc)) K, reassociated so every product stays
BV wide). The pass stores dS' for every chunk and dV_new for every token; with the forward's chunk
states the remaining gradients are local to each chunk (``chunk_bwd_local``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybridlm.ops.triton.chunk_fwd import load_chunk_common, state_pass_stages, state_program
from hybridlm.ops.triton.chunk_prep import dot_precision
from hybridlm.ops.triton.utils import cdiv, next_power_of_2


@triton.jit
def chunk_bwd_state_kernel(
    q_ptr, k_ptr, do_ptr, gc_ptr, beta_ptr, t_ptr, m_ptr, dht_ptr, dh_ptr, dh0_ptr, dvn_ptr,
    cu, chunk_offsets, scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, HAS_DHT: tl.constexpr, PREC: tl.constexpr,
):
    i_hv, i_h, bos, eos, c_first, o_v, m_kv, off_kv, state_row, b_ds = state_program(
        cu, chunk_offsets, dht_ptr, HAS_DHT, H, HV, K, V, BK, BV)
    nt = tl.cdiv(eos - bos, 64)
    DT = q_ptr.dtype.element_ty
    # transposed: dS'^T [BV, K] is the left operand of every product on the sequential chain, so
    # it stays in registers (2.4 -> 1.4 ms at B 4, T 16k, H 16 against the untransposed form)
    b_dst = tl.trans(b_ds)
    off_vk = tl.trans(off_kv)
    m_vk = tl.trans(m_kv)

    for i in range(0, nt):
        i_c = nt - 1 - i
        t0 = bos + i_c * 64
        tl.store(dh_ptr + ((c_first + i_c).to(tl.int64) * HV + i_hv) * K * V + off_vk, b_dst, mask=m_vk)
        b_q, b_k, b_gc, b_beta, b_t, b_m, b_gl = load_chunk_common(
            q_ptr, k_ptr, gc_ptr, beta_ptr, t_ptr, m_ptr, t0, eos, i_h, i_hv, H, HV, K, BK)
        o_t = t0 + tl.arange(0, 64)
        m_vt = (o_v < V)[:, None] & (o_t < eos)[None, :]
        col_v = (o_t[None, :].to(tl.int64) * HV + i_hv) * V + o_v[:, None]
        b_dot = tl.load(do_ptr + col_v, mask=m_vt, other=0.0).to(DT)

        b_decay = tl.exp(b_gc)
        b_kd = (b_k * tl.exp(b_gl - b_gc)[:, None]).to(DT)
        b_qg = (b_q * b_decay[:, None]).to(DT)
        b_kb = (b_k * (b_beta * b_decay)[:, None]).to(DT)
        b_dvnt = scale * tl.dot(b_dot, b_m, input_precision=PREC)
        b_dvnt += tl.dot(b_dst.to(DT), tl.trans(b_kd), input_precision=PREC)
        tl.store(dvn_ptr + col_v, b_dvnt, mask=m_vt)

        b_yt = tl.dot(b_dvnt.to(DT), b_t, input_precision=PREC)
        b_dst = b_dst * tl.exp(b_gl) + scale * tl.dot(b_dot, b_qg, input_precision=PREC)
        b_dst -= tl.dot(b_yt.to(DT), b_kb, input_precision=PREC)

    tl.store(dh0_ptr + state_row + off_vk, b_dst, mask=m_vk)


def chunk_bwd_state(q, k, do, gc, beta, t, m, dht, cu, chunk_offsets, scale: float, num_chunks: int,
                    block_v: int = 64):
    """Reverse state pass.

    Args:
        q, k: [NTOK, H, K]; do: [NTOK, HV, V] output gradient (q's dtype); gc, beta, t, m as in ``chunk_fwd``.
        dht: float32 [N, HV, K, V] gradient of the final state, or None.
        num_chunks: NC, total chunk count.
    Returns:
        dh: float32 [NC, HV, K, V] gradient of the state leaving each chunk;
        dh0: float32 [N, HV, K, V] gradient of the initial state;
        dvn: float32 [NTOK, HV, V] gradient of V_new.
    """
    NTOK, H, K = q.shape
    HV, V = do.shape[1:]
    N = cu.shape[0] - 1
    dh = torch.empty(num_chunks, HV, K, V, device=q.device, dtype=torch.float32)
    dh0 = torch.empty(N, HV, K, V, device=q.device, dtype=torch.float32)
    dvn = torch.empty(NTOK, HV, V, device=q.device, dtype=torch.float32)
    BV = max(16, min(block_v, next_power_of_2(V)))
    # 8 warps measured fastest at BV 64 (1.40 ms vs 1.52 at 4 warps, B 4, T 16k, H 16). With value
    # blocks of 16 they gave wrong gradients on Hopper / Triton 3.6 (fp16, V 16: dv and dk off while
    # dh0, computed from the same dV_new in registers, was right), so narrow blocks use 4 warps
    # (the configuration the forward pass runs and checks)
    num_warps = 8 if BV >= 64 else 4
    chunk_bwd_state_kernel[(cdiv(V, BV), N * HV)](
        q, k, do, gc, beta, t, m, dht, dh, dh0, dvn, cu, chunk_offsets, scale,
        H=H, HV=HV, K=K, V=V, BK=max(16, next_power_of_2(K)), BV=BV,
        HAS_DHT=dht is not None, PREC=dot_precision(q.dtype), num_warps=num_warps, num_stages=state_pass_stages(q.dtype),
    )
    return dh, dh0, dvn
