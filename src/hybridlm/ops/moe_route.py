"""Top-k expert routing: each token's k experts and their combine weights, from its router logits.

Legend: N tokens, E experts, K experts per token.

Routers as the released models use them: softmax (Qwen, MiniMax) or sigmoid (DeepSeek-V3, Kimi,
MiniMax-M2) scores; an optional selection-only bias; DeepSeek's grouped routing (keep the
``topk_group`` best of ``n_group`` expert groups, a group scored by the sum of its two best experts);
renormalisation of the kept weights and a scaling factor.

Ties break toward the lower expert index (a stable descending sort), so a token routed during
prefill goes to the same experts when it is recomputed one token at a time.

:func:`moe_route` dispatches: on CUDA tensors (``backend="auto"``) a Triton kernel does a decode
step's routing in one launch (scores, selection, renormalisation and scaling), where the PyTorch
form is a softmax, a sort over all E experts, a gather, a sum and two divisions: at batch 1 in the
compiled Qwen3-Next step two kernels and their launch gaps a layer, and at the released model's 512
experts 23.4 us a layer compiled against the kernel's 3.9 (H200; ``ops/triton/moe_route.py``).
"""

from __future__ import annotations

import math

import torch

from hybridlm.ops import _checks as ck

ROUTERS = ("softmax", "sigmoid")
KERNEL_MAX_EXPERTS = 8192  # the Triton kernel holds a token's E scores in one program's registers


