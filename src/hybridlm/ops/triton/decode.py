"""Triton decode step of the gated delta rule: one token per sequence, state read once, written once.

Legend: B batch, H query/key heads, HV value heads (a multiple of H), K key size, V value size.
The rule per step (see ``hybridlm.ops.gated_delta_rule``):

    S = exp(g) S;   S = S + beta k (v - S^T k)^T;   o = scale S^T q

Each program owns one (sequence, value head, block of BV value columns) tile of the state (or, with
a persistent grid, strides over such tiles). The
columns of S are independent under the rule (``S^T k`` reduces over K, never over V), so splitting V
needs no communication, and at batch 1 small BV gives enough programs to occupy every multiprocessor:
decode is bound by state bandwidth, and a half-idle card halves it.

The op is registered with ``torch.library`` (``hybridlm::gdn_decode_step`` and, mutating its state,
``hybridlm::gdn_decode_step_``) so ``torch.compile(fullgraph=True)`` traces through it and a decode step
can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from hybridlm.ops._checks import check_kernel_device
from hybridlm.ops.triton.conv import window_fits
from hybridlm.ops.triton.utils import cdiv, next_power_of_2, pdl, pdl_launch, pdl_trigger, pdl_wait

# A constexpr global: compiled Triton kernels may read no other kind of module-level value.
L2NORM_EPS = tl.constexpr(1e-6)


@triton.jit
def _gdn_decode_kernel(
    q_BHK, k_BHK, v_BHV, g_BH, beta_BH, A_log_H, dt_bias_H,
    state_in, state_out, o_BHV, scale, n_tiles, s_qb, s_kb, s_vb, s_gb, s_bb,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
    USE_L2NORM: tl.constexpr, RAW_GATE: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
    BETA_IS_LOGIT: tl.constexpr, STREAM: tl.constexpr, STAGES: tl.constexpr, ONE_REDUCE: tl.constexpr,
    USE_PDL: tl.constexpr, STATE_EARLY: tl.constexpr,
):
    # Tiles are (sequence x value head, value block) pairs, value blocks fastest. A grid of n_tiles
    # programs runs one tile each; a smaller (persistent) grid strides over them, which trims the
    # last partial wave of programs when the tiles are few. With STAGES > 1 the persistent loop is
    # software-pipelined: the state tiles of the next STAGES - 1 iterations are copied into shared
    # memory asynchronously while this one computes (a plain `range` is not pipelined: its loads
    # feed no tensor-core product, and Triton pipelines those only in a loop given num_stages).
    # STATE_EARLY: each tile reads its state first, before the wait (the caller having promised that
    # no kernel still running writes it: ``decode_into``'s ``state_early``); the wait is in the tile.
    pdl_trigger(USE_PDL)
    if not STATE_EARLY:
        pdl_wait(USE_PDL)
    n_vb = tl.cdiv(V, BV)
    if STAGES > 1:
        for tile in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0), num_stages=STAGES):
            i_v = tile % n_vb
            i_bhv = (tile // n_vb).to(tl.int64)
            _decode_tile(q_BHK, k_BHK, v_BHV, g_BH, beta_BH, A_log_H, dt_bias_H, state_in, state_out, o_BHV,
                         scale, i_v, i_bhv, s_qb, s_kb, s_vb, s_gb, s_bb, H, HV, K, V, BK, BV, USE_L2NORM,
                         RAW_GATE, HAS_DT_BIAS, BETA_IS_LOGIT, STREAM, ONE_REDUCE, USE_PDL, STATE_EARLY)
    else:
        for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
            i_v = tile % n_vb
            # int64 so that state offsets of large batches (B * HV * K * V > 2**31) do not wrap
            i_bhv = (tile // n_vb).to(tl.int64)
            _decode_tile(q_BHK, k_BHK, v_BHV, g_BH, beta_BH, A_log_H, dt_bias_H, state_in, state_out, o_BHV,
                         scale, i_v, i_bhv, s_qb, s_kb, s_vb, s_gb, s_bb, H, HV, K, V, BK, BV, USE_L2NORM,
                         RAW_GATE, HAS_DT_BIAS, BETA_IS_LOGIT, STREAM, ONE_REDUCE, USE_PDL, STATE_EARLY)


@triton.jit
def _load_state(state_in, p_state, m_kv, STREAM: tl.constexpr):
    if STREAM:
        return tl.load(state_in + p_state, mask=m_kv, other=0.0, eviction_policy="evict_first")
    return tl.load(state_in + p_state, mask=m_kv, other=0.0)


@triton.jit
def _add5(a0, a1, a2, a3, a4, b0, b1, b2, b3, b4):
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3, a4 + b4


@triton.jit
def _tile_index(i_v, i_bhv, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr):
    # a (sequence x value head, value block) tile: sequence, value head, its key head, offsets, masks
    i_b = i_bhv // HV
    i_hv = i_bhv % HV
    i_h = i_hv // (HV // H)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    return i_b, i_hv, i_h, o_k, o_v, m_k, m_v, m_k[:, None] & m_v[None, :]


@triton.jit
def _decode_tile(q_BHK, k_BHK, v_BHV, g_BH, beta_BH, A_log_H, dt_bias_H, state_in, state_out, o_BHV,
                 scale, i_v, i_bhv, s_qb, s_kb, s_vb, s_gb, s_bb,
                 H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                 BK: tl.constexpr, BV: tl.constexpr,
                 USE_L2NORM: tl.constexpr, RAW_GATE: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
                 BETA_IS_LOGIT: tl.constexpr, STREAM: tl.constexpr, ONE_REDUCE: tl.constexpr,
                 USE_PDL: tl.constexpr, STATE_EARLY: tl.constexpr):
    i_b, i_hv, i_h, o_k, o_v, m_k, m_v, m_kv = _tile_index(i_v, i_bhv, H, HV, K, V, BK, BV)

    # The small loads go first, then the state's: a program's loads are all in flight before it waits
    # on any, and the compiler does not sink the small ones behind the reduction (which put their
    # latency on every program's path after its state arrived). STREAM marks the state as read
    # once (evict first) and its store as streaming: at large batch it does not fit in L2 anyway.
    # q, k, v, g and beta: a sequence's row at its own stride (views into a wider projection or conv
    # output are read in place), the heads of a row packed; state and o contiguous
    p_state = i_bhv * K * V + o_k[:, None] * V + o_v[None, :]
    if STATE_EARLY:
        # the state first, before the PDL wait: its read overlaps the predecessor's tail (the state
        # was written by no kernel that can still be running), then the activations after the wait
        b_S = _load_state(state_in, p_state, m_kv, STREAM)
        pdl_wait(USE_PDL)
    b_v = tl.load(v_BHV + i_b * s_vb + i_hv * V + o_v, mask=m_v, other=0.0).to(tl.float32)
    b_g = tl.load(g_BH + i_b * s_gb + i_hv).to(tl.float32)
    b_beta = tl.load(beta_BH + i_b * s_bb + i_hv).to(tl.float32)
    if not STATE_EARLY:
        b_S = _load_state(state_in, p_state, m_kv, STREAM)
    # q and k as one [BK, 2] load: two separate loads each need a layout change, and the compiler
    # places the second load after the first one's change, i.e. after q has arrived.
    p_qk = i_h * K + o_k[:, None]
    o_2 = tl.arange(0, 2)[None, :]
    b_qk = tl.load(tl.where(o_2 == 0, q_BHK + i_b * s_qb + p_qk, k_BHK + i_b * s_kb + p_qk),
                   mask=m_k[:, None] & (o_2 < 2), other=0.0)
    b_q, b_k = tl.split(b_qk.to(tl.float32))

    b_S, b_o = _tile_math(b_S, b_q, b_k, b_v, b_g, b_beta, A_log_H, dt_bias_H, i_hv, scale, BK, BV, USE_L2NORM,
                          RAW_GATE, HAS_DT_BIAS, BETA_IS_LOGIT, ONE_REDUCE)
    if STREAM:
        tl.store(state_out + p_state, b_S, mask=m_kv, cache_modifier=".cs")
    else:
        tl.store(state_out + p_state, b_S, mask=m_kv)
    tl.store(o_BHV + i_bhv * V + o_v, b_o.to(o_BHV.dtype.element_ty), mask=m_v)


@triton.jit
def _tile_math(b_S, b_q, b_k, b_v, b_g, b_beta, A_log_H, dt_bias_H, i_hv, scale, BK: tl.constexpr, BV: tl.constexpr,
               USE_L2NORM: tl.constexpr, RAW_GATE: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
               BETA_IS_LOGIT: tl.constexpr, ONE_REDUCE: tl.constexpr):
    # one tile's step of the rule on loaded float32 values: (new state tile, output columns)
    if RAW_GATE:
        # g = -exp(A_log) * softplus(a + dt_bias), softplus with torch's threshold of 20; below -15
        # log(1 + exp(x)) rounds to 0 in float32, while exp(x) is its value to within 1e-7.
        b_a = b_g
        if HAS_DT_BIAS:
            b_a = b_a + tl.load(dt_bias_H + i_hv).to(tl.float32)
        b_sp = tl.where(b_a > 20.0, b_a, tl.log(1.0 + tl.exp(tl.minimum(b_a, 20.0))))
        b_sp = tl.where(b_a < -15.0, tl.exp(b_a), b_sp)
        b_g = -tl.exp(tl.load(A_log_H + i_hv).to(tl.float32)) * b_sp
    if BETA_IS_LOGIT:
        b_beta = tl.sigmoid(b_beta)
    if USE_L2NORM and not ONE_REDUCE:
        b_q = b_q / tl.sqrt(tl.sum(b_q * b_q) + L2NORM_EPS)
        b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + L2NORM_EPS)

    if ONE_REDUCE:
        # Every reduction over K in one pass over the loaded (old) state, so a program crosses its
        # warps once (the separate form below crosses them for each of its four reductions, the two
        # norms, S^T k and S^T q: 18 barriers against 7 in an offline sm_90 compile). With r_k = 1 / |k|, r_q = 1 / |q| (1 without the norm), k^ = r_k k:
        #   S^T k^ = r_k S^T k,   u = beta (v - exp(g) S^T k^),   S' = exp(g) S + k^ u^T,
        #   S'^T q^ = r_q (exp(g) S^T q + r_k (k . q) u).
        # k . k, q . q and k . q enter the same reduction as [K, BV] broadcasts (every column gets
        # the same sum), which costs a few multiply-adds per element and no extra crossing.
        ones = tl.full([BK, BV], 1.0, tl.float32)
        b_sk, b_sq, b_kk, b_qq, b_kq = tl.reduce(
            (b_S * b_k[:, None], b_S * b_q[:, None], ones * (b_k * b_k)[:, None], ones * (b_q * b_q)[:, None],
             ones * (b_k * b_q)[:, None]), 0, _add5)
        if USE_L2NORM:
            b_rk = 1.0 / tl.sqrt(b_kk + L2NORM_EPS)
            b_rq = 1.0 / tl.sqrt(b_qq + L2NORM_EPS)
        else:
            b_rk = tl.full([BV], 1.0, tl.float32)
            b_rq = b_rk
        b_decay = tl.exp(b_g)
        b_u = b_beta * (b_v - b_decay * b_rk * b_sk)
        b_o = (scale * b_rq) * (b_decay * b_sq + b_rk * b_kq * b_u)
        b_S = b_S * b_decay + b_k[:, None] * (b_rk * b_u)[None, :]
    else:
        b_S = b_S * tl.exp(b_g)
        b_u = b_beta * (b_v - tl.sum(b_S * b_k[:, None], axis=0))
        b_S = b_S + b_k[:, None] * b_u[None, :]
        b_o = tl.sum(b_S * (b_q * scale)[:, None], axis=0)

    return b_S, b_o


@triton.jit
def _conv_taps(win_b, cw_CK, c, m, KS: tl.constexpr, XT: tl.constexpr):
    # a channel block's filter taps and the window's inputs before this token, as floats through x's
    # dtype (the arithmetic of ops/triton/conv.py's kernel: a filter of fewer than 4 taps gets leading
    # zero taps)
    W: tl.constexpr = KS - 1
    w3 = tl.zeros(c.shape, dtype=tl.float32)
    w2 = tl.zeros(c.shape, dtype=tl.float32)
    w1 = tl.zeros(c.shape, dtype=tl.float32)
    p3 = tl.zeros(c.shape, dtype=tl.float32)
    p2 = tl.zeros(c.shape, dtype=tl.float32)
    p1 = tl.zeros(c.shape, dtype=tl.float32)
    if KS >= 4:
        w3 = tl.load(cw_CK + c * KS + (KS - 4), mask=m, other=0.0).to(XT).to(tl.float32)
        p3 = tl.load(win_b + c * W + (W - 3), mask=m, other=0.0).to(XT).to(tl.float32)
    if KS >= 3:
        w2 = tl.load(cw_CK + c * KS + (KS - 3), mask=m, other=0.0).to(XT).to(tl.float32)
        p2 = tl.load(win_b + c * W + (W - 2), mask=m, other=0.0).to(XT).to(tl.float32)
    if KS >= 2:
        w1 = tl.load(cw_CK + c * KS + (KS - 2), mask=m, other=0.0).to(XT).to(tl.float32)
        p1 = tl.load(win_b + c * W + (W - 1), mask=m, other=0.0).to(XT).to(tl.float32)
    w0 = tl.load(cw_CK + c * KS + (KS - 1), mask=m, other=0.0).to(XT).to(tl.float32)
    return w3, w2, w1, w0, p3, p2, p1


@triton.jit
def _conv_out(x_b, c, m, w3, w2, w1, w0, p3, p2, p1, XT: tl.constexpr):
    # silu(conv) of this token's inputs, rounded to x's dtype as the conv kernel writes it, and the inputs
    cur = tl.load(x_b + c, mask=m, other=0.0).to(tl.float32)
    acc = w3 * p3 + w2 * p2 + w1 * p1 + w0 * cur
    return (acc * tl.sigmoid(acc)).to(XT).to(tl.float32), cur


@triton.jit
def _window_store(win_b, c, m, p2, p1, cur, KS: tl.constexpr):
    # the window after this token: its last KS - 1 inputs
    W: tl.constexpr = KS - 1
    WT = win_b.dtype.element_ty
    if W >= 1:
        tl.store(win_b + c * W + (W - 1), cur.to(WT), mask=m)
    if W >= 2:
        tl.store(win_b + c * W + (W - 2), p1.to(WT), mask=m)
    if W >= 3:
        tl.store(win_b + c * W + (W - 3), p2.to(WT), mask=m)


@triton.jit
def _gdn_conv_decode_kernel(
    x_BC, win_BCW, cw_CK, tickets, g_BH, beta_BH, A_log_H, dt_bias_H, state_in, state_out, o_BHV, scale,
    s_xb, s_wb, s_gb, s_bb,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    KS: tl.constexpr, USE_L2NORM: tl.constexpr, RAW_GATE: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
    BETA_IS_LOGIT: tl.constexpr, ONE_REDUCE: tl.constexpr, USE_PDL: tl.constexpr, STATE_EARLY: tl.constexpr,
):
    # The decode step with the layer's short conv in front: a tile reads the in-projection's raw
    # [q k v] row, convolves its own channels with the window (q and k of its key head, its value
    # columns), applies the SiLU, runs the rule and moves the window on by this token. A value
    # column's window belongs to one tile, which writes it; a key head's q and k windows are read by
    # every tile of that head (HV / H value heads x their value blocks), so the last of them to arrive
    # (a counter per sequence and key head, left at 0) writes them. STATE_EARLY: the state, the filter
    # and the window before the PDL wait (written by no kernel that may still run).
    pdl_trigger(USE_PDL)
    if not STATE_EARLY:
        pdl_wait(USE_PDL)
    n_vb = tl.cdiv(V, BV)
    tile = tl.program_id(0)
    i_v = tile % n_vb
    i_bhv = (tile // n_vb).to(tl.int64)
    i_b, i_hv, i_h, o_k, o_v, m_k, m_v, m_kv = _tile_index(i_v, i_bhv, H, HV, K, V, BK, BV)
    XT = x_BC.dtype.element_ty
    p_state = i_bhv * K * V + o_k[:, None] * V + o_v[None, :]
    o_2 = tl.arange(0, 2)[None, :]
    c_qk = tl.where(o_2 == 0, i_h * K + o_k[:, None], H * K + i_h * K + o_k[:, None])  # [BK, 2]: q, k
    m_qk = m_k[:, None] & (o_2 < 2)
    c_v = 2 * H * K + i_hv * V + o_v
    win_b = win_BCW + i_b * s_wb
    b_S = tl.load(state_in + p_state, mask=m_kv, other=0.0)
    v3, v2, v1, v0, vp3, vp2, vp1 = _conv_taps(win_b, cw_CK, c_v, m_v, KS, XT)
    k3, k2, k1, k0, kp3, kp2, kp1 = _conv_taps(win_b, cw_CK, c_qk, m_qk, KS, XT)
    if STATE_EARLY:
        pdl_wait(USE_PDL)
    x_b = x_BC + i_b * s_xb
    b_v, cur_v = _conv_out(x_b, c_v, m_v, v3, v2, v1, v0, vp3, vp2, vp1, XT)
    b_qk, cur_qk = _conv_out(x_b, c_qk, m_qk, k3, k2, k1, k0, kp3, kp2, kp1, XT)
    b_g = tl.load(g_BH + i_b * s_gb + i_hv).to(tl.float32)
    b_beta = tl.load(beta_BH + i_b * s_bb + i_hv).to(tl.float32)
    b_q, b_k = tl.split(b_qk)
    b_S, b_o = _tile_math(b_S, b_q, b_k, b_v, b_g, b_beta, A_log_H, dt_bias_H, i_hv, scale, BK, BV, USE_L2NORM,
                          RAW_GATE, HAS_DT_BIAS, BETA_IS_LOGIT, ONE_REDUCE)
    tl.store(state_out + p_state, b_S, mask=m_kv)
    tl.store(o_BHV + i_bhv * V + o_v, b_o.to(o_BHV.dtype.element_ty), mask=m_v)
    # every thread's window reads are done before any store and before this tile counts as arrived
    tl.debug_barrier()
    _window_store(win_b, c_v, m_v, vp2, vp1, cur_v, KS)
    ticket = tickets + i_b * H + i_h
    if tl.atomic_add(ticket, 1, sem="acq_rel", scope="gpu") == (HV // H) * n_vb - 1:
        _window_store(win_b, c_qk, m_qk, kp2, kp1, cur_qk, KS)
        tl.atomic_xchg(ticket, 0, sem="relaxed", scope="gpu")


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _pick_blocks(batch: int, num_v_heads: int, V: int, device: torch.device,
                 K: int = 128) -> tuple[int, int, bool]:
    """Value-block width, warps and reduction form, by how many 64-column tiles the state holds per
    multiprocessor.

    Measured on an H200 (benchmarks/decode_sweep.py, Qwen3-Next's heads: HV 32, K = V = 128, bf16
    inputs, CUDA-graph replays over distinct states; data/2026-12-03-h200-s2/decode_sweep.json):
    16 columns, 1 warp and the one-pass reduction at batch 1 (3.21 us), 32 columns, 2 warps, one
    pass at batch 8 (10.40 us), 64 columns and 4 warps with the separate reductions from batch 32
    (36.56 / 69.39 / 134.75 / 264.50 us at 32 / 64 / 128 / 256; the one-pass form was 0.2-0.5%
    slower there). Warps scale with the tile so that the state takes 64 registers a thread (K = 256
    doubles them)."""
    bv_max = min(64, next_power_of_2(V))
    tiles = batch * num_v_heads * cdiv(V, bv_max)
    sms = _num_sms(device)
    if tiles >= 8 * sms:
        bv, one_reduce = bv_max, False
    else:
        bv, one_reduce = min(bv_max, 32 if tiles >= 2 * sms else 16), True
    return bv, max(1, min(8, next_power_of_2(K) * bv // 2048)), one_reduce


def _read_state_early(settled: bool, batch: int, num_v_heads: int, V: int, device: torch.device) -> bool:
    """Whether a step whose caller promised ``state_settled`` reads its state before the PDL wait:
    under PDL, at batches of fewer 64-column tiles than twice the multiprocessors (the 16-column
    regime of ``_pick_blocks``). Measured on an H200 (RESULTS.md, third 2026-12-04 session; graph
    replays of consecutive steps, Qwen3-Next's heads): batch 1 4.30 -> 3.18 us, batch 8 10.41 ->
    11.11, batch 32 35.78 -> 36.30, equal from 64. Programs of the next step that read early hold
    their tiles in registers while they wait, so where a step fills the card they crowd it."""
    tiles = batch * num_v_heads * cdiv(V, min(64, next_power_of_2(V)))
    return settled and pdl(device) and tiles < 2 * _num_sms(device)


def packed_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when the kernel can read it in place (last dim contiguous and, for [B, heads,
    size], the heads of a row packed: a row's stride is free), else a contiguous copy."""
    packed = t.stride(-1) == 1 or t.shape[-1] == 1
    if t.dim() == 3:
        packed = packed and (t.stride(1) == t.shape[2] or t.shape[1] == 1)
    return t if packed else t.contiguous()


def decode_into(q, k, v, g, beta, state_in, state_out, o, *, scale, use_qk_l2norm, A_log, dt_bias,
                beta_is_logit, block_v=None, num_warps=None, programs_per_sm=None, stream=False,
                stages=1, one_reduce=None, state_early=False) -> None:
    """Launch the kernel on validated tensors, writing ``o`` and ``state_out``: state and o contiguous;
    q, k, v [B, heads, size] and g, beta [B, HV] with any row (dim 0) stride, each row's heads packed
    (``packed_rows``).

    ``state_out`` may be ``state_in`` (in-place update). ``block_v``/``num_warps`` override the
    heuristic; ``programs_per_sm`` caps the grid at that many programs per multiprocessor (a
    persistent grid striding over the tiles); ``stream`` sets the state's cache hints; ``stages``
    > 1 software-pipelines the persistent loop; ``one_reduce`` forms every reduction over K (S^T k,
    S^T q and the norms) in one pass over the old state (None: the heuristic's choice). These are
    the tuning knobs of ``benchmarks/decode_sweep.py``.

    ``state_early`` (ignored with ``stages`` > 1): each program reads its state tile first, and under
    programmatic dependent launch before waiting for the preceding kernel, so that read overlaps the
    predecessor's tail. Only correct when no kernel that can still be running writes ``state_in``:
    see ``fused_recurrent_gated_delta_rule_step``'s ``state_settled``. Without PDL it only moves the
    state's load before the small ones (slower: callers pass it under PDL only)."""
    B, H, K = q.shape
    HV, V = v.shape[1], v.shape[2]
    bv, warps, one = _pick_blocks(B, HV, V, q.device, K)
    bv = block_v or bv
    warps = num_warps or warps
    one_reduce = one if one_reduce is None else one_reduce
    n_tiles = cdiv(V, bv) * B * HV
    grid = n_tiles if programs_per_sm is None else min(n_tiles, programs_per_sm * _num_sms(q.device))
    _gdn_decode_kernel[(grid,)](
        q, k, v, g, beta, A_log if A_log is not None else g, dt_bias if dt_bias is not None else g,
        state_in, state_out, o, scale, n_tiles, q.stride(0), k.stride(0), v.stride(0), g.stride(0), beta.stride(0),
        H=H, HV=HV, K=K, V=V, BK=next_power_of_2(K), BV=bv,
        USE_L2NORM=use_qk_l2norm, RAW_GATE=A_log is not None, HAS_DT_BIAS=dt_bias is not None,
        BETA_IS_LOGIT=beta_is_logit, STREAM=stream, STAGES=stages, ONE_REDUCE=one_reduce,
        num_warps=warps, STATE_EARLY=bool(state_early) and stages == 1, **pdl_launch(q.device, "gdn_decode"),
    )


@torch.library.custom_op("hybridlm::gdn_decode_step", mutates_args=())
def _decode_step_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                    beta: torch.Tensor, state: torch.Tensor, scale: float, use_qk_l2norm: bool,
                    A_log: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor],
                    beta_is_logit: bool, state_settled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v, g, beta = (packed_rows(t) for t in (q, k, v, g, beta))
    o = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    new_state = torch.empty_like(state)
    decode_into(q, k, v, g, beta, state, new_state, o, scale=scale, use_qk_l2norm=use_qk_l2norm,
                A_log=A_log, dt_bias=dt_bias, beta_is_logit=beta_is_logit,
                state_early=_read_state_early(state_settled, v.shape[0], v.shape[1], v.shape[2], v.device))
    return o, new_state


