"""One MoE layer at Qwen3-Next-80B-A3B's expert shape (D 2048, I 512, 32 experts, top 10, shared expert
512), bf16, 4,096 tokens on a GPU: the packed layer's grouped products against the expert loop, both
against a float64 run of the same weights, and their times.

    OUT=dir python benchmarks/experiments/moe_grouped_check.py
"""
import json, os, time, torch
from hybridlm.config import HybridConfig
from hybridlm.layers.moe import MoE
torch.manual_seed(0)
cfg = HybridConfig(hidden_size=2048, num_experts=32, num_experts_per_tok=10, moe_intermediate_size=512,
                   shared_expert_intermediate_size=512)
moe = MoE(cfg).cuda().to(torch.bfloat16).eval()
x = torch.randn(1, 4096, 2048, device="cuda", dtype=torch.bfloat16)
with torch.no_grad():
    want = moe(x).float()
    ref = moe.double()(x.double()).float(); moe.to(torch.bfloat16)
    moe.pack_for_inference()
    got = moe(x).float()
    def t(f, n=20):
        f(); torch.cuda.synchronize(); t0 = time.perf_counter()
        for _ in range(n): f()
        torch.cuda.synchronize(); return (time.perf_counter() - t0) / n * 1e3
    ms_grouped = t(lambda: moe(x))
    moe._pack = None  # unpacked stacks: the loop (weights still views, values unchanged)
    ms_loop = t(lambda: moe(x))
rel = lambda a, b: ((a - b).norm() / b.norm()).item()
out = dict(rel_grouped_vs_f64=rel(got, ref), rel_loop_vs_f64=rel(want, ref), ms_grouped=ms_grouped, ms_loop=ms_loop)
print(out)
json.dump(out, open(os.environ["OUT"] + "/moe_check.json", "w"))
