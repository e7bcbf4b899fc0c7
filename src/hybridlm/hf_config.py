"""HybridConfig from a Hugging Face ``config.json`` (no transformers needed, no code executed).

Field names follow transformers' configuration classes (Qwen3NextConfig, Qwen3_5(Moe)TextConfig,
KimiLinearConfig, MiniMaxConfig, MiniMaxM2Config, DeepseekV32Config, Qwen3Config, LlamaConfig)
and the released checkpoints' own keys where they differ (Kimi's ``linear_attn_config``, MiniMax's
``attn_type_list``, ``rotary_dim``). Only the structure is mapped: layer types, dimensions, MoE
sizes; weights are the checkpoint loader's business.

Example::

    cfg = load_hf_config("Qwen3-Next-80B-A3B-Instruct/config.json")
    cfg.layer_types[:4]   # 'GGGA'
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hybridlm.config import HybridConfig

# model_type -> (letter of "linear_attention" layers, letter of "full_attention" layers)
MODEL_TYPES = {
    "qwen3_next": ("G", "A"),
    "qwen3_5": ("G", "A"),
    "qwen3_5_text": ("G", "A"),
    "qwen3_5_moe": ("G", "A"),
    "qwen3_5_moe_text": ("G", "A"),
    "kimi_linear": ("K", "M"),
    "minimax": ("L", "A"),
    "minimax_m2": ("L", "A"),
    "deepseek_v32": ("S", "S"),
    "qwen3": ("G", "A"),
    "llama": ("G", "A"),
}
_TYPE_LETTERS = {"sliding_attention": "W", "indexed_attention": "S"}


def _rope(d: dict[str, Any]) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor), from rope_parameters (transformers 5) or top-level keys."""
    rope = d.get("rope_parameters") or {}
    theta = rope.get("rope_theta", d.get("rope_theta", 10_000.0))
    partial = rope.get("partial_rotary_factor", d.get("partial_rotary_factor"))
    if partial is None and d.get("rotary_dim") and d.get("head_dim"):
        partial = d["rotary_dim"] / d["head_dim"]  # MiniMax
    return float(theta), float(1.0 if partial is None else partial)


def _layer_pattern(d: dict[str, Any], model_type: str, n_layers: int) -> str:
    linear, full = MODEL_TYPES[model_type]
    lin_cfg = d.get("linear_attn_config") or {}
    if d.get("layer_types"):
        kinds = d["layer_types"]
    elif "full_attn_layers" in lin_cfg:  # Kimi: 1-based layer numbers
        full_set = {i - 1 for i in lin_cfg["full_attn_layers"]}
        kinds = ["full_attention" if i in full_set else "linear_attention" for i in range(n_layers)]
    elif "attn_type_list" in d:  # MiniMax checkpoints: 1 = softmax, 0 = lightning
        kinds = ["full_attention" if t else "linear_attention" for t in d["attn_type_list"]]
    elif model_type in ("qwen3_next", "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text"):
        every = d.get("full_attention_interval", 4)
        kinds = ["linear_attention" if (i + 1) % every else "full_attention" for i in range(n_layers)]
    else:
        kinds = ["full_attention"] * n_layers
    if len(kinds) != n_layers:
        raise ValueError(f"layer_types: expected {n_layers} entries (num_hidden_layers), got {len(kinds)}")
    letters = []
    for k in kinds:
        if k not in ("linear_attention", "full_attention") and k not in _TYPE_LETTERS:
            raise ValueError(f"layer_types: unknown layer type {k!r} for model_type {model_type!r}")
        letters.append(linear if k == "linear_attention" else full if k == "full_attention" else _TYPE_LETTERS[k])
    return "".join(letters)


def _first_dense(d: dict[str, Any]) -> int:
    if d.get("mlp_layer_types"):
        return next((i for i, t in enumerate(d["mlp_layer_types"]) if t != "dense"), len(d["mlp_layer_types"]))
    return int(d.get("first_k_dense_replace", 0))


