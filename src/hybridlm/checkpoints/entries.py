"""The unit of a checkpoint layout: one checkpoint tensor, the HybridLM tensors it fills, and the two
conversions between them; with the common conversions (rename, row blocks, stacked rows, SwiGLU)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Tensors = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Entry:
    """One checkpoint tensor and the HybridLM tensor(s) it holds.

    to_ours: checkpoint tensor -> our tensors, in the order of ``ours``; to_hf: the inverse.
    """

    hf_name: str
    hf_shape: tuple[int, ...]
    ours: tuple[str, ...]
    to_ours: Callable[[torch.Tensor], Tensors]
    to_hf: Callable[[Tensors], torch.Tensor]


def rename(hf_name: str, our_name: str, shape: tuple[int, ...]) -> Entry:
    return Entry(hf_name, shape, (our_name,), lambda t: (t,), lambda ts: ts[0])


def grouped_rows(groups: int, sizes: list[int]):
    """(to_ours, to_hf) for a weight whose rows are ``groups`` blocks, each the parts in ``sizes``;
    part j of ours gathers part j of every block, block by block."""
    def to_ours(w: torch.Tensor) -> Tensors:
        parts = torch.split(w.view(groups, sum(sizes), w.shape[-1]), sizes, dim=1)
        return tuple(x.reshape(-1, w.shape[-1]) for x in parts)

    def to_hf(ts: Tensors) -> torch.Tensor:
        cols = ts[0].shape[-1]
        return torch.cat([t.view(groups, n, cols) for t, n in zip(ts, sizes)], dim=1).reshape(-1, cols)

    return to_ours, to_hf


def stacked_rows(sizes: list[int]):
    """(to_ours, to_hf) for a weight that stacks several projections' rows one after another."""
    return (lambda w: tuple(torch.split(w, sizes, dim=0))), (lambda ts: torch.cat(ts, dim=0))


def swiglu(hf: str, ours: str, D: int, I: int, names=("gate_proj", "up_proj", "down_proj")) -> list[Entry]:
    gate, up, down = names
    return [rename(f"{hf}{gate}.weight", f"{ours}gate_proj.weight", (I, D)),
            rename(f"{hf}{up}.weight", f"{ours}up_proj.weight", (I, D)),
            rename(f"{hf}{down}.weight", f"{ours}down_proj.weight", (D, I))]
