"""SwiGLU MLP: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from hybridlm.layers.packing import pack_weights, packed_linears


class SwiGLU(nn.Module):
    """The gated MLP of Llama / Qwen.

    Args:
        hidden_size: D, input and output width.
        intermediate_size: I, the inner width.
        pack: at inference run gate and up as one product over their stacked weights
            (``hybridlm.layers.packing``); MoE's routed experts set it False (MoE stacks them).

    Example::

        mlp = SwiGLU(64, 128)
        y = mlp(torch.randn(2, 5, 64))   # [2, 5, 64]
    """

    def __init__(self, hidden_size: int, intermediate_size: int, pack: bool = True) -> None:
        super().__init__()
        # pack=False: a routed expert, whose weights MoE stacks with the other experts' instead
        self.pack = pack
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., D] -> [..., D], same dtype."""
        if not self.pack:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        # gate and up as one product at inference (hybridlm.layers.packing)
        gate, up = packed_linears(self, (("gate_proj",), ("up_proj",)), x)
        return self.down_proj(F.silu(gate) * up)

    def pack_for_inference(self) -> None:
        """Stack gate and up's weights now (a decoder does this before tracing or capture)."""
        if self.pack:
            pack_weights(self, ("gate_proj", "up_proj"))
