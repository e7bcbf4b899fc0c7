"""Gated softmax attention as in Qwen3-Next (letter A), and its sliding-window form (letter W).

q_proj makes the queries and, per head, a sigmoid output gate; GQA keys/values; per-head RMSNorm
on q and k; partial rotary; o = softmax(q k^T) v * sigmoid(gate), then the output projection.
"""

from __future__ import annotations

import torch
from torch import nn

from hybridlm.cache import KVSlot, ring_slots
from hybridlm.config import HybridConfig
from hybridlm.layers.norms import RMSNorm
from hybridlm.layers.packing import PacksWeights, input_stack, pack_groups, packed_linears, project
from hybridlm.layers.rotary import RotaryEmbedding
from hybridlm.layers.step import Tokens
from hybridlm.ops import softmax_attention, softmax_attention_decode
from hybridlm.ops._checks import inference_kernel


class GatedAttention(PacksWeights):
    """Softmax attention with GQA, q/k norm, partial rotary and an optional sigmoid output gate.

    Args:
        config: uses hidden_size, num_attention_heads (H), num_key_value_heads (HKV), head_dim (D),
            qk_norm, qk_norm_scope, attn_output_gate, attention_bias, rotary_dim, rope_theta, rms_norm_eps,
            norm_zero_centered and, when ``sliding`` is set, sliding_window.
        sliding: attend only to the last ``config.sliding_window`` positions (letter W).

    Example::

        layer = GatedAttention(HybridConfig())
        x = torch.randn(2, 7, 64)
        pos = torch.arange(7).expand(2, 7)
        y = layer(x, Tokens(pos, None))              # [2, 7, 64]
    """

    def __init__(self, config: HybridConfig, sliding: bool = False) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.gated = config.attn_output_gate
        self.window = config.sliding_window if sliding else None
        d, hd, bias = config.hidden_size, config.head_dim, config.attention_bias
        q_out = self.num_heads * hd * (2 if self.gated else 1)
        self.q_proj = nn.Linear(d, q_out, bias=bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=False)
        self.q_norm = self.k_norm = None
        self.qk_norm_all_heads = config.qk_norm_scope == "all"
        if config.qk_norm:
            q_dim, k_dim = (self.num_heads * hd, self.num_kv_heads * hd) if self.qk_norm_all_heads else (hd, hd)
            self.q_norm = RMSNorm(q_dim, config.rms_norm_eps, config.norm_zero_centered)
            self.k_norm = RMSNorm(k_dim, config.rms_norm_eps, config.norm_zero_centered)
        self.rotary = RotaryEmbedding(config.rotary_dim, config.rope_theta)
        self._in_groups = (("q_proj",), ("k_proj",), ("v_proj",))

    def pack_for_inference(self) -> None:
        """Stack the q, k, v projections' weights now (a decoder does this before tracing or capture),
        and keep the rotary frequencies for the fused decode prologue (``_fused_decode``)."""
        pack_groups(self, self._in_groups)
        weight = self.q_proj.weight
        if self.rotary.rotary_dim and not weight.is_meta:
            # a plain attribute, not a buffer: not saved, and a meta-built model has nothing to fill in
            self._rope_inv_freq = self.rotary.inv_freq(weight.device)

    def forward(self, x_BTD: torch.Tensor, tokens: Tokens, slot: KVSlot | None = None,
                projected: torch.Tensor | None = None) -> torch.Tensor:
        """x_BTD: [B, T, hidden] float; tokens: positions/padding; slot: this layer's cache or None;
        projected: x's product by ``input_stack()``, when the caller made it (the static decode step's
        norm kernel does, ``model._norm_and_project``).

        Returns [B, T, hidden] in x's dtype. With a slot, the new keys/values are written to it.
        """
        if slot is not None and tokens.slot is not None:
            fused = self._fused_decode(x_BTD, tokens, slot, projected)
            if fused is not None:
                return fused
        q_BTHD, k_BTHD, v_BTHD, gate_BTHD = self.project(x_BTD, tokens, projected)
        k_all, v_all, k_pos = self._keys(k_BTHD, v_BTHD, tokens, slot)
        if slot is not None and q_BTHD.shape[1] == 1:  # a decode step: split-KV decode attention
            o_BTHD = softmax_attention_decode(q_BTHD[:, 0], k_all, v_all, q_pos=tokens.pos_BT[:, 0], k_pos=k_pos,
                                              window=self.window)[:, None]
        elif tokens.contiguous and self.window is None:
            # no padding anywhere: the queries are the last T of the keys, in slot order, so causal
            # SDPA (lower-right aligned over a cache) applies without a [B, T, S] position mask
            o_BTHD = softmax_attention(q_BTHD, k_all, v_all)
        else:
            o_BTHD = softmax_attention(q_BTHD, k_all, v_all, window=self.window, q_pos=tokens.pos_BT, k_pos=k_pos)
        return self.finish(o_BTHD, gate_BTHD)

    def input_stack(self) -> torch.Tensor | None:
        """The stacked q (with its gate), k, v projections' weight once packed and no gradient is needed."""
        return input_stack(self, self._in_groups)

    def _fused_decode(self, x_BTD: torch.Tensor, tokens: Tokens, slot: KVSlot,
                      projected: torch.Tensor | None = None) -> torch.Tensor | None:
        """A static decode step (one token a row, no pads, a plain cache) with the q/k norms, the rotary
        embedding and the cache write as one Triton kernel (``ops.triton.qk_norm_rope_decode``); None
        where that does not apply (CPU, a gradient needed, norms over all heads, no rotary frequencies
        kept by ``pack_for_inference`` on this device): ``forward`` then runs the layer's own ops, which
        the kernel reproduces (tests/ops/test_qk_rope.py)."""
        inv_freq = self.__dict__.get("_rope_inv_freq")
        qn, kn = self.q_norm, self.k_norm
        if (x_BTD.shape[1] != 1 or tokens.mask_BT is not None or slot.ring or inv_freq is None
                or inv_freq.device != x_BTD.device or inv_freq.shape[0] * 2 != self.rotary.rotary_dim
                or (qn is not None and (self.qk_norm_all_heads or qn.eps != kn.eps
                                        or qn.zero_centered != kn.zero_centered))):
            return None
        norm_weights = (qn.weight, kn.weight) if qn is not None else (None, None)
        kernel = inference_kernel("qk_norm_rope_decode", x_BTD, *norm_weights, traced=True)
        if kernel is None:
            return None
        q_BTHD, gate_BTHD, k_BTHD, v_BTHD = self._projections(x_BTD, projected)
        q_BHD = kernel(q_BTHD[:, 0], k_BTHD[:, 0], v_BTHD[:, 0], tokens.pos_BT[:, 0], tokens.slot, slot.k, slot.v,
                       inv_freq, *norm_weights, qn.eps if qn is not None else 0.0, qn is not None and qn.zero_centered)
        o_BHD = softmax_attention_decode(q_BHD, slot.k.to(q_BHD.dtype), slot.v.to(q_BHD.dtype),
                                         q_pos=tokens.pos_BT[:, 0], k_pos=slot.k_pos, window=self.window)
        return self.finish(o_BHD[:, None], gate_BTHD)

    def _projections(self, x_BTD: torch.Tensor, projected: torch.Tensor | None = None):
        """(q [B, T, H, D], output gate [B, T, H, D] or None, k and v [B, T, HKV, D]) as they come out
        of the projections: views of one product over the stacked weights at inference
        (hybridlm.layers.packing), or of ``projected``, that product made by the caller."""
        B, T, _ = x_BTD.shape
        hd = self.head_dim
        q_proj, k_proj, v_proj = packed_linears(self, self._in_groups, x_BTD, projected)
        q_proj = q_proj.reshape(B, T, self.num_heads, -1)
        q_BTHD, gate_BTHD = (q_proj[..., :hd], q_proj[..., hd:]) if self.gated else (q_proj, None)
        kv_shape = (B, T, self.num_kv_heads, hd)
        return q_BTHD, gate_BTHD, k_proj.reshape(kv_shape), v_proj.reshape(kv_shape)

    def project(self, x_BTD: torch.Tensor, tokens: Tokens, projected: torch.Tensor | None = None):
        """(q [B, T, H, D], k and v [B, T, HKV, D], output gate [B, T, H, D] or None): normed, rotated,
        keys and values zero at pads (``projected``: as in ``forward``)."""
        B, T, _ = x_BTD.shape
        q_BTHD, gate_BTHD, k_BTHD, v_BTHD = self._projections(x_BTD, projected)
        if self.q_norm is not None and self.qk_norm_all_heads:
            q_BTHD = self.q_norm(q_BTHD.reshape(B, T, -1)).view_as(q_BTHD)
            k_BTHD = self.k_norm(k_BTHD.reshape(B, T, -1)).view_as(k_BTHD)
        elif self.q_norm is not None:
            q_BTHD, k_BTHD = self.q_norm(q_BTHD), self.k_norm(k_BTHD)
        # Pads carry position -1: rotated as position 0, their keys invisible (k_pos < 0) and
        # their queries see no key, which the op answers with zeros.
        rot_pos = tokens.pos_BT.clamp(min=0)
        q_BTHD, k_BTHD = self.rotary(q_BTHD, rot_pos), self.rotary(k_BTHD, rot_pos)
        # Zero keys/values of pads too: masked scores still multiply their values (0 * NaN = NaN).
        return q_BTHD, tokens.zero_pads(k_BTHD), tokens.zero_pads(v_BTHD), gate_BTHD

    def finish(self, o_BTHD: torch.Tensor, gate_BTHD: torch.Tensor | None) -> torch.Tensor:
        """Output gate and projection: [B, T, H, D] -> [B, T, hidden]."""
        if gate_BTHD is not None:
            o_BTHD = o_BTHD * torch.sigmoid(gate_BTHD)
        return project(self.o_proj, o_BTHD.flatten(2))

    def _keys(self, k_BTHD, v_BTHD, tokens: Tokens, slot: KVSlot | None):
        """Keys, values and key positions this call attends over; stores the new ones in the slot."""
        if slot is None:
            return k_BTHD, v_BTHD, tokens.pos_BT
        if tokens.slot is not None:  # static decode: fixed shapes, the whole cache attended (empty slots masked)
            if slot.ring:
                raise NotImplementedError("static decode: sliding-window (W) layers are not supported; "
                                          "decode them eagerly (model(ids, cache=cache))")
            slot.k.index_copy_(1, tokens.slot, k_BTHD.to(slot.k.dtype))
            slot.v.index_copy_(1, tokens.slot, v_BTHD.to(slot.v.dtype))
            return slot.k.to(k_BTHD.dtype), slot.v.to(v_BTHD.dtype), slot.k_pos
        T, start = k_BTHD.shape[1], tokens.start
        if not slot.ring:
            slot.k[:, start:start + T] = k_BTHD
            slot.v[:, start:start + T] = v_BTHD
            k_all, v_all = slot.k[:, :start + T], slot.v[:, :start + T]
            return k_all.to(k_BTHD.dtype), v_all.to(v_BTHD.dtype), slot.k_pos[:, :start + T]
        # Ring: attend over (ring as it was) + (new tokens); the window mask on positions drops
        # whatever is too old, so slot order does not matter. Then keep the newest in the ring.
        k_all = torch.cat([slot.k.to(k_BTHD.dtype), k_BTHD], dim=1)
        v_all = torch.cat([slot.v.to(v_BTHD.dtype), v_BTHD], dim=1)
        k_pos = torch.cat([slot.k_pos.to(tokens.pos_BT.dtype), tokens.pos_BT], dim=1)
        slots, idx = ring_slots(start, T, slot.k.shape[1], k_BTHD.device)
        slot.k[:, slots] = k_BTHD[:, idx].to(slot.k.dtype)
        slot.v[:, slots] = v_BTHD[:, idx].to(slot.v.dtype)
        return k_all, v_all, k_pos
