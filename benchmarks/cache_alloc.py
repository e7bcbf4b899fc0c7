"""Does the analytic memory model agree with what a cache really allocates?

For every tiny preset and the published presets at their real dimensions, compares three numbers:
memory.py's analytic total, HybridCache.nbytes(), and the bytes actually allocated (CPU: the
storages behind the cache's tensors; CUDA: the change in torch.cuda.memory_allocated, which the
caching allocator rounds up to 512-byte blocks per tensor). Prints a table; with --results PATH
appends it, dated, with the device and versions.

    python benchmarks/cache_alloc.py --device cuda --results benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform

import torch

from hybridlm.cache import HybridCache
from hybridlm.config import HybridConfig
from hybridlm.memory import cache_bytes, measure_cache_allocation
from hybridlm.presets import PRESETS, TINY_PRESETS

PUBLISHED = [("qwen3-next-80b-a3b", 1, 32768), ("kimi-linear-48b-a3b", 1, 32768), ("minimax-m1", 1, 32768),
             ("deepseek-v3.2", 1, 8192), ("llama-3.1-8b", 1, 32768), ("qwen3-32b", 1, 8192)]


def rows(device: str):
    cases = [(n, b, L) for n in TINY_PRESETS for b, L in ((1, 1), (2, 1000))] + PUBLISHED
    for name, batch, max_len in cases:
        if name not in PRESETS:
            continue
        cfg = HybridConfig.preset(name)
        if cfg.index_key_bytes:  # DeepSeek stores fp8 index keys; our cache keeps them in the cache dtype
            cfg, name = dataclasses.replace(cfg, index_key_bytes=0.0), f"{name} (index keys bf16)"
        try:
            reported, allocated = measure_cache_allocation(cfg, batch, max_len, device, torch.bfloat16)
        except NotImplementedError as e:  # a layer letter without a layer yet
            yield dict(preset=name, batch=batch, context=max_len, error=str(e).split(";")[0])
            continue
        analytic = cache_bytes(cfg, batch, max_len, kv_dtype="bfloat16").total_bytes
        with torch.device("meta"):
            n_tensors = sum(len(t) for t in HybridCache(cfg, batch, max_len, device="meta",
                                                        dtype=torch.bfloat16).named_tensors().values())
        yield dict(preset=name, batch=batch, context=max_len, analytic=analytic, nbytes=reported,
                   allocated=allocated, tensors=n_tensors, extra=allocated - reported)
        torch.cuda.empty_cache() if device == "cuda" else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--results", help="append the table to this markdown file")
    args = ap.parse_args()
    lines = ["| preset | batch | context | memory.py | nbytes() | allocated | tensors | allocated - nbytes |",
             "|---|---|---|---|---|---|---|---|"]
    ok = True
    for r in rows(args.device):
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['batch']} | {r['context']:,} | {r['error']} | | | | |")
            continue
        ok &= r["analytic"] == r["nbytes"] and 0 <= r["extra"] < 512 * r["tensors"]
        lines.append(f"| {r['preset']} | {r['batch']} | {r['context']:,} | {r['analytic']:,} | {r['nbytes']:,} | "
                     f"{r['allocated']:,} | {r['tensors']} | {r['extra']:,} |")
    card = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "CPU"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"## Cache bytes: memory.py vs HybridCache.nbytes() vs allocated ({stamp})\n\n"
              f"{card}, torch {torch.__version__}, cache dtype bfloat16 (state float32). "
              f"`python benchmarks/cache_alloc.py --device {args.device}`. "
              f"Agreement (memory.py == nbytes, allocation within 512 B per tensor): {'yes' if ok else 'NO'}.\n")
    text = header + "\n" + "\n".join(lines) + "\n"
    print(text)
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + text)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
