"""Bad input raises ValueError/TypeError whose message names the argument and what was expected."""

import pytest
import torch
from ops_testing import delta_inputs, python_with_env

from hybridlm.ops import (
    delta_rule,
    gated_delta_rule,
    gated_delta_rule_step,
    linear_attention,
    linear_attention_step,
    softmax_attention,
)

Q, K, V, G, BETA, S0 = delta_inputs(B=1, T=10, H=2, HV=4, K=8, V=6, dtype=torch.float32)


def _call(fn, positional, defaults, over):
    """A thunk calling fn with the named positional inputs, then the remaining overrides as keywords."""
    args = {**defaults, **over}
    return lambda: fn(*(args[n] for n in positional), **{n: x for n, x in args.items() if n not in positional})


def gdr(**over):
    return _call(gated_delta_rule, ("q", "k", "v", "g", "beta"), dict(q=Q, k=K, v=V, g=G, beta=BETA), over)


def step(**over):
    inputs = dict(q=Q[:, 0], k=K[:, 0], v=V[:, 0], g=G[:, 0], beta=BETA[:, 0], state=S0)
    return _call(gated_delta_rule_step, tuple(inputs), inputs, over)


def la(**over):
    return _call(linear_attention, ("q", "k", "v"), dict(q=Q, k=K, v=V), over)


def sm(**over):
    return _call(softmax_attention, ("q", "k", "v"), dict(q=Q, k=K, v=K), over)


