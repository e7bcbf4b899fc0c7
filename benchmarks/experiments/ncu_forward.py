"""One chunked forward at Qwen3-Next heads (Hqk 16, Hv 32, d 128, bf16, beta float32), B 1, T 32k,
for Nsight Compute to read the prep's and the state pass's hardware counters (NOTES-chunk v12: on
the H200 the state pass used 39% of L2 bandwidth at 6.25% occupancy, latency-bound; the prep's
L1/shared-memory pipe ran at 78%):

    ncu --clock-control none -k regex:"chunk_(prep|fwd)_kernel" --launch-skip 2 --launch-count 2 \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \\
        python3 benchmarks/experiments/ncu_forward.py

Runs the forward twice (the first launches compile), so --launch-skip 2 profiles the second.
"""

from __future__ import annotations

import argparse

import torch

from hybridlm.ops.triton.chunk import chunk_gated_delta_rule

H, HV, D = 16, 32, 128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, default=32768)
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    T = args.T
    q = torch.randn(1, T, H, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, T, H, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, T, HV, D, device=dev, dtype=torch.bfloat16)
    g = torch.nn.functional.logsigmoid(torch.randn(1, T, HV, device=dev) + 3.0)
    beta = torch.rand(1, T, HV, device=dev)
    with torch.no_grad():
        for _ in range(2):
            o, _ = chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True, output_final_state=True)
    torch.cuda.synchronize()
    print("forward ran", tuple(o.shape), o.float().abs().mean().item())


if __name__ == "__main__":
    main()
