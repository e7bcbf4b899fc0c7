"""Published presets written as config.json: transformers reads them, and so do we, unchanged."""

import pytest
import transformers as tf

from hybridlm.checkpoints.config_map import infer_model_type, read_hf_config, to_hf_config
from hybridlm.config import HybridConfig

PUBLISHED = [("qwen3-next-80b-a3b", "qwen3_next"), ("qwen3.5-397b-a17b", "qwen3_next"),
             ("minimax-m2", "minimax_m2"), ("qwen3-32b", "qwen3"), ("llama-3.1-8b", "llama")]


@pytest.mark.parametrize("preset, model_type", PUBLISHED)
def test_published_preset_config_round_trips(preset, model_type):
    config = HybridConfig.preset(preset)
    assert infer_model_type(config) == model_type
    d = to_hf_config(config, model_type, "bfloat16")
    back, read_type = read_hf_config(d)
    assert read_type == model_type
    for name in ("layer_types", "rotary_dim", "num_experts", "first_dense_layers", "router", "router_score_bias",
                 "qk_norm_scope", "attn_output_gate", "norm_zero_centered", "shared_expert_intermediate_size",
                 "moe_intermediate_size", "linear_num_value_heads", "linear_conv_kernel_dim", "rope_theta",
                 "tie_word_embeddings", "vocab_size", "hidden_size"):
        assert getattr(back, name) == getattr(config, name), name
    # transformers' own config class accepts it and sees the same layout.
    hf = tf.AutoConfig.for_model(**d)
    assert hf.num_hidden_layers == config.num_layers
    if model_type != "llama":
        assert "".join("G" if t == "linear_attention" else "A" for t in hf.layer_types) == config.layer_types


def test_qwen3_5_exports_as_its_own_type():
    config = HybridConfig.preset("qwen3.5-397b-a17b")
    d = to_hf_config(config, "qwen3_5_moe_text", "bfloat16")
    assert tf.AutoConfig.for_model(**d).model_type == "qwen3_5_moe_text"
    assert read_hf_config(d)[0].layer_types == config.layer_types
