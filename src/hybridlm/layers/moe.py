"""Mixture of experts: top-k routing over SwiGLU experts, optional sigmoid-gated shared expert.

Routing ties break toward the lower expert index (a stable descending sort), so a token routed
during prefill goes to the same experts when it is recomputed one token at a time.
"""

from __future__ import annotations

import torch
from torch import nn

from hybridlm.config import HybridConfig
from hybridlm.layers.mlp import SwiGLU


def route(logits_NE: torch.Tensor, top_k: int, router: str, norm_topk_prob: bool,
          score_bias_E: torch.Tensor | None = None):
    """Pick each token's top-k experts and their weights.

    Args:
        logits_NE: [N, E] router logits (any float dtype; scored in float32).
        top_k: experts per token.
        router: "softmax" (probabilities over all experts) or "sigmoid" (independent scores).
        norm_topk_prob: renormalise the k kept weights to sum to one.
        score_bias_E: optional [E] float bias added to the scores to choose the experts; the weights
            stay the unbiased scores (DeepSeek-V3's load-balancing bias).
    Returns:
        (weights_NK [N, k] float32 or float64, experts_NK int64 [N, k]), experts in descending score order,
        ties broken by lower index.
    """
    if router == "softmax":
        scores = logits_NE.to(torch.promote_types(logits_NE.dtype, torch.float32)).softmax(dim=-1)
    elif router == "sigmoid":
        scores = logits_NE.to(torch.promote_types(logits_NE.dtype, torch.float32)).sigmoid()
    else:
        raise ValueError(f"router: expected 'softmax' or 'sigmoid', got {router!r}")
    choice = scores if score_bias_E is None else scores + score_bias_E.to(scores.dtype)
    order = torch.sort(choice, dim=-1, descending=True, stable=True).indices
    experts = order[:, :top_k]
    weights = scores.gather(1, experts)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


class MoE(nn.Module):
    """Top-k routed SwiGLU experts (+ a shared expert scaled by sigmoid(W x) when configured).

    Uses config.num_experts, num_experts_per_tok, moe_intermediate_size, router, norm_topk_prob,
    shared_expert_intermediate_size, router_score_bias.

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
        self.gate = nn.Linear(d, config.num_experts, bias=False)
        # A buffer, not a parameter: it is set by a balancing rule, not by gradients.
        self.register_buffer("score_bias", torch.zeros(config.num_experts) if config.router_score_bias else None)
        self.experts = nn.ModuleList(SwiGLU(d, config.moe_intermediate_size) for _ in range(config.num_experts))
        self.shared_expert = None
        self.shared_expert_gate = None
        if config.shared_expert_intermediate_size > 0:
            self.shared_expert = SwiGLU(d, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(d, 1, bias=False)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """x_BTD: [B, T, D] -> [B, T, D], same dtype."""
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        weights_NK, experts_NK = route(self.gate(x_ND), self.top_k, self.router, self.norm_topk_prob,
                                         self.score_bias)
        out_ND = torch.zeros_like(x_ND)
        # One pass per expert over only the tokens routed to it: readable, and no dense
        # all-experts compute (a grouped GEMM kernel would replace this loop on the GPU).
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.nonzero(experts_NK == e, as_tuple=True)
            if token_idx.numel() == 0:
                continue
            y = expert(x_ND.index_select(0, token_idx))
            w = weights_NK[token_idx, slot].to(y.dtype)[:, None]
            out_ND.index_add_(0, token_idx, y * w)
        if self.shared_expert is not None:
            gate = torch.sigmoid(self.shared_expert_gate(x_ND))
            out_ND = out_ND + gate * self.shared_expert(x_ND)
        return out_ND.view_as(x_BTD)
