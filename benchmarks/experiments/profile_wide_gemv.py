"""``hybridlm profile`` with the wide input projections on the one-row matrix-vector kernel too.

At batch 1 the step sends projections of at most ``packing._GEMV_MAX_OUT`` (4,096) output rows to the
decode matrix-vector kernel and leaves the wide ones (Qwen3-Next's Gated DeltaNet input projection,
12,352 x 2,048, and the attention layer's, 9,216 x 2,048) on cuBLAS: timed alone, the one-row
kernel took 18.26 / 15.11 us for them against cuBLAS's 17.82 / 13.37 (sixth 12-03 session). But cuBLAS
launches without programmatic dependent launch, so twice a layer it breaks the chain of PDL kernels
(neither it nor the kernel after it can launch early), which a timing of the product alone does not
see. This times the whole step with them on the kernel, and the kernel's launch for them; with
``--block``, on the block kernel instead (the multi-row kernel, with PDL since the third 12-05 session;
timed alone on an H200 in the second 12-03 session, before PDL, at 17.31 us for the 12,352-row one
against cuBLAS's 17.82):

    python benchmarks/experiments/profile_wide_gemv.py [--max-out 16384] [--programs-per-sm 4]
        [--row-elements 16384] --preset qwen3-next-80b-a3b --experts 32 --no-twin --contexts 4k \\
        --batch 1 --compile --json
"""

import argparse
import sys

from hybridlm.cli import main
from hybridlm.layers import packing
from hybridlm.ops.triton import gemv

if __name__ == "__main__":
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--max-out", type=int, default=16384, help="widest weight sent to the kernel (default 16384)")
    ap.add_argument("--programs-per-sm", type=int, default=gemv.PROGRAMS_PER_SM_ROW)
    ap.add_argument("--row-elements", type=int, default=gemv.ROW_ELEMENTS, help="weight elements a row block")
    ap.add_argument("--block", action="store_true", help="the wide ones on the block kernel, not the one-row one")
    args, rest = ap.parse_known_args()
    if args.block:
        one_row_widest = packing._GEMV_MAX_OUT
        row_into = gemv.gemv_into

        def gemv_into(x_ND, w_OD, y_NO, **kw):
            if w_OD.shape[0] > one_row_widest and kw.get("blocks") is None:
                kw["blocks"] = gemv.pick_blocks(x_ND.shape[0], w_OD.shape[0], x_ND.shape[1],
                                                gemv._num_sms(x_ND.device))
            row_into(x_ND, w_OD, y_NO, **kw)

        gemv.gemv_into = gemv_into
    packing._GEMV_MAX_OUT = args.max_out
    gemv.PROGRAMS_PER_SM_ROW = args.programs_per_sm
    gemv.ROW_ELEMENTS = args.row_elements
    print(f"wide gemv: max out {args.max_out}, {'block kernel' if args.block else 'one-row kernel'}, "
          f"{args.programs_per_sm} programs a multiprocessor, {args.row_elements} elements a block", file=sys.stderr)
    sys.exit(main(["profile", *rest]))
