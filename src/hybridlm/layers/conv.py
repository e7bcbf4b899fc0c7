"""Depthwise causal conv1d + SiLU (the short conv of Gated DeltaNet), full and streaming.

Streaming keeps the last ``kernel_size - 1`` inputs of each channel as a window ``[B, C, W]``:
a call prepends the window to its inputs, convolves without padding and keeps the new last
``W`` inputs. Prefill and one-token decode are the same code, so they cannot drift apart.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from hybridlm.ops._checks import inference_kernel


class ShortConv(nn.Module):
    """Depthwise causal convolution of width ``kernel_size`` followed by SiLU.

    Args:
        channels: C, the number of channels (each has its own filter).
        kernel_size: filter width (>= 1).

    Example::

        conv = ShortConv(8, 4)
        y = conv(torch.randn(2, 10, 8))                   # [2, 10, 8], zero history
        window = torch.zeros(2, 8, 3)
        y1 = conv(torch.randn(2, 6, 8), window)           # window now holds inputs 3..5
    """

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size: expected >= 1, got {kernel_size}")
        self.channels = channels
        self.kernel_size = kernel_size
        # Same layout as nn.Conv1d(groups=C), so checkpoints map one to one.
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = self.kernel_size ** -0.5  # nn.Conv1d's default for fan_in = kernel_size
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x_BTC: torch.Tensor, window_BCW: torch.Tensor | None = None) -> torch.Tensor:
        """Convolve x causally; with a window, continue from it and update it in place.

        Args:
            x_BTC: [B, T, C] float inputs.
            window_BCW: optional [B, C, kernel_size - 1] (any float dtype), the inputs before x;
                None means zero history and nothing is kept.
        Returns:
            [B, T, C] in x's dtype.

        On CUDA, with no gradient needed, one Triton pass (``ops.triton.causal_conv_rows``, float32
        sums, one rounding) replaces the transpose, concatenation, products and sums below; under
        torch.compile only with a window (the decode step, as a custom op), since inductor fuses
        the ops of a windowless prefill itself.
        """
        # the kernel keeps at most 4 taps (ops.triton.conv.MAX_TAPS); traced, it runs only as the
        # streaming step (a custom op updating the window), where inductor's code for the ops below
        # was several small kernels a layer
        kernel = inference_kernel("causal_conv_rows", x_BTC, self.weight,
                                  traced=window_BCW is not None) if self.kernel_size <= 4 else None
        if kernel is not None and (window_BCW is None or _window_fits(window_BCW)):
            return kernel(x_BTC, self.weight, window_BCW)
        width = self.kernel_size - 1
        x_BCT = x_BTC.transpose(1, 2)
        if window_BCW is None:
            x_ext = F.pad(x_BCT, (width, 0))
        else:
            x_ext = torch.cat([window_BCW.to(x_BCT.dtype), x_BCT], dim=2)
            if width:
                window_BCW.copy_(x_ext[:, :, -width:])
        # A sum over the few taps instead of F.conv1d(groups=C): same result, and much faster on
        # CPU, where grouped conv1d of short inputs takes a slow generic path.
        T, w_CK = x_BCT.shape[2], self.weight[:, 0].to(x_BCT.dtype)
        y_BCT = sum(x_ext[:, :, j:j + T] * w_CK[:, j:j + 1] for j in range(self.kernel_size))
        return F.silu(y_BCT).transpose(1, 2)


def _window_fits(window_BCW: torch.Tensor) -> bool:
    from hybridlm.ops.triton.conv import window_fits  # imports Triton: only on the CUDA path

    return window_fits(window_BCW)
