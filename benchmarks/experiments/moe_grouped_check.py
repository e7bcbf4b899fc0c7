"""One MoE layer at Qwen3-Next-80B-A3B's expert shape (D 2048, I 512, 32 experts, top 10, shared expert
512), bf16, 4,096 tokens on a GPU: the packed layer's grouped products against the expert loop, both
against a float64 run of the same weights, and their times.

    python benchmarks/experiments/moe_grouped_check.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from hybridlm.config import HybridConfig
from hybridlm.layers.moe import MoE


def per_call_ms(fn, n: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = HybridConfig(hidden_size=2048, num_experts=32, num_experts_per_tok=10, moe_intermediate_size=512,
                       shared_expert_intermediate_size=512)
    moe = MoE(cfg).cuda().eval()
    x = torch.randn(1, args.tokens, 2048, device="cuda", dtype=torch.bfloat16)
    ref = moe.double()(x.double()).float()
    moe.to(torch.bfloat16)
    loop = moe(x).float()
    ms_loop = per_call_ms(lambda: moe(x))
    moe.pack_for_inference()
    grouped = moe(x).float()
    ms_grouped = per_call_ms(lambda: moe(x))
    out = dict(tokens=args.tokens, rel_grouped_vs_f64=rel(grouped, ref), rel_loop_vs_f64=rel(loop, ref),
               ms_grouped=ms_grouped, ms_loop=ms_loop, card=torch.cuda.get_device_name())
    print(out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
