"""Kimi delta attention: chunked == token loop == decode steps, varlen, gradients, overflow, bad input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ops_testing import assert_close, delta_inputs, run_steps

from hybridlm.ops import gated_delta_rule_naive, kda, kda_chunked, kda_naive, kda_step

F64, F32 = torch.float64, torch.float32


def kda_inputs(B=2, T=65, H=2, HV=4, K=8, V=12, dtype=F64, seed=0, with_state=True, n_states=None, unit_keys=True):
    """As delta_inputs, with g [B, T, HV, K]: a log-decay per key channel."""
    q, k, v, _, beta, s0 = delta_inputs(B=B, T=T, H=H, HV=HV, K=K, V=V, dtype=dtype, seed=seed,
                                        with_state=with_state, n_states=n_states, unit_keys=unit_keys)
    gen = torch.Generator().manual_seed(seed + 1)
    g = (-torch.rand(B, T, HV, K, generator=gen, dtype=F64) * 0.7).to(dtype)
    return q, k, v, g, beta, s0


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("T", [1, 63, 64, 65])
@pytest.mark.parametrize("with_state,chunk_size", [(False, 16), (True, 64)])
def test_chunked_equals_naive(dtype, T, chunk_size, with_state):
    q, k, v, g, beta, s0 = kda_inputs(T=T, dtype=dtype, with_state=with_state)
    o_ref, s_ref = kda_naive(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    o, s = kda_chunked(q, k, v, g, beta, initial_state=s0, output_final_state=True, chunk_size=chunk_size)
    assert o.dtype == dtype and s.dtype == dtype
    assert_close(o, o_ref, dtype, "o")
    assert_close(s, s_ref, dtype, "final state")


def test_chunked_equals_naive_long(chunk_size=32):
    q, k, v, g, beta, s0 = kda_inputs(B=1, T=1000, H=1, HV=2)
    o_ref, s_ref = kda_naive(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    o, s = kda_chunked(q, k, v, g, beta, initial_state=s0, output_final_state=True, chunk_size=chunk_size)
    assert_close(o, o_ref, F64, "o")
    assert_close(s, s_ref, F64, "final state")


@settings(max_examples=10, deadline=None, derandomize=True)
@given(T=st.integers(1, 140), log2_chunk=st.integers(0, 7), seed=st.integers(0, 2**16))
def test_chunked_equals_naive_for_any_chunk(T, log2_chunk, seed):
    """Chunks below, at and above the 16-row sub-chunk, T not a multiple of anything."""
    q, k, v, g, beta, s0 = kda_inputs(B=1, T=T, seed=seed)
    o_ref, s_ref = kda_naive(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    o, s = kda_chunked(q, k, v, g, beta, initial_state=s0, output_final_state=True, chunk_size=2**log2_chunk)
    assert_close(o, o_ref, F64, "o")
    assert_close(s, s_ref, F64, "final state")


def test_uniform_channel_decay_is_the_gated_delta_rule():
    """Independent check of the math: g equal over K must give Gated DeltaNet exactly."""
    q, k, v, g, beta, s0 = kda_inputs(T=70)
    g_head = g[..., 0]
    o_ref, s_ref = gated_delta_rule_naive(q, k, v, g_head, beta, initial_state=s0, output_final_state=True)
    g_k = g_head[..., None].expand_as(g).contiguous()
    for fn in (kda_naive, kda_chunked):
        o, s = fn(q, k, v, g_k, beta, initial_state=s0, output_final_state=True)
        assert_close(o, o_ref, F64, f"{fn.__name__} o")
        assert_close(s, s_ref, F64, f"{fn.__name__} state")


def test_each_channel_decays_its_own_state_row():
    """One decay-free step from a known state: row c of S scales by exp(g_c) and no other."""
    q, k, v, g, _, s0 = kda_inputs(B=1, T=1, H=1, HV=1, K=4, V=3)
    o, s = kda_chunked(q, k, v, g, torch.zeros(1, 1, 1, dtype=F64), initial_state=s0, output_final_state=True)
    assert_close(s[0, 0], g[0, 0, 0].exp()[:, None] * s0[0, 0], F64, "state")
    assert_close(o[0, 0, 0], 0.5 * (q[0, 0, 0] @ s[0, 0]), F64, "o")  # scale = K ** -0.5 = 0.5


@pytest.mark.parametrize("T", [1, 65])
def test_steps_equal_naive(T):
    q, k, v, g, beta, s0 = kda_inputs(T=T)
    o_ref, s_ref = kda_naive(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    o, state = run_steps(kda_step, (q, k, v, g, beta), s0.clone())
    assert_close(o, o_ref, F64, "o")
    assert_close(state, s_ref, F64, "final state")


def test_step_inplace_writes_given_state_and_plain_step_does_not():
    q, k, v, g, beta, s0 = kda_inputs(T=1)
    before = s0.clone()
    o1, s1 = kda_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], s0)
    assert torch.equal(s0, before)
    o2, s2 = kda_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], s0, inplace=True)
    assert s2 is s0 and torch.equal(s2, s1) and torch.equal(o1, o2)


@pytest.mark.parametrize("with_state", [False, True])
def test_cu_seqlens_equals_per_sequence_loop(with_state):
    cu = torch.tensor([0, 1, 40, 105, 121], dtype=torch.int32)
    q, k, v, g, beta, s0 = kda_inputs(B=1, T=121, with_state=with_state, n_states=4)
    o, s = kda_chunked(q, k, v, g, beta, initial_state=s0, output_final_state=True, cu_seqlens=cu, chunk_size=16)
    for i, (bos, eos) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        init = None if s0 is None else s0[i : i + 1]
        sl = slice(bos, eos)
        o_i, s_i = kda_naive(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], initial_state=init,
                             output_final_state=True)
        assert_close(o[:, sl], o_i, F64, f"o of sequence {i}")
        assert_close(s[i : i + 1], s_i, F64, f"final state of sequence {i}")


def _grads(fn, inputs):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    o, s = fn(*leaves[:5], initial_state=leaves[5], output_final_state=True)
    w_o = torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)
    w_s = torch.linspace(1, -1, s.numel(), dtype=s.dtype).view_as(s)
    ((o * w_o).sum() + (s * w_s).sum()).backward()
    return [x.grad for x in leaves]


def test_chunked_gradients_equal_naive():
    inputs = kda_inputs(T=45)
    g_ref = _grads(kda_naive, inputs)
    g_chunk = _grads(lambda *a, **kw: kda_chunked(*a, chunk_size=32, **kw), inputs)
    for name, a, b in zip(["q", "k", "v", "g", "beta", "initial_state"], g_chunk, g_ref):
        assert torch.isfinite(a).all(), name
        assert_close(a, b, F64, f"grad of {name}")


def test_large_decay_does_not_overflow():
    """Half the channels forget at -30 per token (cumsum -1920 in a chunk), half keep everything."""
    q, k, v, g, beta, s0 = kda_inputs(T=64, dtype=F32)
    g = torch.zeros_like(g)
    g[..., ::2] = -30.0
    o, s = kda_chunked(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    o_ref, s_ref = kda_naive(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    assert_close(o, o_ref, F32, "o")
    assert_close(s, s_ref, F32, "final state")


def test_l2norm_and_bf16():
    q, k, v, g, beta, s0 = kda_inputs(T=40, unit_keys=False)
    n = lambda x: x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)  # noqa: E731
    o, s = kda(q, k, v, g, beta, initial_state=s0, output_final_state=True, use_qk_l2norm=True, chunk_size=16)
    o_ref, s_ref = kda_naive(n(q), n(k), v, g, beta, initial_state=s0, output_final_state=True)
    assert_close(o, o_ref, F64, "o")
    assert_close(s, s_ref, F64, "state")
    bf = [x.to(torch.bfloat16) for x in (q, k, v, g, beta)]
    o_bf, s_bf = kda(*bf, initial_state=s0.float(), output_final_state=True, use_qk_l2norm=True)
    assert o_bf.dtype == torch.bfloat16 and s_bf.dtype == F32


def test_bad_inputs_name_the_argument():
    q, k, v, g, beta, s0 = kda_inputs(T=5)
    with pytest.raises(ValueError, match=r"g must be 4-D \[B, T, HV, K\]"):
        kda(q, k, v, g[..., 0], beta)
    with pytest.raises(TypeError, match="g must"):
        kda(q, k, v, g.long(), beta)
    with pytest.raises(ValueError, match="beta"):
        kda(q, k, v, g, beta[:, :, :2])
    with pytest.raises(ValueError, match="g must be a log-decay"):
        kda(q, k, v, -g, beta, check_inputs=True)
    with pytest.raises(RuntimeError, match="triton"):
        kda(q, k, v, g, beta, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        kda(q, k, v, g, beta, backend="cuda")
    with pytest.raises(ValueError, match="g must have shape"):
        kda_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0, :, :3], beta[:, 0], s0)
    with pytest.raises(ValueError, match="state"):
        kda_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], s0[:1])


def test_matches_transformers_kimi_linear_reference():
    """Interop: transformers' PyTorch KDA (recurrent and chunked fallbacks of kimi_linear), float32."""
    kl = pytest.importorskip("transformers.models.kimi_linear.modeling_kimi_linear")
    q, k, v, g, beta, s0 = kda_inputs(T=37, H=2, HV=2, dtype=F32, unit_keys=False)
    o, s = kda_naive(q, k, v, g, beta, initial_state=s0, output_final_state=True, use_qk_l2norm=True)
    # named here: from transformers 5.25 these are callable nn.Module wrappers with no __name__
    for name in ("recurrent_kimi_delta_attention", "chunk_kimi_delta_attention"):
        o_tf, s_tf = getattr(kl, name)(q, k, v, g, beta, initial_state=s0.clone(), output_final_state=True,
                                       use_qk_l2norm_in_kernel=True)
        assert_close(o, o_tf, F32, f"{name} o")
        assert_close(s, s_tf, F32, f"{name} state")
