"""Logits parity with transformers for every supported model type, cache parity, and export back."""

import json

import pytest
import torch
import transformers as tf

from hf_tiny import VOCAB, hf_logits, rel_err
from hybridlm.model import HybridLM

MODEL_TYPES = ["qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "minimax_m2", "qwen3", "llama", "kimi_linear",
               "minimax", "deepseek_v32"]
TOL = 1e-4


def _ids(T: int, seed: int = 1) -> torch.Tensor:
    # Two different sequences; 65 crosses the 64-token chunk boundary of the delta rule.
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_logits_match_transformers(tiny_hf, model_type):
    hf, folder = tiny_hf(model_type)
    ours = HybridLM.from_pretrained(folder)
    for T in (1, 63, 65, 1000):
        ids = _ids(T)
        with torch.no_grad():
            got = ours(ids)
        assert got.shape == (2, T, VOCAB)
        assert rel_err(hf_logits(hf, ids), got) < TOL


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_left_padded_batch_matches_transformers(tiny_hf, model_type):
    """Rows of different lengths, padded on the left: transformers gets the same mask and the
    per-row positions we use (each row counts only its real tokens)."""
    hf, folder = tiny_hf(model_type)
    ours = HybridLM.from_pretrained(folder)
    ids = _ids(40, seed=6)
    mask = torch.ones_like(ids)
    mask[1, :13] = 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, position_ids=pos).logits
        got = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert rel_err(want[real], got[real]) < TOL


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_prefill_and_16_decode_steps_equal_full_forward(tiny_hf, model_type):
    _, folder = tiny_hf(model_type)
    model = HybridLM.from_pretrained(folder)
    ids = _ids(65, seed=2)
    prompt = 65 - 16
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 65)
        steps = [model(ids[:, :prompt], cache=cache)]
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(prompt, 65)]
    assert rel_err(full, torch.cat(steps, dim=1)) < TOL


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_our_export_loads_back_into_transformers(tiny_hf, model_type, tmp_path):
    hf, folder = tiny_hf(model_type)
    HybridLM.from_pretrained(folder).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == model_type
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back) is type(hf)
    ids = _ids(65, seed=3)
    assert rel_err(hf_logits(hf, ids), hf_logits(back, ids)) < 1e-6
    # No tensor left behind or invented: the two state dicts hold the same values.
    want, got = hf.state_dict(), back.state_dict()
    assert sorted(want) == sorted(got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)


def test_multimodal_qwen3_5_folder_loads_its_text_model(tiny_hf, tmp_path):
    """A released Qwen3.5 folder nests the text model under model.language_model and carries a
    vision tower and an MTP head; the text model's logits are what we must give."""
    from safetensors.torch import load_file, save_file

    hf, folder = tiny_hf("qwen3_5_text")
    tensors = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
               for k, v in load_file(folder / "model.safetensors").items()}
    tensors["model.visual.patch_embed.proj.weight"] = torch.zeros(4, 3)
    tensors["mtp.fc.weight"] = torch.zeros(4, 4)
    save_file(tensors, tmp_path / "model.safetensors")
    text = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_5", "text_config": text,
                                                      "vision_config": {}}))
    ours = HybridLM.from_pretrained(tmp_path)
    ids = _ids(65, seed=4)
    with torch.no_grad():
        assert rel_err(hf_logits(hf, ids), ours(ids)) < TOL
    out = ours.save_pretrained(tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3_5_text"
    # The text model alone, still under the nested prefix, reads the same.
    (tmp_path / "config.json").write_text(json.dumps(text))
    with torch.no_grad():
        assert rel_err(hf_logits(hf, ids), HybridLM.from_pretrained(tmp_path)(ids)) < TOL
