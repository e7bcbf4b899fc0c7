"""HybridCache: exact bytes (also on the meta device), fixed-size linear states, layout, reset."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings, strategies as st

from hybridlm.cache import HybridCache
from hybridlm.config import HybridConfig
from hybridlm.model import HybridLM
from hybridlm.presets import TINY_PRESETS


def allocated_tensors(obj, seen=None):
    """Every tensor reachable from the cache's attributes (lists and dataclasses walked), once each."""
    seen = {} if seen is None else seen
    if isinstance(obj, torch.Tensor):
        seen[id(obj)] = obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            allocated_tensors(item, seen)
    elif dataclasses.is_dataclass(obj) or isinstance(obj, HybridCache):
        for value in vars(obj).values():
            allocated_tensors(value, seen)
    return seen


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_nbytes_is_every_allocated_tensor(name):
    cfg = HybridConfig.preset(name)
    cache = HybridLM(cfg).new_cache(3, 40)
    walked = allocated_tensors(cache).values()
    assert cache.nbytes() == sum(t.numel() * t.element_size() for t in walked)
    assert sum(cache.breakdown().values()) == cache.nbytes()
    meta = HybridCache(cfg, 3, 40, device="meta")
    assert meta.nbytes() == cache.nbytes() and meta.breakdown() == cache.breakdown()


def test_breakdown_layout_by_hand():
    cfg = HybridConfig.preset("tiny-swa")  # GGGW, window 8; H=2, HV=4, K=V=16, conv 4, HKV=2, D=16
    cache = HybridCache(cfg, 2, 100)
    bd = cache.breakdown()
    assert bd["layer 0 (G) state"] == 2 * 4 * 16 * 16 * 4
    assert bd["layer 0 (G) conv"] == 2 * (2 * 2 * 16 + 4 * 16) * 3 * 4
    assert bd["layer 3 (W) kv"] == 2 * (2 * 8 * 2 * 16 * 4)  # ring of 8 slots, not 100
    assert bd["window positions"] == 2 * 8 * 4 and bd["next position"] == 2 * 4
    assert "positions" not in bd
    mha = HybridCache(HybridConfig.preset("tiny-mha"), 2, 100).breakdown()
    assert mha["layer 0 (A) kv"] == 2 * (2 * 100 * 2 * 16 * 4) and mha["positions"] == 2 * 100 * 4


def test_breakdown_of_the_seed_layers_by_hand():
    """MLA caches latent + rotary key; DSA adds its index keys; KDA's conv covers q, k and v; L has no conv."""
    kimi = HybridCache(HybridConfig.preset("tiny-kimi-linear"), 2, 10).breakdown()  # KKKM, H=HV=4, K=V=16
    assert kimi["layer 0 (K) state"] == 2 * 4 * 16 * 16 * 4
    assert kimi["layer 0 (K) conv"] == 2 * (3 * 4 * 16) * 3 * 4
    assert kimi["layer 3 (M) kv"] == 2 * 10 * (32 + 8) * 4 and kimi["positions"] == 2 * 10 * 4
    minimax = HybridCache(HybridConfig.preset("tiny-minimax-m1"), 2, 10).breakdown()
    assert "layer 0 (L) conv" not in minimax and minimax["layer 0 (L) state"] == 2 * 4 * 16 * 16 * 4
    dsa = HybridCache(HybridConfig.preset("tiny-deepseek-v3.2"), 2, 10, dtype=torch.bfloat16).breakdown()
    assert dsa["layer 0 (S) kv"] == 2 * 10 * (32 + 8 + 16) * 2
    fp8 = HybridCache(HybridConfig.preset("tiny-deepseek-v3.2", index_key_bytes=20.0), 2, 10).breakdown()
    assert fp8["layer 0 (S) kv"] == 2 * 10 * ((32 + 8) * 4 + 16 + 4)


@pytest.mark.parametrize("name", ["kimi-linear-48b-a3b", "minimax-m1", "minimax-m3", "deepseek-v3.2"])
def test_published_seed_presets_build_and_count_like_memory(name):
    """The released dimensions build (on the meta device, a few layers) and their cache is what memory.py says."""
    from hybridlm.memory import cache_bytes

    full = HybridConfig.preset(name)
    cfg = full.replace(layer_pattern=full.layer_types[-8:], num_layers=8, num_experts=min(full.num_experts, 8),
                       n_group=1, topk_group=1)
    with torch.device("meta"):
        model = HybridLM(cfg)
    cache = model.new_cache(1, 4096, device="meta", dtype=torch.bfloat16)
    assert cache.nbytes() == cache_bytes(cfg, 1, 4096, kv_dtype="bfloat16").total_bytes


def test_state_dtype_and_normalizer_column():
    cfg = HybridConfig(layer_pattern="X", num_layers=1, linear_normalize=True, state_dtype="bfloat16")
    cache = HybridCache(cfg, 1, 8)
    assert cache.layers[0].state.shape == (1, 4, 16, 17) and cache.layers[0].state.dtype == torch.bfloat16
    assert cache.layers[0].conv is None
    assert HybridCache(cfg, 1, 8, dtype=torch.float16).layers[0].state.dtype == torch.bfloat16


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(TINY_PRESETS), batch=st.integers(1, 4), short=st.integers(1, 64),
       long=st.integers(1024, 65536))
def test_linear_state_bytes_do_not_grow_with_context(name, batch, short, long):
    """The deck's "state bounded by d_head x d_head, not by n_tokens"."""
    cfg = HybridConfig.preset(name)
    small, big = (HybridCache(cfg, batch, n, device="meta").breakdown() for n in (short, long))
    for key in small:
        letter = key.split("(")[1][0] if key.startswith("layer") else ""
        if letter and letter in "GDX":
            assert small[key] == big[key], key
        if letter == "A":
            assert big[key] * short == small[key] * long, key
        if letter == "W":
            assert big[key] == small[key] * cfg.sliding_window // min(short, cfg.sliding_window), key


def test_bad_arguments():
    cfg = HybridConfig()
    with pytest.raises(ValueError, match="max_len"):
        HybridCache(cfg, 1, 0)
    with pytest.raises(ValueError, match="batch_size"):
        HybridCache(cfg, -1, 8)
    with pytest.raises(TypeError, match="dtype"):
        HybridCache(cfg, 1, 8, dtype=torch.int32)


def test_reset_gives_a_fresh_cache():
    torch.manual_seed(0)
    model = HybridLM(HybridConfig.preset("tiny-swa")).eval()
    ids = torch.randint(0, 256, (2, 12))
    cache = model.new_cache(2, 16)
    with torch.no_grad():
        first = model(ids, cache=cache)
        cache.reset()
        assert cache.seq_len == 0 and cache.next_position.tolist() == [0, 0]
        torch.testing.assert_close(model(ids, cache=cache), first)


def test_cache_stays_contiguous_until_a_padded_call():
    from hybridlm import HybridConfig, HybridLM

    torch.manual_seed(0)
    model = HybridLM(HybridConfig.preset("tiny-hybrid-3to1")).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    cache = model.new_cache(2, 24)
    with torch.no_grad():
        full = model(ids)
        chunks = torch.cat([model(ids[:, :5], cache=cache), model(ids[:, 5:], cache=cache)], 1)
        assert cache.contiguous
        torch.testing.assert_close(chunks, full, rtol=1e-4, atol=1e-5)
        model(ids[:, :1], cache=cache, attention_mask=torch.tensor([[True], [False]]))
    assert not cache.contiguous
    cache.reset()
    assert cache.contiguous
