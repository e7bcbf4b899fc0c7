"""Does programmatic dependent launch slow the graphed Gated DeltaNet decode step at small batch?

`bench kernels` read 4.32 us at batch 1 in the 12-04 session (PDL on by default) where the 12-03
runs without PDL read 3.2-3.3 us. Times `bench kernels`' own graphed decode rows (hybridlm only) in
this process; run it once with HYBRIDLM_PDL=1 and once with HYBRIDLM_PDL=0:

    for p in 1 0; do HYBRIDLM_PDL=$p python benchmarks/experiments/decode_pdl_small.py --batches 1,8,32; done

Measured (12-04, H200, us a step at batch 1 / 8 / 32): PDL 4.32 / 10.37 / 35.8, without 3.30 / 10.83 /
36.46. ``HYBRIDLM_PDL_ORDER=wait-first`` swaps the two PDL statements of every kernel (``utils.pdl_start``):
wait for the predecessor first, then let the successor launch. With the default order (trigger, then
wait) a chain of such kernels can launch many grids ahead, each parked in its wait; waiting first lets
only the next one launch early. Second 12-04 session (then ``--trigger late``, patching this kernel
alone): wait-first 2.71 / 10.45 / 36.07 us at batch 1 / 8 / 32 against 4.32 / 10.39 / 36.01.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from hybridlm.bench import kernels, timing
from hybridlm.ops.triton.utils import PDL_ORDER


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    bench = kernels.Bench(dev, timing.copy_bytes_per_s(dev), None)
    for B in (int(b) for b in args.batches.split(",")):
        kernels.bench_decode(bench, kernels.QWEN3_NEXT, B)
    rows = [r for r in bench.rows if r.get("section") == "decode graphed"]
    for r in rows:
        print(f"PDL={os.environ.get('HYBRIDLM_PDL', '1')} order={PDL_ORDER} B={r.get('B')} graphed {r.get('ms')} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"pdl": os.environ.get("HYBRIDLM_PDL", "1"), "order": PDL_ORDER, "rows": bench.rows}, f, indent=1)


if __name__ == "__main__":
    main()
