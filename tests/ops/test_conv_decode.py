"""Gated DeltaNet's short conv and decode step in one kernel (``conv_gated_delta_rule_step``) against
the conv kernel followed by the step kernel (bit for bit on the CPU interpreter) and against the float64
references over several steps. The layer's static decode step with it: tests/test_static_decode.py.
"""

import doctest
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hybridlm.ops import gated_delta_rule_step  # noqa: E402
from hybridlm.ops.triton.conv import causal_conv_rows  # noqa: E402
from hybridlm.ops.triton.decode import (  # noqa: E402
    conv_gated_delta_rule_step,
    fused_recurrent_gated_delta_rule_step,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1, 2, 4, 16, 16, 4), (2, 1, 2, 32, 24, 3), (3, 2, 2, 16, 8, 2)]  # B, H, HV, K, V, KS


def make(B, H, HV, K, V, KS, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    C = 2 * H * K + HV * V
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=gen) * scale).to(DEVICE)  # noqa: E731
    return dict(x=[r(B, C).to(dtype) for _ in range(4)], window=r(B, C, KS - 1), weight=r(C, 1, KS, scale=0.5),
                a=r(B, HV), b=r(B, HV), state=r(B, HV, K, V, scale=0.1), A_log=r(HV).abs(), dt_bias=r(HV))


def two_kernels(d, H, x, window, state):
    B, HV, K, V = state.shape
    y = causal_conv_rows(x[:, None], d["weight"], window)[:, 0]
    q, k, v = y.split([H * K, H * K, HV * V], -1)
    o, _ = fused_recurrent_gated_delta_rule_step(q.reshape(B, H, K), k.reshape(B, H, K), v.reshape(B, HV, V), d["a"],
                                                 d["b"], state, use_qk_l2norm=True, inplace=True, A_log=d["A_log"],
                                                 dt_bias=d["dt_bias"], beta_is_logit=True)
    return o


def reference(d, H, x, window, state):
    """float64: ShortConv's sums over [window, x] and SiLU, then the reference step; window and state updated."""
    B, HV, K, V = state.shape
    KS = d["weight"].shape[-1]
    ext = torch.cat([window.double(), x.double()[:, :, None]], 2)
    y = F.silu((ext * d["weight"][:, 0].double()).sum(-1))
    window.copy_(ext[:, :, 1:])
    q, k, v = y.split([H * K, H * K, HV * V], -1)
    g = -d["A_log"].double().exp() * F.softplus(d["a"].double() + d["dt_bias"].double())
    o, new = gated_delta_rule_step(q.reshape(B, H, K), k.reshape(B, H, K), v.reshape(B, HV, V), g,
                                   torch.sigmoid(d["b"].double()), state, use_qk_l2norm=True, backend="reference")
    state.copy_(new)
    assert KS == window.shape[-1] + 1
    return o


@pytest.mark.parametrize("B, H, HV, K, V, KS", SHAPES)
def test_equals_conv_then_step_over_steps_and_matches_reference(B, H, HV, K, V, KS):
    d = make(B, H, HV, K, V, KS, seed=B * 10 + KS)
    win1, win2, win3 = (d["window"].clone() for _ in range(3))
    s1, s2, s3 = d["state"].clone(), d["state"].clone(), d["state"].double()
    tickets = torch.zeros(B * H + 3, dtype=torch.int32, device=DEVICE)
    for x in d["x"]:
        o1 = conv_gated_delta_rule_step(x, win1, d["weight"], tickets, d["a"], d["b"], s1, num_heads=H,
                                        use_qk_l2norm=True, A_log=d["A_log"], dt_bias=d["dt_bias"], beta_is_logit=True)
        o2 = two_kernels(d, H, x, win2, s2)
        o3 = reference(d, H, x, win3, s3)
        assert torch.isfinite(o1).all()
        if DEVICE == "cpu":
            assert torch.equal(o1, o2) and torch.equal(s1, s2) and torch.equal(win1, win2)
        else:  # the compiler may contract products into FMAs differently in the two programs
            torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-6)
            assert torch.equal(win1, win2)
        torch.testing.assert_close(o1.double(), o3, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(s1.double(), s3, rtol=1e-4, atol=1e-5)
        assert torch.equal(win1, win3)
    assert not tickets.any()


@pytest.mark.parametrize("bad, error, words", [
    (dict(num_heads=3), ValueError, "num_heads must be a positive int dividing"),
    (dict(x=torch.randn(1, 7)), ValueError, "x_BC must be \\[B, C\\]"),
    (dict(tickets=torch.zeros(1, dtype=torch.int32)), ValueError, "tickets must be a contiguous 1-D int32"),
    (dict(tickets=torch.zeros(4)), ValueError, "tickets must be a contiguous 1-D int32"),
    (dict(weight=torch.randn(128, 1, 5)), ValueError, "KS from 2 to 4"),
    (dict(window=torch.randn(1, 128, 2)), ValueError, "conv_window must be"),
    (dict(state=torch.randn(1, 4, 16, 16).transpose(2, 3)), ValueError, "state must be contiguous"),
])
def test_bad_inputs_raise(bad, error, words):
    d = make(1, 2, 4, 16, 16, 4, seed=0)
    kw = dict(x=d["x"][0], window=d["window"], weight=d["weight"], state=d["state"], num_heads=2,
              tickets=torch.zeros(2, dtype=torch.int32, device=DEVICE))
    kw.update({k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in bad.items()})
    with pytest.raises(error, match=words):
        conv_gated_delta_rule_step(kw["x"], kw["window"], kw["weight"], kw["tickets"], d["a"], d["b"], kw["state"],
                                   num_heads=kw["num_heads"])


def test_custom_op_passes_opcheck_and_compiles():
    d = make(1, 2, 4, 16, 16, 4, seed=1)
    tickets = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(torch.ops.hybridlm.gdn_conv_decode_step_.default,
                          (d["x"][0], d["window"].clone(), d["weight"][:, 0].contiguous(), tickets, d["a"], d["b"],
                           d["state"].clone(), 2, 0.25, True, d["A_log"], d["dt_bias"], True, False))
    win, state = d["window"].clone(), d["state"].clone()

    def step(x, win, state):
        return conv_gated_delta_rule_step(x, win, d["weight"], tickets, d["a"], d["b"], state, num_heads=2,
                                          use_qk_l2norm=True) * 2.0

    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    got = torch.compile(step, fullgraph=True, backend=backend)(d["x"][0], win, state)
    win2, state2 = d["window"].clone(), d["state"].clone()
    torch.testing.assert_close(got, step(d["x"][0], win2, state2), rtol=0, atol=0)
    assert torch.equal(win, win2) and torch.equal(state, state2) and not tickets.any()


def test_docstring_example():
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner()
    for test in finder.find(conv_gated_delta_rule_step, globs={"torch": torch,
                                                               "conv_gated_delta_rule_step": conv_gated_delta_rule_step}):
        runner.run(test)
    assert runner.failures == 0 and runner.tries > 0
