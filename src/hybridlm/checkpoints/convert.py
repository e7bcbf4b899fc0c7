"""What ``hybridlm convert`` and ``hybridlm generate --model`` do, as functions.

A model source is a folder with config.json (Hugging Face or hybridlm layout), a training run
folder (newest ``step-*.json``), or one training checkpoint's ``.json`` / ``.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hybridlm.checkpoints.pretrained import NATIVE, from_pretrained, save_pretrained
from hybridlm.checkpoints.tokenizer import copy_tokenizer_files, load_tokenizer
from hybridlm.config import HybridConfig
from hybridlm.model import HybridLM


def load_model(path: str | Path, dtype: str | None = None, device=None) -> HybridLM:
    """A HybridLM from any model source (see the module docstring), in eval mode."""
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file():
        return from_pretrained(p, dtype=dtype, device=device)
    from hybridlm.checkpoint import load_checkpoint, read_sidecar

    try:
        sidecar = read_sidecar(p)
    except FileNotFoundError:
        raise FileNotFoundError(f"model: {p} is neither a folder with config.json nor a training checkpoint") from None
    model_dict = sidecar["meta"].get("model")
    if not isinstance(model_dict, dict):
        raise ValueError(f"model: training checkpoint {sidecar['_path']} does not record its model config "
                         "(meta['model']); it was not written by 'hybridlm train'")
    model = HybridLM(HybridConfig.from_dict(model_dict))
    load_checkpoint(sidecar["_path"], model, restore_rng=False)
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=None if dtype is None else getattr(torch, dtype))
    return model.eval()


def convert(src: str | Path, out: str | Path, to_hf: bool, model_type: str | None = None,
            dtype: str | None = None, max_shard_bytes: int | None = None) -> Path:
    """Read ``src`` and write ``out``: a Hugging Face folder when ``to_hf``, else hybridlm's own
    layout. Tokenizer files in ``src`` are copied along. Returns ``out``."""
    if Path(out).resolve() == Path(src).resolve():
        raise ValueError(f"out: must differ from the input folder {src}")
    if not to_hf and model_type is not None:
        raise ValueError("model_type: only with to_hf (a hybridlm folder has one layout)")
    if not to_hf and "model_type" not in _config_json(src):
        raise ValueError(f"from_hf: {src} is not a Hugging Face folder (its config.json has no model_type)")
    model = load_model(src, dtype=dtype)
    kw = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    folder = save_pretrained(model, out, model_type=model_type if to_hf else NATIVE, **kw)
    if Path(src).is_dir():
        copy_tokenizer_files(src, folder)
    return folder


def _config_json(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"from_hf: no config.json in {folder}")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"config.json: {path} is not valid JSON ({e})") from None
    return d if isinstance(d, dict) else {}


def stop_tokens(model: HybridLM) -> list[int]:
    """End-of-sequence ids from the HF config the model was loaded with (empty when unknown)."""
    eos = model.config.meta.get("hf_config", {}).get("eos_token_id")
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else [int(t) for t in eos]


def prompt_ids(model_path: str | Path | None, text: str | None, ids: list[int] | None) -> tuple[list[int], object]:
    """(token ids, tokenizer or None) of a prompt given as text (needs the folder's tokenizer) or ids."""
    if (text is None) == (ids is None):
        raise ValueError("prompt: give exactly one of --prompt TEXT or --prompt-ids IDS")
    tokenizer = load_tokenizer(model_path) if model_path is not None and Path(model_path).is_dir() else None
    if text is None:
        return list(ids), tokenizer
    if tokenizer is None:
        raise ValueError(f"prompt: --prompt needs a tokenizer.json in the --model folder "
                         f"({model_path}); use --prompt-ids instead")
    encoded = tokenizer.encode(text).ids
    if not encoded:
        raise ValueError(f"prompt: {text!r} encodes to no tokens")
    return encoded, tokenizer
