"""Sparse attention (letter S): an indexer scores the cached history, each query attends to its top-k.

On an MLA base (``sparse_base="mla"``) this is DeepSeek V3.2's DSA: MLA as in ``layers.mla`` plus a
lightning indexer with its own projections, index queries from the low-rank query (wq_b, or from x
when there is no q LoRA), one index key per token (wk -> LayerNorm), rotary on the first Dr channels of
both (the two-halves layout), and per-token head weights; I[t, s] = sum_h w_h ReLU(q_h . k_s), each query
keeps its ``index_topk`` best visible tokens, all heads share the choice. The index keys are cached, in the
cache dtype or, with ``index_key_bytes = index_head_dim + 4``, as DeepSeek does: fp8 with a per-token scale.

On a GQA base (``sparse_base="gqa"``, MiniMax-M3's block-sparse attention) the keys are GQA keys and
values as in ``layers.attention``; a block indexer (index query heads, one index key per token)
picks, per index head, the ``sparse_local_blocks`` most recent blocks of ``sparse_block_size`` positions
plus the best-scoring others, ``index_topk`` blocks in all.
"""

from __future__ import annotations

import torch
from torch import nn

from hybridlm.cache import KVSlot, LatentSlot
from hybridlm.config import HybridConfig
from hybridlm.layers.attention import GatedAttention
from hybridlm.layers.mla import LatentAttention
from hybridlm.layers.packing import project
from hybridlm.layers.rotary import RotaryEmbedding
from hybridlm.layers.step import Tokens
from hybridlm.ops import block_indexer_topk, indexer_topk, sparse_attention
from hybridlm.ops.mla import expand_latents, split_kv_b


