"""Triton sparse-MoE decode: each token's K routed SwiGLU experts, reading only those experts' weights.

Legend: N tokens, K experts per token, E experts, D hidden size, I expert intermediate size.
Semantics as :func:`hybridlm.ops.moe_experts`; weights stacked as ``MoE.packed_experts()`` gives them
(nn.Linear's weights one expert after another: gate, up [E, I, D], down [E, D, I]), so every weight
row a product reads is contiguous.

Decode multiplies a few token vectors by a few experts' matrices: a matrix-vector product bound by
the weight bytes. Two kernels, no host sync, no atomics and no data-dependent shape (a CUDA graph
captures them):

1. grid (N * K, cdiv(I, BLOCK_I)): a program loads its slot's expert index, streams BLOCK_I rows of
   that expert's gate and up matrices along D in BLOCK_D columns (coalesced: D is contiguous),
   accumulates both partial GEMVs in float32 and writes h = weight * silu(gate x) * up x to float32
   scratch h [N, K, I] (the combine weight folded in here, once per row).
2. grid (N, cdiv(D, BLOCK_D)): a program owns BLOCK_D output columns of one token. Those are
   BLOCK_D rows of every routed expert's down matrix ([D, I], I contiguous): it streams them in
   BLOCK_I-wide pieces, expert after expert, against the token's h rows, sums over the K experts in
   registers in a fixed order, and writes the token's output block in x's dtype. A shared expert
   (optional: its gated inner activations [N, S] and down weight [D, S]) is one more row block in the
   same sum, so its down product needs no kernel and no add of its own; given as its gate and up
   projections (and a sigmoid-gate logit), the kernel forms its inner activations as it reads them.

The previous down kernel read the down weights transposed ([E, I, D], 256-byte row pieces 4 KB
apart) into float32 partial rows that a third kernel summed: 9.9 + 1.7 us a layer for 21 MB at
Qwen3-Next scale on an H200, half the copy rate; the whole layer's experts went from 26.50 to
21.80 us (RESULTS.md, third 12-03 session).

Block sizes: kernel 1 narrows BLOCK_I until the grid holds several programs per multiprocessor at
the shape; kernel 2 reads rows in pieces of up to 512 columns (1 KB of a 16-bit row), BLOCK_D rows
at a time (see :func:`pick_blocks`). At Qwen3-Next scale (D 2048, I 512, K 10, N = 1 on 132 SMs)
kernel 1 runs 10 x 64 programs of 8 x 256 tiles and kernel 2 runs 256 programs of 8 x 512 tiles.
Offsets are int64 (E * I * D passes 2**31 in large models).

Registered with ``torch.library`` (``hybridlm::moe_experts_decode``) so ``torch.compile(fullgraph=True)``
traces through it.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from hybridlm.ops._checks import check_kernel_device, env_switch
from hybridlm.ops.moe_decode import check_moe_experts, shared_inner
from hybridlm.ops.moe_route import KERNEL_MAX_EXPERTS, check_route
from hybridlm.ops.triton.decode import _num_sms  # multiprocessor count, cached per device
from hybridlm.ops.triton.moe_route import EMPTY, route_row
from hybridlm.ops.triton.utils import cdiv, next_power_of_2, pdl_launch, pdl_start, pdl_trigger, pdl_wait

# Programs each kernel should give every multiprocessor (latency hiding wants several weight loads in
# flight per SM); the block sizes shrink until the grid reaches this many, or their floor.
PROGRAMS_PER_SM = 4
TILE = 4096  # elements of a weight tile per loop step (16 per thread at 4 warps)
# Software-pipeline stages of both loops from this many tokens (below: a plain gate/up loop and a
# DOWN_STAGES-deep down loop). Measured on an H200 (benchmarks/experiments/moe_decode_stages.py, D 2048,
# I 512, top 10, bf16): with 32 experts, 4 tokens 61.4 -> 54.2 us a layer at 3 stages (the transposed
# down kernel of the second 12-03 session); with 512 experts, 16 tokens 222.6 -> 205.5 us and 48 tokens
# 570.2 -> 520.4 us at (3, 3). The row-dot down kernel (third 12-03 session, 32 experts): at 1 token
# 23.33 us with a plain loop, 21.80 with 4 stages (8-row tiles); at 4 tokens 53.06 us at (3, 3) with
# 8-row tiles, 49.24 with 16-row tiles.
PIPELINE_FROM_TOKENS = 4
PIPELINE_STAGES = 3
DOWN_STAGES = 4
# The down kernel loads a shared expert's rows before its PDL wait where they are one row piece
# (HYBRIDLM_MOE_SHARED_PRELOAD=1).
SHARED_PRELOAD = env_switch("HYBRIDLM_MOE_SHARED_PRELOAD", "the shared rows loaded after the wait",
                            "before it")


@triton.jit
def _gate_up_tile(x_ND, gate_EID, up_EID, h_NKI, i_nk, i_n, i_e, w, i_i, I, D, s_xn, s_ge, s_gi, s_ue, s_ui,
                  BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr):
    # h[i_nk, i-block] = w * silu(gate_e x_n) * up_e x_n over BLOCK_I rows of expert i_e
    o_i = i_i * BLOCK_I + tl.arange(0, BLOCK_I)
    m_i = o_i < I
    p_gate = gate_EID + i_e * s_ge + o_i.to(tl.int64)[:, None] * s_gi
    p_up = up_EID + i_e * s_ue + o_i.to(tl.int64)[:, None] * s_ui
    acc_gate = tl.zeros([BLOCK_I, BLOCK_D], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_I, BLOCK_D], dtype=tl.float32)
    # STAGES > 1: the next tiles' loads are issued (copied into shared memory asynchronously) while
    # this one is summed; a plain loop waits for every tile (a loop whose loads feed no tensor-core
    # product is pipelined only when given num_stages)
    for d0 in tl.range(0, D, BLOCK_D, num_stages=STAGES):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        m_id = m_i[:, None] & m_d[None, :]
        b_gate = tl.load(p_gate + o_d[None, :], mask=m_id, other=0.0).to(tl.float32)
        b_up = tl.load(p_up + o_d[None, :], mask=m_id, other=0.0).to(tl.float32)
        b_x = tl.load(x_ND + i_n * s_xn + o_d, mask=m_d, other=0.0).to(tl.float32)
        acc_gate += b_gate * b_x[None, :]
        acc_up += b_up * b_x[None, :]
    g = tl.sum(acc_gate, axis=1)
    u = tl.sum(acc_up, axis=1)
    tl.store(h_NKI + i_nk * I + o_i, w * (g * tl.sigmoid(g)) * u, mask=m_i)


@triton.jit
def _gate_up_kernel(x_ND, experts_NK, weights_NK, gate_EID, up_EID, h_NKI, K, I, D,
                    s_xn, s_ge, s_gi, s_ue, s_ui,
                    BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_start(USE_PDL)
    i_nk = tl.program_id(0).to(tl.int64)
    i_n = i_nk // K
    i_e = tl.load(experts_NK + i_nk).to(tl.int64)
    w = tl.load(weights_NK + i_nk).to(tl.float32)
    _gate_up_tile(x_ND, gate_EID, up_EID, h_NKI, i_nk, i_n, i_e, w, tl.program_id(1), I, D, s_xn, s_ge, s_gi,
                  s_ue, s_ui, BLOCK_I, BLOCK_D, STAGES)


@triton.jit
def _shared_h(hs_NS, us_NS, i_n, o_i, m_i, scale, s_hn, s_un, SWIGLU: tl.constexpr):
    # a shared expert's inner activations over columns o_i of token i_n, in float32
    b_h = tl.load(hs_NS + i_n * s_hn + o_i, mask=m_i, other=0.0).to(tl.float32)
    if SWIGLU:  # hs is the gate projection: the inner activations formed here, in float32
        b_u = tl.load(us_NS + i_n * s_un + o_i, mask=m_i, other=0.0).to(tl.float32)
        b_h = b_h * tl.sigmoid(b_h) * b_u * scale
    return b_h


@triton.jit
def _shared_scale(gs_N, i_n, s_gn, GATED: tl.constexpr):
    scale = 1.0
    if GATED:  # the shared expert's sigmoid gate, one factor per token
        scale = tl.sigmoid(tl.load(gs_N + i_n * s_gn).to(tl.float32))
    return scale


@triton.jit
def _down_shared(hs_NS, ws_DS, us_NS, gs_N, i_n, o_d, m_d, S, s_hn, s_wd, s_un, s_gn,
                 SWIGLU: tl.constexpr, GATED: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_I: tl.constexpr,
                 STAGES: tl.constexpr):
    # a shared expert's rows (ws [D, S] against hs [N, S]) as a [BLOCK_D, BLOCK_I] float32 partial tile
    acc = tl.zeros([BLOCK_D, BLOCK_I], dtype=tl.float32)
    row_s = o_d.to(tl.int64)[:, None] * s_wd
    scale = _shared_scale(gs_N, i_n, s_gn, GATED)
    for i0 in tl.range(0, S, BLOCK_I, num_stages=STAGES):
        o_i = i0 + tl.arange(0, BLOCK_I)
        m_i = o_i < S
        b_h = _shared_h(hs_NS, us_NS, i_n, o_i, m_i, scale, s_hn, s_un, SWIGLU)
        b_w = tl.load(ws_DS + row_s + o_i[None, :], mask=m_d[:, None] & m_i[None, :], other=0.0).to(tl.float32)
        acc += b_w * b_h[None, :]
    return acc


@triton.jit
def _down_routed(acc, h_NKI, experts_NK, down_EDI, out_ND, i_n, o_d, m_d, K, I, s_de, s_dd, s_on,
                 BLOCK_I: tl.constexpr, STAGES: tl.constexpr, BYPASS_L1: tl.constexpr):
    # out[n, d-block] = acc + sum over the token's K slots of down_e[d-block, :] . h[n, slot, :], the
    # slots' rows streamed one after another (BLOCK_I columns a step, contiguous) into the one float32
    # tile, reduced once at the end: a fixed order, no partial rows. BYPASS_L1: h and the expert ids
    # were written by other programs of the same launch (the fused kernel): read them from L2.
    n_i = tl.cdiv(I, BLOCK_I)
    row_d = o_d.to(tl.int64)[:, None] * s_dd
    for t in tl.range(0, K * n_i, num_stages=STAGES):
        j = t // n_i
        o_i = (t - j * n_i) * BLOCK_I + tl.arange(0, BLOCK_I)
        m_i = o_i < I
        if BYPASS_L1:
            i_e = tl.load(experts_NK + i_n * K + j, cache_modifier=".cg").to(tl.int64)
            b_h = tl.load(h_NKI + (i_n * K + j) * I + o_i, mask=m_i, other=0.0, cache_modifier=".cg")
        else:
            i_e = tl.load(experts_NK + i_n * K + j).to(tl.int64)
            b_h = tl.load(h_NKI + (i_n * K + j) * I + o_i, mask=m_i, other=0.0)
        b_w = tl.load(down_EDI + i_e * s_de + row_d + o_i[None, :], mask=m_d[:, None] & m_i[None, :],
                      other=0.0).to(tl.float32)
        acc += b_w * b_h[None, :]
    tl.store(out_ND + i_n * s_on + o_d, tl.sum(acc, axis=1).to(out_ND.dtype.element_ty), mask=m_d)


@triton.jit
def _down_kernel(h_NKI, experts_NK, down_EDI, out_ND, hs_NS, ws_DS, us_NS, gs_N, K, I, D, S, s_de, s_dd, s_on,
                 s_hn, s_wd, s_un, s_gn, HAS_SHARED: tl.constexpr, SWIGLU: tl.constexpr, GATED: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_I: tl.constexpr, STAGES: tl.constexpr, SHARED_PRELOAD: tl.constexpr,
                 USE_PDL: tl.constexpr):
    # program (token, d-block): the shared expert's rows (if any) first, then the routed experts'.
    # SHARED_PRELOAD (the shared expert's rows one BLOCK_I piece): they are loaded before waiting for
    # the predecessor (weights do not depend on it), and summed as _down_shared sums them (same bits).
    pdl_trigger(USE_PDL)
    i_n = tl.program_id(0).to(tl.int64)
    o_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    if SHARED_PRELOAD:
        o_s = tl.arange(0, BLOCK_I)
        m_s = o_s < S
        w_s = tl.load(ws_DS + o_d.to(tl.int64)[:, None] * s_wd + o_s[None, :], mask=m_d[:, None] & m_s[None, :],
                      other=0.0)
    pdl_wait(USE_PDL)
    if SHARED_PRELOAD:
        acc = tl.zeros([BLOCK_D, BLOCK_I], dtype=tl.float32)
        b_h = _shared_h(hs_NS, us_NS, i_n, o_s, m_s, _shared_scale(gs_N, i_n, s_gn, GATED), s_hn, s_un, SWIGLU)
        acc += w_s.to(tl.float32) * b_h[None, :]
    elif HAS_SHARED:
        acc = _down_shared(hs_NS, ws_DS, us_NS, gs_N, i_n, o_d, m_d, S, s_hn, s_wd, s_un, s_gn, SWIGLU, GATED,
                           BLOCK_D, BLOCK_I, STAGES)
    else:
        acc = tl.zeros([BLOCK_D, BLOCK_I], dtype=tl.float32)
    _down_routed(acc, h_NKI, experts_NK, down_EDI, out_ND, i_n, o_d, m_d, K, I, s_de, s_dd, s_on, BLOCK_I, STAGES,
                 False)


@triton.jit
def _grid_arrive_and_wait(sync, P):
    # A barrier across the launch's P programs (all resident at once: see fused_programs). Every
    # thread's stores come before the program's arrival (the CTA barrier, then a release at GPU
    # scope), and its reads after it after everyone's (an acquire, then the CTA barrier). The
    # scalar atomics run on one thread of the program.
    tl.debug_barrier()
    tl.atomic_add(sync, 1, sem="release", scope="gpu")
    while tl.atomic_add(sync, 0, sem="acquire", scope="gpu") < P:
        pass
    tl.debug_barrier()


@triton.jit
def _grid_leave(sync, P):
    # After a program's last read behind the barrier: the last of the P programs to get here zeroes
    # both counters (every other one has passed its wait by then), so the next launch starts from 0.
    tl.debug_barrier()
    if tl.atomic_add(sync + 1, 1, sem="acq_rel", scope="gpu") == P - 1:
        tl.atomic_xchg(sync, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(sync + 1, 0, sem="relaxed", scope="gpu")


@triton.jit
def _fused_kernel(x_ND, logits_NE, bias_E, gate_EID, up_EID, down_EDI, hs_NS, ws_DS, us_NS, gs_N,
                  h_NKI, experts_NK, sync, out_ND, N, E, I, D, S, scaling,
                  s_xn, s_ln, s_ge, s_gi, s_ue, s_ui, s_de, s_dd, s_on, s_hn, s_wd, s_un, s_gn,
                  K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, SOFTMAX: tl.constexpr,
                  HAS_BIAS: tl.constexpr, NORM: tl.constexpr, EMPTY: tl.constexpr,
                  HAS_SHARED: tl.constexpr, SWIGLU: tl.constexpr, GATED: tl.constexpr,
                  BI1: tl.constexpr, BD1: tl.constexpr, BI2: tl.constexpr, BD2: tl.constexpr,
                  STAGES1: tl.constexpr, STAGES2: tl.constexpr, PHASES: tl.constexpr, USE_PDL: tl.constexpr):
    # Routing, gate/up and down of a MoE decode in one launch of P programs (a persistent grid):
    # phase 1 strides over the (token, slot, row block) tiles of gate/up, each program routing a
    # token itself (the shared ``route_row``: the routing kernel's choice, bit for bit) when its tile's
    # token changes, and writes h and the expert ids; phase 2 strides over the (token, d-block) tiles
    # of down. PHASES 3: both, with a barrier between them; a program forms its first down tile's
    # shared-expert rows before the barrier (they need nothing from phase 1), so those bytes stream
    # while the slowest programs finish gate/up. PHASES 1 or 2: one phase (two launches, no barrier:
    # the CPU interpreter runs programs one after another, where a barrier cannot work).
    pdl_start(USE_PDL)
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    if PHASES % 2 == 1:
        n_ib = tl.cdiv(I, BI1)
        per_token = K * n_ib
        o_k = tl.arange(0, BLOCK_K)
        cur = pid * 0 - 1
        w_k = tl.zeros([BLOCK_K], dtype=tl.float32)
        e_k = tl.zeros([BLOCK_K], dtype=tl.int32)
        for item in range(pid, N * per_token, P):
            i_n = item // per_token
            j = (item - i_n * per_token) // n_ib
            i_i = item - i_n * per_token - j * n_ib
            if i_n != cur:
                w_k, e_k = route_row(logits_NE + i_n.to(tl.int64) * s_ln, bias_E, E, scaling, K, BLOCK_E, BLOCK_K,
                                     SOFTMAX, HAS_BIAS, NORM, EMPTY)
                cur = i_n
            i_e = tl.sum(tl.where(o_k == j, e_k, 0), 0)
            w = tl.sum(tl.where(o_k == j, w_k, 0.0), 0)
            i_nk = i_n.to(tl.int64) * K + j
            if i_i == 0:
                tl.store(experts_NK + i_nk, i_e)
            _gate_up_tile(x_ND, gate_EID, up_EID, h_NKI, i_nk, i_n.to(tl.int64), i_e.to(tl.int64), w, i_i, I, D,
                          s_xn, s_ge, s_gi, s_ue, s_ui, BI1, BD1, STAGES1)
    if PHASES >= 2:
        n_db = tl.cdiv(D, BD2)
        first = tl.zeros([BD2, BI2], dtype=tl.float32)
        if HAS_SHARED:
            if pid < N * n_db:
                i_n = pid // n_db
                o_d = (pid - i_n * n_db) * BD2 + tl.arange(0, BD2)
                first = _down_shared(hs_NS, ws_DS, us_NS, gs_N, i_n.to(tl.int64), o_d, o_d < D, S, s_hn, s_wd,
                                     s_un, s_gn, SWIGLU, GATED, BD2, BI2, STAGES2)
        if PHASES == 3:
            _grid_arrive_and_wait(sync, P)
        for item in range(pid, N * n_db, P):
            i_n = item // n_db
            o_d = (item - i_n * n_db) * BD2 + tl.arange(0, BD2)
            m_d = o_d < D
            acc = first
            if HAS_SHARED:
                if item != pid:
                    acc = _down_shared(hs_NS, ws_DS, us_NS, gs_N, i_n.to(tl.int64), o_d, m_d, S, s_hn, s_wd, s_un,
                                       s_gn, SWIGLU, GATED, BD2, BI2, STAGES2)
            else:
                acc = tl.zeros([BD2, BI2], dtype=tl.float32)
            _down_routed(acc, h_NKI, experts_NK, down_EDI, out_ND, i_n.to(tl.int64), o_d, m_d, K, I, s_de, s_dd,
                         s_on, BI2, STAGES2, PHASES == 3)
        if PHASES == 3:
            _grid_leave(sync, P)


def pick_blocks(N: int, K: int, I: int, D: int, num_sms: int) -> tuple[int, int, int, int]:
    """(gate/up BLOCK_I, gate/up BLOCK_D, down BLOCK_I, down BLOCK_D) for the shape.

    Gate/up: rows BLOCK_D = 256 wide (fewer for a small D) and BLOCK_I from 64 (at most a TILE-element
    tile) down to 8 until N * K * cdiv(I, BLOCK_I) reaches PROGRAMS_PER_SM programs per SM. Down:
    row pieces BLOCK_I = 512 wide (fewer for a small I) and BLOCK_D the rows of a TILE-element tile
    (two tiles from PIPELINE_FROM_TOKENS tokens), down to 2 while N * cdiv(D, BLOCK_D) is under one
    program per SM. On the H200 at batch 1 the down loop's depth mattered, not its grid: 4 stages
    gave 21.8-21.9 us at 4, 8 and 16 rows (512 down to 128 programs), 23.8 at 2 rows.
    """
    bd1 = max(16, min(256, next_power_of_2(D)))
    # at most a TILE-element tile: its two float32 accumulators stay in registers (64 x 256 spilled a
    # 2.4 KB stack on sm_90, and 16 tokens x 10 experts took 2.5 ms a layer on the H200)
    bi1 = max(8, min(64, TILE // bd1, next_power_of_2(I)))
    while bi1 > 8 and N * K * cdiv(I, bi1) < PROGRAMS_PER_SM * num_sms:
        bi1 //= 2
    bi2 = max(16, min(512, next_power_of_2(I)))
    tile = 2 * TILE if N >= PIPELINE_FROM_TOKENS else TILE
    bd2 = max(2, min(tile // bi2, next_power_of_2(D)))
    while bd2 > 2 and N * cdiv(D, bd2) < num_sms:
        bd2 //= 2
    return bi1, bd1, bi2, bd2


def pick_stages(N: int) -> tuple[int, int]:
    """(gate/up stages, down stages) of the loops' software pipelines for N tokens."""
    return (PIPELINE_STAGES, PIPELINE_STAGES) if N >= PIPELINE_FROM_TOKENS else (1, DOWN_STAGES)


