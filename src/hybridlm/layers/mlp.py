"""SwiGLU MLP: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from hybridlm.layers.packing import PacksWeights, pack_groups, packed_linears


class SwiGLU(PacksWeights):
    """The gated MLP of Llama / Qwen.

    Args:
        hidden_size: D, input and output width.
        intermediate_size: I, the inner width.
        pack: ``pack_for_inference`` stacks gate and up for one product (``hybridlm.layers.packing``);
            MoE's routed experts set it False (MoE stacks them with the other experts' instead).

    Example::

        mlp = SwiGLU(64, 128)
        y = mlp(torch.randn(2, 5, 64))   # [2, 5, 64]
    """

    _IN_GROUPS = (("gate_proj",), ("up_proj",))

    def __init__(self, hidden_size: int, intermediate_size: int, pack: bool = True) -> None:
        super().__init__()
        self.pack = pack
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., D] -> [..., D], same dtype."""
        # gate and up as one product once packed (hybridlm.layers.packing)
        gate, up = packed_linears(self, self._IN_GROUPS, x)
        return self.down_proj(F.silu(gate) * up)

    def pack_for_inference(self) -> None:
        """Stack gate and up's weights now (a decoder does this before tracing or capture)."""
        if self.pack:
            pack_groups(self, self._IN_GROUPS)