class LightningIndexer(nn.Module):
    """DeepSeek V3.2's indexer: index queries and keys, head weights; ``topk`` picks key slots.

    Args:
        config: uses index_num_heads (HI), index_head_dim (Di), index_topk, mla_qk_rope_head_dim
            (rotated channels), rope_theta, hidden_size.
        q_dim: width of the input the index queries come from (the q LoRA rank, or hidden_size).
    """

    def __init__(self, config: HybridConfig, q_dim: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.topk = config.index_num_heads, config.index_head_dim, config.index_topk
        if config.mla_qk_rope_head_dim > self.head_dim:
            raise ValueError(f"index_head_dim: expected >= mla_qk_rope_head_dim ({config.mla_qk_rope_head_dim}), "
                             f"got {self.head_dim}")
        self.wq_b = nn.Linear(q_dim, self.num_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(config.hidden_size, self.num_heads, bias=False)
        self.rotary = RotaryEmbedding(config.mla_qk_rope_head_dim, config.rope_theta)

    def keys(self, x_BTD: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        """Index keys [B, T, Di] of the new tokens (rotated; zero at pads)."""
        k = self.rotary(self.k_norm(self.wk(x_BTD))[:, :, None], tokens.pos_BT.clamp(min=0))[:, :, 0]
        return tokens.zero_pads(k)

    def select(self, x_BTD, q_in_BTQ, k_idx_BSD, tokens: Tokens, k_pos_BS) -> torch.Tensor:
        """[B, T, 1, topk] int64 key slots (-1 = fewer visible) for the T queries over S cached index keys."""
        B, T, _ = x_BTD.shape
        q = self.rotary(self.wq_b(q_in_BTQ).view(B, T, self.num_heads, self.head_dim), tokens.pos_BT.clamp(min=0))
        # ReLU(s a) = s ReLU(a) for s > 0: DeepSeek's HI^-1/2 and Di^-1/2 scales fold into the weights.
        w = self.weights_proj(x_BTD) * (self.num_heads * self.head_dim) ** -0.5
        return indexer_topk(q, k_idx_BSD, w, self.topk, q_pos=tokens.pos_BT, k_pos=k_pos_BS)


class SparseLatentAttention(LatentAttention):
    """DeepSeek V3.2 sparse MLA (DSA): MLA restricted to the lightning indexer's top-k tokens.

    Args:
        config: as LatentAttention, plus index_num_heads, index_head_dim, index_topk.

    Example::

        layer = SparseLatentAttention(HybridConfig(layer_pattern="S", index_topk=4))
        y = layer(torch.randn(2, 7, 64), Tokens(torch.arange(7).expand(2, 7), None))  # [2, 7, 64]
    """

    def __init__(self, config: HybridConfig) -> None:
        super().__init__(config)
        self.indexer = LightningIndexer(config, self.q_lora_rank or config.hidden_size)
        self.fp8_index = bool(config.index_key_bytes)

    def forward(self, x_BTD: torch.Tensor, tokens: Tokens, slot: LatentSlot | None = None) -> torch.Tensor:
        """x_BTD: [B, T, hidden] float; tokens: positions/padding; slot: this layer's cache or None.

        Returns [B, T, hidden] in x's dtype. With a slot, latents, rotary keys and index keys are stored.
        """
        B, T, _ = x_BTD.shape
        q_nope, q_rope, q_resid = self.queries(x_BTD, tokens)
        latent, k_rope, k_pos = self.cached_keys(x_BTD, tokens, slot)
        k_idx = _cached(self.indexer.keys(x_BTD, tokens), slot, tokens.start, self.fp8_index)
        slots = self.indexer.select(x_BTD, x_BTD if q_resid is None else q_resid, k_idx, tokens, k_pos)
        w_k, w_v = split_kv_b(self.kv_b_proj.weight.to(latent.dtype), self.num_heads, self.nope_dim)
        k, v = expand_latents(latent, k_rope, w_k, w_v)
        o_BTHV = sparse_attention(torch.cat([q_nope, q_rope], -1), k, v, slots, scale=self.scale,
                                  q_pos=tokens.pos_BT, k_pos=k_pos)
        return project(self.o_proj, o_BTHV.reshape(B, T, -1))


class BlockSparseAttention(GatedAttention):
    """MiniMax-M3-style block-sparse GQA: attention restricted to the blocks a block indexer picks.

    Args:
        config: as GatedAttention, plus index_num_heads (HI, dividing num_attention_heads),
            index_head_dim (Di), index_topk (blocks), sparse_block_size, sparse_local_blocks.

    Example::

        cfg = HybridConfig(layer_pattern="S", sparse_base="gqa", sparse_block_size=4, index_topk=2,
                           sparse_local_blocks=1)
        y = BlockSparseAttention(cfg)(torch.randn(2, 9, 64), Tokens(torch.arange(9).expand(2, 9), None))
    """

    def __init__(self, config: HybridConfig) -> None:
        super().__init__(config)
        HI, Di, d = config.index_num_heads, config.index_head_dim, config.hidden_size
        if config.num_attention_heads % HI:
            raise ValueError(f"index_num_heads: expected a divisor of num_attention_heads "
                             f"({config.num_attention_heads}), got {HI}")
        self.index_heads, self.index_dim = HI, Di
        self.topk, self.block_size = config.index_topk, config.sparse_block_size
        self.local_blocks = min(config.sparse_local_blocks, config.index_topk)
        self.index_q_proj = nn.Linear(d, HI * Di, bias=False)
        self.index_k_proj = nn.Linear(d, Di, bias=False)
        self.fp8_index = bool(config.index_key_bytes)

    def forward(self, x_BTD: torch.Tensor, tokens: Tokens, slot: KVSlot | None = None,
                projected: torch.Tensor | None = None) -> torch.Tensor:
        """x_BTD: [B, T, hidden] float; tokens: positions/padding; slot: this layer's cache or None;
        projected: as in ``GatedAttention.forward`` (the q, k, v product; the indexer's are made here).

        Returns [B, T, hidden] in x's dtype. With a slot, keys, values and index keys are stored.
        """
        B, T, _ = x_BTD.shape
        q_BTHD, k_BTHD, v_BTHD, gate_BTHD = self.project(x_BTD, tokens, projected)
        k_all, v_all, k_pos = self._keys(k_BTHD, v_BTHD, tokens, slot)
        k_idx = _cached(tokens.zero_pads(self.index_k_proj(x_BTD)), slot, tokens.start, self.fp8_index)
        # Blocks are runs of block_size *positions*: a left-padded row's keys sit at other cache slots than
        # they would alone, so the keys are put in position order (pads last) before blocking.
        order = torch.where(k_pos < 0, k_pos.new_full((), torch.iinfo(k_pos.dtype).max), k_pos).sort(
            dim=1, stable=True).indices
        k_all, v_all = (t.gather(1, order[:, :, None, None].expand_as(t)) for t in (k_all, v_all))
        k_idx, k_pos = k_idx.gather(1, order[:, :, None].expand_as(k_idx)), k_pos.gather(1, order)
        q_idx = self.index_q_proj(x_BTD).view(B, T, self.index_heads, self.index_dim)
        blocks = block_indexer_topk(q_idx, k_idx, self.topk, block_size=self.block_size,
                                    local_blocks=self.local_blocks, q_pos=tokens.pos_BT, k_pos=k_pos)
        o_BTHD = sparse_attention(q_BTHD, k_all, v_all, blocks, block_size=self.block_size, q_pos=tokens.pos_BT,
                                  k_pos=k_pos)
        return self.finish(o_BTHD, gate_BTHD)


FP8_MAX = 448.0  # largest float8_e4m3fn


def quantize_fp8(k_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(k / scale in float8_e4m3fn, scale [B, T, 1] float32), one scale per token: DeepSeek V3.2's index-key cache."""
    scale = k_BTD.abs().amax(-1, keepdim=True).float().clamp_min(1e-12) / FP8_MAX
    return (k_BTD.float() / scale).to(torch.float8_e4m3fn), scale


def _cached(new_BTD: torch.Tensor, slot, start: int, fp8: bool) -> torch.Tensor:
    """Index keys this call scores: the slot's (after storing the new ones), or just the new ones.

    fp8: keys are rounded to fp8 with a per-token scale whether cached or not, so that a cached decode
    scores exactly what a full forward scores.
    """
    dtype, T = new_BTD.dtype, new_BTD.shape[1]
    if fp8:
        k8, scale = quantize_fp8(new_BTD)
        if slot is None:
            return (k8.float() * scale).to(dtype)
        slot.index_k[:, start:start + T], slot.index_scale[:, start:start + T] = k8, scale
        return (slot.index_k[:, :start + T].float() * slot.index_scale[:, :start + T]).to(dtype)
    if slot is None:
        return new_BTD
    slot.index_k[:, start:start + T] = new_BTD
    return slot.index_k[:, :start + T].to(dtype)
