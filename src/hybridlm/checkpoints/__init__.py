"""Hugging Face checkpoints in and out: config.json + safetensors (sharded with an index).

``from_pretrained(path)`` / ``save_pretrained(model, path)`` (also ``HybridLM.from_pretrained`` and
``model.save_pretrained``). Model types: qwen3_next, qwen3_5 (text; dense and MoE), minimax_m2,
kimi_linear, minimax, deepseek_v32, qwen3, llama.
"""

from hybridlm.checkpoints.pretrained import from_pretrained, save_pretrained
from hybridlm.checkpoints.tokenizer import load_tokenizer

__all__ = ["from_pretrained", "load_tokenizer", "save_pretrained"]
