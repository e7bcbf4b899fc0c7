"""Launch sweep of the split-KV decode attention kernel at long context (default: Qwen3-Next's
attention layers, 16 query heads, 2 key/value heads, head dim 256; bf16, every slot of the cache
visible unless --visible).

docs/profile (2026-12-01) measured the twin's long-context KV reads at 40-60% of the copy rate. The
kernel branches around blocks with no visible slot, and loads inside a branch are not
software-pipelined: each block waits for its positions, then for its keys and values. This times
the kernel with the branch (the default) against blocks run masked with 2-4 pipeline stages, at
block sizes 32 and 64, 4 and 8 warps, and 2, 4 or 8 programs per multiprocessor (NSPLIT), each
checked against the default's output first. Bytes: the visible keys and values and every position,
read once. A cache smaller than 4x the L2 is timed round-robin over enough copies of it that the
timed calls read DRAM (one 67 MB cache, at head dim 128 with one key/value head, read partly from
L2 and its rows varied 2x between calls), as CUDA-graph replays (eager timing measured the host's
launches at B 1, S 128k, not the kernels).

    python benchmarks/experiments/decode_attn_sweep.py --json out.json

Offline sm_90 compiles (Triton 3.6, head dim 256, the launcher's specialisation of unit strides
and 16-divisible ones; without it the compile spills kilobytes and says nothing about the GPU):
the default (block 32, 4 warps, branch) takes 190 registers and no stack; masked blocks at 3
stages stage every load as an asynchronous copy (LDGSTS) at 184 registers (4 warps) or 108
(8 warps), 42 KB of shared memory.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton

from hybridlm.bench import timing
from hybridlm.ops.triton.decode import _num_sms
from hybridlm.ops.triton.decode_attention import decode_attention_into, split_plan

SHAPES = [(1, 131072), (1, 1048576), (8, 32768), (40, 131072)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json")
    ap.add_argument("--shapes", default=",".join(f"{b}x{s}" for b, s in SHAPES), help="BxS,... (default: %(default)s)")
    ap.add_argument("--heads", default="16:2", help="query heads:key/value heads (default: %(default)s, Qwen3-Next)")
    ap.add_argument("--dim", type=int, default=256, help="head dim of keys and values (default: %(default)s)")
    ap.add_argument("--visible", type=int, help="only the first N slots hold keys (the rest empty, position -1): "
                    "what a mostly empty preallocated cache costs each launch")
    ap.add_argument("--configs", help="only these launches, skip:stages:block:warps,... e.g. 1:1:32:4,0:3:64:8 "
                    "(splits from the default heuristic)")
    args = ap.parse_args()
    H, HKV = (int(x) for x in args.heads.split(":"))
    D = args.dim
    dev = torch.device("cuda")
    sms = _num_sms(dev)
    copy = timing.copy_bytes_per_s(dev)
    print(f"copy {copy / 1e9:,.0f} GB/s, {sms} SMs", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        B, S = (int(x) for x in shape.split("x"))
        torch.manual_seed(0)
        q = torch.randn(B, H, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(B, S, HKV, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn(B, S, HKV, D, device=dev, dtype=torch.bfloat16)
        copies = max(1, -(-4 * timing.l2_cache_bytes(dev) // (2 * k.numel() * k.element_size())))
        caches = [(k, v)] + [(k.clone(), v.clone()) for _ in range(copies - 1)]
        k_pos = torch.arange(S, device=dev, dtype=torch.int32)[None].expand(B, S).contiguous()
        seen = S if args.visible is None else min(S, args.visible)
        k_pos[:, seen:] = -1
        q_pos = torch.full((B,), seen - 1, device=dev, dtype=torch.int32)
        nbytes = (k.numel() + v.numel()) * 2 * seen // S + k_pos.numel() * 4
        ref = torch.empty(B, H, D, device=dev, dtype=torch.bfloat16)
        decode_attention_into(q, k, v, q_pos, k_pos, ref, scale=D ** -0.5, window=None)
        default_n = split_plan(q, k, v)[0]
        launches = itertools.product([(True, 1), (False, 2), (False, 3), (False, 4)], [32, 64], [4, 8], [None, 4, 8, 16])
        if args.configs:
            launches = [((bool(int(c[0])), int(c[1])), int(c[2]), int(c[3]), None)
                        for c in (x.split(":") for x in args.configs.split(","))]
        for (skip, stages), bs, warps, per_sm in launches:
            n = None if per_sm is None else triton.cdiv(per_sm * sms, B * HKV)
            o = torch.empty_like(ref)

            def launch(k, v):
                decode_attention_into(q, k, v, q_pos, k_pos, o, scale=D ** -0.5, window=None, n_splits=n,
                                      block_s=bs, skip_empty=skip, num_stages=stages, num_warps=warps)
            try:
                launch(k, v)
                torch.cuda.synchronize()
            except Exception as e:  # a launch that does not compile or fit: record and go on
                print(f"B {B} S {S} skip {skip} stages {stages} bs {bs} warps {warps} n {n}: {type(e).__name__}",
                      flush=True)
                continue
            err = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
            # CUDA-graph replays, as the profiler's decode step runs: timed eagerly, the host's two
            # launches took about as long as the kernels at B 1, S 128k (90-180 us for one launch,
            # by the order it was timed in: the ninth 2026-12-02 session's 38% row)
            ms = timing.graphed_ms_per_call([lambda c=c: launch(*c) for c in caches], warmup_ms=10, rep_ms=60)
            row = dict(B=B, S=S, visible=seen, skip_empty=skip, stages=stages, block_s=bs, warps=warps,
                       n_splits=n or default_n, ms=ms, gbps=nbytes / ms / 1e6, copy_share=nbytes / (ms * 1e-3) / copy,
                       rel_err=err)
            rows.append(row)
            print(f"B {B:3d} S {S:8d} skip {skip!s:5} stages {stages} bs {bs} warps {warps} "
                  f"splits {row['n_splits']:4d}: "
                  f"{ms * 1e3:9.1f} us {row['gbps']:7.0f} GB/s {row['copy_share']:6.1%} err {err:.1e}", flush=True)
        best = max((r for r in rows if r["B"] == B and r["S"] == S and r["rel_err"] < 1e-2), key=lambda r: r["gbps"])
        print("best", best, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(card=torch.cuda.get_device_name(dev), torch=torch.__version__, triton=triton.__version__,
                           copy_bytes_per_s=copy, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
