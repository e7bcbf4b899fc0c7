"""Triton kernels for the gated delta rule (GPU, or the CPU interpreter with TRITON_INTERPRET=1).

Same signatures as the reference ops in ``hybridlm.ops``; the dispatcher there picks these for
``backend="triton"`` (and ``"auto"`` on CUDA tensors).
"""

from hybridlm.ops.triton.chunk import chunk_gated_delta_rule
from hybridlm.ops.triton.conv import causal_conv_rows
from hybridlm.ops.triton.decode_attention import split_kv_decode_attention
from hybridlm.ops.triton.gemv import add_rms_norm_linear, decode_linear
from hybridlm.ops.triton.moe_decode import moe_decode_fused, moe_experts_decode
from hybridlm.ops.triton.moe_route import moe_route
from hybridlm.ops.triton.norm import add_rms_norm_rows, rms_norm_rows
from hybridlm.ops.triton.qk_rope import qk_norm_rope_decode

__all__ = ["add_rms_norm_linear", "add_rms_norm_rows", "causal_conv_rows", "chunk_gated_delta_rule", "decode_linear", "moe_decode_fused", "moe_experts_decode", "moe_route",
           "qk_norm_rope_decode", "rms_norm_rows", "split_kv_decode_attention"]

try:  # the decode kernel lives in its own module, written separately
    from hybridlm.ops.triton.decode import conv_gated_delta_rule_step, fused_recurrent_gated_delta_rule_step
    __all__ += ["conv_gated_delta_rule_step", "fused_recurrent_gated_delta_rule_step"]
except ImportError:
    pass
