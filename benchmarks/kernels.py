"""Gated delta rule kernels vs the reference, flash-linear-attention and SDPA (one GPU run).

    PYTHONPATH=src python benchmarks/kernels.py [--quick] [--json PATH] [--results benchmarks/RESULTS.md]

Same as ``hybridlm bench kernels``; the logic lives in ``hybridlm.bench.kernels`` so the installed
CLI can run it.
"""

import sys

from hybridlm.bench.kernels import main

if __name__ == "__main__":
    sys.exit(main())
