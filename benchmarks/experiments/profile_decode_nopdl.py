"""``hybridlm profile`` with the Gated DeltaNet decode kernel alone launched without programmatic
dependent launch (every other decode kernel keeps it).

In a CUDA graph of consecutive steps of that kernel alone, PDL costs it 1 us at batch 1 (4.32 against
3.30 us, 12-04 session, ``decode_pdl_small.py``) and wins 2-4% from batch 8; in the whole batch-1
step PDL won overall. This times the step with the kernel's launch as without PDL, to see whether
it should switch by batch:

    python benchmarks/experiments/profile_decode_nopdl.py --preset qwen3-next-80b-a3b --experts 32 \\
        --no-twin --contexts 4k --batch 1 --compile --json
"""

import sys

from hybridlm.cli import main
from hybridlm.ops.triton import decode


def plain_launch(device, kernel=None):
    """``pdl_launch`` for a kernel that neither waits for its predecessor nor lets its successor start early."""
    return dict(USE_PDL=False)


if __name__ == "__main__":
    decode.pdl_launch = plain_launch
    sys.exit(main(["profile", *sys.argv[1:]]))
