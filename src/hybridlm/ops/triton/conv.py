"""Depthwise causal conv1d + SiLU (Gated DeltaNet's short conv) as one Triton pass over [B, T, C]
(inference on the GPU).

``layers.conv.ShortConv`` transposes its input to [B, C, T], concatenates the streaming window in
front, and sums ``kernel_size`` shifted products before the SiLU: in the 4-layer H200 trace of a
4k prefill at Qwen3-Next's size (C = 8,192), its concatenation alone took 134 us a call and its
strided products and sums most of the 1.4 ms of non-vectorised elementwise kernels, for a read and
a write of 33 MB (~16 us at the card's copy rate). This kernel streams each program's rows once, in
order, where they lie (any row stride, so the slice of a packed projection's output needs no copy),
keeps the three inputs before the current row in registers (taken from the window before the
first row), sums the taps in float32 and writes [B, T, C] once. A first version that loaded a
[rows, channels] tile per tap compiled (offline, sm_90, Triton 3.6) to 250+ registers or a 6 KB
spill stack per thread; this one takes 32 registers and no stack.

The layer rounds every product and partial sum to x's dtype; this kernel rounds once, at the end.
In float32 the two agree to rounding; in 16-bit dtypes the kernel is the more exact one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybridlm.ops.triton.utils import cdiv, next_power_of_2, pdl_launch, pdl_start

MAX_TAPS = 4  # the kernel keeps the three inputs before the current row in registers


@triton.jit
def _row(x_b, win_b, src, o_c, m_c, stride_xt, W: tl.constexpr, HAS_WINDOW: tl.constexpr, XT: tl.constexpr):
    """Input row ``src`` of [window, x] for channels o_c, float32 (through x's dtype): x's row when
    src >= 0, the window's column W + src when -W <= src < 0, else 0."""
    src_c = src + 0 * o_c    # per channel: the interpreter takes no scalar & vector masks
    v = tl.load(x_b + src.to(tl.int64) * stride_xt + o_c, mask=m_c & (src_c >= 0), other=0.0).to(tl.float32)
    if HAS_WINDOW:
        old = tl.load(win_b + o_c * W + (W + src_c), mask=m_c & (src_c < 0) & (W + src_c >= 0), other=0.0)
        v += old.to(XT).to(tl.float32)    # the layer casts the window to x's dtype
    return v


@triton.jit
def causal_conv_kernel(x_ptr, w_ptr, win_ptr, y_ptr, T, C, stride_xb, stride_xt, stride_wb, BT,
                       KS: tl.constexpr, BC: tl.constexpr, HAS_WINDOW: tl.constexpr, UPDATE: tl.constexpr,
                       USE_PDL: tl.constexpr):
    """Rows t0 .. t0 + BT - 1 of BC channels, one row after another: the three inputs before the
    current row stay in registers (filters of up to 4 taps; a shorter one is padded with leading
    zero taps), so each input row is read once and a thread only touches its own channels."""
    pdl_start(USE_PDL)
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    W: tl.constexpr = KS - 1
    XT = x_ptr.dtype.element_ty
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    x_b = x_ptr + i_b.to(tl.int64) * stride_xb
    win_b = win_ptr + i_b.to(tl.int64) * stride_wb  # each row of the window: contiguous [C, W]
    y_b = y_ptr + i_b.to(tl.int64) * T * C
    # taps of x_{t-3}, x_{t-2}, x_{t-1}, x_t (in x's dtype, as the layer multiplies); a filter of
    # fewer than 4 taps gets leading zero taps
    w3 = tl.zeros([BC], dtype=tl.float32)
    w2 = tl.zeros([BC], dtype=tl.float32)
    w1 = tl.zeros([BC], dtype=tl.float32)
    if KS >= 4:
        w3 = tl.load(w_ptr + o_c * KS + (KS - 4), mask=m_c, other=0.0).to(XT).to(tl.float32)
    if KS >= 3:
        w2 = tl.load(w_ptr + o_c * KS + (KS - 3), mask=m_c, other=0.0).to(XT).to(tl.float32)
    if KS >= 2:
        w1 = tl.load(w_ptr + o_c * KS + (KS - 2), mask=m_c, other=0.0).to(XT).to(tl.float32)
    w0 = tl.load(w_ptr + o_c * KS + (KS - 1), mask=m_c, other=0.0).to(XT).to(tl.float32)
    t0 = i_t * BT
    p3 = _row(x_b, win_b, t0 - 3, o_c, m_c, stride_xt, W, HAS_WINDOW, XT)
    p2 = _row(x_b, win_b, t0 - 2, o_c, m_c, stride_xt, W, HAS_WINDOW, XT)
    p1 = _row(x_b, win_b, t0 - 1, o_c, m_c, stride_xt, W, HAS_WINDOW, XT)
    p_x = x_b + t0.to(tl.int64) * stride_xt + o_c   # advanced a row at a time: no int32 overflow
    p_y = y_b + t0.to(tl.int64) * C + o_c
    for _ in range(0, tl.minimum(BT, T - t0)):
        cur = tl.load(p_x, mask=m_c, other=0.0).to(tl.float32)
        acc = w3 * p3 + w2 * p2 + w1 * p1 + w0 * cur
        tl.store(p_y, (acc * tl.sigmoid(acc)).to(y_ptr.dtype.element_ty), mask=m_c)
        p3, p2, p1 = p2, p1, cur
        p_x += stride_xt
        p_y += C
    if UPDATE:
        # one program covers all T rows of its channels, and p1, p2, p3 now hold the last three
        # inputs of [window, x]: the new window. With fewer channels than threads a channel has
        # several threads; the barrier keeps one's store from reaching another's load of the old one
        tl.debug_barrier()
        WT = win_ptr.dtype.element_ty
        tl.store(win_b + o_c * W + (W - 1), p1.to(WT), mask=m_c)
        if W >= 2:
            tl.store(win_b + o_c * W + (W - 2), p2.to(WT), mask=m_c)
        if W >= 3:
            tl.store(win_b + o_c * W + (W - 3), p3.to(WT), mask=m_c)


def window_fits(window_BCW: torch.Tensor) -> bool:
    """Whether the kernel can read and update this [B, C, W] window in place: every batch row a
    contiguous [C, W] (any batch stride)."""
    _, C, W = window_BCW.shape
    if W == 0 or C == 0:
        return True  # nothing to read or write
    return (W == 1 or window_BCW.stride(2) == 1) and (C == 1 or window_BCW.stride(1) == W)


def causal_conv_rows(x_BTC: torch.Tensor, weight: torch.Tensor, window_BCW: torch.Tensor | None = None,
                     block_t: int = 32) -> torch.Tensor:
    """silu(depthwise causal conv of x over T) in x's dtype; with a window, continue from it and
    update it in place (``layers.conv.ShortConv.forward``'s contract).

    Args:
        x_BTC: [B, T, C] float32, bfloat16 or float16, channels contiguous (any row stride).
        weight: [C, 1, KS] or [C, KS] filters (nn.Conv1d's depthwise layout), KS from 1 to 4.
        window_BCW: optional [B, C, KS - 1], any float dtype, each batch row a contiguous [C, KS - 1]
            (``window_fits``; Kimi's layer passes channel slices of one window): the inputs
            before x (None: zero history, nothing kept). Afterwards it holds the last KS - 1 inputs.
        block_t: rows per program.
    Returns:
        a new contiguous [B, T, C] tensor. No gradient: the layer runs this only when none is needed.
    """
    if x_BTC.dim() != 3:
        raise ValueError(f"x_BTC must be [B, T, C], got shape {tuple(x_BTC.shape)}")
    if x_BTC.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"x_BTC must be float32, bfloat16 or float16 for the Triton kernel, got {x_BTC.dtype}")
    B, T, C = x_BTC.shape
    w = weight.reshape(weight.shape[0], -1) if weight.dim() == 3 else weight
    if w.dim() != 2 or w.shape[0] != C or (weight.dim() == 3 and weight.shape[1] != 1):
        raise ValueError(f"weight must be [C, 1, KS] or [C, KS] with C = {C}, got {tuple(weight.shape)}")
    KS = w.shape[1]
    if not 1 <= KS <= MAX_TAPS:
        raise ValueError(f"weight: the kernel takes filters of 1 to {MAX_TAPS} taps, got {KS}")
    W = KS - 1
    if window_BCW is not None and tuple(window_BCW.shape) != (B, C, W):
        raise ValueError(f"window_BCW must have shape {(B, C, W)}, got {tuple(window_BCW.shape)}")
    if window_BCW is not None and not window_fits(window_BCW):
        raise ValueError("window_BCW: each batch row must be a contiguous [C, KS - 1] (it is updated in place), "
                         f"got strides {window_BCW.stride()}")
    if x_BTC.stride(2) != 1:
        x_BTC = x_BTC.contiguous()
    w = w.contiguous()
    if torch.compiler.is_compiling() and window_BCW is not None:
        # traced (the compiled decode step): one opaque kernel for the conv, SiLU and the window's
        # update, where inductor's own code for the layer's ops was several kernels a layer
        return _conv_update_op(x_BTC, w, window_BCW, block_t)
    return _conv_into(x_BTC, w, window_BCW, block_t)


