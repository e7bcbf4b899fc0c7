"""HybridCache: one preallocated state object per layer, and its exact size.

Attention layers keep keys and values per token; linear layers keep a fixed-size recurrent state
(plus the short-conv window), which is the whole point of a hybrid: their bytes do not grow with
the context. Shapes never change after construction, so a decode step can later be captured in a
CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridlm.config import ATTENTION_LETTERS, HybridConfig

_STATE_DTYPES = {"float32": torch.float32, "float64": torch.float64,
                 "bfloat16": torch.bfloat16, "float16": torch.float16}


def conv_channels(config: HybridConfig, letter: str) -> int:
    """Channels that pass through a linear layer's short conv (0: the layer has no conv).

    G, D and K convolve q, k and v; L and X layers have no conv.
    """
    if letter not in "GDK" or config.linear_conv_kernel_dim == 0:
        return 0
    qk = config.linear_num_key_heads * config.linear_key_head_dim
    return 2 * qk + config.linear_num_value_heads * config.linear_value_head_dim


def state_value_dim(config: HybridConfig, letter: str) -> int:
    """Last dimension of a linear layer's state: V, or V + 1 when an X layer carries its normaliser."""
    extra = 1 if letter == "X" and config.linear_normalize else 0
    return config.linear_value_head_dim + extra


@dataclass
class KVSlot:
    """Keys and values of one attention layer. ``k_pos`` is shared by every layer of its kind:
    [B, max_len] for A and S layers, the ring's [B, window_slots] for W layers. ``index_k``: the
    sparse indexer's keys [B, max_len, index_head_dim] (S layers on a GQA base), else None; ``index_scale``
    [B, max_len, 1] float32 when those keys are fp8 (see HybridConfig.index_key_bytes)."""

    k: torch.Tensor
    v: torch.Tensor
    k_pos: torch.Tensor
    ring: bool
    index_k: torch.Tensor | None = None
    index_scale: torch.Tensor | None = None


@dataclass
class LatentSlot:
    """One MLA layer (M, or S on an MLA base): the normalised latents [B, max_len, kv_lora_rank], the
    shared rotary key [B, max_len, rope_dim], the key positions [B, max_len] (shared with A layers) and,
    for S layers, the indexer's keys [B, max_len, index_head_dim] (+ their float32 scales [B, max_len, 1]
    when the keys are fp8)."""

    latent: torch.Tensor
    k_rope: torch.Tensor
    k_pos: torch.Tensor
    index_k: torch.Tensor | None = None
    index_scale: torch.Tensor | None = None


@dataclass
class RecurrentSlot:
    """State of one linear layer: [B, HV, K, V(+1)] and the conv window [B, C, kernel - 1] or None."""

    state: torch.Tensor
    conv: torch.Tensor | None


