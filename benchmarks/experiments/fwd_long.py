"""``bench kernels``' long rows alone: our forward and fla 0.6.0's (when importable) at Qwen3-Next
heads, B 1, one sequence of each T (the whole kernels benchmark takes longer than one device call).

    python benchmarks/experiments/fwd_long.py --T 32768,131072 --json out.json
"""

from __future__ import annotations

import argparse
import json

import torch

from hybridlm.bench import kernels as K
from hybridlm.bench import timing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", default="32768,131072")
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    bench = K.Bench(dev, timing.copy_bytes_per_s(dev), K._import_fla(False))
    for T in (int(x) for x in args.T.split(",")):
        K.bench_long(bench, K.QWEN3_NEXT, T)
    for r in bench.rows:
        print(r.get("impl"), r.get("T"), r.get("ms"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(bench.rows, f, indent=1, default=str)


if __name__ == "__main__":
    main()
