"""config.json <-> HybridConfig for the checkpoint loader and writer.

Reading goes through ``hybridlm.hf_config.config_from_hf`` (the structural map shared with the
memory calculator) and adds what only weights care about: features this library does not run
(rope scaling, biases, other activations) are refused by name instead of loading into a model
that would compute something else. Writing is the inverse, per model type, and checks first that
the model fits that type (a Qwen3-Next checkpoint cannot hold a plain-attention MoE with a
score bias, say).
"""

from __future__ import annotations

from typing import Any

from hybridlm.checkpoints.layout import QWEN_35, QWEN_NEXT, check_model_type
from hybridlm.config import HybridConfig
from hybridlm.hf_config import config_from_hf, minimax_residual_factors

ARCHITECTURES = {
    "qwen3_next": "Qwen3NextForCausalLM",
    "qwen3_5_text": "Qwen3_5ForCausalLM",
    "qwen3_5_moe_text": "Qwen3_5MoeForCausalLM",
    "minimax_m2": "MiniMaxM2ForCausalLM",
    "kimi_linear": "KimiLinearForCausalLM",
    "minimax": "MiniMaxForCausalLM",
    "deepseek_v32": "DeepseekV32ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
}
# A multimodal Qwen3.5 folder is exported as its text model (the vision tower is not loaded here).
_TEXT_TYPE = {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text"}
_QWEN_HYBRID = QWEN_NEXT | QWEN_35
# The layer letters each model type holds.
_LETTERS = {"kimi_linear": {"K", "M"}, "minimax": {"L", "A"}, "deepseek_v32": {"S"}}
_DEEPSEEK_MOE = ("kimi_linear", "deepseek_v32")
_KIMI_NAMES = {"max_position_embeddings": "model_max_length", "norm_topk_prob": "moe_renormalize",
               "n_group": "num_expert_group", "num_local_experts": "num_experts",
               "num_experts_per_tok": "num_experts_per_token", "n_shared_experts": "num_shared_experts"}


def read_hf_config(d: dict[str, Any]) -> tuple[HybridConfig, str]:
    """(HybridConfig, model_type) of a parsed config.json, refusing what HybridLM would not compute.

    d: the JSON object. model_type is the folder's own (``qwen3_5`` for a multimodal Qwen3.5).
    The config's ``meta`` keeps model_type and the (text) config dict so an export can write the
    fields this library does not model (token ids, ...) back unchanged.
    """
    if not isinstance(d, dict):
        raise TypeError(f"config: expected a dict parsed from config.json, got {type(d).__name__}")
    model_type = d.get("model_type")
    check_model_type(model_type)
    text = d["text_config"] if isinstance(d.get("text_config"), dict) else d
    problems = _unsupported_features(text, model_type)
    if d.get("quantization_config") or text.get("quantization_config"):
        quant = (d.get("quantization_config") or text.get("quantization_config") or {}).get("quant_method", "?")
        problems.append(f"quantization_config ({quant}: quantized weights; use a bf16/fp32 checkpoint)")
    if problems:
        raise ValueError(f"config.json ({model_type}): not supported here: {'; '.join(problems)}")
    config = config_from_hf(d)
    letters = set(config.layer_types)
    allowed = _allowed_letters(model_type)
    if not letters <= allowed:
        raise ValueError(f"layer_types: a {model_type} model here holds layers {sorted(allowed)}, "
                         f"got {config.layer_types!r}")
    overrides: dict[str, Any] = {}
    if model_type in QWEN_NEXT and config.num_experts:
        overrides["first_dense_layers"] = _qwen_next_dense_prefix(text)
    if model_type == "minimax":
        # transformers' MiniMax rotates the whole head (its rotary embedding ignores partial_rotary_factor
        # and rotary_dim); parity with it is what a loaded model promises.
        overrides["partial_rotary_factor"] = 1.0
    if model_type == "deepseek_v32":
        overrides["index_key_bytes"] = 0.0  # the weights run here cache index keys in the model dtype, not fp8
    meta = {**config.meta, "hf_model_type": model_type, "hf_config": {k: v for k, v in text.items()}}
    return config.replace(meta=meta, **overrides), model_type


def _allowed_letters(model_type: str) -> set[str]:
    return _LETTERS.get(model_type, {"G", "A"} if model_type in _QWEN_HYBRID else {"A"})


def _unsupported_features(d: dict[str, Any], model_type: str) -> list[str]:
    problems = []
    if model_type == "minimax":  # one alpha and one beta for every residual branch (as MiniMax-M1 has)
        alphas, betas = minimax_residual_factors(d)
        if len(set(alphas)) > 1 or len(set(betas)) > 1:
            problems.append(f"residual factors alpha {alphas}, beta {betas} (full attention, linear attention, "
                            "MLP) that differ between branches")
        if d.get("postnorm") is False:  # transformers' MiniMax (and this loader) take the residual after the norm
            problems.append("postnorm=false")
    if model_type in _DEEPSEEK_MOE and d.get("topk_method", "noaux_tc") != "noaux_tc":
        problems.append(f"topk_method {d['topk_method']!r} (only 'noaux_tc')")
    if d.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {d['hidden_act']!r} (only 'silu' SwiGLU MLPs)")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        problems.append(f"rope_type {rope_type!r} (only plain RoPE)")
    for flag in ("attention_bias", "mlp_bias", "use_sliding_window"):
        if d.get(flag):
            problems.append(f"{flag}=true")
    if model_type in QWEN_NEXT and d.get("num_experts") and d.get("decoder_sparse_step", 1) != 1:
        problems.append(f"decoder_sparse_step {d['decoder_sparse_step']} (MoE must be on every layer "
                        "after the dense ones)")
    if model_type in ("qwen3", "llama") and d.get("num_experts"):
        problems.append("num_experts on a dense model type")
    if model_type in _QWEN_HYBRID and d.get("num_experts") and not d.get("shared_expert_intermediate_size"):
        problems.append("MoE without a shared expert")
    return problems


def _qwen_next_dense_prefix(d: dict[str, Any]) -> int:
    dense = sorted(d.get("mlp_only_layers") or [])
    if dense != list(range(len(dense))):
        raise ValueError(f"mlp_only_layers: only leading dense layers (0, 1, ...) are supported, got {dense}")
    return len(dense)


# --------------------------------------------------------------------------- export
def infer_model_type(config: HybridConfig) -> str:
    """The HF model type that holds ``config``: the one it was loaded from, else one guessed from
    its structure (K+M: kimi_linear; L+A: minimax; S: deepseek_v32; G+A hybrid: qwen3_next with MoE,
    qwen3_5_text dense; all-attention: minimax_m2, qwen3 or llama by the q/k norm)."""
    loaded = config.meta.get("hf_model_type")
    if loaded:
        return _TEXT_TYPE.get(loaded, loaded)
    letters = set(config.layer_types)
    for model_type, held in _LETTERS.items():
        if letters & (held - {"A"}) and letters <= held:
            return model_type
    if "G" in letters and letters <= {"G", "A"}:
        return "qwen3_next" if config.num_experts else "qwen3_5_text"
    if letters == {"A"} and not config.qk_norm:
        return "llama"
    if letters == {"A"}:
        return "minimax_m2" if config.qk_norm_scope == "all" else "qwen3"
    raise ValueError(f"layer_pattern: no supported Hugging Face model type holds layers {sorted(letters)}; "
                     "export needs G and A (Qwen3-Next / Qwen3.5), K and M (Kimi Linear), L and A (MiniMax), "
                     "S on an MLA base (DeepSeek V3.2) or A only (Qwen3, Llama, MiniMax-M2)")


def to_hf_config(config: HybridConfig, model_type: str, dtype: str) -> dict[str, Any]:
    """The config.json dict of ``config`` as a ``model_type`` checkpoint whose tensors are ``dtype``.

    Raises ValueError naming every way the model does not fit that type.
    """
    model_type = _TEXT_TYPE.get(model_type, model_type)
    check_model_type(model_type)
    problems = _misfits(config, model_type)
    if problems:
        raise ValueError(f"model_type {model_type!r} cannot hold this model: {'; '.join(problems)}")
    c = config
    base = c.meta.get("hf_config") if _TEXT_TYPE.get(c.meta.get("hf_model_type"), c.meta.get("hf_model_type")) \
        == model_type else None
    d: dict[str, Any] = dict(base or {})
    d.update(
        architectures=[ARCHITECTURES[model_type]], model_type=model_type, dtype=dtype,
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim, hidden_act="silu", rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
        initializer_range=c.initializer_range, intermediate_size=c.intermediate_size,
        rope_parameters=_rope_parameters(c, (base or {}).get("rope_parameters")),
    )
    d.pop("rope_theta", None)
    d.pop("rope_scaling", None)
    if model_type != "minimax_m2":
        d["attention_bias"] = False
    if model_type == "deepseek_v32":
        d["layer_types"] = ["indexed_attention"] * c.num_layers
    elif model_type != "llama":
        d["layer_types"] = ["linear_attention" if t in "GKL" else "full_attention" for t in c.layer_types]
    d.update(_seed_fields(c, model_type))
    if model_type in ("kimi_linear", "deepseek_v32"):  # MLA rotates its whole rope part (qk_rope_head_dim)
        d["rope_parameters"].pop("partial_rotary_factor", None)
    if model_type in _LETTERS and base is None:
        # their config classes default to the released tokenizer's ids, which a smaller vocabulary lacks
        d.update(pad_token_id=None, bos_token_id=None, eos_token_id=None)
    if model_type in _QWEN_HYBRID:
        d.update(linear_num_key_heads=c.linear_num_key_heads, linear_num_value_heads=c.linear_num_value_heads,
                 linear_key_head_dim=c.linear_key_head_dim, linear_value_head_dim=c.linear_value_head_dim,
                 linear_conv_kernel_dim=c.linear_conv_kernel_dim)
    d.update(_moe_config(c, model_type))
    if model_type == "kimi_linear":
        # Kimi's config.json names (transformers maps them to its own); layer_types replaces the sub-dict.
        d.pop("linear_attn_config", None)
        for ours, theirs in _KIMI_NAMES.items():
            if ours in d:
                d[theirs] = d.pop(ours)
    return d


def _seed_fields(c: HybridConfig, model_type: str) -> dict[str, Any]:
    """The fields of Kimi Linear, MiniMax and DeepSeek V3.2 configs beyond the common ones."""
    mla = dict(q_lora_rank=c.mla_q_lora_rank or None, kv_lora_rank=c.mla_kv_lora_rank,
               qk_nope_head_dim=c.mla_qk_nope_head_dim, qk_rope_head_dim=c.mla_qk_rope_head_dim,
               v_head_dim=c.mla_v_head_dim, head_dim=c.mla_qk_rope_head_dim)
    if model_type == "kimi_linear":
        return dict(mla, linear_num_heads=c.linear_num_key_heads, linear_head_dim=c.linear_key_head_dim,
                    linear_conv_kernel_dim=c.linear_conv_kernel_dim)
    if model_type == "deepseek_v32":
        return dict(mla, index_n_heads=c.index_num_heads, index_head_dim=c.index_head_dim, index_topk=c.index_topk,
                    first_k_dense_replace=c.first_dense_layers)
    return {}


def _rope_parameters(c: HybridConfig, base: dict[str, Any] | None) -> dict[str, Any]:
    rope = dict(base or {})
    rope.update(rope_type="default", rope_theta=c.rope_theta)
    if c.partial_rotary_factor != 1.0:
        rope["partial_rotary_factor"] = c.partial_rotary_factor
    return rope


def _moe_config(c: HybridConfig, model_type: str) -> dict[str, Any]:
    if model_type == "minimax_m2":
        return dict(num_local_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
                    intermediate_size=c.moe_intermediate_size, scoring_func="sigmoid")
    if model_type == "minimax":
        factors = {f"{b}_{ab}_factor": getattr(c, f"residual_{ab}") for b in ("full_attn", "linear_attn", "mlp")
                   for ab in ("alpha", "beta")}
        return dict(factors, num_local_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
                    intermediate_size=c.moe_intermediate_size)
    if model_type in _DEEPSEEK_MOE:
        n_shared = c.shared_expert_intermediate_size // c.moe_intermediate_size
        experts = {"num_local_experts" if model_type == "kimi_linear" else "n_routed_experts": c.num_experts}
        dense = ["dense" if not c.layer_uses_moe(i) else "sparse" for i in range(c.num_layers)]
        return dict(experts, num_experts_per_tok=c.num_experts_per_tok, moe_intermediate_size=c.moe_intermediate_size,
                    n_shared_experts=n_shared, n_group=c.n_group, topk_group=c.topk_group,
                    routed_scaling_factor=c.routed_scaling_factor, norm_topk_prob=c.norm_topk_prob,
                    mlp_layer_types=dense)
    if model_type == "qwen3_next":
        moe = dict(num_experts=c.num_experts, decoder_sparse_step=1,
                   mlp_only_layers=list(range(c.first_dense_layers)) if c.num_experts else [])
    elif model_type == "qwen3_5_moe_text":
        moe = dict(num_experts=c.num_experts)
    else:
        return {}
    if c.num_experts:
        moe.update(num_experts_per_tok=c.num_experts_per_tok, moe_intermediate_size=c.moe_intermediate_size,
                   shared_expert_intermediate_size=c.shared_expert_intermediate_size,
                   norm_topk_prob=c.norm_topk_prob)
    return moe


def _misfits(c: HybridConfig, model_type: str) -> list[str]:
    """Every field of ``c`` that a ``model_type`` checkpoint cannot express."""
    if model_type in _LETTERS:
        return _seed_misfits(c, model_type)
    hybrid = model_type in _QWEN_HYBRID
    want: dict[str, Any] = {
        # norm_zero_centered is not here: the layout converts RMSNorm weights between the forms.
        "attn_output_gate": hybrid, "qk_norm": model_type != "llama",
        "attention_bias": False, "residual_from_norm": False, "residual_alpha": 1.0, "residual_beta": 1.0,
    }
    if model_type != "llama":
        want["qk_norm_scope"] = "all" if model_type == "minimax_m2" else "head"
    if not hybrid:
        want["partial_rotary_factor"] = c.partial_rotary_factor if model_type == "minimax_m2" else 1.0
    problems = [f"{k}={getattr(c, k)!r} (needs {v!r})" for k, v in want.items() if getattr(c, k) != v]
    allowed = {"G", "A"} if hybrid else {"A"}
    if not set(c.layer_types) <= allowed:
        problems.append(f"layer_types {c.layer_types!r} (needs only {''.join(sorted(allowed))})")
    if hybrid and "G" in c.layer_types and c.linear_conv_kernel_dim < 1:
        problems.append("linear_conv_kernel_dim=0 (the checkpoint always has a short conv)")
    return problems + _moe_misfits(c, model_type)


def _moe_misfits(c: HybridConfig, model_type: str) -> list[str]:
    if model_type in ("qwen3", "llama", "qwen3_5_text"):
        return [f"num_experts={c.num_experts} (a dense model type)"] if c.num_experts else []
    if not c.num_experts:
        return [] if model_type == "qwen3_next" else ["num_experts=0 (an MoE model type)"]
    want: dict[str, Any] = {"router": "softmax", "router_score_bias": False}
    if model_type == "minimax_m2":
        want = {"router": "sigmoid", "router_score_bias": True, "norm_topk_prob": True,
                "shared_expert_intermediate_size": 0, "first_dense_layers": 0}
    elif model_type == "qwen3_5_moe_text":
        want.update(norm_topk_prob=True, first_dense_layers=0)
    problems = [f"{k}={getattr(c, k)!r} (needs {v!r})" for k, v in want.items() if getattr(c, k) != v]
    if model_type != "minimax_m2" and c.shared_expert_intermediate_size <= 0:
        problems.append("shared_expert_intermediate_size=0 (needs a shared expert)")
    return problems


def _seed_misfits(c: HybridConfig, model_type: str) -> list[str]:
    """What Kimi Linear, MiniMax and DeepSeek V3.2 checkpoints cannot express."""
    want: dict[str, Any] = {"attn_output_gate": False, "qk_norm": False, "attention_bias": False,
                            "norm_zero_centered": False, "residual_from_norm": model_type == "minimax"}
    if model_type != "minimax":
        want.update(residual_alpha=1.0, residual_beta=1.0)
    if model_type == "kimi_linear":
        want.update(mla_use_nope=True, linear_num_value_heads=c.linear_num_key_heads,
                    linear_value_head_dim=c.linear_key_head_dim)
    elif model_type == "minimax":
        want.update(partial_rotary_factor=1.0, linear_conv_kernel_dim=0, linear_num_key_heads=c.num_attention_heads,
                    linear_num_value_heads=c.num_attention_heads, linear_key_head_dim=c.head_dim,
                    linear_value_head_dim=c.head_dim)
    else:
        want.update(sparse_base="mla", mla_use_nope=False, mla_rope_interleave=True, index_key_bytes=0.0)
        if not c.mla_q_lora_rank:
            want["mla_q_lora_rank"] = "> 0"
    problems = [f"{k}={getattr(c, k)!r} (needs {v!r})" for k, v in want.items() if getattr(c, k) != v]
    if not set(c.layer_types) <= _LETTERS[model_type]:
        problems.append(f"layer_types {c.layer_types!r} (needs only {''.join(sorted(_LETTERS[model_type]))})")
    if model_type == "kimi_linear" and c.linear_conv_kernel_dim < 1:
        problems.append("linear_conv_kernel_dim=0 (the checkpoint always has short convs)")
    if not c.num_experts:
        return problems + ["num_experts=0 (an MoE model type)"]
    if model_type == "minimax":
        moe = {"router": "softmax", "router_score_bias": False, "norm_topk_prob": True,
               "shared_expert_intermediate_size": 0, "first_dense_layers": 0, "n_group": 1}
    else:
        moe = {"router": "sigmoid", "router_score_bias": True, "shared_expert_gate": False}
        if c.shared_expert_intermediate_size % c.moe_intermediate_size or not c.shared_expert_intermediate_size:
            problems.append(f"shared_expert_intermediate_size={c.shared_expert_intermediate_size} (needs a "
                            f"positive multiple of moe_intermediate_size {c.moe_intermediate_size})")
    return problems + [f"{k}={getattr(c, k)!r} (needs {v!r})" for k, v in moe.items() if getattr(c, k) != v]
