"""nn.Modules that own parameters and call ``hybridlm.ops``: mixers, MLPs, norms, conv, rotary."""

from hybridlm.layers.attention import GatedAttention
from hybridlm.layers.conv import ShortConv
from hybridlm.layers.gated_deltanet import GatedDeltaNet
from hybridlm.layers.kda import KimiDeltaAttention
from hybridlm.layers.lightning import LightningAttention
from hybridlm.layers.linear_attention import LinearAttention
from hybridlm.layers.mla import LatentAttention
from hybridlm.layers.mlp import SwiGLU
from hybridlm.layers.moe import MoE
from hybridlm.layers.norms import GatedRMSNorm, RMSNorm
from hybridlm.layers.rotary import RotaryEmbedding
from hybridlm.layers.sparse import BlockSparseAttention, LightningIndexer, SparseLatentAttention
from hybridlm.layers.step import Tokens

__all__ = ["BlockSparseAttention", "GatedAttention", "GatedDeltaNet", "GatedRMSNorm", "KimiDeltaAttention",
           "LatentAttention", "LightningAttention", "LightningIndexer", "LinearAttention", "MoE", "RMSNorm",
           "RotaryEmbedding", "ShortConv", "SparseLatentAttention", "SwiGLU", "Tokens"]
