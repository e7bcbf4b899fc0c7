"""What every mixer layer is told about the tokens of one forward call."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Tokens:
    """Positions and padding of the T tokens in this call.

    pos_BT: int64 [B, T] rotary position of each token, -1 at padding.
    mask_BT: bool [B, T], True = real token; None when every token is real (no masking work).
    start: cache slots used before this call (0 without a cache).
    slot: a static decode step (``HybridLM.decode_static``): int64 [1] device tensor, the cache slot
        the one new token per row is written to; layers then use fixed shapes only (KV layers write
        with index_copy_ and attend over every slot, empty ones masked by their position -1), so
        the step can be captured in a CUDA graph. None for ordinary calls.
    contiguous: no padding in this call or in the cache before it, so token t of the call sits at
        position start + t and every cached key at its slot index (attention can then use causal
        SDPA kernels without a position mask).
    """

    pos_BT: torch.Tensor
    mask_BT: torch.Tensor | None
    start: int = 0
    slot: torch.Tensor | None = None
    contiguous: bool = False

    def zero_pads(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, ...] with every padded token set to 0 (where, not a product: pads may hold inf/NaN)."""
        if self.mask_BT is None:
            return x
        mask = self.mask_BT.view(*self.mask_BT.shape, *([1] * (x.dim() - 2)))
        return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Gates in float32 (bf16 loses the small decays), float64 kept for float64 checks."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
