"""save_pretrained: shards + index, dtype choice, hybridlm's own layout, presets exported to HF types."""

import json

import pytest
import torch
import transformers as tf

from hf_tiny import hf_logits, mirror_index_heads, rel_err
from hybridlm.checkpoints import from_pretrained, save_pretrained
from hybridlm.config import HybridConfig
from hybridlm.hf_config import config_from_hf
from hybridlm.model import HybridLM

IDS = torch.randint(0, 101, (2, 65), generator=torch.Generator().manual_seed(5))


def test_sharded_save_loads_here_and_in_transformers(tiny_hf, tmp_path):
    hf, folder = tiny_hf("qwen3_next")
    model = from_pretrained(folder)
    save_pretrained(model, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    with torch.no_grad():
        assert rel_err(model(IDS), from_pretrained(tmp_path)(IDS)) == 0
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert rel_err(hf_logits(hf, IDS), hf_logits(back, IDS)) < 1e-6
    # Saving again unsharded into the same folder leaves no stale shard or index behind.
    save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]
    assert not list(tmp_path.glob(".*tmp*"))


def test_dtype_and_device_choice(tiny_hf, tmp_path):
    _, folder = tiny_hf("qwen3_5_moe_text")
    full = from_pretrained(folder)
    half = from_pretrained(folder, dtype="bfloat16", device="cpu")
    assert {p.dtype for p in half.state_dict().values()} == {torch.bfloat16}
    assert {p.device.type for p in half.state_dict().values()} == {"cpu"}
    want = full.state_dict()
    for name, t in half.state_dict().items():
        assert torch.equal(t, want[name].to(torch.bfloat16)), name
    save_pretrained(full, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert {p.dtype for p in from_pretrained(tmp_path).state_dict().values()} == {torch.bfloat16}


def test_tied_embeddings_stay_tied(tiny_hf, tmp_path):
    _, folder = tiny_hf("qwen3")
    model = from_pretrained(folder)
    assert model.lm_head.weight is model.embed_tokens.weight
    save_pretrained(model, tmp_path)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()


def test_hybridlm_layout_round_trip(tmp_path):
    torch.manual_seed(0)
    model = HybridLM(HybridConfig.preset("tiny-swa"))  # W layers: no HF type holds them
    with pytest.raises(ValueError, match=r"no supported Hugging Face model type holds layers \['G', 'W'\]"):
        save_pretrained(model, tmp_path / "hf")
    save_pretrained(model, tmp_path / "own", model_type="hybridlm")
    loaded = HybridLM.from_pretrained(tmp_path / "own")
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(model(IDS % 256), loaded(IDS % 256))


@pytest.mark.parametrize("preset, model_type", [("tiny-qwen3-next", "qwen3_next"), ("tiny-moe", "qwen3_next"),
                                                  ("tiny-hybrid-3to1", "qwen3_5_text"),
                                                  ("tiny-kimi-linear", "kimi_linear"), ("tiny-minimax-m1", "minimax"),
                                                  ("tiny-deepseek-v3.2", "deepseek_v32")])
def test_presets_export_to_transformers(preset, model_type, tmp_path):
    """Our plain-weight RMSNorms become Qwen's zero-centred ones on the way out, exactly."""
    torch.manual_seed(0)
    model = HybridLM(HybridConfig.preset(preset)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith("indexer.wq_b.weight"):  # no exact-0 index scores, so no top-k ties (see hf_tiny)
                mirror_index_heads(p, model.config.index_num_heads)
    model.save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["model_type"] == model_type
    mapped = config_from_hf(d)
    for field in ("layer_types", "hidden_size", "num_experts", "shared_expert_intermediate_size", "rotary_dim",
                  "linear_num_value_heads", "rope_theta"):
        assert getattr(mapped, field) == getattr(model.config, field), field
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = IDS % 256
    with torch.no_grad():
        assert rel_err(model(ids), hf_logits(back, ids)) < 1e-4


def test_model_that_does_not_fit_the_asked_type(tmp_path):
    model = HybridLM(HybridConfig.preset("tiny-moe"))
    with pytest.raises(ValueError, match=r"model_type 'minimax_m2' cannot hold this model: .*attn_output_gate=True"):
        save_pretrained(model, tmp_path, model_type="minimax_m2")
    with pytest.raises(ValueError, match=r"model_type 'qwen3_5_text' cannot hold this model: num_experts=4"):
        save_pretrained(model, tmp_path, model_type="qwen3_5_text")
    with pytest.raises(ValueError, match=r"model_type 'kimi_linear' cannot hold this model: .*layer_types 'GGGA'"):
        save_pretrained(model, tmp_path, model_type="kimi_linear")
    with pytest.raises(TypeError, match="model: expected a HybridLM"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path)
