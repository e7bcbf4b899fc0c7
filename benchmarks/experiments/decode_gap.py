"""Where does the decode step's last 10% go at batch 32? Memory pattern or the step's own work.

The decode step (``ops/triton/decode.py``) at Qwen3-Next's heads (HV 32, K = V = 128, float32 state)
reads ~81% of the 1 GiB copy rate at batch 32, while torch's in-place ``s.mul_(c)`` over the same bytes
reads ~92% (RESULTS.md, eighth 2026-12-02 session; ``--only copy,rmw,step,step_oop`` reruns that
comparison). This times, as CUDA-graph replays over distinct buffers
totalling >= 4x L2, kernels that move exactly the step's bytes in place and differ in one thing each:

  copy          d.copy_(s) (the yardstick's own pattern)
  rmw           s.mul_(c) in place (torch's element-wise kernel)
  flat          Triton, each program scales 16 KB of contiguous floats in place
  tile          Triton, the step's own tiles (one (sequence, value head, BV-column block) per program,
                value blocks fastest) scaled in place: the step's memory pattern without its work
  tile_vslow    the same tiles with the value block as the slowest index of the grid
  tile_red      the tiles with one reduction over K and a rank-1 update (half of the step's work)
  step          the decode step itself, in place, at the same block and warps (separate reductions;
                with the block ``default``, the step's own launch rule, reductions included)
  step_one      the step with every reduction over K in one pass (``decode_into(one_reduce=True)``)
  step_oop      the step writing a second buffer (state_out distinct), not in place
  base          with ``--baseline FILE`` (a decode.py with the ``one_reduce`` knob): its step, and
                ``base_one``, at the same launch

Both step forms are first checked against the reference step (bf16 inputs, fused gate).

With ``--ncu`` it instead launches each Triton kernel a few times for Nsight Compute:

    ncu --clock-control none -k regex:"_tile_kernel|_flat_kernel|_gdn_decode_kernel" \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \\
        --section WarpStateStats --section LaunchStats \\
        python3 benchmarks/experiments/decode_gap.py --ncu

    PYTHONPATH=src python benchmarks/experiments/decode_gap.py [--batches 32,64] [--blocks 64x4,32x2]
        [--only copy,tile_red,step] [--baseline OLD_decode.py] [--json F]

Second 2026-12-03 session (RESULTS.md): this located the step's loss in the order of its small
loads; the kept fixes took batch 32 from 81% to 87% of the copy rate.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from hybridlm.bench import load_source, report, timing
from hybridlm.ops.delta_rule import gated_delta_rule_step
from hybridlm.ops.triton.decode import _pick_blocks, decode_into


@triton.jit
def _flat_kernel(s, BLOCK: tl.constexpr):
    p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(s + p, tl.load(s + p) * 0.999)


@triton.jit
def _tile_kernel(s, k_ptr, n_bhv, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
                 VSLOW: tl.constexpr, REDUCE: tl.constexpr):
    tile = tl.program_id(0)
    n_vb: tl.constexpr = V // BV
    if VSLOW:
        i_v = tile // n_bhv
        i_bhv = (tile % n_bhv).to(tl.int64)
    else:
        i_v = tile % n_vb
        i_bhv = (tile // n_vb).to(tl.int64)
    o_k = tl.arange(0, K)
    o_v = i_v * BV + tl.arange(0, BV)
    p = i_bhv * K * V + o_k[:, None] * V + o_v[None, :]
    b_s = tl.load(s + p)
    if REDUCE:
        b_k = tl.load(k_ptr + o_k)
        b_u = tl.sum(b_s * b_k[:, None], axis=0)
        b_s = b_s * 0.999 + b_k[:, None] * (1e-3 * b_u)[None, :]
    else:
        b_s = b_s * 0.999
    tl.store(s + p, b_s)


def cases_for(B: int, bufs: list, block, dev, base=None, dsts=None) -> dict:
    """The timed calls; ``block`` is (BV, warps), or None for the step's own launch rule."""
    H, HV, K, V = 16, 32, 128, 128
    bv, warps = block or _pick_blocks(B, HV, V, dev, K)[:2]
    launch = dict(block_v=bv, num_warps=warps, one_reduce=False) if block else {}
    q = torch.randn(B, H, K, device=dev, dtype=torch.bfloat16)
    k = torch.randn_like(q)
    v = torch.randn(B, HV, V, device=dev, dtype=torch.bfloat16)
    g = torch.nn.functional.logsigmoid(torch.randn(B, HV, device=dev) + 3.0)
    beta = torch.rand(B, HV, device=dev)
    o = torch.empty_like(v)
    kvec = 0.01 * torch.randn(K, device=dev)
    n_bhv = B * HV
    n_tiles = n_bhv * (V // bv)
    numel = bufs[0].numel()

    def flat(s):
        _flat_kernel[(numel // 4096,)](s, BLOCK=4096, num_warps=4)

    def tile(s, vslow=False, reduce=False):
        _tile_kernel[(n_tiles,)](s, kvec, n_bhv, K=K, V=V, BV=bv, VSLOW=vslow, REDUCE=reduce, num_warps=warps)

    def step(s, one_reduce=None, mod=None, d=None):
        kw = dict(launch, **({} if one_reduce is None else dict(one_reduce=one_reduce)))
        (mod.decode_into if mod else decode_into)(q, k, v, g, beta, s, s if d is None else d, o, scale=K ** -0.5,
                                                  use_qk_l2norm=True, A_log=None, dt_bias=None,
                                                  beta_is_logit=False, **kw)

    return dict(
        copy=[lambda s=s, d=d: d.copy_(s) for s, d in zip(bufs, dsts or [])],
        rmw=[lambda s=s: s.mul_(0.999) for s in bufs],
        flat=[lambda s=s: flat(s) for s in bufs],
        tile=[lambda s=s: tile(s) for s in bufs],
        tile_vslow=[lambda s=s: tile(s, vslow=True) for s in bufs],
        tile_red=[lambda s=s: tile(s, reduce=True) for s in bufs],
        step=[lambda s=s: step(s) for s in bufs],
        step_one=[lambda s=s: step(s, True) for s in bufs],
        step_oop=[lambda s=s, d=d: step(s, d=d) for s, d in zip(bufs, dsts or [])],
        **(dict(base=[lambda s=s: step(s, mod=base) for s in bufs],
                base_one=[lambda s=s: step(s, True, base) for s in bufs]) if base else {}),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="32,64")
    ap.add_argument("--blocks", default="default,32x2,64x2",
                    help="BVxWARPS launches of the tile kernels and the step; 'default': the step's own rule")
    ap.add_argument("--ncu", action="store_true", help="launch each Triton kernel 3 times, untimed")
    ap.add_argument("--baseline", help="another decode.py whose step (and one-pass step) is timed beside ours")
    ap.add_argument("--only", help="comma-separated cases to time (default all)")
    ap.add_argument("--json")
    args = ap.parse_args()
    base = load_source(args.baseline, "decode_baseline") if args.baseline else None
    dev = torch.device("cuda")
    HV, K, V = 32, 128, 128
    blocks = [None if b == "default" else tuple(int(x) for x in b.split("x")) for b in args.blocks.split(",")]
    if args.ncu:
        s = [0.1 * torch.randn(32, HV, K, V, device=dev)]
        for block in blocks[:1]:
            for name, calls in cases_for(32, s, block, dev).items():
                if calls and (not args.only or name in args.only.split(",")):
                    for _ in range(3):
                        calls[0]()
        torch.cuda.synchronize()
        print("ncu launches done")
        return
    torch.manual_seed(0)
    for B in (1, 32):  # both forms against the reference step (same inputs), before timing
        s0 = 0.1 * torch.randn(B, HV, K, V, device=dev)
        q, k = torch.randn(2, B, 16, K, device=dev, dtype=torch.bfloat16)
        v = torch.randn(B, HV, V, device=dev, dtype=torch.bfloat16)
        a, bl = torch.randn(2, B, HV, device=dev)
        A_log, dt_bias = torch.randn(2, HV, device=dev)
        o_ref, s_ref = gated_delta_rule_step(q, k, v, a, torch.sigmoid(bl), s0, use_qk_l2norm=True, A_log=A_log,
                                             dt_bias=dt_bias, backend="reference")
        for one in (False, True):
            st, o = s0.clone(), torch.full_like(v, float("nan"))
            decode_into(q, k, v, a, bl, st, st, o, scale=K ** -0.5, use_qk_l2norm=True, A_log=A_log,
                        dt_bias=dt_bias, beta_is_logit=True, one_reduce=one)
            print(f"check B {B} one_reduce={one}: max |o - ref| {(o.float() - o_ref.float()).abs().max().item():.2e}"
                  f" (|o| max {o_ref.float().abs().max().item():.2e}), state {(st - s_ref).abs().max().item():.2e}")
    rate = timing.copy_bytes_per_s(dev)
    print(f"{torch.cuda.get_device_name(dev)}: 1 GiB copy {rate / 1e9:,.0f} GB/s")
    rows = []
    for B in (int(b) for b in args.batches.split(",")):
        nbytes = timing.decode_state_bytes(B, HV, K, V)
        src = timing.distinct_states(B, HV, K, V, dev, max_buffers=64)
        n = len(src)
        dst = [torch.empty_like(t) for t in src]
        for block in blocks:
            cases = cases_for(B, src, block, dev, base, dst)
            bv, warps = block or _pick_blocks(B, HV, V, dev, K)[:2]
            if args.only:
                cases = {c: cases[c] for c in args.only.split(",")}
            row = dict(B=B, block_v=bv, warps=warps, buffers=n, bytes=nbytes)
            for name, calls in cases.items():
                us = timing.graphed_ms_per_call(calls, warmup_ms=10, rep_ms=60) * 1e3
                row[name + "_us"] = us
                row[name + "_share"] = nbytes / (us * 1e-6) / rate
            rows.append(row)
            print(f"B {B:4d} BV {bv:3d} warps {warps}: " + "  ".join(
                f"{c} {row[c + '_us']:.2f} ({row[c + '_share']:.1%})" for c in cases), flush=True)
        del src, dst
        torch.cuda.empty_cache()
    report.write_rows_json(args.json, rows, copy_bytes_per_s=rate)


if __name__ == "__main__":
    main()
