"""Linear attention: chunked == token loop == decode steps for each feature map, decay, normaliser."""

import pytest
import torch
from ops_testing import assert_close, delta_inputs

from hybridlm.ops import linear_attention, linear_attention_chunked, linear_attention_naive, linear_attention_step

F64, F32 = torch.float64, torch.float32


def _inputs(T=65, HV=2, dtype=F64, with_state=True, normalize=False, with_g=True, positive=False, **kw):
    q, k, v, g, _, s0 = delta_inputs(T=T, HV=HV, dtype=dtype, with_state=with_state, unit_keys=False, **kw)
    if positive:  # the identity map with the normaliser needs phi(q).z > 0 to be well conditioned
        q, k = q.abs(), k.abs()
    if s0 is not None and normalize:  # the normaliser column z must be positive like any sum of phi(k)
        s0 = torch.cat([s0, s0[..., :1].abs() + 1], -1)
    return q, k, v, (g if with_g else None), s0


@pytest.mark.parametrize("feature_map", ["identity", "elu", "relu"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("with_g", [False, True])
@pytest.mark.parametrize("T", [1, 63, 65])
@pytest.mark.parametrize("HV", [2, 4])
def test_chunked_equals_naive_float64(feature_map, normalize, with_g, T, HV):
    q, k, v, g, s0 = _inputs(T=T, HV=HV, normalize=normalize, with_g=with_g)
    o_ref, s_ref = linear_attention_naive(q, k, v, g, feature_map=feature_map, normalize=normalize,
                                          initial_state=s0, output_final_state=True)
    for chunk_size in (16, 64):
        o, s = linear_attention_chunked(q, k, v, g, feature_map=feature_map, normalize=normalize, initial_state=s0,
                                        output_final_state=True, chunk_size=chunk_size)
        assert s.shape == (2, HV, 8, 12 + normalize)
        assert_close(o, o_ref, F64, "o")
        assert_close(s, s_ref, F64, "final state")


@pytest.mark.parametrize("feature_map", ["identity", "elu", "relu"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("chunk_size", [16, 32, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_naive_float32(feature_map, normalize, chunk_size, with_state):
    q, k, v, g, s0 = _inputs(T=64, HV=4, dtype=F32, normalize=normalize, with_state=with_state, positive=normalize)
    o_ref, s_ref = linear_attention_naive(q, k, v, g, feature_map=feature_map, normalize=normalize,
                                          initial_state=s0, output_final_state=True)
    o, s = linear_attention_chunked(q, k, v, g, feature_map=feature_map, normalize=normalize, initial_state=s0,
                                    output_final_state=True, chunk_size=chunk_size)
    assert o.dtype == F32 and s.dtype == F32
    assert_close(o, o_ref, F32, "o")
    assert_close(s, s_ref, F32, "final state")


def test_chunked_equals_naive_long():
    q, k, v, g, s0 = _inputs(T=1000, HV=4, normalize=True, B=1)
    o_ref, s_ref = linear_attention_naive(q, k, v, g, feature_map="elu", normalize=True, initial_state=s0,
                                          output_final_state=True)
    o, s = linear_attention(q, k, v, g, feature_map="elu", normalize=True, initial_state=s0, output_final_state=True)
    assert_close(o, o_ref, F64, "o")
    assert_close(s, s_ref, F64, "final state")


def test_naive_equals_quadratic_form():
    """o_t = scale sum_{s<=t} exp(G_t - G_s) (phi(q_t).phi(k_s)) v_s / normaliser: the attention view."""
    q, k, v, g, _ = _inputs(T=30, HV=2, with_state=False)
    fq, fk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    G = g.cumsum(1)  # [B, T, HV]
    mask = torch.ones(30, 30, dtype=torch.bool).tril()
    decay = torch.exp((G[:, :, None] - G[:, None, :]).masked_fill(~mask[None, :, :, None], float("-inf")))
    scores = torch.einsum("bthk,bshk->btsh", fq, fk) * decay * 8 ** -0.5  # [B, T, S, HV]
    num = torch.einsum("btsh,bshv->bthv", scores, v)
    den = scores.sum(2)[..., None]
    o, _ = linear_attention_naive(q, k, v, g, feature_map="elu", normalize=True)
    assert_close(o, num / (den + 1e-6), F64, "o")
    o, _ = linear_attention_naive(q, k, v, g, feature_map="elu")
    assert_close(o, num, F64, "o unnormalised")


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("with_g", [False, True])
def test_steps_equal_naive(normalize, with_g):
    q, k, v, g, s0 = _inputs(T=20, HV=4, normalize=normalize, with_g=with_g)
    o_ref, s_ref = linear_attention_naive(q, k, v, g, feature_map="relu", normalize=normalize, initial_state=s0,
                                          output_final_state=True)
    state, outs = s0, []
    for t in range(q.shape[1]):
        o_t, state = linear_attention_step(q[:, t], k[:, t], v[:, t], state, None if g is None else g[:, t],
                                           feature_map="relu", normalize=normalize)
        outs.append(o_t)
    assert_close(torch.stack(outs, 1), o_ref, F64, "o")
    assert_close(state, s_ref, F64, "final state")


@pytest.mark.parametrize("normalize", [False, True])
def test_cu_seqlens_equals_per_sequence_loop(normalize):
    cu = torch.tensor([0, 1, 40, 105, 121])
    q, k, v, g, s0 = _inputs(T=121, HV=4, normalize=normalize, B=1, n_states=4)
    o, s = linear_attention_chunked(q, k, v, g, feature_map="elu", normalize=normalize, initial_state=s0,
                                    output_final_state=True, cu_seqlens=cu, chunk_size=16)
    for i, (bos, eos) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        sl = slice(bos, eos)
        o_i, s_i = linear_attention_naive(q[:, sl], k[:, sl], v[:, sl], g[:, sl], feature_map="elu",
                                          normalize=normalize, initial_state=s0[i : i + 1], output_final_state=True)
        assert_close(o[:, sl], o_i, F64, f"o of sequence {i}")
        assert_close(s[i : i + 1], s_i, F64, f"state of sequence {i}")


def test_chunked_gradients_equal_naive():
    q, k, v, g, s0 = _inputs(T=37, HV=4, normalize=True)
    inputs = [x.clone().requires_grad_(True) for x in (q, k, v, g, s0)]
    grads = []
    for fn in (linear_attention_naive, lambda *a, **kw: linear_attention_chunked(*a, chunk_size=16, **kw)):
        o, s = fn(*inputs[:4], feature_map="elu", normalize=True, initial_state=inputs[4], output_final_state=True)
        w = torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)
        grads.append(torch.autograd.grad((o * w).sum() + s.square().sum(), inputs))
    for name, a, b in zip(["q", "k", "v", "g", "initial_state"], *grads):
        assert_close(a, b, F64, f"grad of {name}")


def test_bf16_inputs_give_bf16_output_and_fp32_state():
    q, k, v, g, s0 = _inputs(T=40, HV=4, dtype=torch.bfloat16)
    o, s = linear_attention(q, k, v, g, feature_map="elu", initial_state=s0, output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == F32
    o_ref, _ = linear_attention_naive(q.float(), k.float(), v.float(), g.float(), feature_map="elu",
                                      initial_state=s0)
    assert_close(o.float(), o_ref, torch.bfloat16, "o")


def test_relu_query_with_no_overlap_gives_zero_not_nan():
    q, k, v, _, _ = _inputs(T=5, with_state=False)
    o, _ = linear_attention_chunked(-q.abs(), k, v, feature_map="relu", normalize=True)
    assert torch.equal(o, torch.zeros_like(o))
