"""Every token mixer: one call == pieces == token by token through a HybridCache; left padding
changes nothing for the real tokens; gradients flow; Gated DeltaNet's and KDA's gate formulas and init;
the sparse layers attend only to what their indexer picks."""

import math

import pytest
import torch
import torch.nn.functional as F

from hybridlm.cache import HybridCache
from hybridlm.config import HybridConfig
from hybridlm.layers import GatedDeltaNet, Tokens
from hybridlm.model import make_mixer

# one-layer configs, one per mixer; W uses a window shorter than the sequences to make the ring wrap
MIXERS = {
    "G": dict(layer_pattern="G"),
    "D": dict(layer_pattern="D"),
    "X": dict(layer_pattern="X", linear_feature_map="elu"),
    "X-normalize": dict(layer_pattern="X", linear_feature_map="relu", linear_normalize=True),
    "A": dict(layer_pattern="A"),
    "A-nogate": dict(layer_pattern="A", attn_output_gate=False, qk_norm=False, partial_rotary_factor=1.0),
    "A-norm-all-heads": dict(layer_pattern="A", qk_norm_scope="all"),
    "W": dict(layer_pattern="W", sliding_window=5),
    "K": dict(layer_pattern="K"),
    "L": dict(layer_pattern="L"),
    "M": dict(layer_pattern="M"),
    "M-lora-interleaved": dict(layer_pattern="M", mla_q_lora_rank=24, mla_rope_interleave=True),
    "M-nope": dict(layer_pattern="M", mla_use_nope=True),
    # index_topk / blocks below the lengths tested, so the selection really drops tokens
    "S": dict(layer_pattern="S", index_topk=5),
    "S-lora": dict(layer_pattern="S", index_topk=5, mla_q_lora_rank=24, mla_rope_interleave=True),
    "S-gqa": dict(layer_pattern="S", sparse_base="gqa", sparse_block_size=3, index_topk=2, sparse_local_blocks=1),
}


def make(name, chunk_size=16):
    torch.manual_seed(0)
    cfg = HybridConfig(num_layers=1, chunk_size=chunk_size, **MIXERS[name])
    mixer = make_mixer(cfg, cfg.layer_types[0])
    for p in mixer.parameters():  # the default 0.02 init of the model would make outputs tiny
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.3)
    return cfg, mixer


def run_with_cache(mixer, cache, x, mask=None):
    """Feed x [B, T, D] through the mixer in one call, as HybridLM does."""
    B, T, _ = x.shape
    base = cache.next_position.long()[:, None]
    if mask is None:
        pos = base + torch.arange(T)
        n_real = torch.full((B,), T)
    else:
        pos = torch.where(mask, base + mask.long().cumsum(1) - 1, -1)
        n_real = mask.sum(1)
    start = cache.begin(pos)
    y = mixer(x, Tokens(pos, mask, start), cache.layers[0])
    cache.end(pos, n_real)
    return y


