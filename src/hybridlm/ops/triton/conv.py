"""Depthwise causal conv1d + SiLU (Gated DeltaNet's short conv) as one Triton pass over [B, T, C]
(inference on the GPU).

``layers.conv.ShortConv`` transposes its input to [B, C, T], concatenates the streaming window in
front, and sums ``kernel_size`` shifted products before the SiLU: in the 4-layer H200 trace of a
4k prefill at Qwen3-Next's size (C = 8,192), its concatenation alone took 134 us a call and its
strided products and sums most of the 1.4 ms of non-vectorised elementwise kernels, for a read and
a write of 33 MB (~16 us at the card's copy rate). This kernel reads the rows where they lie (any
row stride, so the slice of a packed projection's output needs no copy), takes rows before the
chunk from the window, sums the taps in float32 and writes [B, T, C] once.

The layer rounds every product and partial sum to x's dtype; this kernel rounds once, at the end.
In float32 the two agree to rounding; in 16-bit dtypes the kernel is the more exact one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def causal_conv_kernel(x_ptr, w_ptr, win_ptr, y_ptr, T, C, stride_xb, stride_xt,
                       KS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BW: tl.constexpr,
                       HAS_WINDOW: tl.constexpr, UPDATE: tl.constexpr):
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    W: tl.constexpr = KS - 1
    o_t = i_t * BT + tl.arange(0, BT)
    o_c = i_c * BC + tl.arange(0, BC)
    m_t, m_c = o_t < T, o_c < C
    x_b = x_ptr + i_b.to(tl.int64) * stride_xb
    win_b = win_ptr + i_b.to(tl.int64) * C * W     # the window is contiguous [B, C, W]
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(KS):
        src = o_t - W + j                           # input row of tap j; < 0: from the window
        m = ((src >= 0) & m_t)[:, None] & m_c[None, :]
        xv = tl.load(x_b + src[:, None].to(tl.int64) * stride_xt + o_c[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_WINDOW:
            m_w = ((src < 0) & m_t)[:, None] & m_c[None, :]
            wv = tl.load(win_b + o_c[None, :] * W + (W + src)[:, None], mask=m_w, other=0.0)
            xv += wv.to(x_ptr.dtype.element_ty).to(tl.float32)   # the layer casts the window to x's dtype
        w_j = tl.load(w_ptr + o_c * KS + j, mask=m_c, other=0.0).to(x_ptr.dtype.element_ty).to(tl.float32)
        acc += xv * w_j[None, :]
    y = acc * tl.sigmoid(acc)
    p_y = (i_b.to(tl.int64) * T + o_t[:, None]) * C + o_c[None, :]
    tl.store(y_ptr + p_y, y.to(y_ptr.dtype.element_ty), mask=m_t[:, None] & m_c[None, :])
    if UPDATE:
        # one program holds all T rows of its channels: the new window is the last W rows of
        # [window, x], window[w] <- x[T - W + w], or the old window[T + w] where that is < 0
        o_w = tl.arange(0, BW)
        src = T - W + o_w
        m_x = ((o_w < W) & (src >= 0))[None, :] & m_c[:, None]
        m_o = ((o_w < W) & (src < 0))[None, :] & m_c[:, None]
        nv = tl.load(x_b + src[None, :].to(tl.int64) * stride_xt + o_c[:, None], mask=m_x, other=0.0).to(tl.float32)
        old = tl.load(win_b + o_c[:, None] * W + (T + o_w)[None, :], mask=m_o, other=0.0)
        nv += old.to(x_ptr.dtype.element_ty).to(tl.float32)    # through x's dtype, as the layer's
        tl.debug_barrier()  # every thread has read the old window before any writes it
        tl.store(win_b + o_c[:, None] * W + o_w[None, :], nv.to(win_ptr.dtype.element_ty),
                 mask=(o_w < W)[None, :] & m_c[:, None])


def causal_conv_rows(x_BTC: torch.Tensor, weight: torch.Tensor, window_BCW: torch.Tensor | None = None,
                     block_t: int = 64) -> torch.Tensor:
    """silu(depthwise causal conv of x over T) in x's dtype; with a window, continue from it and
    update it in place (``layers.conv.ShortConv.forward``'s contract).

    Args:
        x_BTC: [B, T, C] float32, bfloat16 or float16, channels contiguous (any row stride).
        weight: [C, 1, KS] or [C, KS] filters (nn.Conv1d's depthwise layout).
        window_BCW: optional contiguous [B, C, KS - 1], any float dtype: the inputs before x
            (None: zero history, nothing kept). Afterwards it holds the last KS - 1 inputs.
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
    W = KS - 1
    if window_BCW is not None and tuple(window_BCW.shape) != (B, C, W):
        raise ValueError(f"window_BCW must have shape {(B, C, W)}, got {tuple(window_BCW.shape)}")
    if window_BCW is not None and not window_BCW.is_contiguous():
        raise ValueError("window_BCW must be contiguous (it is updated in place)")
    if x_BTC.stride(2) != 1:
        x_BTC = x_BTC.contiguous()
    y = torch.empty(B, T, C, device=x_BTC.device, dtype=x_BTC.dtype)
    if B == 0 or T == 0 or C == 0:
        return y
    has_window = window_BCW is not None and W > 0
    BT = min(block_t, triton.next_power_of_2(T))
    BC = max(16, min(128, 8192 // BT, triton.next_power_of_2(C)))
    update = has_window and T <= BT          # one program covers every row of its channels
    win = window_BCW if has_window else y    # not read without a window
    causal_conv_kernel[(triton.cdiv(T, BT), triton.cdiv(C, BC), B)](
        x_BTC, w.contiguous(), win, y, T, C, x_BTC.stride(0), x_BTC.stride(1),
        KS=KS, BT=BT, BC=BC, BW=max(2, triton.next_power_of_2(max(W, 1))), HAS_WINDOW=has_window, UPDATE=update,
        num_warps=4)
    if has_window and not update:            # after the kernel (same stream): the last W rows of [window, x]
        if T >= W:
            window_BCW.copy_(x_BTC[:, T - W:].transpose(1, 2))
        else:
            window_BCW.copy_(torch.cat([window_BCW[:, :, T:].to(x_BTC.dtype), x_BTC.transpose(1, 2)], 2))
    return y
