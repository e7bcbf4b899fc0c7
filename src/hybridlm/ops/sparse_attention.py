"""Indexer sparse attention: score the history cheaply, keep the top-k keys per query, attend to those.

Two published indexers, one selection rule, one restricted attention:

- DeepSeek V3.2's lightning indexer (DSA), token level:
      I[t, s] = sum_h w[t, h] * ReLU(q_idx[t, h] . k_idx[s])      over visible s (causal, not padding)
  every query keeps its ``topk`` best tokens; all attention heads share that choice.
- MiniMax-M3's block indexer (MiniMax Sparse Attention, MSA v1), block level: per index head h,
      score[h, t, b] = max over the visible tokens s of block b of q_idx[t, h] . k_idx[s]
  (the maximum, as in MiniMax's published MSA reference, github.com/MiniMax-AI/MSA,
  tests/training/msa_v1/cute/testing.py ``indexer_reference``: ``amax`` over the block); the
  ``local_blocks`` most recent visible blocks are always kept and count toward ``topk`` (MSA: top-16 =
  15 scored blocks + the query's own block), and index head h chooses for its group of H / HI
  attention heads. Blocks are ``block_size`` consecutive key slots (the pages of the cache).

Selection is deterministic so that prefill and one-token decode agree: a higher score first, and on a
tie the LOWER key slot (position) first. ReLU scores tie at exactly 0 often (few index heads, early
training), and any other tie-break (torch.topk's is unspecified) makes decode pick other tokens than
prefill did. Fewer candidates than ``topk`` leave -1 in the unused slots.

The restricted attention is softmax over the selected keys only (still causal; padding never
attended), in two forms that must agree: a dense masked form (the readable reference) and a gather
form that collects the selected keys per query and runs :func:`softmax_attention` on them.

Legend: B batch, T queries, S key slots, HI index heads, D index dim, H attention heads, HKV key/value
heads, G selection groups (1 for DSA, HI for MSA), L selected entries per query (topk).
"""

from __future__ import annotations

import torch

from hybridlm.ops import _checks as ck
from hybridlm.ops.softmax_attention import softmax_attention, visibility_mask

SPARSE_BACKENDS = ("auto", "reference", "triton")


# --------------------------------------------------------------------------- checks
def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _positions(B: int, T: int, S: int, q_pos, k_pos, device):
    """Default positions (queries are the last T of S slots), checked like softmax_attention's."""
    for name, pos, n in (("q_pos", q_pos, T), ("k_pos", k_pos, S)):
        if pos is None:
            continue
        if not isinstance(pos, torch.Tensor) or pos.is_floating_point() or pos.is_complex() or pos.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor [B, {'T' if name == 'q_pos' else 'S'}], got "
                            f"{getattr(pos, 'dtype', type(pos).__name__)}")
        if tuple(pos.shape) != (B, n):
            raise ValueError(f"{name} must have shape {(B, n)}, got {tuple(pos.shape)}")
    if q_pos is None:
        q_pos = (S - T + torch.arange(T, device=device)).expand(B, T)
    if k_pos is None:
        k_pos = torch.arange(S, device=device).expand(B, S)
    return q_pos.to(device), k_pos.to(device)


def _check_index_qk(q_idx, k_idx):
    ck.check_float_tensor("q_idx", q_idx, 4, "[B, T, HI, D]")
    ck.check_float_tensor("k_idx", k_idx, 3, "[B, S, D]")
    ck.check_same("k_idx", k_idx, "q_idx", q_idx)
    if k_idx.shape[0] != q_idx.shape[0] or k_idx.shape[2] != q_idx.shape[3]:
        raise ValueError(f"k_idx must be [B, S, D] with B = {q_idx.shape[0]}, D = {q_idx.shape[3]} as in q_idx, "
                         f"got {tuple(k_idx.shape)}")
    if q_idx.shape[1] < 1 or k_idx.shape[1] < 1:
        raise ValueError(f"q_idx and k_idx must hold at least one token, got {tuple(q_idx.shape)}, "
                         f"{tuple(k_idx.shape)}")


