"""Index tables shared by the chunked kernels (where each sequence and each chunk lives in the
flattened token axis), and the decode kernels' launch option (programmatic dependent launch).

Every chunked kernel sees the tokens as one flat axis of ``B * T`` rows (a contiguous [B, T, ...]
tensor already is one). A batch of B equal sequences is then the packed case with
``cu_seqlens = [0, T, 2T, ..., BT]``, so one code path serves both, and chunks never cross a
sequence boundary because they are cut per sequence.
"""

from __future__ import annotations

import os
import re

import torch
import triton
import triton.language as tl

CHUNK = 64


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for a launch's host-side arithmetic. ``triton.cdiv`` and ``triton.next_power_of_2``
    are constexpr functions (Triton 3.6 and 3.9): from Python each call goes through a wrapper that
    unwraps its arguments, ~6 us a call on this project's CPU machine (CI's kind), and a decode launch
    made five of them (36 of the eager decode step's 54 us of host time before its launch there)."""
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for 0), as ``triton.next_power_of_2``, in plain Python for
    ints (a symbolic size under tracing goes to Triton's bit arithmetic, which it supports)."""
    if type(n) is int:
        return 1 << (n - 1).bit_length() if n > 0 else 0
    return triton.next_power_of_2(n)


def _release(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as "3.6.0" or "2.4.0rc1"."""
    found = re.match(r"(\d+)\.(\d+)", version)
    return (int(found[1]), int(found[2])) if found else (0, 0)


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's CPU interpreter cannot run these kernels with these versions, or None.

    Triton's interpreter before 3.7 converts a loop bound that depends on a program id or a
    loaded value with int() of a one-element array, which NumPy 2.4 refuses ("only 0-dimensional
    arrays can be converted to Python scalars"): every kernel here with such a loop then fails. Found
    on the device's CPU (torch 2.11, Triton 3.6) in the 12-04 session and reproduced on CPU with a
    loop bound of T - program_id * BT: Triton 3.4, 3.5 and 3.6 fail with NumPy 2.4.6 (3.6 passes with
    2.3.5); Triton 3.7, 3.8 and 3.9 pass with 2.4.6.
    """
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s CPU interpreter (TRITON_INTERPRET=1) cannot run these kernels "
                f"with NumPy {numpy_version}: it calls int() on one-element arrays, which NumPy 2.4 refuses. "
                "Install triton>=3.7 or numpy<2.4, or use backend='reference'")
    return None


if os.environ.get("TRITON_INTERPRET") == "1":
    import numpy

    _problem = interpreter_problem(triton.__version__, numpy.__version__)
    if _problem:
        raise ImportError(_problem)


def sequence_tables(B: int, T: int, bounds: list[int] | None, device: torch.device):
    """Sequence starts and per-sequence chunk offsets.

    Args:
        B, T: batch and token counts of the [B, T, ...] inputs.
        bounds: host list of packed-sequence boundaries (``cu_seqlens``, B == 1) or None.
    Returns:
        cu: int32 [N + 1] token offset of each sequence in the flat axis.
        chunk_offsets: int32 [N + 1] index of each sequence's first chunk (states are stored per chunk).
        chunk_bounds: int32 [NC, 2] first and one-past-last flat token of each chunk.
    """
    if bounds is None:
        nt = -(-T // CHUNK)
        seq = torch.arange(B + 1, device=device, dtype=torch.int32)
        cu = seq * T
        chunk_offsets = seq * nt
        b = torch.arange(B, device=device, dtype=torch.int32).repeat_interleave(nt)
        j = torch.arange(nt, device=device, dtype=torch.int32).repeat(B)
        start = b * T + j * CHUNK
        end = torch.minimum(start + CHUNK, (b + 1) * T)
        return cu, chunk_offsets, torch.stack([start, end], 1).contiguous()
    counts, chunk_rows = [0], []
    for bos, eos in zip(bounds[:-1], bounds[1:]):
        n = -(-(eos - bos) // CHUNK)
        counts.append(counts[-1] + n)
        chunk_rows += [(s, min(s + CHUNK, eos)) for s in range(bos, eos, CHUNK)]
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    chunk_offsets = torch.tensor(counts, dtype=torch.int32, device=device)
    chunk_bounds = torch.tensor(chunk_rows, dtype=torch.int32, device=device).reshape(-1, 2)
    return cu, chunk_offsets, chunk_bounds


# Programmatic dependent launch (Hopper and later): a decode kernel launched with it lets its successor
# launch before it ends (``gdc_launch_dependents``) and waits for its predecessor (``gdc_wait``) only
# before it reads anything the predecessor wrote, so consecutive kernels' launch and fill overlap.
# Every kernel of a PDL launch waits before its first read of activations and before any write, so
# the order of memory accesses is that of plain stream order.
# On by default; HYBRIDLM_PDL=0 turns it off (and with it the one-row matrix-vector kernel and the add +
# norm kernel it brings into the batch-1 step). Timed on an H200 in the seventh 12-03 session
# (benchmarks/RESULTS.md), 48-layer step, tokens/s without -> with: compiled, 4k batch 1 305.7 -> 317.1
# and 317.8 (+3.7%), 4k batch 8 1,199.8 -> 1,211.9, 128k batch 36 812.4 -> 814.2; the uncompiled graph
# (which also takes the add + norm kernel) at 4k batch 1 291.6 -> 323.3 (+10.9%); one GDN decode kernel
# at batch 32 / 64 in a graph of consecutive steps 36.54 -> 35.98 / 69.89 -> 69.38 us. The GPU tests
# passed with it (the batch-1 bf16 step against the eager decode included).
_PDL_ENV = os.environ.get("HYBRIDLM_PDL", "1")
if _PDL_ENV not in ("0", "1"):
    raise ValueError(f"HYBRIDLM_PDL must be 0 (plain launches) or 1 (programmatic dependent launch, the "
                     f"default), got {_PDL_ENV!r}")
PDL = _PDL_ENV == "1"


def pdl(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with programmatic dependent launch: CUDA devices of compute
    capability 9 or later (not the CPU interpreter), unless HYBRIDLM_PDL=0."""
    return PDL and device.type == "cuda" and _capability(device.index) >= 9


_CAPABILITY: dict = {}


def _capability(index) -> int:
    # a plain dict, not functools.lru_cache: layers ask ``pdl`` while torch.compile traces them, and
    # dynamo warns on every lru_cache-wrapped call it traces through
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)[0]
    return _CAPABILITY[index]




# The order of a PDL kernel's two statements. "trigger-first" lets the successor launch, then waits: a
# chain of such kernels can launch grid after grid ahead of the one running, each parked in its wait on
# the multiprocessors. "wait-first" waits for the predecessor, then lets the successor launch, so at
# most the next grid is launched early. HYBRIDLM_PDL_ORDER picks one (a kernel's reads of what no kernel
# writes, such as the matrix-vector kernel's first weight block, still go before the wait either way).
PDL_ORDER = os.environ.get("HYBRIDLM_PDL_ORDER", "trigger-first")
if PDL_ORDER not in ("trigger-first", "wait-first"):
    raise ValueError(f"HYBRIDLM_PDL_ORDER must be 'trigger-first' or 'wait-first', got {PDL_ORDER!r}")
PDL_WAIT_FIRST = tl.constexpr(PDL_ORDER == "wait-first")

# Decode kernels by the name ``pdl_launch`` is given. Those in PDL_WAIT_FIRST_IN take the wait-first
# order whatever PDL_ORDER says (USE_PDL = 2 instead of 1): HYBRIDLM_PDL_WAIT_FIRST, comma-separated names,
# none by default. Measured on an H100 (third 12-05 session, benchmarks/RESULTS.md): in a chain of the
# batch-1 MoE block alone (router product, routing, gate/up, down; benchmarks/experiments/moe_lookahead.py,
# 16 layers) the all-trigger-first chain took 34.1 us a layer and every mix with a wait-first kernel
# 33.5-34.0; in the compiled 48-layer step at 4k, batch 1, five choices of wait-first kernels (none, the
# routing kernel, + conv and the GDN step, + the expert kernels, every kernel but the norms and the
# matrix-vector one) all gave 271.7-273.4 tokens/s: within noise, so nothing changes by default.
PDL_KERNELS = frozenset({"route", "gate_up", "down", "moe_fused", "gemv", "norm", "qk_rope", "conv", "gdn_decode",
                         "gdn_conv_decode", "split_kv", "combine"})
_WAIT_FIRST_ENV = os.environ.get("HYBRIDLM_PDL_WAIT_FIRST", "")
PDL_WAIT_FIRST_IN = frozenset(n.strip() for n in _WAIT_FIRST_ENV.split(",") if n.strip())
if not PDL_WAIT_FIRST_IN <= PDL_KERNELS:
    raise ValueError(f"HYBRIDLM_PDL_WAIT_FIRST must name decode kernels from {sorted(PDL_KERNELS)}, comma-separated; "
                     f"got {_WAIT_FIRST_ENV!r} (unknown: {sorted(PDL_WAIT_FIRST_IN - PDL_KERNELS)})")


def pdl_launch(device: torch.device, kernel: str) -> dict:
    """Launch keyword arguments for the decode kernel ``kernel`` (a name in PDL_KERNELS), which takes a
    ``USE_PDL`` constexpr: ``dict(USE_PDL=1 or 2, launch_pdl=True)`` when ``pdl(device)`` (2: wait-first,
    the kernel is in PDL_WAIT_FIRST_IN), else ``dict(USE_PDL=0)``."""
    if kernel not in PDL_KERNELS:
        raise ValueError(f"kernel must be one of {sorted(PDL_KERNELS)}, got {kernel!r}")
    if not pdl(device):
        return dict(USE_PDL=0)
    return dict(USE_PDL=2 if kernel in PDL_WAIT_FIRST_IN else 1, launch_pdl=True)


@triton.jit
def pdl_trigger(USE_PDL: tl.constexpr):
    """A PDL kernel's first statement: in the trigger-first order, let the successor launch (nothing
    without USE_PDL or in the wait-first order, where ``pdl_wait`` triggers)."""
    if USE_PDL:
        if not PDL_WAIT_FIRST and USE_PDL != 2:
            tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    """Before a PDL kernel's first read of anything its predecessors wrote, and before its first write:
    wait for the predecessor (its writes are visible after), then, in the wait-first order, let the
    successor launch."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        if PDL_WAIT_FIRST or USE_PDL == 2:
            tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def pdl_start(USE_PDL: tl.constexpr):
    """A decode kernel's first statement: under PDL, ``pdl_trigger`` then ``pdl_wait`` (nothing
    without USE_PDL)."""
    pdl_trigger(USE_PDL)
    pdl_wait(USE_PDL)
