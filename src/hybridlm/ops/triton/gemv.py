"""Triton matrix-vector product for decode: y [N, O] = x [N, D] W^T with W [O, D] and a few rows N.

At batch 1 a decode step's projections are matrix-vector products bound by their weight bytes. For
the narrow ones cuBLAS takes several times their bytes' time. In the compiled step's kernel table on
an H200 (``benchmarks/step_trace.py``, data/2026-12-02-h200-s5/trace.json), MoE's stacked router and
shared-expert projection (1064 x 2048 in bf16, 4.4 MB, ~1 us at the copy rate) and the shared
expert's down projection (2 MB) took 4.2 and 3.3 us. The output projections (2048 x 4096, 16.8 MB)
took a split-K kernel of 7.2 us plus a 1.65 us reduction. Measured side by side
(``benchmarks/experiments/gemv_ab.py``), this kernel is 1.3-1.7x faster for those at one row.

One kernel, no scratch: a program owns BLOCK_O whole rows of W, streams them along D in BLOCK_D
columns (D is contiguous, so each row piece is one coalesced read), multiplies by every row of x and
keeps [N, BLOCK_O, BLOCK_D] float32 partial products, summed over D once at the end. BLOCK_O shrinks
until the grid gives every multiprocessor several programs, so many weight loads are in flight.
Accumulation is float32 whatever the input dtype.

One row of x (batch 1) can take a second kernel, :func:`_gemv_row_kernel`: a fixed grid of
PROGRAMS_PER_SM_ROW programs a multiprocessor, program p owning row blocks p, p + P, ... and loading
block r + 1 into registers while it sums block r. (At 8 warps and ~128 registers a thread two
programs fit a multiprocessor at once, so the grid runs as two waves; of the launches swept, 4 a
multiprocessor was the fastest.) Launched with programmatic dependent
launch (``utils.pdl``), the kernel lets its successor launch as soon as every program has started and
loads its first row block before waiting for its predecessor: in a chain of 48 such products
(``benchmarks/experiments/pdl_chain.py``, H200, 2048 x 4096 and 4096 x 2048 bf16, one CUDA graph) it
took 5.43 us a product against 6.95 for the kernel above and 9.83 for cuBLAS; the same launch
without PDL took 7.05-7.44 us. The overlap needs the predecessor to be a PDL kernel too (every decode
kernel of ``ops/triton`` is), so the kernel is the default for one row only where PDL is on (on
Hopper and later unless HYBRIDLM_PDL=0, see ``utils.PDL``).

Registered with ``torch.library`` (``hybridlm::decode_linear``) so ``torch.compile(fullgraph=True)``
traces through it and a decode step captures it in a CUDA graph.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from hybridlm.ops._checks import check_kernel_device
from hybridlm.ops.triton.decode import _num_sms  # multiprocessor count, cached per device
from hybridlm.ops.triton.utils import cdiv, next_power_of_2, pdl, pdl_launch, pdl_trigger, pdl_wait

MAX_ROWS = 4  # rows of x the kernel takes: its accumulator holds every row
TILE = 4096  # float32 accumulator elements per program (32 a thread at 4 warps)
PROGRAMS_PER_SM = 4
# Software-pipeline stages of the loop over D: the next row pieces are copied into shared memory
# while one is summed. H200, one row, bf16 (benchmarks/experiments/gemv_ab.py): 2048 x 4096 9.44 ->
# 7.55 us, 1064 x 2048 4.86 -> 3.63 us, 12352 x 2048 21.40 -> 17.36 us against the plain loop.
STAGES = 3
# The one-row kernel (pdl_chain.py's sweep, H200): 4 programs a multiprocessor, 8 warps, row blocks of
# ROW_ELEMENTS weight elements (64 a thread; with two blocks live an sm_90 compile takes 128 registers),
# and the widest row it takes.
PROGRAMS_PER_SM_ROW = 4
ROW_WARPS = 8
ROW_ELEMENTS = 16384
ROW_MAX_D = 16384
# The widest weight (output rows) the one-row kernel takes; wider ones (the input projections) take the
# block kernel, with PDL: in the compiled 4k batch-1 step on an H100 that was 281.3-281.6 tokens/s against
# 272.8-273.4 with them on cuBLAS (third 12-05 session); the one-row kernel lost to cuBLAS there (12-04).
ROW_MAX_O = 4096
# Row pieces the block kernel loads before waiting for its predecessor (0-MAX_PRELOAD; HYBRIDLM_GEMV_PRELOAD):
# the weights do not depend on it, so their first bytes stream while it ends. In the compiled 4k batch-1
# step on an H100 (the wide input projections, D = 2048: four 512-column pieces a row), tokens/s:
# 0 276.7 / 277.1, 1 278.0, 2 280.5 (fourth 12-05 session); with the greedy kernel, 2 288.2-288.4, 3 280.0,
# 4 275.5 / 275.5 (first 12-06 session, another H100). Likely why more loses: four pieces take 119 registers
# a thread on sm_90 against 78 for two, so a multiprocessor holds fewer programs.
MAX_PRELOAD = 4
# The widest row whose norm the kernels compute in their prologue (``add_rms_norm_linear``): every program
# holds the whole row once, 64 float32 a thread at 4 warps (Qwen3-Next's 2,048, DeepSeek V3's 7,168 fit).
NORM_MAX_D = 8192
_PRELOAD_ENV = os.environ.get("HYBRIDLM_GEMV_PRELOAD", "2")
if _PRELOAD_ENV not in ("0", "1", "2", "3", "4"):
    raise ValueError(f"HYBRIDLM_GEMV_PRELOAD must be 0, 1, 2, 3 or 4 (row pieces the block matrix-vector kernel loads "
                     f"before its PDL wait; default 2), got {_PRELOAD_ENV!r}")
PRELOAD = int(_PRELOAD_ENV)
# Where the input norm goes into the product (``add_rms_norm_linear``): by default only into the one-row
# kernel's products (at batch 1 MoE's stack of router and shared expert, 1,064 x 2,048: 133 programs). The
# wide input stacks (12,352 and 9,216 rows) keep the add + norm kernel before the block kernel: there every
# one of its 1,544+ programs would read the whole row and wait for its sum before using its preloaded
# weights. H100, compiled 4k batch-1 step, first call (second 12-06 session): no fusion 288.9 / 288.8
# tokens/s; MoE's stack only 292.5; the block kernel too at BLOCK_O 4 / 8 and 3 stages 286.7-286.9 /
# 286.6, at 8 and 1 stage 279.2; then, alternated, 288.4-288.6 without against 292.2-292.3 with it, and on
# other H100 starts 284.8-284.9 against 288.5-288.8 and 288.6 against 292.0-292.4 (+1.2-1.3% on each).
# HYBRIDLM_NORM_LAUNCH="BO,STAGES" (BO 1-16, STAGES 1-4) puts it into the block kernel too, launched so, for
# measurements.
NORM_LAUNCH: tuple[int, int] | None = None
_NORM_LAUNCH_ENV = os.environ.get("HYBRIDLM_NORM_LAUNCH", "row-only")
if _NORM_LAUNCH_ENV != "row-only":
    try:
        NORM_LAUNCH = tuple(int(v) for v in _NORM_LAUNCH_ENV.split(","))
        if len(NORM_LAUNCH) != 2 or NORM_LAUNCH[0] not in (1, 2, 4, 8, 16) or not 1 <= NORM_LAUNCH[1] <= 4:
            raise ValueError
    except ValueError:
        raise ValueError(f"HYBRIDLM_NORM_LAUNCH must be 'row-only' (the default) or 'BO,STAGES' (BO 1, 2, 4, 8 or 16; "
                         f"STAGES 1-4), got {_NORM_LAUNCH_ENV!r}") from None


@triton.jit
def _row_piece(p_w, m_o, o_b, j, D, BLOCK_D: tl.constexpr):
    # row piece j ([BLOCK_O, BLOCK_D] weights, columns j * BLOCK_D + o_b) in the weights' dtype
    o_d = j * BLOCK_D + o_b
    return tl.load(p_w + o_d[None, :], mask=m_o[:, None] & (o_d < D)[None, :], other=0.0)


@triton.jit
def _add_piece(acc, w, x_ND, s_xn, o_n, m_n, o_b, j, D, r_D, nw_D, rstd, BLOCK_D: tl.constexpr, NORM: tl.constexpr,
               ZERO_CENTERED: tl.constexpr):
    # acc [NP, BLOCK_O, BLOCK_D] + row piece j of W times the same columns of every row of x, in float32
    o_d = j * BLOCK_D + o_b
    b_x = _x_piece(x_ND, s_xn, o_n, m_n, o_d, o_d < D, r_D, nw_D, rstd, NORM, ZERO_CENTERED)
    return acc + w.to(tl.float32)[None, :, :] * b_x[:, None, :]


@triton.jit
def _prenorm_scale(x_D, r_D, nw_D, s_D, h_D, D, eps, NORM: tl.constexpr, ZERO_CENTERED: tl.constexpr,
                   BLOCK_F: tl.constexpr):
    # The fused input norm's prologue (NORM 1: h = RMSNorm(x); 2: s = x + r rounded to x's dtype, h =
    # RMSNorm(s)): every program reads the whole row and returns 1 / rms; program 0 also stores s (NORM 2)
    # and h, as ``norm.rms_norm_kernel`` computes them, for the layer's other readers.
    o_f = tl.arange(0, BLOCK_F)
    m_f = o_f < D
    s32 = _prenorm_sum(x_D, r_D, o_f, m_f, NORM).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(s32 * s32, 0) / D + eps)
    if tl.program_id(0) == 0:  # the row read again (from L1/L2): nothing above stays live past the sum
        s = _prenorm_sum(x_D, r_D, o_f, m_f, NORM)
        if NORM == 2:
            tl.store(s_D + o_f, s, mask=m_f)
        w = tl.load(nw_D + o_f, mask=m_f, other=0.0).to(tl.float32)
        if ZERO_CENTERED:
            w = 1.0 + w
        tl.store(h_D + o_f, ((s.to(tl.float32) * rstd) * w).to(h_D.dtype.element_ty), mask=m_f)
    return rstd


@triton.jit
def _prenorm_sum(x_D, r_D, o_d, m_d, NORM: tl.constexpr):
    # columns o_d of s = x + r in x's dtype (as PyTorch's x + r rounds), or of x itself (NORM 1)
    s = tl.load(x_D + o_d, mask=m_d, other=0.0)
    if NORM == 2:
        s = (s.to(tl.float32) + tl.load(r_D + o_d, mask=m_d, other=0.0).to(tl.float32)).to(s.dtype)
    return s


@triton.jit
def _prenorm_piece(x_D, r_D, nw_D, o_d, m_d, rstd, NORM: tl.constexpr, ZERO_CENTERED: tl.constexpr):
    # columns o_d of h (``_prenorm_scale``), rounded to x's dtype as the norm's output is, in float32
    s = _prenorm_sum(x_D, r_D, o_d, m_d, NORM)
    w = tl.load(nw_D + o_d, mask=m_d, other=0.0).to(tl.float32)
    if ZERO_CENTERED:
        w = 1.0 + w
    return ((s.to(tl.float32) * rstd) * w).to(s.dtype).to(tl.float32)


@triton.jit
def _x_piece(x_ND, s_xn, o_n, m_n, o_d, m_d, r_D, nw_D, rstd, NORM: tl.constexpr, ZERO_CENTERED: tl.constexpr):
    # columns o_d of every row of x [NP, BLOCK_D] in float32; with NORM (one row) of its norm instead
    if NORM:
        return _prenorm_piece(x_ND, r_D, nw_D, o_d, m_d, rstd, NORM, ZERO_CENTERED)[None, :]
    return tl.load(x_ND + o_n[:, None] * s_xn + o_d[None, :], mask=m_n[:, None] & m_d[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _gemv_kernel(x_ND, w_OD, y_NO, N, O, D, s_xn, s_wo, s_yn, r_D, nw_D, s_D, h_D, eps,
                 NP: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
                 PRELOAD: tl.constexpr, USE_PDL: tl.constexpr, NORM: tl.constexpr, ZERO_CENTERED: tl.constexpr,
                 BLOCK_F: tl.constexpr):
    # NORM (one row of x): the product of the row's RMSNorm (1) or of x + r's (2), by weight nw, as
    # ``_prenorm_scale`` says; 0: of x itself (r_D, nw_D, s_D, h_D, eps unused)
    pdl_trigger(USE_PDL)
    o_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    m_o = o_o < O
    o_n = tl.arange(0, NP)
    m_n = o_n < N
    o_b = tl.arange(0, BLOCK_D)
    p_w = w_OD + o_o.to(tl.int64)[:, None] * s_wo
    # PRELOAD (0-4) row pieces are loaded before waiting for the predecessor: the weights do not depend
    # on it, so under PDL their bytes stream while it finishes. Summed in the loop's order (piece 0
    # first), so the result is the same bits as with none.
    if PRELOAD >= 1:
        w_0 = _row_piece(p_w, m_o, o_b, 0, D, BLOCK_D)
    if PRELOAD >= 2:
        w_1 = _row_piece(p_w, m_o, o_b, 1, D, BLOCK_D)
    if PRELOAD >= 3:
        w_2 = _row_piece(p_w, m_o, o_b, 2, D, BLOCK_D)
    if PRELOAD >= 4:
        w_3 = _row_piece(p_w, m_o, o_b, 3, D, BLOCK_D)
    pdl_wait(USE_PDL)
    rstd = 1.0
    if NORM:
        rstd = _prenorm_scale(x_ND, r_D, nw_D, s_D, h_D, D, eps, NORM, ZERO_CENTERED, BLOCK_F)
    acc = tl.zeros([NP, BLOCK_O, BLOCK_D], dtype=tl.float32)
    if PRELOAD >= 1:
        acc = _add_piece(acc, w_0, x_ND, s_xn, o_n, m_n, o_b, 0, D, r_D, nw_D, rstd, BLOCK_D, NORM,
                         ZERO_CENTERED)
    if PRELOAD >= 2:
        acc = _add_piece(acc, w_1, x_ND, s_xn, o_n, m_n, o_b, 1, D, r_D, nw_D, rstd, BLOCK_D, NORM,
                         ZERO_CENTERED)
    if PRELOAD >= 3:
        acc = _add_piece(acc, w_2, x_ND, s_xn, o_n, m_n, o_b, 2, D, r_D, nw_D, rstd, BLOCK_D, NORM,
                         ZERO_CENTERED)
    if PRELOAD >= 4:
        acc = _add_piece(acc, w_3, x_ND, s_xn, o_n, m_n, o_b, 3, D, r_D, nw_D, rstd, BLOCK_D, NORM,
                         ZERO_CENTERED)
    for d0 in tl.range(PRELOAD * BLOCK_D, D, BLOCK_D, num_stages=STAGES):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        b_w = tl.load(p_w + o_d[None, :], mask=m_o[:, None] & m_d[None, :], other=0.0).to(tl.float32)
        b_x = _x_piece(x_ND, s_xn, o_n, m_n, o_d, m_d, r_D, nw_D, rstd, NORM, ZERO_CENTERED)
        acc += b_w[None, :, :] * b_x[:, None, :]
    y = tl.sum(acc, axis=2)
    tl.store(y_NO + o_n[:, None] * s_yn + o_o[None, :], y.to(y_NO.dtype.element_ty),
             mask=m_n[:, None] & m_o[None, :])


@triton.jit
def _gemv_row_kernel(x_D, w_OD, y_O, O, D, s_wo, n_rounds, r_D, nw_D, s_D, h_D, eps, BLOCK_O: tl.constexpr,
                     BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr, NORM: tl.constexpr, ZERO_CENTERED: tl.constexpr):
    # y [O] = W x for one row x [D]; program p of P owns row blocks p, p + P, ... (n_rounds of them)
    P = tl.num_programs(0)
    pdl_trigger(USE_PDL)  # trigger-first order: the successor may launch once every program has started
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    o_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    m_o = o_o < O
    # the weights do not depend on the predecessor: the first block is loaded before waiting for it
    b_w = tl.load(w_OD + o_o.to(tl.int64)[:, None] * s_wo + o_d[None, :], mask=m_o[:, None] & m_d[None, :],
                  other=0.0)
    pdl_wait(USE_PDL)  # the predecessor has finished and its writes (x) are visible
    if NORM:  # the row's norm (``_gemv_kernel``'s NORM)
        rstd = _prenorm_scale(x_D, r_D, nw_D, s_D, h_D, D, eps, NORM, ZERO_CENTERED, BLOCK_D)
        b_x = _prenorm_piece(x_D, r_D, nw_D, o_d, m_d, rstd, NORM, ZERO_CENTERED)
    else:
        b_x = tl.load(x_D + o_d, mask=m_d, other=0.0).to(tl.float32)
    for _ in range(1, n_rounds):
        n_o = o_o + P * BLOCK_O
        n_m = n_o < O
        b_next = tl.load(w_OD + n_o.to(tl.int64)[:, None] * s_wo + o_d[None, :], mask=n_m[:, None] & m_d[None, :],
                         other=0.0)  # issued before this block's sum
        y = tl.sum(b_w.to(tl.float32) * b_x[None, :], axis=1)
        tl.store(y_O + o_o, y.to(y_O.dtype.element_ty), mask=m_o)
        b_w, o_o, m_o = b_next, n_o, n_m
    y = tl.sum(b_w.to(tl.float32) * b_x[None, :], axis=1)
    tl.store(y_O + o_o, y.to(y_O.dtype.element_ty), mask=m_o)


def takes_row_kernel(x_ND: torch.Tensor, w_OD: torch.Tensor) -> bool:
    """Whether ``gemv_into`` runs x [N, D] W^T on the one-row kernel by default: one row, D <= ROW_MAX_D,
    O <= ROW_MAX_O, where kernels launch with PDL."""
    return x_ND.shape[0] == 1 and x_ND.shape[1] <= ROW_MAX_D and w_OD.shape[0] <= ROW_MAX_O and pdl(x_ND.device)


def row_launch(O: int, D: int, num_sms: int) -> tuple[int, int, int, int]:
    """(BLOCK_O, BLOCK_D, programs, rounds) of the one-row kernel."""
    bd = max(16, next_power_of_2(D))
    bo = max(1, min(ROW_ELEMENTS // bd, next_power_of_2(O)))
    blocks = cdiv(O, bo)
    programs = min(blocks, PROGRAMS_PER_SM_ROW * num_sms)
    return bo, bd, programs, cdiv(blocks, programs)


def pick_blocks(N: int, O: int, D: int, num_sms: int) -> tuple[int, int]:
    """(BLOCK_O, BLOCK_D): rows 512 wide (less for a small D), BLOCK_O from a TILE-element
    accumulator's rows down to 1 until cdiv(O, BLOCK_O) reaches PROGRAMS_PER_SM programs per SM."""
    np_ = next_power_of_2(N)
    bd = max(16, min(512, next_power_of_2(D)))
    bo = max(1, min(TILE // (np_ * bd), next_power_of_2(O)))
    while bo > 1 and cdiv(O, bo) < PROGRAMS_PER_SM * num_sms:
        bo //= 2
    return bo, bd


def gemv_into(x_ND, w_OD, y_NO, *, blocks=None, stages: int = STAGES, num_warps: int = 4,
              row: bool | None = None, preload: int | None = None, norm: tuple | None = None) -> None:
    """Launch on validated 2-D tensors (rows of x, W and y contiguous along their last dim). One row
    (D <= ROW_MAX_D) takes the one-row kernel when ``row`` is True, or by default where kernels launch
    with PDL (``utils.pdl``: without PDL this launch was slower than the block kernel); ``blocks``
    asks for the block kernel's launch; ``preload`` (0-4, default PRELOAD) its row pieces loaded before
    the PDL wait. ``norm`` = (r [1, D] or None, norm weight [D], s_out [1, D] or None, h_out [1, D], eps,
    zero_centered), for one row of x with 0 < D <= NORM_MAX_D: y = RMSNorm(x + r) W^T (RMSNorm(x) W^T
    without r), the sum stored in s_out and the norm in h_out (see ``add_rms_norm_linear``)."""
    N, D = x_ND.shape
    O = w_OD.shape[0]
    if norm is not None and (N != 1 or not 0 < D <= NORM_MAX_D):
        raise ValueError(f"norm takes one row of x with 0 < D <= {NORM_MAX_D}, got x of shape {tuple(x_ND.shape)}")
    if norm is None:
        nargs, nflags = (x_ND, x_ND, y_NO, y_NO, 0.0), dict(NORM=0, ZERO_CENTERED=False)
    else:
        r, nw, s_out, h_out, eps, zc = norm
        nargs = (x_ND if r is None else r, nw, h_out if s_out is None else s_out, h_out, float(eps))
        nflags = dict(NORM=1 if r is None else 2, ZERO_CENTERED=bool(zc))
    if N == 0 or O == 0:
        return
    if D == 0:
        y_NO.zero_()
        return
    if N == 1 and D <= ROW_MAX_D and blocks is None and (
            row is True or (row is None and takes_row_kernel(x_ND, w_OD))):
        bo, bd, programs, rounds = row_launch(O, D, _num_sms(x_ND.device))
        _gemv_row_kernel[(programs,)](x_ND, w_OD, y_NO, O, D, w_OD.stride(0), rounds, *nargs, BLOCK_O=bo,
                                      BLOCK_D=bd, num_warps=ROW_WARPS, **nflags, **pdl_launch(x_ND.device, "gemv"))
        return
    bo, bd = blocks or pick_blocks(N, O, D, _num_sms(x_ND.device))
    pre = PRELOAD if preload is None else preload
    if isinstance(pre, bool) or not isinstance(pre, int) or not 0 <= pre <= MAX_PRELOAD:
        raise ValueError(f"preload must be an int from 0 to {MAX_PRELOAD} (row pieces loaded before the PDL wait), "
                         f"got {pre!r}")
    _gemv_kernel[(cdiv(O, bo),)](
        x_ND, w_OD, y_NO, N, O, D, x_ND.stride(0), w_OD.stride(0), y_NO.stride(0), *nargs,
        NP=next_power_of_2(N), BLOCK_O=bo, BLOCK_D=bd, STAGES=stages, PRELOAD=min(pre, cdiv(D, bd)),
        BLOCK_F=next_power_of_2(D), num_warps=num_warps, **nflags, **pdl_launch(x_ND.device, "gemv"))


@torch.library.custom_op("hybridlm::decode_linear", mutates_args=())
def _decode_linear_op(x_ND: torch.Tensor, w_OD: torch.Tensor) -> torch.Tensor:
    y_NO = torch.empty(x_ND.shape[0], w_OD.shape[0], device=x_ND.device, dtype=x_ND.dtype)
    gemv_into(x_ND, w_OD, y_NO)
    return y_NO


@_decode_linear_op.register_fake
def _(x_ND, w_OD):
    return x_ND.new_empty(x_ND.shape[0], w_OD.shape[0])


def decode_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``torch.nn.functional.linear(x, weight)`` (no bias) for at most MAX_ROWS rows of x.

    Args:
        x: [..., D] float32, bfloat16 or float16; the leading dims hold at most MAX_ROWS rows.
        weight: [O, D] of x's dtype and device, rows contiguous along D (views of a stack included).

    Returns [..., O] in x's dtype, accumulated in float32. No autograd: for inference.

    Example (CUDA tensors; CPU ones only under TRITON_INTERPRET=1):
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
        >>> y = decode_linear(torch.randn(1, 64, device=dev), torch.randn(40, 64, device=dev))
    """
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got {getattr(t, 'dtype', type(t))}")
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"weight must be [O, D] with D = x's last dim; got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise TypeError(f"weight must have x's dtype and device ({x.dtype}, {x.device}), "
                        f"got {weight.dtype} on {weight.device}")
    if x.dtype == torch.float64:
        raise TypeError("x must be float32, bfloat16 or float16 for the Triton kernel, got torch.float64")
    rows = math.prod(x.shape[:-1])
    if rows > MAX_ROWS:
        raise ValueError(f"x must hold at most {MAX_ROWS} rows for decode_linear, got {rows} "
                         f"(shape {tuple(x.shape)}); use torch.nn.functional.linear")
    check_kernel_device("x", x)
    x_ND = x.reshape(rows, x.shape[-1]).contiguous()
    w_OD = weight if weight.stride(1) == 1 else weight.contiguous()
    if torch.compiler.is_compiling():
        y_NO = _decode_linear_op(x_ND, w_OD)
    else:  # eager calls launch directly (the custom-op dispatch costs more host time than the kernel)
        y_NO = torch.empty(rows, w_OD.shape[0], device=x.device, dtype=x.dtype)
        gemv_into(x_ND, w_OD, y_NO)
    return y_NO.reshape(*x.shape[:-1], w_OD.shape[0])


def add_rms_norm_linear(x: torch.Tensor, y: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                        zero_centered: bool, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A residual add, the RMSNorm after it and a projection of the norm, for one row, in one kernel.

    Returns (s, h, h W^T) for s = x + y (rounded to x's dtype, as ``x + y``; s is x when y is None) and
    h = ``norms.RMSNorm`` of s (float32 arithmetic, rounded to x's dtype; zero_centered scales by
    1 + norm_weight), exactly what ``add_rms_norm_rows`` followed by ``decode_linear`` compute, except that
    the mean of squares may sum in another order. At batch 1 the decode step's norms were kernels of
    their own between the previous product and this one; here every program of the matrix-vector
    kernel reads the row (D elements, from L2) and computes the norm itself, and program 0 writes s and
    h for the layer's other readers (the MoE experts read h).

    Args:
        x: [..., D] bfloat16, float16 or float32, one row (the leading dims hold 1 element), D <= NORM_MAX_D.
        y: x's shape and dtype, or None (no add).
        norm_weight: [D], any float dtype.
        eps: added to the mean of squares.
        zero_centered: the weight's offset form (Qwen3-Next's norms).
        weight: [O, D] of x's dtype and device, rows contiguous along D (views of a stack included).

    Returns s and h [..., D], and [..., O], all in x's dtype. No autograd: for inference. Traced by
    torch.compile it is one custom op (``hybridlm::add_rms_norm_linear``).

    Example (CUDA tensors; CPU ones only under TRITON_INTERPRET=1):
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
        >>> x, y = torch.randn(1, 64, device=dev), torch.randn(1, 64, device=dev)
        >>> s, h, out = add_rms_norm_linear(x, y, torch.ones(64, device=dev), 1e-6, False,
        ...                                 torch.randn(40, 64, device=dev))
        >>> out.shape
        torch.Size([1, 40])
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"x must be a float32, bfloat16 or float16 torch.Tensor, got {getattr(x, 'dtype', type(x))}")
    D = x.shape[-1] if x.dim() else 0
    if x.dim() < 1 or x.numel() != D or not 0 < D <= NORM_MAX_D:
        raise ValueError(f"x must hold one row of 1 to {NORM_MAX_D} elements ([..., D] with leading dims of size 1), "
                         f"got shape {tuple(x.shape)}")
    if y is not None and (not isinstance(y, torch.Tensor) or y.shape != x.shape or y.dtype != x.dtype
                          or y.device != x.device):
        raise ValueError(f"y must be None or have x's shape {tuple(x.shape)}, dtype {x.dtype} and device, got "
                         f"{tuple(getattr(y, 'shape', ()))} {getattr(y, 'dtype', type(y).__name__)}")
    if not isinstance(norm_weight, torch.Tensor) or norm_weight.shape != (D,) or not norm_weight.is_floating_point():
        raise ValueError(f"norm_weight must be a float tensor of shape ({D},) to match x's last dimension, got "
                         f"{tuple(getattr(norm_weight, 'shape', ()))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != D:
        raise ValueError(f"weight must be [O, {D}] (D = x's last dim), got {tuple(getattr(weight, 'shape', ()))}")
    if weight.dtype != x.dtype or weight.device != x.device or norm_weight.device != x.device:
        raise TypeError(f"weight and norm_weight must be on x's device ({x.device}) and weight of x's dtype "
                        f"({x.dtype}); got weight {weight.dtype} on {weight.device}, "
                        f"norm_weight on {norm_weight.device}")
    check_kernel_device("x", x)
    x_1D = x.reshape(1, D).contiguous()
    y_1D = None if y is None else y.reshape(1, D).contiguous()
    w_OD = weight if weight.stride(1) == 1 else weight.contiguous()
    nw = norm_weight.contiguous()
    if torch.compiler.is_compiling():
        s, h, out = _add_norm_linear_op(x_1D, y_1D, nw, float(eps), bool(zero_centered), w_OD)
    else:
        s, h, out = _add_norm_linear_into(x_1D, y_1D, nw, eps, zero_centered, w_OD)
    lead = x.shape[:-1]
    return (x if y is None else s.view(x.shape)), h.view(x.shape), out.view(*lead, w_OD.shape[0])


def _add_norm_linear_into(x_1D, y_1D, nw, eps, zero_centered, w_OD):
    """Launch on validated arguments; s is an empty [0] tensor without y (custom ops return no aliases)."""
    out = x_1D.new_empty(1, w_OD.shape[0])
    if w_OD.shape[0] == 0:  # no product to carry the norm: the norm kernel makes s and h
        from hybridlm.ops.triton.norm import add_rms_norm_rows, rms_norm_rows
        if y_1D is None:
            return x_1D.new_empty(0), rms_norm_rows(x_1D, nw, eps, zero_centered), out
        return *add_rms_norm_rows(x_1D, y_1D, nw, eps, zero_centered), out
    s = x_1D.new_empty(0) if y_1D is None else torch.empty_like(x_1D)
    h = torch.empty_like(x_1D)
    norm = (y_1D, nw, None if y_1D is None else s, h, eps, zero_centered)
    if takes_row_kernel(x_1D, w_OD) or NORM_LAUNCH is None:  # the default launch of either kernel
        gemv_into(x_1D, w_OD, out, norm=norm)
    else:
        bo, stages = NORM_LAUNCH
        gemv_into(x_1D, w_OD, out, norm=norm, blocks=(bo, max(16, min(512, next_power_of_2(x_1D.shape[1])))),
                  stages=stages)
    return s, h, out


@torch.library.custom_op("hybridlm::add_rms_norm_linear", mutates_args=())
def _add_norm_linear_op(x_1D: torch.Tensor, y_1D: torch.Tensor | None, nw: torch.Tensor, eps: float,
                        zero_centered: bool, w_OD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _add_norm_linear_into(x_1D, y_1D, nw, eps, zero_centered, w_OD)


@_add_norm_linear_op.register_fake
def _(x_1D, y_1D, nw, eps, zero_centered, w_OD):
    s = x_1D.new_empty(0) if y_1D is None else torch.empty_like(x_1D)
    return s, torch.empty_like(x_1D), x_1D.new_empty(1, w_OD.shape[0])
