"""hybridlm convert (both directions) and hybridlm generate --model PATH --prompt TEXT."""

import json
import shutil

import pytest
import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers

from hf_tiny import VOCAB, hf_logits, rel_err
from hybridlm.checkpoints import load_tokenizer
from hybridlm.cli import main
from hybridlm.generation import generate
from hybridlm.model import HybridLM

WORDS = [f"w{i}" for i in range(VOCAB - 2)] + ["hello", "world"]


@pytest.fixture
def folder_with_tokenizer(tiny_hf, tmp_path):
    _, src = tiny_hf("qwen3_next")
    folder = tmp_path / "hf"
    shutil.copytree(src, folder)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_generate_from_text_prompt(folder_with_tokenizer, capsys):
    assert main(["generate", "--model", str(folder_with_tokenizer), "--prompt", "hello world w7",
                 "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out.strip()
    model = HybridLM.from_pretrained(folder_with_tokenizer)
    tok = load_tokenizer(folder_with_tokenizer)
    want = generate(model, [[VOCAB - 2, VOCAB - 1, 7]], 5)[0].tolist()
    assert printed == tok.decode(want) and len(printed.split()) == 5


def test_generate_prompt_errors(tiny_hf, capsys):
    _, folder = tiny_hf("qwen3_next")  # no tokenizer.json
    assert main(["generate", "--model", str(folder), "--prompt", "hello"]) == 2
    assert "--prompt needs a tokenizer.json" in capsys.readouterr().err
    assert main(["generate", "--model", str(folder)]) == 2
    assert "exactly one of --prompt TEXT or --prompt-ids" in capsys.readouterr().err
    assert main(["generate", "--model", str(folder), "--prompt-ids", "1 2 3", "--max-new-tokens", "2"]) == 0
    assert len(capsys.readouterr().out.split()) == 2


def test_convert_in_and_out(folder_with_tokenizer, tiny_hf, tmp_path, capsys):
    hf, _ = tiny_hf("qwen3_next")
    own, back = tmp_path / "own", tmp_path / "back"
    assert main(["convert", "--from-hf", str(folder_with_tokenizer), "--out", str(own)]) == 0
    assert "model_type" not in json.loads((own / "config.json").read_text())  # hybridlm's own layout
    assert main(["convert", "--to-hf", str(own), "--out", str(back), "--max-shard-size", "16k"]) == 0
    assert (back / "tokenizer.json").is_file() and (back / "model.safetensors.index.json").is_file()
    reloaded = tf.AutoModelForCausalLM.from_pretrained(back).eval()
    ids = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(7))
    assert rel_err(hf_logits(hf, ids), hf_logits(reloaded, ids)) < 1e-6
    capsys.readouterr()
    assert main(["convert", "--to-hf", str(own), "--out", str(tmp_path / "x"), "--model-type", "llama"]) == 2
    assert "model_type 'llama' cannot hold this model" in capsys.readouterr().err
    assert main(["convert", "--from-hf", str(own), "--out", str(tmp_path / "y")]) == 2
    assert "is not a Hugging Face folder" in capsys.readouterr().err


def test_convert_a_training_run(tmp_path):
    """A run written by 'hybridlm train' exports to a folder transformers loads."""
    from hybridlm.checkpoint import save_checkpoint
    from hybridlm.config import HybridConfig

    torch.manual_seed(0)
    model = HybridLM(HybridConfig.preset("tiny-hybrid-3to1"))
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path / "run", 3, model, opt, {"model": model.config.to_dict()})
    assert main(["convert", "--to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert rel_err(model(ids), hf_logits(back, ids)) < 1e-4


@pytest.mark.parametrize("model_type", ["kimi_linear", "minimax", "deepseek_v32"])
def test_seed_types_convert_through_our_layout_and_back(tiny_hf, tmp_path, model_type):
    """HF -> hybridlm's own layout -> HF again: transformers gets its model back (MiniMax's decay buffers
    are rewritten for the block size the folder came with)."""
    hf, folder = tiny_hf(model_type)
    own, back = tmp_path / "own", tmp_path / "back"
    assert main(["convert", "--from-hf", str(folder), "--out", str(own)]) == 0
    assert main(["convert", "--to-hf", str(own), "--out", str(back)]) == 0
    assert json.loads((back / "config.json").read_text())["model_type"] == model_type
    reloaded = tf.AutoModelForCausalLM.from_pretrained(back).eval()
    ids = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(7))
    assert rel_err(hf_logits(hf, ids), hf_logits(reloaded, ids)) < 1e-6
