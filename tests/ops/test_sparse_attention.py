"""Indexer sparse attention: gather == dense, topk >= T == dense causal attention, deterministic ties,
prefill and one-token decode choose the same keys, MSA block rule by brute force, grads, bad input."""

import pytest
import torch
from ops_testing import assert_close

from hybridlm.ops import (
    block_indexer_scores,
    block_indexer_topk,
    indexer_topk,
    lightning_indexer_scores,
    select_topk,
    softmax_attention,
    sparse_attention,
    sparse_attention_reference,
)

F64, F32 = torch.float64, torch.float32


def sparse_inputs(B=2, T=65, H=8, HKV=4, D=8, Dv=6, HI=4, DI=6, dtype=F64, seed=0):
    """q [B, T, H, D], k/v [B, T, HKV, D/Dv]; index q [B, T, HI, DI], index k [B, T, DI], weights [B, T, HI]."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=F64).to(dtype)  # noqa: E731
    w = torch.rand(B, T, HI, generator=gen, dtype=F64).to(dtype)
    return rand(B, T, H, D), rand(B, T, HKV, D), rand(B, T, HKV, Dv), rand(B, T, HI, DI), rand(B, T, DI), w


def brute_force_topk(scores_row, visible_row, topk, forced_row=None):
    """Python reference of the selection rule: forced first, then score descending, then index ascending."""
    forced_row = [False] * len(scores_row) if forced_row is None else forced_row
    cand = [s for s in range(len(scores_row)) if visible_row[s]]
    cand.sort(key=lambda s: (not forced_row[s], -float(scores_row[s]), s))
    chosen = cand[:topk]
    return chosen + [-1] * (topk - len(chosen))


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("T", [1, 63, 65])
@pytest.mark.parametrize("HKV", [8, 2])
def test_token_gather_equals_dense(dtype, T, HKV):
    q, k, v, qi, ki, w = sparse_inputs(T=T, HKV=HKV, dtype=dtype)
    idx = indexer_topk(qi, ki, w, topk=9)
    o = sparse_attention(q, k, v, idx)
    o_ref = sparse_attention_reference(q, k, v, idx)
    assert o.dtype == dtype and o.shape == (2, T, 8, 6)
    assert_close(o, o_ref, dtype, "o")


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("T", [1, 63, 65])
@pytest.mark.parametrize("HKV,block_size", [(4, 8), (2, 16), (8, 5)])
def test_block_gather_equals_dense(dtype, T, HKV, block_size):
    q, k, v, qi, ki, _ = sparse_inputs(T=T, HKV=HKV, dtype=dtype)
    idx = block_indexer_topk(qi, ki, topk=3, block_size=block_size, local_blocks=1)
    assert idx.shape == (2, T, 4, 3)
    o = sparse_attention(q, k, v, idx, block_size=block_size)
    o_ref = sparse_attention_reference(q, k, v, idx, block_size=block_size)
    assert_close(o, o_ref, dtype, "o")


@pytest.mark.parametrize("T", [1, 65])
def test_topk_covering_everything_is_dense_causal_attention(T):
    q, k, v, qi, ki, w = sparse_inputs(T=T)
    dense = softmax_attention(q, k, v, backend="reference")
    for backend in ("auto", "reference"):
        o_tok = sparse_attention(q, k, v, indexer_topk(qi, ki, w, topk=T + 3), backend=backend)
        assert_close(o_tok, dense, F64, f"token top-k, {backend}")
        idx = block_indexer_topk(qi, ki, topk=-(-T // 8), block_size=8, local_blocks=1)
        assert_close(sparse_attention(q, k, v, idx, block_size=8, backend=backend), dense, F64, f"block, {backend}")


def test_small_topk_differs_from_dense():
    """Guards the comparisons above against a selection that is ignored."""
    q, k, v, qi, ki, w = sparse_inputs(T=40)
    o = sparse_attention(q, k, v, indexer_topk(qi, ki, w, topk=4))
    assert (o - softmax_attention(q, k, v))[:, 10:].abs().max() > 1e-2


def test_token_selection_matches_brute_force_with_relu_ties():
    """One index head whose dot is negative for about half the keys: many scores are exactly 0."""
    _, _, _, qi, ki, w = sparse_inputs(B=1, T=40, HI=1)
    scores = lightning_indexer_scores(qi, ki, w)
    assert (scores == 0).sum() > 200  # the ties this test is about
    idx = indexer_topk(qi, ki, w, topk=7)[0, :, 0]
    for t in range(40):
        visible = [s <= t for s in range(40)]
        assert idx[t].tolist() == brute_force_topk(scores[0, t].tolist(), visible, 7), f"query {t}"


def test_all_zero_scores_keep_the_earliest_tokens():
    _, _, _, qi, ki, w = sparse_inputs(B=1, T=10)
    idx = indexer_topk(torch.zeros_like(qi), ki, w, topk=4)[0, :, 0]
    assert idx[9].tolist() == [0, 1, 2, 3] and idx[1].tolist() == [0, 1, -1, -1]


def test_block_selection_matches_brute_force():
    """Block score = max visible token score per index head; the local block always kept and counted."""
    _, _, _, qi, ki, _ = sparse_inputs(B=1, T=50, HI=2)
    bs, topk = 4, 5
    idx = block_indexer_topk(qi, ki, topk=topk, block_size=bs, local_blocks=1)
    dots = torch.einsum("thd,sd->ths", qi[0], ki[0])
    for t in (0, 3, 4, 17, 49):
        for h in range(2):
            n_blocks = t // bs + 1
            block_max = [max(float(dots[t, h, s]) for s in range(b * bs, min(b * bs + bs, t + 1)))
                         for b in range(n_blocks)]
            forced = [b == n_blocks - 1 for b in range(n_blocks)]
            expected = brute_force_topk(block_max, [True] * n_blocks, topk, forced)
            assert idx[0, t, h].tolist() == expected, f"query {t}, head {h}"
    scores = block_indexer_scores(qi, ki, bs)
    assert scores.shape == (1, 50, 2, 13) and torch.isinf(scores[0, 0, :, 1:]).all()


@pytest.mark.parametrize("block_size", [1, 4])
def test_prefill_and_decode_select_the_same_keys(block_size):
    """Prefill over 30 tokens, then each token alone against a 40-slot cache (empty slots k_pos -1)."""
    T, slots = 30, 40
    q, k, v, qi, ki, w = sparse_inputs(B=2, T=T, HI=1)
    qi = qi - 0.5  # more exact-zero ReLU ties
    ki_cache = torch.zeros(2, slots, ki.shape[-1], dtype=F64)
    k_cache, v_cache = torch.zeros(2, slots, *k.shape[2:], dtype=F64), torch.zeros(2, slots, *v.shape[2:], dtype=F64)
    ki_cache[:, :T], k_cache[:, :T], v_cache[:, :T] = ki, k, v

    def select(qi_, **pos):
        if block_size == 1:
            return indexer_topk(qi_, pos.pop("ki"), pos.pop("w"), topk=6, **pos)
        pos.pop("w")
        return block_indexer_topk(qi_, pos.pop("ki"), topk=3, block_size=block_size, local_blocks=1, **pos)

    full_idx = select(qi, ki=ki, w=w)
    full_o = sparse_attention(q, k, v, full_idx, block_size=block_size)
    for t in range(T):
        k_pos = torch.where(torch.arange(slots) <= t, torch.arange(slots), -1).expand(2, slots)
        q_pos = torch.full((2, 1), t)
        idx = select(qi[:, t : t + 1], ki=ki_cache, w=w[:, t : t + 1], q_pos=q_pos, k_pos=k_pos)
        assert torch.equal(idx, full_idx[:, t : t + 1]), f"token {t}"
        o = sparse_attention(q[:, t : t + 1], k_cache, v_cache, idx, block_size=block_size, q_pos=q_pos, k_pos=k_pos)
        assert_close(o, full_o[:, t : t + 1], F64, f"decode o at {t}")


def test_padding_is_never_selected():
    """Left padding (k_pos < 0) is invisible to the indexer and to the attention."""
    q, k, v, qi, ki, w = sparse_inputs(B=1, T=12)
    pos = (torch.arange(12) - 3).expand(1, 12)
    idx = indexer_topk(qi, ki, w, topk=20, q_pos=pos, k_pos=pos)
    assert not ((idx >= 0) & (idx < 3)).any()
    o = sparse_attention(q, k, v, idx, q_pos=pos, k_pos=pos)
    dense = softmax_attention(q, k, v, q_pos=pos, k_pos=pos, backend="reference")
    assert_close(o[:, 3:], dense[:, 3:], F64, "real tokens")
    assert (o[:, :3] == 0).all()


def test_gather_gradients_equal_dense():
    def grads(fn):
        leaves = [t.clone().requires_grad_(True) for t in sparse_inputs(T=33)[:3]]
        idx = block_indexer_topk(*sparse_inputs(T=33)[3:5], topk=2, block_size=8, local_blocks=1)
        o = fn(*leaves, idx, block_size=8)
        (o * torch.linspace(-1, 1, o.numel(), dtype=F64).view_as(o)).sum().backward()
        return [t.grad for t in leaves]

    for name, a, b in zip("qkv", grads(sparse_attention), grads(sparse_attention_reference)):
        assert_close(a, b, F64, f"grad of {name}")


def test_select_topk_pads_and_forces():
    scores = torch.tensor([[0.0, 3.0, float("-inf"), 3.0, 1.0]])
    assert select_topk(scores, 3).tolist() == [[1, 3, 4]]
    assert select_topk(scores, 6).tolist() == [[1, 3, 4, 0, -1, -1]]
    forced = torch.tensor([[True, False, False, False, False]])
    assert select_topk(scores, 2, forced).tolist() == [[0, 1]]


def test_bad_inputs_name_the_argument():
    q, k, v, qi, ki, w = sparse_inputs(T=6)
    idx = indexer_topk(qi, ki, w, topk=2)
    with pytest.raises(TypeError, match="indices"):
        sparse_attention(q, k, v, idx.float())
    with pytest.raises(ValueError, match="indices"):
        sparse_attention(q, k, v, idx[:, :3])
    with pytest.raises(ValueError, match="group count"):
        sparse_attention(q, k, v, idx.expand(-1, -1, 3, -1))
    with pytest.raises(RuntimeError, match="triton"):
        sparse_attention(q, k, v, idx, backend="triton")
    with pytest.raises(ValueError, match="topk"):
        indexer_topk(qi, ki, w, topk=0)
    with pytest.raises(ValueError, match="weights"):
        indexer_topk(qi, ki, w[..., :2], topk=2)
    with pytest.raises(ValueError, match="k_idx"):
        indexer_topk(qi, ki[..., :3], w, topk=2)
    with pytest.raises(ValueError, match="local_blocks"):
        block_indexer_topk(qi, ki, topk=1, block_size=2, local_blocks=2)
    with pytest.raises(ValueError, match="block_size"):
        block_indexer_topk(qi, ki, topk=1, block_size=0)
    with pytest.raises(ValueError, match="q_pos"):
        indexer_topk(qi, ki, w, topk=2, q_pos=torch.zeros(2, 5, dtype=torch.long))
