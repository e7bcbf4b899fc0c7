"""Triton sparse-MoE decode: each token's K routed SwiGLU experts, reading only those experts' weights.

Legend: N tokens, K experts per token, E experts, D hidden size, I expert intermediate size.
Semantics as :func:`hybridlm.ops.moe_experts`; weights stacked as ``MoE.packed_experts()`` gives them
(gate, up [E, I, D]; down transposed, [E, I, D]), so every weight row is contiguous along D.

Decode multiplies a few token vectors by a few experts' matrices: a matrix-vector product bound by
the weight bytes. Three kernels, no host sync, no atomics and no data-dependent shape (a CUDA graph
captures them):

1. grid (N * K, cdiv(I, BLOCK_I)): a program loads its slot's expert index, streams BLOCK_I rows of
   that expert's gate and up matrices along D in BLOCK_D columns (coalesced: D is contiguous),
   accumulates both partial GEMVs in float32 and writes h = weight * silu(gate x) * up x to float32
   scratch h [N, K, I] (the combine weight folded in here, once per row).
2. grid (N * K, cdiv(D, BLOCK_D), cdiv(I, BLOCK_I)): a program reads BLOCK_I rows x BLOCK_D columns
   of its slot's down matrix and writes their h-weighted sum, a float32 partial row, to scratch
   [N, K * cdiv(I, BLOCK_I), D]. Splitting over slots and rows keeps hundreds of weight loads in
   flight at N = 1; the previous design (one program per token and column block, looping over
   slots and rows) had 128 programs of 16 columns there and reached a third of the copy rate.
3. grid (N, cdiv(D, BLOCK_D)): the partial rows summed in a fixed order (deterministic, unlike
   atomics) and cast to x's dtype. A program loads up to 64 partial rows at once over BLOCK_D =
   TILE / 64 columns, so at N = 1 the sum runs as 32 programs of one load each (a first version,
   2 programs looping over the 40 rows, took 7.4 us on an H200, eating the down kernel's gain).

Block sizes: kernel 1 narrows BLOCK_I until the grid holds several programs per multiprocessor at
the shape; kernel 2 reads 256-byte row pieces and narrows its BLOCK_I the same way. At Qwen3-Next
scale (D 2048, I 512, K 10, N = 1 on 132 SMs) kernel 1 runs 10 x 64 programs of 8 x 256 tiles
and kernel 2 10 x 16 x 4 programs of 128 x 128 tiles (40 partial rows).
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
from hybridlm.ops.moe_decode import check_moe_experts
from hybridlm.ops.triton.decode import _num_sms  # multiprocessor count, cached per device

# Programs each kernel should give every multiprocessor (latency hiding wants several weight loads in
# flight per SM); the block sizes shrink until the grid reaches this many, or their floor.
PROGRAMS_PER_SM = 4
TILE = 4096  # elements of a weight tile per loop step (16 per thread at 4 warps)
# Software-pipeline stages of both loops from this many tokens (plain loops below). Measured on an
# H200 (benchmarks/experiments/moe_decode_stages.py, D 2048, I 512, top 10, bf16): with 32 experts,
# 4 tokens 61.4 -> 54.2 us a layer at 3 stages, while 1 and 2 tokens moved by under 2% either way;
# with 512 experts, 16 tokens 222.6 -> 205.5 us and 48 tokens 570.2 -> 520.4 us at (3, 3).
PIPELINE_FROM_TOKENS = 4
PIPELINE_STAGES = 3


@triton.jit
def _gate_up_kernel(x_ND, experts_NK, weights_NK, gate_EID, up_EID, h_NKI, K, I, D,
                    s_xn, s_ge, s_gi, s_ue, s_ui,
                    BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr):
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
def _down_kernel(h_NKI, experts_NK, down_EID, part_NPD, K, I, D, s_de, s_di,
                 BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, STAGES: tl.constexpr):
    # program (token-slot, d-block, i-block): BLOCK_I rows of one expert's down matrix, ROWS at a time,
    # summed into a float32 partial row of the token's P = K * cdiv(I, BLOCK_I) partials
    i_nk = tl.program_id(0).to(tl.int64)
    o_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    i_s = tl.program_id(2)
    n_split = tl.num_programs(2)
    m_d = o_d < D
    i_e = tl.load(experts_NK + i_nk).to(tl.int64)
    p_down = down_EID + i_e * s_de + o_d[None, :]
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for i0 in tl.range(i_s * BLOCK_I, (i_s + 1) * BLOCK_I, ROWS, num_stages=STAGES):
        o_i = i0 + tl.arange(0, ROWS)
        m_i = o_i < I
        b_h = tl.load(h_NKI + i_nk * I + o_i, mask=m_i, other=0.0)
        b_down = tl.load(p_down + o_i.to(tl.int64)[:, None] * s_di, mask=m_i[:, None] & m_d[None, :],
                         other=0.0).to(tl.float32)
        acc += b_h[:, None] * b_down
    tl.store(part_NPD + (i_nk * n_split + i_s) * D + o_d, tl.sum(acc, axis=0), mask=m_d)


@triton.jit
def _sum_parts_kernel(part_NPD, out_ND, P, D, s_on, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    # out[n, d-block] = sum of the token's P partial rows, cast. A program loads BLOCK_P partial rows
    # at once (one memory round trip when P <= BLOCK_P) and reduces them in a fixed order
    # (deterministic, unlike atomics); narrow BLOCK_D gives many programs, so the loads run in parallel
    i_n = tl.program_id(0).to(tl.int64)
    o_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        o_p = p0 + tl.arange(0, BLOCK_P)
        b = tl.load(part_NPD + (i_n * P + o_p[:, None]) * D + o_d[None, :],
                    mask=(o_p < P)[:, None] & m_d[None, :], other=0.0)
        acc += tl.sum(b, axis=0)
    tl.store(out_ND + i_n * s_on + o_d, acc.to(out_ND.dtype.element_ty), mask=m_d)


def pick_blocks(N: int, K: int, I: int, D: int, num_sms: int) -> tuple[int, int, int, int]:
    """(gate/up BLOCK_I, gate/up BLOCK_D, down BLOCK_I, down BLOCK_D) for the shape.

    Gate/up: rows BLOCK_D = 256 wide (fewer for a small D) and BLOCK_I from 64 (at most a TILE-element
    tile) down to 8 until
    N * K * cdiv(I, BLOCK_I) reaches PROGRAMS_PER_SM programs per SM. Down: rows 128 wide (256 bytes
    of a 16-bit row) and BLOCK_I from all of I down to a TILE-element tile's rows until
    N * K * cdiv(I, BLOCK_I) * cdiv(D, BLOCK_D) does.
    """
    bd1 = max(16, min(256, triton.next_power_of_2(D)))
    # at most a TILE-element tile: its two float32 accumulators stay in registers (64 x 256 spilled a
    # 2.4 KB stack on sm_90, and 16 tokens x 10 experts took 2.5 ms a layer on the H200)
    bi1 = max(8, min(64, TILE // bd1, triton.next_power_of_2(I)))
    while bi1 > 8 and N * K * triton.cdiv(I, bi1) < PROGRAMS_PER_SM * num_sms:
        bi1 //= 2
    bd2 = max(16, min(128, triton.next_power_of_2(D)))
    rows = max(1, min(TILE // bd2, triton.next_power_of_2(I)))
    bi2 = triton.next_power_of_2(I)
    while bi2 > rows and N * K * triton.cdiv(I, bi2) * triton.cdiv(D, bd2) < PROGRAMS_PER_SM * num_sms:
        bi2 //= 2
    return bi1, bd1, bi2, bd2


def pick_stages(N: int) -> tuple[int, int]:
    """(gate/up stages, down stages) of the loops' software pipelines for N tokens."""
    return (PIPELINE_STAGES, PIPELINE_STAGES) if N >= PIPELINE_FROM_TOKENS else (1, 1)


