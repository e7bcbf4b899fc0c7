"""Gated DeltaNet as in Qwen3-Next (letter G) and DeltaNet (letter D: the same layer, no decay).

x -> q, k (H heads of K), v, z (HV heads of V), a, b (HV each); q, k, v go through a depthwise
causal conv of width 4 + SiLU; q and k are l2-normalised by the op; per value head
g = -exp(A_log) * softplus(a + dt_bias) (the log-decay, <= 0) and beta = sigmoid(b);
o = gated_delta_rule(q, k, v, g, beta); o = RMSNorm(o) * SiLU(z) per head; output projection.
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from hybridlm.cache import RecurrentSlot, conv_channels
from hybridlm.config import HybridConfig
from hybridlm.layers.conv import ShortConv, _window_fits
from hybridlm.layers.norms import GatedRMSNorm
from hybridlm.layers.packing import PacksWeights, input_stack, pack_groups, packed_linears, project
from hybridlm.layers.step import Tokens, at_least_fp32
from hybridlm.ops import delta_rule, delta_rule_step, gated_delta_rule, gated_delta_rule_step
from hybridlm.ops._checks import env_switch, inference_kernel

# A static decode step of a gated layer can run its short conv inside the decode kernel
# (``hybridlm.ops.triton.decode.conv_gated_delta_rule_step``: one launch fewer a layer) on CUDA:
# HYBRIDLM_GDN_CONV_FUSED=1. Off by default until timed on a GPU (pending_gpu.sh part "fused").
CONV_FUSED = env_switch("HYBRIDLM_GDN_CONV_FUSED", "the conv kernel, then the decode kernel", "one kernel")
TICKET_ROWS = 64  # sequences the conv-fused step's counters cover when packed (more: made on the next eager call)


class GatedDeltaNet(PacksWeights):
    """The linear-attention mixer of Qwen3-Next; ``gated=False`` gives plain DeltaNet (g = 0).

    Args:
        config: uses hidden_size, linear_num_key_heads (H), linear_num_value_heads (HV),
            linear_key_head_dim (K), linear_value_head_dim (V), linear_conv_kernel_dim,
            chunk_size, rms_norm_eps.
        gated: learn a per-token decay (G); without it the state never forgets (D).

    Example::

        layer = GatedDeltaNet(HybridConfig())
        y = layer(torch.randn(2, 9, 64), Tokens(torch.arange(9).expand(2, 9), None))  # [2, 9, 64]
    """

    def __init__(self, config: HybridConfig, gated: bool = True) -> None:
        super().__init__()
        d = config.hidden_size
        self.gated = gated
        self.num_heads, self.num_v_heads = config.linear_num_key_heads, config.linear_num_value_heads
        self.key_dim, self.value_dim = config.linear_key_head_dim, config.linear_value_head_dim
        self.chunk_size = config.chunk_size
        qk, vv = self.num_heads * self.key_dim, self.num_v_heads * self.value_dim
        self.q_proj = nn.Linear(d, qk, bias=False)
        self.k_proj = nn.Linear(d, qk, bias=False)
        self.v_proj = nn.Linear(d, vv, bias=False)
        self.z_proj = nn.Linear(d, vv, bias=False)
        self.b_proj = nn.Linear(d, self.num_v_heads, bias=False)
        channels = conv_channels(config, "G")
        self.conv = ShortConv(channels, config.linear_conv_kernel_dim) if channels else None
        if gated:
            self.a_proj = nn.Linear(d, self.num_v_heads, bias=False)
            self.A_log = nn.Parameter(torch.empty(self.num_v_heads))
            self.dt_bias = nn.Parameter(torch.empty(self.num_v_heads))
        self.norm = GatedRMSNorm(self.value_dim, config.rms_norm_eps)
        self.o_proj = nn.Linear(vv, d, bias=False)
        # this order (q k v, b, a, z) is the order the layer always ran them in: with gradients they
        # still run one by one, and autograd sums x's gradient in that order, so training repeats bit
        # for bit
        gate = (("a_proj",),) if gated else ()
        self._in_groups = (("q_proj", "k_proj", "v_proj"), ("b_proj",), *gate, ("z_proj",))
        self.reset_decay()

    def reset_decay(self) -> None:
        """Qwen3-Next's decay init: A ~ U[1, 16]; dt = exp(U[log 1e-3, log 0.1]), dt_bias = softplus^-1(dt)."""
        if not self.gated or self.A_log.is_meta:
            return
        with torch.no_grad():
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1.0, 16.0).log())
            log_dt = torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(0.1))
            dt = log_dt.exp().clamp(min=1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

    def forward(self, x_BTD: torch.Tensor, tokens: Tokens, slot: RecurrentSlot | None = None,
                projected: torch.Tensor | None = None) -> torch.Tensor:
        """x_BTD: [B, T, hidden] float; tokens: positions/padding; slot: this layer's state or None;
        projected: x's product by ``input_stack()``, when the caller made it (the static decode step's
        norm kernel does, ``model._norm_and_project``).

        Returns [B, T, hidden] in x's dtype. With a slot, its state and conv window are updated
        in place: T == 1 runs the single-step op, T > 1 the chunked op.
        """
        B, T, _ = x_BTD.shape
        H, HV, K, V = self.num_heads, self.num_v_heads, self.key_dim, self.value_dim
        # one product over the stacked projection weights at inference (hybridlm.layers.packing)
        qkv, b, *a, z = packed_linears(self, self._in_groups, x_BTD, projected)
        # Zeroing pads before the conv makes a left-padded row's window what it would be alone.
        qkv = tokens.zero_pads(qkv)
        fuse_gate = slot is not None and T == 1 and tokens.mask_BT is None and self.gated and not self.A_log.is_meta
        if fuse_gate:
            o = self._conv_step(qkv[:, 0], b[:, 0], a[0][:, 0], slot, settled=tokens.slot is not None)
            if o is not None:
                return project(self.o_proj, self.norm(o[:, None], z.reshape(B, T, HV, V)).reshape(B, T, HV * V))
        qkv = self.conv(qkv, None if slot is None else slot.conv) if self.conv is not None else F.silu(qkv)
        q_BTHK, k_BTHK, v_BTHV = torch.split(qkv, [H * K, H * K, HV * V], dim=-1)
        q_BTHK, k_BTHK = q_BTHK.reshape(B, T, H, K), k_BTHK.reshape(B, T, H, K)
        k_BTHK, v_BTHV = tokens.zero_pads(k_BTHK), tokens.zero_pads(v_BTHV.reshape(B, T, HV, V))
        # A decode step without pads (fuse_gate) hands the raw gate inputs to the op, which forms the
        # decay and beta = sigmoid(b) inside the Triton step kernel (the same formulas; saves their
        # small kernels per layer and step)
        # beta = 0 at pads: the token writes nothing; with g = 0 it forgets nothing either.
        beta_BTH = b if fuse_gate else tokens.zero_pads(torch.sigmoid(at_least_fp32(b)))
        g_BTH = a[0] if fuse_gate else self._log_decay(a[0] if a else None, tokens)
        o_BTHV = self._recurrence(q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, slot, fuse_gate,
                                  settled=tokens.slot is not None)
        z_BTHV = z.reshape(B, T, HV, V)
        return project(self.o_proj, self.norm(o_BTHV, z_BTHV).reshape(B, T, HV * V))

    def input_stack(self) -> torch.Tensor | None:
        """The stacked input projections' weight (q k v, b, a, z rows) once packed and no gradient is needed."""
        return input_stack(self, self._in_groups)

    def pack_for_inference(self) -> None:
        """Stack the input projections' weights now (a decoder does this before tracing or capture)."""
        pack_groups(self, self._in_groups)
        # the conv-fused decode step's counters (left at zero by the kernel), made before any trace or
        # capture; kept while on the weights' device (a captured graph holds their address)
        tickets, device = getattr(self, "_conv_tickets", None), self.o_proj.weight.device
        if tickets is None or tickets.device != device:
            self._conv_tickets = torch.zeros(TICKET_ROWS * self.num_heads, dtype=torch.int32, device=device)

    def _conv_step(self, x_BC, b_BH, a_BH, slot: RecurrentSlot, settled: bool) -> torch.Tensor | None:
        """The conv and the decode step in one kernel (HYBRIDLM_GDN_CONV_FUSED=1, CUDA, no gradient, a
        float32 state and a window the kernel updates in place): o [B, HV, V], or None where it does not
        apply."""
        if not CONV_FUSED or self.conv is None or not 2 <= self.conv.kernel_size <= 4 or slot.conv is None:
            return None
        kernel = inference_kernel("conv_gated_delta_rule_step", x_BC, self.conv.weight, self.A_log, traced=True)
        if kernel is None or slot.state.dtype != torch.float32 or not slot.state.is_contiguous():
            return None
        if not _window_fits(slot.conv):
            return None
        tickets, need = getattr(self, "_conv_tickets", None), x_BC.shape[0] * self.num_heads
        if tickets is None or tickets.device != x_BC.device or tickets.numel() < need:
            if torch.compiler.is_compiling():
                return None
            tickets = self._conv_tickets = torch.zeros(max(need, TICKET_ROWS * self.num_heads), dtype=torch.int32,
                                                       device=x_BC.device)
        return kernel(x_BC, slot.conv, self.conv.weight, tickets, a_BH, b_BH, slot.state, num_heads=self.num_heads,
                      use_qk_l2norm=True, A_log=self.A_log, dt_bias=self.dt_bias, beta_is_logit=True,
                      state_settled=settled)

    def _log_decay(self, a: torch.Tensor | None, tokens: Tokens) -> torch.Tensor | None:
        """g [B, T, HV] float32 (<= 0) from the gate projection a, 0 at pads; None for DeltaNet."""
        if not self.gated or self.A_log.is_meta:
            return None
        a = at_least_fp32(a)
        return tokens.zero_pads(-self.A_log.to(a.dtype).exp() * F.softplus(a + self.dt_bias.to(a.dtype)))

    def _recurrence(self, q, k, v, g, beta, slot: RecurrentSlot | None, fuse_gate: bool = False,
                    settled: bool = False) -> torch.Tensor:
        """Run the (gated) delta rule over [B, T] tokens; update the slot's state. o: [B, T, HV, V].
        fuse_gate: g is the raw gate input a and beta the logit b; a decode step forms the decay from
        A_log, dt_bias and applies the sigmoid. settled: a static decode step (``HybridLM.decode_static``),
        which embeds its tokens with a plain launch before any layer, so the previous step's write of
        the state has finished before this step's kernels start: the step kernel may read the state
        before waiting for its predecessor (``state_settled``)."""
        if slot is not None and q.shape[1] == 1:
            state = slot.state.float()
            # A float32 cache state is updated where it lies (one read, one write per step);
            # other state dtypes go through a float32 copy.
            inplace = state is slot.state
            if self.gated:
                gate = dict(A_log=self.A_log, dt_bias=self.dt_bias, beta_is_logit=True) if fuse_gate else {}
                o, new_state = gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state,
                                                     use_qk_l2norm=True, inplace=inplace, state_settled=settled,
                                                     **gate)
            else:
                o, new_state = delta_rule_step(q[:, 0], k[:, 0], v[:, 0], beta[:, 0], state, use_qk_l2norm=True,
                                               inplace=inplace, state_settled=settled)
            if not inplace:
                slot.state.copy_(new_state)
            return o[:, None]
        kw = dict(initial_state=None if slot is None else slot.state.float(),
                  output_final_state=slot is not None, chunk_size=self.chunk_size, use_qk_l2norm=True)
        if self.gated:
            o, new_state = gated_delta_rule(q, k, v, g, beta, **kw)
        else:
            o, new_state = delta_rule(q, k, v, beta, **kw)
        if slot is not None:
            slot.state.copy_(new_state)
        return o
