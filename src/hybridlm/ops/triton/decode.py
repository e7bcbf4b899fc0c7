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
def _decode_tile(q_BHK, k_BHK, v_BHV, g_BH, beta_BH, A_log_H, dt_bias_H, state_in, state_out, o_BHV,
                 scale, i_v, i_bhv, s_qb, s_kb, s_vb, s_gb, s_bb,
                 H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                 BK: tl.constexpr, BV: tl.constexpr,
                 USE_L2NORM: tl.constexpr, RAW_GATE: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
                 BETA_IS_LOGIT: tl.constexpr, STREAM: tl.constexpr, ONE_REDUCE: tl.constexpr,
                 USE_PDL: tl.constexpr, STATE_EARLY: tl.constexpr):
    i_b = i_bhv // HV
    i_hv = i_bhv % HV
    i_h = i_hv // (HV // H)

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]

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

    if STREAM:
        tl.store(state_out + p_state, b_S, mask=m_kv, cache_modifier=".cs")
    else:
        tl.store(state_out + p_state, b_S, mask=m_kv)
    tl.store(o_BHV + i_bhv * V + o_v, b_o.to(o_BHV.dtype.element_ty), mask=m_v)


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
        num_warps=warps, STATE_EARLY=bool(state_early) and stages == 1, **pdl_launch(q.device),
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
