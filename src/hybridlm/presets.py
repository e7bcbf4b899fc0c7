"""Named configs. Tiny presets (tests, the default study) share the structure of real models at a
size that runs in milliseconds on a CPU. Published presets carry the released dimensions and cite
their source in ``meta``.

Each entry is a zero-argument function returning a fresh ``HybridConfig``.
"""

from __future__ import annotations

from typing import Callable

from hybridlm.config import HybridConfig


def _tiny(**kw) -> Callable[[], HybridConfig]:
    return lambda: HybridConfig(**kw)


PRESETS: dict[str, Callable[[], HybridConfig]] = {
    # -- tiny (tests and the CPU study); defaults: hidden 64, 4 heads of 16, vocab 256 --
    "tiny-mha": _tiny(layer_pattern="A", num_layers=4),
    "tiny-gdn": _tiny(layer_pattern="G", num_layers=4),
    "tiny-hybrid-3to1": _tiny(layer_pattern="GGGA", num_layers=4),
    "tiny-hybrid-7to1": _tiny(layer_pattern="GGGGGGGA", num_layers=8),
    "tiny-linear": _tiny(layer_pattern="X", num_layers=4),
    "tiny-deltanet": _tiny(layer_pattern="D", num_layers=4),
    "tiny-swa": _tiny(layer_pattern="GGGW", num_layers=4, sliding_window=8),
    "tiny-moe": _tiny(layer_pattern="GGGA", num_layers=4, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=32, shared_expert_intermediate_size=32),
    # Qwen3-Next's structure (zero-centred norms, gated attention, MoE + shared expert): exports to
    # a transformers qwen3_next folder with `hybridlm convert --to-hf` / model.save_pretrained.
    "tiny-qwen3-next": _tiny(layer_pattern="GGGA", num_layers=4, norm_zero_centered=True, num_experts=4,
                             num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32),
    # The seed architectures' structures at tiny size (each exports to its transformers model type).
    # Kimi Linear: KDA + NoPE MLA, first layer dense, sigmoid grouped routing + bias, plain shared expert.
    "tiny-kimi-linear": _tiny(layer_pattern="KKKM", num_layers=4, linear_num_key_heads=4, linear_num_value_heads=4,
                              attn_output_gate=False, qk_norm=False, num_key_value_heads=4, mla_use_nope=True,
                              partial_rotary_factor=1.0,
                              num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                              shared_expert_intermediate_size=32, shared_expert_gate=False, first_dense_layers=1,
                              router="sigmoid", router_score_bias=True, n_group=2, topk_group=1,
                              routed_scaling_factor=2.0),
    # MiniMax-M1: lightning attention (no conv, heads = attention heads) 3:1 with GQA, softmax-routed MoE,
    # residuals from the normalised input; full rotary, as transformers' MiniMax computes it.
    "tiny-minimax-m1": _tiny(layer_pattern="LLLA", num_layers=4, linear_num_key_heads=4, linear_num_value_heads=4,
                             linear_conv_kernel_dim=0, attn_output_gate=False, qk_norm=False, residual_from_norm=True,
                             partial_rotary_factor=1.0, num_experts=4, num_experts_per_tok=2,
                             moe_intermediate_size=32),
    # DeepSeek V3.2: sparse MLA (q LoRA, interleaved rope) with the lightning indexer keeping 8 tokens.
    "tiny-deepseek-v3.2": _tiny(layer_pattern="S", num_layers=4, attn_output_gate=False, qk_norm=False,
                                partial_rotary_factor=1.0,
                                num_key_value_heads=4, mla_q_lora_rank=24, mla_rope_interleave=True,
                                index_num_heads=4, index_head_dim=16, index_topk=8, num_experts=4,
                                num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                shared_expert_gate=False, first_dense_layers=1, router="sigmoid",
                                router_score_bias=True, n_group=2, topk_group=1, routed_scaling_factor=2.5),
    # MiniMax-M3: a dense GQA layer, then block-sparse GQA (blocks of 4, 3 kept, the newest always).
    "tiny-minimax-m3": _tiny(layer_pattern="ASSS", num_layers=4, attn_output_gate=False, partial_rotary_factor=0.5,
                             sparse_base="gqa", index_num_heads=2, index_head_dim=16, index_topk=3,
                             sparse_block_size=4, sparse_local_blocks=1, num_experts=4, num_experts_per_tok=2,
                             moe_intermediate_size=32, router="sigmoid"),
}

