"""Mixture of experts: top-k routing over SwiGLU experts, optional shared expert.

Routers as the released models use them: softmax (Qwen, MiniMax) or sigmoid (DeepSeek-V3, Kimi,
MiniMax-M2) scores; an optional selection-only bias; DeepSeek's grouped routing (keep the
``topk_group`` best of ``n_group`` expert groups, a group scored by the sum of its two best experts);
a scaling of the routed weights. The shared expert is sigmoid-gated (Qwen) or added as is (DeepSeek, Kimi).

Routing ties break toward the lower expert index (a stable descending sort), so a token routed
during prefill goes to the same experts when it is recomputed one token at a time.
"""

from __future__ import annotations

import torch
from torch import nn

from hybridlm.config import HybridConfig
from hybridlm.layers.mlp import SwiGLU
from hybridlm.layers.packing import (
    PacksWeights,
    input_stack,
    pack_groups,
    packed_linears,
    plain_linear,
    project,
    storage_view,
)
from hybridlm.ops import _checks as ck
from hybridlm.ops import moe_experts
from hybridlm.ops.moe_route import KERNEL_MAX_EXPERTS
from hybridlm.ops.moe_route import route_reference as route

# A static decode step with few tokens (N k < E) and at most FUSED_MAX_EXPERTS experts can route and
# run its experts in one launch (``hybridlm.ops.triton.moe_decode.moe_decode_fused``) on CUDA:
# HYBRIDLM_MOE_FUSED=1. Off by default until timed on a GPU (its CPU tests run the split form, not
# the barrier; benchmarks/experiments/pending_gpu.sh part "fused"). Larger E is untimed: every
# program of the fused kernel routes its token itself, which at 512 experts takes a multi-warp
# reduction per program.
FUSED_MAX_EXPERTS = 128
MOE_FUSED = ck.env_switch("HYBRIDLM_MOE_FUSED", "routing and experts in three kernels", "one")


def _grouped_mm():
    """torch's grouped matrix product (``F.grouped_mm`` where torch has it public, else the private
    ``torch._grouped_mm`` of torch 2.8 and later), or None."""
    return getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_runs(x: torch.Tensor) -> bool:
    """Whether ``grouped_experts`` runs on x: bfloat16 on Hopper GPUs (where it was checked against
    the expert loop, H200 with torch 2.11), and float32 or bfloat16 on the CPU (a loop inside torch
    there: it is used so that the same code path is tested without a GPU). Elsewhere the experts run
    one by one."""
    if _grouped_mm() is None:
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] == 9
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)


