"""Lightning attention: block-wise == token loop == decode steps, varlen, gradients, slopes, bad input."""

import pytest
import torch
from ops_testing import assert_close, run_steps

from hybridlm.ops import (
    lightning_attention,
    lightning_attention_chunked,
    lightning_attention_naive,
    lightning_attention_step,
    lightning_slopes,
    linear_attention_naive,
)

F64, F32 = torch.float64, torch.float32


def lightning_inputs(B=2, T=65, H=2, HV=4, K=8, V=6, dtype=F64, seed=0, with_state=True, n_states=None):
    """q, k [B, T, H, K] and v [B, T, HV, V] scaled like SiLU outputs; slopes of a 4-layer model's layer 1."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    q, k, v = (torch.nn.functional.silu(x) / 4 for x in (rand(B, T, H, K), rand(B, T, H, K), rand(B, T, HV, V)))
    slope = lightning_slopes(HV, layer_idx=1, num_layers=4).double()
    s0 = rand(n_states or B, HV, K, V) if with_state else None
    state_dtype = F64 if dtype == F64 else F32
    return q.to(dtype), k.to(dtype), v.to(dtype), slope, None if s0 is None else s0.to(state_dtype)


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("T", [1, 63, 64, 65])
@pytest.mark.parametrize("with_state,chunk_size", [(False, 16), (True, 64)])
def test_blockwise_equals_naive(dtype, T, with_state, chunk_size):
    q, k, v, slope, s0 = lightning_inputs(T=T, dtype=dtype, with_state=with_state)
    o_ref, s_ref = lightning_attention_naive(q, k, v, slope, initial_state=s0, output_final_state=True)
    o, s = lightning_attention_chunked(q, k, v, slope, initial_state=s0, output_final_state=True,
                                       chunk_size=chunk_size)
    assert o.dtype == dtype and s.dtype == dtype
    assert_close(o, o_ref, dtype, "o")
    assert_close(s, s_ref, dtype, "final state")


def test_blockwise_equals_naive_long():
    q, k, v, slope, s0 = lightning_inputs(B=1, T=1000, H=1, HV=2)
    o_ref, s_ref = lightning_attention_naive(q, k, v, slope, initial_state=s0, output_final_state=True)
    o, s = lightning_attention(q, k, v, slope, initial_state=s0, output_final_state=True)
    assert_close(o, o_ref, F64, "o")
    assert_close(s, s_ref, F64, "final state")


def test_zero_slope_is_plain_linear_attention_and_slope_matters():
    q, k, v, slope, s0 = lightning_inputs(T=30)
    o_ref, _ = linear_attention_naive(q, k, v, scale=1.0, initial_state=s0)
    o0, _ = lightning_attention_naive(q, k, v, torch.zeros_like(slope), initial_state=s0)
    assert_close(o0, o_ref, F64, "o")
    o, _ = lightning_attention_naive(q, k, v, slope, initial_state=s0)
    assert (o - o0).abs().max() > 1e-2


def test_first_tokens_by_hand():
    """Two tokens from a zero state: o_2 = scale q_2 . (exp(-s) k_1 v_1^T + k_2 v_2^T)."""
    q, k, v, slope, _ = lightning_inputs(B=1, T=2, H=1, HV=1, K=3, V=2)
    o, _ = lightning_attention_chunked(q, k, v, slope, scale=0.5)
    S = torch.exp(-slope[0]) * torch.outer(k[0, 0, 0], v[0, 0, 0]) + torch.outer(k[0, 1, 0], v[0, 1, 0])
    assert_close(o[0, 1, 0], 0.5 * q[0, 1, 0] @ S, F64, "o")


@pytest.mark.parametrize("T", [1, 65])
def test_steps_equal_naive(T):
    q, k, v, slope, s0 = lightning_inputs(T=T)
    o_ref, s_ref = lightning_attention_naive(q, k, v, slope, initial_state=s0, output_final_state=True)
    o, state = run_steps(lightning_attention_step, (q, k, v), s0.clone(), slope)
    assert_close(o, o_ref, F64, "o")
    assert_close(state, s_ref, F64, "final state")
    o1, s1 = lightning_attention_step(q[:, 0], k[:, 0], v[:, 0], slope, s0)
    o2, s2 = lightning_attention_step(q[:, 0], k[:, 0], v[:, 0], slope, s0, inplace=True)
    assert s2 is s0 and torch.equal(s1, s2) and torch.equal(o1, o2)


@pytest.mark.parametrize("with_state", [False, True])
def test_cu_seqlens_equals_per_sequence_loop(with_state):
    cu = torch.tensor([0, 1, 40, 105, 121], dtype=torch.int64)
    q, k, v, slope, s0 = lightning_inputs(B=1, T=121, with_state=with_state, n_states=4)
    o, s = lightning_attention_chunked(q, k, v, slope, initial_state=s0, output_final_state=True, cu_seqlens=cu,
                                       chunk_size=16)
    o_n, s_n = lightning_attention_naive(q, k, v, slope, initial_state=s0, output_final_state=True, cu_seqlens=cu)
    assert_close(o_n, o, F64, "naive varlen o")
    assert_close(s_n, s, F64, "naive varlen state")
    for i, (bos, eos) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        init = None if s0 is None else s0[i : i + 1]
        sl = slice(bos, eos)
        o_i, s_i = lightning_attention_naive(q[:, sl], k[:, sl], v[:, sl], slope, initial_state=init,
                                             output_final_state=True)
        assert_close(o[:, sl], o_i, F64, f"o of sequence {i}")
        assert_close(s[i : i + 1], s_i, F64, f"final state of sequence {i}")


def test_blockwise_gradients_equal_naive():
    inputs = lightning_inputs(T=45)

    def grads(fn):
        leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
        o, s = fn(*leaves[:4], initial_state=leaves[4], output_final_state=True)
        w_o = torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)
        ((o * w_o).sum() + s.sin().sum()).backward()
        return [x.grad for x in leaves]

    ref = grads(lightning_attention_naive)
    got = grads(lambda *a, **kw: lightning_attention_chunked(*a, chunk_size=16, **kw))
    for name, a, b in zip(["q", "k", "v", "slope", "initial_state"], got, ref):
        assert_close(a, b, F64, f"grad of {name}")


def test_slopes_follow_minimax_schedule():
    assert torch.allclose(lightning_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    s = lightning_slopes(64)
    assert s.dtype == F32 and s.shape == (64,) and torch.allclose(s[1:] / s[:-1], s[:1].expand(63))
    first, last = lightning_slopes(64, 0, 80), lightning_slopes(64, 79, 80)
    assert torch.allclose(first, s * (1 + 1e-5)) and (last < 2e-4 * s).all() and (last > 0).all()


def test_bad_inputs_name_the_argument():
    q, k, v, slope, s0 = lightning_inputs(T=5)
    with pytest.raises(ValueError, match="slope must have shape"):
        lightning_attention(q, k, v, slope[:2])
    with pytest.raises(TypeError, match="slope must be a torch.Tensor"):
        lightning_attention(q, k, v, [0.5, 0.25, 0.1, 0.1])
    with pytest.raises(ValueError, match="slope must be >= 0"):
        lightning_attention(q, k, v, -slope, check_inputs=True)
    with pytest.raises(RuntimeError, match="triton"):
        lightning_attention(q, k, v, slope, backend="triton")
    with pytest.raises(ValueError, match="initial_state"):
        lightning_attention_naive(q, k, v, slope, initial_state=s0[:1])
    with pytest.raises(ValueError, match="state"):
        lightning_attention_step(q[:, 0], k[:, 0], v[:, 0], slope, s0[..., :2])
    with pytest.raises(ValueError, match="layer_idx"):
        lightning_slopes(8, layer_idx=8, num_layers=8)
    with pytest.raises(TypeError, match="num_heads"):
        lightning_slopes(8.0)


def test_matches_transformers_minimax_lightning_attention():
    """Interop: transformers' MiniMax layer (blocks of 16) == its projections around our op; same slopes and state."""
    tf = pytest.importorskip("transformers")
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    cfg = tf.MiniMaxConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                           num_hidden_layers=4, block_size=16)
    torch.manual_seed(0)
    layer = MiniMaxLightningAttention(cfg, layer_idx=1)
    assert torch.equal(layer.slope_rate.flatten(), lightning_slopes(4, layer_idx=1, num_layers=4))
    layer = layer.double()
    x = torch.randn(2, 37, 32, dtype=F64)
    with torch.no_grad():
        out_tf, state_tf = layer(x, None, None)
        q, k, v = layer.act_fn(layer.qkv_proj(x)).view(2, 37, 4, 24).split(8, -1)
        o, state = lightning_attention(q, k, v, layer.slope_rate.flatten(), output_final_state=True)
        out = layer.out_proj(torch.sigmoid(layer.output_gate(x)) * layer.norm(o.reshape(2, 37, 32)))
    # transformers builds its decay tables in float32 before .double(): agreement to ~1e-7, not 1e-10
    assert_close(out, out_tf, F32, "layer output")
    assert_close(state, state_tf, F32, "final state")
