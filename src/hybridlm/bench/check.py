"""Correctness gate of the kernel benchmark: every Triton path against the reference, on fresh
random inputs, before anything is timed.

Each check returns rows ``{"path", "rel_err", "tol", "ok", "note"}``; ``ok`` is True, False (wrong
numbers: the benchmark aborts) or None (the path raised: it is reported and left out of the timings).
Relative error is ||x - ref|| / ||ref|| in float64, the reference run in float32 on upcast inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridlm.ops import gated_delta_rule, gated_delta_rule_step

# float32 allows for tf32 dot products on the GPU; gradients pass through twice as many products.
OUT_TOL = {torch.float32: 2e-3, torch.bfloat16: 2e-2, torch.float16: 1e-2}
GRAD_TOL = {d: 2 * t for d, t in OUT_TOL.items()}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def _row(path, err, tol, note=""):
    ok = bool(err < tol) if err == err else False  # NaN never passes
    return {"path": path, "rel_err": err, "tol": tol, "ok": ok, "note": note}


def _raised(path, exc):
    return {"path": path, "rel_err": None, "tol": None, "ok": None,
            "note": f"raises {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"}


def random_gdn_inputs(B, T, H, HV, K, V, dtype, device, gen):
    """q, k [B, T, H, K] and v [B, T, HV, V] in ``dtype``; g, beta [B, T, HV] and h0 [B, HV, K, V]
    float32. Drawn on the CPU from ``gen`` (reproducible on any device), then moved."""
    def rnd(*shape):
        return torch.randn(*shape, generator=gen)

    q, k, v = rnd(B, T, H, K).to(device, dtype), rnd(B, T, H, K).to(device, dtype), rnd(B, T, HV, V).to(device, dtype)
    g = F.logsigmoid(rnd(B, T, HV) + 3.0).to(device)
    beta = torch.sigmoid(rnd(B, T, HV)).to(device)
    h0 = (0.1 * rnd(B, HV, K, V)).to(device)
    return q, k, v, g, beta, h0


def check_chunk(device, dtype, *, B, T, H, HV, K, V, seed=0) -> list[dict]:
    """Triton chunked forward (o, final state) and every gradient against the reference."""
    gen = torch.Generator().manual_seed(seed)
    inputs = random_gdn_inputs(B, T, H, HV, K, V, dtype, device, gen)
    tag = f"chunk B{B} T{T} H{H} HV{HV} K{K} V{V}"
    ours = [x.clone().requires_grad_() for x in inputs]
    ref = [x.detach().float().requires_grad_() for x in inputs]
    kw = dict(output_final_state=True, use_qk_l2norm=True)
    o_ref, s_ref = gated_delta_rule(*ref[:5], initial_state=ref[5], backend="reference", **kw)
    do = torch.randn(o_ref.shape, generator=gen).to(device)
    ds = torch.randn(s_ref.shape, generator=gen).to(device)
    try:
        o, s = gated_delta_rule(*ours[:5], initial_state=ours[5], backend="triton", **kw)
    except Exception as exc:  # a missing or broken kernel is reported, not hidden
        return [_raised(f"{tag} fwd", exc)]
    rows = [_row(f"{tag} fwd o", rel_err(o, o_ref), OUT_TOL[dtype]),
            _row(f"{tag} fwd final state", rel_err(s, s_ref), OUT_TOL[dtype])]
    grads_ref = torch.autograd.grad((o_ref * do).sum() + (s_ref * ds).sum(), ref)
    try:
        grads = torch.autograd.grad((o.float() * do).sum() + (s * ds).sum(), ours)
    except Exception as exc:
        return rows + [_raised(f"{tag} bwd", exc)]
    for name, gr, gr_ref in zip(("dq", "dk", "dv", "dg", "dbeta", "dh0"), grads, grads_ref):
        rows.append(_row(f"{tag} bwd {name}", rel_err(gr, gr_ref), GRAD_TOL[dtype]))
    return rows


def check_decode(device, dtype, *, B, H, HV, K, V, steps=3, seed=0) -> list[dict]:
    """Triton decode step (in place, several consecutive tokens) against the reference step."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v, g, beta, h0 = random_gdn_inputs(B, steps, H, HV, K, V, dtype, device, gen)
    tag = f"decode B{B} H{H} HV{HV} K{K} V{V}"
    state, state_ref = h0.clone(), h0.clone()
    errs = []
    try:
        for t in range(steps):
            o, _ = gated_delta_rule_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state,
                                         use_qk_l2norm=True, inplace=True, backend="triton")
            o_ref, state_ref = gated_delta_rule_step(q[:, t].float(), k[:, t].float(), v[:, t].float(),
                                                     g[:, t], beta[:, t], state_ref, use_qk_l2norm=True,
                                                     backend="reference")
            errs.append(rel_err(o, o_ref))
    except Exception as exc:
        return [_raised(tag, exc)]
    return [_row(f"{tag} o (worst of {steps} steps)", max(errs), OUT_TOL[dtype]),
            _row(f"{tag} state after {steps} steps", rel_err(state, state_ref), OUT_TOL[torch.float32])]


def check_fla(fla_ops, device, dtype, *, B, T, H, HV, K, V, seed=0) -> list[dict]:
    """The peer's forward and decode against the same reference (reported, never gating)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v, g, beta, h0 = random_gdn_inputs(B, T, H, HV, K, V, dtype, device, gen)
    o_ref, s_ref = gated_delta_rule(q.float(), k.float(), v.float(), g, beta, initial_state=h0,
                                    output_final_state=True, use_qk_l2norm=True, backend="reference")
    rows = []
    for name, fn in (("chunk", fla_ops.chunk_gated_delta_rule),
                     ("fused_recurrent", fla_ops.fused_recurrent_gated_delta_rule)):
        tag = f"fla {name} B{B} T{T} H{H} HV{HV}"
        try:
            o, s = fn(q, k, v, g=g, beta=beta, initial_state=h0, output_final_state=True,
                      use_qk_l2norm_in_kernel=True)
        except Exception as exc:
            rows.append(_raised(tag, exc))
            continue
        rows.append(_row(f"{tag} o", rel_err(o, o_ref), OUT_TOL[dtype], "peer"))
        rows.append(_row(f"{tag} final state", rel_err(s, s_ref), OUT_TOL[dtype], "peer"))
    return rows


def check_all(device, dtype, *, small: bool, fla_ops=None) -> list[dict]:
    """The gate the benchmark runs first. ``small`` picks interpreter-sized shapes (CPU tests)."""
    if small:
        rows = check_chunk(device, dtype, B=1, T=33, H=1, HV=2, K=16, V=16, seed=1)
        rows += check_decode(device, dtype, B=2, H=1, HV=2, K=16, V=32, seed=2)
    else:
        rows = check_chunk(device, dtype, B=2, T=1000, H=4, HV=8, K=128, V=128, seed=1)
        rows += check_chunk(device, dtype, B=1, T=63, H=2, HV=2, K=64, V=128, seed=3)
        rows += check_decode(device, dtype, B=3, H=16, HV=32, K=128, V=128, seed=2)
    if fla_ops is not None:
        rows += check_fla(fla_ops, device, dtype, B=2, T=1000, H=4, HV=8, K=128, V=128, seed=4)
    return rows