# --------------------------------------------------------------------------- scores
def lightning_indexer_scores(q_idx, k_idx, weights, *, q_pos=None, k_pos=None):
    """DeepSeek V3.2's index scores I[t, s] = sum_h w[t, h] ReLU(q_idx[t, h] . k_idx[s]); -inf where s is not visible.

    Args:
        q_idx: [B, T, HI, D] float index queries; k_idx: [B, S, D] the cached index keys (one per token).
        weights: [B, T, HI] per-token head weights (DeepSeek folds HI ** -0.5 and D ** -0.5 into them).
        q_pos, k_pos: optional integer [B, T] / [B, S] positions as in softmax_attention (default: the
            queries are the last T of S; negative k_pos = empty or padded slot).
    Returns:
        [B, T, S] scores in float32 (float64 for float64 inputs).
    """
    _check_index_qk(q_idx, k_idx)
    B, T, HI, _ = q_idx.shape
    ck.check_gate("weights", weights, (B, T, HI), "[B, T, HI]", q_idx)
    q_pos, k_pos = _positions(B, T, k_idx.shape[1], q_pos, k_pos, q_idx.device)
    ct = ck.compute_dtype(q_idx.dtype)
    dots = torch.einsum("bthd,bsd->bths", q_idx.to(ct), k_idx.to(ct))
    scores = torch.einsum("bth,bths->bts", weights.to(ct), dots.relu())
    return scores.masked_fill(~visibility_mask(q_pos, k_pos, True, None), float("-inf"))


def block_indexer_scores(q_idx, k_idx, block_size: int, *, q_pos=None, k_pos=None):
    """MiniMax-M3's block scores: per index head, the max of q_idx . k_idx over a block's visible tokens.

    Args:
        q_idx: [B, T, HI, D]; k_idx: [B, S, D]; block_size: tokens (key slots) per block.
        q_pos, k_pos: as in :func:`lightning_indexer_scores`.
    Returns:
        [B, T, HI, NB] scores, NB = ceil(S / block_size), float32 (float64 for float64 inputs);
        -inf for a block with no visible token. (A positive scale on q_idx . k would not change the choice.)
    """
    _check_index_qk(q_idx, k_idx)
    _check_int("block_size", block_size, 1)
    B, T, _, _ = q_idx.shape
    S = k_idx.shape[1]
    q_pos, k_pos = _positions(B, T, S, q_pos, k_pos, q_idx.device)
    ct = ck.compute_dtype(q_idx.dtype)
    dots = torch.einsum("bthd,bsd->bths", q_idx.to(ct), k_idx.to(ct))
    dots = dots.masked_fill(~visibility_mask(q_pos, k_pos, True, None)[:, :, None], float("-inf"))
    pad = -S % block_size
    dots = torch.nn.functional.pad(dots, (0, pad), value=float("-inf"))
    return dots.unflatten(-1, (-1, block_size)).amax(-1)


# --------------------------------------------------------------------------- selection
def select_topk(scores, topk: int, forced=None):
    """Deterministic top-k over the last dim: forced entries first, then higher score, ties to the lower index.

    Args:
        scores: [..., N] float; -inf marks an entry that may not be chosen.
        topk: how many to keep (a positive int; may exceed N).
        forced: optional bool [..., N]; these entries are kept whatever their score (they count toward topk).
    Returns:
        [..., topk] int64 indices, -1 in the slots left over when fewer than topk can be chosen.
    """
    _check_int("topk", topk, 1)
    priority = scores if forced is None else scores.masked_fill(forced, float("inf"))
    # a stable sort keeps equal scores in index order, which is the tie-break itself
    order = torch.sort(priority, dim=-1, descending=True, stable=True).indices[..., :topk]
    order = order.masked_fill(priority.gather(-1, order) == float("-inf"), -1)
    short = topk - order.shape[-1]
    return torch.nn.functional.pad(order, (0, short), value=-1) if short > 0 else order


def indexer_topk(q_idx, k_idx, weights, topk: int, *, q_pos=None, k_pos=None):
    """DeepSeek V3.2 (DSA): each query's ``topk`` best visible key slots by lightning-indexer score.

    Arguments as in :func:`lightning_indexer_scores`. Returns [B, T, 1, topk] int64 key slots (one group:
    every attention head uses them), -1 where fewer than topk are visible; pass to
    :func:`sparse_attention` with block_size=1.
    """
    scores = lightning_indexer_scores(q_idx, k_idx, weights, q_pos=q_pos, k_pos=k_pos)
    return select_topk(scores, topk)[:, :, None]