@_decode_step_op.register_fake
def _(q, k, v, g, beta, state, scale, use_qk_l2norm, A_log, dt_bias, beta_is_logit, state_settled):
    return v.new_empty(v.shape), torch.empty_like(state)


@torch.library.custom_op("hybridlm::gdn_decode_step_", mutates_args=("state",))
def _decode_step_inplace_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                            beta: torch.Tensor, state: torch.Tensor, scale: float,
                            use_qk_l2norm: bool, A_log: Optional[torch.Tensor],
                            dt_bias: Optional[torch.Tensor], beta_is_logit: bool,
                            state_settled: bool) -> torch.Tensor:
    q, k, v, g, beta = (packed_rows(t) for t in (q, k, v, g, beta))
    o = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    decode_into(q, k, v, g, beta, state, state, o, scale=scale, use_qk_l2norm=use_qk_l2norm,
                A_log=A_log, dt_bias=dt_bias, beta_is_logit=beta_is_logit,
                state_early=_read_state_early(state_settled, v.shape[0], v.shape[1], v.shape[2], v.device))
    return o


@_decode_step_inplace_op.register_fake
def _(q, k, v, g, beta, state, scale, use_qk_l2norm, A_log, dt_bias, beta_is_logit, state_settled):
    return v.new_empty(v.shape)


