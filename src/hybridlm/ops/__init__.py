"""Pure functions on tensors: the math of the linear-attention family and of softmax attention.

Layout [B, T, H, D]; every stateful op returns (o, final_state). Public entry points dispatch on
``backend``; the ``*_naive`` (token loop) and ``*_chunked`` forms are exported for tests and readers.

Compiling your own model that calls the Triton paths with ``torch.compile``? Call
``register_inductor_fallbacks()`` first (``StaticDecoder(compile=True)`` does): on torch <= 2.11 it
spares inductor a string of each custom op's whole argument IR, which stalls deep models.
"""

from hybridlm.ops._inductor import register_inductor_fallbacks
from hybridlm.ops.decode_attention import softmax_attention_decode
from hybridlm.ops.delta_rule import (
    delta_rule,
    delta_rule_chunked,
    delta_rule_naive,
    delta_rule_step,
    gated_delta_rule,
    gated_delta_rule_chunked,
    gated_delta_rule_naive,
    gated_delta_rule_step,
)
from hybridlm.ops.kda import kda, kda_chunked, kda_naive, kda_step
from hybridlm.ops.lightning import (
    lightning_attention,
    lightning_attention_chunked,
    lightning_attention_naive,
    lightning_attention_step,
    lightning_slopes,
)
from hybridlm.ops.linear_attention import (
    linear_attention,
    linear_attention_chunked,
    linear_attention_naive,
    linear_attention_step,
)
from hybridlm.ops.mla import mla_attention
from hybridlm.ops.moe_decode import moe_experts
from hybridlm.ops.moe_route import moe_route
from hybridlm.ops.softmax_attention import softmax_attention, softmax_attention_reference
from hybridlm.ops.sparse_attention import (
    block_indexer_scores,
    block_indexer_topk,
    indexer_topk,
    lightning_indexer_scores,
    select_topk,
    sparse_attention,
    sparse_attention_reference,
)

__all__ = [
    "block_indexer_scores",
    "block_indexer_topk",
    "delta_rule",
    "delta_rule_chunked",
    "delta_rule_naive",
    "delta_rule_step",
    "gated_delta_rule",
    "gated_delta_rule_chunked",
    "gated_delta_rule_naive",
    "gated_delta_rule_step",
    "indexer_topk",
    "kda",
    "kda_chunked",
    "kda_naive",
    "kda_step",
    "lightning_attention",
    "lightning_attention_chunked",
    "lightning_attention_naive",
    "lightning_attention_step",
    "lightning_indexer_scores",
    "lightning_slopes",
    "linear_attention",
    "linear_attention_chunked",
    "linear_attention_naive",
    "linear_attention_step",
    "mla_attention",
    "moe_experts",
    "moe_route",
    "register_inductor_fallbacks",
    "select_topk",
    "softmax_attention",
    "softmax_attention_decode",
    "softmax_attention_reference",
    "sparse_attention",
    "sparse_attention_reference",
]
