"""Benchmarks that time hybridlm's kernels against the reference and peers (``hybridlm bench``).

``kernels`` (the suite), ``check`` (correctness gate), ``timing`` (do_bench, CUDA graphs, FLOP and
byte conventions), ``report`` (tables, JSON rows, markdown for benchmarks/RESULTS.md).
"""


def load_source(path: str, name: str):
    """A module from a Python file by path: another commit's kernel file, timed beside the current
    one (``git show REV:src/hybridlm/ops/triton/decode.py > /tmp/old.py``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def add_kernel_arguments(p) -> None:
    """Options of the kernel suite, shared by ``hybridlm bench kernels`` and benchmarks/kernels.py
    (here, away from torch, so ``hybridlm --help`` stays fast)."""
    p.add_argument("--quick", action="store_true", help="a fast subset of the shapes")
    p.add_argument("--json", metavar="PATH", help="write every row (and the checks) as JSON")
    p.add_argument("--results", metavar="PATH", help="append a dated markdown section, e.g. benchmarks/RESULTS.md")
    p.add_argument("--out", metavar="DIR", help="also write kernels.json and kernels.md into DIR")
    p.add_argument("--max-minutes", type=float, default=6.0,
                   help="skip the sections not started after this many minutes (default: %(default)s)")
    p.add_argument("--no-peers", action="store_true", help="skip flash-linear-attention even when importable")
    p.add_argument("--sections", default="decode,chunk,long", metavar="LIST",
                   help="comma-separated subset of decode (decode steps), chunk (fwd, fwd+bwd vs SDPA), long "
                        "(fwd at B = 1 up to T = 1M) (default: all)")
