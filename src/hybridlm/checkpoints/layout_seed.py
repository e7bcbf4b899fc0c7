"""Checkpoint layouts of the seed architectures' layers: Kimi Linear (KDA, MLA), MiniMax (lightning),
DeepSeek V3.2 (sparse MLA with its indexer), and the DeepSeek-style MoE both Kimi and DeepSeek use.

Names are those of the released checkpoints, which transformers reads and writes back unchanged.
The conversions that are more than a rename:

* Kimi ``A_log`` [1, 1, HV, 1] is ours [HV].
* MiniMax ``qkv_proj`` [H * 3K, D]: per head (q_h, k_h, v_h) rows; ours are three projections.
* MiniMax's lightning layers store their decay schedule as buffers (``slope_rate``, ``query_decay``,
  ``key_decay``, ``diagonal_decay``, the last three for its block size). Ours computes the slopes from
  the layer index, so these fill no tensor of ours: on load they are checked against the schedule (a
  checkpoint with other slopes would compute something else), on export they are written from it.
"""

from __future__ import annotations

import torch

from hybridlm.checkpoints.entries import Entry, grouped_rows, rename, swiglu
from hybridlm.config import HybridConfig
from hybridlm.ops import lightning_slopes

DEFAULT_BLOCK_SIZE = 256  # MiniMaxConfig's block_size


def seed_mixer(c: HybridConfig, letter: str, i: int, hf: str, ours: str) -> list[Entry]:
    """Entries of layer i's token mixer (letter K, L, M or S) under the checkpoint prefix ``hf``."""
    if letter == "K":
        return _kda(c, hf, ours)
    if letter == "L":
        return _lightning(c, i, hf, ours)
    entries = _mla(c, hf, ours)
    return entries + _indexer(c, f"{hf}indexer.", f"{ours}indexer.") if letter == "S" else entries


def _kda(c: HybridConfig, hf: str, ours: str) -> list[Entry]:
    D, H, HV = c.hidden_size, c.linear_num_key_heads, c.linear_num_value_heads
    K, V, W = c.linear_key_head_dim, c.linear_value_head_dim, c.linear_conv_kernel_dim
    names = [("q_proj", (H * K, D)), ("k_proj", (H * K, D)), ("v_proj", (HV * V, D)), ("f_a_proj", (K, D)),
             ("f_b_proj", (HV * K, K)), ("b_proj", (HV, D)), ("g_a_proj", (V, D)), ("g_b_proj", (HV * V, V)),
             ("o_proj", (D, HV * V))]
    entries = [rename(f"{hf}{n}.weight", f"{ours}{n}.weight", shape) for n, shape in names]
    entries += [rename(f"{hf}{x}_conv1d.weight", f"{ours}{x}_conv.weight", (n, 1, W))
                for x, n in (("q", H * K), ("k", H * K), ("v", HV * V))]
    return entries + [
        rename(f"{hf}dt_bias", f"{ours}dt_bias", (HV * K,)),
        Entry(f"{hf}A_log", (1, 1, HV, 1), (f"{ours}A_log",), lambda t: (t.reshape(-1),),
              lambda ts: ts[0].reshape(1, 1, -1, 1)),
        rename(f"{hf}o_norm.weight", f"{ours}norm.weight", (V,)),
    ]


def _lightning(c: HybridConfig, i: int, hf: str, ours: str) -> list[Entry]:
    D, H, K = c.hidden_size, c.linear_num_value_heads, c.linear_key_head_dim
    block = int((c.meta.get("hf_config") or {}).get("block_size", DEFAULT_BLOCK_SIZE))
    entries = [Entry(f"{hf}qkv_proj.weight", (3 * H * K, D), tuple(f"{ours}{x}_proj.weight" for x in "qkv"),
                     *grouped_rows(H, [K, K, K])),
               rename(f"{hf}norm.weight", f"{ours}norm.weight", (H * K,)),
               rename(f"{hf}output_gate.weight", f"{ours}output_gate.weight", (H * K, D)),
               rename(f"{hf}out_proj.weight", f"{ours}o_proj.weight", (D, H * K))]
    for name, value in _decay_buffers(c, i, block).items():
        entries.append(Entry(f"{hf}{name}", tuple(value.shape), (), _checked(f"{hf}{name}", value),
                             lambda ts, value=value: value))
    return entries


