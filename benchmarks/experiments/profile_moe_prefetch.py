"""``hybridlm profile`` with the fused MoE decode kernel's preloaded down slots set (``moe_decode.FUSED_PREFETCH``:
the routed slots of a program's first down tile loaded into registers before its grid barrier). The fused
kernel runs only with HYBRIDLM_MOE_FUSED=1.

    HYBRIDLM_MOE_FUSED=1 PYTHONPATH=src python benchmarks/experiments/profile_moe_prefetch.py 4 \\
        --preset qwen3-next-80b-a3b --experts 32 --no-twin --contexts 4k --batch 1 --compile --json
"""

import sys

from hybridlm.cli import main
from hybridlm.ops.triton import moe_decode

if __name__ == "__main__":
    moe_decode.FUSED_PREFETCH = int(sys.argv[1])
    sys.exit(main(["profile", *sys.argv[2:]]))