CASES = {
    "q rank": (gdr(q=Q[0]), ValueError, "q must be 4-D"),
    "q not a tensor": (gdr(q=Q.tolist()), TypeError, "q must be a torch.Tensor"),
    "integer k": (gdr(k=K.long()), TypeError, "k must have a floating-point dtype"),
    "k dtype differs": (gdr(k=K.double()), TypeError, "k must have the same dtype as q"),
    "k shape differs": (gdr(k=K[:, :, :1]), ValueError, "k must have the shape of q"),
    "v tokens differ": (gdr(v=V[:, :5]), ValueError, "v must match q in the batch and token dims"),
    "HV not multiple of H": (gdr(v=V[:, :, :3]), ValueError, "multiple of q's H"),
    "no tokens": (gdr(q=Q[:, :0], k=K[:, :0], v=V[:, :0], g=G[:, :0], beta=BETA[:, :0]), ValueError, "at least one"),
    "g shape": (gdr(g=G[:, :, :2]), ValueError, "g must have shape [B, T, HV]"),
    "beta rank": (gdr(beta=BETA[..., None]), ValueError, "beta must be 3-D"),
    "integer beta": (gdr(beta=BETA.long()), TypeError, "beta must have a floating-point dtype"),
    "state shape": (gdr(initial_state=S0[..., :5]), ValueError, "initial_state must have shape (1, 4, 8, 6)"),
    "state rank": (gdr(initial_state=S0[0]), ValueError, "initial_state must be 4-D"),
    "chunk not power of 2": (gdr(chunk_size=48), ValueError, "chunk_size must be a positive power of two"),
    "chunk zero": (gdr(chunk_size=0), ValueError, "chunk_size must be a positive power of two"),
    "chunk float": (gdr(chunk_size=64.0), TypeError, "chunk_size must be an int"),
    "unknown backend": (gdr(backend="cuda"), ValueError, "backend must be one of"),
    "scale string": (gdr(scale="0.1"), TypeError, "scale must be a float"),
    "l2norm not bool": (gdr(use_qk_l2norm=1), TypeError, "use_qk_l2norm must be a bool"),
    "g positive checked": (gdr(g=-G, check_inputs=True), ValueError, "g must be a log-decay <= 0"),
    "beta > 1 checked": (gdr(beta=BETA + 1, check_inputs=True), ValueError, "beta must lie in [0, 1]"),
    "cu float": (gdr(cu_seqlens=torch.tensor([0.0, 10.0])), TypeError, "cu_seqlens must have dtype int32 or int64"),
    "cu list": (gdr(cu_seqlens=[0, 10]), TypeError, "cu_seqlens must be a torch.Tensor"),
    "cu empty": (gdr(cu_seqlens=torch.tensor([0])), ValueError, "cu_seqlens must be 1-D [N + 1]"),
    "cu 2-D": (gdr(cu_seqlens=torch.tensor([[0, 10]])), ValueError, "cu_seqlens must be 1-D [N + 1]"),
    "cu start": (gdr(cu_seqlens=torch.tensor([1, 10])), ValueError, "cu_seqlens must start at 0"),
    "cu unsorted": (gdr(cu_seqlens=torch.tensor([0, 6, 4, 10])), ValueError, "cu_seqlens must be strictly increasing"),
    "cu empty sequence": (gdr(cu_seqlens=torch.tensor([0, 4, 4, 10])), ValueError, "strictly increasing"),
    "cu end": (gdr(cu_seqlens=torch.tensor([0, 4, 9])), ValueError, "cu_seqlens must end at the token count T = 10"),
    "cu with B > 1": (gdr(**{n: x.expand(2, *x.shape[1:]) for n, x in dict(q=Q, k=K, v=V, g=G, beta=BETA).items()},
                          cu_seqlens=torch.tensor([0, 10])), ValueError, "batch size B must be 1"),
    "cu state count": (gdr(cu_seqlens=torch.tensor([0, 4, 10]), initial_state=S0), ValueError,
                       "initial_state must have shape (2, 4, 8, 6)"),
    "delta rule beta": (lambda: delta_rule(Q, K, V, BETA[0]), ValueError, "beta must be 3-D"),
    "step q rank": (step(q=Q), ValueError, "q must be 3-D [B, H, K]"),
    "step state shape": (step(state=S0[:, :2]), ValueError, "state must have shape (1, 4, 8, 6)"),
    "step g shape": (step(g=G[:, 0, :2]), ValueError, "g must have shape [B, HV]"),
    "step inplace": (step(inplace=1), TypeError, "inplace must be a bool"),
    "step backend": (step(backend="fast"), ValueError, "backend must be one of"),
    "la feature map": (la(feature_map="softmax"), ValueError, "feature_map must be one of"),
    "la normalize": (la(normalize="yes"), TypeError, "normalize must be a bool"),
    "la normaliser state": (la(normalize=True, initial_state=S0), ValueError,
                            "initial_state must have shape (1, 4, 8, 7)"),
    "la g shape": (la(g=G[:, :, :1]), ValueError, "g must have shape [B, T, HV]"),
    "la g checked": (la(g=-G, check_inputs=True), ValueError, "g must be a log-decay <= 0"),
    "la step state": (lambda: linear_attention_step(Q[:, 0], K[:, 0], V[:, 0], S0[0]), ValueError, "state must be 4-D"),
    "sm backend": (sm(backend="triton"), ValueError, "backend must be one of"),
    "sm kv heads": (sm(k=V[..., :8], v=V), ValueError, "k must be [B, S, HKV, D]"),
    "sm HKV": (sm(k=torch.zeros(1, 10, 3, 8), v=torch.zeros(1, 10, 3, 8)), ValueError, "HKV dividing q's H"),
    "sm window": (sm(window=0), ValueError, "window must be a positive int"),
    "sm causal": (sm(causal=None), TypeError, "causal must be a bool"),
    "sm float positions": (sm(q_pos=torch.zeros(1, 10)), TypeError, "q_pos must be an integer tensor"),
    "sm position shape": (sm(k_pos=torch.zeros(10, dtype=torch.long)), ValueError, "k_pos must have shape (1, 10)"),
    "sm v dtype": (sm(v=K.double()), TypeError, "v must have the same dtype as q"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_named(case):
    call, exc, message = CASES[case]
    with pytest.raises(exc) as info:
        call()
    assert message in str(info.value), f"{case}: {info.value}"


def test_value_checks_are_off_by_default():
    """g > 0 and beta > 1 are the caller's business unless check_inputs=True (that check syncs the device)."""
    o, _ = gated_delta_rule(Q, K, V, G.abs() * 0, BETA + 0.5)
    assert torch.isfinite(o).all()


def test_device_mismatch_is_named():
    meta = torch.empty(1, 10, 4, device="meta")
    with pytest.raises(ValueError, match="g must be on the same device as q"):
        gated_delta_rule(Q, K, V, meta, BETA)


@pytest.mark.parametrize("default", [False, True])
def test_env_switch_reads_0_1_and_the_default_and_refuses_the_rest(default, monkeypatch):
    from hybridlm.ops._checks import env_switch

    monkeypatch.delenv("HYBRIDLM_TEST_SWITCH", raising=False)
    assert env_switch("HYBRIDLM_TEST_SWITCH", "off", "on", default=default) is default
    for value, want in (("0", False), ("1", True)):
        monkeypatch.setenv("HYBRIDLM_TEST_SWITCH", value)
        assert env_switch("HYBRIDLM_TEST_SWITCH", "off", "on", default=default) is want
    monkeypatch.setenv("HYBRIDLM_TEST_SWITCH", "yes")
    said = "1 \\(on, the default\\)" if default else "0 \\(off, the default\\)"
    with pytest.raises(ValueError, match=f"HYBRIDLM_TEST_SWITCH must be .*{said}.*'yes'"):
        env_switch("HYBRIDLM_TEST_SWITCH", "off", "on", default=default)


@pytest.mark.parametrize("value, want", [(None, True), ("0", False), ("1", True)])
def test_the_greedy_kernel_switch_is_on_unless_turned_off(value, want):
    run = python_with_env("import hybridlm.generation as g; print(g.GREEDY_KERNEL)", "HYBRIDLM_GREEDY_KERNEL", value)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [str(want)]
