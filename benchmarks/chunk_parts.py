"""Time each kernel of the chunked gated delta rule's forward and backward on one GPU, and sweep the
launch configuration of the chunk-local gradient kernel (the backward's largest part).

Parts, in the order the backward op runs them: q/k l2-norm, prep (gc, T, M), forward state pass
(storing the state entering each chunk), reverse state pass, chunk-local gradients, the q/k
gradients' group sum and l2-norm backward; the forward op's two kernels with the l2-norm fused
(prep and state pass on the raw q, k) are timed beside them.
Each chunk-local configuration is checked against the default one (every gradient) before it is
timed; the JSON is rewritten after every measurement, so a configuration that faults leaves the
others on disk.

    python benchmarks/chunk_parts.py --json out.json [--shapes qwen,h16] [--B 4 --T 16384]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from hybridlm.bench import timing
from hybridlm.ops.triton.chunk import _tables
from hybridlm.ops.triton.chunk_bwd import chunk_bwd_state
from hybridlm.ops.triton.chunk_bwd_local import chunk_bwd_local
from hybridlm.ops.triton.chunk_fwd import chunk_fwd
from hybridlm.ops.triton.chunk_prep import chunk_prep, l2norm_rows, qk_grad

SHAPES = {"qwen": (16, 32, 128), "h16": (16, 16, 128)}  # H, HV, d
# (block_v, num_warps, num_stages); the first is the default. Measured on an H200 (Triton 3.6), Qwen3-Next
# heads, B 4, T 16k, two kernels: (16, 4, 3) 6.70 ms, (16, 4, 2) 7.71 (the former one kernel: 9.22 at 3
# stages, 9.25 at 2, 12.5 at 1). The one kernel faulted with an illegal memory access on Hopper with
# Triton 3.6 at (16, 8, *), (32, 4, 1) and (32, 8, 1): not timed here.
LOCAL_CONFIGS = [(16, 4, 3), (16, 4, 2)]


def parts(B, T, H, HV, d, device, out: dict, dump) -> None:
    torch.manual_seed(0)
    NTOK = B * T
    q = torch.randn(NTOK, H, d, device=device, dtype=torch.bfloat16)
    k = torch.randn_like(q)
    v = torch.randn(NTOK, HV, d, device=device, dtype=torch.bfloat16)
    g = torch.nn.functional.logsigmoid(torch.randn(NTOK, HV, device=device) + 3.0)
    beta = torch.rand(NTOK, HV, device=device)
    do = torch.randn_like(v)
    q4 = q.view(B, T, H, d)
    cu, chunk_offsets, chunk_bounds = _tables(q4, None)
    NC = chunk_bounds.shape[0]
    scale = d ** -0.5
    key = f"{'qwen' if HV == 2 * H else 'h16'} B{B} T{T}"
    rec = out.setdefault(key, {})

    def t(name, fn):
        rec[name] = timing.median_ms(fn)
        print(f"  {key:18s} {name:34s} {rec[name]:8.3f} ms", flush=True)
        dump()

    t("l2norm q,k", lambda: (l2norm_rows(q), l2norm_rows(k)))
    qn, kn = l2norm_rows(q), l2norm_rows(k)
    t("prep", lambda: chunk_prep(qn, kn, g, beta, chunk_bounds, HV))
    t("prep, l2-norm fused (forward)", lambda: chunk_prep(q, k, g, beta, chunk_bounds, HV, l2norm=True))
    _, _, _, vec_n = chunk_prep(q, k, g, beta, chunk_bounds, HV, l2norm=True)
    gc, tt, m, vec = chunk_prep(qn, kn, g, beta, chunk_bounds, HV)
    t("fwd state pass", lambda: chunk_fwd(qn, kn, v, vec, tt, m, None, cu, chunk_offsets, scale))
    t("fwd state pass, l2-norm fused (forward)", lambda: chunk_fwd(q, k, v, vec_n, tt, m, None, cu, chunk_offsets,
                                                                   scale, l2norm=True))
    t("fwd state pass storing states", lambda: chunk_fwd(qn, kn, v, vec, tt, m, None, cu, chunk_offsets,
                                                         scale, store_chunks=NC))
    _, _, h = chunk_fwd(qn, kn, v, vec, tt, m, None, cu, chunk_offsets, scale, store_chunks=NC)
    t("bwd state pass", lambda: chunk_bwd_state(qn, kn, do, gc, beta, tt, m, None, cu, chunk_offsets, scale, NC))
    dh, _, dvn = chunk_bwd_state(qn, kn, do, gc, beta, tt, m, None, cu, chunk_offsets, scale, NC)
    dq, dk = torch.randn(NTOK, HV, d, device=device), torch.randn(NTOK, HV, d, device=device)
    t("group sum + l2norm bwd (q, k)", lambda: (qk_grad(q, dq, True), qk_grad(k, dk, True)))
    ref = None
    for bv, warps, stages in LOCAL_CONFIGS:
        name = f"bwd local BV{bv} w{warps} s{stages}"
        got = chunk_bwd_local(qn, kn, v, gc, beta, tt, m, do, h, dh, dvn, chunk_bounds, scale,
                              block_v=bv, num_warps=warps, num_stages=stages)
        torch.cuda.synchronize()
        if ref is None:
            ref = got
        errs = [((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item() for a, b in zip(got, ref)]
        rec[name + " max rel diff vs default"] = max(errs)
        if not max(errs) < 1e-2:
            print(f"  {key:18s} {name}: WRONG, rel diff {max(errs):.2e} vs the default", flush=True)
            dump()
            continue
        t(name, lambda bv=bv, warps=warps, stages=stages: chunk_bwd_local(
            qn, kn, v, gc, beta, tt, m, do, h, dh, dvn, chunk_bounds, scale, block_v=bv, num_warps=warps,
            num_stages=stages))
    qs = torch.randn(B, HV, T, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    ks, vs = torch.randn_like(qs, requires_grad=True), torch.randn_like(qs, requires_grad=True)
    dos = torch.randn_like(qs)

    def sdpa():
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
        o.backward(dos)
    t("sdpa causal fwd+bwd", sdpa)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="qwen,h16")
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--T", type=int, default=16384)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("chunk_parts needs a CUDA device", file=sys.stderr)
        return 2
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}

    def dump():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)

    for name in args.shapes.split(","):
        H, HV, d = SHAPES[name]
        parts(args.B, args.T, H, HV, d, torch.device("cuda"), out, dump)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
