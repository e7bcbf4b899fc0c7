"""Several projections of one input as one matrix product at inference.

A Gated DeltaNet layer projects its input six ways (q, k, v, z, b, a), attention three (q, k, v) and
a SwiGLU MLP two (gate, up). At decode batch sizes every projection is a matrix-vector product bound
by reading its weight, and six small ones pay six launches and six ramp-ups for what one product
over the stacked weight reads at once.

Packing is explicit: ``pack_weights(owner, names)`` (a layer's ``pack_for_inference()``;
``StaticDecoder`` calls it on every layer) stacks the bias-free ``nn.Linear`` layers ``owner.<name>``
into one [sum out, in] tensor and turns each layer's weight into a view of its rows, assigned to the
same ``Parameter`` through ``.data``. So an optimizer holding the parameters still updates them,
no weight is kept twice, and ``state_dict`` and checkpoints see the same names and values.

``packed_linears(owner, groups, x)`` then runs one product when a pack exists and no gradient is
needed, restacking first if something replaced a weight (``.to(dtype)``, loading into new tensors);
otherwise it runs the layers one by one. Packing never happens implicitly: an evaluation under
``no_grad`` in the middle of training leaves the parameters' storage where it was, so nothing about
a training run depends on whether or when it evaluated. Layers that are not plain bias-free
``nn.Linear`` (a bias, a wrapper) are never packed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def packed_linears(owner: nn.Module, groups: tuple[tuple[str, ...], ...], x: torch.Tensor) -> list[torch.Tensor]:
    """Project x [..., in] by the layers ``owner.<name>`` of every group; one tensor per group, the
    outputs of its layers side by side (so q, k, v as one group come out as one [..., 3 out] tensor).

    With a pack (``pack_weights`` was called) and no gradient needed: one product over the stacked
    weight, the groups its column slices. Otherwise each layer runs alone and a group of several is
    concatenated.
    """
    names = _names(groups)
    pack = None
    if _attr(names) in owner.__dict__ and not (
            torch.is_grad_enabled() and any(p.requires_grad for n in names for p in getattr(owner, n).parameters())):
        pack = pack_weights(owner, names)
    if pack is not None:
        widths = [sum(getattr(owner, n).out_features for n in g) for g in groups]
        return list(F.linear(x, pack).split(widths, -1))
    outs = []
    for g in groups:
        ys = [getattr(owner, n)(x) for n in g]
        outs.append(ys[0] if len(ys) == 1 else torch.cat(ys, -1))
    return outs


def pack_weights(owner: nn.Module, names: tuple[str, ...]) -> torch.Tensor | None:
    """Stack the weights of ``owner``'s layers ``names`` (again, if something replaced one since) and
    return the stack, or None when they cannot share one (not all bias-free ``nn.Linear`` of one
    dtype, device and input width)."""
    attr = _attr(names)
    layers = [getattr(owner, n) for n in names]
    pack = owner.__dict__.get(attr)
    if pack is not None and torch.compiler.is_compiling():
        return pack  # traced code cannot compare storage pointers; the decoder packed before compiling
    if pack is not None and _views_of(pack, layers):
        return pack
    if torch.compiler.is_compiling() or not _packable(layers):
        return None
    with torch.no_grad():
        pack = torch.cat([m.weight for m in layers])
    for m, rows in zip(layers, pack.split([m.out_features for m in layers])):
        m.weight.data = rows  # same Parameter object, now a view of the stack's rows
    owner.__dict__[attr] = pack
    return pack


def pack_groups(owner: nn.Module, groups: tuple[tuple[str, ...], ...]) -> torch.Tensor | None:
    """``pack_weights`` for the layers of ``groups`` (the argument ``packed_linears`` takes)."""
    return pack_weights(owner, _names(groups))


def _names(groups: tuple[tuple[str, ...], ...]) -> tuple[str, ...]:
    return tuple(n for g in groups for n in g)


def _attr(names: tuple[str, ...]) -> str:
    return "_packed_" + "_".join(names)


def _packable(layers: list[nn.Module]) -> bool:
    first = layers[0].weight
    return all(type(m) is nn.Linear and m.bias is None and m.weight.dtype == first.dtype
               and m.weight.device == first.device and m.in_features == layers[0].in_features
               and not m.weight.is_meta for m in layers)


def _views_of(pack: torch.Tensor, layers: list[nn.Module]) -> bool:
    row = 0
    for m in layers:
        w = getattr(m, "weight", None)
        if (not isinstance(w, torch.Tensor) or row >= pack.shape[0] or w.dtype != pack.dtype
                or w.device != pack.device or w.data_ptr() != pack[row].data_ptr()):
            return False
        row += m.out_features
    return row == pack.shape[0]
