"""Chunked forward parts at Qwen3-Next heads (Hqk 16, Hv 32, d 128, bf16), B 1: the l2-norm pass,
the prep and the state pass with the norm separate and fused, the op's forward and fla 0.6.0's
(when importable), for beta in float32 (what the model layers pass) and in bfloat16. With
``--baseline FILE`` (a ``chunk_fwd.py`` of another commit whose state pass takes token-major gc and
beta, as d076bcf's does) its state pass is timed beside ours; with ``--baseline-prep FILE`` (another
commit's ``chunk_prep.py``) its prep is timed beside ours, ``--maxnreg 168,128`` times our prep
with those register caps and ``--state-configs 16:2,32:2`` the state pass at those (BV, stages);
``--half-inverse`` adds the prep and the op forward with the inverse on float16 operands.

    git show d076bcf:src/hybridlm/ops/triton/chunk_fwd.py > /tmp/chunk_fwd_base.py
    python benchmarks/experiments/forward_ab.py --baseline /tmp/chunk_fwd_base.py --json out.json
    git show 0e55bd0:src/hybridlm/ops/triton/chunk_prep.py > /tmp/chunk_prep_base.py
    python benchmarks/experiments/forward_ab.py --baseline-prep /tmp/chunk_prep_base.py --maxnreg 168,128

Timings: medians of ``triton.testing.do_bench`` (``hybridlm.bench.timing``), one process, one card.
"""

from __future__ import annotations

import argparse
import json

import torch

from hybridlm.bench import load_source, timing
from hybridlm.ops.triton import chunk_fwd as CF
from hybridlm.ops.triton import chunk_prep as CP
from hybridlm.ops.triton.chunk import chunk_gated_delta_rule
from hybridlm.ops.triton.utils import sequence_tables

H, HV, D = 16, 32, 128


def _fla():
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
        return fla_chunk
    except ImportError:
        return None