def grouped_experts(x_sorted: torch.Tensor, counts_E: torch.Tensor, gate_EID: torch.Tensor,
                    up_EID: torch.Tensor, down_EDI: torch.Tensor,
                    row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU experts over rows sorted by expert, as three grouped products (no host sync).

    Args:
        x_sorted: [M, D] rows, those of expert 0 first, then expert 1's, and so on.
        counts_E: int [E] rows per expert (on x's device).
        gate_EID, up_EID, down_EDI: the stacks of ``MoE.packed_experts`` ([E, I, D], [E, I, D],
            [E, D, I]: nn.Linear's weights, so all three products read the stacks column-major).
        row_weights: optional [M] factors of the rows (routing weights), applied to the inner
            [M, I] activations in x's dtype (as the expert loop's combine applies them to the outputs).
    Returns:
        [M, D]: row r through its expert, w_r down(silu(gate x) * up x), in x's dtype.
    """
    mm = _grouped_mm()
    offs = counts_E.cumsum(0).to(torch.int32)
    h = torch.nn.functional.silu(mm(x_sorted, gate_EID.transpose(1, 2), offs=offs))
    h = h * mm(x_sorted, up_EID.transpose(1, 2), offs=offs)
    if row_weights is not None:
        h = h * row_weights.to(h.dtype)[:, None]
    return mm(h, down_EDI.transpose(1, 2), offs=offs)


def _needs_grad(module: nn.Module) -> bool:
    return torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())


class MoE(PacksWeights):
    """Top-k routed SwiGLU experts (+ a shared expert scaled by sigmoid(W x) when configured).

    Uses config.num_experts, num_experts_per_tok, moe_intermediate_size, router, norm_topk_prob,
    shared_expert_intermediate_size, shared_expert_gate, router_score_bias, n_group, topk_group,
    routed_scaling_factor.

    Example::

        cfg = HybridConfig(num_experts=4, num_experts_per_tok=2)
        y = MoE(cfg)(torch.randn(2, 5, cfg.hidden_size))   # [2, 5, 64]
    """

    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.top_k = config.num_experts_per_tok
        self.router = config.router
        self.norm_topk_prob = config.norm_topk_prob
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.routed_scaling_factor = config.routed_scaling_factor
        self.gate = nn.Linear(d, config.num_experts, bias=False)
        # A buffer, not a parameter: it is set by a balancing rule, not by gradients.
        self.register_buffer("score_bias", torch.zeros(config.num_experts) if config.router_score_bias else None)
        self.experts = nn.ModuleList(SwiGLU(d, config.moe_intermediate_size, pack=False)
                                     for _ in range(config.num_experts))
        self.shared_expert = None
        self.shared_expert_gate = None
        if config.shared_expert_intermediate_size > 0:
            # MoE stacks the shared expert's gate and up with the router (``_in_groups``), not the MLP
            self.shared_expert = SwiGLU(d, config.shared_expert_intermediate_size, pack=False)
            if config.shared_expert_gate:
                self.shared_expert_gate = nn.Linear(d, 1, bias=False)

    def forward(self, x_BTD: torch.Tensor, static: bool = False, projected: torch.Tensor | None = None) -> torch.Tensor:
        """x_BTD: [B, T, D] -> [B, T, D], same dtype.

        projected: x's product by ``input_stack()`` (router, shared gate, shared expert's gate and up),
        when the caller made it (the static decode step's norm kernel does, ``model._norm_and_project``).

        static: fixed shapes and no host sync (a decode step a CUDA graph can capture). When the
        tokens make fewer expert calls than there are experts (N k < E), ``ops.moe_experts`` reads
        only the routed experts' weights; otherwise every expert runs on every token, weighted 0
        where not routed (three GEMMs over the packed weights: a batch that reaches most experts
        reads them all anyway).
        """
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        sparse = static and x_ND.shape[0] * self.top_k < len(self.experts)
        if projected is not None:
            projected = projected.reshape(x_ND.shape[0], projected.shape[-1])
        logits_NE, shared_ND = self._router_and_shared(x_ND, inner=sparse, projected=projected)
        if sparse and (shared_ND is None or isinstance(shared_ND, dict)):
            out_ND = self._fused_decode(x_ND, logits_NE, shared_ND or {})
            if out_ND is not None:
                return out_ND.view_as(x_BTD)
        kernel = None
        if static and self.n_group == 1 and len(self.experts) <= KERNEL_MAX_EXPERTS:  # what the kernel routes
            kernel = ck.inference_kernel("moe_route", logits_NE, traced=True)
        if kernel is not None:
            # a decode step: scores, selection, renormalisation and scaling in one launch
            weights_NK, experts_NK = kernel(logits_NE, self.top_k, self.router, self.norm_topk_prob,
                                            float(self.routed_scaling_factor), self.score_bias)
        else:
            weights_NK, experts_NK = route(logits_NE, self.top_k, self.router, self.norm_topk_prob,
                                           self.score_bias, self.n_group, self.topk_group)
            weights_NK = weights_NK * self.routed_scaling_factor
        if sparse:
            # few tokens: read only the routed experts' weights (a Triton kernel on CUDA), the shared
            # expert in the same sum when it came back as its projections (keyword arguments)
            folded = {}
            if isinstance(shared_ND, dict):
                folded, shared_ND = shared_ND, None
            out_ND = moe_experts(x_ND, experts_NK, weights_NK, *self.packed_experts(), **folded)
            return self._add_shared(out_ND, shared_ND).view_as(x_BTD)
        if static:
            # [N, E] combine weights, 0 for the experts a token was not routed to; three GEMMs over
            # the packed weights instead of three per expert (a decode graph of 48 MoE layers with
            # 32 experts would otherwise launch ~5,000 small kernels per token)
            dense_NE = torch.zeros(x_ND.shape[0], len(self.experts), dtype=weights_NK.dtype, device=x_ND.device)
            dense_NE.scatter_(1, experts_NK, weights_NK)
            gate_EFD, up_EFD, down_EDF = self.packed_experts()
            E, F_, D = gate_EFD.shape
            h_NEF = (torch.nn.functional.silu(x_ND @ gate_EFD.view(E * F_, D).t()) *
                     (x_ND @ up_EFD.view(E * F_, D).t())).view(-1, E, F_)
            h_NEF = h_NEF * dense_NE.to(h_NEF.dtype)[:, :, None]
            # down: one product, the sum over experts inside it (the stack is stored [D, E, F], so
            # this reshape is a view; see packed_experts)
            out_ND = h_NEF.reshape(-1, E * F_) @ down_EDF.transpose(0, 1).reshape(D, E * F_).t()
            return self._add_shared(out_ND, shared_ND).view_as(x_BTD)
        # Tokens sorted by expert, then each expert over its contiguous rows: no dense all-experts
        # compute. Once packed (a decoder packs before its prefill), where the grouped matrix product
        # runs, all experts' rows go through three grouped products with no host sync; otherwise
        # one host sync per layer (the per-expert counts) and one pass per expert, ~5 launches each
        # (the 4-layer compiled trace of a 4k prefill at 32 experts on an H200: 2,367 launches,
        # 19.4 ms of kernels in 52 ms; with a `nonzero` per expert a 2k-token chunk of 48 layers took
        # ~0.5 s). The combine puts each expert output back in its (token, slot) place, then takes
        # the weighted sum over a token's K slots as one batched product (float32 accumulation, a
        # fixed order). A scatter-add (`index_add_`) would sum in the output's dtype, and on CUDA
        # with atomics: bf16 roundings in a run-dependent order, and the slowest prefill kernel
        # measured (334 us a call at 4k tokens x 10 slots x 2048, H200).
        N, K = experts_NK.shape
        # 16-bit keys: the GPU's radix sort makes a pass per key byte, 2 instead of 8 for int64 ids
        # (8 sort kernels a layer and chunk in the H200 prefill trace, 47 us of device time); a
        # stable sort of the same keys, so the same order
        key_dtype = torch.int16 if len(self.experts) <= torch.iinfo(torch.int16).max else torch.int32
        flat_E = experts_NK.reshape(-1).to(key_dtype)
        sorted_E, order = torch.sort(flat_E, stable=True)
        # rows per expert from the sorted ids, with no host sync: torch.bincount reads the ids'
        # range back to the host (on CUDA its min and max, a sync per layer that stopped the host
        # running ahead of the GPU: 16 device-to-host copies in the 4-layer H200 prefill trace)
        bounds = torch.arange(len(self.experts) + 1, device=flat_E.device, dtype=flat_E.dtype)
        counts_E = torch.searchsorted(sorted_E, bounds).diff()
        x_sorted = x_ND.index_select(0, order // K)
        # slot i of the flat (token, slot) list sits at row pos[i] of the sorted rows; gathering by
        # it is a contiguous read per row (index_copy_ into the inverse order ran at a third of the
        # copy rate in the H200 prefill trace: 131 us a layer at 2k tokens x 10 slots x 2048)
        pos = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        pack = self._live_pack() if grouped_mm_runs(x_ND) and not _needs_grad(self) else None
        if pack is not None:
            # the routing weights scale the experts' inner rows, so the combine is a plain sum over
            # a token's K slots (float32 accumulation inside the reduction, a fixed order)
            w_sorted = weights_NK.reshape(-1).index_select(0, order)
            y_sorted = grouped_experts(x_sorted, counts_E, *pack, row_weights=w_sorted)
            out_ND = y_sorted.index_select(0, pos).view(N, K, -1).sum(1)
        else:
            counts = counts_E.tolist()
            y_sorted = torch.cat([self.experts[e](rows) for e, rows in enumerate(x_sorted.split(counts)) if counts[e]])
            y_NKD = y_sorted.index_select(0, pos).view(N, K, -1)
            out_ND = torch.bmm(weights_NK.to(y_NKD.dtype)[:, None, :], y_NKD).squeeze(1)
        return self._add_shared(out_ND, shared_ND).view_as(x_BTD)

    def packed_experts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The routed experts' weights stacked as nn.Linear holds them: gate and up [E, I, D], down
        [E, D, I].

        The first call stacks them and turns every expert's weight into a view of the stack (same
        values, one storage: no memory kept twice);
        later calls return the stack while the views still point into it, and stack again after
        something replaced the weights (``.to(dtype)``, loading a checkpoint into new tensors).

        Gate and up are contiguous. Down is stored [D, E, I] (expert e's row d at (d E + e) I) and
        returned as its [E, D, I] view (strides (I, E I, 1)): each expert's rows are still whole
        contiguous rows of I, and the stack is also one [D, E I] matrix, so the batched static path
        (every expert on every token) takes the down product as one GEMM. Contiguous [E, D, I] has
        no such view: its batched product plus the sum over experts measured 3-7 us a layer slower
        (H200, 32 experts, 8-64 tokens; +1.8% for the uncompiled 48-layer step at batch 8, equal
        within 0.6% compiled; RESULTS.md, fourth 12-03 session).
        """
        pack = self._live_pack()
        if pack is not None:
            return pack
        with torch.no_grad():
            gate = torch.stack([ex.gate_proj.weight for ex in self.experts])
            up = torch.stack([ex.up_proj.weight for ex in self.experts])
            down = torch.stack([ex.down_proj.weight for ex in self.experts], dim=1).transpose(0, 1)
        if torch.compiler.is_compiling():
            # traced before anything packed (torch.compile(model.decode_static) without
            # pack_for_inference first): stack inside the graph, a copy of the experts' weights per
            # call, and leave the parameters alone. Re-pointing them here changed only the traced
            # parameters: the compiled step then expected views of a stack, and its input check failed on
            # the real, unchanged weights (seventh 12-03 session).
            return gate, up, down
        for e, ex in enumerate(self.experts):
            for proj, view in ((ex.gate_proj, gate[e]), (ex.up_proj, up[e]), (ex.down_proj, down[e])):
                # .data: the same Parameter object, so an optimizer holding it keeps updating it
                proj.weight.data = view
        self._pack = (gate, up, down)
        return self._pack

    def _live_pack(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The experts' stacks while every expert's weights still are views of them, else None
        (never packed, or something replaced a weight since)."""
        pack = getattr(self, "_pack", None)
        if pack is None or torch.compiler.is_compiling():
            return pack  # traced code cannot compare storage pointers; the decoder packed before compiling
        # Runs on every prefill call, so it reads the module and parameter dicts directly: through
        # nn.Module.__getattr__ and a view per expert it took ~0.7 ms for 32 experts (CPU), a sizeable
        # part of a host-bound GPU prefill (48 layers x 2 chunks at 4k).
        experts = self.experts._modules
        if len(experts) != pack[0].shape[0]:
            return None
        rows = [(p.data_ptr(), p.stride(0) * p.element_size()) for p in pack]
        for e, ex in enumerate(experts.values()):
            for (base, step), name in zip(rows, ("gate_proj", "up_proj", "down_proj")):
                proj = getattr(ex, "_modules", {}).get(name)
                w = None if proj is None else proj._parameters.get("weight")
                if w is None or w.data_ptr() != base + e * step:
                    return None
        return pack

    def pack_for_inference(self) -> None:
        """Stack the routed experts' weights, and the router with the shared expert's input
        projections, now (a decoder does this before tracing or capture)."""
        self.packed_experts()
        groups = self._in_groups()
        if groups is not None:
            pack_groups(self, groups)
        # the fused decode kernel's barrier counters (it leaves them zeroed), made here, before any
        # trace or capture, on the weights' device; kept while there (a captured graph holds their address)
        sync = getattr(self, "_fused_sync", None)
        if sync is None or sync.device != self.gate.weight.device:
            self._fused_sync = torch.zeros(2, dtype=torch.int32, device=self.gate.weight.device)

    def _release_packs(self):
        # the experts' stacks, as PacksWeights does for stacked projections (``.to()`` and the like)
        pack = self.__dict__.pop("_pack", None)
        return super()._release_packs(), (None if pack is None else [(tuple(t.shape), t.stride()) for t in pack])

    def _restore_packs(self, held) -> None:
        linear, shapes = held
        super()._restore_packs(linear)
        if shapes is None:
            return
        ex0 = self.experts[0]
        views = [storage_view(w, shape, stride) for w, (shape, stride) in
                 zip((ex0.gate_proj.weight, ex0.up_proj.weight, ex0.down_proj.weight), shapes)]
        if all(v is not None for v in views):
            self._pack = tuple(views)  # packed_experts keeps it if the weights still are its rows
        if not any(p.is_meta for p in self.parameters()):
            self.packed_experts()

    def _fused_decode(self, x_ND: torch.Tensor, logits_NE: torch.Tensor, shared: dict) -> torch.Tensor | None:
        """A sparse static step through the fused routing + experts kernel, or None where it does not
        apply (not CUDA, gradients, grouped routing, more than FUSED_MAX_EXPERTS experts, HYBRIDLM_MOE_FUSED=0,
        or traced before ``pack_for_inference`` made the kernel's barrier counters)."""
        if not MOE_FUSED or self.n_group != 1 or len(self.experts) > FUSED_MAX_EXPERTS:
            return None
        kernel = ck.inference_kernel("moe_decode_fused", x_ND, logits_NE, traced=True)
        if kernel is None:
            return None
        sync = getattr(self, "_fused_sync", None)
        if sync is None or sync.device != x_ND.device:
            if torch.compiler.is_compiling():
                return None
            sync = self._fused_sync = torch.zeros(2, dtype=torch.int32, device=x_ND.device)
        return kernel(x_ND, logits_NE, *self.packed_experts(), sync, top_k=self.top_k, router=self.router,
                      norm_topk_prob=self.norm_topk_prob, scaling=float(self.routed_scaling_factor),
                      score_bias_E=self.score_bias, **shared)

    def _in_groups(self) -> tuple[tuple[str, ...], ...] | None:
        """The projections of the layer's input that one product can serve: router, shared gate,
        shared expert's gate and up (None without a shared expert, or with one replaced by a module
        that is not a SwiGLU: that one runs as it is)."""
        if type(self.shared_expert) is not SwiGLU:
            return None
        gate = (("shared_expert_gate",),) if self.shared_expert_gate is not None else ()
        return (("gate",), *gate, ("shared_expert.gate_proj",), ("shared_expert.up_proj",))

    def input_stack(self) -> torch.Tensor | None:
        """The stacked router, shared gate and shared expert's gate and up weight (``_in_groups``) once
        packed and no gradient is needed; None without such a stack."""
        groups = self._in_groups()
        return None if groups is None else input_stack(self, groups)

    def _router_and_shared(self, x_ND: torch.Tensor, inner: bool = False, projected: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor | dict[str, torch.Tensor | None] | None]:
        """Router logits [N, E] and the shared expert's gated output [N, D] (None without one).

        Once packed, the router, the shared expert's gate and up and its sigmoid gate are one product
        over stacked weights: at decode the four are matrix-vector products bound by their weight
        reads, and the router's and the one-row gate's launches cost more than their bytes.

        inner: where the shared expert's down projection is a plain product (``plain_linear``) and
        the layer is packed, return instead of its output the keyword arguments that hand it to
        ``moe_experts``: its gate and up projections and gate logit (column slices of the packed
        product) and its down weight [D, S]. The kernel forms silu(gate) * up * sigmoid(logit) as it
        reads them and adds the down product to the routed experts' sum: no kernel of their own.
        """
        groups = self._in_groups()
        if groups is None and projected is not None:
            raise ValueError("projected: this MoE layer has no stacked input product (see input_stack)")
        if groups is None:
            shared = None if self.shared_expert is None else self.shared_expert(x_ND)
            if shared is not None and self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x_ND)) * shared
            return self.gate(x_ND), shared
        outs = packed_linears(self, groups, x_ND, projected)
        down = self.shared_expert.down_proj
        if inner and plain_linear(down, outs[-2]):
            gate_N = outs[1][:, 0] if self.shared_expert_gate is not None else None
            return outs[0], dict(shared_h_NS=outs[-2], shared_up_NS=outs[-1], shared_gate_N=gate_N,
                                 shared_down_DS=down.weight)
        h_NS = torch.nn.functional.silu(outs[-2]) * outs[-1]
        shared = project(down, h_NS)
        if self.shared_expert_gate is not None:
            shared = torch.sigmoid(outs[1]) * shared
        return outs[0], shared

    @staticmethod
    def _add_shared(out_ND: torch.Tensor, shared_ND: torch.Tensor | None) -> torch.Tensor:
        return out_ND if shared_ND is None else out_ND + shared_ND
