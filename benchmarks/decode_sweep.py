"""Tuning sweep of the Triton decode step (gated delta rule, one token per sequence) on one GPU.

For each batch it times every launch configuration (value-block width, warps, a persistent grid of
N programs per multiprocessor or one program per tile, streaming cache hints, and the persistent loop
software-pipelined over S stages: the next tiles' state copied into shared memory asynchronously
while one computes) as CUDA-graph replays
over distinct state buffers totalling >= 4x L2, as ``hybridlm bench kernels`` does, and prints the
share of two copy rates: the 1 GiB device-to-device copy (the issue's yardstick) and a copy of
exactly the state bytes one step moves, over the same number of distinct buffers (what a kernel of
this size can reach at best). Every configuration is first checked against the reference step.

    python benchmarks/decode_sweep.py --json out.json [--batches 8,32,128] [--heads 16,32 --dim 128]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
import triton

from hybridlm.bench import timing
from hybridlm.ops import gated_delta_rule_step
from hybridlm.ops.triton.decode import _pick_blocks, decode_into

# (block_v, num_warps): each width with the warp counts that keep its [K, BV] float32 tile in registers
BLOCKS = [(16, 1), (16, 2), (32, 1), (32, 2), (32, 4), (64, 2), (64, 4), (64, 8), (128, 4), (128, 8)]
PERSISTENT = [None, 4, 8]
STREAM = [False, True]
# (block_v, num_warps, programs per SM, stages) of the pipelined persistent loop: the launches an
# offline sm_90 compile shows without a spill stack (BV 64 at 2 warps spills from 2 stages on)
PIPELINED = [(bv, w, pps, st) for bv, w in ((16, 1), (16, 2), (32, 2), (32, 4), (64, 4))
             for pps in (1, 2, 4) for st in (2, 3, 4)]


def _inputs(B, H, HV, K, V, device):
    torch.manual_seed(B)
    q = torch.randn(B, H, K, device=device, dtype=torch.bfloat16)
    k = torch.randn_like(q)
    v = torch.randn(B, HV, V, device=device, dtype=torch.bfloat16)
    g = torch.nn.functional.logsigmoid(torch.randn(B, HV, device=device) + 3.0)
    beta = torch.rand(B, HV, device=device)
    return q, k, v, g, beta, timing.distinct_states(B, HV, K, V, device)


def _calls(q, k, v, g, beta, states, o, cfg):
    bv, warps, pps, stream, stages, one_reduce = cfg
    return [lambda s=s: decode_into(q, k, v, g, beta, s, s, o, scale=q.shape[-1] ** -0.5, use_qk_l2norm=True,
                                    A_log=None, dt_bias=None, beta_is_logit=False, block_v=bv,
                                    num_warps=warps, programs_per_sm=pps, stream=stream, stages=stages,
                                    one_reduce=one_reduce)
            for s in states]


def _check(q, k, v, g, beta, state, cfg) -> float:
    ref_o, ref_s = gated_delta_rule_step(q, k, v, g, beta, state, use_qk_l2norm=True, backend="reference")
    s = state.clone()
    o = torch.full_like(v, float("nan"))
    _calls(q, k, v, g, beta, [s], o, cfg)[0]()
    err = max(((o.float() - ref_o.float()).norm() / ref_o.float().norm()).item(),
              ((s - ref_s).norm() / ref_s.norm()).item())
    return err


def sweep(B, H, HV, K, V, device, copy_rate, pipelined=True) -> list[dict]:
    q, k, v, g, beta, states = _inputs(B, H, HV, K, V, device)
    nbytes = timing.decode_state_bytes(B, HV, K, V)
    dsts = [torch.empty_like(s) for s in states]
    copy_ms = timing.graphed_ms_per_call([lambda s=s, d=d: d.copy_(s) for s, d in zip(states, dsts)],
                                         warmup_ms=10, rep_ms=50)
    del dsts
    same_size_rate = nbytes / (copy_ms * 1e-3)
    default_bv, default_warps, default_one = _pick_blocks(B, HV, V, device, K)
    o = torch.empty_like(v)
    rows = []
    blocks = BLOCKS + ([(default_bv, default_warps)] if (default_bv, default_warps) not in BLOCKS else [])
    configs = [(bv, warps, pps, stream, 1, False)
               for (bv, warps), pps, stream in itertools.product(blocks, PERSISTENT, STREAM)]
    configs += [(bv, warps, None, False, 1, True) for bv, warps in blocks]
    if pipelined:
        configs += [(bv, warps, pps, False, stages, False) for bv, warps, pps, stages in PIPELINED]
    for cfg in configs:
        bv, warps, pps, stream, stages, one_reduce = cfg
        if bv > triton.next_power_of_2(V):
            continue
        err = _check(q, k, v, g, beta, states[0], cfg)
        if not err < 1e-2:
            rows.append(dict(B=B, block_v=bv, warps=warps, programs_per_sm=pps, stream=stream, stages=stages,
                             one_reduce=one_reduce, error=err))
            print(f"B {B} {cfg}: WRONG (rel err {err:.2e})", flush=True)
            continue
        ms = timing.graphed_ms_per_call(_calls(q, k, v, g, beta, states, o, cfg), warmup_ms=10, rep_ms=50)
        rows.append(dict(B=B, H=H, HV=HV, K=K, V=V, block_v=bv, warps=warps, programs_per_sm=pps, stream=stream,
                         stages=stages, one_reduce=one_reduce,
                         default=cfg == (default_bv, default_warps, None, False, 1, default_one),
                         us=ms * 1e3, error=err, copy_share=nbytes / (ms * 1e-3) / copy_rate,
                         same_size_copy_share=nbytes / (ms * 1e-3) / same_size_rate,
                         same_size_copy_us=copy_ms * 1e3))
    del states
    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,8,32,64,128,256")
    p.add_argument("--heads", default="16,32", help="H,HV (Qwen3-Next: 16 q/k heads, 32 value heads)")
    p.add_argument("--dim", type=int, default=128, help="K = V")
    p.add_argument("--no-pipelined", action="store_true",
                   help="skip the pipelined persistent launches (slower at every batch >= 8 on the H200)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_sweep needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    H, HV = (int(x) for x in args.heads.split(","))
    copy_rate = timing.copy_bytes_per_s(device)
    print(f"{torch.cuda.get_device_name(device)}: 1 GiB copy {copy_rate / 1e9:,.0f} GB/s; H {H} HV {HV} "
          f"K = V = {args.dim}, bf16 q/k/v, float32 state, CUDA-graph replay over distinct states")
    rows = []
    for B in (int(b) for b in args.batches.split(",")):
        rs = sweep(B, H, HV, args.dim, args.dim, device, copy_rate, pipelined=not args.no_pipelined)
        rows += rs
        ok = sorted((r for r in rs if "us" in r), key=lambda r: r["us"])
        default = next(r for r in rs if r.get("default"))
        print(f"\nB {B}: same-size copy {ok[0]['same_size_copy_us']:.2f} us; default "
              f"(BV {default['block_v']}, {default['warps']} warps) {default['us']:.2f} us = "
              f"{default['copy_share']:.1%} of 1 GiB copy, {default['same_size_copy_share']:.1%} of same-size copy")
        print(" block_v warps persistent stream stages one_red      us  copy%  same-size%")
        for r in ok[:8]:
            print(f"  {r['block_v']:6d} {r['warps']:5d} {str(r['programs_per_sm']):>10} {str(r['stream']):>6} "
                  f"{r['stages']:6d} {str(r['one_reduce']):>7} "
                  f"{r['us']:7.2f} {r['copy_share']:6.1%} {r['same_size_copy_share']:8.1%}", flush=True)
        for label, rs_ in (("one pass", [r for r in ok if r["stages"] == 1 and not r["one_reduce"]]),
                           ("one reduce", [r for r in ok if r["one_reduce"]]),
                           ("pipelined", [r for r in ok if r["stages"] > 1])):
            if rs_:
                r = rs_[0]
                print(f"  best {label}: BV {r['block_v']} warps {r['warps']} persistent {r['programs_per_sm']} "
                      f"stages {r['stages']}: {r['us']:.2f} us, {r['copy_share']:.1%} of 1 GiB copy", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                       "copy_bytes_per_s": copy_rate, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