def config_from_hf(d: dict[str, Any]) -> HybridConfig:
    """Map a parsed HF config dict (a ``config.json``) to a HybridConfig.

    d: the JSON object; multimodal Qwen3.5 configs are read through their ``text_config``.
    Raises ValueError for an unsupported ``model_type`` or inconsistent layer lists.
    """
    if not isinstance(d, dict):
        raise TypeError(f"config: expected a dict parsed from config.json, got {type(d).__name__}")
    if isinstance(d.get("text_config"), dict):
        d = {**d["text_config"], "model_type": d["text_config"].get("model_type", d.get("model_type"))}
    model_type = d.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type: expected one of {sorted(MODEL_TYPES)}, got {model_type!r}")
    try:
        return _config_from_hf(d, model_type)
    except KeyError as e:
        raise ValueError(f"config.json ({model_type}): missing field {e.args[0]!r}") from None


def _config_from_hf(d: dict[str, Any], model_type: str) -> HybridConfig:
    n_layers = int(d["num_hidden_layers"])
    heads = int(d["num_attention_heads"])
    theta, partial = _rope(d)
    lin = d.get("linear_attn_config") or {}
    kw: dict[str, Any] = dict(
        vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]), num_layers=n_layers,
        layer_pattern=_layer_pattern(d, model_type, n_layers),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(d.get("max_position_embeddings") or d.get("model_max_length") or 262_144),
        num_attention_heads=heads, num_key_value_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(d.get("head_dim") or d["hidden_size"] // heads),
        partial_rotary_factor=partial, rope_theta=theta,
        attention_bias=bool(d.get("attention_bias", False)),
        intermediate_size=int(d.get("intermediate_size") or d.get("moe_intermediate_size") or 1),
        meta={"source": f"Hugging Face config.json (model_type {model_type})"},
    )
    qwen_hybrid = model_type.startswith("qwen3_next") or model_type.startswith("qwen3_5")
    kw.update(attn_output_gate=qwen_hybrid, qk_norm=model_type in ("qwen3", "minimax_m2") or qwen_hybrid,
              norm_zero_centered=qwen_hybrid)
    if model_type == "minimax":  # MiniMax-01's residual branches start from the normalised input
        kw["residual_from_norm"] = True
        alphas, betas = minimax_residual_factors(d)
        kw.update(residual_alpha=float(alphas[0]), residual_beta=float(betas[0]))
    if model_type == "minimax_m2":  # q/k norms span all heads at once (q_norm weight: heads * head_dim)
        kw["qk_norm_scope"] = "all"
    if d.get("sliding_window") and "W" in kw["layer_pattern"]:
        kw["sliding_window"] = int(d["sliding_window"])
    if qwen_hybrid:
        kw.update(linear_num_key_heads=d["linear_num_key_heads"], linear_num_value_heads=d["linear_num_value_heads"],
                  linear_key_head_dim=d["linear_key_head_dim"], linear_value_head_dim=d["linear_value_head_dim"],
                  linear_conv_kernel_dim=d.get("linear_conv_kernel_dim", 4))
    elif model_type == "kimi_linear":
        n = int(lin.get("num_heads", d.get("linear_num_heads", 32)))
        hd = int(lin.get("head_dim", d.get("linear_head_dim", 128)))
        kw.update(linear_num_key_heads=n, linear_num_value_heads=n, linear_key_head_dim=hd, linear_value_head_dim=hd,
                  linear_conv_kernel_dim=int(lin.get("short_conv_kernel_size", d.get("linear_conv_kernel_dim", 4))))
    elif model_type == "minimax":  # lightning heads are the attention heads
        kw.update(linear_num_key_heads=heads, linear_num_value_heads=heads, linear_key_head_dim=kw["head_dim"],
                  linear_value_head_dim=kw["head_dim"], linear_conv_kernel_dim=0)
    if model_type in ("kimi_linear", "deepseek_v32"):
        kw.update(mla_q_lora_rank=int(d.get("q_lora_rank") or 0), mla_kv_lora_rank=int(d["kv_lora_rank"]),
                  mla_qk_nope_head_dim=int(d["qk_nope_head_dim"]), mla_qk_rope_head_dim=int(d["qk_rope_head_dim"]),
                  mla_v_head_dim=int(d["v_head_dim"]), head_dim=int(d["qk_nope_head_dim"]),
                  # Kimi's MLA has no rotary (NoPE); DeepSeek rotates interleaved channel pairs.
                  mla_use_nope=model_type == "kimi_linear", mla_rope_interleave=model_type == "deepseek_v32")
    if model_type == "deepseek_v32":
        kw.update(sparse_base="mla", index_num_heads=int(d.get("index_n_heads", 64)),
                  index_head_dim=int(d.get("index_head_dim", 128)), index_topk=int(d.get("index_topk", 2048)),
                  index_key_bytes=float(d.get("index_head_dim", 128) + 4))  # fp8 key + fp32 scale
    kw.update(_moe_fields(d))
    return HybridConfig(**kw)


