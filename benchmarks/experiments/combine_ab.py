"""Decode attention's split combine, alone: the two-pass loop it had until the eighth 2026-12-02
session (BN 16, each group's loads awaited), the one-pass pipelined kernel with one program per row
(until 2026-12-03) and the same kernel with rows split over value columns (`combine_plan`, the
default since), on split partials of the sweep's shapes. One GPU call, seconds.

    PYTHONPATH=src python benchmarks/experiments/combine_ab.py [--json F]
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from hybridlm.bench import report, timing
from hybridlm.ops.triton.decode import _num_sms
from hybridlm.ops.triton.decode_attention import combine_into

# (B * H rows, splits, Dv): head dim 128 with 8 query heads on one key/value head at B 1 (683 and
# 1024 splits), Qwen3-Next's 16 heads at B 1 (293 / 256) and B 8 (32), 64 rows at B 8, 8 heads
SHAPES = [(8, 683, 128), (8, 1024, 128), (16, 293, 256), (16, 256, 256), (128, 32, 256), (64, 16, 128)]


@triton.jit
def _combine_two_pass(part_acc, part_m, part_l, o, n_splits, DV: tl.constexpr, BDV: tl.constexpr,
                      BN: tl.constexpr):
    # the previous kernel, unchanged: a pass for the maximum, then a pass for the sums
    i_bh = tl.program_id(0).to(tl.int64)
    o_n = tl.arange(0, BN)
    o_dv = tl.arange(0, BDV)
    m_dv = o_dv < DV
    base = i_bh * n_splits
    b_m = tl.full([BN], float("-inf"), tl.float32)
    for n0 in range(0, n_splits, BN):
        b_m = tl.maximum(b_m, tl.load(part_m + base + n0 + o_n, mask=n0 + o_n < n_splits, other=float("-inf")))
    m_max = tl.max(b_m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    b_l = tl.zeros([BN], dtype=tl.float32)
    b_acc = tl.zeros([BN, BDV], dtype=tl.float32)
    for n0 in range(0, n_splits, BN):
        m_n = n0 + o_n < n_splits
        w = tl.exp2(tl.load(part_m + base + n0 + o_n, mask=m_n, other=float("-inf")) - m_max)
        b_l += w * tl.load(part_l + base + n0 + o_n, mask=m_n, other=0.0)
        a = tl.load(part_acc + (base + n0 + o_n)[:, None] * DV + o_dv[None, :],
                    mask=m_n[:, None] & m_dv[None, :], other=0.0)
        b_acc += w[:, None] * a
    l_sum = tl.sum(b_l, axis=0)
    b_o = tl.sum(b_acc, axis=0) / tl.where(l_sum > 0, l_sum, 1.0)
    tl.store(o + i_bh * DV + o_dv, b_o.to(o.dtype.element_ty), mask=m_dv)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    for BH, n, DV in SHAPES:
        torch.manual_seed(0)
        acc = torch.randn(BH, n, DV, device=dev)
        m = 4 * torch.randn(BH, n, device=dev)
        m[:, : n // 3] = float("-inf")  # splits that saw no key
        l = torch.rand(BH, n, device=dev) + 0.5
        names = ("old", "row", "new")
        outs = {name: torch.empty(BH, DV, device=dev, dtype=torch.bfloat16) for name in names}
        bdv = triton.next_power_of_2(DV)
        sms = _num_sms(dev)
        launches = {
            "old": lambda: _combine_two_pass[(BH,)](acc, m, l, outs["old"], n, DV=DV, BDV=bdv,
                                                    BN=min(16, triton.next_power_of_2(n)), num_warps=4),
            "row": lambda: combine_into(acc, m, l, outs["row"], BH, n, DV, sms, block_dv=bdv),
            "new": lambda: combine_into(acc, m, l, outs["new"], BH, n, DV, sms),
        }
        row = dict(rows=BH, splits=n, Dv=DV)
        for name, fn in launches.items():
            fn()
            row[name + "_us"] = timing.graphed_ms_per_call([fn] * 20, warmup_ms=5, rep_ms=30) * 1e3
        w = torch.exp2(m - m.amax(1, keepdim=True))
        ref = (w[..., None] * acc).sum(1) / (w * l).sum(1, keepdim=True)
        for name in names:
            row["max_err_" + name] = (outs[name].float() - ref).abs().max().item()
        rows.append(row)
        print(f"rows {BH:4d} splits {n:5d} Dv {DV}: two-pass {row['old_us']:6.2f} us, one pass a row "
              f"{row['row_us']:6.2f} us, split over columns {row['new_us']:6.2f} us (max err "
              + " / ".join(f"{row['max_err_' + k]:.1e}" for k in names) + ")", flush=True)
    report.write_rows_json(args.json, rows)


if __name__ == "__main__":
    main()
