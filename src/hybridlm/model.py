"""HybridLM: embedding, pre-norm residual blocks (a mixer chosen by layer letter + MLP or MoE),
final norm, LM head. The layout comes from ``HybridConfig.layer_types``.
"""

from __future__ import annotations

import torch
from torch import nn

from hybridlm.cache import HybridCache
from hybridlm.config import LAYER_LETTERS, HybridConfig
from hybridlm.layers import (BlockSparseAttention, GatedAttention, GatedDeltaNet, KimiDeltaAttention, LatentAttention,
                             LightningAttention, LinearAttention, MoE, RMSNorm, SparseLatentAttention, SwiGLU, Tokens)


def make_mixer(config: HybridConfig, letter: str, layer_idx: int = 0) -> nn.Module:
    """The token mixer of one layer letter (see hybridlm.config.LAYER_LETTERS); layer_idx: its index
    among all layers (lightning attention's decay depends on it)."""
    if letter == "G":
        return GatedDeltaNet(config, gated=True)
    if letter == "D":
        return GatedDeltaNet(config, gated=False)
    if letter == "K":
        return KimiDeltaAttention(config)
    if letter == "L":
        return LightningAttention(config, layer_idx)
    if letter == "X":
        return LinearAttention(config)
    if letter in "AW":
        return GatedAttention(config, sliding=letter == "W")
    if letter == "M":
        return LatentAttention(config)
    if letter == "S":
        return SparseLatentAttention(config) if config.sparse_base == "mla" else BlockSparseAttention(config)
    raise ValueError(f"letter: expected one of {', '.join(LAYER_LETTERS)}, got {letter!r}")


class Block(nn.Module):
    """x + mixer(norm(x)), then x + mlp(norm(x)); with config.residual_from_norm the residual is norm(x),
    and config.residual_alpha / residual_beta scale residual and branch (MiniMax)."""

    def __init__(self, config: HybridConfig, index: int) -> None:
        super().__init__()
        eps, zc = config.rms_norm_eps, config.norm_zero_centered
        self.letter = config.layer_types[index]
        self.residual_from_norm = config.residual_from_norm
        self.residual_alpha, self.residual_beta = config.residual_alpha, config.residual_beta
        self.mixer_norm = RMSNorm(config.hidden_size, eps, zc)
        self.mixer = make_mixer(config, self.letter, index)
        self.mlp_norm = RMSNorm(config.hidden_size, eps, zc)
        self.mlp = MoE(config) if config.layer_uses_moe(index) else SwiGLU(config.hidden_size,
                                                                            config.intermediate_size)

    def forward(self, x: torch.Tensor, tokens: Tokens, slot) -> torch.Tensor:
        """x: [B, T, hidden] float; tokens: positions/padding; slot: this layer's cache entry or None."""
        a, b = self.residual_alpha, self.residual_beta
        h = self.mixer_norm(x)
        x = a * (h if self.residual_from_norm else x) + b * self.mixer(h, tokens, slot)
        h = self.mlp_norm(x)
        y = self.mlp(h, static=True) if tokens.slot is not None and isinstance(self.mlp, MoE) else self.mlp(h)
        return a * (h if self.residual_from_norm else x) + b * y

    @property
    def plain_residuals(self) -> bool:
        """x + branch at both adds (no MiniMax scaling, no residual from the norm)."""
        return not self.residual_from_norm and self.residual_alpha == 1.0 and self.residual_beta == 1.0

    def decode_step(self, x: torch.Tensor, y: torch.Tensor | None, tokens: Tokens, slot) -> tuple:
        """The static decode step with the residual adds folded into the norms after them: given the
        residual stream x and the previous block's branch output y (None for the first block),
        returns (x + y + mixer branch, this block's MLP / MoE branch output). Equals ``forward`` on
        x + y when ``plain_residuals`` (the adds and norms are ``RMSNorm.add``, one kernel each on CUDA)."""
        x, h, kw = _norm_and_project(self.mixer_norm, x, y, self.mixer)
        x, h, mlp_kw = _norm_and_project(self.mlp_norm, x, self.mixer(h, tokens, slot, **kw), self.mlp)
        return x, self.mlp(h, static=True, **mlp_kw) if isinstance(self.mlp, MoE) else self.mlp(h)


