"""Sparse-MoE decode kernels with software-pipelined loops: does prefetching the next weight tiles
help? One GPU call, under a minute.

Qwen3-Next-80B-A3B's expert shapes (D 2048, I 512, 10 of E experts per token, bf16) over 8 layers'
distinct weight stacks (so the timed calls read DRAM, not L2), CUDA-graph replays as in the profiler's
decode step. For each batch N and each (gate/up stages, down stages) it checks the kernels against
the reference, then prints us per layer and the share of the 1 GiB copy rate for the distinct expert
weights the call reads (stages 1: the plain loops; `pick_stages` gives the default per N).

    PYTHONPATH=src python benchmarks/experiments/moe_decode_stages.py [--batches 1,4,16,64] [--json F]
"""

from __future__ import annotations

import argparse

import torch

from hybridlm.bench import report, timing
from hybridlm.ops import moe_experts
from hybridlm.ops.triton.moe_decode import moe_experts_into, pick_stages

STAGES = [None, (1, 1), (2, 2), (3, 3), (4, 4), (3, 1), (1, 3)]  # None: the default launch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    E, K, D, I = args.experts, 10, 2048, 512
    rate = timing.copy_bytes_per_s(dev)
    print(f"{torch.cuda.get_device_name(dev)}: 1 GiB copy {rate / 1e9:,.0f} GB/s; E {E} K {K} D {D} I {I} bf16")
    torch.manual_seed(0)
    stacks = [[torch.randn(E, I, D, device=dev, dtype=torch.bfloat16) * fan ** -0.5 for fan in (D, D, I)]
              for _ in range(args.layers)]
    rows = []
    for N in (int(b) for b in args.batches.split(",")):
        x = torch.randn(N, D, device=dev, dtype=torch.bfloat16)
        experts = torch.stack([torch.randperm(E, device=dev)[:K] for _ in range(N)])
        weights = torch.rand(N, K, device=dev)
        nbytes = experts.unique().numel() * 3 * I * D * 2
        out = torch.empty_like(x)
        for st in STAGES:
            ref = moe_experts(x, experts, weights, *stacks[0], backend="reference").float()
            moe_experts_into(x, experts, weights, *stacks[0], out, stages=st)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            calls = [lambda s=s: moe_experts_into(x, experts, weights, *s, out, stages=st) for s in stacks]
            us = timing.graphed_ms_per_call(calls, warmup_ms=10, rep_ms=60) * 1e3
            row = dict(N=N, default=st is None, stages=list(st or pick_stages(N)), us=us, bytes=nbytes,
                       copy_share=nbytes / (us * 1e-6) / rate, rel_err=err)
            rows.append(row)
            label = st or f"default {pick_stages(N)}"
            print(f"N {N:3d} stages {label}: {us:7.2f} us  {row['copy_share']:6.1%}  err {err:.1e}", flush=True)
    report.write_rows_json(args.json, rows, copy_bytes_per_s=rate)


if __name__ == "__main__":
    main()