def _decay_buffers(c: HybridConfig, i: int, block: int) -> dict[str, torch.Tensor]:
    """MiniMax's lightning decay buffers of layer i: per-head slope, and the in-block decays it implies."""
    slope = lightning_slopes(c.linear_num_value_heads, i, c.num_layers)[:, None, None]  # [H, 1, 1]
    steps = torch.arange(1, block + 1, dtype=torch.float32)[:, None]  # [block, 1]
    gap = slope * (steps - steps.T)[None]  # [H, block, block]: i - j steps back
    return {"slope_rate": slope, "query_decay": torch.exp(-slope * steps), "key_decay": torch.exp(-slope * (block - steps)),
            "diagonal_decay": torch.exp(torch.where(gap >= 0, -gap, float("-inf")))[None]}


def _checked(name: str, expected: torch.Tensor):
    def to_ours(t: torch.Tensor) -> tuple:
        if not t.is_meta and not torch.allclose(t.float(), expected, rtol=1e-3, atol=1e-6):
            raise ValueError(f"{name}: the checkpoint's lightning decay differs from MiniMax's slope schedule "
                             "(which this layer computes from its index); refusing to load a model that would differ")
        return ()
    return to_ours


def _mla(c: HybridConfig, hf: str, ours: str) -> list[Entry]:
    D, H, R, Dr = c.hidden_size, c.num_attention_heads, c.mla_kv_lora_rank, c.mla_qk_rope_head_dim
    q_rows = H * (c.mla_qk_nope_head_dim + Dr)
    r = c.mla_q_lora_rank
    shapes = {"q_a_proj.weight": (r, D), "q_a_layernorm.weight": (r,), "q_b_proj.weight": (q_rows, r)} if r \
        else {"q_proj.weight": (q_rows, D)}
    shapes.update({"kv_a_proj_with_mqa.weight": (R + Dr, D), "kv_a_layernorm.weight": (R,),
                   "kv_b_proj.weight": (H * (c.mla_qk_nope_head_dim + c.mla_v_head_dim), R),
                   "o_proj.weight": (D, H * c.mla_v_head_dim)})
    return [rename(f"{hf}{n}", f"{ours}{n}", shape) for n, shape in shapes.items()]


def _indexer(c: HybridConfig, hf: str, ours: str) -> list[Entry]:
    HI, Di, D = c.index_num_heads, c.index_head_dim, c.hidden_size
    shapes = {"wq_b.weight": (HI * Di, c.mla_q_lora_rank or D), "wk.weight": (Di, D), "k_norm.weight": (Di,),
              "k_norm.bias": (Di,), "weights_proj.weight": (HI, D)}
    return [rename(f"{hf}{n}", f"{ours}{n}", shape) for n, shape in shapes.items()]


def deepseek_moe(c: HybridConfig, hf: str, ours: str, kimi: bool) -> list[Entry]:
    """Router (+ selection bias), routed experts and the ungated shared expert of DeepSeek-V3 / Kimi MoE."""
    D, E, I = c.hidden_size, c.num_experts, c.moe_intermediate_size
    entries = [rename(f"{hf}gate.weight", f"{ours}gate.weight", (E, D)),
               rename(f"{hf}gate.e_score_correction_bias", f"{ours}score_bias", (E,))]
    names = ("w1", "w3", "w2") if kimi else ("gate_proj", "up_proj", "down_proj")
    for e in range(E):
        entries += swiglu(f"{hf}experts.{e}.", f"{ours}experts.{e}.", D, I, names=names)
    return entries + swiglu(f"{hf}shared_experts.", f"{ours}shared_expert.", D, c.shared_expert_intermediate_size)
