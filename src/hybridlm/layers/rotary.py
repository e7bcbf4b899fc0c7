"""Rotary position embedding on the first ``rotary_dim`` channels of each head (partial rotary).

Channels are rotated in two halves (x1 = first rotary_dim/2, x2 = the next rotary_dim/2), the
"rotate_half" layout of Llama / Qwen checkpoints. Positions come explicitly per row, so a
left-padded row is rotated exactly as it would be alone.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Rotate the first ``rotary_dim`` channels of q or k by position-dependent angles.

    Args:
        rotary_dim: rotated channels per head (even, may be 0: then the input is returned).
        theta: base of the frequencies, inv_freq_i = theta ** (-2i / rotary_dim).

    Example::

        rope = RotaryEmbedding(4, 10_000.0)
        pos = torch.arange(5)[None]                       # [1, 5]
        q = rope(torch.randn(1, 5, 2, 16), pos)           # [1, 5, 2, 16]
    """

    def __init__(self, rotary_dim: int, theta: float) -> None:
        super().__init__()
        if rotary_dim % 2:
            raise ValueError(f"rotary_dim: expected an even number, got {rotary_dim}")
        self.rotary_dim = rotary_dim
        self.theta = theta

    def inv_freq(self, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The frequencies [rotary_dim / 2] of the rotated channel pairs, theta ** (-2i / rotary_dim)."""
        exponent = torch.arange(0, self.rotary_dim, 2, device=device, dtype=dtype) / self.rotary_dim
        return self.theta ** -exponent

    def forward(self, x_BTHD: torch.Tensor, pos_BT: torch.Tensor) -> torch.Tensor:
        """x_BTHD: [B, T, H, D] float; pos_BT: [B, T] integer positions (>= 0) -> [B, T, H, D]."""
        r = self.rotary_dim
        if r == 0:
            return x_BTHD
        # Angles in float32 (float64 for float64 inputs), never in bf16: position * frequency
        # needs the mantissa. Frequencies are computed here, not stored, so a model built on the
        # meta device has no buffers to fill in later.
        ct = torch.float64 if x_BTHD.dtype == torch.float64 else torch.float32
        angle_BTF = pos_BT.to(ct)[..., None] * self.inv_freq(x_BTHD.device, ct)
        cos = angle_BTF.cos()[:, :, None, :]
        sin = angle_BTF.sin()[:, :, None, :]
        x_rot = x_BTHD[..., :r].to(ct)
        x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2 :]
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return torch.cat([rotated.to(x_BTHD.dtype), x_BTHD[..., r:]], dim=-1)
