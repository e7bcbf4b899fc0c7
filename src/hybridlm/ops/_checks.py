"""Input checks and input preparation shared by every op (and by the Triton wrappers).

Checks raise ``TypeError`` for a wrong type or dtype and ``ValueError`` for a wrong shape or value,
and every message names the argument and what was expected. Checks that read tensor values
(and so synchronise with the device) run only where the caller asks for them (``check_inputs``),
except for ``cu_seqlens``, whose boundaries the reference needs on the host anyway.
"""

from __future__ import annotations

import math
import os

import torch

BACKENDS = ("auto", "reference", "triton")
L2NORM_EPS = 1e-6


# --------------------------------------------------------------------------- scalar arguments
def env_switch(name: str, off: str, on: str, default: bool = False) -> bool:
    """An environment switch: True for NAME=1, False for NAME=0, ``default`` when unset (opt-in unless
    told); anything else raises, saying what each value does (``off`` / ``on``) and which is the default."""
    value = os.environ.get(name, "1" if default else "0")
    if value not in ("0", "1"):
        first, second = (f" ({off})", f" ({on}, the default)") if default else (f" ({off}, the default)", f" ({on})")
        raise ValueError(f"{name} must be 0{first} or 1{second}, got {value!r}")
    return value == "1"


def check_backend(backend, allowed=BACKENDS) -> None:
    if backend not in allowed:
        raise ValueError(f"backend must be one of {allowed}, got {backend!r}")


def check_chunk_size(chunk_size) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size < 1 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a positive power of two, got {chunk_size}")


def check_scale(scale) -> None:
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


# --------------------------------------------------------------------------- tensors
def check_float_tensor(name: str, x, ndim: int, layout: str) -> None:
    """x must be a floating-point tensor of rank ``ndim``; ``layout`` (e.g. "[B, T, H, K]") goes in messages."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(x.shape)}")


def check_same(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor, dtype: bool = True) -> None:
    """x must live on ref's device (and, with ``dtype``, have ref's dtype)."""
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}), got {x.device}")
    if dtype and x.dtype != ref.dtype:
        raise TypeError(f"{name} must have the same dtype as {ref_name} ({ref.dtype}), got {x.dtype}")



def check_attention_qkv(q, k, v) -> tuple[int, int, int, int]:
    """Softmax-attention operands: q [B, T, H, D], k [B, S, HKV, D], v [B, S, HKV, Dv], one float
    dtype and device, H a multiple of HKV. Returns (B, T, H, D)."""
    check_float_tensor("q", q, 4, "[B, T, H, D]")
    check_float_tensor("k", k, 4, "[B, S, HKV, D]")
    check_float_tensor("v", v, 4, "[B, S, HKV, Dv]")
    check_same("k", k, "q", q)
    check_same("v", v, "q", q)
    B, T, H, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k must be [B, S, HKV, D] with B = {B}, D = {D} as in q, got {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must match k in [B, S, HKV] = {tuple(k.shape[:3])}, got {tuple(v.shape)}")
    if H % k.shape[2]:
        raise ValueError(f"k must have a number of heads HKV dividing q's H = {H}, got HKV = {k.shape[2]}")
    return B, T, H, D

def check_dim(name: str, x: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if x.shape[dim] != expected:
        raise ValueError(f"{name} must have {what} = {expected} in dim {dim}, got shape {tuple(x.shape)}")


def check_qkv(q, k, v, token_axis: bool = True) -> tuple[int, int, int, int, int]:
    """Check q, k [B, T, H, K] and v [B, T, HV, V] (without the T axis when ``token_axis`` is False).

    Returns (B, H, K, HV, V).
    """
    nd = 4 if token_axis else 3
    qk_layout, v_layout = ("[B, T, H, K]", "[B, T, HV, V]") if token_axis else ("[B, H, K]", "[B, HV, V]")
    check_float_tensor("q", q, nd, qk_layout)
    check_float_tensor("k", k, nd, qk_layout)
    check_float_tensor("v", v, nd, v_layout)
    check_same("k", k, "q", q)
    check_same("v", v, "q", q)
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    lead = q.shape[:-2]
    if v.shape[:-2] != lead:
        names = "batch and token" if token_axis else "batch"
        raise ValueError(f"v must match q in the {names} dims {tuple(lead)}, got shape {tuple(v.shape)}")
    if token_axis and q.shape[1] < 1:
        raise ValueError(f"q must hold at least one token (T >= 1), got shape {tuple(q.shape)}")
    H, K = q.shape[-2:]
    HV, V = v.shape[-2:]
    if HV % H:
        raise ValueError(f"v must have a number of heads HV that is a multiple of q's H = {H}, got HV = {HV}")
    return q.shape[0], H, K, HV, V


def check_gate(name: str, x, shape: tuple, layout: str, ref: torch.Tensor) -> None:
    """Per-token, per-value-head gate (g or beta); any float dtype, on ref's device."""
    check_float_tensor(name, x, len(shape), layout)
    check_same(name, x, "q", ref, dtype=False)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {layout} = {tuple(shape)}, got {tuple(x.shape)}")


