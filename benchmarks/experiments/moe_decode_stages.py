"""Sparse-MoE decode kernels: software-pipelined loops and the down kernel's blocks. One GPU call,
about a minute.

Qwen3-Next-80B-A3B's expert shapes (D 2048, I 512, 10 of E experts per token, bf16) over 8 layers'
distinct weight stacks (so the timed calls read DRAM, not L2), CUDA-graph replays as in the profiler's
decode step. For each batch N it checks every launch against the reference, then prints us per layer
and the share of the 1 GiB copy rate for the distinct expert weights the call reads:
- the default launch, and (gate/up stages, down stages) pairs (stages 1: the plain loops;
  `pick_stages` gives the default per N);
- with ``--down-sweep``, the down kernel's (BLOCK_I, BLOCK_D, stages, warps) over a grid, gate/up default;
- with ``--gate-up-sweep``, the gate/up kernel's (BLOCK_I, BLOCK_D, stages), down default;
- with ``--baseline FILE`` (another commit's ``ops/triton/moe_decode.py``, e.g. the one that read
  the down weights transposed), its default launch beside ours, on its own layout
  (``--baseline-down-transposed``: down passed as [E, I, D], as before the third 12-03 session); its
  custom op renamed, since torch.library registers a name once per process;
- with ``--down-contiguous``, the default launch again on down stacks stored [E, D, I] (the layout of
  the third 12-03 session) beside the timed stacks, stored [D, E, I] and passed as their [E, D, I]
  view as ``MoE.packed_experts`` gives them since the fourth: the same 1 KB rows, 32 KB apart at 32
  experts instead of adjacent.

    git show 5bf74be:src/hybridlm/ops/triton/moe_decode.py | sed 's/"hybridlm::/"hybridlm_baseline::/' > /tmp/moe_old.py
    PYTHONPATH=src python benchmarks/experiments/moe_decode_stages.py --batches 1,4 --down-sweep \\
        --baseline /tmp/moe_old.py --baseline-down-transposed [--json F]
"""

from __future__ import annotations

import argparse
import itertools

import torch

from hybridlm.bench import load_source, report, timing
from hybridlm.ops import moe_experts
from hybridlm.ops.triton.moe_decode import moe_experts_into, pick_blocks, pick_stages
from hybridlm.ops.triton.decode import _num_sms