def moe_experts_into(x_ND, experts_NK, weights_NK, gate_EID, up_EID, down_EID, out_ND, *,
                     blocks: Optional[tuple[int, int, int, int]] = None, num_warps: int = 4,
                     stages: Optional[tuple[int, int]] = None) -> None:
    """Launch both kernels on validated tensors, writing ``out_ND`` [N, D].

    x_ND, experts_NK, weights_NK and out_ND must be contiguous; the weight stacks may have any strides
    with a contiguous last dim. ``blocks`` overrides :func:`pick_blocks` and ``stages``
    :func:`pick_stages` (tests, tuning)."""
    N, D = x_ND.shape
    K = experts_NK.shape[1]
    I = gate_EID.shape[1]
    if N == 0:
        return
    if K == 0 or I == 0:
        out_ND.zero_()
        return
    bi1, bd1, bi2, bd2 = blocks or pick_blocks(N, K, I, D, _num_sms(x_ND.device))
    stages = stages or pick_stages(N)
    h_NKI = torch.empty(N, K, I, device=x_ND.device, dtype=torch.float32)
    _gate_up_kernel[(N * K, triton.cdiv(I, bi1))](
        x_ND, experts_NK, weights_NK, gate_EID, up_EID, h_NKI, K, I, D,
        x_ND.stride(0), gate_EID.stride(0), gate_EID.stride(1), up_EID.stride(0), up_EID.stride(1),
        BLOCK_I=bi1, BLOCK_D=bd1, STAGES=stages[0], num_warps=num_warps)
    n_split = triton.cdiv(I, bi2)
    part_NPD = torch.empty(N, K * n_split, D, device=x_ND.device, dtype=torch.float32)
    _down_kernel[(N * K, triton.cdiv(D, bd2), n_split)](
        h_NKI, experts_NK, down_EID, part_NPD, K, I, D, down_EID.stride(0), down_EID.stride(1),
        BLOCK_I=bi2, BLOCK_D=bd2, ROWS=min(bi2, max(1, TILE // bd2)), STAGES=stages[1], num_warps=num_warps)
    P = K * n_split
    bpr = max(1, min(64, triton.next_power_of_2(P)))
    bdr = max(16, min(TILE // bpr, triton.next_power_of_2(D)))
    _sum_parts_kernel[(N, triton.cdiv(D, bdr))](part_NPD, out_ND, P, D, out_ND.stride(0),
                                                 BLOCK_P=bpr, BLOCK_D=bdr, num_warps=num_warps)


@torch.library.custom_op("hybridlm::moe_experts_decode", mutates_args=())
def _moe_experts_op(x_ND: torch.Tensor, experts_NK: torch.Tensor, weights_NK: torch.Tensor,
                    gate_EID: torch.Tensor, up_EID: torch.Tensor, down_EID: torch.Tensor,
                    blocks: Optional[list[int]]) -> torch.Tensor:
    out_ND = torch.empty_like(x_ND)
    moe_experts_into(x_ND, experts_NK, weights_NK, gate_EID, up_EID, down_EID, out_ND,
                     blocks=None if blocks is None else tuple(blocks))
    return out_ND


@_moe_experts_op.register_fake
def _(x_ND, experts_NK, weights_NK, gate_EID, up_EID, down_EID, blocks):
    return torch.empty_like(x_ND)


def moe_experts_decode(x_ND, experts_NK, weights_NK, gate_EID, up_EID, down_EID, *, blocks=None):
    """Sparse-MoE decode kernel; arguments and result as in :func:`hybridlm.ops.moe_experts`.

    ``blocks`` forces (gate/up BLOCK_I, gate/up BLOCK_D, down BLOCK_I, down BLOCK_D), powers of two;
    by default :func:`pick_blocks` chooses them for the shape and the device's multiprocessor count.
    Computes in float32, so float64 inputs are refused (the reference serves them). Weight stacks
    whose rows are contiguous along D are read in place (views included); others are copied.

    Example (CUDA tensors; CPU ones only under TRITON_INTERPRET=1):
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
        >>> x, (gate, up, down) = torch.randn(2, 48, device=dev), torch.randn(3, 4, 40, 48, device=dev)
        >>> out = moe_experts_decode(x, torch.tensor([[0, 3], [3, 1]], device=dev), torch.rand(2, 2, device=dev),
        ...                          gate, up, down)
    """
    check_moe_experts(x_ND, experts_NK, weights_NK, gate_EID, up_EID, down_EID)
    check_kernel_device("x_ND", x_ND)
    if x_ND.dtype == torch.float64:
        raise TypeError("x_ND must be float32, bfloat16 or float16 for the Triton kernel, got torch.float64; "
                        "use backend='reference'")
    if blocks is not None and (len(blocks) != 4 or any(
            isinstance(b, bool) or not isinstance(b, int) or b < 1 or b & (b - 1) for b in blocks)):
        raise ValueError(f"blocks must be four powers of two or None, got {blocks!r}")
    x_ND, experts_NK, weights_NK = x_ND.contiguous(), experts_NK.contiguous(), weights_NK.contiguous()
    gate_EID, up_EID, down_EID = (w if w.stride(2) == 1 else w.contiguous() for w in (gate_EID, up_EID, down_EID))
    if not torch.compiler.is_compiling():
        # Eager calls launch directly: the custom-op dispatch costs tens of microseconds of host time,
        # as much as the kernels at decode sizes (see ops/triton/decode.py).
        out_ND = torch.empty_like(x_ND)
        moe_experts_into(x_ND, experts_NK, weights_NK, gate_EID, up_EID, down_EID, out_ND, blocks=blocks)
        return out_ND
    return _moe_experts_op(x_ND, experts_NK, weights_NK, gate_EID, up_EID, down_EID,
                           None if blocks is None else list(blocks))