def _check_shape(name: str, t, shape: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_inputs(q, k, v, g, beta, state, A_log, dt_bias, inplace) -> None:
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"q must be a 3-D tensor [B, H, K], got {getattr(q, 'shape', type(q))}")
    if not isinstance(v, torch.Tensor) or v.dim() != 3:
        raise ValueError(f"v must be a 3-D tensor [B, HV, V], got {getattr(v, 'shape', type(v))}")
    B, H, K = q.shape
    HV, V = v.shape[1], v.shape[2]
    if v.shape[0] != B:
        raise ValueError(f"v must have batch {B} like q, got {v.shape[0]}")
    if H == 0 or HV % H != 0:
        raise ValueError(f"v's head count HV={HV} must be a multiple of q's H={H}")
    _check_shape("q", q, (B, H, K))
    _check_shape("k", k, (B, H, K))
    _check_shape("v", v, (B, HV, V))
    _check_shape("g", g, (B, HV))
    _check_shape("beta", beta, (B, HV))
    _check_shape("state", state, (B, HV, K, V))
    if k.dtype != q.dtype:  # the kernel loads q and k as one tile
        raise TypeError(f"k must have q's dtype {q.dtype}, got {k.dtype}")
    if state.dtype != torch.float32:
        raise TypeError(f"state must be float32, got {state.dtype}")
    if inplace and not state.is_contiguous():
        raise ValueError("state must be contiguous when inplace=True")
    if dt_bias is not None and A_log is None:
        raise ValueError("dt_bias is only used with A_log (the fused gate); pass A_log too")
    if A_log is not None:
        _check_shape("A_log", A_log, (HV,))
    if dt_bias is not None:
        _check_shape("dt_bias", dt_bias, (HV,))
    for name, t in (("k", k), ("v", v), ("g", g), ("beta", beta), ("state", state),
                    ("A_log", A_log), ("dt_bias", dt_bias)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, expected q's device {q.device}")


def fused_recurrent_gated_delta_rule_step(q, k, v, g, beta, state, *, scale=None, use_qk_l2norm=False,
                                          inplace=False, A_log=None, dt_bias=None, beta_is_logit=False,
                                          state_settled=False):
    """One decode step of the gated delta rule for every sequence of a batch.

    Args:
        q, k: [B, H, K] float32/bf16/fp16 queries and keys of the new token.
        v: [B, HV, V] values (HV a multiple of H; value head i reads q/k head i // (HV // H)).
        g: [B, HV] log-decay (<= 0), any float dtype. With ``A_log`` given, ``g`` is instead the raw
            gate input ``a`` and the kernel computes g = -exp(A_log) * softplus(a + dt_bias).
        beta: [B, HV] write strength in (0, 1); with ``beta_is_logit=True`` its logit (the kernel
            applies the sigmoid).
        state: [B, HV, K, V] float32 recurrent state before the token.
        scale: output scale, default K ** -0.5.
        use_qk_l2norm: l2-normalise q and k in the kernel (x / sqrt(sum x^2 + 1e-6)).
        inplace: write the new state into ``state`` (contiguous) instead of a new tensor.
        A_log, dt_bias: [HV] float gate parameters (dt_bias optional, needs A_log).
        beta_is_logit: see ``beta``.
        state_settled: a promise that every kernel that wrote ``state`` has finished before the kernel
            launched just before this call started, i.e. a kernel launched without programmatic
            dependent launch (PDL), which waits for all earlier work, runs between the state's last
            write and this call. A static decode step gives it: it embeds its tokens (a plain launch)
            before its first layer. Under PDL, at small batch (``_read_state_early``), each program
            then reads its state before waiting for the preceding kernel, overlapping that read with
            the predecessor's tail (batch 1: 4.30 -> 3.18 us on an H200). Leave it False
            when this call directly follows the decode step that wrote ``state`` (a loop of steps):
            there the read could see the state before the earlier step's write.

    Returns:
        (o, new_state): o [B, HV, V] in v's dtype; new_state [B, HV, K, V] float32 (``state`` itself
        when inplace). All math runs in float32.

    Example (CUDA tensors; CPU ones only under TRITON_INTERPRET=1):
        >>> B, H, HV, K, V = 2, 2, 4, 16, 16
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
        >>> q, k = torch.randn(B, H, K, device=dev), torch.randn(B, H, K, device=dev)
        >>> v, state = torch.randn(B, HV, V, device=dev), torch.zeros(B, HV, K, V, device=dev)
        >>> g, beta = -torch.rand(B, HV, device=dev), torch.rand(B, HV, device=dev)
        >>> o, state = fused_recurrent_gated_delta_rule_step(q, k, v, g, beta, state, use_qk_l2norm=True)
    """
    _check_inputs(q, k, v, g, beta, state, A_log, dt_bias, inplace)
    if not isinstance(state_settled, bool):
        raise TypeError(f"state_settled must be a bool, got {type(state_settled).__name__}")
    check_kernel_device("q", q)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    # rows read in place where their heads are packed (views of the layer's projections and conv
    # output: under compile a .contiguous() here was a copy kernel per layer and step)
    args = (q, k, v, g, beta)
    gate = (None if A_log is None else A_log.contiguous(),
            None if dt_bias is None else dt_bias.contiguous())
    if not torch.compiler.is_compiling():
        # Eager calls launch directly: the custom-op dispatch costs ~35 us of host time per call
        # (measured on the H100 host), more than the kernel itself at batch <= 32.
        state = state if inplace else state.contiguous()
        args = tuple(packed_rows(t) for t in args)
        o = torch.empty(v.shape, device=v.device, dtype=v.dtype)
        new_state = state if inplace else torch.empty_like(state)
        decode_into(*args, state, new_state, o, scale=scale, use_qk_l2norm=bool(use_qk_l2norm),
                    A_log=gate[0], dt_bias=gate[1], beta_is_logit=bool(beta_is_logit),
                    state_early=_read_state_early(state_settled, v.shape[0], v.shape[1], v.shape[2], v.device))
        return o, new_state
    if inplace:
        o = _decode_step_inplace_op(*args, state, scale, bool(use_qk_l2norm), *gate, bool(beta_is_logit),
                                    state_settled)
        return o, state
    return _decode_step_op(*args, state.contiguous(), scale, bool(use_qk_l2norm), *gate,
                           bool(beta_is_logit), state_settled)


def conv_decode_into(x_BC, window_BCW, conv_CK, tickets, g, beta, state, o, *, num_heads, scale, use_qk_l2norm,
                     A_log, dt_bias, beta_is_logit, state_early=False) -> None:
    """Launch the conv + decode kernel on validated tensors: x_BC [B, C] (last dim contiguous), the
    window [B, C, KS - 1] (each row a contiguous [C, KS - 1]), conv_CK a contiguous [C, KS], tickets
    int32 zeros (>= B * num_heads), state float32 contiguous [B, HV, K, V], updated in place, with the
    window; o [B, HV, V] contiguous."""
    B, HV, K, V = state.shape
    bv, warps, one_reduce = _pick_blocks(B, HV, V, x_BC.device, K)
    _gdn_conv_decode_kernel[(cdiv(V, bv) * B * HV,)](
        x_BC, window_BCW, conv_CK, tickets, g, beta, A_log if A_log is not None else g,
        dt_bias if dt_bias is not None else g, state, state, o, scale, x_BC.stride(0), window_BCW.stride(0),
        g.stride(0), beta.stride(0), H=num_heads, HV=HV, K=K, V=V, BK=next_power_of_2(K), BV=bv, KS=conv_CK.shape[1],
        USE_L2NORM=use_qk_l2norm, RAW_GATE=A_log is not None, HAS_DT_BIAS=dt_bias is not None,
        BETA_IS_LOGIT=beta_is_logit, ONE_REDUCE=one_reduce, STATE_EARLY=bool(state_early), num_warps=warps,
        **pdl_launch(x_BC.device, "gdn_conv_decode"))


@torch.library.custom_op("hybridlm::gdn_conv_decode_step_", mutates_args=("window_BCW", "tickets", "state"))
def _conv_decode_op(x_BC: torch.Tensor, window_BCW: torch.Tensor, conv_CK: torch.Tensor, tickets: torch.Tensor,
                    g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor, num_heads: int, scale: float,
                    use_qk_l2norm: bool, A_log: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor],
                    beta_is_logit: bool, state_settled: bool) -> torch.Tensor:
    B, HV, K, V = state.shape
    o = torch.empty(B, HV, V, device=x_BC.device, dtype=x_BC.dtype)
    conv_decode_into(x_BC, window_BCW, conv_CK, tickets, g, beta, state, o, num_heads=num_heads, scale=scale,
                     use_qk_l2norm=use_qk_l2norm, A_log=A_log, dt_bias=dt_bias, beta_is_logit=beta_is_logit,
                     state_early=_read_state_early(state_settled, B, HV, V, x_BC.device))
    return o


