"""Where each tensor of a Hugging Face checkpoint goes in HybridLM, and how it is cut or joined.

One ``Entry`` per checkpoint tensor: its name and shape there, the HybridLM parameter(s) it fills,
and the two functions that convert between them. Most entries are renames. The fused ones:

* Qwen3-Next ``in_proj_qkvz`` [H * (2K + 2rV), D]: rows grouped per key head h as
  (q_h [K], k_h [K], v_h [r * V], z_h [r * V]), r = HV / H value heads per key head; ours are four
  separate projections with value head j = h * r + i (the order HF reshapes them to).
* Qwen3-Next ``in_proj_ba`` [2 HV, D]: per key head (b_h [r], a_h [r]).
* Qwen3.5 ``in_proj_qkv`` [2HK + HV V, D]: q, k, v stacked (no grouping).
* MiniMax-M2 experts ``w1 / w3 / w2`` = gate / up / down.

Formats that already match ours need no entry logic: the conv1d weight [C, 1, W] over the
concatenated (q, k, v) channels, and the gated attention ``q_proj`` whose output is per head
(query [D_h], gate [D_h]), the layout GatedAttention reads.

RMSNorm weights convert between forms: Qwen3-Next / Qwen3.5 store them zero-centred (scale 1 + w),
so a model of ours with plain norms (scale w) exports with w - 1, and loads back either way.
"""

from __future__ import annotations

from collections.abc import Callable

from hybridlm.checkpoints.entries import Entry, grouped_rows, rename, stacked_rows, swiglu
from hybridlm.checkpoints.layout_seed import deepseek_moe, seed_mixer
from hybridlm.config import HybridConfig

QWEN_NEXT = frozenset({"qwen3_next"})
QWEN_35 = frozenset({"qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text"})
SUPPORTED = QWEN_NEXT | QWEN_35 | {"minimax_m2", "qwen3", "llama", "kimi_linear", "minimax", "deepseek_v32"}
# Multimodal Qwen3.5 checkpoints keep the text model under this prefix, next to the vision tower.
_MULTIMODAL_PREFIX = "model.language_model."


def check_model_type(model_type: str) -> None:
    """Raise ValueError unless checkpoints of ``model_type`` can be read and written here."""
    if model_type not in SUPPORTED:
        raise ValueError(f"model_type: expected one of {', '.join(sorted(SUPPORTED))}, got {model_type!r}")


def ignored_prefixes(model_type: str) -> tuple[str, ...]:
    """Checkpoint tensors that belong to parts HybridLM does not run (multi-token-prediction head,
    vision tower); transformers skips them too."""
    if model_type in QWEN_35:
        return ("mtp.", "model.visual.")
    return ("mtp.",) if model_type in QWEN_NEXT else ("model.mtp.",) if model_type == "deepseek_v32" else ()


def hf_layout(config: HybridConfig, model_type: str, names: frozenset[str] = frozenset()) -> list[Entry]:
    """Every tensor of a ``model_type`` checkpoint of the model ``config`` describes.

    names: the tensor names of the folder being read, if any: a Qwen3.5 text checkpoint cut out of
    a multimodal one keeps the ``model.language_model.`` prefix, and is read with it.
    """
    check_model_type(model_type)
    D = config.hidden_size
    nested = model_type in ("qwen3_5", "qwen3_5_moe") or (
        model_type in QWEN_35 and f"{_MULTIMODAL_PREFIX}embed_tokens.weight" in names)
    p = _MULTIMODAL_PREFIX if nested else "model."
    norm = _norm_entry(model_type in QWEN_NEXT | QWEN_35, config.norm_zero_centered)
    entries = [rename(f"{p}embed_tokens.weight", "embed_tokens.weight", (config.vocab_size, D))]
    for i, letter in enumerate(config.layer_types):
        hf, ours = f"{p}layers.{i}.", f"layers.{i}."
        entries += [norm(f"{hf}input_layernorm.weight", f"{ours}mixer_norm.weight", (D,)),
                    norm(f"{hf}post_attention_layernorm.weight", f"{ours}mlp_norm.weight", (D,))]
        if letter == "A":
            entries += _attention(config, f"{hf}self_attn.", f"{ours}mixer.", norm)
        elif letter == "G" and model_type in QWEN_NEXT | QWEN_35:
            entries += _gated_deltanet(config, f"{hf}linear_attn.", f"{ours}mixer.", fused=model_type in QWEN_NEXT)
        elif (letter, model_type) in (("K", "kimi_linear"), ("L", "minimax"), ("M", "kimi_linear"),
                                      ("S", "deepseek_v32")):
            entries += seed_mixer(config, letter, i, f"{hf}self_attn.", f"{ours}mixer.")
        else:
            raise ValueError(f"layer_types: layer {i} is {letter!r}, which a {model_type} checkpoint cannot hold")
        entries += _mlp(config, i, model_type, hf, f"{ours}mlp.", names)
    entries.append(norm(f"{p}norm.weight", "norm.weight", (D,)))
    if not config.tie_word_embeddings:
        entries.append(rename("lm_head.weight", "lm_head.weight", (config.vocab_size, D)))
    return entries


