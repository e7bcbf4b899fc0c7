"""Timing and cost models shared by the benchmarks.

Timings are medians of ``triton.testing.do_bench`` (CUDA events, warm-up first). The FLOP and byte
counts are conventions, stated here once and printed with every table:

- chunked gated delta rule forward, per value head: 6*T*K*V + 3*T*C*K + T*C^2 (C = 64, the Kimi
  Linear report's count);
- softmax attention, causal forward: 4*T^2*d/2 per head (half of the two T x T x d products);
- backward = 2.5 x forward for both (FlashAttention's convention), so forward+backward = 3.5 x forward;
- bytes: each input read once and each output written once (the floor any implementation pays);
  for a decode step that is dominated by the float32 state, read and written once.
"""

from __future__ import annotations

import itertools

import math

import torch

CHUNK = 64
BWD_OVER_FWD = 2.5
FLOP_CONVENTION = ("FLOPs: chunked GDN fwd 6TKV + 3TCK + TC^2 per value head (C=64); SDPA causal fwd "
                   "4T^2d/2 per head; fwd+bwd = 3.5 x fwd for both; bandwidth share = counted bytes "
                   "(inputs read once, outputs written once; decode: fp32 state read + written) / time "
                   "/ measured device-to-device copy rate")


def median_ms(fn, *, warmup_ms: float = 25, rep_ms: float = 100, grad_to_none=None) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA device."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                          return_mode="median"))


def round_robin(calls: list):
    """A function that runs the next of ``calls`` each time it is called, so repeated timing of a
    step that owns several state buffers visits each in turn (and not one buffer hot in L2)."""
    it = itertools.cycle(calls)
    return lambda: next(it)()


def graphed_ms_per_call(calls: list, *, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Capture every function of ``calls`` once, in order, into one CUDA graph; median ms per call.

    Launch overhead, which dominates a decode step at batch 1, disappears from graph replays, as in
    a served model whose whole decode step is one graph."""
    graph = capture_graph(calls)
    return median_ms(graph.replay, warmup_ms=warmup_ms, rep_ms=rep_ms) / len(calls)


def capture_graph(calls: list) -> "torch.cuda.CUDAGraph":
    """One CUDA graph that runs every function of ``calls`` once, in order (each first run once on
    a side stream, so compilation and allocation stay outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in calls:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    return graph


def copy_bytes_per_s(device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy rate of an ``nbytes`` buffer, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()  # never zeros
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), warmup_ms=50, rep_ms=300)
    return 2 * nbytes / (ms * 1e-3)


def l2_cache_bytes(device) -> int:
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 50 * 2**20))


def gdn_chunk_fwd_flops(B: int, T: int, HV: int, K: int, V: int) -> float:
    return float(B * HV * (6 * T * K * V + 3 * T * CHUNK * K + T * CHUNK * CHUNK))


def sdpa_causal_fwd_flops(B: int, T: int, H: int, d: int) -> float:
    return float(B * H * 4 * T * T * d / 2)


def gdn_chunk_fwd_bytes(B: int, T: int, H: int, HV: int, K: int, V: int, elt: int, gate_elt: int = 4) -> float:
    """q, k, v, g, beta read once and o written once; states are small beside them at T >= 2k."""
    return float(B * T * (2 * H * K * elt + 2 * HV * V * elt + 2 * HV * gate_elt))


def sdpa_fwd_bytes(B: int, T: int, H: int, d: int, elt: int) -> float:
    return float(4 * B * T * H * d * elt)


def decode_state_bytes(B: int, HV: int, K: int, V: int) -> float:
    """The float32 state read and written once (q, k, v and o add under 1% at K = V = 128)."""
    return float(2 * B * HV * K * V * 4)


def distinct_states(B: int, HV: int, K: int, V: int, device, max_buffers: int = 128) -> list:
    """Float32 decode states [B, HV, K, V] (0.1 * normal), enough distinct ones to total >= 4x L2,
    so that timing a step over them in turn reads memory, not cache."""
    state_bytes = B * HV * K * V * 4
    n = max(2, min(max_buffers, math.ceil(4 * l2_cache_bytes(device) / state_bytes)))
    return [0.1 * torch.randn(B, HV, K, V, device=device) for _ in range(n)]
