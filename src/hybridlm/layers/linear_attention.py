"""Linear attention with a feature map (letter X): o_t = phi(q_t)^T S_t, S_t = S_{t-1} + phi(k_t) v_t^T.

The layer applies phi itself (and passes feature_map="identity" to the op) so that it can zero
phi(k) at padded tokens: with the normaliser, z = sum phi(k) would otherwise count them.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from hybridlm.cache import RecurrentSlot
from hybridlm.config import HybridConfig
from hybridlm.layers.packing import project
from hybridlm.layers.step import Tokens
from hybridlm.ops import linear_attention, linear_attention_step

_PHI = {"identity": lambda x: x, "elu": lambda x: F.elu(x) + 1, "relu": F.relu}


class LinearAttention(nn.Module):
    """q, k (H heads of K), v (HV heads of V) projections, phi on q and k, linear attention, output projection.

    Args:
        config: uses hidden_size, linear_num_key_heads (H), linear_num_value_heads (HV),
            linear_key_head_dim (K), linear_value_head_dim (V), linear_feature_map,
            linear_normalize, chunk_size. No short conv.

    Example::

        layer = LinearAttention(HybridConfig(layer_pattern="X"))
        y = layer(torch.randn(2, 9, 64), Tokens(torch.arange(9).expand(2, 9), None))  # [2, 9, 64]
    """

    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads, self.num_v_heads = config.linear_num_key_heads, config.linear_num_value_heads
        self.key_dim, self.value_dim = config.linear_key_head_dim, config.linear_value_head_dim
        self.phi = _PHI[config.linear_feature_map]
        self.normalize = config.linear_normalize
        self.chunk_size = config.chunk_size
        self.q_proj = nn.Linear(d, self.num_heads * self.key_dim, bias=False)
        self.k_proj = nn.Linear(d, self.num_heads * self.key_dim, bias=False)
        self.v_proj = nn.Linear(d, self.num_v_heads * self.value_dim, bias=False)
        self.o_proj = nn.Linear(self.num_v_heads * self.value_dim, d, bias=False)

    def forward(self, x_BTD: torch.Tensor, tokens: Tokens, slot: RecurrentSlot | None = None) -> torch.Tensor:
        """x_BTD: [B, T, hidden] float; tokens: positions/padding; slot: this layer's state or None.

        Returns [B, T, hidden] in x's dtype; with a slot its state is updated in place
        (T == 1: the step op, T > 1: the chunked op).
        """
        B, T, _ = x_BTD.shape
        q = self.phi(self.q_proj(x_BTD).view(B, T, self.num_heads, self.key_dim))
        k = tokens.zero_pads(self.phi(self.k_proj(x_BTD).view(B, T, self.num_heads, self.key_dim)))
        v = tokens.zero_pads(self.v_proj(x_BTD).view(B, T, self.num_v_heads, self.value_dim))
        kw = dict(feature_map="identity", normalize=self.normalize)
        if slot is not None and T == 1:
            o, state = linear_attention_step(q[:, 0], k[:, 0], v[:, 0], slot.state.float(), **kw)
            o = o[:, None]
        else:
            o, state = linear_attention(q, k, v, initial_state=None if slot is None else slot.state.float(),
                                        output_final_state=slot is not None, chunk_size=self.chunk_size, **kw)
        if slot is not None:
            slot.state.copy_(state)
        return project(self.o_proj, o.reshape(B, T, -1))
