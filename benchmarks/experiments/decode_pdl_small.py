"""Does programmatic dependent launch slow the graphed Gated DeltaNet decode step at small batch?

`bench kernels` read 4.32 us at batch 1 in the 12-04 session (PDL on by default) where the 12-03
runs without PDL read 3.2-3.3 us. Times `bench kernels`' own graphed decode rows (hybridlm only) in
this process; run it once with HYBRIDLM_PDL=1 and once with HYBRIDLM_PDL=0:

    for p in 1 0; do HYBRIDLM_PDL=$p python benchmarks/experiments/decode_pdl_small.py --batches 1,8,32; done

Measured (12-04, H200, us a step at batch 1 / 8 / 32): PDL 4.32 / 10.37 / 35.8, without 3.30 / 10.83 /
36.46. ``--trigger late`` times a variant of the kernel's first statement (``utils.pdl_start``): wait for
the predecessor first, then let the successor launch. With the default order (trigger, then wait) a
chain of such kernels can launch many grids ahead, each parked in its wait; waiting first lets only
the next one launch early. One order per process: Triton compiles the kernel once, with the
``pdl_start`` it finds then.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton
import triton.language as tl

from hybridlm.bench import kernels, timing
from hybridlm.ops.triton import decode


@triton.jit
def pdl_wait_then_trigger(USE_PDL: tl.constexpr):
    """``utils.pdl_start`` with its two statements swapped."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--json")
    ap.add_argument("--trigger", choices=("early", "late"), default="early",
                    help="early: the kernels' own pdl_start (trigger, then wait); late: wait, then trigger")
    args = ap.parse_args()
    if args.trigger == "late":
        decode.pdl_start = pdl_wait_then_trigger
    dev = torch.device("cuda")
    bench = kernels.Bench(dev, timing.copy_bytes_per_s(dev), None)
    for B in (int(b) for b in args.batches.split(",")):
        kernels.bench_decode(bench, kernels.QWEN3_NEXT, B)
    rows = [r for r in bench.rows if r.get("section") == "decode graphed"]
    for r in rows:
        print(f"PDL={os.environ.get('HYBRIDLM_PDL', '1')} trigger={args.trigger} B={r.get('B')} graphed {r.get('ms')} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"pdl": os.environ.get("HYBRIDLM_PDL", "1"), "trigger": args.trigger, "rows": bench.rows}, f, indent=1)


if __name__ == "__main__":
    main()