def moe_experts_into(x_ND, experts_NK, weights_NK, gate_EID, up_EID, down_EDI, out_ND, *,
                     shared_h_NS=None, shared_down_DS=None, shared_up_NS=None, shared_gate_N=None,
                     blocks: Optional[tuple[int, int, int, int]] = None, num_warps: int = 4,
                     stages: Optional[tuple[int, int]] = None, down_warps: Optional[int] = None,
                     shared_preload: Optional[bool] = None) -> None:
    """Launch the two kernels on validated tensors, writing ``out_ND`` [N, D].

    x_ND, experts_NK, weights_NK and out_ND must be contiguous; the weight stacks, shared_h_NS and
    shared_down_DS may have any strides with a contiguous last dim (D for gate and up, I for down,
    S for the shared expert's). ``blocks`` overrides :func:`pick_blocks`, ``stages``
    :func:`pick_stages` and ``down_warps`` the down kernel's warps (``num_warps``; tests, tuning);
    ``shared_preload`` (default SHARED_PRELOAD) has the down kernel load a shared expert's rows before
    its PDL wait where they are one row piece."""
    N, D = x_ND.shape
    K = experts_NK.shape[1]
    I = gate_EID.shape[1]
    if N == 0:
        return
    shared = shared_h_NS is not None and shared_h_NS.shape[1] > 0
    if K == 0 or I == 0:
        if shared:  # only the shared expert (I = 0: the routed experts add nothing)
            h_NS = shared_inner(shared_h_NS, shared_up_NS, shared_gate_N, torch.float32).to(x_ND.dtype)
            torch.matmul(h_NS, shared_down_DS.t(), out=out_ND)
        else:
            out_ND.zero_()
        return
    bi1, bd1, bi2, bd2 = blocks or pick_blocks(N, K, I, D, _num_sms(x_ND.device))
    stages = stages or pick_stages(N)
    shared_preload = SHARED_PRELOAD if shared_preload is None else bool(shared_preload)
    h_NKI = torch.empty(N, K, I, device=x_ND.device, dtype=torch.float32)
    _gate_up_kernel[(N * K, cdiv(I, bi1))](
        x_ND, experts_NK, weights_NK, gate_EID, up_EID, h_NKI, K, I, D,
        x_ND.stride(0), gate_EID.stride(0), gate_EID.stride(1), up_EID.stride(0), up_EID.stride(1),
        BLOCK_I=bi1, BLOCK_D=bd1, STAGES=stages[0], num_warps=num_warps,
        **pdl_launch(x_ND.device, "gate_up"))
    hs, ws = (shared_h_NS, shared_down_DS) if shared else (h_NKI, h_NKI)  # unread without HAS_SHARED
    swiglu, gated = shared and shared_up_NS is not None, shared and shared_gate_N is not None
    us = shared_up_NS if swiglu else hs
    gs = shared_gate_N if gated else hs
    _down_kernel[(N, cdiv(D, bd2))](
        h_NKI, experts_NK, down_EDI, out_ND, hs, ws, us, gs, K, I, D, shared_h_NS.shape[1] if shared else 0,
        down_EDI.stride(0), down_EDI.stride(1), out_ND.stride(0), hs.stride(0), ws.stride(0), us.stride(0),
        gs.stride(0), HAS_SHARED=shared, SWIGLU=swiglu, GATED=gated, BLOCK_D=bd2, BLOCK_I=bi2, STAGES=stages[1],
        SHARED_PRELOAD=shared and shared_preload and shared_h_NS.shape[1] <= bi2,
        num_warps=down_warps or num_warps, **pdl_launch(x_ND.device, "down"))


