"""Forward state pass of the chunked gated delta rule: the only part that is sequential in T.

Legend: NTOK flat tokens, N sequences, NC chunks (all sequences), H q/k heads, HV value heads,
K key size, V value size, C = 64 chunk length, BV value columns per program.

One program owns one (sequence, value head, block of BV value columns): the columns of the state
are independent under the rule (every product reduces over K or over tokens, never over V), so
splitting V needs no communication and gives B * HV * V / BV programs, enough to fill the card at
batch 1. The state stays in float32 registers across chunks. Per chunk, with S the entering state,
gc the in-chunk cumulative log-decay and T the chunk's WY transform (``chunk_prep``):

    V_new = T [diag(beta) (V - diag(exp(gc)) K S)]                what each position writes
    O     = scale [diag(exp(gc)) Q S + (Q K^T * exp(gc_i - gc_j), i >= j) V_new]
    S'    = exp(gc_last) S + (K * exp(gc_last - gc))^T V_new

Writing T (K S) instead of (T K) S keeps every product at the width BV, so no program recomputes
the [C, K] matrix W = T diag(beta exp(gc)) K that a V-split would otherwise repeat.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybridlm.ops.triton.chunk_prep import dot_precision
from hybridlm.ops.triton.utils import cdiv, next_power_of_2


@triton.jit
def load_chunk_tiles(q_ptr, k_ptr, t_ptr, m_ptr, t0, eos, i_h, i_hv,
                     H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr):
    """q, k [C, BK] and T, M [C, C] of a chunk (padding rows zeros)."""
    o_t = t0 + tl.arange(0, 64)
    m_t = o_t < eos
    o_k = tl.arange(0, BK)
    m_qk = m_t[:, None] & (o_k < K)[None, :]
    row_qk = o_t[:, None].to(tl.int64) * (H * K) + i_h * K + o_k[None, :]
    b_q = tl.load(q_ptr + row_qk, mask=m_qk, other=0.0)
    b_k = tl.load(k_ptr + row_qk, mask=m_qk, other=0.0)
    row_hv = o_t.to(tl.int64) * HV + i_hv
    o_c = tl.arange(0, 64)
    b_t = tl.load(t_ptr + row_hv[:, None] * 64 + o_c[None, :], mask=m_t[:, None], other=0.0)
    b_m = tl.load(m_ptr + row_hv[:, None] * 64 + o_c[None, :], mask=m_t[:, None], other=0.0)
    return b_q, b_k, b_t, b_m


@triton.jit
def load_chunk_common(q_ptr, k_ptr, gc_ptr, beta_ptr, t_ptr, m_ptr, t0, eos, i_h, i_hv,
                      H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr):
    """q, k [C, BK], gc, beta [C] (padding rows: zeros, gc = gc_last), T and M [C, C], gc_last of a
    chunk; gc and beta from the token-major [NTOK, HV] arrays."""
    b_q, b_k, b_t, b_m = load_chunk_tiles(q_ptr, k_ptr, t_ptr, m_ptr, t0, eos, i_h, i_hv, H, HV, K, BK)
    o_t = t0 + tl.arange(0, 64)
    m_t = o_t < eos
    row_hv = o_t.to(tl.int64) * HV + i_hv
    last = tl.minimum(t0 + 64, eos) - 1
    b_gl = tl.load(gc_ptr + last.to(tl.int64) * HV + i_hv)
    b_gc = tl.where(m_t, tl.load(gc_ptr + row_hv, mask=m_t, other=0.0), b_gl)
    b_beta = tl.load(beta_ptr + row_hv, mask=m_t, other=0.0).to(tl.float32)
    return b_q, b_k, b_gc, b_beta, b_t, b_m, b_gl


@triton.jit
def load_chunk_vectors(vec_ptr, i_c, i_hv, HV: tl.constexpr):
    """A chunk's per-row vectors from ``chunk_prep``'s chunk-major [64, 4] block (one contiguous
    1 KB load): gc (padding rows at gc_last), beta, rq, rk (padding rows 0), and gc_last."""
    base = (i_c.to(tl.int64) * HV + i_hv) * 256
    o_c = tl.arange(0, 64)
    b = tl.load(vec_ptr + base + o_c[:, None] * 4 + tl.arange(0, 4)[None, :])
    even, odd = tl.split(tl.reshape(b, [64, 2, 2]))  # columns (0, 2) and (1, 3)
    b_gc, b_rq = tl.split(even)
    b_beta, b_rk = tl.split(odd)
    b_gl = tl.load(vec_ptr + base + 63 * 4)
    return b_gc, b_beta, b_gl, b_rq, b_rk


@triton.jit
def state_program(cu, chunk_offsets, init_ptr, HAS_INIT: tl.constexpr,
                  H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr):
    """What a (sequence, value head, value block) program of a state pass owns: its token range,
    first chunk index, [BK, BV] tile offsets into a [.., HV, K, V] state, and the tile's start value
    (``init_ptr``'s row, or zeros)."""
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_n = i_nh // HV
    i_hv = i_nh % HV
    i_h = i_hv // (HV // H)
    bos = tl.load(cu + i_n)
    eos = tl.load(cu + i_n + 1)
    c_first = tl.load(chunk_offsets + i_n)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
    off_kv = o_k[:, None] * V + o_v[None, :]
    state_row = (i_n.to(tl.int64) * HV + i_hv) * K * V
    if HAS_INIT:
        b_s = tl.load(init_ptr + state_row + off_kv, mask=m_kv, other=0.0).to(tl.float32)
    else:
        b_s = tl.zeros([BK, BV], dtype=tl.float32)
    return i_hv, i_h, bos, eos, c_first, o_v, m_kv, off_kv, state_row, b_s


@triton.jit
def chunk_fwd_kernel(
    q_ptr, k_ptr, v_ptr, vec_ptr, t_ptr, m_ptr, h0_ptr, o_ptr, ht_ptr, h_ptr,
    cu, chunk_offsets, scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, HAS_H0: tl.constexpr, STORE_H: tl.constexpr,
    PREC: tl.constexpr, NORM: tl.constexpr,
):
    i_hv, i_h, bos, eos, c_first, o_v, m_kv, off_kv, state_row, b_s = state_program(
        cu, chunk_offsets, h0_ptr, HAS_H0, H, HV, K, V, BK, BV)
    DT = q_ptr.dtype.element_ty

    for t0 in range(bos, eos, 64):
        i_c = c_first + (t0 - bos) // 64
        if STORE_H:
            tl.store(h_ptr + (i_c.to(tl.int64) * HV + i_hv) * K * V + off_kv, b_s, mask=m_kv)
        # the per-row vectors as one coalesced block (``chunk_prep``'s vec). Token-major gc and beta
        # cost 64 scattered sectors each per chunk; measured on an H200 (Qwen3-Next heads, B 1, T 32k)
        # the pass then swung 0.78-1.06 ms with code generation (beta's dtype alone: 0.852 / 1.057)
        b_gc, b_beta, b_gl, b_rq, b_rk = load_chunk_vectors(vec_ptr, i_c, i_hv, HV)
        b_q, b_k, b_t, b_m = load_chunk_tiles(q_ptr, k_ptr, t_ptr, m_ptr, t0, eos, i_h, i_hv, H, HV, K, BK)
        o_t = t0 + tl.arange(0, 64)
        m_tv = (o_t < eos)[:, None] & (o_v < V)[None, :]
        row_v = (o_t[:, None].to(tl.int64) * HV + i_hv) * V + o_v[None, :]
        b_v = tl.load(v_ptr + row_v, mask=m_tv, other=0.0).to(tl.float32)

        b_sd = b_s.to(DT)
        b_ks = tl.dot(b_k, b_sd, input_precision=PREC)
        b_qs = tl.dot(b_q, b_sd, input_precision=PREC)
        b_decay = tl.exp(b_gc)
        b_decay_end = tl.exp(b_gl - b_gc)
        if NORM:  # q and k l2-normalised through their rows' inverse norms (``chunk_prep``)
            b_ks = b_ks * b_rk[:, None]
            b_qs = b_qs * b_rq[:, None]
            b_decay_end = b_decay_end * b_rk
        b_x = b_beta[:, None] * (b_v - b_decay[:, None] * b_ks)
        b_vn = tl.dot(b_t, b_x.to(DT), input_precision=PREC)

        b_o = tl.dot(b_m, b_vn.to(DT), acc=b_decay[:, None] * b_qs, input_precision=PREC)
        tl.store(o_ptr + row_v, (b_o * scale).to(o_ptr.dtype.element_ty), mask=m_tv)

        # the decay to the chunk's end scales V_new's rows ([C, BV]) rather than K's ([C, K]): no
        # float32 copy of K stays live (it spilled)
        b_vnd = (b_vn * b_decay_end[:, None]).to(DT)
        b_s = b_s * tl.exp(b_gl) + tl.dot(tl.trans(b_k), b_vnd, input_precision=PREC)

    tl.store(ht_ptr + state_row + off_kv, b_s, mask=m_kv)


def state_pass_stages(dtype: torch.dtype) -> int:
    """Software-pipelining depth of the state passes: float32 tiles are twice as large, and three
    stages of them overflow the 227 KB of shared memory a Hopper block may use."""
    return 1 if dtype == torch.float32 else 3


def pick_block_v(num_programs_without_split: int, V: int, device: torch.device) -> int:
    """Value-block width of the forward state pass: 32, or 16 when 32 would leave more than half
    of the multiprocessors idle.

    Every value block re-reads the chunk's q, k, T and M tiles (48 KB per chunk, from L2), so narrow
    blocks cost L2 bandwidth, while wide ones leave multiprocessors idle at small batch. Measured
    (H100, bf16): B 1, T 32k, Hv 32: BV 16 / 32 / 64 (8 warps) = 2.11 / 1.34 / 2.09 ms;
    B 1, T 64k, Hv 16: 2.11 / 2.46 / 4.19 ms.
    """
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    width = max(16, min(32, next_power_of_2(V)))
    if width == 32 and num_programs_without_split * cdiv(V, 32) < sms // 2:
        width = 16
    return width


def chunk_fwd(q, k, v, vec, t, m, initial_state, cu, chunk_offsets, scale: float,
              store_chunks: int = 0, block_v: int | None = None, num_warps: int = 4, l2norm: bool = False,
              num_stages: int | None = None):
    """Run the state pass over every sequence.

    Args:
        q, k: [NTOK, H, K]; v: [NTOK, HV, V] (float32/bfloat16/float16, one dtype, contiguous).
        vec: float32 [NC, HV, 64, 4]; t, m: [NTOK, HV, 64] from ``chunk_prep``.
        l2norm: use q and k l2-normalised through the inverse row norms in vec (``chunk_prep`` with
            ``l2norm=True``).
        initial_state: float32 [N, HV, K, V] or None. cu, chunk_offsets: int32 [N + 1].
        store_chunks: NC, the total chunk count, to also return the state entering every chunk,
            float32 [NC, HV, K, V] (for backward); 0 to skip it.
        block_v, num_warps, num_stages: launch overrides (defaults: ``pick_block_v``, 4,
            ``state_pass_stages``). Offline sm_90 compiles (Triton 3.6, bf16, Qwen3-Next heads): 3 stages
            take 158-166 KB of shared memory (one program per multiprocessor); 2 stages 105 KB at BV 16
            and 112 KB at BV 32, so two programs share a multiprocessor.
    Returns:
        o [NTOK, HV, V] in v's dtype, final state float32 [N, HV, K, V], chunk states or None.
    """
    NTOK, H, K = q.shape
    HV, V = v.shape[1:]
    N = cu.shape[0] - 1
    o = torch.empty_like(v)
    ht = torch.empty(N, HV, K, V, device=q.device, dtype=torch.float32)
    h = None
    if store_chunks:
        h = torch.empty(store_chunks, HV, K, V, device=q.device, dtype=torch.float32)
    BV = block_v or pick_block_v(N * HV, V, q.device)
    chunk_fwd_kernel[(cdiv(V, BV), N * HV)](
        q, k, v, vec, t, m, initial_state, o, ht, h, cu, chunk_offsets, scale,
        H=H, HV=HV, K=K, V=V, BK=max(16, next_power_of_2(K)), BV=BV,
        HAS_H0=initial_state is not None, STORE_H=h is not None, PREC=dot_precision(q.dtype), NORM=l2norm,
        num_warps=num_warps, num_stages=num_stages or state_pass_stages(q.dtype),
    )
    return o, ht, h
