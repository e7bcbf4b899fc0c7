"""Softmax attention: the SDPA path equals the plain reference; positions, windows, padding, decode."""

import pytest
import torch
from ops_testing import assert_close

from hybridlm.ops import softmax_attention, softmax_attention_reference

F64, F32 = torch.float64, torch.float32


def _qkv(B=2, T=9, S=9, H=4, HKV=2, D=8, Dv=8, dtype=F32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen).to(dtype)  # noqa: E731
    return r(B, T, H, D), r(B, S, HKV, D), r(B, S, HKV, Dv)


def _both(q, k, v, **kw):
    o_ref = softmax_attention_reference(q, k, v, **kw)
    o = softmax_attention(q, k, v, **kw)
    assert o.dtype == q.dtype and o_ref.dtype == q.dtype
    assert torch.isfinite(o).all() and torch.isfinite(o_ref).all()
    assert_close(o, o_ref, q.dtype if q.dtype in (F32, F64) else torch.bfloat16)
    return o, o_ref


@pytest.mark.parametrize("T", [1, 63, 65])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_equals_reference(T, heads, causal):
    q, k, v = _qkv(T=T, S=T, H=heads[0], HKV=heads[1])
    _both(q, k, v, causal=causal)


@pytest.mark.parametrize("window", [1, 4, 100])
def test_sliding_window(window):
    q, k, v = _qkv(T=33, S=33)
    o, _ = _both(q, k, v, window=window)
    if window == 1:  # every query sees only its own key: o = v of that position (head h reads kv head h // 2)
        assert_close(o, v.repeat_interleave(2, dim=2), F32)
    if window == 100:
        assert_close(o, softmax_attention(q, k, v), F32)


def test_gqa_equals_repeated_heads():
    q, k, v = _qkv(T=17, S=17, H=6, HKV=2)
    rep = lambda x: x.repeat_interleave(3, dim=2)  # noqa: E731
    assert_close(softmax_attention(q, k, v), softmax_attention_reference(q, rep(k), rep(v)), F32)


def test_first_query_sees_only_the_first_key():
    q, k, v = _qkv(T=5, S=5, H=2, HKV=2)
    for backend in ("sdpa", "reference"):
        o = softmax_attention(q, k, v, backend=backend)
        assert_close(o[:, 0], v[:, 0], F32)


def test_left_padding_positions():
    """Row 0 is padded by 3: its pad keys are invisible, its pad queries give zeros."""
    q, k, v = _qkv(B=2, T=10, S=10)
    pos = torch.arange(10).expand(2, 10).clone()
    pos[0] = torch.arange(10) - 3
    o, _ = _both(q, k, v, q_pos=pos, k_pos=pos)
    assert torch.equal(o[0, :3], torch.zeros_like(o[0, :3]))
    o_alone = softmax_attention_reference(q[:1, 3:], k[:1, 3:], v[:1, 3:])
    assert_close(o[:1, 3:], o_alone, F32)


def test_decode_against_a_partly_filled_cache():
    """One new token (T = 1) against 12 cache slots of which 7 hold keys; empty slots are k_pos = -1."""
    q, k, v = _qkv(B=2, T=1, S=12)
    k_pos = torch.full((2, 12), -1)
    k_pos[:, :7] = torch.arange(7)
    q_pos = torch.full((2, 1), 6)
    o, _ = _both(q, k, v, q_pos=q_pos, k_pos=k_pos)
    assert_close(o, softmax_attention_reference(q, k[:, :7], v[:, :7]), F32)
    o_win, _ = _both(q, k, v, q_pos=q_pos, k_pos=k_pos, window=3)
    assert_close(o_win, softmax_attention_reference(q, k[:, 4:7], v[:, 4:7]), F32)


def test_default_positions_put_queries_last():
    """T < S without positions: the T queries are the last T of the S positions (a prefill continuation)."""
    q, k, v = _qkv(T=4, S=12)
    o, _ = _both(q, k, v)
    q_full = torch.cat([torch.zeros(2, 8, 4, 8), q], 1)
    assert_close(o, softmax_attention_reference(q_full, k, v)[:, 8:], F32)


def test_value_dim_may_differ_and_scale_is_used():
    q, k, v = _qkv(T=7, S=7, Dv=5)
    o, _ = _both(q, k, v, scale=0.3)
    assert o.shape == (2, 7, 4, 5)
    assert (o - softmax_attention(q, k, v)).abs().max() > 1e-4


@pytest.mark.parametrize("dtype", [F64, torch.bfloat16])
def test_dtypes(dtype):
    q, k, v = _qkv(T=20, S=20, dtype=dtype)
    _both(q, k, v, window=5)


def test_outputs_are_contiguous():
    q, k, v = _qkv(T=6, S=6)
    pos = torch.arange(6).expand(2, 6)
    for kw in ({}, {"q_pos": pos, "k_pos": pos}, {"backend": "reference"}):
        assert softmax_attention(q, k, v, **kw).is_contiguous()


@pytest.mark.parametrize("T, S, H, HKV", [(1, 7, 4, 2), (5, 9, 4, 4), (63, 65, 8, 2), (64, 1000, 2, 1)])
def test_queries_at_the_end_of_a_longer_key_sequence_match_the_reference(T, S, H, HKV):
    # the chunked-prefill case without padding: causal aligned to the lower right (no position mask)
    g = torch.Generator().manual_seed(T + S)
    q = torch.randn(2, T, H, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, S, HKV, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, S, HKV, 8, generator=g, dtype=torch.float64)
    want = softmax_attention_reference(q, k, v)
    torch.testing.assert_close(softmax_attention(q, k, v), want, rtol=1e-10, atol=1e-12)
    pos = torch.arange(S).expand(2, S)  # the same keys through the position-mask path
    torch.testing.assert_close(softmax_attention(q, k, v, q_pos=pos[:, S - T:], k_pos=pos), want, rtol=1e-10,
                               atol=1e-12)

