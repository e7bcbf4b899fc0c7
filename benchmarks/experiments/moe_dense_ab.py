"""The batched static MoE path's down product (every expert on every token, weighted 0 where not
routed: what `MoE.forward(static=True)` runs once N * top_k >= E) in three layouts. One GPU call,
under a minute.

- ``one GEMM [E F, D]``: the down stack stored [E, F, D] (the layout before the third 12-03 session),
  the weighted inner activations [N, E F] times it viewed as [E F, D];
- ``bmm + sum [E, D, F]``: the stack stored as nn.Linear holds it, [E, D, F] (the third 12-03 session):
  a batched product over the experts, [E, N, D], summed over them in float32;
- ``one GEMM [D, E F]``: the stack stored [D, E, F] and viewed as [E, D, F] (``MoE.packed_experts``
  since the fourth 12-03 session): one product with it viewed as [D, E F], what the layer runs now.

The third 12-03 session also timed a Triton kernel streaming each expert's rows once for all tokens
(``moe_dense_down_into``): 38.8-71.8 us against one GEMM's 20.9-23.3, so it was deleted.

Qwen3-Next's experts cut to 32 (F 512, D 2048, bf16), 8 layers' distinct stacks, CUDA-graph replays;
us a layer and the share of the 1 GiB copy rate for the down stack's bytes.

    PYTHONPATH=src python benchmarks/experiments/moe_dense_ab.py [--batches 8,36,64] [--json F]
"""

from __future__ import annotations

import argparse

import torch

from hybridlm.bench import report, timing


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
    edf = [torch.randn(E, D, F, device=dev, dtype=torch.bfloat16) * F ** -0.5 for _ in range(args.layers)]
    layouts = {"[E F, D]": [w.transpose(1, 2).contiguous() for w in edf], "[E, D, F]": edf,
               "[D, E F]": [w.transpose(0, 1).contiguous() for w in edf]}
    nbytes = E * F * D * 2
    rows = []
    for N in (int(b) for b in args.batches.split(",")):
        h = torch.randn(N, E, F, device=dev, dtype=torch.bfloat16)
        cases = {
            "one GEMM [E F, D]": (lambda w: h.view(N, E * F) @ w.view(E * F, D), "[E F, D]"),
            "bmm + sum [E, D, F]": (lambda w: torch.bmm(h.transpose(0, 1), w.transpose(1, 2)).sum(
                0, dtype=torch.float32).to(h.dtype), "[E, D, F]"),
            "one GEMM [D, E F]": (lambda w: h.view(N, E * F) @ w.view(D, E * F).t(), "[D, E F]"),
        }
        ref = torch.einsum("nef,edf->nd", h.double(), edf[0].double())
        for name, (fn, layout) in cases.items():
            stacks = layouts[layout]
            out = fn(stacks[0])
            err = ((out.double() - ref).norm() / ref.norm()).item()
            us = timing.graphed_ms_per_call([lambda w=w: fn(w) for w in stacks], warmup_ms=10, rep_ms=60) * 1e3
            rows.append(dict(N=N, case=name, us=us, bytes=nbytes, copy_share=nbytes / (us * 1e-6) / rate, rel_err=err))
            print(f"N {N:3d} {name:20s}: {us:7.2f} us  {rows[-1]['copy_share']:6.1%}  err {err:.1e}", flush=True)
    report.write_rows_json(args.json, rows, copy_bytes_per_s=rate)


if __name__ == "__main__":
    main()
