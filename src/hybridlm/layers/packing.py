"""Several projections of one input as one matrix product at inference.

A Gated DeltaNet layer projects its input six ways (q, k, v, z, b, a), attention three (q, k, v), a
SwiGLU MLP two (gate, up) and an MoE layer with a shared expert up to four (router, shared expert's
sigmoid gate, gate, up). At decode batch sizes every projection is a matrix-vector product bound
by reading its weight, and six small ones pay six launches and six ramp-ups for what one product
over the stacked weight reads at once.

Packing is explicit: ``pack_weights(owner, names)`` (a layer's ``pack_for_inference()``;
``StaticDecoder`` calls it on every layer) stacks the bias-free ``nn.Linear`` layers ``owner.<name>``
(a name may be a dotted path into a child) into one [sum out, in] tensor (with zero rows up to a
multiple of 8, for aligned products) and turns each layer's weight into a view of its rows,
assigned to the same ``Parameter`` through ``.data``. So an optimizer holding the parameters still
updates them, no weight is kept twice, and ``state_dict`` and checkpoints see the same names and
values.

``packed_linears(owner, groups, x)`` then runs one product when a pack exists and no gradient is
needed, restacking first if something replaced a weight (loading into new tensors); otherwise it
runs the layers one by one. Layers that pack derive from ``PacksWeights``: ``.to()``, ``.double()``,
``.cuda()`` release their stacks before converting, so the old storage goes as the weights are
converted, and take them up again after (the same stack when nothing moved). Packing never happens
implicitly: an evaluation under ``no_grad`` in the middle of training leaves the parameters' storage
where it was, so nothing about a training run depends on whether or when it evaluated. Layers that
are not plain bias-free ``nn.Linear`` (a bias, a wrapper) are never packed.

On CUDA, a one-row product (a decode step at batch 1) against a narrow weight runs on the Triton
matrix-vector kernel (``hybridlm.ops.triton.gemv``) instead of cuBLAS, whose kernels took 1.3-1.7x
as long for those (``project_rows``); output projections take the same route through ``project``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hybridlm.ops._checks import env_switch, load_kernel


_NAMES = "_pack_names"  # owner.__dict__ key: {pack attribute: names of the layers it stacks}
_GEMV_MAX_OUT = 4096  # widest weight (output rows) sent to the decode matrix-vector kernel
# ... where kernels launch with PDL: the wide input projections too, on the block kernel (gemv.ROW_MAX_O);
# H100, compiled 4k batch-1 step, third 12-05 session: 281.3-281.6 tokens/s against 272.8-273.4 on cuBLAS
_GEMV_MAX_OUT_PDL = 16384
# The batch-1 decode step's input norms inside the products after them (``norm_project_for``), on by default.
NORM_FUSED = env_switch("HYBRIDLM_NORM_FUSED", "the norm kernel, then the product",
                        "the norm inside the product's kernel", default=True)


class PacksWeights(nn.Module):
    """Base of the layers that stack weights (``pack_weights``; ``MoE`` its experts').

    ``nn.Module._apply`` (behind ``.to()``, ``.double()``, ``.cuda()``, ``.to_empty()``) converts
    each parameter and repoints it to the result. A stack held past that keeps the old storage
    alive beside the converted weights until the next inference call restacks (a model packed in
    float32, then cast to bfloat16, held both copies). So the stacks are released first, and
    afterwards taken up again: as the same stack when the weights still are its rows (a ``.to``
    that changed nothing, so a captured CUDA graph keeps reading live memory), else stacked anew
    when they can be.
    """

    def _apply(self, fn, recurse=True):
        held = self._release_packs()
        out = super()._apply(fn, recurse)
        self._restore_packs(held)
        return out

    def _release_packs(self):
        names = self.__dict__.get(_NAMES, {})
        for attr in names:
            self.__dict__.pop(attr, None)
        return [(attr, n) for attr, n in names.items()]

    def _restore_packs(self, held) -> None:
        for attr, names in held:
            layers = [_layer(self, n) for n in names]
            rows = _padded(sum(getattr(m, "out_features", 0) for m in layers))
            w0 = getattr(layers[0], "weight", None)
            view = storage_view(w0, (rows, getattr(layers[0], "in_features", 0)))
            if view is not None and _views_of(view, layers):
                self.__dict__[attr] = view
            else:
                pack_weights(self, names)


def storage_view(t: torch.Tensor | None, shape: tuple[int, ...],
                 stride: tuple[int, ...] | None = None) -> torch.Tensor | None:
    """A ``shape`` tensor over ``t``'s storage from ``t``'s first element (contiguous, or with
    ``stride``), or None when ``t`` is not a materialised tensor or its storage is too short (then
    ``t`` is not a stack's row)."""
    if not isinstance(t, torch.Tensor) or t.is_meta:
        return None
    n = math.prod(shape)
    if n == 0 or (t.storage_offset() + n) * t.element_size() > t.untyped_storage().nbytes():
        return None
    with torch.no_grad():
        view = torch.empty(0, dtype=t.dtype, device=t.device)
        if stride is None:
            return view.set_(t.untyped_storage(), t.storage_offset(), shape)
        return view.set_(t.untyped_storage(), t.storage_offset(), shape, stride)


def packed_linears(owner: nn.Module, groups: tuple[tuple[str, ...], ...], x: torch.Tensor,
                   projected: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Project x [..., in] by the layers ``owner.<name>`` of every group; one tensor per group, the
    outputs of its layers side by side (so q, k, v as one group come out as one [..., 3 out] tensor).

    With a pack (``pack_weights`` was called) and no gradient needed: one product over the stacked
    weight, the groups its column slices. Otherwise each layer runs alone and a group of several is
    concatenated. ``projected``: that product already made ([..., rows of ``input_stack(owner,
    groups)``], by ``norms.RMSNorm.project`` at decode), only sliced here.
    """
    if projected is not None:
        return _group_slices(owner, groups, projected)
    pack = input_stack(owner, groups)
    if pack is not None:
        return _group_slices(owner, groups, project_rows(x, pack))
    outs = []
    for g in groups:
        ys = [_layer(owner, n)(x) for n in g]
        outs.append(ys[0] if len(ys) == 1 else torch.cat(ys, -1))
    return outs


def input_stack(owner: nn.Module, groups: tuple[tuple[str, ...], ...]) -> torch.Tensor | None:
    """The stacked weight ``packed_linears(owner, groups, x)`` multiplies x by: the pack when one was
    made (restacked if something replaced a weight) and no gradient is needed, else None."""
    names = _names(groups)
    if _attr(names) not in owner.__dict__ or (
            torch.is_grad_enabled() and any(p.requires_grad for n in names for p in _layer(owner, n).parameters())):
        return None
    return pack_weights(owner, names)


def _group_slices(owner: nn.Module, groups: tuple[tuple[str, ...], ...], out: torch.Tensor) -> list[torch.Tensor]:
    """The groups' column slices of the product over their stack (its zero padding rows dropped)."""
    widths = [sum(_layer(owner, n).out_features for n in g) for g in groups]
    pad = out.shape[-1] - sum(widths)
    if pad < 0:
        raise ValueError(f"projected must have at least {sum(widths)} columns (the stacked weight's rows), got "
                         f"{out.shape[-1]}")
    return list(out.split(widths + [pad] if pad else widths, -1)[:len(groups)])


def norm_project_for(x: torch.Tensor, weight: torch.Tensor):
    """``ops.triton.add_rms_norm_linear`` when a decode step's input norm and its product by ``weight`` (a
    layer's input stack) run as one kernel: one row of x on CUDA in weight's 16-bit dtype, where the
    decode kernels launch with PDL (the chain the separate norm kernel stood in) and ``project_rows``
    would take the one-row matrix-vector kernel (MoE's stack at batch 1; the block kernel of the wider
    stacks too where HYBRIDLM_NORM_LAUNCH asks, see ``gemv.NORM_LAUNCH``), unless HYBRIDLM_NORM_FUSED=0;
    else None."""
    if (NORM_FUSED and x.dim() >= 1 and x.shape[-1] == weight.shape[-1] and _gemv_for(x, weight) is not None):
        from hybridlm.ops.triton import gemv
        from hybridlm.ops.triton.utils import pdl
        # the block kernel (wider stacks) only where HYBRIDLM_NORM_LAUNCH asks (``gemv.NORM_LAUNCH``)
        row = gemv.takes_row_kernel(x.reshape(-1, x.shape[-1]), weight)
        if x.shape[-1] <= gemv.NORM_MAX_D and pdl(x.device) and (row or gemv.NORM_LAUNCH is not None):
            return load_kernel("add_rms_norm_linear", "auto", x)
    return None


def _gemv_for(x: torch.Tensor, weight: torch.Tensor):
    """The decode matrix-vector kernel when ``project_rows`` routes x and weight to it, else None."""
    if (x.is_cuda and x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16)
            and x.dim() >= 1 and math.prod(x.shape[:-1]) == 1 and weight.shape[0] <= _GEMV_MAX_OUT_PDL):
        from hybridlm.ops.triton.utils import pdl  # only on CUDA: Triton is imported where kernels run
        if weight.shape[0] <= _GEMV_MAX_OUT or pdl(x.device):
            return load_kernel("decode_linear", "auto", x)
    return None


def project_rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` (no bias, no gradient needed). One row of x on CUDA, in weight's 16-bit
    dtype, against at most ``_GEMV_MAX_OUT`` weight rows (``_GEMV_MAX_OUT_PDL`` where kernels launch
    with PDL) runs on the decode matrix-vector kernel.

    Measured on an H200 (bf16, distinct weights per call, data/2026-12-03-h200-s2/gemv_ab.json): at
    one row the block kernel took 3.63 / 2.89 / 7.55 us against cuBLAS's 6.21 / 3.78 / 10.01 for MoE's
    stacked router and shared gate/up (1064 x 2048), the shared expert's down (2048 x 512) and an
    output projection (2048 x 4096), 17.4 / 14.1 us against 17.9 / 13.4 for the wide input
    projections (12352 and 9216 rows); at four rows it lost on three of the five, so only one row is
    routed. The one-row kernel with programmatic dependent launch (sixth 12-03 session,
    data/2026-12-03-h200-s6/gemv_ab.json) took 2.11 / 1.78 / 5.69 us for the narrow three, but 18.26 /
    15.11 us for the wide ones against cuBLAS's 17.82 / 13.37. Alone the wide ones are no faster on the
    kernel, but in the PDL chain of a decode step cuBLAS breaks the chain twice a layer: with PDL they
    take the block kernel (compiled 4k batch-1 step on an H100, third 12-05 session: 281.3-281.6 tokens/s
    against 272.8-273.4 on cuBLAS); without PDL they stay on cuBLAS."""
    kernel = _gemv_for(x, weight)
    return kernel(x, weight) if kernel is not None else F.linear(x, weight)


def plain_linear(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``layer(x)`` is exactly ``x @ layer.weight.T`` with nothing else to run or record: a
    bias-free ``nn.Linear`` (not a subclass) without forward hooks, and no gradient needed."""
    return (type(layer) is nn.Linear and layer.bias is None and not layer._forward_hooks
            and not layer._forward_pre_hooks
            and not (torch.is_grad_enabled() and (x.requires_grad or layer.weight.requires_grad)))


def project(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``, except that a bias-free ``nn.Linear`` without hooks, with no gradient needed,
    takes ``project_rows``' kernel where that routes it."""
    if plain_linear(layer, x):
        kernel = _gemv_for(x, layer.weight)
        if kernel is not None:
            return kernel(x, layer.weight)
    return layer(x)


def pack_weights(owner: nn.Module, names: tuple[str, ...]) -> torch.Tensor | None:
    """Stack the weights of ``owner``'s layers ``names`` (again, if something replaced one since) and
    return the stack, or None when they cannot share one (not all bias-free ``nn.Linear`` of one
    dtype, device and input width)."""
    attr = _attr(names)
    layers = [_layer(owner, n) for n in names]
    pack = owner.__dict__.get(attr)
    if pack is not None and torch.compiler.is_compiling():
        return pack  # traced code cannot compare storage pointers; the decoder packed before compiling
    if pack is not None and _views_of(pack, layers):
        return pack
    if torch.compiler.is_compiling() or not _packable(layers):
        return None
    rows = sum(m.out_features for m in layers)
    with torch.no_grad():
        w0 = layers[0].weight
        pad = [w0.new_zeros(_padded(rows) - rows, w0.shape[1])] if _padded(rows) > rows else []
        pack = torch.cat([m.weight for m in layers] + pad)
    for m, view in zip(layers, pack[:rows].split([m.out_features for m in layers])):
        m.weight.data = view  # same Parameter object, now a view of the stack's rows
    owner.__dict__[attr] = pack
    owner.__dict__.setdefault(_NAMES, {})[attr] = names
    return pack


def pack_groups(owner: nn.Module, groups: tuple[tuple[str, ...], ...]) -> torch.Tensor | None:
    """``pack_weights`` for the layers of ``groups`` (the argument ``packed_linears`` takes)."""
    return pack_weights(owner, _names(groups))


def _layer(owner: nn.Module, name: str) -> nn.Module | None:
    """``owner.<name>``, where name may be a dotted path into a child (``shared_expert.up_proj``).
    A plain name is read from the module dict: this runs several times per layer call."""
    if "." not in name:
        return owner._modules.get(name)
    try:
        return owner.get_submodule(name)
    except AttributeError:
        return None


def _names(groups: tuple[tuple[str, ...], ...]) -> tuple[str, ...]:
    return tuple(n for g in groups for n in g)


def _attr(names: tuple[str, ...]) -> str:
    """The owner attribute holding the stack: a Python identifier (dotted names' dots become ``__``),
    since torch.compile (2.11's dynamo) asserts on attribute names with a dot in them."""
    return "_packed_" + "_".join(n.replace(".", "__") for n in names)


def _padded(rows: int) -> int:
    """Rows of a stack of ``rows`` weight rows: up to a multiple of 8 with zero rows, so the product's
    output rows stay 16-byte aligned in 16-bit dtypes. An odd width (MoE's router 32 + sigmoid gate
    1 + shared gate and up 2 x 512 = 1,057) made cuBLAS pick an unaligned sm75 kernel for the
    prefill's [2048, 2048] x [2048, 1057] product: 135 us a call on an H200, for FLOPs that take
    ~15 us at 600 TFLOP/s."""
    return -(-rows // 8) * 8


def _packable(layers: list[nn.Module]) -> bool:
    first = layers[0].weight
    return all(type(m) is nn.Linear and m.bias is None and m.weight.dtype == first.dtype
               and m.weight.device == first.device and m.in_features == layers[0].in_features
               and not m.weight.is_meta for m in layers)


def _views_of(pack: torch.Tensor, layers: list[nn.Module]) -> bool:
    # row addresses by arithmetic: indexing pack[row] makes a view per layer, on every call
    base, step = pack.data_ptr(), pack.stride(0) * pack.element_size()
    row = 0
    for m in layers:
        w = getattr(m, "weight", None)
        if (not isinstance(w, torch.Tensor) or row >= pack.shape[0] or w.dtype != pack.dtype
                or w.device != pack.device or w.data_ptr() != base + row * step):
            return False
        row += m.out_features
    return _padded(row) == pack.shape[0]