def check_route(logits_NE, top_k, router, norm_topk_prob, scaling, score_bias_E, n_group, topk_group) -> None:
    """Arguments of :func:`moe_route` (reads no tensor values)."""
    ck.check_float_tensor("logits_NE", logits_NE, 2, "[N, E]")
    E = logits_NE.shape[1]
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in [1, E] = [1, {E}] (E from logits_NE [N, E]), got {top_k}")
    ck.check_choice("router", router, ROUTERS)
    if not isinstance(norm_topk_prob, bool):
        raise TypeError(f"norm_topk_prob must be a bool, got {type(norm_topk_prob).__name__}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ValueError(f"scaling must be a finite float, got {scaling!r}")
    if score_bias_E is not None:
        ck.check_float_tensor("score_bias_E", score_bias_E, 1, "[E]")
        ck.check_same("score_bias_E", score_bias_E, "logits_NE", logits_NE, dtype=False)
        if score_bias_E.shape[0] != E:
            raise ValueError(f"score_bias_E must be [E] = ({E},) (E from logits_NE), got {tuple(score_bias_E.shape)}")
    for name, value in (("n_group", n_group), ("topk_group", topk_group)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if n_group > 1:
        if E % n_group:
            raise ValueError(f"n_group must divide E = {E} (equal groups of experts), got {n_group}")
        if topk_group > n_group:
            raise ValueError(f"topk_group must be at most n_group = {n_group}, got {topk_group}")


def route_reference(logits_NE: torch.Tensor, top_k: int, router: str, norm_topk_prob: bool,
                    score_bias_E: torch.Tensor | None = None, n_group: int = 1, topk_group: int = 1):
    """:func:`moe_route` in PyTorch, without the scaling: a stable descending sort of all E scores.

    Returns (weights_NK [N, k] float32, or float64 for float64 logits; experts_NK int64 [N, k]),
    experts in descending score order, ties broken by lower index."""
    if router == "softmax":
        scores = logits_NE.to(torch.promote_types(logits_NE.dtype, torch.float32)).softmax(dim=-1)
    elif router == "sigmoid":
        scores = logits_NE.to(torch.promote_types(logits_NE.dtype, torch.float32)).sigmoid()
    else:
        raise ValueError(f"router: expected 'softmax' or 'sigmoid', got {router!r}")
    choice = scores if score_bias_E is None else scores + score_bias_E.to(scores.dtype)
    if n_group > 1:
        choice = _keep_best_groups(choice, n_group, topk_group)
    order = torch.sort(choice, dim=-1, descending=True, stable=True).indices
    experts = order[:, :top_k]
    weights = scores.gather(1, experts)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def _keep_best_groups(choice_NE: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """choice with -inf outside each token's topk_group best groups (ties to the lower group)."""
    groups = choice_NE.unflatten(-1, (n_group, -1))  # [N, G, E / G]
    best_two = groups.topk(min(2, groups.shape[-1]), dim=-1).values.sum(-1)  # [N, G]
    kept = torch.sort(best_two, dim=-1, descending=True, stable=True).indices[:, :topk_group]
    keep = torch.zeros_like(best_two, dtype=torch.bool).scatter_(1, kept, True)
    return groups.masked_fill(~keep[..., None], float("-inf")).flatten(-2)


def moe_route(logits_NE: torch.Tensor, top_k: int, router: str = "softmax", norm_topk_prob: bool = False,
              scaling: float = 1.0, score_bias_E: torch.Tensor | None = None, n_group: int = 1,
              topk_group: int = 1, backend: str = "auto"):
    """Each token's top-k experts and their combine weights.

    Args:
        logits_NE: [N, E] router logits (any float dtype, any strides: a column slice of a wider
            projection output is read in place by the kernel); scored in float32 (float64 stays).
        top_k: experts per token, 1 <= top_k <= E.
        router: "softmax" (probabilities over all experts) or "sigmoid" (independent scores).
        norm_topk_prob: renormalise the k kept scores to sum to one.
        scaling: factor on the weights after any renormalisation (e.g. DeepSeek-V3's 2.5).
        score_bias_E: optional [E] float bias added to the scores to choose the experts; the weights
            stay the unbiased scores (DeepSeek-V3's load-balancing bias).
        n_group, topk_group: grouped routing; experts come only from the topk_group groups (of n_group
            equal, consecutive groups) whose two best biased scores sum highest. n_group = 1: none.
        backend: "auto" (the Triton kernel for CUDA tensors that are not float64, without grouped
            routing; the reference elsewhere), "triton" (RuntimeError when it cannot run) or
            "reference".
    Returns:
        (weights_NK [N, top_k] float32 (float64 for float64 logits), experts_NK [N, top_k] int64),
        experts in descending order of their (biased) score, ties broken by the lower index.

    The kernel is inference-only (no gradient flows to the logits); its scores may differ from the
    reference's by a float32 rounding, so experts whose scores lie within one rounding of each other
    may come out in the other order.

    Example::

        >>> w, e = moe_route(torch.tensor([[0.0, 2.0, 1.0, 2.0]]), 2, norm_topk_prob=True)
        >>> e.tolist(), [round(x, 3) for x in w[0].tolist()]
        ([[1, 3]], [0.5, 0.5])
    """
    ck.check_backend(backend)
    check_route(logits_NE, top_k, router, norm_topk_prob, scaling, score_bias_E, n_group, topk_group)
    if n_group > 1 and backend == "triton":
        raise ValueError(f"backend='triton' routes without expert groups only (n_group = 1), got n_group = "
                         f"{n_group}; use backend='reference' or 'auto'")
    if logits_NE.shape[1] > KERNEL_MAX_EXPERTS and backend == "triton":
        raise ValueError(f"backend='triton' routes up to {KERNEL_MAX_EXPERTS} experts, got E = "
                         f"{logits_NE.shape[1]}; use backend='reference' or 'auto'")
    fits = n_group == 1 and logits_NE.shape[1] <= KERNEL_MAX_EXPERTS
    kernel = ck.load_kernel("moe_route", backend, logits_NE) if fits else None
    if kernel is not None:
        return kernel(logits_NE, top_k, router, norm_topk_prob, float(scaling), score_bias_E)
    weights, experts = route_reference(logits_NE, top_k, router, norm_topk_prob, score_bias_E, n_group, topk_group)
    return (weights if scaling == 1 else weights * scaling), experts
