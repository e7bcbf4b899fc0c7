"""The routed experts of a mixture-of-experts layer, applied to each token's top-k choices.

Legend: N tokens, K experts per token, E experts, D hidden size, I expert intermediate size.
Every expert is a SwiGLU ``down(silu(gate(x)) * up(x))``; the weights come stacked as
:meth:`hybridlm.layers.moe.MoE.packed_experts` returns them, nn.Linear's weights of each expert one
after another: gate and up [E, I, D], down [E, D, I]. A token's products are then all dot products
with contiguous weight rows (along D for gate and up, along I for down).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridlm.ops import _checks as ck


def check_moe_experts(x_ND, experts_NK, weights_NK, gate_EID, up_EID, down_EDI,
                      shared_h_NS=None, shared_down_DS=None, shared_up_NS=None, shared_gate_N=None) -> None:
    """Shapes, dtypes and devices of :func:`moe_experts`'s arguments (reads no values); experts_NK and
    weights_NK may both be None (the fused decode kernel, which routes from logits)."""
    ck.check_float_tensor("x_ND", x_ND, 2, "[N, D]")
    N, D = x_ND.shape
    for name, w, dims in (("gate_EID", gate_EID, "[E, I, D]"), ("up_EID", up_EID, "[E, I, D]"),
                          ("down_EDI", down_EDI, "[E, D, I]")):
        ck.check_float_tensor(name, w, 3, dims)
        ck.check_same(name, w, "x_ND", x_ND)
    if gate_EID.shape[0] < 1:
        raise ValueError(f"gate_EID must hold at least one expert (E >= 1), got shape {tuple(gate_EID.shape)}")
    if gate_EID.shape[2] != D:
        raise ValueError(f"gate_EID must be [E, I, D] with D = {D} as in x_ND, got {tuple(gate_EID.shape)}")
    if up_EID.shape != gate_EID.shape:
        raise ValueError(f"up_EID must have gate_EID's shape [E, I, D] = {tuple(gate_EID.shape)}, "
                         f"got {tuple(up_EID.shape)}")
    E, I = gate_EID.shape[:2]
    if down_EDI.shape != (E, D, I):
        raise ValueError(f"down_EDI must be [E, D, I] = {(E, D, I)} (the experts' down_proj weights, "
                         f"[D, I] each, as gate_EID's [E, I, D] implies), got {tuple(down_EDI.shape)}")
    if experts_NK is not None or weights_NK is not None:  # None, None: the fused kernel routes itself
        if not isinstance(experts_NK, torch.Tensor):
            raise TypeError(f"experts_NK must be a torch.Tensor [N, K] of int64, got {type(experts_NK).__name__}")
        if experts_NK.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"experts_NK must have dtype int64 (or int32), got {experts_NK.dtype}")
        if experts_NK.dim() != 2 or experts_NK.shape[0] != N:
            raise ValueError(f"experts_NK must be [N, K] with N = {N} as in x_ND, got shape {tuple(experts_NK.shape)}")
        ck.check_same("experts_NK", experts_NK, "x_ND", x_ND, dtype=False)
        ck.check_float_tensor("weights_NK", weights_NK, 2, "[N, K]")
        if weights_NK.shape != experts_NK.shape:
            raise ValueError(f"weights_NK must have experts_NK's shape [N, K] = {tuple(experts_NK.shape)}, "
                             f"got {tuple(weights_NK.shape)}")
        ck.check_same("weights_NK", weights_NK, "x_ND", x_ND, dtype=False)
    if (shared_h_NS is None) != (shared_down_DS is None):
        raise ValueError("shared_h_NS and shared_down_DS go together: pass both (a shared expert's inner "
                         "activations and its down_proj weight) or neither")
    if shared_h_NS is not None:
        ck.check_float_tensor("shared_h_NS", shared_h_NS, 2, "[N, S]")
        ck.check_same("shared_h_NS", shared_h_NS, "x_ND", x_ND)
        ck.check_float_tensor("shared_down_DS", shared_down_DS, 2, "[D, S]")
        ck.check_same("shared_down_DS", shared_down_DS, "x_ND", x_ND)
        if shared_h_NS.shape[0] != N:
            raise ValueError(f"shared_h_NS must be [N, S] with N = {N} as in x_ND, got {tuple(shared_h_NS.shape)}")
        if shared_down_DS.shape != (D, shared_h_NS.shape[1]):
            raise ValueError(f"shared_down_DS must be [D, S] = {(D, shared_h_NS.shape[1])} (D from x_ND, S from "
                             f"shared_h_NS), got {tuple(shared_down_DS.shape)}")
    if (shared_up_NS is not None or shared_gate_N is not None) and shared_h_NS is None:
        raise ValueError("shared_up_NS and shared_gate_N come with shared_h_NS (the shared expert's gate "
                         "projection) and shared_down_DS")
    if shared_up_NS is not None:
        ck.check_float_tensor("shared_up_NS", shared_up_NS, 2, "[N, S]")
        ck.check_same("shared_up_NS", shared_up_NS, "x_ND", x_ND)
        if shared_up_NS.shape != shared_h_NS.shape:
            raise ValueError(f"shared_up_NS must have shared_h_NS's shape [N, S] = {tuple(shared_h_NS.shape)}, "
                             f"got {tuple(shared_up_NS.shape)}")
    if shared_gate_N is not None:
        if shared_up_NS is None:
            raise ValueError("shared_gate_N (the shared expert's sigmoid-gate logit) needs shared_up_NS: with "
                             "inner activations given as shared_h_NS, apply the gate to them")
        ck.check_float_tensor("shared_gate_N", shared_gate_N, 1, "[N]")
        ck.check_same("shared_gate_N", shared_gate_N, "x_ND", x_ND)
        if shared_gate_N.shape[0] != N:
            raise ValueError(f"shared_gate_N must be [N] with N = {N} as in x_ND, got {tuple(shared_gate_N.shape)}")


def shared_inner(shared_h_NS, shared_up_NS=None, shared_gate_N=None, dtype=None):
    """A shared expert's inner activations: shared_h_NS as given, or, with ``shared_up_NS``, the SwiGLU
    silu(shared_h_NS) * shared_up_NS, times sigmoid(shared_gate_N) per token when given; in ``dtype``
    (computed in it)."""
    h = shared_h_NS.to(dtype)
    if shared_up_NS is None:
        return h
    h = F.silu(h) * shared_up_NS.to(dtype)
    return h if shared_gate_N is None else torch.sigmoid(shared_gate_N.to(dtype))[:, None] * h


def moe_experts_reference(x_ND, experts_NK, weights_NK, gate_EID, up_EID, down_EDI,
                          shared_h_NS=None, shared_down_DS=None, shared_up_NS=None, shared_gate_N=None):
    """:func:`moe_experts` in plain PyTorch: one pass per slot j, gathering each token's expert."""
    dtype = ck.compute_dtype(x_ND.dtype)
    x = x_ND.to(dtype)
    out = torch.zeros(x_ND.shape, dtype=dtype, device=x_ND.device)
    if shared_h_NS is not None:
        out += shared_inner(shared_h_NS, shared_up_NS, shared_gate_N, dtype) @ shared_down_DS.to(dtype).t()
    for j in range(experts_NK.shape[1]):
        e_N = experts_NK[:, j]
        gate_NID, up_NID, down_NDI = (w[e_N].to(dtype) for w in (gate_EID, up_EID, down_EDI))
        h_NI = F.silu(torch.einsum("nid,nd->ni", gate_NID, x)) * torch.einsum("nid,nd->ni", up_NID, x)
        out += weights_NK[:, j, None].to(dtype) * torch.einsum("ndi,ni->nd", down_NDI, h_NI)
    return out.to(x_ND.dtype)


