"""Broken or foreign folders give one clear error naming what is wrong; nothing loads half-way."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hybridlm.checkpoints import from_pretrained


@pytest.fixture
def folder(tiny_hf, tmp_path):
    """A private copy of the tiny qwen3_next folder to break."""
    _, src = tiny_hf("qwen3_next")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def _edit_config(folder, edit):
    d = json.loads((folder / "config.json").read_text())
    edit(d)
    (folder / "config.json").write_text(json.dumps(d))


def test_missing_tensor_is_named(folder):
    _edit_tensors(folder, lambda t: t.pop("model.layers.2.linear_attn.in_proj_ba.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.2\.linear_attn\.in_proj_ba\.weight"):
        from_pretrained(folder)


def test_unexpected_tensor_is_named(folder):
    _edit_tensors(folder, lambda t: t.update({"model.layers.1.self_attn.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensors: model\.layers\.1\.self_attn\.extra\.weight"):
        from_pretrained(folder)


def test_misshaped_tensor_is_named_with_both_shapes(folder):
    _edit_tensors(folder, lambda t: t.update({"model.norm.weight": torch.zeros(31)}))
    with pytest.raises(ValueError, match=r"mis-shaped tensors: model\.norm\.weight \(31,\) \(expected \(32,\)\)"):
        from_pretrained(folder)


def test_all_problems_reported_together(folder):
    def edit(t):
        t.pop("model.embed_tokens.weight")
        t["bogus"] = torch.zeros(1)
    _edit_tensors(folder, edit)
    with pytest.raises(ValueError, match=r"missing tensors: model\.embed_tokens\.weight; unexpected tensors: bogus"):
        from_pretrained(folder)


def test_truncated_file(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file \(truncated"):
        from_pretrained(folder)


@pytest.mark.parametrize("model_type,match", [("kimi_linear", "missing field 'kv_lora_rank'"),
                                               ("minimax", r"does not match its config.json: missing tensors: .*qkv_proj"),
                                               ("deepseek_v32", "missing field 'kv_lora_rank'")])
def test_folder_of_another_type_says_what_is_wrong(folder, model_type, match):
    """A qwen3_next folder relabelled as one of the seed types fails on its config, naming the problem."""
    _edit_config(folder, lambda d: d.update(model_type=model_type))
    with pytest.raises(ValueError, match=match):
        from_pretrained(folder)


def test_unknown_model_type(folder):
    _edit_config(folder, lambda d: d.update(model_type="gpt2"))
    with pytest.raises(ValueError, match=r"model_type: expected one of .*qwen3_next.*, got 'gpt2'"):
        from_pretrained(folder)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "rope_type 'yarn'"),
    (lambda d: d.update(hidden_act="gelu"), "hidden_act 'gelu'"),
    (lambda d: d.update(attention_bias=True), "attention_bias=true"),
    (lambda d: d.update(mlp_only_layers=[1]), r"mlp_only_layers: only leading dense layers"),
    (lambda d: d.update(quantization_config={"quant_method": "fp8"}), r"quantization_config \(fp8"),
])
def test_features_we_do_not_compute_are_refused(folder, edit, message):
    _edit_config(folder, edit)
    with pytest.raises(ValueError, match=message):
        from_pretrained(folder)


def test_no_weights_no_config_not_json(folder, tmp_path):
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_pretrained(tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        from_pretrained(folder)


def test_index_cannot_point_outside_the_folder(folder):
    index = {"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"names shard '\.\./elsewhere\.safetensors'"):
        from_pretrained(folder)


def test_index_naming_a_missing_shard(folder):
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match=r"shard .*model-00002-of-00002\.safetensors .* is missing"):
        from_pretrained(folder)


def test_bad_arguments(folder):
    with pytest.raises(ValueError, match="dtype: expected None or one of float32"):
        from_pretrained(folder, dtype="int8")
    with pytest.raises(TypeError, match="path: expected a folder path"):
        from_pretrained(3)


def test_tensor_in_two_shards(folder):
    tensors = load_file(folder / "model.safetensors")
    save_file({"model.norm.weight": tensors["model.norm.weight"]}, folder / "model-00002-of-00002.safetensors")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    index = {"weight_map": {**{k: "model-00001-of-00002.safetensors" for k in tensors},
                            "model.norm.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"tensor model\.norm\.weight is in both model-00001-of-00002"):
        from_pretrained(folder)


def test_minimax_residual_factors_that_differ_by_branch_are_refused(tiny_hf, tmp_path):
    _, src = tiny_hf("minimax")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    _edit_config(dst, lambda d: d.update(mlp_alpha_factor=2.0))
    with pytest.raises(ValueError, match=r"residual factors alpha \[1.3, 1.3, 2.0\]"):
        from_pretrained(dst)