def minimax_residual_factors(d: dict[str, Any]) -> tuple[list[float], list[float]]:
    """(alphas, betas) of the full-attention, linear-attention and MLP residuals of a MiniMax config, under
    transformers' names or the released checkpoints' (layernorm_*_alpha / _beta)."""
    alphas, betas = [], []
    for ours, theirs in (("full_attn", "full_attention"), ("linear_attn", "linear_attention"), ("mlp", "mlp")):
        alphas.append(d.get(f"{ours}_alpha_factor", d.get(f"layernorm_{theirs}_alpha", 1)))
        betas.append(d.get(f"{ours}_beta_factor", d.get(f"layernorm_{theirs}_beta", 1)))
    return alphas, betas


def _moe_fields(d: dict[str, Any]) -> dict[str, Any]:
    experts = d.get("num_experts") or d.get("num_local_experts") or d.get("n_routed_experts") or 0
    if not experts:
        return {}
    moe = int(d.get("moe_intermediate_size") or d.get("intermediate_size"))
    shared = int(d.get("shared_expert_intermediate_size") or 0)
    if not shared and d.get("n_shared_experts", d.get("num_shared_experts")):
        shared = moe * int(d.get("n_shared_experts", d.get("num_shared_experts")))
    deepseek_style = d.get("model_type") in ("deepseek_v32", "kimi_linear")
    sigmoid = d.get("scoring_func") == "sigmoid" or deepseek_style or d.get("model_type") == "minimax_m2"
    # DeepSeek-V3-style routers add a selection-only bias (e_score_correction_bias) per expert.
    score_bias = deepseek_style or d.get("model_type") == "minimax_m2"
    moe_fields = dict(num_experts=int(experts), router_score_bias=score_bias, moe_intermediate_size=moe,
                      shared_expert_intermediate_size=shared,
                      num_experts_per_tok=int(d.get("num_experts_per_tok") or d.get("num_experts_per_token") or 1),
                      norm_topk_prob=bool(d.get("norm_topk_prob", d.get("moe_renormalize", True))),
                      first_dense_layers=_first_dense(d), router="sigmoid" if sigmoid else "softmax")
    if deepseek_style:  # grouped routing, scaled routed weights, an ungated shared expert
        moe_fields.update(n_group=int(d.get("n_group") or d.get("num_expert_group") or 1),
                          topk_group=int(d.get("topk_group") or 1),
                          routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)), shared_expert_gate=False)
    return moe_fields


def load_hf_config(path: str | Path) -> HybridConfig:
    """HybridConfig from a ``config.json`` file, or a folder holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"path: no config.json at {str(path)!r}")
    try:
        return config_from_hf(json.loads(p.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"path: {p} is not valid JSON ({e})") from None


def load_config(path: str | Path) -> HybridConfig:
    """A Hugging Face config.json (has ``model_type``) or a saved HybridConfig JSON."""
    p = Path(path)
    d = json.loads((p / "config.json" if p.is_dir() else p).read_text())
    return config_from_hf(d) if isinstance(d, dict) and "model_type" in d else HybridConfig.from_dict(d)
