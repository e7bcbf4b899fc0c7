"""Does the prep of segment s + 1 on a second CUDA stream, beside the state pass of segment s,
shorten the chunked forward? Qwen3-Next heads (Hqk 16, Hv 32, d 128, bf16), B 1, normalised q/k.
The sequence is cut into n segments; each state pass starts from the last one's final state, so
the output equals the unsegmented forward (the relative difference is printed).

    python benchmarks/experiments/prep_state_overlap.py --segments 1,4,8,16 --json out.json

Measured on an H200 (RESULTS.md, fourth 2026-12-02 session): 6% at best, not adopted.
"""

from __future__ import annotations

import argparse
import json

import torch

from hybridlm.bench import timing
from hybridlm.ops.triton import chunk_fwd as CF
from hybridlm.ops.triton import chunk_prep as CP
from hybridlm.ops.triton.utils import sequence_tables

H, HV, D = 16, 32, 128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, default=32768)
    ap.add_argument("--segments", default="1,4,8,16")
    ap.add_argument("--json")
    args = ap.parse_args()
    dev, T = torch.device("cuda"), args.T
    torch.manual_seed(0)
    # the inputs of the recorded run: g uniform in (-0.1, 0], beta bfloat16
    q = CP.l2norm_rows(torch.randn(T, H, D, device=dev, dtype=torch.bfloat16))
    k = CP.l2norm_rows(torch.randn(T, H, D, device=dev, dtype=torch.bfloat16))
    v = torch.randn(T, HV, D, device=dev, dtype=torch.bfloat16)
    g = -torch.rand(T, HV, device=dev) * 0.1
    beta = torch.rand(T, HV, device=dev, dtype=torch.bfloat16)
    sc = D ** -0.5
    cu, co, cb = sequence_tables(1, T, None, dev)
    _, t, m, vec = CP.chunk_prep(q, k, g, beta, cb, HV)
    want, _, _ = CF.chunk_fwd(q, k, v, vec, t, m, None, cu, co, sc)
    rows = []
    for n in (int(s) for s in args.segments.split(",")):
        if T % (64 * n):
            raise SystemExit(f"--segments: {n} does not cut T = {T} into whole 64-token chunks")
        L = T // n
        tables = sequence_tables(1, L, None, dev)
        side_prep, side_state = torch.cuda.Stream(), torch.cuda.Stream()

        def run():
            main_stream = torch.cuda.current_stream()
            side_prep.wait_stream(main_stream)
            side_state.wait_stream(main_stream)
            preps, ready = [], []
            for s in range(n):
                sl = slice(s * L, (s + 1) * L)
                with torch.cuda.stream(side_prep):
                    preps.append(CP.chunk_prep(q[sl], k[sl], g[sl], beta[sl], tables[2], HV))
                    ev = torch.cuda.Event()
                    ev.record(side_prep)
                    ready.append(ev)
            outs, h = [], None
            for s in range(n):
                sl = slice(s * L, (s + 1) * L)
                with torch.cuda.stream(side_state):
                    side_state.wait_event(ready[s])
                    _, t_s, m_s, vec_s = preps[s]
                    o, h, _ = CF.chunk_fwd(q[sl], k[sl], v[sl], vec_s, t_s, m_s, h, tables[0], tables[1], sc)
                    outs.append(o)
            main_stream.wait_stream(side_prep)
            main_stream.wait_stream(side_state)
            return outs

        got = torch.cat(run())
        diff = ((got.float() - want.float()).norm() / want.float().norm()).item()
        ms = timing.median_ms(run)
        rows.append(dict(segments=n, ms=ms, rel_diff=diff))
        print(f"segments {n:3d}: {ms:7.3f} ms (prep + state pass; rel diff {diff:.1e})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(card=torch.cuda.get_device_name(dev), T=T, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