def check_fused_gate(A_log, dt_bias, g, num_v_heads: int, ref: torch.Tensor) -> None:
    """A_log and dt_bias (the fused gate g = -exp(A_log) softplus(g + dt_bias)): both or neither, each
    a float [HV] tensor on ref's device, and then g (the raw gate input) must be given."""
    if A_log is None and dt_bias is None:
        return
    if A_log is None or dt_bias is None:
        raise ValueError("A_log and dt_bias must be given together (the fused gate) or both left None")
    if g is None:
        raise ValueError("g must be given with A_log and dt_bias: it is the raw gate input a")
    for name, x in (("A_log", A_log), ("dt_bias", dt_bias)):
        check_float_tensor(name, x, 1, "[HV]")
        check_same(name, x, "q", ref, dtype=False)
        if x.shape[0] != num_v_heads:
            raise ValueError(f"{name} must have shape [HV] = ({num_v_heads},), got {tuple(x.shape)}")


def fused_gate(a: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """Qwen3-Next's log-decay from the raw gate input: -exp(A_log) * softplus(a + dt_bias), in float32
    (float64 stays float64)."""
    a = a.to(torch.promote_types(a.dtype, torch.float32))
    return -A_log.to(a.dtype).exp() * torch.nn.functional.softplus(a + dt_bias.to(a.dtype))


def check_state(name: str, state, shape: tuple, ref: torch.Tensor) -> None:
    check_float_tensor(name, state, 4, "[B, HV, K, V]")
    check_same(name, state, "q", ref, dtype=False)
    if tuple(state.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(state.shape)}")


def check_cu_seqlens(cu_seqlens, B: int, T: int, values: bool = True) -> list[int] | None:
    """Validate packed-sequence boundaries; returns them as a host list (or None).

    values=False checks type, dtype, shape and B only and returns None: reading the values is a
    host sync that ``torch.compile(fullgraph=True)`` cannot trace, so a custom op that is traced
    checks them inside its eager implementation instead."""
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor of int32/int64, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must have dtype int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D [N + 1] with N >= 1 sequences, got shape {tuple(cu_seqlens.shape)}")
    if B != 1:
        raise ValueError(f"with cu_seqlens the batch size B must be 1 (sequences packed along T), got B = {B}")
    if not values:
        return None
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
    if any(b <= a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"cu_seqlens must be strictly increasing (no empty sequence), got {bounds}")
    if bounds[-1] != T:
        raise ValueError(f"cu_seqlens must end at the token count T = {T}, got {bounds[-1]}")
    return bounds



def check_sequences_and_state(cu_seqlens, initial_state, B: int, T: int, state_tail: tuple, ref):
    """Check ``cu_seqlens`` (packed sequences along T, B == 1) and ``initial_state`` against the
    state shape [B or N, *state_tail]. Returns (sequence bounds or None, the state shape)."""
    bounds = check_cu_seqlens(cu_seqlens, B, T)
    state_shape = (B if bounds is None else len(bounds) - 1, *state_tail)
    if initial_state is not None:
        check_state("initial_state", initial_state, state_shape, ref)
    return bounds, state_shape

def check_value_ranges(g, beta) -> None:
    """g <= 0 and 0 <= beta <= 1 (reads the values: a device sync)."""
    if g is not None and not bool((g <= 0).all()):
        raise ValueError(f"g must be a log-decay <= 0 everywhere, got max {g.max().item():.4g}")
    if beta is not None and not bool(((beta >= 0) & (beta <= 1)).all()):
        raise ValueError(f"beta must lie in [0, 1], got range [{beta.min().item():.4g}, {beta.max().item():.4g}]")


# --------------------------------------------------------------------------- preparation
def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 inputs stay float64; everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(sum x^2 + eps) over the last dim (eps inside the root, as Qwen3-Next's checkpoints expect)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2NORM_EPS)


def heads_first(x_BTHD: torch.Tensor, HV: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, H, D] -> contiguous [B, HV, T, D] in ``dtype``; q/k head h serves value heads h*r .. h*r + r - 1.

    Also takes per-head gates [B, T, H] -> [B, HV, T]. Contiguous because every chunk matmul would
    otherwise copy its strided operands again (15% of the chunked form's time on a CPU).
    """
    r = HV // x_BTHD.shape[2]
    if r > 1:
        x_BTHD = x_BTHD.repeat_interleave(r, dim=2)
    return x_BTHD.transpose(1, 2).to(dtype).contiguous()


def run_per_sequence(core, tensors_BHT: list, state0: torch.Tensor, bounds: list[int] | None):
    """Run ``core(*tensors, state) -> (o, state)`` on each packed sequence of the T axis (dim 2).

    Without ``bounds`` the whole batch goes through at once. With them, every sequence starts from
    its own row of ``state0`` (so no chunk ever crosses a sequence boundary) and the final states
    come back stacked as [N, ...].
    """
    if bounds is None:
        return core(*tensors_BHT, state0)
    outs, states = [], []
    for i, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
        o, s = core(*(x[:, :, bos:eos] for x in tensors_BHT), state0[i : i + 1])
        outs.append(o)
        states.append(s)
    return torch.cat(outs, 2), torch.cat(states, 0)


def pdl_on(device: torch.device) -> bool:
    """Whether the decode kernels launch with programmatic dependent launch on ``device``
    (``hybridlm.ops.triton.utils.pdl``: Hopper and later unless HYBRIDLM_PDL=0); False without triton."""
    if device.type != "cuda":
        return False
    try:
        from hybridlm.ops.triton.utils import pdl
    except ImportError:  # no triton: no kernels, no PDL
        return False
    return pdl(device)


def pdl_order() -> str | None:
    """The order of a PDL kernel's trigger and wait (``hybridlm.ops.triton.utils.PDL_ORDER``, set by
    HYBRIDLM_PDL_ORDER), or None without triton."""
    try:
        from hybridlm.ops.triton.utils import PDL_ORDER
    except ImportError:
        return None
    return PDL_ORDER


def _kernel_runs_on(x: torch.Tensor) -> bool:
    """Triton kernels run on CUDA tensors, and on CPU ones only under Triton's interpreter."""
    return (isinstance(x, torch.Tensor) and x.is_cuda) or os.environ.get("TRITON_INTERPRET") == "1"


def check_kernel_device(name: str, x: torch.Tensor) -> None:
    """Say that x cannot reach a Triton kernel (``_kernel_runs_on``) before a launch fails inside Triton."""
    if not _kernel_runs_on(x):
        raise ValueError(f"{name} must be a CUDA tensor for the Triton kernel, got one on {x.device} "
                         "(use backend='reference', or set TRITON_INTERPRET=1 to interpret the kernel on CPU)")


def inference_kernel(name: str, x: torch.Tensor, *others: torch.Tensor | None, traced: bool = False):
    """``load_kernel(name, "auto", x)`` for a layer's inference-only Triton path: only for CUDA
    tensors, outside torch.compile (which fuses the layer's PyTorch ops itself) unless ``traced``
    (the kernel is a custom op there), and when no gradient is needed through x or ``others``
    (weights, gates; None skipped); else None."""
    if not x.is_cuda or (torch.compiler.is_compiling() and not traced):
        return None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *others)):
        return None
    return load_kernel(name, "auto", x)


def load_kernel(name: str, backend: str, x: torch.Tensor):
    """The Triton entry point ``name`` when ``backend`` asks for it and it can run on x, else None.

    "auto" takes the kernel only for CUDA tensors of a dtype the kernels compute in (not float64)
    and when ``hybridlm.ops.triton`` imports and provides ``name``; "triton" raises RuntimeError
    saying why when it cannot.
    """
    on_cuda = isinstance(x, torch.Tensor) and x.is_cuda
    if backend == "reference" or (backend == "auto" and (not on_cuda or x.dtype == torch.float64)):
        return None
    try:
        from hybridlm.ops import triton as kernels
        fn = getattr(kernels, name, None)
        reason = None if fn is not None else f"hybridlm.ops.triton provides no {name}"
    except ImportError as exc:  # triton missing, or the kernels package failed to import
        fn, reason = None, f"hybridlm.ops.triton does not import ({exc})"
    if fn is not None and not _kernel_runs_on(x):
        fn, reason = None, "the tensors are not on a CUDA device and TRITON_INTERPRET=1 is not set"
    if fn is None and backend == "triton":
        raise RuntimeError(f"backend='triton' is unavailable: {reason}; use backend='reference' or 'auto'")
    return fn
