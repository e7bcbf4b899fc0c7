"""RMSNorm and the gated RMSNorm of Gated DeltaNet's output.

Both compute in at least float32 (the mean of squares of bf16 activations loses too many bits;
float64 stays float64) and return the input dtype.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from hybridlm.layers.packing import norm_project_for
from hybridlm.ops._checks import inference_kernel, pdl_on
from hybridlm.ops._inductor import fallbacks_registered


class RMSNorm(nn.Module):
    """y = x / rms(x) * w over the last dimension.

    ``zero_centered=True`` stores the weight as an offset from one, y = x_hat * (1 + w), as
    Qwen3-Next does (weight decay then pulls the scale toward 1, not 0).

    Args:
        dim: size of the normalised (last) dimension.
        eps: added to the mean of squares.
        zero_centered: weight parameterisation (see above).

    Example::

        norm = RMSNorm(64)
        y = norm(torch.randn(2, 5, 64))   # [2, 5, 64]
    """

    def __init__(self, dim: int, eps: float = 1e-6, zero_centered: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.zero_centered = zero_centered
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centered else torch.ones(dim))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(0.0 if self.zero_centered else 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., dim], any float dtype -> [..., dim] in x's dtype.

        On CUDA, with no gradient needed and outside torch.compile (which fuses these ops itself),
        one Triton pass (``ops.triton.rms_norm_rows``, same float32 arithmetic) replaces the ~ten
        kernels below."""
        kernel = inference_kernel("rms_norm_rows", x, self.weight)
        if kernel is not None:
            return kernel(x, self.weight, self.eps, self.zero_centered)
        ct = torch.promote_types(x.dtype, torch.float32)
        x32 = x.to(ct)
        x_hat = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        w = self.weight.to(ct)
        scale = 1.0 + w if self.zero_centered else w
        return (x_hat * scale).to(x.dtype)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, self(s)) for s = x + y (x and y of one shape and dtype): a residual add and this norm.

        Where the decode kernels launch with programmatic dependent launch (``ops.triton.utils.pdl``,
        on Hopper and later unless HYBRIDLM_PDL=0), on CUDA without gradients: one Triton pass
        (``ops.triton.add_rms_norm_rows``), which keeps the chain of PDL kernels unbroken. Elsewhere
        ``x + y`` and this module's forward, which inductor fuses into one kernel. s equals ``x + y``
        either way.

        Under torch.compile the kernel is its two-output custom op only once
        ``ops.register_inductor_fallbacks()`` has run (``StaticDecoder(compile=True)`` runs it): up to
        torch 2.11 inductor's implicit fallback formats every argument's IR as text for a log line,
        and the residual stream's IR nests every layer before it (the 48-layer step was still
        compiling after 200 s on an H200; ``ops/_inductor.py``). Registered, the compiled 4k batch-1
        step read 329.6 tokens/s against 319.0 with inductor's add + norm (2026-12-04, RESULTS.md)."""
        compiling = torch.compiler.is_compiling()
        kernel = None if not _pdl(x) or (compiling and not fallbacks_registered()) else \
            inference_kernel("add_rms_norm_rows", x, self.weight, y, traced=True)
        if kernel is not None and y.shape == x.shape and y.dtype == x.dtype:
            return kernel(x, y, self.weight, self.eps, self.zero_centered)
        s = x + y
        return s, self(s)

    def project(self, x: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(s, self(s), self(s) @ weight.T) for s = x + y (s is x when y is None) in one kernel, or None
        where that kernel does not apply: a decode step's residual add, its input norm and the layer's
        stacked input product (``weight``, ``packing.input_stack``) at batch 1, where the decode kernels
        launch with PDL (``packing.norm_project_for``; HYBRIDLM_NORM_FUSED=0 turns it off). The norm
        then costs no kernel of its own: every program of the product computes it
        (``ops.triton.add_rms_norm_linear``). s and the norm are what ``add`` / ``forward`` return, but
        for the mean of squares' summation order.
        """
        if weight is None or (y is not None and (y.shape != x.shape or y.dtype != x.dtype)):
            return None
        if torch.compiler.is_compiling() and not fallbacks_registered():
            return None  # as in ``add``: inductor's implicit fallback would format the residual stream's IR
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, y, self.weight, weight)):
            return None
        kernel = norm_project_for(x, weight)
        if kernel is None:
            return None
        return kernel(x, y, self.weight, self.eps, self.zero_centered, weight)


def _pdl(x: torch.Tensor) -> bool:
    return pdl_on(x.device)


class GatedRMSNorm(nn.Module):
    """Per-head RMSNorm of o, multiplied by SiLU(z) (Gated DeltaNet's output gate) or sigmoid(z) (Kimi's).

    The weight is shared across heads (one value per channel of a head), as in Qwen3-Next.

    Args:
        head_dim: channels per head (the normalised dimension).
        eps: added to the mean of squares.
        gate: "silu" (Qwen3-Next) or "sigmoid" (Kimi delta attention).
    """

    def __init__(self, head_dim: int, eps: float = 1e-6, gate: str = "silu") -> None:
        super().__init__()
        if gate not in ("silu", "sigmoid"):
            raise ValueError(f"gate: expected 'silu' or 'sigmoid', got {gate!r}")
        self.eps = eps
        self.gate = F.silu if gate == "silu" else torch.sigmoid
        self.weight = nn.Parameter(torch.ones(head_dim))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)

    def forward(self, o: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """o, z: [..., head_dim] (same shape, any float dtype) -> [..., head_dim] in o's dtype.
        On CUDA without gradients: one Triton pass, as RMSNorm; under torch.compile too, as a custom
        op (inductor's code for it was a reduction and a pointwise kernel per layer and decode step)."""
        kernel = inference_kernel("rms_norm_rows", o, self.weight, z, traced=True)
        if kernel is not None:
            return kernel(o, self.weight, self.eps, z=z, gate="silu" if self.gate is F.silu else "sigmoid")
        ct = torch.promote_types(o.dtype, torch.float32)
        o32 = o.to(ct)
        o_hat = o32 * torch.rsqrt(o32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (o_hat * self.weight.to(ct) * self.gate(z.to(ct))).to(o.dtype)
