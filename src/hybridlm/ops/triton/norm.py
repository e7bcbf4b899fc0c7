"""RMSNorm (and the gated RMSNorm of Gated DeltaNet's output) as one Triton pass over the rows
(inference on the GPU).

``layers.norms.RMSNorm`` computes in float32 as y = (x * rsqrt(mean(x^2) + eps)) * w (w + 1 when
zero-centred) and rounds once to x's dtype: about ten PyTorch kernels (cast, square, mean, add,
rsqrt, two products, the weight's cast and offset, the cast back) per norm, and three or four norms
per layer. In a prefill, where the host launches every kernel one by one (the 4-layer H200 trace of
a 4k prefill: 33 ms of wall time for 15.9 ms of kernels), that is launches more than bytes. This
kernel reads and writes each row once, with the same float32 arithmetic in the same order (only the
mean of squares sums in another order).

``add_rms_norm_rows`` is a block's residual add and the next norm in one pass (s = x + y rounded to
x's dtype, as ``x + y`` is, then the norm of s): the static decode step's two per layer, which were
inductor's fused reduction kernels (launched without programmatic dependent launch, so each one
also ended the overlap of the PDL kernels around it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybridlm.ops.triton.utils import cdiv, next_power_of_2, pdl_launch, pdl_start


@triton.jit
def rms_norm_kernel(x_ptr, w_ptr, z_ptr, y_ptr, r_ptr, s_ptr, n_rows, D, eps, ZH, s_zt, BD: tl.constexpr,
                    BR: tl.constexpr, ZERO_CENTERED: tl.constexpr, GATE: tl.constexpr, RESIDUAL: tl.constexpr,
                    USE_PDL: tl.constexpr):
    pdl_start(USE_PDL)
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    m = (o_r < n_rows)[:, None] & m_d[None, :]
    o_r64 = o_r.to(tl.int64)
    p = o_r64[:, None] * D + o_d[None, :]
    x = tl.load(x_ptr + p, mask=m, other=0.0)
    if RESIDUAL:  # s = x + residual in x's dtype (rounded as PyTorch's x + y is), stored; then its norm
        x = (x.to(tl.float32) + tl.load(r_ptr + p, mask=m, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(s_ptr + p, x, mask=m)
    x = x.to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, 1) / D + eps)
    w = tl.load(w_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)
    if ZERO_CENTERED:
        w = 1.0 + w
    y = (x * r[:, None]) * w[None, :]
    if GATE != 0:  # 1: y * silu(z) (Gated DeltaNet's output gate), 2: y * sigmoid(z) (Kimi's)
        # z's rows: ZH to a token, packed, tokens s_zt apart (a column slice of a wider projection
        # output is read in place)
        p_z = (o_r64 // ZH)[:, None] * s_zt + (o_r64 % ZH)[:, None] * D + o_d[None, :]
        z = tl.load(z_ptr + p_z, mask=m, other=0.0).to(tl.float32)
        y = y * (z * tl.sigmoid(z) if GATE == 1 else tl.sigmoid(z))
    tl.store(y_ptr + p, y.to(y_ptr.dtype.element_ty), mask=m)


_GATES = {None: 0, "silu": 1, "sigmoid": 2}


def rms_norm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool = False,
                  z: torch.Tensor | None = None, gate: str | None = None) -> torch.Tensor:
    """RMSNorm of x's rows (last dimension D) by ``weight`` [D], computed in float32, in x's dtype.

    Args:
        x: [..., D] float32, bfloat16 or float16 (made contiguous if it is not).
        weight: [D], any float dtype; with ``zero_centered`` the scale is 1 + weight.
        eps: added to the mean of squares.
        z, gate: the gated norm (``layers.norms.GatedRMSNorm``): the result times silu(z) or
            sigmoid(z), z of x's shape, any float dtype; read in place when each token's rows are
            packed (a column slice of a projection output), else copied. Traced by torch.compile,
            the gated norm is one custom op (``hybridlm::gated_rms_norm_rows``).
    Returns:
        a new [..., D] tensor in x's dtype. No gradient: the layers run this only when none is needed.
    """
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"weight must have shape ({D},) to match x's last dimension, got {tuple(weight.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"x must be float32, bfloat16 or float16 for the Triton kernel, got {x.dtype}")
    if gate not in _GATES:
        raise ValueError(f"gate must be 'silu', 'sigmoid' or None, got {gate!r}")
    if (z is None) != (gate is None):
        raise ValueError("z and gate go together: give both for the gated norm, or neither")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
    x = x.contiguous()
    weight = weight.contiguous()
    if torch.compiler.is_compiling() and z is not None:
        # traced (the compiled decode step's gated norm): one opaque kernel, where inductor's code
        # for the layer's ops was a reduction and a pointwise kernel a layer
        return _gated_norm_op(x, weight, float(eps), bool(zero_centered), z, _GATES[gate])
    return _norm_into(x, weight, eps, zero_centered, z, _GATES[gate])


def add_rms_norm_rows(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float,
                      zero_centered: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, RMSNorm(s)) for s = x + y: a residual add and the norm after it in one pass.

    Args:
        x: [..., D] float32, bfloat16 or float16 (the residual stream).
        y: x's shape and dtype (the branch output added to it).
        weight, eps, zero_centered: as :func:`rms_norm_rows`.
    Returns:
        s = x + y in x's dtype (rounded once, as ``x + y``) and its norm, both new [..., D] tensors.
        Traced by torch.compile it is one custom op (``hybridlm::add_rms_norm_rows``).
    """
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"weight must have shape ({D},) to match x's last dimension, got {tuple(weight.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"x must be float32, bfloat16 or float16 for the Triton kernel, got {x.dtype}")
    if not isinstance(y, torch.Tensor) or y.shape != x.shape or y.dtype != x.dtype:
        raise ValueError(f"y must have x's shape {tuple(x.shape)} and dtype {x.dtype}, got "
                         f"{tuple(getattr(y, 'shape', ()))} {getattr(y, 'dtype', type(y).__name__)}")
    x, y, weight = x.contiguous(), y.contiguous(), weight.contiguous()
    if torch.compiler.is_compiling():
        return _add_norm_op(x, y, weight, float(eps), bool(zero_centered))
    return _add_norm_into(x, y, weight, eps, zero_centered)


