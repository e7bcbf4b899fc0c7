"""Greedy token choice for the decode step, in one Triton kernel: argmax of each row of logits,
written into the step's token buffer and a token history, and the slot counter advanced.

In the compiled batch-1 step on an H100 (``benchmarks/step_trace.py``, data/2026-12-05-h100-s2/trace.txt)
the step ended with torch's argmax (one reduction kernel, 8.9 us for a 151,936-token vocabulary),
a copy into the token buffer, the slot's ``+= 1`` and, between graph replays, a copy of the token
into the output: four launches after the last product. This kernel does all of it in one launch,
each row's vocabulary split over P programs (``StaticDecoder``'s default on CUDA; H100, compiled 4k
batch-1 step, first 12-06 session: 288.2-288.4 tokens/s against 287.4-287.7 with torch's argmax).

Program (p, b) reduces its slice of row b to (largest value, its first index, first NaN index),
writes them to ``scratch``, and takes a ticket from row b's counter. The last program of the row to
arrive reads the row's P partials and writes the token: the first NaN if any (``torch.argmax``
treats NaN as the largest value), else the first index of the largest value, ties to the lowest
index, as ``torch.argmax``. It then takes a ticket from the rows' counter; the last row's writer
advances ``slot`` by one. Every counter is left at zero for the next call, so the scratch serves a
CUDA graph's replays.

:func:`greedy_token_reference` is the same contract in PyTorch (any device).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from hybridlm.ops._checks import check_kernel_device
from hybridlm.ops.triton.utils import cdiv, next_power_of_2

BLOCK = 1024  # logits a program reads per loop step (8 a thread at 4 warps)
SLICE = 4096  # logits a program reduces, at most MAX_PROGRAMS programs a row
MAX_PROGRAMS = 64


@dataclass
class GreedyScratch:
    """Per-call scratch of :func:`greedy_token_`: partial results and counters (zero between calls)."""
    part_v: torch.Tensor  # [B, P] float32 largest value of each program's slice
    part_i: torch.Tensor  # [B, P] int32 its first index
    part_n: torch.Tensor  # [B, P] int32 the slice's first NaN index
    counters: torch.Tensor  # [B + 1] int32: tickets of each row's programs, then of the rows


def greedy_programs(V: int) -> int:
    """Programs a row of V logits is split over."""
    return max(1, min(MAX_PROGRAMS, cdiv(V, SLICE)))


def greedy_scratch(batch: int, vocab: int, device) -> GreedyScratch:
    """Scratch for rows of ``batch`` x ``vocab`` logits on ``device`` (allocate once; a CUDA graph keeps it)."""
    P = greedy_programs(vocab)
    return GreedyScratch(torch.empty(batch, P, device=device, dtype=torch.float32),
                         torch.empty(batch, P, device=device, dtype=torch.int32),
                         torch.empty(batch, P, device=device, dtype=torch.int32),
                         torch.zeros(batch + 1, device=device, dtype=torch.int32))


@triton.jit
def _greedy_kernel(logits_BV, token_B, history_BL, slot, part_v, part_i, part_n, counters, B, V, s_lb, s_tb, s_hb,
                   P: tl.constexpr, PP: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                   HAS_HISTORY: tl.constexpr):
    p = tl.program_id(0)
    b = tl.program_id(1)
    BIG: tl.constexpr = 2147483647
    row = logits_BV + b.to(tl.int64) * s_lb
    best_v = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    best_i = tl.full([BLOCK], BIG, dtype=tl.int32)
    nan_i = tl.full([BLOCK], BIG, dtype=tl.int32)
    end = tl.minimum(p * CHUNK + CHUNK, V)
    for start in range(p * CHUNK, end, BLOCK):
        o = start + tl.arange(0, BLOCK)
        m = o < end
        v = tl.load(row + o, mask=m, other=float("-inf")).to(tl.float32)
        is_nan = v != v
        nan_i = tl.minimum(nan_i, tl.where(m & is_nan, o, BIG))
        v = tl.where(is_nan, float("-inf"), v)
        # a lane's indices rise, so a strict > keeps the first of equal values; the lane's first
        # element is taken whatever it is (a row of -inf still has an argmax)
        take = m & ((v > best_v) | (best_i == BIG))
        best_v = tl.where(take, v, best_v)
        best_i = tl.where(take, o, best_i)
    pv = tl.max(best_v, axis=0)
    pi = tl.min(tl.where(best_v == pv, best_i, BIG), axis=0)
    pn = tl.min(nan_i, axis=0)
    k = b * P + p
    tl.store(part_v + k, pv)
    tl.store(part_i + k, pi)
    tl.store(part_n + k, pn)
    # every thread's stores before the ticket (one thread takes it); release: the partials above are
    # visible to whoever takes the last ticket (acquire)
    tl.debug_barrier()
    ticket = tl.atomic_add(counters + b, 1, sem="acq_rel", scope="gpu")
    if ticket == P - 1:
        o_p = tl.arange(0, PP)
        m_p = o_p < P
        vs = tl.load(part_v + b * P + o_p, mask=m_p, other=float("-inf"), cache_modifier=".cg")
        ix = tl.load(part_i + b * P + o_p, mask=m_p, other=BIG, cache_modifier=".cg")
        ns = tl.load(part_n + b * P + o_p, mask=m_p, other=BIG, cache_modifier=".cg")
        gv = tl.max(vs, axis=0)
        gi = tl.min(tl.where(vs == gv, ix, BIG), axis=0)
        gn = tl.min(ns, axis=0)
        token = tl.where(gn < BIG, gn, gi)
        tl.store(token_B + b * s_tb, token.to(tl.int64))
        if HAS_HISTORY:
            at = tl.load(slot)
            tl.store(history_BL + b.to(tl.int64) * s_hb + at, token.to(history_BL.dtype.element_ty))
        tl.store(counters + b, 0)
        tl.debug_barrier()
        done = tl.atomic_add(counters + B, 1, sem="acq_rel", scope="gpu")
        if done == B - 1:  # every row has read slot: advance it, leave the rows' counter at zero
            tl.store(slot, tl.load(slot) + 1)
            tl.store(counters + B, 0)


def _check(logits_BV, token_B1, slot, history_BL, scratch):
    if not isinstance(logits_BV, torch.Tensor) or logits_BV.dim() != 2 or not logits_BV.is_floating_point():
        raise ValueError(f"logits_BV: expected a floating-point [B, vocab] tensor, got "
                         f"{getattr(logits_BV, 'dtype', type(logits_BV))} {tuple(getattr(logits_BV, 'shape', ()))}")
    B, V = logits_BV.shape
    if B == 0 or V == 0:
        raise ValueError(f"logits_BV: expected at least one row and one token, got shape {tuple(logits_BV.shape)}")
    dev = logits_BV.device
    if not isinstance(token_B1, torch.Tensor) or tuple(token_B1.shape) != (B, 1) or token_B1.dtype != torch.long \
            or token_B1.device != dev:
        raise ValueError(f"token_B1: expected a [{B}, 1] long tensor on {dev}, got "
                         f"{getattr(token_B1, 'dtype', type(token_B1))} {tuple(getattr(token_B1, 'shape', ()))}")
    if not isinstance(slot, torch.Tensor) or tuple(slot.shape) != (1,) or slot.dtype != torch.long or slot.device != dev:
        raise ValueError(f"slot: expected a [1] long tensor on {dev}, got "
                         f"{getattr(slot, 'dtype', type(slot))} {tuple(getattr(slot, 'shape', ()))}")
    if history_BL is not None:
        if not isinstance(history_BL, torch.Tensor) or history_BL.dim() != 2 or history_BL.shape[0] != B \
                or history_BL.dtype not in (torch.int32, torch.long) or history_BL.device != dev \
                or history_BL.stride(1) != 1:
            raise ValueError(f"history_BL: expected a [{B}, L] int32 or long tensor on {dev} with contiguous rows, "
                             f"got {getattr(history_BL, 'dtype', type(history_BL))} "
                             f"{tuple(getattr(history_BL, 'shape', ()))}")
    if scratch is not None:
        P = greedy_programs(V)
        if not isinstance(scratch, GreedyScratch) or tuple(scratch.part_v.shape) != (B, P) \
                or tuple(scratch.counters.shape) != (B + 1,) or scratch.counters.device != dev:
            raise ValueError(f"scratch: expected greedy_scratch({B}, {V}, {dev}), got {scratch!r}")


def greedy_token_(logits_BV: torch.Tensor, token_B1: torch.Tensor, slot: torch.Tensor,
                  history_BL: torch.Tensor | None = None, scratch: GreedyScratch | None = None) -> None:
    """token_B1[:, 0] = argmax of each row of logits_BV; history_BL[:, slot] = the same (if given); slot += 1.

    Args:
        logits_BV: [B, vocab] float32, bfloat16 or float16 logits, last dim contiguous.
        token_B1: [B, 1] long, written in place (the decode step's token buffer).
        slot: [1] long, the history column to write; advanced by one.
        history_BL: optional [B, L] int32 or long, rows contiguous; column slot[0] (< L, not checked
            on the device) is written.
        scratch: ``greedy_scratch(B, vocab, device)``; allocated per call when None (not under a CUDA
            graph capture: allocate it once and pass it).

    Ties go to the lowest index and a NaN counts as the largest value, as ``torch.argmax``. No host
    sync: usable inside a CUDA graph. On CPU tensors it needs TRITON_INTERPRET=1.

    Example (CUDA tensors; CPU ones only under TRITON_INTERPRET=1):
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
        >>> logits = torch.tensor([[0.0, 3.0, 3.0, -1.0]], device=dev)
        >>> token, slot = torch.zeros(1, 1, dtype=torch.long, device=dev), torch.zeros(1, dtype=torch.long, device=dev)
        >>> greedy_token_(logits, token, slot)
        >>> token.tolist(), slot.tolist()
        ([[1]], [1])
    """
    _check(logits_BV, token_B1, slot, history_BL, scratch)
    check_kernel_device("logits_BV", logits_BV)
    B, V = logits_BV.shape
    if logits_BV.stride(1) != 1:
        logits_BV = logits_BV.contiguous()
    scratch = scratch or greedy_scratch(B, V, logits_BV.device)
    P = greedy_programs(V)
    chunk = cdiv(cdiv(V, P), BLOCK) * BLOCK
    hist = history_BL if history_BL is not None else token_B1  # unread without HAS_HISTORY
    _greedy_kernel[(P, B)](logits_BV, token_B1, hist, slot, scratch.part_v, scratch.part_i, scratch.part_n,
                           scratch.counters, B, V, logits_BV.stride(0), token_B1.stride(0), hist.stride(0),
                           P=P, PP=next_power_of_2(P), CHUNK=chunk, BLOCK=BLOCK,
                           HAS_HISTORY=history_BL is not None, num_warps=4)


def greedy_token_reference(logits_BV: torch.Tensor, token_B1: torch.Tensor, slot: torch.Tensor,
                           history_BL: torch.Tensor | None = None, scratch=None) -> None:
    """:func:`greedy_token_` in PyTorch (any device): the readable reference."""
    _check(logits_BV, token_B1, slot, history_BL, None)
    token_B = logits_BV.argmax(-1)
    token_B1.copy_(token_B[:, None])
    if history_BL is not None:
        history_BL.index_copy_(1, slot, token_B[:, None].to(history_BL.dtype))
    slot += 1
