"""HybridConfig: one dataclass describes every model hybridlm builds.

The hybrid layout lives in one field, ``layer_pattern``: a string of layer letters tiled over
``num_layers`` (``"GGGA"`` with 48 layers is Qwen3-Next). Letters:

    G  gated DeltaNet            (linear, recurrent state [HV, K, V] + short-conv window)
    K  Kimi delta attention      (linear, per-channel decay)
    L  lightning attention       (linear, constant per-head decay)
    D  DeltaNet                  (linear, no decay)
    X  linear attention with a feature map (no delta rule)
    A  gated softmax attention   (GQA, KV cache)
    M  multi-head latent attention (caches the latent + rotary key)
    S  sparse attention          (indexer + top-k over the cached history)
    W  sliding-window attention  (KV cache capped at ``sliding_window`` tokens)

Presets (``HybridConfig.preset(name)``) live in ``hybridlm.presets``. This module depends on
nothing but the standard library, so the memory calculator can use it without torch.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LAYER_LETTERS = {
    "G": "gated_deltanet",
    "K": "kimi_delta_attention",
    "L": "lightning_attention",
    "D": "deltanet",
    "X": "linear_attention",
    "A": "attention",
    "M": "mla",
    "S": "sparse_attention",
    "W": "sliding_window_attention",
}
LINEAR_LETTERS = frozenset("GKLDX")  # carry a fixed-size recurrent state
ATTENTION_LETTERS = frozenset("AMSW")  # carry a per-token cache
FEATURE_MAPS = ("identity", "elu", "relu")
DTYPES = ("float32", "float64", "bfloat16", "float16")


@dataclass
class HybridConfig:
    """Every dimension of a hybrid model. Defaults describe a tiny 3:1 hybrid for tests.

    Example::

        cfg = HybridConfig(num_layers=8, layer_pattern="GGGA", hidden_size=128)
        cfg.layer_types          # 'GGGAGGGA'
        HybridConfig.preset("tiny-hybrid-7to1").layer_types
    """

    # --- model ---
    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 4
    layer_pattern: str = "GGGA"
    tie_word_embeddings: bool = False
    rms_norm_eps: float = 1e-6
    # Qwen3-Next / Qwen3.5 RMSNorm: weight stored as an offset from 1 (y = x_hat * (1 + w)).
    norm_zero_centered: bool = False
    initializer_range: float = 0.02
    max_position_embeddings: int = 262_144
    # MiniMax-01 / M1: each residual branch adds to the *normalised* input, x <- norm(x) + f(norm(x)),
    # instead of x <- x + f(norm(x)).
    residual_from_norm: bool = False
    # MiniMax-01 / M1 (DeepNorm-style): x <- alpha * residual + beta * f(...) on every branch
    residual_alpha: float = 1.0
    residual_beta: float = 1.0

    # --- softmax attention (A, W; S on a GQA base) ---
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    partial_rotary_factor: float = 0.25  # fraction of head_dim that is rotated
    rope_theta: float = 10_000.0
    attn_output_gate: bool = True  # Qwen3-Next: o = o * sigmoid(W_g x)
    qk_norm: bool = True  # per-head RMSNorm on q and k
    # "head": one RMSNorm over each head's head_dim (Qwen3); "all": over all heads at once, before the
    # split into heads (MiniMax-M2: q_norm weight of num_attention_heads * head_dim).
    qk_norm_scope: str = "head"
    attention_bias: bool = False
    sliding_window: int | None = None  # tokens, for W layers

    # --- linear layers (G, K, L, D, X) ---
    linear_num_key_heads: int = 2
    linear_num_value_heads: int = 4  # a multiple of linear_num_key_heads
    linear_key_head_dim: int = 16
    linear_value_head_dim: int = 16
    linear_conv_kernel_dim: int = 4  # 0 disables the short causal conv
    linear_feature_map: str = "elu"  # X layers: identity | elu (elu+1) | relu
    linear_normalize: bool = False  # X layers: divide by phi(q) . sum phi(k)
    chunk_size: int = 64
    state_dtype: str = "float32"  # recurrent state in the cache

    # --- MLP / MoE ---
    intermediate_size: int = 128  # dense SwiGLU MLP
    num_experts: int = 0  # 0: every layer has a dense MLP
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 64
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    norm_topk_prob: bool = True
    router: str = "softmax"  # softmax | sigmoid
    # A learned per-expert bias added to the scores for choosing experts only, not to their weights
    # (DeepSeek-V3 / MiniMax-M2 e_score_correction_bias).
    router_score_bias: bool = False
    first_dense_layers: int = 0  # leading layers that keep the dense MLP in an MoE model
    # DeepSeek-V3 / Kimi grouped routing: experts split into n_group groups, a token picks experts
    # only from its topk_group best groups (a group scores the sum of its two best experts).
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0  # multiplies the routed experts' weights (not the shared expert)
    shared_expert_gate: bool = True  # Qwen: shared expert scaled by sigmoid(W x); DeepSeek / Kimi: added as is

    # --- multi-head latent attention (M; S on an MLA base) ---
    mla_q_lora_rank: int = 0  # 0: q is projected directly
    mla_kv_lora_rank: int = 32
    mla_qk_nope_head_dim: int = 16
    mla_qk_rope_head_dim: int = 8
    mla_v_head_dim: int = 16
    mla_use_nope: bool = False  # Kimi Linear: no rotary at all in MLA (the rope key is still cached)
    # DeepSeek: rotary channels paired as (0, 1), (2, 3), ... instead of the two halves
    mla_rope_interleave: bool = False

    # --- sparse attention (S): an indexer scores the history, each query keeps its top-k ---
    sparse_base: str = "mla"  # mla (DeepSeek V3.2) | gqa (MiniMax-M3)
    index_num_heads: int = 2
    index_head_dim: int = 16
    index_topk: int = 16  # tokens, or blocks when sparse_block_size > 1
    sparse_block_size: int = 1  # 1: token-level top-k; >1: block top-k (MiniMax-M3)
    sparse_local_blocks: int = 0  # always-kept most recent blocks
    # bytes per cached index key: 0 = the cache dtype; index_head_dim + 4 = DeepSeek's fp8 (e4m3) key with
    # one float32 scale per token (the indexer then scores fp8-rounded keys, cached or not)
    index_key_bytes: float = 0.0

    # Free-form provenance (source, notes) for published presets; not used by the model.
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        self._validate()

    # ----------------------------------------------------------------- derived
    @property
    def layer_types(self) -> str:
        """The pattern tiled (and cut) to ``num_layers`` letters, one per layer."""
        p = self.layer_pattern
        return (p * (self.num_layers // len(p) + 1))[: self.num_layers]

    @property
    def num_linear_layers(self) -> int:
        return sum(c in LINEAR_LETTERS for c in self.layer_types)

    @property
    def num_attention_layers(self) -> int:
        return sum(c in ATTENTION_LETTERS for c in self.layer_types)

    @property
    def rotary_dim(self) -> int:
        """Rotated channels of each attention head (even)."""
        return int(self.head_dim * self.partial_rotary_factor) // 2 * 2

    def layer_uses_moe(self, i: int) -> bool:
        return self.num_experts > 0 and i >= self.first_dense_layers

    # ----------------------------------------------------------------- presets / io
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "HybridConfig":
        """A named config (see ``hybridlm.presets.PRESETS``) with optional field overrides."""
        from hybridlm.presets import PRESETS

        if name not in PRESETS:
            known = ", ".join(sorted(PRESETS))
            raise ValueError(f"preset: unknown name {name!r}; expected one of: {known}")
        return dataclasses.replace(PRESETS[name](), **overrides)

    def replace(self, **overrides: Any) -> "HybridConfig":
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HybridConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"config: unknown fields {unknown}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "HybridConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    # ----------------------------------------------------------------- checks
    def _validate(self) -> None:
        def positive(name: str) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")

        for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "linear_num_key_heads",
                     "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                     "intermediate_size", "chunk_size", "max_position_embeddings"):
            positive(name)
        if not isinstance(self.layer_pattern, str) or not self.layer_pattern:
            raise ValueError(f"layer_pattern: expected a non-empty string, got {self.layer_pattern!r}")
        bad = sorted(set(self.layer_pattern) - set(LAYER_LETTERS))
        if bad:
            raise ValueError(
                f"layer_pattern: unknown letters {bad} in {self.layer_pattern!r}; "
                f"expected letters from {''.join(LAYER_LETTERS)} ({', '.join(f'{k}={v}' for k, v in LAYER_LETTERS.items())})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ValueError(
                f"linear_num_value_heads ({self.linear_num_value_heads}) must be a multiple of "
                f"linear_num_key_heads ({self.linear_num_key_heads})"
            )
        if not 0.0 <= self.partial_rotary_factor <= 1.0:
            raise ValueError(f"partial_rotary_factor: expected a value in [0, 1], got {self.partial_rotary_factor}")
        if self.linear_feature_map not in FEATURE_MAPS:
            raise ValueError(f"linear_feature_map: expected one of {FEATURE_MAPS}, got {self.linear_feature_map!r}")
        if self.state_dtype not in DTYPES:
            raise ValueError(f"state_dtype: expected one of {DTYPES}, got {self.state_dtype!r}")
        if self.router not in ("softmax", "sigmoid"):
            raise ValueError(f"router: expected 'softmax' or 'sigmoid', got {self.router!r}")
        if self.qk_norm_scope not in ("head", "all"):
            raise ValueError(f"qk_norm_scope: expected 'head' or 'all', got {self.qk_norm_scope!r}")
        if self.sparse_base not in ("mla", "gqa"):
            raise ValueError(f"sparse_base: expected 'mla' or 'gqa', got {self.sparse_base!r}")
        if "M" in self.layer_pattern or ("S" in self.layer_pattern and self.sparse_base == "mla"):
            for name in ("mla_kv_lora_rank", "mla_qk_nope_head_dim", "mla_v_head_dim", "mla_qk_rope_head_dim"):
                positive(name)
            if self.mla_qk_rope_head_dim % 2:
                raise ValueError(f"mla_qk_rope_head_dim: expected an even number (rotary pairs), "
                                 f"got {self.mla_qk_rope_head_dim}")
            if not isinstance(self.mla_q_lora_rank, int) or self.mla_q_lora_rank < 0:
                raise ValueError(f"mla_q_lora_rank: expected an int >= 0 (0: no q LoRA), got {self.mla_q_lora_rank!r}")
        if "S" in self.layer_pattern:
            for name in ("index_num_heads", "index_head_dim", "index_topk", "sparse_block_size"):
                positive(name)
            if self.sparse_local_blocks < 0:
                raise ValueError(f"sparse_local_blocks: expected >= 0, got {self.sparse_local_blocks}")
        if self.index_key_bytes not in (0, self.index_head_dim + 4):
            raise ValueError(f"index_key_bytes: expected 0 (keys in the cache dtype) or index_head_dim + 4 = "
                             f"{self.index_head_dim + 4} (fp8 keys + a float32 scale), got {self.index_key_bytes}")
        if self.linear_conv_kernel_dim < 0:
            raise ValueError(f"linear_conv_kernel_dim: expected >= 0, got {self.linear_conv_kernel_dim}")
        if "W" in self.layer_pattern and (self.sliding_window is None or self.sliding_window <= 0):
            raise ValueError(f"sliding_window: 'W' layers need a positive window, got {self.sliding_window!r}")
        if self.num_experts:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ValueError(
                    f"num_experts_per_tok: expected 1..num_experts ({self.num_experts}), got {self.num_experts_per_tok}"
                )
            positive("moe_intermediate_size")
            for name in ("n_group", "topk_group"):
                positive(name)
            if self.num_experts % self.n_group or self.topk_group > self.n_group:
                raise ValueError(f"n_group, topk_group: expected n_group dividing num_experts ({self.num_experts}) "
                                 f"and topk_group <= n_group, got {self.n_group}, {self.topk_group}")
            if self.n_group > 1 and self.num_experts_per_tok > self.topk_group * (self.num_experts // self.n_group):
                raise ValueError(f"num_experts_per_tok: expected at most topk_group * experts per group "
                                 f"({self.topk_group * (self.num_experts // self.n_group)}), got {self.num_experts_per_tok}")