def moe_experts(x_ND, experts_NK, weights_NK, gate_EID, up_EID, down_EDI, *, shared_h_NS=None,
                shared_down_DS=None, shared_up_NS=None, shared_gate_N=None, backend="auto"):
    """Each token's weighted sum over its K routed SwiGLU experts; returns out [N, D] in x's dtype.

    out[n] = sum_j weights_NK[n, j] * down_e(silu(gate_e x[n]) * up_e x[n]),  e = experts_NK[n, j]
             (+ shared_down_DS @ shared_h_NS[n] with a shared expert).

    Args:
        x_ND: [N, D] float tokens.
        experts_NK: int64 (or int32) [N, K] expert indices in [0, E) (a token may list an expert
            twice; every slot counts).
        weights_NK: [N, K] float combine weights (float32 as ``hybridlm.layers.moe.route`` gives them,
            already multiplied by any routed scaling factor).
        gate_EID, up_EID: [E, I, D] in x's dtype, the stacked gate_proj / up_proj weights.
        down_EDI: [E, D, I] in x's dtype, the stacked down_proj weights.
        shared_h_NS, shared_down_DS: optional, together: a shared expert's inner activations [N, S]
            (its gate already applied, e.g. sigmoid(g x) silu(gate x) * up x) and its down_proj
            weight [D, S], both in x's dtype. Its down product joins the routed ones in one float32
            sum (the kernel reads it as one more expert), instead of a product and an add of its own.
        shared_up_NS, shared_gate_N: optional; with shared_up_NS, shared_h_NS is the shared expert's
            gate projection (before its SiLU) and its inner activations are silu(shared_h_NS) *
            shared_up_NS, times sigmoid(shared_gate_N[n]) per token when the [N] gate logits are given
            (Qwen's sigmoid-gated shared expert): formed in float32 where the kernel reads them, so no
            kernel of their own. Any row strides (column slices of one packed projection output).
        backend: "auto" (the Triton decode kernel for CUDA tensors that are not float64, the reference
            elsewhere), "triton" (RuntimeError when it cannot run) or "reference".
    Returns:
        out_ND [N, D] in x's dtype, accumulated in float32 (float64 for float64 inputs).

    Shapes, dtypes and devices are checked; the index range of ``experts_NK`` is NOT (that would read
    device values, a host sync): an index outside [0, E) reads out of bounds.

    The Triton kernel reads only the routed experts' weights (K per token, no dense all-experts
    compute), syncs nothing with the host and allocates by input shapes only, so a CUDA graph can
    capture it. It is meant for decoding (small N): it reads an expert's weights again for every
    token routed to it, so a large batch is better served by a grouped GEMM.

    Example::

        >>> x, gate, up, down = torch.randn(3, 16), torch.randn(4, 8, 16), torch.randn(4, 8, 16), torch.randn(4, 16, 8)
        >>> experts, weights = torch.tensor([[0, 2], [1, 2], [3, 3]]), torch.rand(3, 2)
        >>> moe_experts(x, experts, weights, gate, up, down).shape
        torch.Size([3, 16])
    """
    ck.check_backend(backend)
    check_moe_experts(x_ND, experts_NK, weights_NK, gate_EID, up_EID, down_EDI, shared_h_NS, shared_down_DS,
                      shared_up_NS, shared_gate_N)
    kernel = ck.load_kernel("moe_experts_decode", backend, x_ND)
    if kernel is not None:
        return kernel(x_ND, experts_NK, weights_NK, gate_EID, up_EID, down_EDI, shared_h_NS=shared_h_NS,
                      shared_down_DS=shared_down_DS, shared_up_NS=shared_up_NS, shared_gate_N=shared_gate_N)
    return moe_experts_reference(x_ND, experts_NK, weights_NK, gate_EID, up_EID, down_EDI, shared_h_NS,
                                 shared_down_DS, shared_up_NS, shared_gate_N)
