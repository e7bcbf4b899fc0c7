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

from hybridlm.ops._checks import check_kernel_device
from hybridlm.ops.moe_decode import check_moe_experts, shared_inner
from hybridlm.ops.triton.decode import _num_sms  # multiprocessor count, cached per device
from hybridlm.ops.triton.utils import cdiv, next_power_of_2, pdl_launch, pdl_start

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


@triton.jit
def _gate_up_kernel(x_ND, experts_NK, weights_NK, gate_EID, up_EID, h_NKI, K, I, D,
                    s_xn, s_ge, s_gi, s_ue, s_ui,
                    BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_start(USE_PDL)
    i_nk = tl.program_id(0).to(tl.int64)
    i_i = tl.program_id(1)
    i_n = i_nk // K
    i_e = tl.load(experts_NK + i_nk).to(tl.int64)
    w = tl.load(weights_NK + i_nk).to(tl.float32)

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
def _down_kernel(h_NKI, experts_NK, down_EDI, out_ND, hs_NS, ws_DS, us_NS, gs_N, K, I, D, S, s_de, s_dd, s_on,
                 s_hn, s_wd, s_un, s_gn, HAS_SHARED: tl.constexpr, SWIGLU: tl.constexpr, GATED: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_I: tl.constexpr, STAGES: tl.constexpr, USE_PDL: tl.constexpr):
    # program (token, d-block): out[n, d-block] = sum over the token's K slots of
    # down_e[d-block, :] . h[n, slot, :], the slots' rows streamed one after another (BLOCK_I columns a
    # step, contiguous) into one float32 tile, reduced once at the end: a fixed order, no partial rows.
    # A shared expert's rows (ws [D, S] against hs [N, S]) go into the same tile first.
    pdl_start(USE_PDL)
    i_n = tl.program_id(0).to(tl.int64)
    o_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    n_i = tl.cdiv(I, BLOCK_I)
    acc = tl.zeros([BLOCK_D, BLOCK_I], dtype=tl.float32)
    if HAS_SHARED:
        row_s = o_d.to(tl.int64)[:, None] * s_wd
        scale = 1.0
        if GATED:  # the shared expert's sigmoid gate, one factor per token
            scale = tl.sigmoid(tl.load(gs_N + i_n * s_gn).to(tl.float32))
        for i0 in tl.range(0, S, BLOCK_I, num_stages=STAGES):
            o_i = i0 + tl.arange(0, BLOCK_I)
            m_i = o_i < S
            b_h = tl.load(hs_NS + i_n * s_hn + o_i, mask=m_i, other=0.0).to(tl.float32)
            if SWIGLU:  # hs is the gate projection: the inner activations formed here, in float32
                b_u = tl.load(us_NS + i_n * s_un + o_i, mask=m_i, other=0.0).to(tl.float32)
                b_h = b_h * tl.sigmoid(b_h) * b_u * scale
            b_w = tl.load(ws_DS + row_s + o_i[None, :], mask=m_d[:, None] & m_i[None, :], other=0.0).to(tl.float32)
            acc += b_w * b_h[None, :]
    row_d = o_d.to(tl.int64)[:, None] * s_dd
    for t in tl.range(0, K * n_i, num_stages=STAGES):
        j = t // n_i
        o_i = (t - j * n_i) * BLOCK_I + tl.arange(0, BLOCK_I)
        m_i = o_i < I
        i_e = tl.load(experts_NK + i_n * K + j).to(tl.int64)
        b_h = tl.load(h_NKI + (i_n * K + j) * I + o_i, mask=m_i, other=0.0)
        b_w = tl.load(down_EDI + i_e * s_de + row_d + o_i[None, :], mask=m_d[:, None] & m_i[None, :],
                      other=0.0).to(tl.float32)
        acc += b_w * b_h[None, :]
    tl.store(out_ND + i_n * s_on + o_d, tl.sum(acc, axis=1).to(out_ND.dtype.element_ty), mask=m_d)


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
                     stages: Optional[tuple[int, int]] = None, down_warps: Optional[int] = None) -> None:
    """Launch the two kernels on validated tensors, writing ``out_ND`` [N, D].

    x_ND, experts_NK, weights_NK and out_ND must be contiguous; the weight stacks, shared_h_NS and
    shared_down_DS may have any strides with a contiguous last dim (D for gate and up, I for down,
    S for the shared expert's). ``blocks`` overrides :func:`pick_blocks`, ``stages``
    :func:`pick_stages` and ``down_warps`` the down kernel's warps (``num_warps``; tests, tuning)."""
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
    h_NKI = torch.empty(N, K, I, device=x_ND.device, dtype=torch.float32)
    _gate_up_kernel[(N * K, cdiv(I, bi1))](
        x_ND, experts_NK, weights_NK, gate_EID, up_EID, h_NKI, K, I, D,
        x_ND.stride(0), gate_EID.stride(0), gate_EID.stride(1), up_EID.stride(0), up_EID.stride(1),
        BLOCK_I=bi1, BLOCK_D=bd1, STAGES=stages[0], num_warps=num_warps,
        **pdl_launch(x_ND.device))
    hs, ws = (shared_h_NS, shared_down_DS) if shared else (h_NKI, h_NKI)  # unread without HAS_SHARED
    swiglu, gated = shared and shared_up_NS is not None, shared and shared_gate_N is not None
    us = shared_up_NS if swiglu else hs
    gs = shared_gate_N if gated else hs
    _down_kernel[(N, cdiv(D, bd2))](
        h_NKI, experts_NK, down_EDI, out_ND, hs, ws, us, gs, K, I, D, shared_h_NS.shape[1] if shared else 0,
        down_EDI.stride(0), down_EDI.stride(1), out_ND.stride(0), hs.stride(0), ws.stride(0), us.stride(0),
        gs.stride(0), HAS_SHARED=shared, SWIGLU=swiglu, GATED=gated, BLOCK_D=bd2, BLOCK_I=bi2, STAGES=stages[1],
        num_warps=down_warps or num_warps, **pdl_launch(x_ND.device))


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
    gate_EID, up_EID, down_EDI = (w if w.stride(2) == 1 else w.contiguous() for w in (gate_EID, up_EID, down_EDI))
    if shared_h_NS is not None:
        shared_h_NS, shared_down_DS = (t if t.stride(1) == 1 else t.contiguous() for t in (shared_h_NS, shared_down_DS))
    if shared_up_NS is not None and shared_up_NS.stride(1) != 1:
        shared_up_NS = shared_up_NS.contiguous()
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
