"""The fused MoE decode kernel (routing + gate/up + barrier + down, one launch) against the routing
kernel and the two expert kernels, at Qwen3-Next-80B-A3B's expert shapes. One GPU call, about a minute.

D 2048, I 512, top 10 of E experts, a gated shared expert of 512 (its gate and up projections given,
as the layer hands them over), bf16, over ``--layers`` distinct weight stacks (so the calls read DRAM,
not L2), CUDA-graph replays as in the profiler's decode step. Every launch is first checked against the
three-kernel result (bit for bit) and the sync counters against zero; then us per layer and the share of
the 1 GiB copy rate for the bytes a call must read (the routed experts' gate, up and down rows and the
shared expert's down rows).

    PYTHONPATH=src python benchmarks/experiments/moe_fused_ab.py [--batches 1,2] [--json F]
"""

from __future__ import annotations

import argparse

import torch

from hybridlm.bench import report, timing
from hybridlm.ops.triton.moe_decode import moe_experts_decode, moe_fused_into
from hybridlm.ops.triton.moe_route import moe_route

# (programs per SM, warps, gate/up BLOCK_I, (gate/up stages, down stages)); None: the defaults
CONFIGS = [None, (1, 4, 8, (3, 4)), (2, 4, 16, (3, 4)), (2, 4, 8, (1, 4)), (2, 4, 8, (2, 3)), (4, 2, 8, (3, 4)),
           (1, 8, 8, (3, 4)), (2, 4, 4, (3, 4))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,2")
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    E, K, D, I, S = args.experts, 10, 2048, 512, 512
    rate = timing.copy_bytes_per_s(dev)
    print(f"{torch.cuda.get_device_name(dev)}: 1 GiB copy {rate / 1e9:,.0f} GB/s; E {E} K {K} D {D} I {I} S {S} bf16")
    torch.manual_seed(0)
    bf = dict(device=dev, dtype=torch.bfloat16)
    layers = []
    for _ in range(args.layers):
        gate, up = (torch.randn(E, I, D, **bf) * D ** -0.5 for _ in range(2))
        down = (torch.randn(D, E, I, **bf) * I ** -0.5).transpose(0, 1)  # MoE.packed_experts' layout
        layers.append((gate, up, down, torch.randn(D, S, **bf) * S ** -0.5))
    rows = []
    for N in (int(b) for b in args.batches.split(",")):
        x = torch.randn(N, D, **bf)
        logits = [torch.randn(N, E, **bf) for _ in layers]
        shared = [dict(shared_h_NS=torch.randn(N, S, **bf), shared_up_NS=torch.randn(N, S, **bf),
                       shared_gate_N=torch.randn(N, **bf)) for _ in layers]
        out = torch.empty_like(x)
        sync = torch.zeros(2, dtype=torch.int32, device=dev)
        experts = moe_route(logits[0], K, "softmax", True)[1]
        nbytes = experts.unique().numel() * 3 * I * D * 2 + S * D * 2

        def three(l):
            w, e = moe_route(logits[l], K, "softmax", True)
            return moe_experts_decode(x, e, w, *layers[l][:3], shared_down_DS=layers[l][3], **shared[l])

        def fused(l, cfg):
            kw = {} if cfg is None else dict(programs_per_sm=cfg[0], num_warps=cfg[1], block_i=cfg[2], stages=cfg[3])
            moe_fused_into(x, logits[l], K, "softmax", True, 1.0, None, *layers[l][:3], out, sync,
                           shared_down_DS=layers[l][3], **shared[l], **kw)

        expect = three(0)
        us = timing.graphed_ms_per_call([lambda l=l: three(l) for l in range(len(layers))], warmup_ms=10,
                                        rep_ms=60) * 1e3
        rows.append(dict(N=N, launch="three kernels", us=us, copy_share=nbytes / (us * 1e-6) / rate, bytes=nbytes))
        print(f"N {N} three kernels (route, gate/up, down): {us:7.2f} us  {rows[-1]['copy_share']:6.1%}", flush=True)
        for cfg in CONFIGS:
            try:
                out.fill_(float("nan"))
                fused(0, cfg)
                torch.cuda.synchronize()
                same = bool(torch.equal(out, expect)) and int(sync.abs().sum()) == 0
                us = timing.graphed_ms_per_call([lambda l=l: fused(l, cfg) for l in range(len(layers))],
                                                warmup_ms=10, rep_ms=60) * 1e3
            except (ValueError, RuntimeError) as exc:
                print(f"N {N} fused {cfg}: {exc}", flush=True)
                continue
            rows.append(dict(N=N, launch=f"fused {cfg or 'default'}", us=us, copy_share=nbytes / (us * 1e-6) / rate,
                             bytes=nbytes, equal=same, default=cfg is None))
            print(f"N {N} fused {str(cfg or 'default'):24s}: {us:7.2f} us  {rows[-1]['copy_share']:6.1%}  "
                  f"equal to three kernels: {same}", flush=True)
    report.write_rows_json(args.json, rows, copy_bytes_per_s=rate)


if __name__ == "__main__":
    main()