def block_indexer_topk(q_idx, k_idx, topk: int, *, block_size: int, local_blocks: int = 1, q_pos=None, k_pos=None):
    """MiniMax-M3 (MSA): per index head, ``topk`` blocks: the ``local_blocks`` most recent visible blocks plus
    the best-scoring others (block score = max token score, see :func:`block_indexer_scores`).

    Returns [B, T, HI, topk] int64 block ids (index head h chooses for attention heads
    h * H / HI .. (h + 1) * H / HI - 1), -1 where fewer blocks are visible; pass to
    :func:`sparse_attention` with the same block_size.
    """
    _check_int("topk", topk, 1)
    _check_int("local_blocks", local_blocks, 0)
    if local_blocks > topk:
        raise ValueError(f"local_blocks must be <= topk (the local blocks count toward it), got {local_blocks} > {topk}")
    scores = block_indexer_scores(q_idx, k_idx, block_size, q_pos=q_pos, k_pos=k_pos)
    visible = scores > float("-inf")
    # blocks counted from the most recent visible one backwards: the first local_blocks are kept
    recent_rank = visible.flip(-1).cumsum(-1).flip(-1)
    forced = visible & (recent_rank <= local_blocks)
    return select_topk(scores, topk, forced)


# --------------------------------------------------------------------------- restricted attention
def _check_attention(q, k, v, indices, block_size, scale, backend):
    ck.check_backend(backend, SPARSE_BACKENDS)
    B, T, H, D = ck.check_attention_qkv(q, k, v)
    ck.check_scale(scale)
    _check_int("block_size", block_size, 1)
    if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be an int32/int64 tensor [B, T, G, topk], got "
                        f"{getattr(indices, 'dtype', type(indices).__name__)}")
    if indices.dim() != 4 or tuple(indices.shape[:2]) != (B, T):
        raise ValueError(f"indices must be [B, T, G, topk] with B = {B}, T = {T}, got {tuple(indices.shape)}")
    G, HKV = indices.shape[2], k.shape[2]
    if H % G or H % HKV or (HKV % G and G % HKV):
        raise ValueError(f"indices must have a group count G dividing H = {H} and dividing or divided by "
                         f"HKV = {HKV}, got G = {G}")
    if backend == "triton":
        raise RuntimeError("backend='triton' is unavailable: no Triton kernel for sparse attention yet; "
                           "use backend='reference' or 'auto'")


