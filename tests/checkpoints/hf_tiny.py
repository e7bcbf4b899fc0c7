"""Tiny random transformers models of each supported model type, saved as HF folders.

Every weight is random and not small (norm weights, the expert score bias and the decay
parameters included), so a wrong layout, a wrong norm form or a wrong router cannot hide behind
an initialisation that happens to make two conventions agree.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf

VOCAB = 101
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
               head_dim=8, intermediate_size=48, initializer_range=0.1, bos_token_id=None, eos_token_id=None,
               pad_token_id=None)
_LINEAR = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24)


def hf_config(model_type: str):
    """A transformers config of ``model_type``: 4 layers with both layer kinds where the type has two."""
    if model_type == "qwen3_next":  # irregular layout, first layer dense (mlp_only_layers)
        return tf.Qwen3NextConfig(**_COMMON, **_LINEAR, **_MOE, mlp_only_layers=[0],
                                  layer_types=["linear_attention", "full_attention", "linear_attention",
                                               "full_attention"])
    if model_type == "qwen3_5_text":
        return tf.Qwen3_5TextConfig(**_COMMON, **_LINEAR)
    if model_type == "qwen3_5_moe_text":
        return tf.Qwen3_5MoeTextConfig(**{k: v for k, v in _COMMON.items() if k != "intermediate_size"},
                                       **_LINEAR, **_MOE)
    if model_type == "minimax_m2":  # partial rotary, as the released model
        return tf.MiniMaxM2Config(**_COMMON, num_local_experts=4, num_experts_per_tok=2,
                                  rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                   "partial_rotary_factor": 0.5})
    if model_type == "qwen3":  # tied embeddings, as the small released Qwen3 models
        return tf.Qwen3Config(**_COMMON, tie_word_embeddings=True)
    if model_type == "llama":
        return tf.LlamaConfig(**_COMMON)
    lin_full = ["linear_attention", "linear_attention", "full_attention", "linear_attention"]
    mla = dict(kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, moe_intermediate_size=16,
               num_experts_per_tok=2, n_group=2, topk_group=1, mlp_layer_types=["dense"] + ["sparse"] * 3)
    common_mla = {k: v for k, v in _COMMON.items() if k not in ("head_dim", "num_key_value_heads")}
    if model_type == "kimi_linear":  # grouped sigmoid routing, first layer dense, KDA heads 4 x 8
        return tf.KimiLinearConfig(**common_mla, **mla, num_key_value_heads=4, q_lora_rank=None, linear_num_heads=4,
                                   linear_head_dim=8, num_local_experts=4, n_shared_experts=1, layer_types=lin_full)
    if model_type == "minimax":  # partial rotary, lightning blocks of 16 (crossed at T = 65), scaled residuals
        factors = {f"{b}_{ab}_factor": v for b in ("full_attn", "linear_attn", "mlp") for ab, v in (("alpha", 1.3),
                                                                                                   ("beta", 0.8))}
        return tf.MiniMaxConfig(**_COMMON, **factors, num_local_experts=4, num_experts_per_tok=2, layer_types=lin_full,
                                block_size=16, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                                "partial_rotary_factor": 0.5})
    if model_type == "deepseek_v32":  # the indexer keeps 8 of the tokens
        return tf.DeepseekV32Config(**common_mla, **mla, num_key_value_heads=4, head_dim=4, q_lora_rank=12,
                                    n_routed_experts=4, n_shared_experts=1, index_topk=8, index_head_dim=8,
                                    index_n_heads=8, first_k_dense_replace=1)
    raise ValueError(model_type)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Move the weights that init leaves at constants (norms, biases, decays) to random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(("norm.weight", "dt_bias", "norm.bias")):
                t.add_(0.3 * torch.randn(t.shape, generator=g))
            elif name.endswith("e_score_correction_bias"):
                t.copy_(0.2 * torch.randn(t.shape, generator=g))
            elif name.endswith("indexer.wq_b.weight"):
                mirror_index_heads(t, model.config.index_n_heads)


def mirror_index_heads(wq_b: torch.Tensor, n_heads: int) -> None:
    """Index heads h and h + n/2 get opposite queries, so one of ReLU(q . k), ReLU(-q . k) is positive: an
    index score is never exactly 0, and the top-k never meets the 0-ties on which torch.topk's order and
    ours may differ (the rotary embedding is linear, so the mirror survives it)."""
    heads = wq_b.view(n_heads, -1, wq_b.shape[-1])
    heads[n_heads // 2:] = -heads[: n_heads // 2]


def build(model_type: str, folder: Path, seed: int = 0):
    """(transformers model in eval mode, folder it was saved to)."""
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(hf_config(model_type)).float().eval()
    randomize(model, seed)
    model.save_pretrained(folder)
    return model, folder


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |a|."""
    return ((a.double() - b.double()).abs().max() / a.double().abs().max()).item()
