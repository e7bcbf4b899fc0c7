"""Can the batch-1 MoE kernels start reading their expert weights before their predecessor ends? One
GPU call, about a minute.

Why: in the compiled batch-1 step on an H100 the MoE block (router stack, routing, gate/up, down) runs
at ~63% of the copy rate for its bytes (34.2 us a layer against 21.7 at the rate, second 12-05
session), about half of the step's excess over its bandwidth bound. Under programmatic dependent launch
(PDL) a kernel is launched while its predecessor runs and parks in its wait; the expert kernels wait
first thing, because which expert's rows they read is what the routing kernel, their predecessor (or
the one before), writes. If the routing kernel lets its successor launch only after its own wait
(wait-first), the router logits are complete when the gate/up kernel and the down kernel launch:
each can then pick its token's experts from the logits itself (``route_row``, the routing kernel's own
helper, so the same experts and weights bit for bit) and ask L2 for its weight rows
(``cp.async.bulk.prefetch.L2``, fire and forget) while parked, so DRAM streams through the kernel
boundaries instead of idling at them.

The chain, per layer: the router and shared-expert stack's matrix-vector product (the one-row kernel,
[32 + 1 + 512 + 512, 2048]), routing, gate/up, down; the down output is the next layer's input.
``--layers`` distinct weight sets (so the calls read DRAM, not L2), one CUDA graph, us a layer.
Variants (r = the routing kernel, g = gate/up, d = down; wf = wait-first; la = routing from the
logits before the wait; pf = L2 prefetch while parked, d's count the experts it prefetches):

  base           r, g, d as in the step (every kernel trigger-first)
  r_wf           r wait-first, g and d as in the step
  la             r wf, g la, d la, no prefetch (the cost of the redundant routing)
  g_pf           r wf, g la + pf, d as in the step
  d_pf K         r wf, g as in the step, d la + pf of its first K experts' rows and the shared rows
  gd_pf K        r wf, g la + pf, d la + pf K

Every variant's output after one pass over the layers is compared with ``base``'s bit for bit.
``--orders`` adds chains of the same four kernels with each one's PDL order given (t trigger-first, w
wait-first, in the order stack product, routing, gate/up, down); ``--no-prefetch`` runs only those.

Measured on an H100 (third 12-05 session, RESULTS.md): every L2 prefetch made the chain slower (34.5 us
a layer with the redundant routing and no prefetch, 43.2-51.4 with the gate/up or all ten experts' down
rows prefetched; 34.1 with two experts' down rows), against 34.1-35.5 for the step's chain; the order
combinations took 33.5-34.3 (the first row of a run is the slowest, ~35.5, whatever it is). So weights
asked of L2 while parked do not arrive sooner than the kernel's own loads would.

    PYTHONPATH=src python benchmarks/experiments/moe_lookahead.py [--layers 16] [--experts 32] [--json F]
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from hybridlm.bench import report, timing
from hybridlm.ops.triton.decode import _num_sms
from hybridlm.ops.triton.gemv import ROW_WARPS, _gemv_row_kernel, gemv_into, row_launch
from hybridlm.ops.triton.moe_decode import (_down_kernel, _down_routed, _down_shared, _gate_up_kernel,
                                            _gate_up_tile, moe_experts_into, pick_blocks, pick_stages)
from hybridlm.ops.triton.moe_route import EMPTY, _route_kernel, moe_route_into, pick_warps, route_row
from hybridlm.ops.triton.utils import cdiv, next_power_of_2


@triton.jit
def _bulk_prefetch_rows(p_rows, ROW_BYTES: tl.constexpr):
    # one cp.async.bulk.prefetch.L2 per element of p_rows (byte pointers, 16-byte aligned)
    tl.inline_asm_elementwise(f"cp.async.bulk.prefetch.L2.global [$1], {ROW_BYTES};\n\tmov.u32 $0, 0;", "=r,l",
                              [p_rows], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _gate_up_la_kernel(x_ND, logits_NE, gate_EID, up_EID, h_NKI, E, s_ln, I, D, s_xn, s_ge, s_gi, s_ue, s_ui,
                       K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, EMPTY: tl.constexpr,
                       PREFETCH: tl.constexpr, ROW_BYTES: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr,
                       STAGES: tl.constexpr):
    tl.extra.cuda.gdc_launch_dependents()
    i_nk = tl.program_id(0).to(tl.int64)
    i_n = i_nk // K
    j = i_nk - i_n * K
    w_k, e_k = route_row(logits_NE + i_n * s_ln, logits_NE, E, 1.0, K, BLOCK_E, BLOCK_K, True, False, True, EMPTY)
    o_k = tl.arange(0, BLOCK_K)
    i_e = tl.sum(tl.where(o_k == j, e_k, 0), 0).to(tl.int64)
    w = tl.sum(tl.where(o_k == j, w_k, 0.0), 0)
    if PREFETCH:
        o_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        o_i = tl.minimum(o_i, I - 1)  # the asm cannot be masked: the tail prefetches the last row again
        _bulk_prefetch_rows((gate_EID + i_e * s_ge + o_i.to(tl.int64) * s_gi).to(tl.pointer_type(tl.int8)),
                            ROW_BYTES)
        _bulk_prefetch_rows((up_EID + i_e * s_ue + o_i.to(tl.int64) * s_ui).to(tl.pointer_type(tl.int8)),
                            ROW_BYTES)
    tl.extra.cuda.gdc_wait()
    _gate_up_tile(x_ND, gate_EID, up_EID, h_NKI, i_nk, i_n, i_e, w, tl.program_id(1), I, D, s_xn, s_ge, s_gi,
                  s_ue, s_ui, BLOCK_I, BLOCK_D, STAGES)


@triton.jit
def _down_la_kernel(h_NKI, logits_NE, experts_NK, down_EDI, out_ND, hs_NS, ws_DS, us_NS, gs_N, E, s_ln, I, D, S,
                    s_de, s_dd, s_on, s_hn, s_wd, s_un, s_gn, K: tl.constexpr, BLOCK_E: tl.constexpr,
                    BLOCK_K: tl.constexpr, EMPTY: tl.constexpr, PF: tl.constexpr, ROW_BYTES: tl.constexpr,
                    SHARED_BYTES: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_I: tl.constexpr, STAGES: tl.constexpr):
    tl.extra.cuda.gdc_launch_dependents()
    i_n = tl.program_id(0).to(tl.int64)
    o_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    if PF > 0:
        o_c = tl.minimum(o_d, D - 1).to(tl.int64)
        _bulk_prefetch_rows((ws_DS + o_c * s_wd).to(tl.pointer_type(tl.int8)), SHARED_BYTES)
        w_k, e_k = route_row(logits_NE + i_n * s_ln, logits_NE, E, 1.0, K, BLOCK_E, BLOCK_K, True, False, True,
                             EMPTY)
        o_k = tl.arange(0, BLOCK_K)
        for j in tl.static_range(PF):
            i_e = tl.sum(tl.where(o_k == j, e_k, 0), 0).to(tl.int64)
            _bulk_prefetch_rows((down_EDI + i_e * s_de + o_c * s_dd).to(tl.pointer_type(tl.int8)), ROW_BYTES)
    tl.extra.cuda.gdc_wait()
    acc = _down_shared(hs_NS, ws_DS, us_NS, gs_N, i_n, o_d, m_d, S, s_hn, s_wd, s_un, s_gn, True, True,
                       BLOCK_D, BLOCK_I, STAGES)
    _down_routed(acc, h_NKI, experts_NK, down_EDI, out_ND, i_n, o_d, m_d, K, I, s_de, s_dd, s_on, BLOCK_I, STAGES,
                 False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--orders", default="tttt,wttt,tttt,wttt,twtt,ttwt,tttw,wwtt,wtwt,wttw,wwwt,wwtw,wtww,wwww,twww",
                    help="PDL orders of (stack product, routing, gate/up, down), t trigger-first, w wait-first")
    ap.add_argument("--no-prefetch", action="store_true", help="only the order combinations")
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    E, K, D, I, S = args.experts, 10, 2048, 512, 512
    rate = timing.copy_bytes_per_s(dev)
    print(f"{torch.cuda.get_device_name(dev)}: 1 GiB copy {rate / 1e9:,.0f} GB/s; E {E} K {K} D {D} I {I} S {S} "
          f"bf16, {args.layers} layers, batch 1", flush=True)
    torch.manual_seed(0)
    bf = dict(device=dev, dtype=torch.bfloat16)
    R = E + 1 + 2 * S  # router, shared gate, shared gate_proj and up_proj, as MoE stacks them
    layers = []
    for _ in range(args.layers):
        stack = torch.randn(R, D, **bf) * D ** -0.5
        gate, up = (torch.randn(E, I, D, **bf) * D ** -0.5 for _ in range(2))
        down = (torch.randn(D, E, I, **bf) * (I * (K + 1)) ** -0.5).transpose(0, 1)  # MoE.packed_experts' layout
        layers.append((stack, gate, up, down, torch.randn(D, S, **bf) * (S * (K + 1)) ** -0.5))
    x0 = torch.randn(1, D, **bf)
    xs = [torch.empty(1, D, **bf) for _ in range(args.layers + 1)]
    proj = torch.empty(1, R, **bf)
    weights = torch.empty(1, K, device=dev, dtype=torch.float32)
    experts = torch.empty(1, K, device=dev, dtype=torch.int64)
    h = torch.empty(1, K, I, device=dev, dtype=torch.float32)
    bi1, bd1, bi2, bd2 = pick_blocks(1, K, I, D, _num_sms(dev))
    st1, st2 = pick_stages(1)
    BE, BK = next_power_of_2(E), next_power_of_2(K)
    pdl = dict(launch_pdl=True)

    def layer(l, route_wf, g_la, g_pf, d_pf):
        stack, gate, up, down, ws = layers[l]
        x, out = (x0 if l == 0 else xs[l]), xs[l + 1]
        gemv_into(x, stack, proj, row=True)
        logits = proj[:, :E]
        hs, us, gs = proj[:, E + 1:E + 1 + S], proj[:, E + 1 + S:], proj[:, E]
        if route_wf:
            route(logits, 2)
        else:
            moe_route_into(logits, K, "softmax", True, 1.0, None, weights, experts)
        if not g_la and d_pf is None:
            moe_experts_into(x, experts, weights, gate, up, down, out, shared_h_NS=hs, shared_down_DS=ws,
                             shared_up_NS=us, shared_gate_N=gs)
            return
        if g_la:
            _gate_up_la_kernel[(K, cdiv(I, bi1))](
                x, logits, gate, up, h, E, proj.stride(0), I, D, x.stride(0), gate.stride(0), gate.stride(1),
                up.stride(0), up.stride(1), K=K, BLOCK_E=BE, BLOCK_K=BK, EMPTY=EMPTY, PREFETCH=g_pf,
                ROW_BYTES=D * 2, BLOCK_I=bi1, BLOCK_D=bd1, STAGES=st1, num_warps=4, **pdl)
        else:
            gate_up_into(x, gate, up, 1)
        if d_pf is None:
            down_into(out, down, hs, ws, us, gs, 1)
        else:
            _down_la_kernel[(1, cdiv(D, bd2))](
                h, logits, experts, down, out, hs, ws, us, gs, E, proj.stride(0), I, D, S, down.stride(0),
                down.stride(1), out.stride(0), hs.stride(0), ws.stride(0), us.stride(0), gs.stride(0), K=K,
                BLOCK_E=BE, BLOCK_K=BK, EMPTY=EMPTY, PF=d_pf, ROW_BYTES=I * 2, SHARED_BYTES=S * 2, BLOCK_D=bd2,
                BLOCK_I=bi2, STAGES=st2, num_warps=4, **pdl)

    bo, bdr, programs, rounds = row_launch(R, D, _num_sms(dev))

    def route(logits, use_pdl):
        _route_kernel[(1,)](logits, logits, weights, experts, E, proj.stride(0), 1.0, K=K, BLOCK_E=BE, BLOCK_K=BK,
                            SOFTMAX=True, HAS_BIAS=False, NORM=True, EMPTY=EMPTY, USE_PDL=use_pdl,
                            num_warps=pick_warps(E), **pdl)

    def layer_orders(l, orders):
        # the library's kernels, each with its order given: USE_PDL 1 trigger-first, 2 wait-first
        stack, gate, up, down, ws = layers[l]
        x, out = (x0 if l == 0 else xs[l]), xs[l + 1]
        s_, r_, g_, d_ = (2 if c == "w" else 1 for c in orders)
        _gemv_row_kernel[(programs,)](x, stack, proj, R, D, stack.stride(0), rounds, x, x, proj, proj, 0.0,
                                      BLOCK_O=bo, BLOCK_D=bdr, USE_PDL=s_, NORM=0, ZERO_CENTERED=False,
                                      num_warps=ROW_WARPS, **pdl)
        logits = proj[:, :E]
        hs, us, gs = proj[:, E + 1:E + 1 + S], proj[:, E + 1 + S:], proj[:, E]
        route(logits, r_)
        gate_up_into(x, gate, up, g_)
        down_into(out, down, hs, ws, us, gs, d_)

    def gate_up_into(x, gate, up, use_pdl):
        _gate_up_kernel[(K, cdiv(I, bi1))](
            x, experts, weights, gate, up, h, K, I, D, x.stride(0), gate.stride(0), gate.stride(1),
            up.stride(0), up.stride(1), BLOCK_I=bi1, BLOCK_D=bd1, STAGES=st1, num_warps=4, USE_PDL=use_pdl, **pdl)

    def down_into(out, down, hs, ws, us, gs, use_pdl):
        _down_kernel[(1, cdiv(D, bd2))](
            h, experts, down, out, hs, ws, us, gs, K, I, D, S, down.stride(0), down.stride(1), out.stride(0),
            hs.stride(0), ws.stride(0), us.stride(0), gs.stride(0), HAS_SHARED=True, SWIGLU=True, GATED=True,
            BLOCK_D=bd2, BLOCK_I=bi2, STAGES=st2, SHARED_PRELOAD=False, num_warps=4, USE_PDL=use_pdl, **pdl)

    variants = {} if args.no_prefetch else {"base": (False, False, False, None), "r_wf": (True, False, False, None),
                "la": (True, True, False, 0), "g_pf": (True, True, True, None)}
    for k in () if args.no_prefetch else (2, 5, K):
        variants[f"d_pf {k}"] = (True, False, False, k)
        variants[f"gd_pf {k}"] = (True, True, True, k)
    nbytes = K * 3 * I * D * 2 + 3 * S * D * 2 + R * D * 2  # routed experts (distinct), shared, stack
    rows, expect = [], None
    runs = [(name, lambda l, v=v: layer(l, *v)) for name, v in variants.items()]
    runs += [(f"order {o}", lambda l, o=o: layer_orders(l, o)) for o in args.orders.split(",") if o]
    for name, call in runs:
        for t in xs:
            t.fill_(float("nan"))
        for l in range(args.layers):
            call(l)
        torch.cuda.synchronize()
        out = xs[-1].clone()
        if expect is None:
            expect = out
        same = bool(torch.equal(out, expect))
        us = timing.graphed_ms_per_call([lambda l=l: call(l) for l in range(args.layers)], warmup_ms=10,
                                        rep_ms=80) * 1e3
        rows.append(dict(variant=name, us=us, copy_share=nbytes / (us * 1e-6) / rate, bytes=nbytes, equal=same,
                         finite=bool(out.isfinite().all())))
        print(f"{name:12s} {us:7.2f} us a layer  {rows[-1]['copy_share']:6.1%} of the copy rate  "
              f"equal to base: {same}", flush=True)
    report.write_rows_json(args.json, rows, copy_bytes_per_s=rate)


if __name__ == "__main__":
    main()