@torch.library.custom_op("hybridlm::moe_experts_decode", mutates_args=())
def _moe_experts_op(x_ND: torch.Tensor, experts_NK: torch.Tensor, weights_NK: torch.Tensor,
                    gate_EID: torch.Tensor, up_EID: torch.Tensor, down_EDI: torch.Tensor,
                    shared_h_NS: Optional[torch.Tensor], shared_down_DS: Optional[torch.Tensor],
                    shared_up_NS: Optional[torch.Tensor], shared_gate_N: Optional[torch.Tensor],
                    blocks: Optional[list[int]]) -> torch.Tensor:
    out_ND = torch.empty_like(x_ND)
    moe_experts_into(x_ND, experts_NK, weights_NK, gate_EID, up_EID, down_EDI, out_ND, shared_h_NS=shared_h_NS,
                     shared_down_DS=shared_down_DS, shared_up_NS=shared_up_NS, shared_gate_N=shared_gate_N,
                     blocks=None if blocks is None else tuple(blocks))
    return out_ND


@_moe_experts_op.register_fake
def _(x_ND, experts_NK, weights_NK, gate_EID, up_EID, down_EDI, shared_h_NS, shared_down_DS, shared_up_NS,
      shared_gate_N, blocks):
    return torch.empty_like(x_ND)


