"""SwiGLU MLP: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class SwiGLU(nn.Module):
    """The gated MLP of Llama / Qwen.

    Args:
        hidden_size: D, input and output width.
        intermediate_size: I, the inner width.

    Example::

        mlp = SwiGLU(64, 128)
        y = mlp(torch.randn(2, 5, 64))   # [2, 5, 64]
    """

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., D] -> [..., D], same dtype."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
