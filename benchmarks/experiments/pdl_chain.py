"""Programmatic dependent launch (PDL) on a chain of batch-1 matrix-vector products: how much of each
kernel's fill-and-drain cost does overlapping it with its predecessor's tail recover? One GPU call,
under a minute. Written after the third 12-03 session's device time ran out; not yet run.

Why: in the compiled batch-1 decode step every kernel reads its weights at 55-76% of the copy rate
whatever its launch parameters (RESULTS.md, third 12-03 session: launch sweeps flat), plus ~0.6 us
between kernels in the graph. A kernel's weights do not depend on the previous kernel, only its
input vector does. With PDL (Hopper; Triton's ``launch_pdl=True`` with ``gdc_launch_dependents`` /
``gdc_wait``) a kernel can start and load its weights while its predecessor finishes, and wait only
before it reads the input.

The chain alternates the output projection's two shapes, [4096, 2048] and [2048, 4096] (16.8 MB each,
bf16), for 48 kernels whose weights total ~800 MB (DRAM, not L2), each kernel's output the next one's
input. It is captured as one CUDA graph and replayed; us per kernel, share of the copy rate:
- ``cublas``: F.linear;
- ``gemv``: ``ops/triton/gemv.py``'s kernel at its default launch;
- ``rows``: this file's kernel (each program loads its whole rows into registers, then the input),
  launched plainly;
- ``rows + PDL``: the same kernel launched with PDL: it issues its weight loads, lets the next kernel
  launch, then waits for its predecessor before loading the input.
Each chain's output is checked against a float32 chain of F.linear first.

    PYTHONPATH=src python benchmarks/experiments/pdl_chain.py [--kernels 48] [--json F]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from hybridlm.bench import report, timing
from hybridlm.ops.triton.gemv import gemv_into


@triton.jit
def _rows_kernel(x_D, w_OD, y_O, O, D, s_wo, BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr, USE_GDC: tl.constexpr):
    o_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    o_d = tl.arange(0, BLOCK_D)
    m_o = o_o < O
    m_d = o_d < D
    # the weights first: they do not depend on the previous kernel
    b_w = tl.load(w_OD + o_o.to(tl.int64)[:, None] * s_wo + o_d[None, :], mask=m_o[:, None] & m_d[None, :], other=0.0)
    if USE_GDC:
        tl.extra.cuda.gdc_launch_dependents()  # the next kernel may start loading its weights
        tl.extra.cuda.gdc_wait()  # the previous kernel has finished and its output is visible
    b_x = tl.load(x_D + o_d, mask=m_d, other=0.0).to(tl.float32)
    y = tl.sum(b_w.to(tl.float32) * b_x[None, :], axis=1)
    tl.store(y_O + o_o, y.to(y_O.dtype.element_ty), mask=m_o)


@triton.jit
def _persistent_kernel(x_D, w_OD, y_O, O, D, s_wo, n_rounds, BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr,
                       AHEAD: tl.constexpr, USE_GDC: tl.constexpr):
    # A fixed grid of a few programs per multiprocessor (one wave where they fit at once), so with PDL
    # the next kernel can launch as soon as all of them have started: program p owns row tiles p, p + P, ...
    # and takes them AHEAD at a time, loading round r + 1 while it sums round r (registers, no shared
    # memory, so the next kernel's programs fit beside it). Round 0 is loaded before the wait.
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    if USE_GDC:
        tl.extra.cuda.gdc_launch_dependents()
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    o_j = tl.arange(0, AHEAD)
    o_b = tl.arange(0, BLOCK_O)
    rows = (pid + o_j * P)[:, None] * BLOCK_O + o_b[None, :]  # round 0's rows [AHEAD, BLOCK_O]
    m = rows < O
    cur = tl.load(w_OD + rows.to(tl.int64)[:, :, None] * s_wo + o_d[None, None, :],
                  mask=m[:, :, None] & m_d[None, None, :], other=0.0)
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
    b_x = tl.load(x_D + o_d, mask=m_d, other=0.0).to(tl.float32)
    for r in range(1, n_rounds):
        nrows = rows + AHEAD * P * BLOCK_O
        nm = nrows < O
        nxt = tl.load(w_OD + nrows.to(tl.int64)[:, :, None] * s_wo + o_d[None, None, :],
                      mask=nm[:, :, None] & m_d[None, None, :], other=0.0)
        y = tl.sum(cur.to(tl.float32) * b_x[None, None, :], axis=2)
        tl.store(y_O + rows, y.to(y_O.dtype.element_ty), mask=m)
        cur, rows, m = nxt, nrows, nm
    y = tl.sum(cur.to(tl.float32) * b_x[None, None, :], axis=2)
    tl.store(y_O + rows, y.to(y_O.dtype.element_ty), mask=m)


def persistent_into(x, w, y, pdl: bool, per_sm: int, block_o: int, ahead: int, warps: int):
    O, D = w.shape
    n_tiles = triton.cdiv(O, block_o)
    grid = min(n_tiles, per_sm * torch.cuda.get_device_properties(w.device).multi_processor_count)
    n_rounds = triton.cdiv(n_tiles, grid * ahead)
    _persistent_kernel[(grid,)](x, w, y, O, D, w.stride(0), n_rounds, BLOCK_O=block_o,
                                BLOCK_D=triton.next_power_of_2(D), AHEAD=ahead, USE_GDC=pdl,
                                launch_pdl=pdl, num_warps=warps)


def rows_into(x, w, y, pdl: bool, block_o: int):
    O, D = w.shape
    bd = triton.next_power_of_2(D)
    _rows_kernel[(triton.cdiv(O, block_o),)](x, w, y, O, D, w.stride(0), BLOCK_O=block_o, BLOCK_D=bd, USE_GDC=pdl,
                                             launch_pdl=pdl, num_warps=max(4, block_o * bd // 2048))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernels", type=int, default=48)
    ap.add_argument("--json")
    ap.add_argument("--both", type=lambda v: [tuple(map(int, c.split("/"))) for c in v.split(",")],
                    default=[(1, 1, 2, 4), (2, 1, 2, 4), (2, 2, 1, 4), (4, 1, 1, 4)],
                    help="persistent launches also timed without PDL: per_sm/block_o/ahead/warps,...")
    args = ap.parse_args()
    dev = torch.device("cuda")
    rate = timing.copy_bytes_per_s(dev)
    print(f"{torch.cuda.get_device_name(dev)}: 1 GiB copy {rate / 1e9:,.0f} GB/s")
    torch.manual_seed(0)
    shapes = [(4096, 2048), (2048, 4096)]
    ws = [torch.randn(*shapes[i % 2], device=dev, dtype=torch.bfloat16) * shapes[i % 2][1] ** -0.5
          for i in range(args.kernels)]
    bufs = [torch.randn(2048, device=dev, dtype=torch.bfloat16)] + [
        torch.empty(w.shape[0], device=dev, dtype=torch.bfloat16) for w in ws]
    ref = bufs[0].float()
    for w in ws:
        ref = F.linear(ref, w.float())
    nbytes = sum(w.numel() * 2 for w in ws)

    def chain(step):
        return [lambda i=i: step(bufs[i], ws[i], bufs[i + 1]) for i in range(len(ws))]

    cases = {
        "cublas": chain(lambda x, w, y: y.copy_(F.linear(x, w))),
        "gemv": chain(lambda x, w, y: gemv_into(x[None], w, y[None])),
    }
    for block_o in (2, 4):
        cases[f"rows {block_o}"] = chain(lambda x, w, y, b=block_o: rows_into(x, w, y, False, b))
        cases[f"rows {block_o} + PDL"] = chain(lambda x, w, y, b=block_o: rows_into(x, w, y, True, b))
    # persistent launches: (programs per SM, rows a tile, tiles a round, warps); a register budget of
    # 64 weight elements a thread a round at the wider shape (sm_90 compile: 2 x 128 took 248 registers)
    for per_sm in (1, 2, 4):
        for block_o in (1, 2, 4):
            for ahead in (1, 2, 4):
                for warps in (4, 8):
                    if ahead * block_o * 4096 // (32 * warps) > 64 or (ahead * block_o == 1 and warps == 8):
                        continue
                    for pdl in ((False, True) if (per_sm, block_o, ahead, warps) in args.both else (True,)):
                        cases[f"persist {per_sm}/{block_o}/{ahead}/{warps}" + (" + PDL" if pdl else "")] = chain(
                            lambda x, w, y, c=(pdl, per_sm, block_o, ahead, warps): persistent_into(x, w, y, *c))
    rows = []
    for name, calls in cases.items():
        try:
            for fn in calls:
                fn()
            torch.cuda.synchronize()
            err = ((bufs[-1].float() - ref).norm() / ref.norm()).item()
            us = timing.graphed_ms_per_call(calls, warmup_ms=10, rep_ms=100) * 1e3
        except Exception as exc:  # a PDL launch that the stack or the capture refuses: report it, go on
            print(f"{name:26s}: failed ({type(exc).__name__}: {exc})", flush=True)
            rows.append(dict(case=name, error=f"{type(exc).__name__}: {exc}"))
            continue
        share = nbytes / len(calls) / (us * 1e-6) / rate
        rows.append(dict(case=name, us_per_kernel=us, copy_share=share, rel_err=err, kernels=len(calls)))
        print(f"{name:26s}: {us:6.2f} us a kernel  {share:6.1%}  err {err:.1e}", flush=True)
    report.write_rows_json(args.json, rows, copy_bytes_per_s=rate)


if __name__ == "__main__":
    main()