TINY_PRESETS = tuple(n for n in PRESETS if n.startswith("tiny-"))


# -- published (real dimensions; ../shared/reference/published-models.md, checked against
#    transformers' configuration classes). MTP layers left out. Irregular layouts give the full
#    pattern. MoE fields matter only to FLOPs and weight traffic, never to the cache. --
def _published(source: str, **kw) -> Callable[[], HybridConfig]:
    return lambda: HybridConfig(meta={"source": source}, **kw)


_QWEN3_NEXT_ATTN = dict(num_attention_heads=16, num_key_value_heads=2, head_dim=256, partial_rotary_factor=0.25,
                        rope_theta=10_000_000.0, attn_output_gate=True, qk_norm=True, norm_zero_centered=True,
                        linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
                        max_position_embeddings=262_144, router="softmax")
_NO_LINEAR_GATE = dict(attn_output_gate=False, partial_rotary_factor=1.0)

PRESETS.update({
    "qwen3-next-80b-a3b": _published(
        "https://huggingface.co/Qwen/Qwen3-Next-80B-A3B-Instruct (config.json; transformers Qwen3NextConfig)",
        vocab_size=151_936, hidden_size=2048, num_layers=48, layer_pattern="GGGA", **_QWEN3_NEXT_ATTN,
        linear_num_key_heads=16, linear_num_value_heads=32, intermediate_size=5120, num_experts=512,
        num_experts_per_tok=10, moe_intermediate_size=512, shared_expert_intermediate_size=512),
    "qwen3.5-397b-a17b": _published(
        "https://huggingface.co/Qwen/Qwen3.5-397B-A17B (text_config; transformers Qwen3_5MoeTextConfig)",
        vocab_size=248_320, hidden_size=4096, num_layers=60, layer_pattern="GGGA",
        **{**_QWEN3_NEXT_ATTN, "num_attention_heads": 32},
        linear_num_key_heads=16, linear_num_value_heads=64, intermediate_size=1024, num_experts=512,
        num_experts_per_tok=10, moe_intermediate_size=1024, shared_expert_intermediate_size=1024),
    # MLA at 1-based layers 4, 8, ..., 24, 27; KDA elsewhere. NoPE in MLA (rotary key still cached).
    "kimi-linear-48b-a3b": _published(
        "https://huggingface.co/moonshotai/Kimi-Linear-48B-A3B-Instruct (config.json; transformers KimiLinearConfig)",
        vocab_size=163_840, hidden_size=2304, num_layers=27, layer_pattern="KKKM" * 6 + "KKM",
        rms_norm_eps=1e-5, max_position_embeddings=1_048_576, num_attention_heads=32, num_key_value_heads=32,
        head_dim=128, partial_rotary_factor=1.0, attn_output_gate=False, qk_norm=False, mla_q_lora_rank=0,
        mla_kv_lora_rank=512,
        mla_qk_nope_head_dim=128, mla_qk_rope_head_dim=64, mla_v_head_dim=128,
        linear_num_key_heads=32, linear_num_value_heads=32, linear_key_head_dim=128,
        linear_value_head_dim=128, linear_conv_kernel_dim=4, intermediate_size=9216, num_experts=256,
        num_experts_per_tok=8, moe_intermediate_size=1024, shared_expert_intermediate_size=1024,
        first_dense_layers=1, router="sigmoid", router_score_bias=True, shared_expert_gate=False, mla_use_nope=True,
        routed_scaling_factor=2.446),
    "minimax-m1": _published(
        "https://huggingface.co/MiniMaxAI/MiniMax-M1-40k (config.json; transformers MiniMaxConfig)",
        vocab_size=200_064, hidden_size=6144, num_layers=80, layer_pattern="LLLLLLLA", rms_norm_eps=1e-5,
        max_position_embeddings=10_240_000, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
        partial_rotary_factor=0.5, rope_theta=10_000_000.0, attn_output_gate=False, qk_norm=False,
        linear_num_key_heads=64, linear_num_value_heads=64, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_conv_kernel_dim=0, intermediate_size=9216, num_experts=32, num_experts_per_tok=2,
        # DeepNorm-style residuals: alpha = (2 * 80 layers) ** 0.25 on every branch (layernorm_*_alpha)
        moe_intermediate_size=9216, residual_from_norm=True, residual_alpha=(2 * 80) ** 0.25),
    "minimax-m2": _published(
        "https://huggingface.co/MiniMaxAI/MiniMax-M2 (config.json; transformers MiniMaxM2Config)",
        vocab_size=200_064, hidden_size=3072, num_layers=62, layer_pattern="A", max_position_embeddings=196_608,
        num_attention_heads=48, num_key_value_heads=8, head_dim=128, partial_rotary_factor=0.5,
        rope_theta=5_000_000.0, attn_output_gate=False, qk_norm=True, intermediate_size=1536,
        num_experts=256, num_experts_per_tok=8, moe_intermediate_size=1536, router="sigmoid",
        router_score_bias=True, qk_norm_scope="all"),
    # 3 dense GQA layers, then block-sparse. The MoE split is not published: 256 x 1536 top-8 is a fit
    # to the 428B / 23B totals (it gives about 444B / 23B); the cache does not depend on it.
    "minimax-m3": _published(
        "published-models.md (copies; vLLM model code); MoE dimensions estimated",
        vocab_size=200_064, hidden_size=6144, num_layers=60, layer_pattern="AAA" + "S" * 57,
        num_attention_heads=64, num_key_value_heads=4, head_dim=128, partial_rotary_factor=0.5,
        attn_output_gate=False, qk_norm=True, sparse_base="gqa", index_num_heads=4, index_head_dim=128,
        index_topk=16, sparse_block_size=128, sparse_local_blocks=1, intermediate_size=1536,
        num_experts=256, num_experts_per_tok=8, moe_intermediate_size=1536, router="sigmoid"),
    # Every layer MLA + DSA; the indexer caches one fp8 128-dim key plus an fp32 scale per token.
    "deepseek-v3.2": _published(
        "https://huggingface.co/deepseek-ai/DeepSeek-V3.2-Exp (inference config and model code; transformers DeepseekV32Config)",
        vocab_size=129_280, hidden_size=7168, num_layers=61, layer_pattern="S", max_position_embeddings=163_840,
        num_attention_heads=128, num_key_value_heads=128, head_dim=128, partial_rotary_factor=1.0,
        attn_output_gate=False, qk_norm=False,
        mla_q_lora_rank=1536, mla_kv_lora_rank=512, mla_qk_nope_head_dim=128, mla_qk_rope_head_dim=64,
        mla_v_head_dim=128, sparse_base="mla", index_num_heads=64, index_head_dim=128, index_topk=2048,
        index_key_bytes=128 + 4, intermediate_size=18_432, num_experts=256, num_experts_per_tok=8,
        moe_intermediate_size=2048, shared_expert_intermediate_size=2048, first_dense_layers=3,
        router="sigmoid", router_score_bias=True, shared_expert_gate=False, n_group=8, topk_group=4,
        routed_scaling_factor=2.5, mla_rope_interleave=True),
    "qwen3-32b": _published(
        "https://huggingface.co/Qwen/Qwen3-32B (config.json; transformers Qwen3Config)",
        vocab_size=151_936, hidden_size=5120, num_layers=64, layer_pattern="A", max_position_embeddings=40_960,
        num_attention_heads=64, num_key_value_heads=8, head_dim=128, rope_theta=1_000_000.0, qk_norm=True,
        intermediate_size=25_600, **_NO_LINEAR_GATE),
    "llama-3.1-8b": _published(
        "https://huggingface.co/meta-llama/Llama-3.1-8B (config.json; transformers LlamaConfig)",
        vocab_size=128_256, hidden_size=4096, num_layers=32, layer_pattern="A", rms_norm_eps=1e-5,
        max_position_embeddings=131_072, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        rope_theta=500_000.0, qk_norm=False, intermediate_size=14_336, **_NO_LINEAR_GATE),
    "llama-3.1-70b": _published(
        "https://huggingface.co/meta-llama/Llama-3.1-70B (config.json; transformers LlamaConfig)",
        vocab_size=128_256, hidden_size=8192, num_layers=80, layer_pattern="A", rms_norm_eps=1e-5,
        max_position_embeddings=131_072, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
        rope_theta=500_000.0, qk_norm=False, intermediate_size=28_672, **_NO_LINEAR_GATE),
})

PUBLISHED_PRESETS = tuple(n for n in PRESETS if not n.startswith("tiny-"))
