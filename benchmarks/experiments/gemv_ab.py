"""The decode matrix-vector kernel (``ops/triton/gemv.py``) against cuBLAS (``F.linear``) at the
projections of a Qwen3-Next decode step, batch 1 and 4, bf16. One GPU call, under a minute.

``ours`` is the default launch: the block kernel, or at one row with HYBRIDLM_PDL=1 the one-wave row
kernel with programmatic dependent launch (consecutive replays then overlap, as consecutive kernels
of a decode step do). ``ours_blocks`` is the block kernel at its default blocks and 3-stage loop
(``ours`` before the sixth 12-03 session; ``ours_1stage`` was its plain loop, and in the first run,
2026-12-03, these were named ``ours_3stages`` and ``ours``), ``ours_row`` the row kernel at one row
(with PDL as the environment sets it). The sixth 12-03 session's file ran with PDL on by default. Each row is timed as CUDA-graph replays over distinct weight copies totalling >= 4x L2 (a decode
step reads every weight from memory once), and printed with the share of the 1 GiB copy rate its
weight bytes reach. Every kernel output is first checked against F.linear.

With ``--sweep`` it then times, at one row, the kernel over a grid of launches (BLOCK_O, BLOCK_D,
stages, warps) at every shape, each checked against F.linear, and prints the fastest and the default.

    PYTHONPATH=src python benchmarks/experiments/gemv_ab.py [--sweep] [--json F]
"""

from __future__ import annotations

import argparse
import itertools
import math

import torch
import torch.nn.functional as F

from hybridlm.bench import report, timing
from hybridlm.ops.triton.gemv import decode_linear, gemv_into, pick_blocks
from hybridlm.ops.triton.decode import _num_sms

# (what, out rows O, in width D) at Qwen3-Next-80B-A3B's dimensions (hidden 2048)
SHAPES = [
    ("MoE router + shared gate/up stack", 1064, 2048),
    ("shared expert down", 2048, 512),
    ("Gated DeltaNet in-projections", 12352, 2048),
    ("attention q (gated), k, v", 9216, 2048),
    ("output projection", 2048, 4096),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,4")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    rate = timing.copy_bytes_per_s(dev)
    print(f"{torch.cuda.get_device_name(dev)}: 1 GiB copy {rate / 1e9:,.0f} GB/s")
    rows = []
    for what, O, D in SHAPES:
        wbytes = O * D * 2
        n = max(2, min(256, math.ceil(4 * timing.l2_cache_bytes(dev) / wbytes)))
        ws = [torch.randn(O, D, device=dev, dtype=torch.bfloat16) * D ** -0.5 for _ in range(n)]
        for N in (int(r) for r in args.rows.split(",")):
            x = torch.randn(N, D, device=dev, dtype=torch.bfloat16)
            ref = F.linear(x.float(), ws[0].float())
            err = ((decode_linear(x, ws[0]).float() - ref).norm() / ref.norm()).item()
            y = torch.empty(N, O, device=dev, dtype=torch.bfloat16)
            cases = dict(cublas=[lambda w=w: F.linear(x, w) for w in ws],
                         ours_blocks=[lambda w=w: gemv_into(x, w, y, blocks=pick_blocks(N, O, D, _num_sms(dev)))
                                      for w in ws],
                         ours_row=[lambda w=w: gemv_into(x, w, y, row=True) for w in ws],
                         ours=[lambda w=w: gemv_into(x, w, y) for w in ws])
            row = dict(what=what, O=O, D=D, N=N, buffers=n, weight_bytes=wbytes, rel_err=err,
                       blocks=list(pick_blocks(N, O, D, _num_sms(dev))))
            for name, calls in cases.items():
                us = timing.graphed_ms_per_call(calls, warmup_ms=10, rep_ms=60) * 1e3
                row[name + "_us"] = us
                row[name + "_share"] = wbytes / (us * 1e-6) / rate
            rows.append(row)
            print(f"{what:36s} N {N} {O:6d} x {D:5d} (err {err:.1e}, blocks {row['blocks']}): " + "  ".join(
                f"{c} {row[c + '_us']:.2f} us ({row[c + '_share']:.0%})" for c in cases), flush=True)
        if args.sweep:
            rows += sweep(what, O, D, ws, rate)
        del ws
    report.write_rows_json(args.json, rows, copy_bytes_per_s=rate)


SWEEP = list(itertools.product((1, 2, 4, 8, 16), (512, 1024), (3, 4, 6), (4, 8)))  # BO, BD, stages, warps


def sweep(what, O, D, ws, rate) -> list[dict]:
    """The kernel at one row over SWEEP's launches (those whose float32 tile fits 64 values a
    thread), fastest first; prints the best five and the default."""
    dev = ws[0].device
    x = torch.randn(1, D, device=dev, dtype=torch.bfloat16)
    y = torch.empty(1, O, device=dev, dtype=torch.bfloat16)
    ref = F.linear(x.float(), ws[0].float())
    default = (*pick_blocks(1, O, D, _num_sms(dev)), 3, 4)
    out = []
    for bo, bd, st, wp in SWEEP:
        if bo * bd > 64 * 32 * wp or bo > O:
            continue
        gemv_into(x, ws[0], y, blocks=(bo, bd), stages=st, num_warps=wp)
        err = ((y.float() - ref).norm() / ref.norm()).item()
        us = timing.graphed_ms_per_call([lambda w=w: gemv_into(x, w, y, blocks=(bo, bd), stages=st, num_warps=wp)
                                         for w in ws], warmup_ms=5, rep_ms=30) * 1e3
        out.append(dict(what=what, O=O, D=D, N=1, sweep=True, blocks=[bo, bd], stages=st, warps=wp, us=us,
                        share=O * D * 2 / (us * 1e-6) / rate, rel_err=err, default=(bo, bd, st, wp) == default))
    out.sort(key=lambda r: r["us"])
    for r in out[:5] + [r for r in out if r["default"]]:
        print(f"    sweep {what}: blocks {r['blocks']} stages {r['stages']} warps {r['warps']}"
              f"{' (default)' if r['default'] else ''}: {r['us']:.2f} us ({r['share']:.0%}, err {r['rel_err']:.1e})",
              flush=True)
    return out


if __name__ == "__main__":
    main()