def _meta(kernel):
    """(registers, spills, shared bytes) of every compiled variant of a Triton kernel."""
    out = []
    for cache in kernel.device_caches.values():
        for compiled in cache[0].values():
            out.append(dict(regs=compiled.n_regs, spills=compiled.n_spills, shared=compiled.metadata.shared))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, default=32768)
    ap.add_argument("--baseline", help="a chunk_fwd.py (another commit's) whose state pass is timed beside ours")
    ap.add_argument("--baseline-prep", help="a chunk_prep.py (another commit's) whose prep is timed beside ours")
    ap.add_argument("--maxnreg", default="", help="register caps to time the prep at, e.g. 168,128 "
                    "('none': uncapped; the default prep is capped on Hopper)")
    ap.add_argument("--state-configs", default="",
                    help="state-pass launches to time beside the default, BV:stages, e.g. 16:2,32:2")
    ap.add_argument("--half-inverse", action="store_true",
                    help="also time the prep and the op forward with the inverse on float16 operands")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    dev = torch.device("cuda")
    base = load_source(args.baseline, "chunk_fwd_baseline") if args.baseline else None
    base_prep = load_source(args.baseline_prep, "chunk_prep_baseline") if args.baseline_prep else None
    caps = [None if c == "none" else int(c) for c in args.maxnreg.split(",") if c]
    state_configs = [tuple(int(x) for x in c.split(":")) for c in args.state_configs.split(",") if c]
    fla_chunk = _fla()
    T = args.T
    cu, co, cb = sequence_tables(1, T, None, dev)
    rows = []

    def rec(name, ms, **kw):
        rows.append(dict(name=name, ms=ms, T=T, **kw))
        print(f"{name:44s} {ms:8.3f} ms {kw if kw else ''}", flush=True)

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    for beta_dtype in (torch.float32, torch.bfloat16):
        tag = f"[beta {str(beta_dtype).split('.')[-1]}]"
        torch.manual_seed(0)
        q = torch.randn(T, H, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(T, H, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn(T, HV, D, device=dev, dtype=torch.bfloat16)
        g = torch.nn.functional.logsigmoid(torch.randn(T, HV, device=dev) + 3.0)
        beta = torch.rand(T, HV, device=dev).to(beta_dtype)
        sc = D ** -0.5
        qn, kn = CP.l2norm_rows(q), CP.l2norm_rows(k)
        rec(f"{tag} l2norm pass q, k", timing.median_ms(lambda: (CP.l2norm_rows(q), CP.l2norm_rows(k))))
        rec(f"{tag} prep", timing.median_ms(lambda: CP.chunk_prep(qn, kn, g, beta, cb, HV)))
        rec(f"{tag} prep, l2-norm fused", timing.median_ms(lambda: CP.chunk_prep(q, k, g, beta, cb, HV, l2norm=True)))
        gc, t, m, vec = CP.chunk_prep(q, k, g, beta, cb, HV, l2norm=True)
        for cap in caps:  # the default inverse (``CP.HALF_INVERSE``); with --half-inverse the float16 one
            half = True if args.half_inverse else None
            _, t_c, m_c, _ = CP.chunk_prep(q, k, g, beta, cb, HV, l2norm=True, maxnreg=cap, half_inverse=half)
            rec(f"{tag} prep, l2-norm fused, {'float16 inverse, ' if half else ''}maxnreg {cap}", timing.median_ms(
                lambda: CP.chunk_prep(q, k, g, beta, cb, HV, l2norm=True, maxnreg=cap, half_inverse=half)),
                diff=max(rel(t_c, t), rel(m_c, m)))
        if args.half_inverse:  # both inverses explicitly (the default is ``CP.HALF_INVERSE``'s)
            _, t_f, m_f, _ = CP.chunk_prep(q, k, g, beta, cb, HV, l2norm=True, half_inverse=False)
            rec(f"{tag} prep, l2-norm fused, tf32 inverse", timing.median_ms(
                lambda: CP.chunk_prep(q, k, g, beta, cb, HV, l2norm=True, half_inverse=False)))
            _, t_h, m_h, _ = CP.chunk_prep(q, k, g, beta, cb, HV, l2norm=True, half_inverse=True)
            rec(f"{tag} prep, l2-norm fused, float16 inverse", timing.median_ms(
                lambda: CP.chunk_prep(q, k, g, beta, cb, HV, l2norm=True, half_inverse=True)),
                diff=max(rel(t_h, t_f), rel(m_h, m_f)))
        if base_prep is not None:
            _, t_b, m_b, _ = base_prep.chunk_prep(q, k, g, beta, cb, HV, l2norm=True)
            rec(f"{tag} prep, l2-norm fused, baseline", timing.median_ms(
                lambda: base_prep.chunk_prep(q, k, g, beta, cb, HV, l2norm=True)), diff=max(rel(t_b, t), rel(m_b, m)))
        o_ref, _, _ = CF.chunk_fwd(qn, kn, v, vec, t, m, None, cu, co, sc)
        rec(f"{tag} state pass", timing.median_ms(lambda: CF.chunk_fwd(qn, kn, v, vec, t, m, None, cu, co, sc)))
        o_f, _, _ = CF.chunk_fwd(q, k, v, vec, t, m, None, cu, co, sc, l2norm=True)
        rec(f"{tag} state pass, l2-norm fused", timing.median_ms(
            lambda: CF.chunk_fwd(q, k, v, vec, t, m, None, cu, co, sc, l2norm=True)), diff=rel(o_f, o_ref))
        for bv, stages in state_configs:
            o_c, _, _ = CF.chunk_fwd(q, k, v, vec, t, m, None, cu, co, sc, l2norm=True, block_v=bv, num_stages=stages)
            rec(f"{tag} state pass, l2-norm fused, BV {bv}, {stages} stages", timing.median_ms(
                lambda: CF.chunk_fwd(q, k, v, vec, t, m, None, cu, co, sc, l2norm=True, block_v=bv,
                                     num_stages=stages)), diff=rel(o_c, o_f))
        if base is not None:
            o_b, _, _ = base.chunk_fwd(qn, kn, v, gc, beta, t, m, None, cu, co, sc)
            rec(f"{tag} state pass, baseline", timing.median_ms(
                lambda: base.chunk_fwd(qn, kn, v, gc, beta, t, m, None, cu, co, sc)), diff=rel(o_b, o_ref))
        xs = (q[None], k[None], v[None], g[None], beta[None])
        with torch.no_grad():
            rec(f"{tag} op forward", timing.median_ms(
                lambda: chunk_gated_delta_rule(*xs, use_qk_l2norm=True, output_final_state=True)))
            if args.half_inverse:
                default = CP.HALF_INVERSE
                outs = {}
                for half in (False, True):
                    CP.HALF_INVERSE = half
                    outs[half], _ = chunk_gated_delta_rule(*xs, use_qk_l2norm=True, output_final_state=True)
                    rec(f"{tag} op forward, {'float16' if half else 'tf32'} inverse", timing.median_ms(
                        lambda: chunk_gated_delta_rule(*xs, use_qk_l2norm=True, output_final_state=True)),
                        diff=rel(outs[half], outs[False]))
                CP.HALF_INVERSE = default
            if fla_chunk is not None:
                rec(f"{tag} fla forward", timing.median_ms(
                    lambda: fla_chunk(*xs, use_qk_l2norm_in_kernel=True, output_final_state=True)))
    meta = {"prep": _meta(CP.chunk_prep_kernel), "state pass": _meta(CF.chunk_fwd_kernel)}
    if base is not None:
        meta["state pass, baseline"] = _meta(base.chunk_fwd_kernel)
    if base_prep is not None:
        meta["prep, baseline"] = _meta(base_prep.chunk_prep_kernel)
    for name, variants in meta.items():
        print(name, variants)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(card=torch.cuda.get_device_name(dev), torch=torch.__version__, rows=rows, meta=meta), f,
                      indent=1)


if __name__ == "__main__":
    main()