def _norm_and_project(norm: RMSNorm, x: torch.Tensor, y: torch.Tensor | None, layer: nn.Module) -> tuple:
    """(x + y, its norm, keyword arguments for ``layer``): the norm before a layer of the static decode
    step. Where ``layer`` has a stacked input product (``input_stack``: Gated DeltaNet's, attention's and
    MoE's) and ``RMSNorm.project`` applies (batch 1 on a PDL GPU), that product runs in the norm's kernel
    and reaches the layer as ``projected``; else the add + norm (one kernel on CUDA) or the norm alone."""
    stack = getattr(layer, "input_stack", None)
    fused = norm.project(x, y, stack()) if stack is not None else None
    if fused is not None:
        s, h, projected = fused
        return s, h, {"projected": projected}
    if y is None:
        return x, norm(x), {}
    return *norm.add(x, y), {}


class HybridLM(nn.Module):
    """A hybrid language model built from a HybridConfig.

    Example::

        model = HybridLM(HybridConfig.preset("tiny-hybrid-3to1"))
        ids = torch.randint(0, 256, (2, 10))
        logits = model(ids)                               # [2, 10, 256], full forward
        cache = model.new_cache(2, 32)
        logits = model(ids, cache=cache)                  # prefill
        logits = model(ids[:, -1:], cache=cache)          # one decode step
    """

    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        if not isinstance(config, HybridConfig):
            raise TypeError(f"config: expected a HybridConfig, got {type(config).__name__}")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_zero_centered)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._init_weights()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def _init_weights(self) -> None:
        """Normal(0, initializer_range) for projections and embeddings; layers keep their own
        init for everything else (norm weights, conv filters, the decay parameters)."""
        if self.embed_tokens.weight.is_meta:
            return  # nothing to fill, and init on meta tensors is slow (~1 ms a call) for big presets
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None) -> "HybridLM":
        """Load a Hugging Face or hybridlm checkpoint folder; see hybridlm.checkpoints.from_pretrained."""
        from hybridlm.checkpoints import from_pretrained

        return from_pretrained(path, dtype=dtype, device=device)

    def save_pretrained(self, path, model_type: str | None = None, dtype=None, max_shard_bytes: int = 5 * 2**30):
        """Write config.json + safetensors; see hybridlm.checkpoints.save_pretrained."""
        from hybridlm.checkpoints import save_pretrained

        return save_pretrained(self, path, model_type=model_type, dtype=dtype, max_shard_bytes=max_shard_bytes)

    def pack_for_inference(self) -> "HybridLM":
        """Stack the weights that inference reads together: each layer's projections of one input
        (``hybridlm.layers.packing``) and each MoE layer's experts. The parameters keep their names,
        values and identity (they become views of the stacks); calls without gradients then run one
        product per stack. ``StaticDecoder`` calls this itself. Returns the model."""
        for module in self.modules():
            if module is not self and hasattr(module, "pack_for_inference"):
                module.pack_for_inference()
        return self

    def num_parameters(self) -> int:
        """Number of parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype: torch.dtype | None = None) -> HybridCache:
        """An empty HybridCache for ``batch_size`` rows of up to ``max_len`` tokens.

        device, dtype default to the model's (dtype is that of keys/values and conv windows; the
        recurrent state uses config.state_dtype).
        """
        p = self.embed_tokens.weight
        return HybridCache(self.config, batch_size, max_len, device=p.device if device is None else device,
                           dtype=p.dtype if dtype is None else dtype)

    def forward(self, input_ids: torch.Tensor, cache: HybridCache | None = None,
                attention_mask: torch.Tensor | None = None, logits_to_keep: int | None = None) -> torch.Tensor:
        """Logits of every position (or of the last ``logits_to_keep``).

        Args:
            input_ids: [B, T] integer token ids in [0, vocab_size).
            cache: optional HybridCache; the T tokens are appended to it (prefill when T > 1,
                a decode step when T == 1).
            attention_mask: optional [B, T] 0/1 (or bool) for the tokens of this call, 1 = real
                token. Padding goes on the left; padded tokens never touch a state or a key.
            logits_to_keep: optional int >= 1: only the last n positions go through the LM head
                (a prefill needs one; [B, T, vocab] logits of a long prompt can outweigh the model).
        Returns:
            logits [B, T, vocab_size] (T -> min(T, logits_to_keep) when given) in the model dtype.
        """
        self._check_ids(input_ids)
        if logits_to_keep is not None and (not isinstance(logits_to_keep, int) or isinstance(logits_to_keep, bool)
                                           or logits_to_keep < 1):
            raise ValueError(f"logits_to_keep: expected None or an int >= 1, got {logits_to_keep!r}")
        mask_BT = self._check_mask(attention_mask, input_ids.shape)
        tokens = self._tokens(input_ids, mask_BT, cache)
        x = self.embed_tokens(input_ids)
        for i, block in enumerate(self.layers):
            x = block(x, tokens, None if cache is None else cache.layers[i])
        if cache is not None:
            n_real = input_ids.new_full((input_ids.shape[0],), input_ids.shape[1]) if mask_BT is None \
                else mask_BT.sum(1)
            cache.end(tokens.pos_BT, n_real)
        if logits_to_keep is not None:
            x = x[:, -logits_to_keep:]
        return self.lm_head(self.norm(x))

    @torch.no_grad()
    def decode_static(self, input_ids_B1: torch.Tensor, cache: HybridCache, slot: torch.Tensor) -> torch.Tensor:
        """One decode token per row with fixed shapes and no host sync: the step a CUDA graph captures.

        Args:
            input_ids_B1: [B, 1] int64 ids (not range-checked here: that would read them back).
            cache: the HybridCache, filled to ``cache.seq_len`` slots; this call writes slot ``slot``.
            slot: int64 [1] tensor on the cache's device holding cache.seq_len; the caller advances it
                and cache.seq_len after the call (see hybridlm.generation.StaticDecoder).
        Returns:
            logits [B, vocab_size] of the new token.

        KV layers write their key with index_copy_ and attend over all max_len slots (empty slots carry
        position -1 and are masked); MoE layers run every expert (see MoE.forward's ``static``). Call
        ``pack_for_inference()`` before compiling this step (``StaticDecoder`` does): traced without
        it, each MoE layer stacks its experts' weights inside the graph, a copy on every call. Layers
        A, G, D, K, L and X are supported; W, M and S raise NotImplementedError.
        """
        unsupported = sorted(set(self.config.layer_types) & set("WMS"))
        if unsupported:
            raise NotImplementedError(f"decode_static: layer letters {unsupported} have no static decode step yet; "
                                      "decode eagerly with model(ids, cache=cache)")
        pos_BT = cache.next_position.long()[:, None]
        if cache.positions is not None:
            cache.positions.index_copy_(1, slot, pos_BT.to(cache.positions.dtype))
        tokens = Tokens(pos_BT, None, 0, slot=slot)
        x = self.embed_tokens(input_ids_B1)
        if all(block.plain_residuals for block in self.layers):
            # each residual add goes into the norm after it (Block.decode_step): one kernel per add on CUDA
            y = None
            for i, block in enumerate(self.layers):
                x, y = block.decode_step(x, y, tokens, cache.layers[i])
            h = self.norm(x) if y is None else self.norm.add(x, y)[1]
        else:
            for i, block in enumerate(self.layers):
                x = block(x, tokens, cache.layers[i])
            h = self.norm(x)
        cache.next_position += 1
        return self.lm_head(h[:, -1])

    def _tokens(self, input_ids: torch.Tensor, mask_BT: torch.Tensor | None, cache: HybridCache | None) -> Tokens:
        """Per-row positions: each row counts only its real tokens, continuing from the cache."""
        B, T = input_ids.shape
        if cache is not None and cache.batch_size != B:
            raise ValueError(f"input_ids: batch {B} does not match the cache's batch_size {cache.batch_size}")
        base = torch.zeros(B, 1, dtype=torch.long, device=input_ids.device) if cache is None \
            else cache.next_position.long()[:, None]
        if mask_BT is None:
            pos_BT = base + torch.arange(T, device=input_ids.device)
        else:
            pos_BT = torch.where(mask_BT, base + mask_BT.long().cumsum(1) - 1, -1)
        start = 0 if cache is None else cache.begin(pos_BT)
        contiguous = mask_BT is None and (cache is None or cache.contiguous)
        if cache is not None and mask_BT is not None:
            cache.contiguous = False
        return Tokens(pos_BT, mask_BT, start, contiguous=contiguous)

    def _check_ids(self, input_ids) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids: expected a torch.Tensor [B, T] of token ids, got {type(input_ids).__name__}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected rank 2 [B, T], got shape {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids: expected an integer dtype (torch.long), got {input_ids.dtype}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids: expected at least one token (T >= 1), got T = 0")
        if input_ids.device.type != "meta":
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"input_ids: expected ids in [0, {self.config.vocab_size}), got values in [{lo}, {hi}]")

    @staticmethod
    def _check_mask(attention_mask, shape) -> torch.Tensor | None:
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask: expected a torch.Tensor [B, T] of 0/1, got {type(attention_mask).__name__}")
        if tuple(attention_mask.shape) != tuple(shape):
            raise ValueError(f"attention_mask: expected shape {tuple(shape)} (that of input_ids), "
                             f"got {tuple(attention_mask.shape)}")
        if attention_mask.dtype != torch.bool and ((attention_mask != 0) & (attention_mask != 1)).any():
            raise ValueError("attention_mask: expected only 0 and 1 values")
        return attention_mask.bool()
