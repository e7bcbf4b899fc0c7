"""Top-k routing of a decode step: the Triton kernel (``ops/triton/moe_route.py``) against the
PyTorch routing it replaces, eager and compiled by inductor. One GPU call, under a minute.

Why: in the compiled batch-1 step on an H200 (fifth 12-03 session's 4-layer trace) each MoE layer
ran two inductor kernels for its routing (a softmax-and-sort, 2.2 us, and a gather-sum-divide fused
with the shared expert's gating, 1.1 us) plus their launch gaps; the kernel does it in one.

Per case, 48 calls (one per layer of Qwen3-Next-80B-A3B), each on its own logits, captured as one
CUDA graph and replayed; us a call (kernels and the gaps between them). Softmax router, top 10,
renormalised, as Qwen3-Next; E = 32 (the profiler's ``--experts 32``) and 512 (the released model),
N = 1 and 4 tokens. Every case's experts are checked against the eager reference first.

    PYTHONPATH=src python benchmarks/experiments/moe_route_ab.py [--json F]
"""

from __future__ import annotations

import argparse

import torch

from hybridlm.bench import report, timing
from hybridlm.ops.moe_route import route_reference
from hybridlm.ops.triton.moe_route import moe_route_into


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(dev))
    K = args.top_k

    def into(x, w_out, e_out):  # the outputs written in place: inductor fuses the copies into its kernels
        w, e = route_reference(x, K, "softmax", True)
        w_out.copy_(w)
        e_out.copy_(e)

    compiled_into = torch.compile(into, fullgraph=True)
    rows = []
    for E in (32, 512):
        for N in (1, 4):
            gen = torch.Generator().manual_seed(E + N)
            xs = [(3 * torch.randn(N, E, generator=gen)).to(dev, torch.bfloat16) for _ in range(args.layers)]
            outs = [(torch.empty(N, K, device=dev), torch.empty(N, K, device=dev, dtype=torch.int64)) for _ in xs]
            want = [route_reference(x, K, "softmax", True)[1] for x in xs]
            cases = {
                "reference, eager": lambda x, o: into(x, *o),
                "reference, compiled": lambda x, o: compiled_into(x, *o),
            }
            for warps in (1, 2, 4, 8):
                cases[f"kernel, {warps} warps"] = lambda x, o, w=warps: moe_route_into(
                    x, K, "softmax", True, 1.0, None, *o, num_warps=w)
            for name, step in cases.items():
                calls = [lambda x=x, o=o, step=step: step(x, o) for x, o in zip(xs, outs)]
                for fn in calls:
                    fn()
                torch.cuda.synchronize()
                same = all(torch.equal(o[1], w) for o, w in zip(outs, want))
                us = timing.graphed_ms_per_call(calls, warmup_ms=10, rep_ms=100) * 1e3
                rows.append(dict(E=E, N=N, K=K, case=name, us_per_call=us, experts_equal=same))
                print(f"E {E:4d} N {N}  {name:22s} {us:6.2f} us a call  experts equal: {same}", flush=True)
    report.write_rows_json(args.json, rows)


if __name__ == "__main__":
    main()