def _conv_into(x_BTC: torch.Tensor, w: torch.Tensor, window_BCW: torch.Tensor | None, block_t: int) -> torch.Tensor:
    """Launch on validated arguments (x's channels contiguous, w a contiguous [C, KS])."""
    B, T, C = x_BTC.shape
    KS = w.shape[1]
    W = KS - 1
    y = torch.empty(B, T, C, device=x_BTC.device, dtype=x_BTC.dtype)
    if B == 0 or T == 0 or C == 0:
        return y
    has_window = window_BCW is not None and W > 0
    BT = max(1, min(block_t, T))
    BC = max(32, min(256, next_power_of_2(C)))
    update = has_window and T <= BT          # one program covers every row of its channels
    win = window_BCW if has_window else y    # not read without a window
    causal_conv_kernel[(cdiv(T, BT), cdiv(C, BC), B)](
        x_BTC, w, win, y, T, C, x_BTC.stride(0), x_BTC.stride(1), win.stride(0), BT,
        KS=KS, BC=BC, HAS_WINDOW=has_window, UPDATE=update, num_warps=4, **pdl_launch(x_BTC.device, "conv"))
    if has_window and not update:            # after the kernel (same stream): the last W rows of [window, x]
        if T >= W:
            window_BCW.copy_(x_BTC[:, T - W:].transpose(1, 2))
        else:
            window_BCW.copy_(torch.cat([window_BCW[:, :, T:].to(x_BTC.dtype), x_BTC.transpose(1, 2)], 2))
    return y


@torch.library.custom_op("hybridlm::causal_conv_rows_", mutates_args=("window_BCW",))
def _conv_update_op(x_BTC: torch.Tensor, w: torch.Tensor, window_BCW: torch.Tensor, block_t: int) -> torch.Tensor:
    return _conv_into(x_BTC, w, window_BCW, block_t)


@_conv_update_op.register_fake
def _(x_BTC, w, window_BCW, block_t):
    return x_BTC.new_empty(x_BTC.shape)
