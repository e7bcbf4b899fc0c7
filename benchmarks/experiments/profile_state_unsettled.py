"""``hybridlm profile`` with the Gated DeltaNet decode kernel reading its state after the PDL wait, as
before ``state_settled`` (the static decode step passes it: each kernel reads its state before waiting
for its predecessor). The A/B of that change in the whole step:

    python benchmarks/experiments/profile_state_unsettled.py --preset qwen3-next-80b-a3b --experts 32 \\
        --no-twin --contexts 4k --batch 1 --compile --json
"""

import sys

from hybridlm.cli import main
from hybridlm.ops.triton import decode

_decode_into = decode.decode_into


def decode_into_unsettled(*args, **kwargs):
    """``decode_into`` with ``state_early`` forced off."""
    kwargs["state_early"] = False
    return _decode_into(*args, **kwargs)


if __name__ == "__main__":
    decode.decode_into = decode_into_unsettled
    sys.exit(main(["profile", *sys.argv[1:]]))
