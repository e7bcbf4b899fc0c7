"""Norms, short conv, rotary embedding, MLP and MoE against plain formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from hybridlm.config import HybridConfig
from hybridlm.layers import GatedRMSNorm, MoE, RMSNorm, RotaryEmbedding, ShortConv, SwiGLU
from hybridlm.layers.moe import route


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("zero_centered", [False, True])
def test_rmsnorm_formula(zero_centered):
    torch.manual_seed(0)
    norm = RMSNorm(8, eps=1e-6, zero_centered=zero_centered)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    scale = (1 + norm.weight.double()) if zero_centered else norm.weight.double()
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * scale
    assert rel_err(norm(x).double(), expected) < 1e-6
    assert norm(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_gated_rmsnorm_formula():
    torch.manual_seed(0)
    norm = GatedRMSNorm(8)
    with torch.no_grad():
        norm.weight.normal_()
    o, z = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8)
    expected = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight * z * torch.sigmoid(z)
    assert rel_err(norm(o, z), expected) < 1e-6


def conv_loop(x_BTC, weight_C1K):
    """y_t = silu(sum_j w_j x_{t - K + 1 + j}), zeros before the start."""
    B, T, C = x_BTC.shape
    K = weight_C1K.shape[-1]
    y = torch.zeros_like(x_BTC)
    for t in range(T):
        for j in range(K):
            s = t - K + 1 + j
            if s >= 0:
                y[:, t] += weight_C1K[:, 0, j] * x_BTC[:, s]
    return F.silu(y)


@pytest.mark.parametrize("kernel", [1, 2, 4])
def test_short_conv_full_matches_loop(kernel):
    torch.manual_seed(0)
    conv = ShortConv(6, kernel)
    x = torch.randn(2, 13, 6, dtype=torch.float64)
    assert rel_err(conv(x), conv_loop(x, conv.weight.double())) < 1e-12


@pytest.mark.parametrize("pieces", [[1] * 9, [3, 1, 5], [2, 7], [9]])
def test_short_conv_streaming_equals_full(pieces):
    torch.manual_seed(0)
    conv = ShortConv(5, 4)
    x = torch.randn(2, sum(pieces), 5)
    window = torch.zeros(2, 5, 3)
    outs, t = [], 0
    for n in pieces:
        outs.append(conv(x[:, t:t + n], window))
        t += n
    torch.testing.assert_close(torch.cat(outs, 1), conv(x), rtol=1e-6, atol=1e-6)
    # the window holds the last kernel-1 inputs, channels first
    torch.testing.assert_close(window, x[:, -3:].transpose(1, 2))


def test_rotary_rotates_only_first_channels_and_is_relative():
    torch.manual_seed(0)
    rope = RotaryEmbedding(8, 10_000.0)
    q, k = torch.randn(1, 1, 2, 16, dtype=torch.float64), torch.randn(1, 1, 2, 16, dtype=torch.float64)

    def at(x, p):
        return rope(x, torch.tensor([[p]]))

    assert torch.equal(at(q, 7)[..., 8:], q[..., 8:])
    torch.testing.assert_close(at(q, 0), q)
    torch.testing.assert_close(at(q, 5).norm(dim=-1), q.norm(dim=-1))
    # scores depend on the offset only: <R(p) q, R(p') k> == <R(p + s) q, R(p' + s) k>
    s1 = (at(q, 9) * at(k, 4)).sum(-1)
    s2 = (at(q, 105) * at(k, 100)).sum(-1)
    torch.testing.assert_close(s1, s2)


def test_rotary_matches_complex_rotation():
    torch.manual_seed(0)
    r, theta = 4, 500.0
    rope = RotaryEmbedding(r, theta)
    x = torch.randn(2, 3, 1, 6, dtype=torch.float64)
    pos = torch.tensor([[0, 3, 11], [2, 2, 40]])
    y = rope(x, pos)
    for i in range(r // 2):
        freq = theta ** (-2 * i / r)
        z = torch.complex(x[..., i], x[..., i + r // 2]) * torch.exp(1j * pos[..., None].double() * freq)
        torch.testing.assert_close(y[..., i], z.real)
        torch.testing.assert_close(y[..., i + r // 2], z.imag)


def test_swiglu_formula():
    torch.manual_seed(0)
    mlp = SwiGLU(8, 16)
    x = torch.randn(4, 8)
    expected = mlp.down_proj.weight @ (F.silu(mlp.gate_proj.weight @ x.T) * (mlp.up_proj.weight @ x.T))
    torch.testing.assert_close(mlp(x), expected.T)


def test_route_breaks_ties_toward_lower_index():
    logits = torch.tensor([[0.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 5.0, 0.0]])
    for router in ("softmax", "sigmoid"):
        _, experts = route(logits, 2, router, True)
        assert experts.tolist() == [[1, 2], [0, 1], [2, 0]]


def test_route_weights():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    w, e = route(logits, 2, "softmax", False)
    p = logits.softmax(-1)[0]
    torch.testing.assert_close(w[0], p[[1, 2]])
    w, e = route(logits, 2, "sigmoid", True)
    s = logits.sigmoid()[0, [1, 2]]
    torch.testing.assert_close(w[0], s / s.sum())


def test_route_score_bias_chooses_but_does_not_weigh():
    logits = torch.tensor([[3.0, 2.0, 1.0]])
    w, e = route(logits, 1, "sigmoid", False, score_bias_E=torch.tensor([0.0, 0.0, 1.0]))
    assert e.tolist() == [[2]]
    torch.testing.assert_close(w, logits.sigmoid()[:, 2:])


@pytest.mark.parametrize("router,shared", [("softmax", 0), ("sigmoid", 12)])
def test_moe_matches_per_token_loop(router, shared):
    torch.manual_seed(0)
    cfg = HybridConfig(hidden_size=16, num_experts=5, num_experts_per_tok=2, moe_intermediate_size=8,
                       shared_expert_intermediate_size=shared, router=router, norm_topk_prob=router == "sigmoid")
    moe = MoE(cfg)
    x = torch.randn(2, 7, 16)
    y = moe(x)
    for b in range(2):
        for t in range(7):
            xt = x[b, t]
            logits = moe.gate.weight @ xt
            scores = logits.softmax(-1) if router == "softmax" else logits.sigmoid()
            top = torch.topk(scores, 2).indices
            w = scores[top] / (scores[top].sum() if cfg.norm_topk_prob else 1.0)
            expected = sum(w[i] * moe.experts[int(top[i])](xt) for i in range(2))
            if shared:
                expected = expected + torch.sigmoid(moe.shared_expert_gate.weight @ xt) * moe.shared_expert(xt)
            torch.testing.assert_close(y[b, t], expected, rtol=1e-5, atol=1e-6)


def test_moe_gradients_reach_only_selected_experts():
    torch.manual_seed(0)
    cfg = HybridConfig(hidden_size=16, num_experts=8, num_experts_per_tok=1, moe_intermediate_size=8)
    moe = MoE(cfg)
    x = torch.randn(1, 1, 16)
    moe(x).sum().backward()
    used = [e for e, ex in enumerate(moe.experts) if ex.up_proj.weight.grad is not None]
    assert len(used) == 1
    assert math.isfinite(moe.gate.weight.grad.abs().sum().item())


def test_grouped_routing_picks_only_from_the_best_groups():
    """DeepSeek-V3 grouping: groups scored by the sum of their two best (biased) scores, experts chosen
    only inside the topk_group best groups; checked against a per-token brute force."""
    torch.manual_seed(0)
    logits, bias = torch.randn(50, 8), 0.3 * torch.randn(8)
    w, e = route(logits, 3, "sigmoid", True, score_bias_E=bias, n_group=4, topk_group=2)
    for n in range(50):
        choice = logits[n].sigmoid() + bias
        group_score = choice.view(4, 2).sum(-1)  # two experts per group: the sum of both
        groups = torch.topk(group_score, 2).indices
        allowed = torch.cat([torch.arange(2 * g, 2 * g + 2) for g in groups.tolist()])
        best = allowed[torch.topk(choice[allowed], 3).indices]
        assert sorted(e[n].tolist()) == sorted(best.tolist())
        s = logits[n].sigmoid()[e[n]]
        torch.testing.assert_close(w[n], s / s.sum())


def test_moe_scaled_routed_weights_and_ungated_shared_expert():
    """DeepSeek / Kimi: routed weights times routed_scaling_factor, the shared expert added as is."""
    torch.manual_seed(0)
    cfg = HybridConfig(hidden_size=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                       shared_expert_intermediate_size=8, shared_expert_gate=False, routed_scaling_factor=2.5,
                       router="sigmoid")
    moe = MoE(cfg)
    assert moe.shared_expert_gate is None
    x = torch.randn(1, 3, 16)
    x_N = x[0]
    w, e = route(moe.gate(x_N), 2, "sigmoid", True)
    routed = torch.stack([sum(2.5 * w[n, i] * moe.experts[int(e[n, i])](x_N[n]) for i in range(2))
                          for n in range(3)])
    torch.testing.assert_close(moe(x)[0], routed + moe.shared_expert(x_N), rtol=1e-5, atol=1e-6)
