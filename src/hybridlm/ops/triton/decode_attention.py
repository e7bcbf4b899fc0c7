"""Triton split-KV ("flash-decoding") softmax attention: one query per sequence against a KV cache.

Legend: B batch, S cache slots, H query heads, HKV key/value heads, R = H // HKV query heads per
key/value head, D head dim, Dv value head dim. Semantics as :func:`hybridlm.ops.softmax_attention_decode`.

At decode a query is one row per head, far too little work for a card when a program owns a whole
(sequence, head): at batch 1 a handful of programs would stream the cache through a few
multiprocessors. So the S axis is cut into NSPLIT contiguous ranges and the grid is
(B * HKV, NSPLIT): each program takes the R query heads of one key/value head (padded to 16 rows so
``tl.dot`` applies; GQA reads each key once for all R heads) and one range of slots, runs an online
softmax in float32 over BLOCK_S-slot blocks, and writes its partial (unnormalised output, running
max, running sum) to float32 scratch. A second small kernel merges the NSPLIT partials of each
(sequence, query head), in one pipelined pass; at small batch its programs split a row's value
columns, so a batch-1 merge is not left to 8-16 programs (:func:`combine_plan`). With NSPLIT = 1
(large batches already fill the card) the first kernel normalises and writes the output itself.

Each block loads its slot positions, then its keys and values masked by visibility: an empty slot is
never read, whatever it holds. By default every block runs, visible or not, so the loop's loads are
software-pipelined (3 stages) and a split streams its range at the copy rate; a block with no visible
slot still costs its two small products (a large, mostly empty preallocated cache pays them; the
``skip_empty`` launch branches around such blocks instead, at the price of unpipelined loads: on an
H200 at head dim 256 it read a full 1M-slot cache at 45% of the copy rate, against 100% pipelined).

The op is registered with ``torch.library`` (``hybridlm::softmax_attention_decode``) so
``torch.compile(fullgraph=True)`` traces through it; it reads no tensor values on the host and every
shape it allocates depends only on input shapes, so a CUDA graph can capture it.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from hybridlm.ops._checks import check_kernel_device
from hybridlm.ops.decode_attention import check_decode_attention
from hybridlm.ops.triton.decode import _num_sms  # multiprocessor count, cached per device
from hybridlm.ops.triton.utils import cdiv, next_power_of_2, pdl_launch, pdl_start

LOG2E = tl.constexpr(1.4426950408889634)
# Waves of resident programs the split kernel should run (latency hiding wants several loads in flight
# per SM; a program's pipeline prologue wants a few blocks). A multiprocessor holds as many programs
# as its shared memory fits pipelined tiles (SMEM_PER_SM): one at head dim 256 (3 stages of 64-slot
# blocks, 192 KB), two at 128. Measured on an H200 (bf16, benchmarks/experiments/decode_attn_sweep.py):
# at head dim 256, 2 / 4 / 8 programs per SM gave 54 / 63 / 50% of the copy rate at B 1, S 128k and
# 63 / 87 / 83% at B 8, S 32k; at head dim 128 (8 heads, 8 key/value heads) 4 / 8 per SM gave
# 73 / 84% at B 1, S 128k and 85 / 99% at B 1, S 1M.
WAVES = 4
SMEM_PER_SM = 227 * 1024
# The last wave's share of a full one that a split count must reach (see pick_num_splits): at head dim
# 256 and B 1, S 128k, 293 splits (586 programs, 4.44 waves of 132) read 61% of the copy rate and 256
# (3.88 waves) 69%; at B 8, S 32k, 35 splits 72% and 32 87%.
MIN_WAVE_FILL = 0.95
MIN_ROWS = 16  # tl.dot needs at least 16 rows


@triton.jit
def _attend_block(b_q, p_k, p_v, o_b, o_d, o_dv, m_d, m_dv, vis, sk_s, sk_d, sv_s, sv_d, b_m, b_l, b_acc,
                  qk_scale, PRECISION: tl.constexpr):
    """One block of slots into the online softmax: (running max, running sum, unnormalised output)."""
    b_k = tl.load(p_k + o_b[:, None] * sk_s + o_d[None, :] * sk_d, mask=vis[:, None] & m_d[None, :], other=0.0)
    b_v = tl.load(p_v + o_b[:, None] * sv_s + o_dv[None, :] * sv_d, mask=vis[:, None] & m_dv[None, :], other=0.0)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)
    b_s = tl.where(vis[None, :], b_s * qk_scale, float("-inf"))
    # padded rows (q = 0) score 0 at visible slots; a block with no visible slot (run without the
    # skip branch) has max -inf: keep the old max, add weights of 0
    m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(b_m - m_safe)
    b_p = tl.exp2(b_s - m_safe[:, None])
    b_l = b_l * alpha + tl.sum(b_p, axis=1)
    b_acc = b_acc * alpha[:, None] + tl.dot(b_p.to(b_k.dtype), b_v, input_precision=PRECISION)
    return m_new, b_l, b_acc


@triton.jit
def _split_kv_kernel(
    q, k, v, q_pos, k_pos, part_acc, part_m, part_l, o,
    scale, window, S, blocks_per_split, n_splits,
    sq_b, sq_h, sq_d, sk_b, sk_s, sk_h, sk_d, sv_b, sv_s, sv_h, sv_d, sqp_b, skp_b, skp_s,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_R: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr, FINAL: tl.constexpr,
    SKIP_EMPTY: tl.constexpr, STAGES: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_start(USE_PDL)
    R: tl.constexpr = H // HKV
    i_bk = tl.program_id(0)
    i_split = tl.program_id(1)
    # int64 bases: B * S * HKV * D passes 2**31 for long caches
    i_b = (i_bk // HKV).to(tl.int64)
    i_kh = (i_bk % HKV).to(tl.int64)

    o_r = tl.arange(0, BLOCK_R)
    o_d = tl.arange(0, BD)
    o_dv = tl.arange(0, BDV)
    m_r = o_r < R
    m_d = o_d < D
    m_dv = o_dv < DV
    heads = i_kh * R + o_r  # the query heads that read this key/value head

    b_q = tl.load(q + i_b * sq_b + heads[:, None] * sq_h + o_d[None, :] * sq_d,
                  mask=m_r[:, None] & m_d[None, :], other=0.0)
    qp = tl.load(q_pos + i_b * sqp_b)

    start = i_split * blocks_per_split * BLOCK_S
    end = tl.minimum(start + blocks_per_split * BLOCK_S, S)
    b_m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_R], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_R, BDV], dtype=tl.float32)
    qk_scale = scale * LOG2E  # exp2 in the loop
    # int64 only in the block pointers (scalars); int32 offsets within a block (64-bit offset tiles
    # take two registers an element and spilled at D = 256)
    o_b = tl.arange(0, BLOCK_S)
    p_kp = k_pos + i_b * skp_b + start.to(tl.int64) * skp_s
    p_k = k + i_b * sk_b + i_kh * sk_h + start.to(tl.int64) * sk_s
    p_v = v + i_b * sv_b + i_kh * sv_h + start.to(tl.int64) * sv_s
    for s0 in tl.range(start, end, BLOCK_S, num_stages=STAGES):
        m_s = s0 + o_b < end
        kp = tl.load(p_kp + o_b * skp_s, mask=m_s, other=-1)
        vis = m_s & (kp >= 0) & (kp <= qp)
        if HAS_WINDOW:
            vis = vis & (qp - kp < window)
        if SKIP_EMPTY:
            # Every row of the program shares the query position, so a block is seen by all rows or
            # none; a block with no visible slot skips its loads and products (but loads inside a
            # branch are not software-pipelined: each block waits for its positions, then its keys)
            if tl.max(vis.to(tl.int32), axis=0) > 0:
                b_m, b_l, b_acc = _attend_block(b_q, p_k, p_v, o_b, o_d, o_dv, m_d, m_dv, vis, sk_s, sk_d,
                                                sv_s, sv_d, b_m, b_l, b_acc, qk_scale, PRECISION)
        else:
            # masked loads of invisible slots read nothing, and the pipeliner overlaps the next
            # blocks' loads with this block's products; an all-invisible block costs its products
            b_m, b_l, b_acc = _attend_block(b_q, p_k, p_v, o_b, o_d, o_dv, m_d, m_dv, vis, sk_s, sk_d,
                                            sv_s, sv_d, b_m, b_l, b_acc, qk_scale, PRECISION)
        p_kp += BLOCK_S * skp_s
        p_k += BLOCK_S * sk_s
        p_v += BLOCK_S * sv_s

    m_out = m_r[:, None] & m_dv[None, :]
    if FINAL:
        b_o = b_acc / tl.where(b_l > 0, b_l, 1.0)[:, None]  # no visible slot: acc = 0, so o = 0
        tl.store(o + (i_b * H + heads[:, None]) * DV + o_dv[None, :], b_o.to(o.dtype.element_ty), mask=m_out)
    else:
        row = (i_b * H + heads) * n_splits + i_split
        tl.store(part_acc + row[:, None] * DV + o_dv[None, :], b_acc, mask=m_out)
        tl.store(part_m + row, b_m, mask=m_r)
        tl.store(part_l + row, b_l, mask=m_r)


@triton.jit
def _combine_kernel(part_acc, part_m, part_l, o, n_splits, DV: tl.constexpr, BDV: tl.constexpr,
                    BN: tl.constexpr, STAGES: tl.constexpr, USE_PDL: tl.constexpr):
    """o[b, h] = sum_j 2^(m_j - M) acc_j / sum_j 2^(m_j - M) l_j over the splits j of one (b, h).

    One pass over the splits, BN at a time, with a running maximum (the sums so far are rescaled when
    it grows), software-pipelined STAGES deep: with hundreds of splits (one key/value head at batch
    1) a loop that waits for each group's loads was most of the call (43 dependent 8 KB loads at 683
    splits). Program (i_bh, i_dv) writes value columns [i_dv * BDV, (i_dv + 1) * BDV): a few rows
    (batch 1) would otherwise stream all their partials through a few multiprocessors; each
    program recomputes the row's weights (the split maxima and sums are a small share of its
    loads)."""
    pdl_start(USE_PDL)
    i_bh = tl.program_id(0).to(tl.int64)
    o_n = tl.arange(0, BN)
    o_dv = tl.program_id(1) * BDV + tl.arange(0, BDV)
    m_dv = o_dv < DV
    base = i_bh * n_splits
    m_run = tl.full([1], float("-inf"), tl.float32)
    b_l = tl.zeros([BN], dtype=tl.float32)
    b_acc = tl.zeros([BN, BDV], dtype=tl.float32)
    for n0 in tl.range(0, n_splits, BN, num_stages=STAGES):
        m_n = n0 + o_n < n_splits
        b_m = tl.load(part_m + base + n0 + o_n, mask=m_n, other=float("-inf"))
        a = tl.load(part_acc + (base + n0 + o_n)[:, None] * DV + o_dv[None, :],
                    mask=m_n[:, None] & m_dv[None, :], other=0.0)
        l_j = tl.load(part_l + base + n0 + o_n, mask=m_n, other=0.0)
        m_new = tl.maximum(m_run, tl.max(b_m, axis=0))
        # no split so far saw a key: keep every weight 0 (and avoid -inf - -inf)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_run - m_ref)
        w = tl.exp2(b_m - m_ref)
        b_l = b_l * alpha + w * l_j
        b_acc = b_acc * alpha[:, None] + w[:, None] * a
        m_run = m_new
    l_sum = tl.sum(b_l, axis=0)
    b_o = tl.sum(b_acc, axis=0) / tl.where(l_sum > 0, l_sum, 1.0)
    tl.store(o + i_bh * DV + o_dv, b_o.to(o.dtype.element_ty), mask=m_dv)


# Bytes of one block's key and value rows (padded head dims): the shared memory a pipelined block
# takes grows with it; at 64 KB every launch compiled offline for sm_90 (Triton 3.6: head dims 64 to
# 1024, bf16 and float32) stays within 76-131 KB of a block's 227 KB.
TILE_BYTES = 64 * 1024


def launch_config(D: int, Dv: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(slots per block, warps, pipeline stages) of the split kernel: the largest block of 64, 32 or
    16 slots whose key and value rows fit TILE_BYTES, 8 warps for heads wider than 128 (4 otherwise),
    3 stages for 16-bit caches and 2 for float32 (1 when even 16 slots exceed TILE_BYTES).

    Measured on an H200 at head dim 256, bf16 (decode_attn_sweep.py, 4 programs per SM): 63 / 100 /
    87 / 91% of the copy rate at (B 1, S 128k) / (1, 1M) / (8, 32k) / (40, 128k); the earlier
    default (32-slot blocks, 4 warps, branching around empty blocks, 2 programs per SM) read 53 / 45 /
    39 / 45% (46 / 67 / 62 / 53% at 4 per SM). Other head dims are not yet timed on a GPU."""
    row = (max(16, next_power_of_2(D)) + max(16, next_power_of_2(Dv))) * dtype.itemsize
    block = next((b for b in (64, 32, 16) if b * row <= TILE_BYTES), 16)
    stages = (3 if dtype.itemsize <= 2 else 2) if block * row <= TILE_BYTES else 1
    return block, (8 if max(D, Dv) > 128 else 4), stages


