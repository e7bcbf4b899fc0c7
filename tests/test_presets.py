"""Published presets: structure from the released configs, and the same models read from
Hugging Face config.json dicts (field names as in transformers' configuration classes)."""

from __future__ import annotations

import json

import pytest

from hybridlm.config import HybridConfig
from hybridlm.hf_config import config_from_hf, load_config, load_hf_config
from hybridlm.memory import cache_bytes, param_counts
from hybridlm.presets import PRESETS, PUBLISHED_PRESETS, TINY_PRESETS

PUBLISHED = ("qwen3-next-80b-a3b", "qwen3.5-397b-a17b", "kimi-linear-48b-a3b", "minimax-m1", "minimax-m2",
             "minimax-m3", "deepseek-v3.2", "qwen3-32b", "llama-3.1-8b", "llama-3.1-70b")

# config.json contents as released (the fields that shape the model), written from each model's
# configuration class and the published-models table; a few use the checkpoints' own legacy keys.
HF_CONFIGS = {
    "qwen3-next-80b-a3b": {
        "model_type": "qwen3_next", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5120,
        "num_hidden_layers": 48, "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
        "partial_rotary_factor": 0.25, "rope_theta": 10000000, "full_attention_interval": 4,
        "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
        "linear_num_key_heads": 16, "linear_num_value_heads": 32, "num_experts": 512, "num_experts_per_tok": 10,
        "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "max_position_embeddings": 262144,
    },
    "qwen3.5-397b-a17b": {"model_type": "qwen3_5_moe", "text_config": {
        "model_type": "qwen3_5_moe_text", "vocab_size": 248320, "hidden_size": 4096, "num_hidden_layers": 60,
        "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 256,
        "rope_parameters": {"rope_theta": 10000000, "partial_rotary_factor": 0.25},
        "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 15,
        "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
        "linear_num_key_heads": 16, "linear_num_value_heads": 64, "num_experts": 512, "num_experts_per_tok": 10,
        "moe_intermediate_size": 1024, "shared_expert_intermediate_size": 1024, "max_position_embeddings": 262144}},
    "kimi-linear-48b-a3b": {
        "model_type": "kimi_linear", "vocab_size": 163840, "hidden_size": 2304, "intermediate_size": 9216,
        "moe_intermediate_size": 1024, "num_hidden_layers": 27, "num_attention_heads": 32, "num_key_value_heads": 32,
        "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
        "num_experts": 256, "num_experts_per_token": 8, "num_shared_experts": 1, "first_k_dense_replace": 1,
        "model_max_length": 1048576, "rms_norm_eps": 1e-5,
        "linear_attn_config": {"full_attn_layers": [4, 8, 12, 16, 20, 24, 27], "head_dim": 128, "num_heads": 32,
                               "kda_layers": [i for i in range(1, 28) if i not in (4, 8, 12, 16, 20, 24, 27)],
                               "short_conv_kernel_size": 4},
    },
    "minimax-m1": {
        "model_type": "minimax", "vocab_size": 200064, "hidden_size": 6144, "intermediate_size": 9216,
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
        "rotary_dim": 64, "rope_theta": 10000000, "attn_type_list": ([0] * 7 + [1]) * 10, "num_local_experts": 32,
        "num_experts_per_tok": 2, "max_position_embeddings": 10240000, "rms_norm_eps": 1e-5,
    },
    "minimax-m2": {
        "model_type": "minimax_m2", "vocab_size": 200064, "hidden_size": 3072, "intermediate_size": 1536,
        "num_hidden_layers": 62, "num_attention_heads": 48, "num_key_value_heads": 8, "head_dim": 128,
        "rotary_dim": 64, "rope_theta": 5000000, "num_local_experts": 256, "num_experts_per_tok": 8,
        "scoring_func": "sigmoid", "max_position_embeddings": 196608,
    },
    "deepseek-v3.2": {
        "model_type": "deepseek_v32", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
        "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256, "kv_lora_rank": 512,
        "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
        "num_experts_per_tok": 8, "first_k_dense_replace": 3, "index_topk": 2048, "index_head_dim": 128,
        "index_n_heads": 64, "max_position_embeddings": 163840,
    },
    "qwen3-32b": {
        "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 5120, "intermediate_size": 25600,
        "num_hidden_layers": 64, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
        "rope_theta": 1000000, "max_position_embeddings": 40960,
    },
    "llama-3.1-8b": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    },
}


def test_published_presets_listed_and_sourced():
    assert set(PUBLISHED) == set(PUBLISHED_PRESETS)
    for name in PUBLISHED:
        cfg = HybridConfig.preset(name)
        assert cfg.meta["source"], name
        assert cfg.num_layers == len(cfg.layer_types)


@pytest.mark.parametrize("name,layers,types", [
    ("qwen3-next-80b-a3b", 48, "GGGA" * 12),
    ("qwen3.5-397b-a17b", 60, "GGGA" * 15),
    ("minimax-m1", 80, "LLLLLLLA" * 10),
    ("minimax-m3", 60, "AAA" + "S" * 57),
    ("deepseek-v3.2", 61, "S" * 61),
    ("minimax-m2", 62, "A" * 62),
])
def test_layer_layouts(name, layers, types):
    cfg = HybridConfig.preset(name)
    assert (cfg.num_layers, cfg.layer_types) == (layers, types)


def test_kimi_mla_at_published_one_based_layers():
    cfg = HybridConfig.preset("kimi-linear-48b-a3b")
    assert [i + 1 for i, c in enumerate(cfg.layer_types) if c == "M"] == [4, 8, 12, 16, 20, 24, 27]
    assert cfg.layer_types.count("K") == 20


def test_tiny_presets_build():
    for name in TINY_PRESETS:
        assert PRESETS[name]().num_layers <= 8


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_hf_config_gives_the_preset(name, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(HF_CONFIGS[name]))
    ours, preset = load_hf_config(tmp_path), HybridConfig.preset(name)
    assert ours.layer_types == preset.layer_types
    for n in (1, 4096, 262144):
        assert cache_bytes(ours, 2, n) == cache_bytes(preset, 2, n), n
    assert param_counts(ours) == param_counts(preset)
    for field in ("num_experts", "num_experts_per_tok", "first_dense_layers", "router", "router_score_bias",
                  "qk_norm_scope", "attn_output_gate", "qk_norm", "rope_theta",
                  "partial_rotary_factor", "max_position_embeddings", "vocab_size"):
        assert getattr(ours, field) == getattr(preset, field), field
    assert load_config(path) == ours


def test_hf_config_bad_input(tmp_path):
    with pytest.raises(ValueError, match="model_type"):
        config_from_hf({"model_type": "gpt2", "num_hidden_layers": 2})
    with pytest.raises(TypeError, match="config"):
        config_from_hf(["not", "a", "dict"])
    bad = dict(HF_CONFIGS["qwen3-32b"], layer_types=["full_attention"] * 3)
    with pytest.raises(ValueError, match="layer_types"):
        config_from_hf(bad)
    with pytest.raises(FileNotFoundError, match="path"):
        load_hf_config(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        load_hf_config(tmp_path)
