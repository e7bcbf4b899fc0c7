"""nn.Modules that own parameters and call ``hybridlm.ops``: mixers, MLPs, norms, conv, rotary."""

from hybridlm.layers.attention import GatedAttention
from hybridlm.layers.conv import ShortConv
from hybridlm.layers.gated_deltanet import GatedDeltaNet
from hybridlm.layers.linear_attention import LinearAttention
from hybridlm.layers.mlp import SwiGLU
from hybridlm.layers.moe import MoE
from hybridlm.layers.norms import GatedRMSNorm, RMSNorm
from hybridlm.layers.rotary import RotaryEmbedding
from hybridlm.layers.step import Tokens

__all__ = ["GatedAttention", "GatedDeltaNet", "GatedRMSNorm", "LinearAttention", "MoE", "RMSNorm",
           "RotaryEmbedding", "ShortConv", "SwiGLU", "Tokens"]
