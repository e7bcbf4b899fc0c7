"""Triton top-k routing for decode: one program per token, scores to combine weights in one launch.

Legend: N tokens, E experts, K experts per token. Semantics as :func:`hybridlm.ops.moe_route`
(without grouped routing).

A program loads its token's E logits (a row of any stride: the router's columns of a packed
projection output are read in place), forms the float32 scores (softmax or sigmoid) and the
selection keys (scores plus an optional bias), and picks the K best by K rounds of one max-reduction
over 64-bit keys: the key's high word is the selection score's bits in an order-preserving integer
form, its low word E - 1 - e, so the maximum is the highest score and, among equal scores, the lowest
expert index (the reference's stable descending sort). Each round removes its winner. The weights
are the unbiased scores of the winners (read back from the key's high word when there is no bias),
renormalised and scaled in registers; the program writes K weights and K indices.

The reference sorts all E scores; under torch.compile at batch 1 that was two kernels a MoE layer
(a softmax-and-sort and a gather-sum-divide; Qwen3-Next's step on an H200, 2.2 + 1.1 us plus their
launch gaps). Alone in a CUDA graph of 48 calls (``benchmarks/experiments/moe_route_ab.py``, H200,
top 10 of bf16 logits, us a call): 2.6 at 32 experts against 4.2 compiled and 19.9 eager; 3.9 at
512 experts against 23.4 and 35.0.

Registered with ``torch.library`` (``hybridlm::moe_route``) so ``torch.compile(fullgraph=True)``
traces through it.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from hybridlm.ops._checks import check_kernel_device
from hybridlm.ops.moe_route import KERNEL_MAX_EXPERTS, check_route
from hybridlm.ops.triton.utils import next_power_of_2, pdl_launch, pdl_start

EMPTY = -(2**63)  # the key of a lane past E, and of a lane already picked


@triton.jit
def route_row(logits_E, bias_E, E, scaling, K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
              SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr, EMPTY: tl.constexpr):
    """One token's routing from its E logits (a pointer to its row): (weights [BLOCK_K] float32,
    experts [BLOCK_K] int32), the first K lanes filled, the weights renormalised (NORM) and scaled.
    Shared by the routing kernel and the fused MoE decode kernel (``moe_decode.py``), so both pick
    the same experts with the same weights, bit for bit."""
    o_e = tl.arange(0, BLOCK_E)
    m_e = o_e < E
    x = tl.load(logits_E + o_e, mask=m_e, other=float("-inf")).to(tl.float32)
    if SOFTMAX:
        p = tl.where(m_e, tl.exp(x - tl.max(x, 0)), 0.0)
        scores = p / tl.sum(p, 0)
    else:
        scores = tl.sigmoid(x)
    choice = scores
    if HAS_BIAS:
        choice += tl.load(bias_E + o_e, mask=m_e, other=0.0).to(tl.float32)
    choice += 0.0  # -0.0 becomes +0.0: the two compare equal, their bits do not
    # float bits -> an int32 in the same order (negative floats: the magnitude bits flipped)
    bits = choice.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = tl.where(m_e, (ordered.to(tl.int64) << 32) | (E - 1 - o_e).to(tl.int64), EMPTY)
    o_k = tl.arange(0, BLOCK_K)
    w_k = tl.zeros([BLOCK_K], dtype=tl.float32)
    e_k = tl.zeros([BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(K):
        best = tl.max(key, 0)
        e = (E - 1) - best.to(tl.int32)  # the low word (E < 2**31)
        key = tl.where(key == best, EMPTY, key)
        if HAS_BIAS:
            w = tl.sum(tl.where(o_e == e, scores, 0.0), 0)
        else:  # the key's high word holds the score itself: back to float bits
            hi = (best >> 32).to(tl.int32)
            w = (hi ^ ((hi >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
        w_k = tl.where(o_k == j, w, w_k)
        e_k = tl.where(o_k == j, e, e_k)
    if NORM:
        w_k = w_k / tl.sum(w_k, 0)
    return w_k * scaling, e_k


@triton.jit
def _route_kernel(logits_NE, bias_E, weights_NK, experts_NK, E, s_ln, scaling,
                  K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, SOFTMAX: tl.constexpr,
                  HAS_BIAS: tl.constexpr, NORM: tl.constexpr, EMPTY: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_start(USE_PDL)
    i_n = tl.program_id(0).to(tl.int64)
    w_k, e_k = route_row(logits_NE + i_n * s_ln, bias_E, E, scaling, K, BLOCK_E, BLOCK_K, SOFTMAX, HAS_BIAS,
                         NORM, EMPTY)
    o_k = tl.arange(0, BLOCK_K)
    m_k = o_k < K
    tl.store(weights_NK + i_n * K + o_k, w_k, mask=m_k)
    tl.store(experts_NK + i_n * K + o_k, e_k.to(tl.int64), mask=m_k)


def pick_warps(E: int) -> int:
    """Warps of a program for E experts: one warp (every reduction in shuffles, no barrier) up to 128
    experts, more as the row grows (each thread holds BLOCK_E / (32 warps) 64-bit keys; at 8192
    experts and 8 warps, 192 registers on sm_90)."""
    block_e = next_power_of_2(E)
    return 1 if block_e <= 128 else 4 if block_e <= 2048 else 8 if block_e <= 4096 else 16


def moe_route_into(logits_NE, top_k, router, norm_topk_prob, scaling, score_bias_E, weights_NK, experts_NK,
                   num_warps: Optional[int] = None) -> None:
    """Launch on validated tensors: logits_NE with a contiguous last dim, outputs contiguous [N, top_k].
    ``num_warps`` overrides :func:`pick_warps` (tuning)."""
    N, E = logits_NE.shape
    if N == 0:
        return
    block_e = next_power_of_2(E)
    _route_kernel[(N,)](
        logits_NE, logits_NE if score_bias_E is None else score_bias_E, weights_NK, experts_NK, E,
        logits_NE.stride(0), scaling, K=top_k, BLOCK_E=block_e, BLOCK_K=next_power_of_2(top_k),
        SOFTMAX=router == "softmax", HAS_BIAS=score_bias_E is not None, NORM=norm_topk_prob, EMPTY=EMPTY,
        num_warps=num_warps or pick_warps(E), **pdl_launch(logits_NE.device, "route"))


@torch.library.custom_op("hybridlm::moe_route", mutates_args=())
def _route_op(logits_NE: torch.Tensor, top_k: int, router: str, norm_topk_prob: bool, scaling: float,
              score_bias_E: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    weights_NK, experts_NK = _outputs(logits_NE, top_k)
    moe_route_into(logits_NE, top_k, router, norm_topk_prob, scaling, score_bias_E, weights_NK, experts_NK)
    return weights_NK, experts_NK


@_route_op.register_fake
def _(logits_NE, top_k, router, norm_topk_prob, scaling, score_bias_E):
    return _outputs(logits_NE, top_k)


def _outputs(logits_NE, top_k):
    N = logits_NE.shape[0]
    return (logits_NE.new_empty(N, top_k, dtype=torch.float32),
            logits_NE.new_empty(N, top_k, dtype=torch.int64))


def moe_route(logits_NE, top_k, router="softmax", norm_topk_prob=False, scaling=1.0, score_bias_E=None):
    """Top-k routing kernel; arguments and result as in :func:`hybridlm.ops.moe_route` (no groups).

    Example (CUDA tensors; CPU ones only under TRITON_INTERPRET=1):
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
        >>> weights, experts = moe_route(torch.randn(2, 32, device=dev), 4, norm_topk_prob=True)
    """
    check_route(logits_NE, top_k, router, norm_topk_prob, scaling, score_bias_E, 1, 1)
    check_kernel_device("logits_NE", logits_NE)
    if logits_NE.dtype == torch.float64:
        raise TypeError("logits_NE must be float32, bfloat16 or float16 for the Triton kernel, got torch.float64; "
                        "use backend='reference'")
    if logits_NE.shape[1] > KERNEL_MAX_EXPERTS:
        raise ValueError(f"logits_NE has E = {logits_NE.shape[1]} experts; the Triton kernel holds a token's "
                         f"scores in registers, up to {KERNEL_MAX_EXPERTS}: use backend='reference' or 'auto'")
    if logits_NE.stride(1) != 1:
        logits_NE = logits_NE.contiguous()
    if score_bias_E is not None:
        score_bias_E = score_bias_E.contiguous()
    scaling = float(scaling)
    if not torch.compiler.is_compiling():
        # eager calls launch directly: the custom-op dispatch costs more host time than the kernel
        weights_NK, experts_NK = _outputs(logits_NE, top_k)
        moe_route_into(logits_NE, top_k, router, norm_topk_prob, scaling, score_bias_E, weights_NK, experts_NK)
        return weights_NK, experts_NK
    return _route_op(logits_NE, top_k, router, norm_topk_prob, scaling, score_bias_E)