@_conv_decode_op.register_fake
def _(x_BC, window_BCW, conv_CK, tickets, g, beta, state, num_heads, scale, use_qk_l2norm, A_log, dt_bias,
      beta_is_logit, state_settled):
    B, HV, K, V = state.shape
    return x_BC.new_empty(B, HV, V)


def conv_gated_delta_rule_step(x_BC, conv_window, conv_weight, tickets, g, beta, state, *, num_heads, scale=None,
                               use_qk_l2norm=False, A_log=None, dt_bias=None, beta_is_logit=False,
                               state_settled=False):
    """One decode step of Gated DeltaNet's short conv (depthwise, causal, then SiLU) and the gated delta
    rule in one kernel, state and window updated in place; returns o [B, HV, V] in x's dtype.

    The same arithmetic as ``ops.triton.causal_conv_rows`` (its window updated) followed by
    :func:`fused_recurrent_gated_delta_rule_step` on the conv's q, k, v columns (``inplace=True``), with
    one launch fewer: at batch 1 a decode step is a chain of small dependent kernels, each adding its
    latency.

    Args:
        x_BC: [B, C] the in-projection's q, k, v columns of the token, C = 2 H K + HV V (any row stride,
            last dim contiguous: a slice of a packed projection output).
        conv_window: [B, C, KS - 1] the inputs before the token (any float dtype), each row a contiguous
            [C, KS - 1]; afterwards it holds the last KS - 1 inputs.
        conv_weight: [C, 1, KS] or [C, KS] depthwise filters, KS from 2 to 4.
        tickets: int32 zeros of at least B * num_heads elements, on x's device: counters the kernel uses
            to let the last reader of a key head's window update it, left at zero. Calls sharing them must
            not run concurrently; a layer keeps its own.
        g, beta, state, scale, use_qk_l2norm, A_log, dt_bias, beta_is_logit, state_settled: as in
            :func:`fused_recurrent_gated_delta_rule_step`; ``state`` float32 contiguous [B, HV, K, V]
            (HV, K, V from it), updated in place.
        num_heads: H, the query/key heads (HV a multiple of it).

    Example (CUDA tensors; CPU ones only under TRITON_INTERPRET=1):
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
        >>> B, H, HV, K, V = 1, 2, 4, 16, 16
        >>> x, window = torch.randn(B, 2 * H * K + HV * V, device=dev), torch.zeros(B, 2 * H * K + HV * V, 3, device=dev)
        >>> state, tickets = torch.zeros(B, HV, K, V, device=dev), torch.zeros(B * H, dtype=torch.int32, device=dev)
        >>> o = conv_gated_delta_rule_step(x, window, torch.randn(2 * H * K + HV * V, 4, device=dev), tickets,
        ...                                -torch.rand(B, HV, device=dev), torch.rand(B, HV, device=dev), state,
        ...                                num_heads=H, use_qk_l2norm=True)
    """
    if not isinstance(state, torch.Tensor) or state.dim() != 4:
        raise ValueError(f"state must be a 4-D tensor [B, HV, K, V], got {getattr(state, 'shape', type(state))}")
    B, HV, K, V = state.shape
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or HV % num_heads:
        raise ValueError(f"num_heads must be a positive int dividing HV = {HV} (from state), got {num_heads!r}")
    H = num_heads
    C = 2 * H * K + HV * V
    if not isinstance(x_BC, torch.Tensor) or tuple(x_BC.shape) != (B, C):
        raise ValueError(f"x_BC must be [B, C] = {(B, C)} (C = 2 H K + HV V from num_heads and state), got "
                         f"{tuple(getattr(x_BC, 'shape', ()))}")
    if x_BC.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"x_BC must be float32, bfloat16 or float16, got {x_BC.dtype}")
    w = conv_weight.reshape(conv_weight.shape[0], -1) if conv_weight.dim() == 3 else conv_weight
    if w.dim() != 2 or w.shape[0] != C or not 2 <= w.shape[1] <= 4:
        raise ValueError(f"conv_weight must be [C, 1, KS] or [C, KS] with C = {C} and KS from 2 to 4, got "
                         f"{tuple(conv_weight.shape)}")
    KS = w.shape[1]
    if (not isinstance(conv_window, torch.Tensor) or tuple(conv_window.shape) != (B, C, KS - 1)
            or not conv_window.is_floating_point()):
        raise ValueError(f"conv_window must be a float tensor [B, C, KS - 1] = {(B, C, KS - 1)}, got "
                         f"{tuple(getattr(conv_window, 'shape', ()))}")
    if not window_fits(conv_window):
        raise ValueError(f"conv_window: each batch row must be a contiguous [C, KS - 1], got strides {conv_window.stride()}")
    if (not isinstance(tickets, torch.Tensor) or tickets.dtype != torch.int32 or tickets.dim() != 1
            or tickets.numel() < B * H or not tickets.is_contiguous()):
        raise ValueError(f"tickets must be a contiguous 1-D int32 tensor of at least B * num_heads = {B * H} zeros, "
                         f"got {getattr(tickets, 'dtype', type(tickets))} {tuple(getattr(tickets, 'shape', ()))}")
    if not state.is_contiguous():
        raise ValueError("state must be contiguous (it is updated in place)")
    _check_inputs(x_BC.new_empty(B, H, K), x_BC.new_empty(B, H, K), x_BC.new_empty(B, HV, V), g, beta, state, A_log,
                  dt_bias, True)
    for name, t in (("conv_window", conv_window), ("conv_weight", conv_weight), ("tickets", tickets)):
        if t.device != x_BC.device:
            raise ValueError(f"{name} is on {t.device}, expected x_BC's device {x_BC.device}")
    if not isinstance(state_settled, bool):
        raise TypeError(f"state_settled must be a bool, got {type(state_settled).__name__}")
    check_kernel_device("x_BC", x_BC)
    scale = K ** -0.5 if scale is None else float(scale)
    if x_BC.stride(1) != 1:
        x_BC = x_BC.contiguous()
    g, beta = packed_rows(g), packed_rows(beta)
    w = w.contiguous()
    gate = (None if A_log is None else A_log.contiguous(), None if dt_bias is None else dt_bias.contiguous())
    if not torch.compiler.is_compiling():
        o = torch.empty(B, HV, V, device=x_BC.device, dtype=x_BC.dtype)
        conv_decode_into(x_BC, conv_window, w, tickets, g, beta, state, o, num_heads=H, scale=scale,
                         use_qk_l2norm=bool(use_qk_l2norm), A_log=gate[0], dt_bias=gate[1],
                         beta_is_logit=bool(beta_is_logit),
                         state_early=_read_state_early(state_settled, B, HV, V, x_BC.device))
        return o
    return _conv_decode_op(x_BC, conv_window, w, tickets, g, beta, state, H, scale, bool(use_qk_l2norm), *gate,
                           bool(beta_is_logit), state_settled)
