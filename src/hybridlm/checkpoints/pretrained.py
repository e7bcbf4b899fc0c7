"""HybridLM.from_pretrained / save_pretrained: a folder of config.json + safetensors.

Two folder kinds, told apart by config.json: a Hugging Face checkpoint (has ``model_type``; tensor
names and layouts from ``layout.hf_layout``) or a hybridlm one (a saved HybridConfig; tensors under
HybridLM's own state_dict names).

Loading checks everything it can before allocating: every header is read, and missing, unexpected
and mis-shaped tensors are reported together by name. The model is then built on the meta device,
allocated once in the target dtype and device, and filled one tensor at a time, shard by shard, so
the weights never exist twice. A failure raises; no half-filled model is ever returned.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hybridlm.checkpoints.config_map import infer_model_type, read_hf_config, to_hf_config
from hybridlm.checkpoints.hf_io import read_headers, iter_tensors, torch_dtype, write_json_atomic, write_shards
from hybridlm.checkpoints.layout import Entry, hf_layout, ignored_prefixes, rename
from hybridlm.config import HybridConfig
from hybridlm.model import HybridLM

NATIVE = "hybridlm"  # model_type argument of save_pretrained for hybridlm's own layout
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SHARD_BYTES = 5 * 2**30


def from_pretrained(path: str | Path, dtype: torch.dtype | str | None = None, device=None) -> HybridLM:
    """Load a Hugging Face (qwen3_next, qwen3_5, minimax_m2, kimi_linear, minimax, deepseek_v32, qwen3, llama)
    or hybridlm folder.

    Args:
        path: folder with config.json and model.safetensors (or shards + index).
        dtype: parameter dtype (torch.dtype or its name); None keeps the checkpoint's dtype.
        device: where the parameters live (default CPU).
    Returns:
        HybridLM in eval mode. ``config.meta`` records the HF model type and config for export.
    Raises:
        FileNotFoundError (no folder / config.json / weights), ValueError (unsupported model type
        or feature, missing / unexpected / mis-shaped tensors, truncated or corrupt file).

    Example::

        model = HybridLM.from_pretrained("Qwen3-Next-80B-A3B-Instruct", dtype="bfloat16", device="cuda")
    """
    folder, requested = _folder(path), _dtype(dtype)
    config, model_type = _read_config(folder)
    infos = read_headers(folder)
    if model_type is None:
        with torch.device("meta"):
            layout, ignore = _native_layout(HybridLM(config)), ()
    else:
        layout, ignore = hf_layout(config, model_type, frozenset(infos)), ignored_prefixes(model_type)
    _check_names_and_shapes(infos, layout, ignore, folder)
    target = requested or torch_dtype(infos[layout[0].hf_name].dtype)
    model = _empty_model(config, target, torch.device("cpu") if device is None else torch.device(device))
    targets = _targets(model, layout)
    by_name = {e.hf_name: e for e in layout}
    with torch.no_grad():
        for name, t in iter_tensors(infos, by_name):
            entry = by_name[name]
            for our, part in zip(entry.ours, entry.to_ours(t)):
                targets[our].copy_(part)
    return model.eval()


def save_pretrained(model: HybridLM, path: str | Path, model_type: str | None = None,
                    dtype: torch.dtype | str | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write ``model`` to ``path`` as config.json + safetensors shard(s) (+ index when sharded).

    Args:
        model: a HybridLM.
        path: output folder (created; earlier model*.safetensors files in it are replaced).
        model_type: HF model type to write ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text",
            "minimax_m2", "kimi_linear", "minimax", "deepseek_v32", "qwen3", "llama"), or "hybridlm" for
            this library's own layout. None: the
            type the model was loaded from, else one inferred from its structure.
        dtype: tensor dtype in the files (default: the model's).
        max_shard_bytes: shard size limit.
    Returns the folder. Raises ValueError when the model does not fit ``model_type``.
    """
    if not isinstance(model, HybridLM):
        raise TypeError(f"model: expected a HybridLM, got {type(model).__name__}")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"path: {out} exists and is not a folder")
    config = model.config
    target = _dtype(dtype) or model.embed_tokens.weight.dtype
    dtype_name = next(k for k, v in DTYPES.items() if v == target)
    if model_type == NATIVE:
        config_json, layout = config.to_dict(), _native_layout(model)
    else:
        model_type = model_type or infer_model_type(config)
        config_json = to_hf_config(config, model_type, dtype_name)
        layout = hf_layout(config, config_json["model_type"])
    state = model.state_dict()
    _targets(model, layout)  # the layout must cover the model exactly before anything is written
    tensors = ((e.hf_name, e.to_hf(tuple(state[n] for n in e.ours)).to(target)) for e in layout)
    write_shards(out, tensors, max_shard_bytes)
    write_json_atomic(out / "config.json", config_json)
    return out