class HybridCache:
    """Preallocated per-layer cache of a HybridLM; call the model with it to append tokens.

    Tensors it allocates (B = batch_size, L = max_len, HKV = num_key_value_heads, D = head_dim,
    HV = linear_num_value_heads, K/V = linear key/value head dims, dt = the cache dtype,
    sd = config.state_dtype), each once unless said otherwise:

    - per A layer: k and v, each [B, L, HKV, D] dt;
    - per W layer: k and v, each [B, min(L, sliding_window), HKV, D] dt (a ring buffer);
    - per M layer: latent [B, L, mla_kv_lora_rank] dt and rotary key [B, L, mla_qk_rope_head_dim] dt;
    - per S layer: what its base caches (an M layer's two tensors, or an A layer's k and v) plus the
      indexer's keys [B, L, index_head_dim] dt, or with index_key_bytes = index_head_dim + 4 the keys in
      float8_e4m3fn and a scale [B, L, 1] float32 per token;
    - per G, D, K, L, X layer: state [B, HV, K, V] sd ([B, HV, K, V + 1] for X with linear_normalize);
    - per G, D, K layer with linear_conv_kernel_dim > 0: conv [B, 2*H*K + HV*V, kernel - 1] dt
      (H = linear_num_key_heads);
    - if any A, M or S layer: positions [B, L] int32 (position of the key in each slot, -1 = empty/pad);
    - if any W layer: window positions [B, min(L, sliding_window)] int32 (same, for the ring);
    - always: next position [B] int32 (each row's next rotary position).

    ``seq_len`` (a Python int) counts the slots used, padding included.

    Example::

        cache = model.new_cache(batch_size=2, max_len=128)
        logits = model(prompt_ids, cache=cache)       # prefill
        logits = model(next_ids, cache=cache)         # one token [2, 1]
        cache.nbytes(), cache.breakdown()
    """

    def __init__(self, config: HybridConfig, batch_size: int, max_len: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        for name, value in (("batch_size", batch_size), ("max_len", max_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
        self.config = config
        self.batch_size = batch_size
        self.max_len = max_len
        self.seq_len = 0
        # True while every token written had no padding: key positions are then the slot indices,
        # which lets attention use SDPA's causal kernels instead of a position mask
        self.contiguous = True
        kw = {"device": device}
        letters = config.layer_types
        B, hkv, d = batch_size, config.num_key_value_heads, config.head_dim
        self.window_slots = min(max_len, config.sliding_window) if "W" in letters else 0
        self.positions = (torch.full((B, max_len), -1, dtype=torch.int32, **kw) if set(letters) & set("AMS")
                          else None)
        self.window_positions = (torch.full((B, self.window_slots), -1, dtype=torch.int32, **kw)
                                 if "W" in letters else None)
        self.next_position = torch.zeros(B, dtype=torch.int32, **kw)
        self.layers: list[KVSlot | LatentSlot | RecurrentSlot] = []
        zeros = lambda *shape: torch.zeros(shape, dtype=dtype, **kw)  # noqa: E731
        fp8 = bool(config.index_key_bytes)
        for letter in letters:
            index = {}
            if letter == "S":
                index["index_k"] = torch.zeros(B, max_len, config.index_head_dim, **kw,
                                               dtype=torch.float8_e4m3fn if fp8 else dtype)
                index["index_scale"] = torch.zeros(B, max_len, 1, dtype=torch.float32, **kw) if fp8 else None
            if letter == "M" or (letter == "S" and config.sparse_base == "mla"):
                self.layers.append(LatentSlot(zeros(B, max_len, config.mla_kv_lora_rank),
                                              zeros(B, max_len, config.mla_qk_rope_head_dim), self.positions, **index))
            elif letter in ATTENTION_LETTERS:
                ring = letter == "W"
                slots = self.window_slots if ring else max_len
                k_pos = self.window_positions if ring else self.positions
                shape = (B, slots, hkv, d)
                self.layers.append(KVSlot(zeros(*shape), zeros(*shape), k_pos, ring, **index))
            else:
                state_shape = (B, config.linear_num_value_heads, config.linear_key_head_dim,
                               state_value_dim(config, letter))
                state = torch.zeros(state_shape, dtype=_STATE_DTYPES[config.state_dtype], **kw)
                channels = conv_channels(config, letter)
                conv = (torch.zeros(B, channels, config.linear_conv_kernel_dim - 1, dtype=dtype, **kw)
                        if channels else None)
                self.layers.append(RecurrentSlot(state, conv))

    # ------------------------------------------------------------------ appending tokens
    def begin(self, pos_BT: torch.Tensor) -> int:
        """Reserve slots for T new tokens with positions pos_BT [B, T] (-1 at padding).

        Writes the A layers' key positions (their slots are read within this call) and returns
        the first new slot. Raises ValueError if the cache would pass max_len.
        """
        B, T = pos_BT.shape
        if B != self.batch_size:
            raise ValueError(f"input_ids: batch {B} does not match the cache's batch_size {self.batch_size}")
        if self.seq_len + T > self.max_len:
            raise ValueError(
                f"sequence of {self.seq_len + T} tokens would pass the cache's max_len={self.max_len} "
                f"({self.seq_len} cached + {T} new); make a cache with a larger max_len"
            )
        start = self.seq_len
        if self.positions is not None:
            self.positions[:, start:start + T] = pos_BT
        return start

    def end(self, pos_BT: torch.Tensor, n_real_B: torch.Tensor) -> None:
        """Finish a call begun at ``begin``: ring positions, next positions and seq_len.

        The ring's positions change only now, because every W layer of the call reads the ring
        as it was before the call.
        """
        T = pos_BT.shape[1]
        if self.window_positions is not None:
            slots, idx = ring_slots(self.seq_len, T, self.window_slots, pos_BT.device)
            self.window_positions[:, slots] = pos_BT[:, idx].to(torch.int32)
        self.next_position += n_real_B.to(torch.int32)
        self.seq_len += T

    def reset(self) -> None:
        """Empty the cache in place (same tensors, so captured graphs stay valid)."""
        for slot in self.layers:
            for t in vars(slot).values():
                if isinstance(t, torch.Tensor):
                    t.zero_()
        for t in (self.positions, self.window_positions):
            if t is not None:
                t.fill_(-1)
        self.next_position.zero_()
        self.seq_len = 0
        self.contiguous = True

    # ------------------------------------------------------------------ size
    def named_tensors(self) -> dict[str, list[torch.Tensor]]:
        """Every tensor the cache allocated, grouped under the names of ``breakdown()``."""
        groups: dict[str, list[torch.Tensor]] = {}
        for i, (letter, slot) in enumerate(zip(self.config.layer_types, self.layers)):
            if isinstance(slot, KVSlot):
                groups[f"layer {i} ({letter}) kv"] = [slot.k, slot.v]
            elif isinstance(slot, LatentSlot):
                groups[f"layer {i} ({letter}) kv"] = [slot.latent, slot.k_rope]
            else:
                groups[f"layer {i} ({letter}) state"] = [slot.state]
                if slot.conv is not None:
                    groups[f"layer {i} ({letter}) conv"] = [slot.conv]
            for t in (getattr(slot, "index_k", None), getattr(slot, "index_scale", None)):
                if t is not None:  # per token, so counted with the KV
                    groups[f"layer {i} ({letter}) kv"].append(t)
        for name, t in (("positions", self.positions), ("window positions", self.window_positions),
                        ("next position", self.next_position)):
            if t is not None:
                groups[name] = [t]
        return groups

    def breakdown(self) -> dict[str, int]:
        """{"layer 0 (G) state": bytes, "layer 0 (G) conv": ..., "layer 3 (A) kv": ..., "positions": ...}."""
        return {name: sum(t.numel() * t.element_size() for t in ts) for name, ts in self.named_tensors().items()}

    def nbytes(self) -> int:
        """Exact bytes of every tensor the cache allocated (also on the meta device)."""
        return sum(self.breakdown().values())


def ring_slots(start: int, T: int, n_slots: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the last min(T, n_slots) of T tokens starting at slot ``start`` land in a ring.

    Returns (ring slot indices, indices into the T new tokens), both int64 [min(T, n_slots)].
    """
    n = min(T, n_slots)
    idx = torch.arange(T - n, T, device=device)
    return (start + idx) % n_slots, idx
