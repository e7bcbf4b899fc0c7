"""MLA: the absorbed (decode) form equals the expanded form; per-head layout; cached decode; grads; bad input."""

import pytest
import torch
from ops_testing import assert_close

from hybridlm.ops import mla_attention

F64, F32 = torch.float64, torch.float32


def mla_inputs(B=2, T=65, S=None, H=4, Dn=8, Dr=4, Dv=6, R=12, dtype=F64, seed=0):
    """q_nope [B, T, H, Dn], q_rope [B, T, H, Dr], kv_latent [B, S, R], k_rope [B, S, Dr], w_kv_b [H (Dn + Dv), R]."""
    gen = torch.Generator().manual_seed(seed)
    S = T if S is None else S
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=F64).to(dtype)  # noqa: E731
    return rand(B, T, H, Dn), rand(B, T, H, Dr), rand(B, S, R), rand(B, S, Dr), rand(H * (Dn + Dv), R) / R ** 0.5


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("T", [1, 63, 65])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_absorbed_equals_expanded(dtype, T, backend):
    x = mla_inputs(T=T, dtype=dtype)
    o_ref = mla_attention(*x, backend=backend)
    o = mla_attention(*x, absorb=True, backend=backend)
    assert o.dtype == dtype and o.shape == (2, T, 4, 6)
    assert_close(o, o_ref, dtype, "o")


def test_expanded_follows_the_checkpoint_layout():
    """Head h's key rows are w_kv_b[h (Dn + Dv) : h (Dn + Dv) + Dn], its value rows the next Dv."""
    q_nope, q_rope, c, k_rope, w = mla_inputs(B=1, T=7, H=2, Dn=3, Dr=2, Dv=5, R=4)
    o = mla_attention(q_nope, q_rope, c, k_rope, w, scale=0.3)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    for h in range(2):
        rows = w[h * 8 : (h + 1) * 8]
        k = torch.cat([c[0] @ rows[:3].T, k_rope[0]], -1)
        v = c[0] @ rows[3:].T
        scores = 0.3 * torch.cat([q_nope[0, :, h], q_rope[0, :, h]], -1) @ k.T
        p = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        assert_close(o[0, :, h], p @ v, F64, f"head {h}")


def test_decode_over_cached_latents_equals_full_forward():
    """Prefill 20 tokens, then decode 5 one by one against a 32-slot cache whose empty slots have k_pos -1."""
    T, slots, B = 25, 32, 2
    q_nope, q_rope, c, k_rope, w = mla_inputs(B=B, T=T)
    full = mla_attention(q_nope, q_rope, c, k_rope, w)
    cache_c = torch.zeros(B, slots, c.shape[-1], dtype=F64)
    cache_r = torch.zeros(B, slots, k_rope.shape[-1], dtype=F64)
    k_pos = torch.full((B, slots), -1)
    cache_c[:, :20], cache_r[:, :20], k_pos[:, :20] = c[:, :20], k_rope[:, :20], torch.arange(20)
    prefill = mla_attention(q_nope[:, :20], q_rope[:, :20], cache_c, cache_r, w, q_pos=torch.arange(20).expand(B, 20),
                            k_pos=k_pos, absorb=True)
    assert_close(prefill, full[:, :20], F64, "prefill")
    for t in range(20, T):
        cache_c[:, t], cache_r[:, t], k_pos[:, t] = c[:, t], k_rope[:, t], t
        o_t = mla_attention(q_nope[:, t : t + 1], q_rope[:, t : t + 1], cache_c, cache_r, w,
                            q_pos=torch.full((B, 1), t), k_pos=k_pos, absorb=True)
        assert_close(o_t, full[:, t : t + 1], F64, f"decode token {t}")


def test_non_causal_and_scale():
    x = mla_inputs(T=9, S=13)
    a = mla_attention(*x, causal=False, scale=0.2)
    b = mla_attention(*x, causal=False, scale=0.2, absorb=True)
    assert_close(b, a, F64, "o")
    assert (a - mla_attention(*x, causal=False)).abs().max() > 1e-3


def test_absorbed_gradients_equal_expanded():
    def grads(absorb):
        leaves = [t.clone().requires_grad_(True) for t in mla_inputs(T=17)]
        o = mla_attention(*leaves, absorb=absorb)
        (o * torch.linspace(-1, 1, o.numel(), dtype=F64).view_as(o)).sum().backward()
        return [t.grad for t in leaves]

    for name, a, b in zip(["q_nope", "q_rope", "kv_latent", "k_rope", "w_kv_b"], grads(True), grads(False)):
        assert_close(a, b, F64, f"grad of {name}")


def test_bf16_output_dtype():
    x = mla_inputs(T=10, dtype=torch.bfloat16)
    o = mla_attention(*x, absorb=True)
    o_ref = mla_attention(*(t.double() for t in x))
    assert o.dtype == torch.bfloat16
    assert_close(o.double(), o_ref, torch.bfloat16, "o")


def test_bad_inputs_name_the_argument():
    q_nope, q_rope, c, k_rope, w = mla_inputs(T=5)
    with pytest.raises(ValueError, match="w_kv_b"):
        mla_attention(q_nope, q_rope, c, k_rope, w[:-1])
    with pytest.raises(ValueError, match="w_kv_b"):
        mla_attention(q_nope, q_rope, c, k_rope, w[:, :-1])
    with pytest.raises(ValueError, match="k_rope"):
        mla_attention(q_nope, q_rope, c, k_rope[:, :, :-1], w)
    with pytest.raises(ValueError, match="q_rope"):
        mla_attention(q_nope, q_rope[:, :, :2], c, k_rope, w)
    with pytest.raises(ValueError, match="kv_latent must be 3-D"):
        mla_attention(q_nope, q_rope, c[:, :, None], k_rope, w)
    with pytest.raises(TypeError, match="absorb"):
        mla_attention(q_nope, q_rope, c, k_rope, w, absorb=1)
    with pytest.raises(RuntimeError, match="triton"):
        mla_attention(q_nope, q_rope, c, k_rope, w, backend="triton")


def test_matches_transformers_deepseek_v3_kv_expansion():
    """Interop: the kv_b_proj layout and scale as transformers' DeepseekV3Attention expands and uses them."""
    tf = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    cfg = tf.DeepseekV3Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=12,
                              q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
                              num_hidden_layers=1)
    layer = DeepseekV3Attention(cfg, 0).double()
    q_nope, q_rope, c, k_rope, _ = mla_inputs(T=9)
    with torch.no_grad():
        k, v = layer.expand_kv(c[:, None], k_rope[:, None])  # [B, H, S, Dn + Dr], [B, H, S, Dv]
        q = torch.cat([q_nope, q_rope], -1).transpose(1, 2)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=layer.scaling)
        for absorb in (False, True):
            o = mla_attention(q_nope, q_rope, c, k_rope, layer.kv_b_proj.weight, scale=layer.scaling, absorb=absorb)
            assert_close(o, ref.transpose(1, 2), F64, f"absorb={absorb}")
