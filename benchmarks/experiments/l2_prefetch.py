"""Can the batch-1 decode step's latency-bound stretches pull the next weights into L2? One GPU call,
about a minute.

Why: in the compiled batch-1 step every weight-streaming kernel reads at 55-82% of the copy rate and
between them run ~10 small latency-bound kernels a layer (conv, the recurrent step, norms, routing)
plus the gaps between launches, ~25-30 us a layer in which DRAM sits idle (RESULTS.md, fourth 12-03
session). Launch sweeps are flat and programmatic dependent launch recovered 1% (pdl_chain.py). If
a weight's first megabytes were already in L2 when its product starts, the product would skip its
DRAM ramp-up and stream the rest.

The chain: L layers, each ``--idle`` small dependent kernels (a 4 KB in-place multiply each, a
stand-in for the step's small kernels), then the in-projection's product ([12352, 2048] bf16, 50.6 MB,
cuBLAS as in the step), its output feeding the next layer. Captured as one CUDA graph and replayed;
us per layer. Variants, each prefetching the first P MB of the layer's weight when the layer starts:
- ``none``;
- ``line P``: in-stream, one ``prefetch.global.L2`` per 128-byte line (fire and forget: the kernel
  does not wait for the data);
- ``bulk P``: in-stream, one ``cp.async.bulk.prefetch.L2`` per 4 KB (Hopper's bulk prefetch, also
  fire and forget);
- ``loads P``: on a side stream forked at the layer's start and joined before its product, a kernel
  that loads the bytes with ``.cg`` (cached in L2 only) and discards them.
Every variant's final output is compared with ``none``'s (prefetching changes no value).

    PYTHONPATH=src python benchmarks/experiments/l2_prefetch.py [--layers 24] [--idle 0,6,12] [--json F]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from hybridlm.bench import report, timing

LINE = 128  # bytes a `prefetch.global.L2` brings in
BULK = 4096  # bytes a `cp.async.bulk.prefetch.L2` names (a multiple of 16)


@triton.jit
def _line_prefetch_kernel(w_bytes, n_lines, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    i = tl.minimum(i, n_lines - 1)  # the asm cannot be masked: the tail prefetches the last line again
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [w_bytes + i.to(tl.int64) * 128],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _bulk_prefetch_kernel(w_bytes, n_chunks, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    i = tl.minimum(i, n_chunks - 1)
    tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], 4096;\n\tmov.u32 $0, 0;", "=r,l",
                              [w_bytes + i.to(tl.int64) * 4096], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _load_kernel(w, n, sink, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(w + o, mask=o < n, other=0, cache_modifier=".cg")
    s = tl.sum(x.to(tl.float32))
    if s == 1.2345e30:  # never true for these weights; keeps the loads
        tl.store(sink + tl.program_id(0), s)


def prefetch(kind: str, w: torch.Tensor, nbytes: int, sink: torch.Tensor) -> None:
    raw = w.view(-1).view(torch.uint8)
    nbytes = min(nbytes, raw.numel())
    if kind == "line":
        n = triton.cdiv(nbytes, LINE)
        _line_prefetch_kernel[(triton.cdiv(n, 256),)](raw, n, BLOCK=256, num_warps=8)
    elif kind == "bulk":
        n = triton.cdiv(nbytes, BULK)
        _bulk_prefetch_kernel[(triton.cdiv(n, 128),)](raw, n, BLOCK=128, num_warps=4)
    else:
        n = nbytes // w.element_size()
        _load_kernel[(triton.cdiv(n, 4096),)](w.view(-1), n, sink, BLOCK=4096, num_warps=8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--idle", default="0,6,12")
    ap.add_argument("--mb", default="8,16,32,50")
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    rate = timing.copy_bytes_per_s(dev)
    print(f"{torch.cuda.get_device_name(dev)}: 1 GiB copy {rate / 1e9:,.0f} GB/s, L2 "
          f"{timing.l2_cache_bytes(dev) / 2**20:.0f} MiB")
    torch.manual_seed(0)
    O, D = 12352, 2048
    ws = [torch.randn(O, D, device=dev, dtype=torch.bfloat16) * D ** -0.5 for _ in range(args.layers)]
    x0 = torch.randn(1, D, device=dev, dtype=torch.bfloat16)
    pad = torch.zeros(4096, device=dev)  # the small kernels' operand
    sink = torch.zeros(1 << 16, device=dev)
    side = torch.cuda.Stream()
    rows = []
    for idle in (int(i) for i in args.idle.split(",")):
        variants = [("none", 0)] + [(k, mb) for k in ("line", "bulk", "loads") for mb in
                                    (int(m) for m in args.mb.split(","))]
        want = None
        for kind, mb in variants:
            state = {}

            def layer(i, kind=kind, mb=mb, state=state, idle=idle):
                x = x0 if i == 0 else state["x"]
                main = torch.cuda.current_stream()
                if kind == "loads":
                    side.wait_stream(main)
                    with torch.cuda.stream(side):
                        prefetch(kind, ws[i], mb << 20, sink)
                elif kind != "none":
                    prefetch(kind, ws[i], mb << 20, sink)
                for _ in range(idle):
                    pad.mul_(0.999)
                if kind == "loads":
                    main.wait_stream(side)
                state["x"] = F.linear(x, ws[i])[:, :D]

            calls = [lambda i=i: layer(i) for i in range(args.layers)]
            label = kind if kind == "none" else f"{kind} {mb} MB"
            try:
                for fn in calls:
                    fn()
                torch.cuda.synchronize()
                out = state["x"].float().clone()
                us = timing.graphed_ms_per_call(calls, warmup_ms=10, rep_ms=100) * 1e3
            except Exception as exc:  # an asm or capture the stack refuses: report it, go on
                print(f"idle {idle:2d} {label:14s}: failed ({type(exc).__name__}: {exc})", flush=True)
                rows.append(dict(idle=idle, case=label, error=f"{type(exc).__name__}: {exc}"))
                continue
            want = out if want is None else want
            same = bool(torch.equal(out, want))
            share = O * D * 2 / (us * 1e-6) / rate
            rows.append(dict(idle=idle, case=label, kind=kind, prefetch_mb=mb, us_per_layer=us,
                             weight_copy_share=share, equal_to_none=same, layers=args.layers))
            print(f"idle {idle:2d} {label:14s}: {us:7.2f} us a layer  (weight at {share:6.1%} of the copy rate)"
                  f"{'' if same else '  OUTPUT DIFFERS'}", flush=True)
    report.write_rows_json(args.json, rows, copy_bytes_per_s=rate)


if __name__ == "__main__":
    main()
