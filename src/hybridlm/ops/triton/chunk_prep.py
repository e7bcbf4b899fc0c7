"""Per-chunk preparation of the chunked gated delta rule, parallel over chunks and value heads.

Legend: NTOK flat tokens (B * T), H q/k heads, HV value heads, K key size, C = 64 chunk length.

For each chunk and value head it computes (reference: shared/reference/gated-delta-rule.md)

    gc    = cumsum(g) inside the chunk                                  (float32)
    A     = strictly-lower part of diag(beta) (K K^T * exp(gc_i - gc_j))
    T     = (I + A)^-1                                                   (unit lower-triangular)

T is the WY transform: the state pass turns the chunk's C rank-1 delta updates into
V_new = T diag(beta) (V - diag(exp(gc)) K S), two matrix products. The inverse is built by
recursive doubling: six levels, the first an element-wise negation and the other five two dependent
64 x 64 products each on the tensor cores. Measured at the Qwen3-Next shape (B 1, T 32k, H200):
0.545 ms, against 0.70 ms with the first level as products too, 0.91 ms for doubling on the chunk's
two 32-row halves joined by T_ba = -T_bb A_ba T_aa (a sixth of the FLOPs, a longer chain: the time
is the chain of dependent products, not their FLOPs) and 0.86 ms (H100) for forward substitution on
16 x 16 blocks, whose row-by-row reductions serialise the warps. With ``half_inverse`` the doubling
products take float16 operands: the same 10-bit mantissa as tf32 (and T is stored in the inputs'
16-bit dtype in the end) at twice the tensor-core rate and half the shared-memory bytes; a chunk
whose float16 inverse overflows (not finite) is listed and redone at tf32 by a second, persistent
kernel, which otherwise only reads the list's length. It also forms M = Q K^T * exp(gc_i - gc_j), i >= j.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybridlm.ops._checks import L2NORM_EPS
from hybridlm.ops.triton.decode import _num_sms  # multiprocessor count, cached per device
from hybridlm.ops.triton.utils import CHUNK, cdiv, next_power_of_2


@triton.jit
def causal_decay(b_gc):
    """[C, C] exp(gc_i - gc_j) for i >= j, else 0 (masked before exp so nothing overflows)."""
    o = tl.arange(0, 64)
    causal = o[:, None] >= o[None, :]
    diff = b_gc[:, None] - b_gc[None, :]
    return tl.where(causal, tl.exp(tl.where(causal, diff, 0.0)), 0.0)


@triton.jit
def _inv_unit_lower64(a, PREC: tl.constexpr, HALF: tl.constexpr = False):
    """(I + a)^-1 for a strictly lower 64 x 64 a by recursive doubling of the diagonal blocks:
    with D the inverse of the diagonal s x s blocks and E the part of a that joins pairs of them,
    [[X1, 0], [L21, X2^-1]]^-1 gives D <- D - D E D for the 2s x 2s blocks (as LAPACK's trtri).

    HALF: the products take float16 operands (float32 sums) instead of ``PREC``'s: the 10-bit
    mantissa of tf32 at twice its tensor-core rate and half its shared-memory bytes. float16's range
    is the price: an entry past 65504 becomes inf and the result is not finite (the caller checks)."""
    o = tl.arange(0, 64)
    # level 0 (2 x 2 blocks, D = I) is D - D E D = I - E: no product needed
    d = tl.where(o[:, None] == o[None, :], 1.0, tl.where((o[:, None] // 2 == o[None, :] // 2), -a, 0.0))
    for lvl in tl.static_range(1, 6):
        s = 1 << lvl
        join = ((o[:, None] // (2 * s)) == (o[None, :] // (2 * s))) & ((o[:, None] // s) != (o[None, :] // s))
        e = tl.where(join, a, 0.0)
        if HALF:
            dh = d.to(tl.float16)
            d = d - tl.dot(dh, tl.dot(e.to(tl.float16), dh).to(tl.float16))
        else:
            d = d - tl.dot(d, tl.dot(e, d, input_precision=PREC), input_precision=PREC)
    return d


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
    l2norm_rows_kernel[(cdiv(n_rows, BR),)](x, y, n_rows, D=D, BD=max(16, next_power_of_2(D)),
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
    qk_grad_kernel[(cdiv(n_rows, BR),)](x, dy, dx, n_rows, R=R, D=D, BD=max(16, next_power_of_2(D)),
                                               BR=BR, NORM=normalized, EPS=L2NORM_EPS, num_warps=4)
    return dx


@triton.jit
def chunk_prep_kernel(
    q_ptr, k_ptr, g_ptr, beta_ptr, gc_ptr, t_ptr, m_ptr, vec_ptr, chunk_bounds, redo_count, redo_list,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
    NORM: tl.constexpr, EPS: tl.constexpr, HALF_INV: tl.constexpr,
):
    # value heads vary fastest, so the heads of one q/k group read their shared q, k tiles from L2
    _prep_chunk(tl.program_id(1), tl.program_id(0), q_ptr, k_ptr, g_ptr, beta_ptr, gc_ptr, t_ptr, m_ptr, vec_ptr,
                chunk_bounds, redo_count, redo_list, H, HV, K, BK, PREC, NORM, EPS, HALF_INV)


@triton.jit
def chunk_prep_redo_kernel(
    q_ptr, k_ptr, g_ptr, beta_ptr, gc_ptr, t_ptr, m_ptr, vec_ptr, chunk_bounds, redo_count, redo_list,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
    NORM: tl.constexpr, EPS: tl.constexpr,
):
    """The (chunk, value head) pairs whose float16 inverse was not finite, again at PREC; a fixed
    grid that loops over however many the prep listed (none, as a rule: each program reads the
    count and ends)."""
    n = tl.load(redo_count)
    for j in range(tl.program_id(0), n, tl.num_programs(0)):
        item = tl.load(redo_list + j)
        _prep_chunk(item // HV, item % HV, q_ptr, k_ptr, g_ptr, beta_ptr, gc_ptr, t_ptr, m_ptr, vec_ptr,
                    chunk_bounds, redo_count, redo_list, H, HV, K, BK, PREC, NORM, EPS, False)


@triton.jit
def _prep_chunk(i_c, i_hv, q_ptr, k_ptr, g_ptr, beta_ptr, gc_ptr, t_ptr, m_ptr, vec_ptr, chunk_bounds,
                redo_count, redo_list, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
                PREC: tl.constexpr, NORM: tl.constexpr, EPS: tl.constexpr, HALF_INV: tl.constexpr):
    """gc, the vectors, M and T of chunk ``i_c`` at value head ``i_hv``. HALF_INV: T from float16
    products; if an entry is not finite the pair is appended to ``redo_list`` (``redo_count`` its
    length) for ``chunk_prep_redo_kernel``."""
    i_h = i_hv // (HV // H)
    bos = tl.load(chunk_bounds + 2 * i_c)
    eos = tl.load(chunk_bounds + 2 * i_c + 1)
    o_t = bos + tl.arange(0, 64)
    m_t = o_t < eos
    o_k = tl.arange(0, BK)
    row_qk = o_t[:, None].to(tl.int64) * (H * K) + i_h * K + o_k[None, :]
    m_qk = m_t[:, None] & (o_k < K)[None, :]
    b_q = tl.load(q_ptr + row_qk, mask=m_qk, other=0.0)
    b_k = tl.load(k_ptr + row_qk, mask=m_qk, other=0.0)
    row_hv = o_t.to(tl.int64) * HV + i_hv
    b_gc = tl.cumsum(tl.load(g_ptr + row_hv, mask=m_t, other=0.0).to(tl.float32), 0)
    tl.store(gc_ptr + row_hv, b_gc, mask=m_t)
    b_beta = tl.load(beta_ptr + row_hv, mask=m_t, other=0.0).to(tl.float32)
    o_c = tl.arange(0, 64)
    # the state pass's per-row vectors, chunk-major: one contiguous [64, 4] block (gc with padding
    # rows at gc_last, beta, rq, rk; padding rows 0) per chunk and value head, where the
    # token-major [NTOK, HV] arrays give it 64 rows that each sit in their own cache sector
    p_vec = (i_c.to(tl.int64) * HV + i_hv) * 256 + o_c * 4
    b_gl = tl.sum(tl.where(o_c == eos - bos - 1, b_gc, 0.0), 0)
    tl.store(vec_ptr + p_vec, tl.where(m_t, b_gc, b_gl))
    tl.store(vec_ptr + p_vec + 1, b_beta)

    b_decay = causal_decay(b_gc)
    if NORM:
        # the l2-norm as row scales of the products (q_n k_n^T = diag(rq) q k^T diag(rk)), in float32;
        # the state pass reads the scales, so normalised copies of q and k are never written
        b_rq = tl.rsqrt(tl.sum(b_q.to(tl.float32) * b_q.to(tl.float32), 1) + EPS)
        b_rk = tl.rsqrt(tl.sum(b_k.to(tl.float32) * b_k.to(tl.float32), 1) + EPS)
        tl.store(vec_ptr + p_vec + 2, tl.where(m_t, b_rq, 0.0))
        tl.store(vec_ptr + p_vec + 3, tl.where(m_t, b_rk, 0.0))
    else:
        tl.store(vec_ptr + p_vec + 2, tl.where(m_t, 1.0, 0.0))
        tl.store(vec_ptr + p_vec + 3, tl.where(m_t, 1.0, 0.0))
    # M and K K^T first, so the q and k tiles are dead before the inverse's chain of products
    # (held across it, they cost 64 registers a thread and a third of the programs per SM)
    p_cc = row_hv[:, None] * 64 + o_c[None, :]
    b_m = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * b_decay
    if NORM:
        b_m = b_m * b_rq[:, None] * b_rk[None, :]
    tl.store(m_ptr + p_cc, b_m.to(m_ptr.dtype.element_ty), mask=m_t[:, None])
    b_kk = tl.dot(b_k, tl.trans(b_k), input_precision=PREC) * b_decay
    if NORM:
        b_kk = b_kk * b_rk[:, None] * b_rk[None, :]
    strict = o_c[:, None] > o_c[None, :]
    b_a = tl.where(strict, b_kk * b_beta[:, None], 0.0)
    if HALF_INV:
        b_t = _inv_unit_lower64(b_a, PREC, True)
        # an entry not finite (inf, or NaN, which fails every comparison): a float16 operand
        # overflowed; the pair is redone at PREC by the next kernel. (A max would not do: it may
        # skip NaNs. Redone in this program, the second chain's code spilled: 255 registers.)
        finite = tl.abs(b_t) < float("inf")
        if tl.sum(tl.sum(tl.where(finite, 0, 1), 1), 0) > 0:
            slot = tl.atomic_add(redo_count, 1)
            tl.store(redo_list + slot, i_c * HV + i_hv)
    else:
        b_t = _inv_unit_lower64(b_a, PREC)
    tl.store(t_ptr + p_cc, b_t.to(t_ptr.dtype.element_ty), mask=m_t[:, None])


# chunk_prep's default for 16-bit inputs: the inverse's products on float16 operands. Measured on an
# H100 (2026-12-05, Qwen3-Next heads, B 1, T 32k, l2-norm fused): prep 0.578 -> 0.447 ms, op forward
# 1.291 -> 1.160 ms (`benchmarks/experiments/forward_ab.py --half-inverse` times both in one process).
HALF_INVERSE = True


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get exact float32 products; 16-bit inputs use the tensor cores (float32 sums)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def chunk_prep(q_NHK: torch.Tensor, k_NHK: torch.Tensor, g_NHV: torch.Tensor, beta_NHV: torch.Tensor,
               chunk_bounds: torch.Tensor, HV: int, num_warps: int = 4, l2norm: bool = False,
               vec_chunks: int = 0, maxnreg: int | str | None = "auto", half_inverse: bool | None = None):
    """Cumulative in-chunk log-decay, the WY transform and the causal decayed Q K^T of every chunk.

    Args:
        q_NHK, k_NHK: [NTOK, H, K] queries and keys (flat tokens), float32/bfloat16/float16, contiguous.
        g_NHV: [NTOK, HV] log-decay, any float dtype. beta_NHV: [NTOK, HV] write strength.
        chunk_bounds: int32 [NC, 2] flat token range of each chunk (``utils.sequence_tables``).
        l2norm: treat q and k as l2-normalised over K (``_checks.l2norm``, float32): the products
            are scaled by the rows' inverse norms, which ``vec`` carries to the state pass.
        vec_chunks: allocate vec with this many chunk rows when more than NC (rows past NC unused).
        maxnreg: cap on registers per thread (ptxas spills past it); None: no cap. At 4 warps the
            kernel takes 177-182 registers on sm_90, so 2 programs share a multiprocessor; 168 fits
            3 with 56 bytes of local memory a thread, 128 fits 4 with 224. "auto": 168 on compute
            capability 9 at 4 warps (H200, Qwen3-Next heads, B 1, T 32k, l2-norm fused: 0.582 ms
            against 0.663 uncapped and 0.616 at 128), else no cap. With the float16 inverse the
            kernel takes 186 registers uncapped, 168 with 40 bytes of local memory (H100: 0.447 ms
            at 168, 0.534 uncapped, 0.848 at 128).
        half_inverse: the inverse's doubling products on float16 operands (tf32's mantissa, float32
            sums), a chunk whose result is not finite redone at tf32; None: ``HALF_INVERSE`` for
            16-bit inputs (T is stored in their dtype, so tf32's products round it no finer), never
            for float32.
    Returns:
        gc: float32 [NTOK, HV] cumulative sum of g from each chunk's start.
        t: [NTOK, HV, 64] row i of its chunk's (I + A)^-1, in k's dtype (float32 stays float32).
        m: [NTOK, HV, 64] row i of its chunk's (Q K^T * exp(gc_i - gc_j), i >= j), in k's dtype.
        vec: float32 [max(NC, vec_chunks), HV, 64, 4] per chunk, value head and row: gc (padding
            rows: the chunk's last gc), beta, and the inverse l2-norms of q's and k's rows with
            ``l2norm`` (else 1); padding rows 0 but for gc.
    """
    NTOK, H, K = k_NHK.shape
    gc = torch.empty(NTOK, HV, device=k_NHK.device, dtype=torch.float32)
    t = torch.empty(NTOK, HV, CHUNK, device=k_NHK.device, dtype=k_NHK.dtype)
    m = torch.empty_like(t)
    NC = chunk_bounds.shape[0]
    vec = torch.empty(max(NC, vec_chunks), HV, CHUNK, 4, device=k_NHK.device, dtype=torch.float32)
    if maxnreg == "auto":
        hopper = k_NHK.is_cuda and torch.cuda.get_device_capability(k_NHK.device)[0] == 9
        maxnreg = 168 if hopper and num_warps == 4 else None
    half = (HALF_INVERSE and k_NHK.dtype != torch.float32) if half_inverse is None else half_inverse
    redo_count = torch.zeros(1, device=k_NHK.device, dtype=torch.int32) if half else None
    redo_list = torch.empty(NC * HV, device=k_NHK.device, dtype=torch.int32) if half else None
    args = (q_NHK, k_NHK, g_NHV, beta_NHV, gc, t, m, vec, chunk_bounds, redo_count, redo_list)
    const = dict(H=H, HV=HV, K=K, BK=max(16, next_power_of_2(K)), PREC=dot_precision(k_NHK.dtype), NORM=l2norm,
                 EPS=L2NORM_EPS)
    chunk_prep_kernel[(HV, NC)](*args, **const, HALF_INV=half, num_warps=num_warps,
                                **({} if maxnreg is None else dict(maxnreg=maxnreg)))
    if half:
        chunk_prep_redo_kernel[(min(NC * HV, _num_sms(k_NHK.device)),)](*args, **const, num_warps=num_warps)
    return gc, t, m, vec
