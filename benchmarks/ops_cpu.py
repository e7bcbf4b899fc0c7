"""Time the gated delta rule's token loop against its chunked WY form on the CPU.

    python benchmarks/ops_cpu.py                      # T = 4096, B = 1, H = 4, K = V = 64, float32
    python benchmarks/ops_cpu.py --json out.json --results benchmarks/RESULTS.md

Prints a table (median ms, tokens/s, GFLOP/s, speed-up over the loop); ``--json`` writes the rows
for scripts and ``--results`` appends a dated section with the machine to the results log.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hybridlm.ops import gated_delta_rule_chunked, gated_delta_rule_naive

# transformers' pure-PyTorch gated delta rule at the same shape on this CI class of machine
# (2 cores, torch 2.13), from shared/reference/measured-anchors.md; cited, not rerun here.
ANCHORS_MS_T4096 = {"transformers torch_chunk_gated_delta_rule": 135.7,
                    "transformers torch_recurrent_gated_delta_rule": 192.9}


def make_inputs(B: int, T: int, H: int, D: int, seed: int = 0):
    """q, k [B, T, H, D] (unit keys, as models feed them), v [B, T, H, D], g, beta [B, T, H]; float32."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=gen)
    k = F.normalize(torch.randn(B, T, H, D, generator=gen), dim=-1)
    v = torch.randn(B, T, H, D, generator=gen)
    g = -0.1 * torch.rand(B, T, H, generator=gen)
    beta = torch.rand(B, T, H, generator=gen)
    return q, k, v, g, beta


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: allocator and first-call overheads
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def flops(B: int, T: int, H: int, D: int, C: int) -> float:
    """Forward FLOPs of the chunked form: 6 T K V + 3 T C K + T C^2 per head (Kimi Linear's count)."""
    return B * H * (6 * T * D * D + 3 * T * C * D + T * C * C)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(B: int, T: int, H: int, D: int, chunk_sizes: list[int], repeats: int) -> list[dict]:
    q, k, v, g, beta = make_inputs(B, T, H, D)
    forms = {"naive token loop": (lambda: gated_delta_rule_naive(q, k, v, g, beta, output_final_state=True), 1)}
    for C in chunk_sizes:
        forms[f"chunked (C = {C})"] = (lambda C=C: gated_delta_rule_chunked(q, k, v, g, beta, output_final_state=True,
                                                                           chunk_size=C), C)
    with torch.inference_mode():
        ms = {name: median_ms(fn, repeats) for name, (fn, _) in forms.items()}
    base = ms["naive token loop"]
    # the loop's useful work is the chunked count at C = 1
    return [{"form": name, "chunk_size": C, "ms": ms[name], "tokens_per_s": B * T / ms[name] * 1e3,
             "gflop_per_s": flops(B, T, H, D, C) / ms[name] / 1e6, "speedup_vs_naive": base / ms[name]}
            for name, (_, C) in forms.items()]


def table(rows: list[dict], T: int) -> str:
    lines = ["| form | median ms | tokens/s | GFLOP/s | speed-up vs loop |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['form']} | {r['ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['gflop_per_s']:.2f} "
                     f"| {r['speedup_vs_naive']:.1f}x |")
    if T == 4096:
        for name, ms in ANCHORS_MS_T4096.items():
            lines.append(f"| {name} (cited) | {ms:.1f} | {T / ms * 1e3:,.0f} | | |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=4096, help="tokens (default: %(default)s)")
    p.add_argument("--B", type=int, default=1, help="batch (default: %(default)s)")
    p.add_argument("--H", type=int, default=4, help="heads (default: %(default)s)")
    p.add_argument("--D", type=int, default=64, help="head dim K = V (default: %(default)s)")
    p.add_argument("--chunk-sizes", default="16,32,64", help="chunk lengths to time (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per form, median kept (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice; 1 is steadier on a busy machine)")
    p.add_argument("--json", metavar="PATH", help="write the rows and the machine as JSON")
    p.add_argument("--results", metavar="PATH", help="append a dated markdown section to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    chunk_sizes = [int(c) for c in args.chunk_sizes.split(",") if c.strip()]
    rows = run(args.B, args.T, args.H, args.D, chunk_sizes, args.repeats)
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "torch": torch.__version__, "python": platform.python_version(),
               "load_average_1min": os.getloadavg()[0]}
    shape = f"B {args.B}, T {args.T}, H {args.H}, K = V {args.D}, float32, median of {args.repeats}"
    text = table(rows, args.T)
    print(f"gated delta rule forward on CPU: {shape}\n{text}")
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": vars(args), "machine": machine, "rows": rows}, indent=2))
    if args.results:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        section = (f"\n## CPU: gated delta rule, token loop vs chunked ({stamp})\n\n"
                   f"{machine['cpu']}, {machine['cores']} cores ({machine['torch_threads']} torch threads), "
                   f"torch {machine['torch']}, Python {machine['python']}, "
                   f"load average {machine['load_average_1min']:.1f} "
                   f"when run. {shape}. "
                   f"`python benchmarks/ops_cpu.py`. Cited rows: shared/reference/measured-anchors.md "
                   f"(same class of machine, not rerun).\n\n{text}\n")
        with open(args.results, "a") as f:
            f.write(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
