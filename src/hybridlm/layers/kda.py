"""Kimi delta attention as in Kimi Linear (letter K): the gated delta rule with a decay per key channel.

x -> q, k (H heads of K), v (HV heads of V), each through its own depthwise causal conv + SiLU; q and k
are l2-normalised by the op; the log-decay per value head and key channel comes from a rank-K
projection, g = -exp(A_log) * softplus(f_b(f_a(x)) + dt_bias) (<= 0, [B, T, HV, K]); beta = sigmoid(b(x));
o = kda(q, k, v, g, beta); o = RMSNorm(o) * sigmoid(g_b(g_a(x))) per head; output projection.
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from hybridlm.cache import RecurrentSlot
from hybridlm.config import HybridConfig
from hybridlm.layers.conv import ShortConv
from hybridlm.layers.norms import GatedRMSNorm
from hybridlm.layers.packing import project
from hybridlm.layers.step import Tokens, at_least_fp32
from hybridlm.ops import kda, kda_step


class KimiDeltaAttention(nn.Module):
    """The linear-attention mixer of Kimi Linear.

    Args:
        config: uses hidden_size, linear_num_key_heads (H), linear_num_value_heads (HV),
            linear_key_head_dim (K), linear_value_head_dim (V), linear_conv_kernel_dim, chunk_size,
            rms_norm_eps. The decay and output-gate projections have rank K and V.

    Example::

        layer = KimiDeltaAttention(HybridConfig(layer_pattern="K"))
        y = layer(torch.randn(2, 9, 64), Tokens(torch.arange(9).expand(2, 9), None))  # [2, 9, 64]
    """

    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads, self.num_v_heads = config.linear_num_key_heads, config.linear_num_value_heads
        self.key_dim, self.value_dim = config.linear_key_head_dim, config.linear_value_head_dim
        self.chunk_size = config.chunk_size
        H, HV, K, V = self.num_heads, self.num_v_heads, self.key_dim, self.value_dim
        self.q_proj = nn.Linear(d, H * K, bias=False)
        self.k_proj = nn.Linear(d, H * K, bias=False)
        self.v_proj = nn.Linear(d, HV * V, bias=False)
        W = config.linear_conv_kernel_dim
        # Three convs, as Kimi's checkpoints store them; they share one cache window (q, k, v channels).
        self.q_conv = ShortConv(H * K, W) if W else None
        self.k_conv = ShortConv(H * K, W) if W else None
        self.v_conv = ShortConv(HV * V, W) if W else None
        self.f_a_proj = nn.Linear(d, K, bias=False)
        self.f_b_proj = nn.Linear(K, HV * K, bias=False)
        self.A_log = nn.Parameter(torch.empty(HV))
        self.dt_bias = nn.Parameter(torch.empty(HV * K))
        self.b_proj = nn.Linear(d, HV, bias=False)
        self.g_a_proj = nn.Linear(d, V, bias=False)
        self.g_b_proj = nn.Linear(V, HV * V, bias=False)
        self.norm = GatedRMSNorm(V, config.rms_norm_eps, gate="sigmoid")
        self.o_proj = nn.Linear(HV * V, d, bias=False)
        self.reset_decay()

    def reset_decay(self) -> None:
        """Kimi's (flash-linear-attention's) decay init: A ~ U[1, 16]; dt_bias = softplus^-1(exp(U[log 1e-3, log 0.1]))."""
        if self.A_log.is_meta:
            return
        with torch.no_grad():
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1.0, 16.0).log())
            dt = torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(0.1)).exp().clamp(min=1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, x_BTD: torch.Tensor, tokens: Tokens, slot: RecurrentSlot | None = None) -> torch.Tensor:
        """x_BTD: [B, T, hidden] float; tokens: positions/padding; slot: this layer's state or None.

        Returns [B, T, hidden] in x's dtype. With a slot, its state and conv window are updated in
        place: T == 1 runs the single-step op, T > 1 the chunked op.
        """
        B, T, _ = x_BTD.shape
        H, HV, K, V = self.num_heads, self.num_v_heads, self.key_dim, self.value_dim
        q, k, v = self._convolved_qkv(x_BTD, tokens, None if slot is None else slot.conv)
        q_BTHK, k_BTHK = q.reshape(B, T, H, K), tokens.zero_pads(k.reshape(B, T, H, K))
        v_BTHV = tokens.zero_pads(v.reshape(B, T, HV, V))
        # beta = 0 and g = 0 at pads: a pad neither writes nor forgets.
        beta_BTH = tokens.zero_pads(torch.sigmoid(at_least_fp32(self.b_proj(x_BTD))))
        g_BTHK = tokens.zero_pads(self._log_decay(x_BTD).view(B, T, HV, K))
        if slot is not None and T == 1:
            o, state = kda_step(q_BTHK[:, 0], k_BTHK[:, 0], v_BTHV[:, 0], g_BTHK[:, 0], beta_BTH[:, 0],
                                slot.state.float(), use_qk_l2norm=True)
            o_BTHV = o[:, None]
        else:
            o_BTHV, state = kda(q_BTHK, k_BTHK, v_BTHV, g_BTHK, beta_BTH, chunk_size=self.chunk_size,
                                initial_state=None if slot is None else slot.state.float(),
                                output_final_state=slot is not None, use_qk_l2norm=True)
        if slot is not None:
            slot.state.copy_(state)
        gate_BTHV = self.g_b_proj(self.g_a_proj(x_BTD)).view(B, T, HV, V)
        return project(self.o_proj, self.norm(o_BTHV, gate_BTHV).reshape(B, T, HV * V))

    def _convolved_qkv(self, x_BTD: torch.Tensor, tokens: Tokens, window_BCW: torch.Tensor | None):
        """q, k [B, T, H*K] and v [B, T, HV*V] after conv + SiLU; the window holds q, k, v channels in that order."""
        # Zeroing pads before the conv makes a left-padded row's window what it would be alone.
        xs = [tokens.zero_pads(p(x_BTD)) for p in (self.q_proj, self.k_proj, self.v_proj)]
        if self.q_conv is None:
            return [F.silu(x) for x in xs]
        out, start = [], 0
        for x, conv in zip(xs, (self.q_conv, self.k_conv, self.v_conv)):
            c = x.shape[-1]
            out.append(conv(x, None if window_BCW is None else window_BCW[:, start:start + c]))
            start += c
        return out

    def _log_decay(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """g [B, T, HV * K] float32 (<= 0)."""
        f = at_least_fp32(self.f_b_proj(self.f_a_proj(x_BTD)))
        f = f + self.dt_bias.to(f.dtype)
        A = self.A_log.to(f.dtype).exp().repeat_interleave(self.key_dim)
        return -A * F.softplus(f)