STAGES = [None, (1, 1), (2, 2), (3, 3), (4, 4), (3, 1), (1, 3)]  # None: the default launch
# (BLOCK_I, BLOCK_D, stages, warps); the first 12-03 s3 sweep had (512, 256) x (2, 4, 8, 16) x (1-4) x 4
DOWN_SWEEP = list(itertools.product((512,), (4, 8, 16), (3, 4, 6), (4, 8)))
GATE_UP_SWEEP = list(itertools.product((4, 8, 16), (128, 256, 512), (1, 3)))  # (BLOCK_I, BLOCK_D, stages)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--down-sweep", action="store_true")
    ap.add_argument("--gate-up-sweep", action="store_true")
    ap.add_argument("--shared", type=int, default=0, metavar="S",
                    help="a shared expert of inner size S in every launch of ours (Qwen3-Next: 512)")
    ap.add_argument("--baseline", metavar="FILE")
    ap.add_argument("--baseline-down-transposed", action="store_true")
    ap.add_argument("--down-contiguous", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    E, K, D, I = args.experts, 10, 2048, 512
    rate = timing.copy_bytes_per_s(dev)
    print(f"{torch.cuda.get_device_name(dev)}: 1 GiB copy {rate / 1e9:,.0f} GB/s; E {E} K {K} D {D} I {I} bf16")
    torch.manual_seed(0)
    stacks = [[torch.randn(E, *rows, device=dev, dtype=torch.bfloat16) * fan ** -0.5
               for rows, fan in (((I, D), D), ((I, D), D), ((D, I), I))] for _ in range(args.layers)]
    for s in stacks:  # down as MoE.packed_experts stores it: [D, E, I], passed as its [E, D, I] view
        s[2] = s[2].transpose(0, 1).contiguous().transpose(0, 1)
    base = load_source(args.baseline, "moe_decode_baseline") if args.baseline else None
    rows = []
    for N in (int(b) for b in args.batches.split(",")):
        x = torch.randn(N, D, device=dev, dtype=torch.bfloat16)
        experts = torch.stack([torch.randperm(E, device=dev)[:K] for _ in range(N)])
        weights = torch.rand(N, K, device=dev)
        nbytes = experts.unique().numel() * 3 * I * D * 2 + args.shared * D * 2
        out = torch.empty_like(x)
        sh = {}
        if args.shared:
            sh = dict(shared_h_NS=torch.randn(N, args.shared, device=dev, dtype=torch.bfloat16),
                      shared_down_DS=torch.randn(D, args.shared, device=dev, dtype=torch.bfloat16) * args.shared ** -0.5)
        ref = moe_experts(x, experts, weights, *stacks[0], **sh, backend="reference").float()

        def run(label, launch, layer_stacks, **fields):
            launch(layer_stacks[0])
            err = ((out.float() - ref).norm() / ref.norm()).item()
            us = timing.graphed_ms_per_call([lambda s=s: launch(s) for s in layer_stacks],
                                            warmup_ms=10, rep_ms=60) * 1e3
            row = dict(N=N, launch=label, us=us, bytes=nbytes, copy_share=nbytes / (us * 1e-6) / rate,
                       rel_err=err, **fields)
            rows.append(row)
            print(f"N {N:3d} {label}: {us:7.2f} us  {row['copy_share']:6.1%}  err {err:.1e}", flush=True)

        default_blocks = pick_blocks(N, K, I, D, _num_sms(dev))
        for st in STAGES:
            run(f"stages {st or f'default {pick_stages(N)}'} blocks {default_blocks}",
                lambda s, st=st: moe_experts_into(x, experts, weights, *s, out, stages=st, **sh), stacks,
                default=st is None, stages=list(st or pick_stages(N)), blocks=list(default_blocks))
        if args.down_sweep:
            for bi, bd, ds, dw in DOWN_SWEEP:
                blocks = (*default_blocks[:2], bi, bd)
                stages = (pick_stages(N)[0], ds)
                run(f"down BLOCK_I {bi} BLOCK_D {bd} stages {ds} warps {dw}",
                    lambda s, b=blocks, st=stages, w=dw: moe_experts_into(x, experts, weights, *s, out, blocks=b,
                                                                          stages=st, down_warps=w, **sh),
                    stacks, default=False, stages=list(stages), blocks=list(blocks), down_warps=dw)
        if args.gate_up_sweep:
            for bi, bd, gs in GATE_UP_SWEEP:
                blocks = (bi, bd, *default_blocks[2:])
                stages = (gs, pick_stages(N)[1])
                run(f"gate/up BLOCK_I {bi} BLOCK_D {bd} stages {gs}",
                    lambda s, b=blocks, st=stages: moe_experts_into(x, experts, weights, *s, out, blocks=b, stages=st, **sh),
                    stacks, default=False, stages=list(stages), blocks=list(blocks))
        if args.down_contiguous:
            contiguous = [[g, u, d.contiguous()] for g, u, d in stacks]
            run(f"default, down stored [E, D, I] blocks {default_blocks}",
                lambda s: moe_experts_into(x, experts, weights, *s, out, **sh), contiguous,
                default=False, down_layout="EDI", blocks=list(default_blocks))
        if base is not None and not args.shared:
            old = [[g, u, d.transpose(1, 2).contiguous() if args.baseline_down_transposed else d] for g, u, d in stacks]
            run("baseline default", lambda s: base.moe_experts_into(x, experts, weights, *s, out), old,
                default=False, baseline=args.baseline)
    report.write_rows_json(args.json, rows, copy_bytes_per_s=rate)


if __name__ == "__main__":
    main()