def run_pieces(cfg, mixer, x, pieces):
    cache = HybridCache(cfg, x.shape[0], x.shape[1])
    outs, t = [], 0
    for n in pieces:
        outs.append(run_with_cache(mixer, cache, x[:, t:t + n]))
        t += n
    return torch.cat(outs, 1), cache


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("name", list(MIXERS))
@pytest.mark.parametrize("T", [1, 63, 65])
def test_one_call_equals_pieces_equals_token_by_token(name, T):
    cfg, mixer = make(name)
    x = torch.randn(2, T, cfg.hidden_size)
    with torch.no_grad():
        full = mixer(x, Tokens(torch.arange(T).expand(2, T), None))
        assert torch.isfinite(full).all()
        one, cache_one = run_pieces(cfg, mixer, x, [T])
        split = [T // 3, 1, T - T // 3 - 1] if T > 2 else [T]
        pieces, _ = run_pieces(cfg, mixer, x, [n for n in split if n])
        steps, cache_steps = run_pieces(cfg, mixer, x, [1] * T)
    for got in (one, pieces, steps):
        assert rel_err(got, full) < 1e-5
    for a, b in zip(vars(cache_one.layers[0]).values(), vars(cache_steps.layers[0]).values()):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            assert rel_err(b, a) < 1e-5 or a.norm() == b.norm() == 0


@pytest.mark.parametrize("name", ["G", "D", "K", "L"])
def test_long_sequence_in_chunks(name):
    cfg, mixer = make(name, chunk_size=64)
    x = torch.randn(1, 1000, cfg.hidden_size)
    with torch.no_grad():
        full = mixer(x, Tokens(torch.arange(1000)[None], None))
        pieces, _ = run_pieces(cfg, mixer, x, [333, 1, 600, 66])
    assert rel_err(pieces, full) < 1e-5


@pytest.mark.parametrize("name", list(MIXERS))
def test_left_padding_changes_nothing(name):
    """A row padded on the left gives the outputs and final state it gives alone."""
    cfg, mixer = make(name)
    lengths, T = [4, 9, 7], 9
    x = torch.randn(3, T, cfg.hidden_size)
    x[0, :5] = float("nan")  # pads may hold anything: nothing of them may leak
    mask = torch.arange(T)[None] >= torch.tensor([T - n for n in lengths])[:, None]
    with torch.no_grad():
        cache = HybridCache(cfg, 3, 16)
        batched = run_with_cache(mixer, cache, x, mask)
        more = torch.randn(3, 2, cfg.hidden_size)
        batched_next = run_with_cache(mixer, cache, more)
        for b, n in enumerate(lengths):
            alone_cache = HybridCache(cfg, 1, 16)
            alone = run_with_cache(mixer, alone_cache, x[b:b + 1, T - n:])
            assert rel_err(batched[b, T - n:], alone[0]) < 1e-5
            alone_next = run_with_cache(mixer, alone_cache, more[b:b + 1])
            assert rel_err(batched_next[b], alone_next[0]) < 1e-5


@pytest.mark.parametrize("name", list(MIXERS))
def test_padded_gradients_equal_per_row_gradients(name):
    """Backward through a left-padded batch equals the sum of per-row backwards (no leak)."""
    cfg, mixer = make(name)
    lengths, T = [3, 8], 8
    x = torch.randn(2, T, cfg.hidden_size, dtype=torch.float64)
    mixer = mixer.double()
    mask = torch.arange(T)[None] >= torch.tensor([T - n for n in lengths])[:, None]
    pos = torch.where(mask, mask.long().cumsum(1) - 1, -1)
    y = mixer(x, Tokens(pos, mask))
    (y * mask[..., None]).pow(2).sum().backward()
    # A sparse layer's indexer gets no gradient from the output (top-k selection is not differentiable).
    batched = {n: p.grad.clone() for n, p in mixer.named_parameters() if p.grad is not None}
    assert all(n.startswith(("indexer.", "index_")) for n, _ in mixer.named_parameters() if n not in batched)
    mixer.zero_grad()
    for b, n in enumerate(lengths):
        mixer(x[b:b + 1, T - n:], Tokens(torch.arange(n)[None], None)).pow(2).sum().backward()
    for name_, p in mixer.named_parameters():
        if name_ in batched:
            assert rel_err(batched[name_], p.grad) < 1e-10, name_


def test_gated_deltanet_gate_formula_and_init():
    torch.manual_seed(0)
    cfg = HybridConfig(linear_num_value_heads=64, linear_num_key_heads=2)
    layer = GatedDeltaNet(cfg)
    A = layer.A_log.exp()
    assert ((A >= 1) & (A <= 16)).all()
    dt = F.softplus(layer.dt_bias)
    assert ((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 0.1 * (1 + 1e-5))).all()
    x = torch.randn(2, 3, cfg.hidden_size)
    pos = torch.arange(3).expand(2, 3)
    g = layer._log_decay(layer.a_proj(x), Tokens(pos, None))
    expected = -A * F.softplus(layer.a_proj(x) + layer.dt_bias)
    torch.testing.assert_close(g, expected)
    assert (g <= 0).all()
    assert not hasattr(GatedDeltaNet(cfg, gated=False), "A_log")


def test_sliding_window_attends_only_to_window():
    """W output at the last position does not depend on tokens older than the window."""
    cfg, mixer = make("W")
    x = torch.randn(1, 12, cfg.hidden_size)
    x2 = x.clone()
    x2[:, :12 - cfg.sliding_window] = torch.randn(1, 12 - cfg.sliding_window, cfg.hidden_size)
    pos = torch.arange(12)[None]
    with torch.no_grad():
        y, y2 = mixer(x, Tokens(pos, None)), mixer(x2, Tokens(pos, None))
    torch.testing.assert_close(y[:, -1], y2[:, -1])
    assert not torch.allclose(y[:, 5], y2[:, 5])
    assert math.isfinite(y.sum().item())


def test_kda_gate_formula_and_init():
    """g per value head and key channel: -exp(A_log) * softplus(f_b(f_a(x)) + dt_bias), Kimi's init ranges."""
    torch.manual_seed(0)
    cfg = HybridConfig(layer_pattern="K", linear_num_value_heads=64, linear_num_key_heads=2)
    layer = make_mixer(cfg, "K")
    A = layer.A_log.exp()
    assert ((A >= 1) & (A <= 16)).all()
    dt = F.softplus(layer.dt_bias)
    assert ((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 0.1 * (1 + 1e-5))).all()
    x = torch.randn(2, 3, cfg.hidden_size)
    g = layer._log_decay(x).view(2, 3, 64, cfg.linear_key_head_dim)
    f = (layer.f_b_proj(layer.f_a_proj(x)) + layer.dt_bias).view(2, 3, 64, -1)
    torch.testing.assert_close(g, -A[:, None] * F.softplus(f))
    assert (g <= 0).all()


def test_lightning_layer_matches_a_token_loop():
    """o_t = sum_s exp(-slope (t - s)) (q_t . k_s) v_s on SiLU'd projections, then norm, gate, projection;
    the slopes shrink with depth."""
    cfg, layer = make("L")
    x = torch.randn(1, 7, cfg.hidden_size, dtype=torch.float64)
    layer = layer.double()
    H, K = cfg.linear_num_value_heads, cfg.linear_key_head_dim
    r = H // cfg.linear_num_key_heads
    q = F.silu(layer.q_proj(x)).view(1, 7, -1, K).repeat_interleave(r, 2)
    k = F.silu(layer.k_proj(x)).view(1, 7, -1, K).repeat_interleave(r, 2)
    v = F.silu(layer.v_proj(x)).view(1, 7, H, -1)
    lam = torch.exp(-layer.slopes().double())  # [H]
    o = torch.zeros_like(v)
    for t in range(7):
        for s in range(t + 1):
            o[:, t] += (lam ** (t - s))[:, None] * (q[:, t] * k[:, s]).sum(-1, keepdim=True) * v[:, s]
    want = layer.o_proj(layer.norm(o.reshape(1, 7, -1)) * torch.sigmoid(layer.output_gate(x)))
    with torch.no_grad():
        torch.testing.assert_close(layer(x, Tokens(torch.arange(7)[None], None)), want)
    deep = HybridConfig(layer_pattern="L", num_layers=4)
    assert (make_mixer(deep, "L", 3).slopes() < make_mixer(deep, "L", 0).slopes()).all()


@pytest.mark.parametrize("sparse, dense", [("S-lora", "M-lora-interleaved"), ("S-gqa", "A")])
def test_sparse_layer_keeping_every_token_is_its_dense_base(sparse, dense):
    """With a top-k that covers the whole history, the sparse layer is exactly its base attention; with a
    smaller one it is not."""
    T = 11
    cfg, layer = make(sparse)
    wide = cfg.replace(index_topk=T if cfg.sparse_base == "mla" else -(-T // cfg.sparse_block_size))
    _, base = make(dense)
    every = make_mixer(wide, "S")
    every.load_state_dict(layer.state_dict())
    base.load_state_dict({k: v for k, v in layer.state_dict().items() if k in base.state_dict()})
    x = torch.randn(2, T, cfg.hidden_size)
    tokens = Tokens(torch.arange(T).expand(2, T), None)
    with torch.no_grad():
        want = base(x, tokens)
        assert rel_err(every(x, tokens), want) < 1e-6
        assert rel_err(layer(x, tokens), want) > 1e-3
