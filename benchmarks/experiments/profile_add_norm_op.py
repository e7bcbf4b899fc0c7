"""``hybridlm profile`` with the residual add + norm kept as its Triton custom op under torch.compile.

By default ``RMSNorm.add`` leaves the add and norm to inductor under compile (its custom op made the
sixth 12-03 session's compiled step stall in inductor on the H200, torch 2.11), which breaks the chain
of PDL kernels twice a layer; the uncompiled graph step keeps the kernel and was the faster batch-1 step
in the seventh session (323.3 against 317.8 tokens/s). This runs the profile command with the custom op
under compile too, to time what the chain is worth once the stall is understood
(``inductor_stall_cpu.py``). Since the second 12-04 session (329.6 against 319.0 tokens/s, no stall with
the fallbacks registered) the compiled step does this by default; the script stays to rerun `stall`.
Run it under ``watchdog.py``:

    python benchmarks/experiments/watchdog.py 240 benchmarks/experiments/profile_add_norm_op.py \\
        --preset qwen3-next-80b-a3b --experts 32 --no-twin --contexts 4k --batch 1 --compile --json
"""

import sys

from hybridlm.cli import main
from hybridlm.layers import norms
from hybridlm.ops.triton.norm import add_rms_norm_rows


def add(self, x, y):
    """``RMSNorm.add`` through the kernel (its custom op when traced) wherever it runs: CUDA, no gradient."""
    if x.is_cuda and not (x.requires_grad or y.requires_grad) and y.shape == x.shape and y.dtype == x.dtype:
        return add_rms_norm_rows(x, y, self.weight, self.eps, self.zero_centered)
    s = x + y
    return s, self(s)


if __name__ == "__main__":
    norms.RMSNorm.add = add
    sys.exit(main(["profile", *sys.argv[1:]]))
