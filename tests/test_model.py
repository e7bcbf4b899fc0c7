"""HybridLM: cache parity for every tiny preset, left padding, errors, init and tying."""

import pytest
import torch

from hybridlm.config import HybridConfig
from hybridlm.model import HybridLM
from hybridlm.presets import TINY_PRESETS


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def tiny(name, **overrides):
    torch.manual_seed(0)
    cfg = HybridConfig.preset(name, chunk_size=16, **overrides)
    model = HybridLM(cfg).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so layers actually matter
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(std=0.15)
    return model


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_full_forward_equals_prefill_then_decode(name):
    model = tiny(name)
    ids = torch.randint(0, model.config.vocab_size, (2, 26))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 32)
        outs = [model(ids[:, :19], cache=cache)]
        outs += [model(ids[:, t:t + 1], cache=cache) for t in range(19, 26)]
    assert cache.seq_len == 26
    assert cache.next_position.tolist() == [26, 26]
    assert rel_err(torch.cat(outs, 1), full) < 1e-5


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_prefill_in_two_chunks_equals_one(name):
    model = tiny(name)
    ids = torch.randint(0, model.config.vocab_size, (2, 21))
    with torch.no_grad():
        one = model(ids, cache=model.new_cache(2, 21))
        cache = model.new_cache(2, 21)
        two = torch.cat([model(ids[:, :13], cache=cache), model(ids[:, 13:], cache=cache)], 1)
    assert rel_err(two, one) < 1e-5


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_left_padded_rows_equal_rows_alone(name):
    model = tiny(name)
    lengths, T = [5, 11], 11
    ids = torch.randint(0, model.config.vocab_size, (2, T))
    mask = (torch.arange(T)[None] >= torch.tensor([T - n for n in lengths])[:, None]).long()
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        for b, n in enumerate(lengths):
            alone = model(ids[b:b + 1, T - n:])
            assert rel_err(batched[b, T - n:], alone[0]) < 1e-5


def test_logits_shape_dtype_and_tied_embeddings():
    cfg = HybridConfig.preset("tiny-hybrid-3to1", tie_word_embeddings=True)
    model = HybridLM(cfg)
    assert model.lm_head.weight is model.embed_tokens.weight
    untied = HybridLM(HybridConfig.preset("tiny-hybrid-3to1"))
    assert untied.num_parameters() - model.num_parameters() == cfg.vocab_size * cfg.hidden_size
    logits = model(torch.randint(0, 256, (3, 4)))
    assert logits.shape == (3, 4, 256) and logits.dtype == torch.float32
    assert model.double()(torch.randint(0, 256, (1, 2))).dtype == torch.float64


def test_logits_to_keep():
    model = tiny("tiny-hybrid-3to1")
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        full = model(ids)
        torch.testing.assert_close(model(ids, logits_to_keep=1), full[:, -1:])
        torch.testing.assert_close(model(ids, logits_to_keep=20), full)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, logits_to_keep=0)


def test_init_uses_initializer_range():
    torch.manual_seed(0)
    model = HybridLM(HybridConfig(hidden_size=128, initializer_range=0.05))
    w = model.layers[0].mlp.up_proj.weight
    assert abs(w.std().item() - 0.05) < 0.005
    assert abs(model.embed_tokens.weight.std().item() - 0.05) < 0.005


def test_meta_device_model_builds_without_memory():
    with torch.device("meta"):
        model = HybridLM(HybridConfig.preset("tiny-moe"))
    assert all(p.is_meta for p in model.parameters())
    assert model.num_parameters() == HybridLM(HybridConfig.preset("tiny-moe")).num_parameters()


@pytest.mark.parametrize("base", ["mla", "gqa"])
def test_fp8_index_keys_cached_decode_equals_full_forward(base):
    """DeepSeek's fp8 index-key cache (index_key_bytes = index_head_dim + 4): the cache holds fp8 keys and
    float32 scales, memory.py counts them to the byte, and decode scores what the full forward scores."""
    from hybridlm.memory import cache_bytes

    model = tiny("tiny-deepseek-v3.2", index_key_bytes=20.0, sparse_base=base, sparse_block_size=1 + (base == "gqa"))
    cache = model.new_cache(2, 26)
    assert cache.layers[0].index_k.dtype == torch.float8_e4m3fn and cache.layers[0].index_scale.shape == (2, 26, 1)
    assert cache.nbytes() == cache_bytes(model.config, 2, 26, kv_dtype="float32").total_bytes
    ids = torch.randint(0, model.config.vocab_size, (2, 26))
    with torch.no_grad():
        full = model(ids)
        outs = [model(ids[:, :19], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(19, 26)]
    assert rel_err(torch.cat(outs, 1), full) < 1e-5


@pytest.mark.parametrize("kw,match", [
    (dict(layer_pattern="M", mla_qk_rope_head_dim=7), "mla_qk_rope_head_dim: expected an even number"),
    (dict(layer_pattern="M", mla_kv_lora_rank=0), "mla_kv_lora_rank: expected a positive int"),
    (dict(layer_pattern="S", index_topk=0), "index_topk: expected a positive int"),
    (dict(layer_pattern="S", index_key_bytes=8.0), "index_key_bytes: expected 0"),
    (dict(num_experts=4, n_group=3), "n_group, topk_group"),
])
def test_bad_seed_layer_fields_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        HybridConfig(**kw)
    if kw.get("layer_pattern") == "S":
        return
    with pytest.raises(ValueError, match="index_num_heads: expected a divisor"):
        HybridLM(HybridConfig(layer_pattern="S", sparse_base="gqa", index_num_heads=3))


def test_unknown_letter_is_refused():
    with pytest.raises(ValueError, match="layer_pattern"):
        HybridConfig(layer_pattern="GQ")


@pytest.mark.parametrize("ids,error,match", [
    (torch.zeros(4, dtype=torch.long), ValueError, "rank 2"),
    (torch.zeros(1, 2, 3, dtype=torch.long), ValueError, "rank 2"),
    (torch.zeros(1, 4), TypeError, "integer dtype"),
    (torch.tensor([[1, 256]]), ValueError, r"\[0, 256\)"),
    (torch.tensor([[-1, 2]]), ValueError, r"\[0, 256\)"),
    (torch.zeros(1, 0, dtype=torch.long), ValueError, "T >= 1"),
    ([[1, 2]], TypeError, "torch.Tensor"),
])
def test_bad_input_ids(ids, error, match):
    model = HybridLM(HybridConfig())
    with pytest.raises(error, match=match):
        model(ids)


def test_bad_attention_mask():
    model = HybridLM(HybridConfig())
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask.*shape"):
        model(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="attention_mask.*0 and 1"):
        model(ids, attention_mask=torch.full((2, 3), 2))


@pytest.mark.parametrize("name", ["tiny-gdn", "tiny-mha"])
def test_sequence_past_max_len_raises(name):
    model = HybridLM(HybridConfig.preset(name))
    cache = model.new_cache(1, 8)
    model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_len=8"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="batch_size"):
        model(torch.zeros(2, 1, dtype=torch.long), cache=cache)
