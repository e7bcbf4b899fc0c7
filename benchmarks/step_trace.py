"""Where a prefill chunk and a decode step spend GPU time: a torch.profiler kernel table.

Builds the preset (random weights, bf16, layer/expert cuts as ``hybridlm profile``), prefills
``--context`` tokens in chunks and decodes through ``StaticDecoder`` without a CUDA graph (the graph
replays the same kernels; the profiler sees them one by one only outside it), with ``--compile`` as
the profiler's flag. Prints the kernels that take the most device time per step, and the graph-replay
wall time per step beside the summed kernel time (their gap is the idle time between kernels).
On CUDA the prefill is also timed unprofiled (median of three), and the host's share is listed: the
ops that take the most CPU self time while the prefill is launched (a prefill whose wall time
exceeds its kernel time is host-bound; these are where the host spends it, profiler overhead
included).

    python benchmarks/step_trace.py --preset qwen3-next-80b-a3b --layers 4 --experts 32 \\
        --context 4096 --batch 1 [--compile] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from hybridlm.generation import StaticDecoder
from hybridlm.profile import ProfileSettings, build_model, prefill_chunked, scaled_config


def kernel_table(prof, per: int, cuda: bool) -> list[dict]:
    """Device time per kernel name (cuda False: CPU self time per op, the host's share), microseconds
    per ``per`` steps, largest first."""
    total = defaultdict(float)
    count = defaultdict(int)
    for e in prof.events():
        if cuda and e.device_type == torch.autograd.DeviceType.CUDA:
            total[e.name] += e.device_time
            count[e.name] += 1
        elif not cuda and e.device_type == torch.autograd.DeviceType.CPU:
            total[e.name] += e.self_cpu_time_total
            count[e.name] += 1
    rows = [dict(kernel=name, us=t / per, calls=count[name] / per) for name, t in total.items()]
    return sorted(rows, key=lambda r: -r["us"])


def show(title: str, rows: list[dict], top: int) -> None:
    all_us = sum(r["us"] for r in rows)
    print(f"\n{title}: {all_us:,.1f} us of kernels, {sum(r['calls'] for r in rows):.0f} launches")
    for r in rows[:top]:
        print(f"  {r['us']:9.1f} us {r['us'] / all_us:6.1%} {r['calls']:6.1f}x  {r['kernel'][:110]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="qwen3-next-80b-a3b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--chunk", type=int, help="prompt tokens per prefill call (default: the profiler's, "
                   "ProfileSettings.chunk_for)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run (op self times, no graph)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    settings = ProfileSettings(device=args.device, dtype=torch.bfloat16 if cuda else torch.float32,
                               prefill_chunk=args.chunk)
    args.chunk = settings.chunk_for(args.batch)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
    cfg = scaled_config(args.preset, args.layers, args.experts)
    model = build_model(cfg, settings)
    B, T = args.batch, args.context
    cache = model.new_cache(B, T + 4 * args.steps + 8)
    ids = torch.randint(0, cfg.vocab_size, (B, T), device=args.device)
    out = {"preset": args.preset, "layers": cfg.num_layers, "experts": cfg.num_experts, "batch": B,
           "context": T, "compile": args.compile,
           "device": torch.cuda.get_device_name() if cuda else "cpu"}
    with torch.no_grad():
        # both decoders are built on the empty cache (a StaticDecoder's warm-up needs one)
        graphed = StaticDecoder(model, cache, graph=True, compile=args.compile) if cuda else None
        eager = StaticDecoder(model, cache, graph=False, compile=args.compile)
        prefill_chunked(model, ids, cache, args.chunk)  # warm-up (autotuning, first launches)
        walls = []
        for _ in range(3 if cuda else 1):
            cache.reset()
            sync()
            t0 = time.perf_counter()
            prefill_chunked(model, ids, cache, args.chunk)
            sync()
            walls.append(time.perf_counter() - t0)
        out["prefill_wall_s"] = sorted(walls)[len(walls) // 2]
        cache.reset()
        sync()
        with profile(activities=[ProfilerActivity.CPU, activity] if cuda else [activity]) as prof:
            t0 = time.perf_counter()
            first = prefill_chunked(model, ids, cache, args.chunk).argmax(-1)
            sync()
            out["prefill_s"] = time.perf_counter() - t0
        out["prefill"] = kernel_table(prof, 1, cuda)
        show(f"prefill of {T} tokens x {B} ({out['prefill_s']:.3f} s wall profiled, {out['prefill_wall_s']:.3f} s "
             f"unprofiled)", out["prefill"], args.top)
        if cuda:
            out["prefill_host"] = kernel_table(prof, 1, cuda=False)
            show("prefill, host (CPU self time per op, profiled)", out["prefill_host"], args.top)

        decoder = graphed or eager
        decoder.run(first, args.steps)  # warm
        sync()
        t0 = time.perf_counter()
        decoder.run(first, args.steps)
        sync()
        out["graph_step_us"] = (time.perf_counter() - t0) / args.steps * 1e6
        eager.run(first, 2)
        sync()
        with profile(activities=[activity]) as prof:
            eager.run(first, args.steps)
            sync()
        out["decode"] = kernel_table(prof, args.steps, cuda)
        kernels_us = sum(r["us"] for r in out["decode"])
        show(f"decode step ({'compiled, ' if args.compile else ''}graph replay {out['graph_step_us']:.1f} us "
             f"per step; summed kernels below)", out["decode"], args.top)
        print(f"graph replay {out['graph_step_us']:.1f} us per step vs {kernels_us:.1f} us of kernels: "
              f"{out['graph_step_us'] - kernels_us:.1f} us between kernels")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