def selection_mask(indices, S: int, block_size: int = 1):
    """[B, G, T, S] bool: key slot s is selected for (query t, group g); indices [B, T, G, L] (-1 = empty)."""
    n_blocks = -(-S // block_size)
    idx = indices.long().masked_fill(indices < 0, n_blocks)  # empty slots land in a spare column
    chosen = torch.zeros(*indices.shape[:3], n_blocks + 1, dtype=torch.bool, device=indices.device)
    chosen.scatter_(-1, idx, True)
    block_of_slot = torch.arange(S, device=indices.device) // block_size
    return chosen[..., block_of_slot].permute(0, 2, 1, 3)


def sparse_attention_reference(q, k, v, indices, *, block_size=1, scale=None, q_pos=None, k_pos=None):
    """Dense masked form of :func:`sparse_attention` (the readable reference); same arguments and result."""
    _check_attention(q, k, v, indices, block_size, scale, "reference")
    B, T, H, D = q.shape
    S, G = k.shape[1], indices.shape[2]
    q_pos, k_pos = _positions(B, T, S, q_pos, k_pos, q.device)
    mask = visibility_mask(q_pos, k_pos, True, None)[:, None] & selection_mask(indices, S, block_size)  # [B,G,T,S]
    mask = mask.repeat_interleave(H // G, dim=1)  # [B, H, T, S]
    ct = ck.compute_dtype(q.dtype)
    scale = D ** -0.5 if scale is None else scale
    q_, k_, v_ = (x.transpose(1, 2).to(ct) for x in (q, k, v))
    k_, v_ = k_.repeat_interleave(H // k.shape[2], 1), v_.repeat_interleave(H // k.shape[2], 1)
    scores = (q_ @ k_.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    p = torch.softmax(scores, -1).masked_fill(~mask.any(-1, keepdim=True), 0.0)  # no key: zeros, never NaN
    return (p @ v_).transpose(1, 2).to(q.dtype)


def _group_heads(x_BSHD: torch.Tensor, G: int) -> torch.Tensor:
    """[B, S, HKV, D] -> [B, S, G, HKV_g, D]: the key/value heads that selection group g's queries read."""
    HKV = x_BSHD.shape[2]
    if HKV >= G:
        return x_BSHD.unflatten(2, (G, HKV // G))
    return x_BSHD.repeat_interleave(G // HKV, dim=2)[:, :, :, None]


def sparse_attention(q, k, v, indices, *, block_size=1, scale=None, q_pos=None, k_pos=None, backend="auto"):
    """Softmax attention of each query over its selected keys only (gather form; backend='reference' = dense).

    Args:
        q: [B, T, H, D] float; k: [B, S, HKV, D], v: [B, S, HKV, Dv] (q's dtype; H a multiple of HKV).
        indices: [B, T, G, L] int32/int64 from :func:`indexer_topk` (G = 1, key slots, block_size 1) or
            :func:`block_indexer_topk` (G = HI, block ids); -1 = empty. Query head h reads group h // (H // G).
        block_size: 1 for token indices, else the tokens per block of the block ids.
        scale: float, default D ** -0.5.
        q_pos, k_pos: optional integer positions as in softmax_attention; selected keys are still
            masked by causality and padding.
        backend: "auto" (gather + SDPA) | "reference" (dense masked softmax); "triton" raises.
    Returns:
        o [B, T, H, Dv] in q's dtype; zeros for a query with no selected visible key.

    Example::

        >>> q, k, v = torch.randn(1, 6, 4, 8), torch.randn(1, 6, 2, 8), torch.randn(1, 6, 2, 8)
        >>> idx = indexer_topk(torch.randn(1, 6, 2, 4), torch.randn(1, 6, 4), torch.rand(1, 6, 2), topk=3)
        >>> sparse_attention(q, k, v, idx).shape
        torch.Size([1, 6, 4, 8])
    """
    _check_attention(q, k, v, indices, block_size, scale, backend)
    if backend == "reference":
        return sparse_attention_reference(q, k, v, indices, block_size=block_size, scale=scale, q_pos=q_pos,
                                          k_pos=k_pos)
    B, T, H, D = q.shape
    S, G = k.shape[1], indices.shape[2]
    q_pos, k_pos = _positions(B, T, S, q_pos, k_pos, q.device)
    # block ids -> the key slots they cover; an empty entry or a slot past S becomes slot -1
    offsets = torch.arange(block_size, device=q.device)
    slots = (indices.long()[..., None] * block_size + offsets).flatten(-2)  # [B, T, G, L * block_size]
    slots = slots.masked_fill((indices.long() < 0).repeat_interleave(block_size, -1) | (slots >= S), -1)
    safe = slots.clamp_min(0)
    b = torch.arange(B, device=q.device)[:, None, None, None]
    g = torch.arange(G, device=q.device)[None, None, :, None]
    k_sel, v_sel = _group_heads(k, G)[b, safe, g], _group_heads(v, G)[b, safe, g]  # [B, T, G, L', HKV_g, D]
    pos_sel = torch.where(slots >= 0, k_pos[b, safe], -1)  # [B, T, G, L']
    n, ct = B * T * G, ck.compute_dtype(q.dtype)
    o = softmax_attention(q.unflatten(2, (G, H // G)).reshape(n, 1, H // G, D).to(ct),
                          k_sel.flatten(0, 2).to(ct), v_sel.flatten(0, 2).to(ct), scale=scale, causal=True,
                          q_pos=q_pos[:, :, None].expand(B, T, G).reshape(n, 1), k_pos=pos_sel.flatten(0, 2))
    return o.reshape(B, T, H, v.shape[-1]).to(q.dtype)
