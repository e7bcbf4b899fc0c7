"""Multi-head latent attention as in DeepSeek-V3 / Kimi Linear (letter M).

q: x -> [q_a_proj -> RMSNorm -> q_b_proj] (low rank, when mla_q_lora_rank > 0) or q_proj, per head a
no-rope part [Dn] and a rotary part [Dr]. kv: x -> kv_a_proj_with_mqa -> (latent [R], k_rope [Dr]);
the latent goes through kv_a_layernorm and is what the cache keeps, with k_rope (one rotary key
shared by all heads). kv_b_proj [H * (Dn + Dv), R] makes the per-head keys and values from the
latents (``ops.mla_attention``; decode folds it into the query instead). Rotary applies to q_rope and
k_rope only; Kimi Linear uses none (mla_use_nope), DeepSeek pairs channels (2i, 2i + 1)
(mla_rope_interleave). Scale (Dn + Dr) ** -0.5.
"""

from __future__ import annotations

import torch
from torch import nn

from hybridlm.cache import LatentSlot
from hybridlm.config import HybridConfig
from hybridlm.layers.norms import RMSNorm
from hybridlm.layers.packing import project
from hybridlm.layers.rotary import RotaryEmbedding
from hybridlm.layers.step import Tokens
from hybridlm.ops import mla_attention


class LatentAttention(nn.Module):
    """MLA: caches a normalised latent and one rotary key per token instead of per-head K and V.

    Args:
        config: uses hidden_size, num_attention_heads (H), mla_q_lora_rank, mla_kv_lora_rank (R),
            mla_qk_nope_head_dim (Dn), mla_qk_rope_head_dim (Dr), mla_v_head_dim (Dv), mla_use_nope,
            mla_rope_interleave, rope_theta, rms_norm_eps.

    Example::

        layer = LatentAttention(HybridConfig(layer_pattern="M"))
        y = layer(torch.randn(2, 7, 64), Tokens(torch.arange(7).expand(2, 7), None))  # [2, 7, 64]
    """

    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        d, H = config.hidden_size, config.num_attention_heads
        self.num_heads = H
        self.nope_dim, self.rope_dim = config.mla_qk_nope_head_dim, config.mla_qk_rope_head_dim
        self.v_dim, self.kv_rank = config.mla_v_head_dim, config.mla_kv_lora_rank
        q_dim = H * (self.nope_dim + self.rope_dim)
        self.q_lora_rank = config.mla_q_lora_rank
        if self.q_lora_rank:
            self.q_a_proj = nn.Linear(d, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, q_dim, bias=False)
        else:
            self.q_proj = nn.Linear(d, q_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.kv_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, d, bias=False)
        self.rotary = None if config.mla_use_nope else RotaryEmbedding(self.rope_dim, config.rope_theta)
        self.interleave = config.mla_rope_interleave
        self.scale = (self.nope_dim + self.rope_dim) ** -0.5

    def forward(self, x_BTD: torch.Tensor, tokens: Tokens, slot: LatentSlot | None = None) -> torch.Tensor:
        """x_BTD: [B, T, hidden] float; tokens: positions/padding; slot: this layer's cache or None.

        Returns [B, T, hidden] in x's dtype. With a slot, the new latents and rotary keys are written to it.
        """
        B, T, _ = x_BTD.shape
        q_nope, q_rope, _ = self.queries(x_BTD, tokens)
        latent, k_rope, k_pos = self.cached_keys(x_BTD, tokens, slot)
        o_BTHV = mla_attention(q_nope, q_rope, latent, k_rope, self.kv_b_proj.weight, scale=self.scale,
                               q_pos=tokens.pos_BT, k_pos=k_pos, absorb=slot is not None and T == 1)
        return project(self.o_proj, o_BTHV.reshape(B, T, -1))

    def queries(self, x_BTD: torch.Tensor, tokens: Tokens):
        """(q_nope [B, T, H, Dn], q_rope [B, T, H, Dr] rotated, q_resid [B, T, q_lora_rank] or None)."""
        B, T, _ = x_BTD.shape
        q_resid = self.q_a_layernorm(self.q_a_proj(x_BTD)) if self.q_lora_rank else None
        q = (self.q_b_proj(q_resid) if self.q_lora_rank else self.q_proj(x_BTD)).view(B, T, self.num_heads, -1)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], -1)
        return q_nope, self._rotate(q_rope, tokens), q_resid

    def cached_keys(self, x_BTD: torch.Tensor, tokens: Tokens, slot: LatentSlot | None):
        """(latents [B, S, R], rotary keys [B, S, Dr], key positions [B, S]) this call attends over; the new
        ones are stored in the slot first."""
        latent, k_rope = self.kv_a_proj_with_mqa(x_BTD).split([self.kv_rank, self.rope_dim], -1)
        k_rope = self._rotate(k_rope[:, :, None], tokens)[:, :, 0]
        # Zero pads: masked scores still multiply their values (0 * NaN = NaN).
        latent, k_rope = tokens.zero_pads(self.kv_a_layernorm(latent)), tokens.zero_pads(k_rope)
        if slot is None:
            return latent, k_rope, tokens.pos_BT
        T, start = latent.shape[1], tokens.start
        slot.latent[:, start:start + T] = latent
        slot.k_rope[:, start:start + T] = k_rope
        end = start + T
        return slot.latent[:, :end].to(latent.dtype), slot.k_rope[:, :end].to(latent.dtype), slot.k_pos[:, :end]

    def _rotate(self, x_BTHR: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        """Rotary on [B, T, H, Dr]; interleaved pairs are gathered into two halves first (a fixed channel
        order for q and k alike, so their dot products are those of the interleaved rotation)."""
        if self.rotary is None:
            return x_BTHR
        if self.interleave:
            x_BTHR = torch.cat([x_BTHR[..., 0::2], x_BTHR[..., 1::2]], -1)
        # Pads carry position -1: rotated as position 0; their keys are never visible.
        return self.rotary(x_BTHR, tokens.pos_BT.clamp(min=0))