@functools.lru_cache(maxsize=1024)
def pick_num_splits(B: int, HKV: int, S: int, num_sms: int, block_s: int, resident: int = 1) -> int:
    """NSPLIT for the shape: about WAVES waves of ``resident`` programs per multiprocessor, with
    the last wave nearly full.

    Every split holds whole blocks of ``block_s`` slots (so only some counts are realisable) and
    each (sequence, key/value head, split) is one program. Among the realisable counts from half to
    twice the target, the one nearest the target whose programs fill their last wave to at least
    MIN_WAVE_FILL (a wave a quarter full costs as long as a full one), else the fullest."""
    n_blocks = max(1, cdiv(S, block_s))
    rows = max(1, B * HKV)
    wave = max(1, resident) * num_sms
    want = max(1.0, min(WAVES * wave / rows, n_blocks))

    def fill(n: int) -> float:
        waves = rows * n / wave
        return waves / math.ceil(waves)

    counts = sorted({cdiv(n_blocks, cdiv(n_blocks, n))
                     for n in range(max(1, int(want // 2)), min(n_blocks, int(2 * want)) + 1)})
    full = [n for n in counts if fill(n) >= MIN_WAVE_FILL]
    if full:
        return min(full, key=lambda n: abs(math.log(n / want)))
    return max(counts, key=lambda n: (fill(n), -abs(math.log(n / want))))


def resident_programs(block_s: int, D: int, Dv: int, dtype: torch.dtype, stages: int) -> int:
    """Split programs one multiprocessor holds, by the shared memory of their pipelined tiles."""
    row = (max(16, next_power_of_2(D)) + max(16, next_power_of_2(Dv))) * dtype.itemsize
    return max(1, min(4, SMEM_PER_SM // max(1, max(1, stages) * block_s * row)))


def alloc_partials(B: int, H: int, n: int, Dv: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 scratch for n split partials: (acc [B, H, n, Dv], running max [B, H, n], sum [B, H, n])."""
    return (torch.empty(B, H, n, Dv, device=device, dtype=torch.float32),
            torch.empty(B, H, n, device=device, dtype=torch.float32),
            torch.empty(B, H, n, device=device, dtype=torch.float32))


def split_plan(q, k, v, n_splits: Optional[int] = None, block_s: Optional[int] = None) -> tuple[int, int, int]:
    """(NSPLIT, blocks per split, BLOCK_S) for these operands; ``n_splits`` overrides the heuristic
    and is capped at one split per block (and trimmed so no split is empty); ``block_s`` overrides
    :func:`launch_config`'s."""
    B, S, HKV = k.shape[:3]
    block, _, stages = launch_config(q.shape[2], v.shape[3], k.dtype)
    bs = block_s or block
    n_blocks = max(1, cdiv(S, bs))
    if n_splits is None:
        resident = resident_programs(bs, q.shape[2], v.shape[3], k.dtype, stages)
        n = pick_num_splits(B, HKV, S, _num_sms(q.device), bs, resident)
    else:
        n = min(n_splits, n_blocks)
    per_split = cdiv(n_blocks, max(1, n))
    return cdiv(n_blocks, per_split), per_split, bs


def decode_attention_into(q, k, v, q_pos, k_pos, o, *, scale: float, window: Optional[int],
                          n_splits: Optional[int] = None, partials=None, num_warps: Optional[int] = None,
                          block_s: Optional[int] = None, skip_empty: bool = False,
                          num_stages: Optional[int] = None) -> None:
    """Launch on validated tensors, writing ``o`` [B, H, Dv] (contiguous). ``n_splits`` overrides
    NSPLIT (tests, tuning); ``partials`` is scratch from :func:`alloc_partials` for
    :func:`split_plan`'s NSPLIT (allocated here when None), used only when NSPLIT > 1.
    ``num_warps``, ``block_s`` (slots per block), ``skip_empty`` (branch around blocks with no
    visible slot, or run them masked so the loop's loads can be software-pipelined ``num_stages``
    deep) are launch choices for tuning (None: :func:`launch_config`'s); every choice computes the
    same result."""
    B, H, D = q.shape
    HKV, Dv = k.shape[2], v.shape[3]
    if B == 0 or H == 0:
        return
    block, warps, stages = launch_config(D, Dv, k.dtype)
    num_warps, num_stages = num_warps or warps, num_stages or stages
    n, per_split, bs = split_plan(q, k, v, n_splits, block_s or block)
    if n > 1 and partials is None:
        partials = alloc_partials(B, H, n, Dv, q.device)
    if n > 1 and tuple(partials[0].shape) != (B, H, n, Dv):
        raise ValueError(f"partials must be scratch for {n} splits, [B, H, n, Dv] = {(B, H, n, Dv)}, got "
                         f"{tuple(partials[0].shape)}")
    part_acc, part_m, part_l = partials if n > 1 else (o, o, o)
    _split_kv_kernel[(B * HKV, n)](
        q, k, v, q_pos, k_pos, part_acc, part_m, part_l, o,
        scale, window or 0, k.shape[1], per_split, n,
        *q.stride(), *k.stride(), *v.stride(), q_pos.stride(0), *k_pos.stride(),
        H=H, HKV=HKV, D=D, DV=Dv, BLOCK_R=max(MIN_ROWS, next_power_of_2(H // HKV)),
        BD=max(16, next_power_of_2(D)), BDV=max(16, next_power_of_2(Dv)), BLOCK_S=bs,
        # float32 inputs keep float32 products (no TF32), as the reference computes
        HAS_WINDOW=window is not None, PRECISION="ieee" if q.dtype == torch.float32 else "tf32", FINAL=n == 1,
        SKIP_EMPTY=skip_empty, STAGES=num_stages, num_warps=num_warps, **pdl_launch(q.device, "split_kv"),
    )
    if n > 1:
        combine_into(part_acc, part_m, part_l, o, B * H, n, Dv, _num_sms(q.device))


# Narrowest value-column block of a combine program: 32 float32 columns, one 128-byte row piece
MIN_COMBINE_COLS = 32


def combine_plan(rows: int, n: int, Dv: int, num_sms: int, block_dv: Optional[int] = None) -> tuple[int, int]:
    """(value columns per combine program, splits per loop step) for ``rows`` (sequence, query head)
    rows of ``n`` partials. Unless ``block_dv`` sets them, the columns halve from the whole row down
    to MIN_COMBINE_COLS until the grid has a program per two multiprocessors (on an H200, 128 rows x
    32 splits took 3.36 us whole and 3.70 split in two; 8 rows x 1024 splits at head dim 128, 21.8
    us whole and 8.5 in 32-column pieces; benchmarks/experiments/combine_ab.py). A step takes up to
    64 splits and at most 4K float32 partial elements (16 KB a pipeline stage: compiled offline for
    sm_90, 112-168 registers and no spills at head dims 64-256; 8K spilled)."""
    bdv = block_dv or next_power_of_2(Dv)
    while block_dv is None and bdv > MIN_COMBINE_COLS and 2 * rows * cdiv(Dv, bdv) < num_sms:
        bdv //= 2
    return bdv, max(1, min(64, 4096 // bdv, next_power_of_2(n)))


def combine_into(part_acc, part_m, part_l, o, rows: int, n: int, Dv: int, num_sms: int,
                 block_dv: Optional[int] = None) -> None:
    """Merge ``n`` split partials per row into ``o`` [rows, Dv]; ``block_dv`` overrides
    :func:`combine_plan`'s columns per program (tests, benchmarks)."""
    bdv, bn = combine_plan(rows, n, Dv, num_sms, block_dv)
    _combine_kernel[(rows, cdiv(Dv, bdv))](part_acc, part_m, part_l, o, n, DV=Dv, BDV=bdv, BN=bn,
                                                   STAGES=3, num_warps=4, **pdl_launch(o.device, "combine"))


@torch.library.custom_op("hybridlm::softmax_attention_decode", mutates_args=())
def _decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                         k_pos: torch.Tensor, scale: float, window: Optional[int],
                         n_splits: Optional[int]) -> torch.Tensor:
    o = q.new_empty(q.shape[0], q.shape[1], v.shape[3])
    decode_attention_into(q, k, v, q_pos, k_pos, o, scale=scale, window=window, n_splits=n_splits)
    return o


@_decode_attention_op.register_fake
def _(q, k, v, q_pos, k_pos, scale, window, n_splits):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[3])


def split_kv_decode_attention(q, k, v, *, q_pos, k_pos, scale=None, window=None, num_splits=None):
    """Split-KV decode attention; arguments and result as in :func:`hybridlm.ops.softmax_attention_decode`.

    ``num_splits`` forces NSPLIT (capped at one per block of slots); by default it comes from
    :func:`pick_num_splits` for the shape and the device's multiprocessor count. Computes in float32,
    so float64 inputs are refused (the reference serves them).

    Example (CUDA tensors; CPU ones only under TRITON_INTERPRET=1):
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
        >>> q, k = torch.randn(1, 4, 16, device=dev), torch.randn(1, 100, 2, 16, device=dev)
        >>> v = torch.randn(1, 100, 2, 16, device=dev)
        >>> k_pos = torch.arange(100, device=dev)[None]
        >>> k_pos = k_pos.masked_fill(k_pos > 70, -1)
        >>> o = split_kv_decode_attention(q, k, v, q_pos=torch.tensor([70], device=dev), k_pos=k_pos, num_splits=2)
    """
    check_decode_attention(q, k, v, q_pos, k_pos, scale, window)
    check_kernel_device("q", q)
    if q.dtype == torch.float64:
        raise TypeError("q must be float32, bfloat16 or float16 for the Triton kernel, got torch.float64; "
                        "use backend='reference'")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not torch.compiler.is_compiling():
        # Eager calls launch directly: the custom-op dispatch costs tens of microseconds of host time,
        # as much as the kernel at small batch (see ops/triton/decode.py).
        o = q.new_empty(q.shape[0], q.shape[1], v.shape[3])
        decode_attention_into(q, k, v, q_pos, k_pos, o, scale=scale, window=window, n_splits=num_splits)
        return o
    return _decode_attention_op(q, k, v, q_pos, k_pos, scale, window, num_splits)
