"""``hybridlm profile`` with Gated DeltaNet's output norm and projection as two kernels again.

Since the second 12-04 session the batch-1 decode step forms the gated norm in the one-row
matrix-vector kernel's prologue (``ops.triton.gemv.gated_norm_linear``, through
``layers.packing.project_gated_norm``). This runs the step as before, the norm's own kernel and then the
projection, to time what the fusion saves in the same call:

    python benchmarks/experiments/profile_norm_apart.py --preset qwen3-next-80b-a3b --experts 32 \\
        --no-twin --contexts 4k --batch 1 --compile --json
"""

import sys

from hybridlm.cli import main
from hybridlm.layers import gated_deltanet, packing


def norm_then_project(norm, layer, o, z):
    """``project_gated_norm`` as two steps, whatever the shapes."""
    B, T, heads, hd = o.shape
    return packing.project(layer, norm(o, z).reshape(B, T, heads * hd))


if __name__ == "__main__":
    gated_deltanet.project_gated_norm = norm_then_project
    sys.exit(main(["profile", *sys.argv[1:]]))