def _norm_entry(hf_zero_centered: bool, ours_zero_centered: bool) -> Callable[..., Entry]:
    """Entries for RMSNorm weights. Both forms scale by (offset + w), offset 1 when zero-centered,
    so a model of either form converts exactly: w_ours = w_hf + (offset_hf - offset_ours)."""
    shift = float(hf_zero_centered) - float(ours_zero_centered)
    if shift == 0:
        return rename
    return lambda hf_name, our_name, shape: Entry(hf_name, shape, (our_name,), lambda t: (t + shift,),
                                                  lambda ts: ts[0] - shift)


def _attention(c: HybridConfig, hf: str, ours: str, norm: Callable[..., Entry]) -> list[Entry]:
    D, H, HKV, hd = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    q_rows = H * hd * (2 if c.attn_output_gate else 1)
    entries = [rename(f"{hf}q_proj.weight", f"{ours}q_proj.weight", (q_rows, D)),
               rename(f"{hf}k_proj.weight", f"{ours}k_proj.weight", (HKV * hd, D)),
               rename(f"{hf}v_proj.weight", f"{ours}v_proj.weight", (HKV * hd, D)),
               rename(f"{hf}o_proj.weight", f"{ours}o_proj.weight", (D, H * hd))]
    if c.qk_norm:
        q_dim, k_dim = (H * hd, HKV * hd) if c.qk_norm_scope == "all" else (hd, hd)
        entries += [norm(f"{hf}q_norm.weight", f"{ours}q_norm.weight", (q_dim,)),
                    norm(f"{hf}k_norm.weight", f"{ours}k_norm.weight", (k_dim,))]
    return entries


def _gated_deltanet(c: HybridConfig, hf: str, ours: str, fused: bool) -> list[Entry]:
    D, H, HV = c.hidden_size, c.linear_num_key_heads, c.linear_num_value_heads
    K, V, W = c.linear_key_head_dim, c.linear_value_head_dim, c.linear_conv_kernel_dim
    r = HV // H
    proj = lambda *names: tuple(f"{ours}{n}_proj.weight" for n in names)  # noqa: E731
    if fused:
        entries = [Entry(f"{hf}in_proj_qkvz.weight", (H * (2 * K + 2 * r * V), D), proj("q", "k", "v", "z"),
                         *grouped_rows(H, [K, K, r * V, r * V])),
                   Entry(f"{hf}in_proj_ba.weight", (2 * HV, D), proj("b", "a"), *grouped_rows(H, [r, r]))]
    else:
        entries = [Entry(f"{hf}in_proj_qkv.weight", (2 * H * K + HV * V, D), proj("q", "k", "v"),
                         *stacked_rows([H * K, H * K, HV * V])),
                   rename(f"{hf}in_proj_z.weight", f"{ours}z_proj.weight", (HV * V, D)),
                   rename(f"{hf}in_proj_b.weight", f"{ours}b_proj.weight", (HV, D)),
                   rename(f"{hf}in_proj_a.weight", f"{ours}a_proj.weight", (HV, D))]
    return entries + [
        rename(f"{hf}conv1d.weight", f"{ours}conv.weight", (2 * H * K + HV * V, 1, W)),
        rename(f"{hf}A_log", f"{ours}A_log", (HV,)),
        rename(f"{hf}dt_bias", f"{ours}dt_bias", (HV,)),
        rename(f"{hf}norm.weight", f"{ours}norm.weight", (V,)),
        rename(f"{hf}out_proj.weight", f"{ours}o_proj.weight", (D, HV * V)),
    ]


def _mlp(c: HybridConfig, i: int, model_type: str, hf_layer: str, ours: str, names: frozenset[str]) -> list[Entry]:
    D = c.hidden_size
    if not c.layer_uses_moe(i):
        # Kimi's dense layers are "mlp." in the released checkpoints, "block_sparse_moe." as transformers saves them.
        kimi_saved = f"{hf_layer}block_sparse_moe.gate_proj.weight" in names
        return swiglu(f"{hf_layer}{'block_sparse_moe' if kimi_saved else 'mlp'}.", ours, D, c.intermediate_size)
    E, I = c.num_experts, c.moe_intermediate_size
    if model_type in ("minimax_m2", "minimax"):
        hf = f"{hf_layer}block_sparse_moe."
        entries = [rename(f"{hf}gate.weight", f"{ours}gate.weight", (E, D))]
        if model_type == "minimax_m2":
            entries.append(rename(f"{hf}e_score_correction_bias", f"{ours}score_bias", (E,)))
        for e in range(E):
            entries += swiglu(f"{hf}experts.{e}.", f"{ours}experts.{e}.", D, I, names=("w1", "w3", "w2"))
        return entries
    if model_type in ("kimi_linear", "deepseek_v32"):
        return deepseek_moe(c, f"{hf_layer}{'block_sparse_moe' if model_type == 'kimi_linear' else 'mlp'}.", ours,
                            kimi=model_type == "kimi_linear")
    hf = f"{hf_layer}mlp."
    entries = [rename(f"{hf}gate.weight", f"{ours}gate.weight", (E, D))]
    for e in range(E):
        entries += swiglu(f"{hf}experts.{e}.", f"{ours}experts.{e}.", D, I)
    S = c.shared_expert_intermediate_size
    if S:
        entries += swiglu(f"{hf}shared_expert.", f"{ours}shared_expert.", D, S)
        entries.append(rename(f"{hf}shared_expert_gate.weight", f"{ours}shared_expert_gate.weight", (1, D)))
    return entries