def _add_norm_into(x, y, weight, eps, zero_centered):
    s = torch.empty_like(x)
    return s, _norm_into(x, weight, eps, zero_centered, None, 0, residual=y, s=s)


@torch.library.custom_op("hybridlm::add_rms_norm_rows", mutates_args=())
def _add_norm_op(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float,
                 zero_centered: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _add_norm_into(x, y, weight, eps, zero_centered)


@_add_norm_op.register_fake
def _(x, y, weight, eps, zero_centered):
    return torch.empty_like(x), torch.empty_like(x)


def _z_rows(z: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(z, heads per token, token stride) for the kernel: z [..., H, D] read in place when each
    token's H rows are packed and tokens are evenly spaced (a column slice of a projection output),
    else a contiguous copy (then one row a token)."""
    D = z.shape[-1]
    if z.dim() >= 2 and z.stride(-1) == 1 and (z.shape[-2] == 1 or z.stride(-2) == D):
        H = z.shape[-2]
        try:
            tokens = z.view(-1, H, D)
        except RuntimeError:  # the leading dims do not collapse to one stride
            tokens = None
        if tokens is not None:
            return z, H, tokens.stride(0) if tokens.shape[0] > 1 else H * D
    z = z.contiguous()
    return z, 1, D


def _norm_into(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool, z: torch.Tensor | None,
               gate: int, residual: torch.Tensor | None = None, s: torch.Tensor | None = None) -> torch.Tensor:
    """Launch on validated arguments (x, weight and residual contiguous; s x's shape, written with
    x + residual when residual is given)."""
    D = x.shape[-1]
    y = torch.empty_like(x)
    n_rows = x.numel() // D if D else 0
    if n_rows == 0:
        return y
    z, zh, s_zt = (x, 1, D) if z is None else _z_rows(z)  # z is not read without a gate
    BD = max(16, next_power_of_2(D))
    BR = max(1, min(16, 4096 // BD))  # rows per program: ~4k elements, so wide rows do not spill
    has_res = residual is not None
    rms_norm_kernel[(cdiv(n_rows, BR),)](x, weight, z, y, residual if has_res else x, s if has_res else y,
                                                n_rows, D, float(eps), zh, s_zt, BD=BD, BR=BR,
                                                ZERO_CENTERED=zero_centered, GATE=gate, RESIDUAL=has_res,
                                                num_warps=4 if BD <= 1024 else 8, **pdl_launch(x.device, "norm"))
    return y


@torch.library.custom_op("hybridlm::gated_rms_norm_rows", mutates_args=())
def _gated_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool, z: torch.Tensor,
                   gate: int) -> torch.Tensor:
    return _norm_into(x, weight, eps, zero_centered, z, gate)


@_gated_norm_op.register_fake
def _(x, weight, eps, zero_centered, z, gate):
    return torch.empty_like(x)