# --------------------------------------------------------------------------- helpers
def _folder(path: str | Path) -> Path:
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path: expected a folder path (str or Path), got {type(path).__name__}")
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"path: {folder} is not a folder")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"path: no config.json in {folder}")
    return folder


def _read_config(folder: Path) -> tuple[HybridConfig, str | None]:
    """(config, HF model type or None for a hybridlm folder) from the folder's config.json."""
    try:
        d = json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"config.json: {folder / 'config.json'} is not valid JSON ({e})") from None
    if isinstance(d, dict) and "model_type" in d:
        return read_hf_config(d)
    if not isinstance(d, dict):
        raise ValueError(f"config.json: expected a JSON object, got {type(d).__name__}")
    return HybridConfig.from_dict(d), None


def _native_layout(model: HybridLM) -> list[Entry]:
    tied = model.config.tie_word_embeddings
    return [rename(k, k, tuple(v.shape)) for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")]


def _check_names_and_shapes(infos, layout: list[Entry], ignore: tuple[str, ...], folder: Path) -> None:
    expected = {e.hf_name: e.hf_shape for e in layout}
    # A tied checkpoint may still carry lm_head.weight; it is the embedding, so it is not read.
    optional = {"lm_head.weight"} - set(expected)
    present = {n for n in infos if not n.startswith(ignore) and n not in optional}
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    misshaped = sorted(f"{n} {infos[n].shape} (expected {expected[n]})" for n in set(expected) & present
                       if infos[n].shape != expected[n])
    not_float = sorted(f"{n} ({infos[n].dtype})" for n in set(expected) & present
                       if infos[n].dtype not in ("F64", "F32", "BF16", "F16"))
    problems = [f"{label}: {', '.join(names[:20])}" + (f" ... ({len(names)} in all)" if len(names) > 20 else "")
                for label, names in (("missing tensors", missing), ("unexpected tensors", unexpected),
                                     ("mis-shaped tensors", misshaped), ("non-float tensors", not_float)) if names]
    if problems:
        raise ValueError(f"checkpoint {folder} does not match its config.json: " + "; ".join(problems))


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in DTYPES.values()):
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype: expected None or one of {', '.join(DTYPES)}, got {dtype!r}")


def _empty_model(config: HybridConfig, dtype: torch.dtype, device: torch.device) -> HybridLM:
    """A HybridLM whose tensors are allocated once, on ``device`` in ``dtype``, but not filled."""
    with torch.device("meta"):
        model = HybridLM(config).to(dtype)
    model = model.to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty makes a new tensor per module, which unties them
        model.lm_head.weight = model.embed_tokens.weight
    return model


def _targets(model: HybridLM, layout: list[Entry]) -> dict[str, torch.Tensor]:
    """Our tensors by name, after checking that ``layout`` fills each exactly once with its shape."""
    state = model.state_dict(keep_vars=True)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    filled: list[str] = []
    for e in layout:
        parts = e.to_ours(torch.empty(e.hf_shape, device="meta"))
        for our, part in zip(e.ours, parts, strict=True):
            if our not in state or tuple(state[our].shape) != tuple(part.shape):
                got = tuple(state[our].shape) if our in state else "no such tensor"
                raise RuntimeError(f"checkpoint layout bug: {e.hf_name} -> {our} {tuple(part.shape)}, model has {got}")
        filled += e.ours
    if sorted(filled) != sorted(state):
        raise RuntimeError(f"checkpoint layout bug: model tensors not filled exactly once: "
                           f"{sorted(set(state) ^ set(filled))}")
    return state