def _rows_in_place(gate_EID, up_EID, down_EDI, shared_h_NS, shared_down_DS, shared_up_NS):
    """The kernels' weight and shared-expert operands: as given where their last dim is contiguous
    (views read in place), else contiguous copies."""
    gate_EID, up_EID, down_EDI = (w if w.stride(2) == 1 else w.contiguous() for w in (gate_EID, up_EID, down_EDI))
    if shared_h_NS is not None:
        shared_h_NS, shared_down_DS = (t if t.stride(1) == 1 else t.contiguous() for t in (shared_h_NS, shared_down_DS))
    if shared_up_NS is not None and shared_up_NS.stride(1) != 1:
        shared_up_NS = shared_up_NS.contiguous()
    return gate_EID, up_EID, down_EDI, shared_h_NS, shared_down_DS, shared_up_NS


def moe_experts_decode(x_ND, experts_NK, weights_NK, gate_EID, up_EID, down_EDI, *, shared_h_NS=None,
                       shared_down_DS=None, shared_up_NS=None, shared_gate_N=None, blocks=None):
    """Sparse-MoE decode kernel; arguments and result as in :func:`hybridlm.ops.moe_experts`.

    ``blocks`` forces (gate/up BLOCK_I, gate/up BLOCK_D, down BLOCK_I, down BLOCK_D), powers of two;
    by default :func:`pick_blocks` chooses them for the shape and the device's multiprocessor count.
    Computes in float32, so float64 inputs are refused (the reference serves them). Weight stacks
    whose last dim is contiguous are read in place (views included); others are copied.

    Example (CUDA tensors; CPU ones only under TRITON_INTERPRET=1):
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
        >>> x, (gate, up) = torch.randn(2, 48, device=dev), torch.randn(2, 4, 40, 48, device=dev)
        >>> down = torch.randn(4, 48, 40, device=dev)
        >>> out = moe_experts_decode(x, torch.tensor([[0, 3], [3, 1]], device=dev), torch.rand(2, 2, device=dev),
        ...                          gate, up, down)
    """
    check_moe_experts(x_ND, experts_NK, weights_NK, gate_EID, up_EID, down_EDI, shared_h_NS, shared_down_DS,
                      shared_up_NS, shared_gate_N)
    check_kernel_device("x_ND", x_ND)
    if x_ND.dtype == torch.float64:
        raise TypeError("x_ND must be float32, bfloat16 or float16 for the Triton kernel, got torch.float64; "
                        "use backend='reference'")
    if blocks is not None and (len(blocks) != 4 or any(
            isinstance(b, bool) or not isinstance(b, int) or b < 1 or b & (b - 1) for b in blocks)):
        raise ValueError(f"blocks must be four powers of two or None, got {blocks!r}")
    x_ND, experts_NK, weights_NK = x_ND.contiguous(), experts_NK.contiguous(), weights_NK.contiguous()
    gate_EID, up_EID, down_EDI, shared_h_NS, shared_down_DS, shared_up_NS = _rows_in_place(
        gate_EID, up_EID, down_EDI, shared_h_NS, shared_down_DS, shared_up_NS)
    if not torch.compiler.is_compiling():
        # Eager calls launch directly: the custom-op dispatch costs tens of microseconds of host time,
        # as much as the kernels at decode sizes (see ops/triton/decode.py).
        out_ND = torch.empty_like(x_ND)
        moe_experts_into(x_ND, experts_NK, weights_NK, gate_EID, up_EID, down_EDI, out_ND,
                         shared_h_NS=shared_h_NS, shared_down_DS=shared_down_DS, shared_up_NS=shared_up_NS,
                         shared_gate_N=shared_gate_N, blocks=blocks)
        return out_ND
    return _moe_experts_op(x_ND, experts_NK, weights_NK, gate_EID, up_EID, down_EDI, shared_h_NS, shared_down_DS,
                           shared_up_NS, shared_gate_N, None if blocks is None else list(blocks))


