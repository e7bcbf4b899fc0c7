"""The batched static MoE path's down product (every expert on every token, weighted 0 where not
routed: what `MoE.forward(static=True)` runs once N * top_k >= E) in its two layouts. One GPU call,
under a minute.

- ``one GEMM``: the down stack stored [E, F, D] (the layout before the third 12-03 session), so the
  weighted inner activations [N, E F] take one product with it viewed as [E F, D];
- ``bmm + sum``: the stack as nn.Linear holds it, [E, D, F] (now): a batched product over the experts,
  [E, N, D], summed over them in float32 (what the layer does now);
- ``triton d16 f256 s4`` and the like: ``moe_dense_down_into`` (ops/triton/moe_decode.py), the
  candidate kernel that streams each expert's rows once for all tokens into one float32 tile, at
  (block_d, block_f, stages) from DENSE_LAUNCHES (not yet timed when it was written).

Qwen3-Next's experts cut to 32 (F 512, D 2048, bf16), 8 layers' distinct stacks, CUDA-graph replays;
us a layer and the share of the 1 GiB copy rate for the down stack's bytes.

    PYTHONPATH=src python benchmarks/experiments/moe_dense_ab.py [--batches 8,36,64] [--json F]
"""

from __future__ import annotations

import argparse

import torch
import triton

from hybridlm.bench import report, timing
from hybridlm.ops.triton.moe_decode import moe_dense_down_into

# (block_d, block_f, stages); offline sm_90 compiles of blocks of 64 tokens take 123-196 KB of shared
# memory for these (16, 512, 3 stages would need 240 KB, more than a block may use)
DENSE_LAUNCHES = [(16, 256, 4), (32, 256, 4), (16, 128, 6), (64, 128, 4), (32, 128, 4)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="8,36,64")
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    E, F, D = args.experts, 512, 2048
    rate = timing.copy_bytes_per_s(dev)
    print(f"{torch.cuda.get_device_name(dev)}: 1 GiB copy {rate / 1e9:,.0f} GB/s; E {E} F {F} D {D} bf16")
    torch.manual_seed(0)
    new = [torch.randn(E, D, F, device=dev, dtype=torch.bfloat16) * F ** -0.5 for _ in range(args.layers)]
    old = [w.transpose(1, 2).contiguous() for w in new]
    nbytes = E * F * D * 2
    rows = []
    for N in (int(b) for b in args.batches.split(",")):
        h = torch.randn(N, E, F, device=dev, dtype=torch.bfloat16)
        y = torch.empty(N, D, device=dev, dtype=torch.bfloat16)
        cases = {
            "one GEMM": lambda w: h.view(N, E * F) @ w.view(E * F, D),
            "bmm + sum": lambda w: torch.bmm(h.transpose(0, 1), w.transpose(1, 2)).sum(0, dtype=torch.float32).to(h.dtype),
        }
        for bd, bf, st in DENSE_LAUNCHES:
            cases[f"triton d{bd} f{bf} s{st}"] = (
                lambda w, bd=bd, bf=bf, st=st: moe_dense_down_into(h, w, y, block_d=bd, block_f=bf, stages=st) or y)
        ref = torch.einsum("nef,edf->nd", h.double(), new[0].double())
        for name, fn in cases.items():
            try:
                out = fn(old[0] if name == "one GEMM" else new[0])
            except triton.runtime.errors.OutOfResources as exc:
                print(f"N {N:3d} {name:10s}: skipped ({exc})", flush=True)
                continue
            err = ((out.double() - ref).norm() / ref.norm()).item()
            stacks = old if name == "one GEMM" else new
            us = timing.graphed_ms_per_call([lambda w=w: fn(w) for w in stacks], warmup_ms=10, rep_ms=60) * 1e3
            rows.append(dict(N=N, case=name, us=us, bytes=nbytes, copy_share=nbytes / (us * 1e-6) / rate, rel_err=err))
            print(f"N {N:3d} {name:10s}: {us:7.2f} us  {rows[-1]['copy_share']:6.1%}  err {err:.1e}", flush=True)
    report.write_rows_json(args.json, rows, copy_bytes_per_s=rate)


if __name__ == "__main__":
    main()
