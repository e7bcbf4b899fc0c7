"""Does the tensor memory accelerator (TMA) move the decode step's state faster than plain loads?

The decode step (``ops/triton/decode.py``) reads and writes its float32 state with ordinary vector
loads and stores. At batch 32 (Qwen3-Next's heads: HV 32, K = V = 128) it reads 88.3% of the 1 GiB
copy rate (12-04 session), Triton's own flat scale over the same bytes ~89% and torch's ``copy_``
~93% (``decode_gap.py``, second 12-03 session): the issue's 90% sits between Triton's plain-load
ceiling and torch's. On Hopper a TMA bulk copy moves a whole [K, BV] tile into shared memory with one
instruction and no address arithmetic per thread, and its store drains from shared memory
asynchronously. This times, as CUDA-graph replays over distinct buffers (>= 4x L2):

  copy        torch ``d.copy_(s)`` over the step's bytes (the yardstick's own pattern)
  flat        Triton, each program scales 16 KB of contiguous floats in place (plain loads)
  flat_tma    the same through a host tensor descriptor ([rows, 128] view, [32, 128] boxes)
  step        the decode step itself at its own launch rule, in place
  tma         the same step's math, separate reductions, state loaded and stored through descriptors
  tma_ld      state loaded through a descriptor, stored with plain stores
  tma_st      state loaded with plain loads, stored through a descriptor

Every step variant is first checked against the reference step (bf16 q/k/v, l2-normalised q and k).

    PYTHONPATH=src python benchmarks/experiments/decode_tma.py [--batches 32,64] [--blocks 64x4,128x8]
        [--json F]

On the CPU (``TRITON_INTERPRET=1``, float32, tiny shapes) ``--check-only`` runs the checks alone.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from hybridlm.bench import report, timing
from hybridlm.ops.delta_rule import gated_delta_rule_step
from hybridlm.ops.triton.decode import _pick_blocks, decode_into

EPS = tl.constexpr(1e-6)


@triton.jit
def _flat_kernel(s, BLOCK: tl.constexpr):
    p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(s + p, tl.load(s + p) * 0.999)


@triton.jit
def _flat_tma_kernel(desc, ROWS: tl.constexpr):
    r = tl.program_id(0) * ROWS
    desc.store([r, 0], desc.load([r, 0]) * 0.999)


@triton.jit
def _tma_step_kernel(q, k, v, g, beta, state, s_desc, o, scale, H: tl.constexpr, HV: tl.constexpr,
                     K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, LOAD_TMA: tl.constexpr,
                     STORE_TMA: tl.constexpr):
    # one (sequence x value head, value block) tile a program, value blocks fastest, as the step
    tile = tl.program_id(0)
    n_vb: tl.constexpr = V // BV
    i_v = tile % n_vb
    i_bhv = (tile // n_vb).to(tl.int64)
    i_b = i_bhv // HV
    i_hv = i_bhv % HV
    i_h = i_hv // (HV // H)
    o_k = tl.arange(0, K)
    o_v = i_v * BV + tl.arange(0, BV)
    b_v = tl.load(v + i_bhv * V + o_v).to(tl.float32)
    b_g = tl.load(g + i_bhv).to(tl.float32)
    b_beta = tl.load(beta + i_bhv).to(tl.float32)
    p_state = i_bhv * K * V + o_k[:, None] * V + o_v[None, :]
    row = (i_bhv * K).to(tl.int32)
    if LOAD_TMA:
        b_S = s_desc.load([row, i_v * BV])
    else:
        b_S = tl.load(state + p_state)
    b_q = tl.load(q + (i_b * H + i_h) * K + o_k).to(tl.float32)
    b_k = tl.load(k + (i_b * H + i_h) * K + o_k).to(tl.float32)
    b_q = b_q / tl.sqrt(tl.sum(b_q * b_q) + EPS)
    b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + EPS)
    b_S = b_S * tl.exp(b_g)
    b_u = b_beta * (b_v - tl.sum(b_S * b_k[:, None], axis=0))
    b_S = b_S + b_k[:, None] * b_u[None, :]
    b_o = tl.sum(b_S * (b_q * scale)[:, None], axis=0)
    if STORE_TMA:
        s_desc.store([row, i_v * BV], b_S)
    else:
        tl.store(state + p_state, b_S)
    tl.store(o + i_bhv * V + o_v, b_o.to(o.dtype.element_ty))


def tma_step(q, k, v, g, beta, state, o, desc, bv, warps, load_tma=True, store_tma=True):
    B, H, K = q.shape
    HV, V = v.shape[1:]
    _tma_step_kernel[(B * HV * (V // bv),)](q, k, v, g, beta, state, desc, o, K ** -0.5, H=H, HV=HV, K=K, V=V,
                                           BV=bv, LOAD_TMA=load_tma, STORE_TMA=store_tma, num_warps=warps)


def state_desc(s: torch.Tensor, bv: int) -> TensorDescriptor:
    K, V = s.shape[-2:]
    return TensorDescriptor.from_tensor(s.view(-1, V), [K, bv])


def check(dev, B, H, HV, K, V, dtype, bv, warps) -> float:
    torch.manual_seed(0)
    s0 = 0.1 * torch.randn(B, HV, K, V, device=dev)
    q, k = torch.randn(2, B, H, K, device=dev, dtype=dtype)
    v = torch.randn(B, HV, V, device=dev, dtype=dtype)
    g = torch.nn.functional.logsigmoid(torch.randn(B, HV, device=dev) + 3.0)
    beta = torch.rand(B, HV, device=dev)
    o_ref, s_ref = gated_delta_rule_step(q, k, v, g, beta, s0, use_qk_l2norm=True, backend="reference")
    worst = 0.0
    for ld, st in ((True, True), (True, False), (False, True)):
        s, o = s0.clone(), torch.full_like(v, float("nan"))
        tma_step(q, k, v, g, beta, s, o, state_desc(s, bv), bv, warps, ld, st)
        eo = ((o.float() - o_ref.float()).norm() / o_ref.float().norm()).item()
        es = ((s - s_ref).norm() / s_ref.norm()).item()
        print(f"check B {B} BV {bv} load_tma={ld} store_tma={st}: rel o {eo:.2e}, rel state {es:.2e}", flush=True)
        worst = max(worst, eo, es)
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="32,64")
    ap.add_argument("--blocks", default="64x4,128x8,32x2", help="BVxWARPS launches of the TMA step")
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    blocks = [tuple(int(x) for x in b.split("x")) for b in args.blocks.split(",")]
    if args.check_only or not torch.cuda.is_available():
        worst = max(check(torch.device("cpu"), 2, 2, 4, 16, 16, torch.float32, 8, 1),
                    check(torch.device("cpu"), 1, 1, 2, 16, 32, torch.float32, 16, 1))
        if worst > 1e-5:
            raise SystemExit(f"FAIL: worst relative error {worst:.2e}")
        print("checks passed")
        return
    dev = torch.device("cuda")
    H, HV, K, V = 16, 32, 128, 128
    worst = max(check(dev, B, H, HV, K, V, torch.bfloat16, bv, w) for B in (1, 32) for bv, w in blocks)
    if worst > 1e-4:
        raise SystemExit(f"FAIL: worst relative error {worst:.2e}")
    rate = timing.copy_bytes_per_s(dev)
    print(f"{torch.cuda.get_device_name(dev)}, Triton {triton.__version__}: 1 GiB copy {rate / 1e9:,.0f} GB/s")
    rows = []
    for B in (int(b) for b in args.batches.split(",")):
        nbytes = timing.decode_state_bytes(B, HV, K, V)
        src = timing.distinct_states(B, HV, K, V, dev, max_buffers=64)
        dst = [torch.empty_like(t) for t in src]
        q = torch.randn(B, H, K, device=dev, dtype=torch.bfloat16)
        k = torch.randn_like(q)
        v = torch.randn(B, HV, V, device=dev, dtype=torch.bfloat16)
        g = torch.nn.functional.logsigmoid(torch.randn(B, HV, device=dev) + 3.0)
        beta = torch.rand(B, HV, device=dev)
        o = torch.empty_like(v)
        numel = src[0].numel()
        flat_descs = [TensorDescriptor.from_tensor(s.view(-1, 128), [32, 128]) for s in src]
        cases = dict(
            copy=[lambda s=s, d=d: d.copy_(s) for s, d in zip(src, dst)],
            flat=[lambda s=s: _flat_kernel[(numel // 4096,)](s, BLOCK=4096, num_warps=4) for s in src],
            flat_tma=[lambda d=d: _flat_tma_kernel[(numel // 4096,)](d, ROWS=32, num_warps=4) for d in flat_descs],
            step=[lambda s=s: decode_into(q, k, v, g, beta, s, s, o, scale=K ** -0.5, use_qk_l2norm=True,
                                          A_log=None, dt_bias=None, beta_is_logit=False) for s in src],
        )
        for bv, w in blocks:
            descs = [state_desc(s, bv) for s in src]
            for name, ld, st in (("tma", True, True), ("tma_ld", True, False), ("tma_st", False, True)):
                cases[f"{name}_{bv}x{w}"] = [
                    lambda s=s, d=d, bv=bv, w=w, ld=ld, st=st: tma_step(q, k, v, g, beta, s, o, d, bv, w, ld, st)
                    for s, d in zip(src, descs)]
        row = dict(B=B, buffers=len(src), bytes=nbytes, default_block=_pick_blocks(B, HV, V, dev, K)[:2])
        for name, calls in cases.items():
            us = timing.graphed_ms_per_call(calls, warmup_ms=10, rep_ms=60) * 1e3
            row[name + "_us"] = us
            row[name + "_share"] = nbytes / (us * 1e-6) / rate
            print(f"B {B:4d} {name:14s} {us:8.2f} us  {row[name + '_share']:.1%}", flush=True)
        rows.append(row)
        del src, dst
        torch.cuda.empty_cache()
    report.write_rows_json(args.json, rows, copy_bytes_per_s=rate)


if __name__ == "__main__":
    main()