# The fused kernel's launch: a persistent grid of FUSED_PROGRAMS_PER_SM programs per multiprocessor
# (all resident at once, which its barrier needs: see fused_programs), phase 1 in tiles of
# FUSED_BLOCK_I x 256 weights and 3 pipeline stages, phase 2 in BD2 x 512 tiles and DOWN_STAGES.
FUSED_PROGRAMS_PER_SM = 2
FUSED_WARPS = 4
FUSED_BLOCK_I = 8
FUSED_STAGES = (3, DOWN_STAGES)
# Shared memory a program may take (its pipelined tiles), so that FUSED_PROGRAMS_PER_SM of them fit
# beside each other on an sm_90 multiprocessor (227 KB).
_FUSED_SMEM_BYTES = 96 * 1024


def fused_programs(num_sms: int, programs_per_sm: int, num_warps: int) -> int:
    """The fused kernel's grid: ``programs_per_sm`` programs on each of ``num_sms`` multiprocessors.

    Its barrier needs every program resident at once (a program that waits for one not yet started
    would wait forever), so the grid is held to what always fits: with programs_per_sm x num_warps
    <= 8, 32 threads a warp and at most 255 registers a thread, the programs of one multiprocessor
    need at most 65,280 of its 65,536 registers, and their pipelined tiles are held under
    ``_FUSED_SMEM_BYTES`` each (``moe_fused_into`` checks). Work the previous kernel (PDL) or other
    streams still run finishes on its own; the next kernel launches only after all of these programs
    have started."""
    if programs_per_sm < 1 or num_warps < 1 or programs_per_sm * num_warps > 8:
        raise ValueError(f"programs_per_sm x num_warps must be in [1, 8] so that every program of the fused "
                         f"kernel stays resident, got {programs_per_sm} x {num_warps}")
    return num_sms * programs_per_sm


