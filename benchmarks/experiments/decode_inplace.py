"""Is the decode step's gap to a copy the in-place update? One GPU call, a few seconds.

At each batch (Qwen3-Next heads: 32 value heads, K = V = 128, float32 state) it times, as CUDA-graph
replays over distinct buffers totalling >= 4x L2 (as ``decode_sweep.py``):
  copy        d.copy_(s): reads one buffer, writes another (the yardstick's own pattern)
  rmw         s.mul_(c): reads and writes the same buffer in place (torch's element-wise kernel)
  step        the Triton decode step in place (state_out is state_in), default launch
  step_oop    the same step writing a second buffer (state_out distinct)
and prints each as a share of the 1 GiB copy rate.

    PYTHONPATH=src python benchmarks/experiments/decode_inplace.py [--batches 32,64,128] [--json F]
"""

from __future__ import annotations

import argparse
import math

import torch

from hybridlm.bench import report, timing
from hybridlm.ops.triton.decode import decode_into


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="32,64,128")
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    H, HV, K, V = 16, 32, 128, 128
    rate = timing.copy_bytes_per_s(dev)
    print(f"{torch.cuda.get_device_name(dev)}: 1 GiB copy {rate / 1e9:,.0f} GB/s")
    rows = []
    for B in (int(b) for b in args.batches.split(",")):
        nbytes = timing.decode_state_bytes(B, HV, K, V)
        n = max(2, min(64, math.ceil(4 * timing.l2_cache_bytes(dev) / (nbytes / 2))))
        src = [0.1 * torch.randn(B, HV, K, V, device=dev) for _ in range(n)]
        dst = [torch.empty_like(s) for s in src]
        q = torch.randn(B, H, K, device=dev, dtype=torch.bfloat16)
        k = torch.randn_like(q)
        v = torch.randn(B, HV, V, device=dev, dtype=torch.bfloat16)
        g = torch.nn.functional.logsigmoid(torch.randn(B, HV, device=dev) + 3.0)
        beta = torch.rand(B, HV, device=dev)
        o = torch.empty_like(v)

        def step(s, d):
            decode_into(q, k, v, g, beta, s, d, o, scale=K ** -0.5, use_qk_l2norm=True, A_log=None,
                        dt_bias=None, beta_is_logit=False)

        cases = dict(copy=[lambda s=s, d=d: d.copy_(s) for s, d in zip(src, dst)],
                     rmw=[lambda s=s: s.mul_(0.999) for s in src],
                     step=[lambda s=s: step(s, s) for s in src],
                     step_oop=[lambda s=s, d=d: step(s, d) for s, d in zip(src, dst)])
        row = dict(B=B, buffers=n, bytes=nbytes)
        for name, calls in cases.items():
            us = timing.graphed_ms_per_call(calls, warmup_ms=10, rep_ms=60) * 1e3
            row[name + "_us"] = us
            row[name + "_share"] = nbytes / (us * 1e-6) / rate
        rows.append(row)
        print(f"B {B:4d} ({n} buffers): " + "  ".join(f"{c} {row[c + '_us']:.2f} us {row[c + '_share']:.1%}"
                                                     for c in cases), flush=True)
        del src, dst
        torch.cuda.empty_cache()
    report.write_rows_json(args.json, rows, copy_bytes_per_s=rate)


if __name__ == "__main__":
    main()
