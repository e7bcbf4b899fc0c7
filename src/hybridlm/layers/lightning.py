"""Lightning attention as in MiniMax-01 / MiniMax-M1 (letter L).

x -> q, k (H heads of K), v (HV heads of V), each through SiLU; per value head a constant decay
exp(-slope), the slope fixed by the head and the layer's depth (``ops.lightning_slopes``);
o_t = S_t^T q_t with S_t = exp(-slope) S_{t-1} + k_t v_t^T (no 1/sqrt(K)); then one RMSNorm over all
heads together, times sigmoid(output_gate(x)), and the output projection.

The layer runs the lightning rule as linear attention with a per-token log-decay g = -slope, so that
a padded token can carry g = 0: it neither writes nor forgets (``ops.lightning_attention_chunked`` is
the same call with g = -slope everywhere).
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from hybridlm.cache import RecurrentSlot
from hybridlm.config import HybridConfig
from hybridlm.layers.norms import RMSNorm
from hybridlm.layers.packing import project
from hybridlm.layers.step import Tokens
from hybridlm.ops import lightning_slopes, linear_attention, linear_attention_step


class LightningAttention(nn.Module):
    """The linear-attention mixer of MiniMax-M1.

    Args:
        config: uses hidden_size, linear_num_key_heads (H), linear_num_value_heads (HV),
            linear_key_head_dim (K), linear_value_head_dim (V), chunk_size, rms_norm_eps, num_layers.
        layer_idx: this layer's index among all layers (the slopes shrink with depth).

    Example::

        layer = LightningAttention(HybridConfig(layer_pattern="L"), layer_idx=0)
        y = layer(torch.randn(2, 9, 64), Tokens(torch.arange(9).expand(2, 9), None))  # [2, 9, 64]
    """

    def __init__(self, config: HybridConfig, layer_idx: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads, self.num_v_heads = config.linear_num_key_heads, config.linear_num_value_heads
        self.key_dim, self.value_dim = config.linear_key_head_dim, config.linear_value_head_dim
        self.chunk_size = config.chunk_size
        self.layer_idx, self.num_layers = layer_idx, config.num_layers
        qk, vv = self.num_heads * self.key_dim, self.num_v_heads * self.value_dim
        self.q_proj = nn.Linear(d, qk, bias=False)
        self.k_proj = nn.Linear(d, qk, bias=False)
        self.v_proj = nn.Linear(d, vv, bias=False)
        self.norm = RMSNorm(vv, 1e-6)  # MiniMax fixes this eps (not rms_norm_eps)
        self.output_gate = nn.Linear(d, vv, bias=False)
        self.o_proj = nn.Linear(vv, d, bias=False)

    def slopes(self) -> torch.Tensor:
        """[HV] float32 decay rates of this layer (computed, not stored: nothing to load or to fill on meta)."""
        if self.num_layers < 2:
            return lightning_slopes(self.num_v_heads)
        return lightning_slopes(self.num_v_heads, self.layer_idx, self.num_layers)

    def forward(self, x_BTD: torch.Tensor, tokens: Tokens, slot: RecurrentSlot | None = None) -> torch.Tensor:
        """x_BTD: [B, T, hidden] float; tokens: positions/padding; slot: this layer's state or None.

        Returns [B, T, hidden] in x's dtype; with a slot its state is updated in place
        (T == 1: the step op, T > 1: the chunked op).
        """
        B, T, _ = x_BTD.shape
        H, HV, K, V = self.num_heads, self.num_v_heads, self.key_dim, self.value_dim
        q = F.silu(self.q_proj(x_BTD)).view(B, T, H, K)
        k = tokens.zero_pads(F.silu(self.k_proj(x_BTD)).view(B, T, H, K))
        v = tokens.zero_pads(F.silu(self.v_proj(x_BTD)).view(B, T, HV, V))
        ct = torch.promote_types(x_BTD.dtype, torch.float32)
        g_BTH = tokens.zero_pads(-self.slopes().to(device=x_BTD.device, dtype=ct).expand(B, T, HV))
        kw = dict(feature_map="identity", scale=1.0)
        if slot is not None and T == 1:
            o, state = linear_attention_step(q[:, 0], k[:, 0], v[:, 0], slot.state.float(), g_BTH[:, 0], **kw)
            o = o[:, None]
        else:
            o, state = linear_attention(q, k, v, g_BTH, initial_state=None if slot is None else slot.state.float(),
                                        output_final_state=slot is not None, chunk_size=self.chunk_size, **kw)
        if slot is not None:
            slot.state.copy_(state)
        o = self.norm(o.reshape(B, T, HV * V)) * torch.sigmoid(self.output_gate(x_BTD))
        return project(self.o_proj, o)