def moe_fused_into(x_ND, logits_NE, top_k, router, norm_topk_prob, scaling, score_bias_E, gate_EID, up_EID,
                   down_EDI, out_ND, sync, *, shared_h_NS=None, shared_down_DS=None, shared_up_NS=None,
                   shared_gate_N=None, split: bool = False, programs_per_sm: Optional[int] = None,
                   num_warps: Optional[int] = None, block_i: Optional[int] = None,
                   stages: Optional[tuple[int, int]] = None, programs: Optional[int] = None) -> None:
    """Launch the fused routing + experts kernel on validated tensors, writing ``out_ND`` [N, D].

    One launch (``split=False``: the two phases with a barrier between them, ``sync`` int32 [2] zeros,
    left zeroed) or two (``split=True``: phase 1, then phase 2; ``sync`` unused; the CPU interpreter's
    way, as it runs programs one after another). The rest are tuning knobs (``programs`` overrides the
    grid in split launches only: a barrier launch always takes ``fused_programs``)."""
    N, D = x_ND.shape
    E, I = gate_EID.shape[:2]
    K = top_k
    if N == 0:
        return
    warps = num_warps or FUSED_WARPS
    P = fused_programs(_num_sms(x_ND.device), programs_per_sm or FUSED_PROGRAMS_PER_SM, warps)
    if split and programs is not None:
        P = programs
    bd1 = max(16, min(256, next_power_of_2(D)))
    bi1 = block_i or max(1, min(FUSED_BLOCK_I, TILE // bd1, next_power_of_2(I)))
    bi2 = max(16, min(512, next_power_of_2(I)))
    bd2 = max(2, min(TILE // bi2, next_power_of_2(cdiv(N * D, P))))
    st1, st2 = stages or FUSED_STAGES
    smem = max(st1 * 2 * bi1 * bd1, st2 * bd2 * bi2) * x_ND.element_size()
    if smem > _FUSED_SMEM_BYTES:
        raise ValueError(f"the fused kernel's pipelined tiles would take {smem} bytes of shared memory a program, "
                         f"more than {_FUSED_SMEM_BYTES}: fewer stages or a smaller block_i")
    shared = shared_h_NS is not None and shared_h_NS.shape[1] > 0
    h_NKI = torch.empty(N, K, I, device=x_ND.device, dtype=torch.float32)
    experts_NK = torch.empty(N, K, device=x_ND.device, dtype=torch.int32)
    hs, ws = (shared_h_NS, shared_down_DS) if shared else (h_NKI, h_NKI)  # unread without HAS_SHARED
    swiglu, gated = shared and shared_up_NS is not None, shared and shared_gate_N is not None
    us = shared_up_NS if swiglu else hs
    gs = shared_gate_N if gated else hs
    args = (x_ND, logits_NE, logits_NE if score_bias_E is None else score_bias_E, gate_EID, up_EID, down_EDI,
            hs, ws, us, gs, h_NKI, experts_NK, sync, out_ND, N, E, I, D, shared_h_NS.shape[1] if shared else 0,
            float(scaling), x_ND.stride(0), logits_NE.stride(0), gate_EID.stride(0), gate_EID.stride(1),
            up_EID.stride(0), up_EID.stride(1), down_EDI.stride(0), down_EDI.stride(1), out_ND.stride(0),
            hs.stride(0), ws.stride(0), us.stride(0), gs.stride(0) if gs.dim() > 1 else 1)
    meta = dict(K=K, BLOCK_E=next_power_of_2(E), BLOCK_K=next_power_of_2(K), SOFTMAX=router == "softmax",
                HAS_BIAS=score_bias_E is not None, NORM=norm_topk_prob, EMPTY=EMPTY, HAS_SHARED=shared,
                SWIGLU=swiglu, GATED=gated, BI1=bi1, BD1=bd1, BI2=bi2, BD2=bd2, STAGES1=st1, STAGES2=st2,
                num_warps=warps)
    for phases in ((1, 2) if split else (3,)):
        _fused_kernel[(P,)](*args, PHASES=phases, **meta, **pdl_launch(x_ND.device, "moe_fused"))


@torch.library.custom_op("hybridlm::moe_decode_fused", mutates_args=("sync",))
def _moe_fused_op(x_ND: torch.Tensor, logits_NE: torch.Tensor, gate_EID: torch.Tensor, up_EID: torch.Tensor,
                  down_EDI: torch.Tensor, sync: torch.Tensor, top_k: int, router: str, norm_topk_prob: bool,
                  scaling: float, score_bias_E: Optional[torch.Tensor], shared_h_NS: Optional[torch.Tensor],
                  shared_down_DS: Optional[torch.Tensor], shared_up_NS: Optional[torch.Tensor],
                  shared_gate_N: Optional[torch.Tensor], split: bool) -> torch.Tensor:
    out_ND = torch.empty_like(x_ND)
    moe_fused_into(x_ND, logits_NE, top_k, router, norm_topk_prob, scaling, score_bias_E, gate_EID, up_EID,
                   down_EDI, out_ND, sync, shared_h_NS=shared_h_NS, shared_down_DS=shared_down_DS,
                   shared_up_NS=shared_up_NS, shared_gate_N=shared_gate_N, split=split)
    return out_ND


@_moe_fused_op.register_fake
def _(x_ND, logits_NE, gate_EID, up_EID, down_EDI, sync, top_k, router, norm_topk_prob, scaling, score_bias_E,
      shared_h_NS, shared_down_DS, shared_up_NS, shared_gate_N, split):
    return torch.empty_like(x_ND)


def moe_decode_fused(x_ND, logits_NE, gate_EID, up_EID, down_EDI, sync, *, top_k, router="softmax",
                     norm_topk_prob=False, scaling=1.0, score_bias_E=None, shared_h_NS=None, shared_down_DS=None,
                     shared_up_NS=None, shared_gate_N=None, split=None):
    """A MoE layer's decode from its router logits: routing and the routed (and shared) experts in one
    launch; returns out [N, D] in x's dtype.

    The same result as ``moe_route`` (softmax or sigmoid scores, top ``top_k``, optional score bias,
    renormalisation, ``scaling``) followed by ``moe_experts_decode`` with the same shared expert, with
    the same float32 arithmetic in the same order. What it saves at decode sizes is two launches' worth
    of waiting: the routing kernel and the boundary between gate/up and down, where each kernel waits for
    the whole previous one. Programs route their tokens themselves and meet at one barrier between
    gate/up and down (the shared expert's down rows stream before it).

    Args:
        x_ND: [N, D] tokens; logits_NE: [N, E] router logits (any row stride, e.g. columns of a packed
            projection output); gate_EID, up_EID, down_EDI and the shared expert's tensors as in
            :func:`hybridlm.ops.moe_experts`.
        sync: int32 [2] zeros on x's device: the barrier's counters. The kernel leaves them zeroed.
            Calls sharing one ``sync`` must not run concurrently (on different streams); a MoE layer
            keeps its own.
        top_k, router, norm_topk_prob, scaling, score_bias_E: as in :func:`hybridlm.ops.moe_route`.
        split: two launches without the barrier (default: under the CPU interpreter only).

    Example (CUDA tensors; CPU ones only under TRITON_INTERPRET=1):
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
        >>> x, logits = torch.randn(1, 48, device=dev), torch.randn(1, 4, device=dev)
        >>> gate, up, down = torch.randn(4, 40, 48, device=dev), torch.randn(4, 40, 48, device=dev), torch.randn(4, 48, 40, device=dev)
        >>> out = moe_decode_fused(x, logits, gate, up, down, torch.zeros(2, dtype=torch.int32, device=dev), top_k=2)
    """
    check_moe_experts(x_ND, None, None, gate_EID, up_EID, down_EDI, shared_h_NS, shared_down_DS, shared_up_NS,
                      shared_gate_N)
    check_route(logits_NE, top_k, router, norm_topk_prob, scaling, score_bias_E, 1, 1)
    check_kernel_device("x_ND", x_ND)
    if x_ND.dtype == torch.float64:
        raise TypeError("x_ND must be float32, bfloat16 or float16 for the Triton kernel, got torch.float64; "
                        "use the reference (hybridlm.ops.moe_route, then hybridlm.ops.moe_experts)")
    N, E = x_ND.shape[0], gate_EID.shape[0]
    if tuple(logits_NE.shape) != (N, E):
        raise ValueError(f"logits_NE must be [N, E] = {(N, E)} (N from x_ND, E from gate_EID), got "
                         f"{tuple(logits_NE.shape)}")
    if logits_NE.device != x_ND.device:
        raise ValueError(f"logits_NE is on {logits_NE.device}, expected x_ND's device {x_ND.device}")
    if E > KERNEL_MAX_EXPERTS:
        raise ValueError(f"gate_EID holds E = {E} experts; the kernel routes up to {KERNEL_MAX_EXPERTS}")
    if (not isinstance(sync, torch.Tensor) or sync.dtype != torch.int32 or tuple(sync.shape) != (2,)
            or sync.device != x_ND.device or not sync.is_contiguous()):
        raise ValueError("sync must be a contiguous int32 tensor of shape [2], zeros, on x_ND's device "
                         f"{x_ND.device}, got {sync.dtype if isinstance(sync, torch.Tensor) else type(sync).__name__} "
                         f"{tuple(getattr(sync, 'shape', ()))} on {getattr(sync, 'device', None)}")
    if split is None:
        split = not x_ND.is_cuda
    x_ND = x_ND.contiguous()
    if logits_NE.stride(1) != 1:
        logits_NE = logits_NE.contiguous()
    if score_bias_E is not None:
        score_bias_E = score_bias_E.contiguous()
    gate_EID, up_EID, down_EDI, shared_h_NS, shared_down_DS, shared_up_NS = _rows_in_place(
        gate_EID, up_EID, down_EDI, shared_h_NS, shared_down_DS, shared_up_NS)
    if not torch.compiler.is_compiling():
        out_ND = torch.empty_like(x_ND)
        moe_fused_into(x_ND, logits_NE, top_k, router, norm_topk_prob, float(scaling), score_bias_E, gate_EID,
                       up_EID, down_EDI, out_ND, sync, shared_h_NS=shared_h_NS, shared_down_DS=shared_down_DS,
                       shared_up_NS=shared_up_NS, shared_gate_N=shared_gate_N, split=bool(split))
        return out_ND
    return _moe_fused_op(x_ND, logits_NE, gate_EID, up_EID, down_EDI, sync, top_k, router, norm_topk_prob,
                         float(scaling), score_bias_E, shared_h_NS, shared_down_DS, shared_up_NS, shared_gate_N,
                         bool(split))
