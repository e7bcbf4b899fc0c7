"""Triton causal conv (inference path of layers.conv.ShortConv on CUDA) vs the layer's PyTorch ops.

Without CUDA the kernel runs under Triton's interpreter in float32; on a GPU the same tests add
bfloat16 and float16, and check that the layer dispatches to the kernel."""

import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first triton import of the session
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from hybridlm.layers.conv import ShortConv  # noqa: E402
from hybridlm.ops.triton.conv import causal_conv_rows  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16] if CUDA else [torch.float32]


def tolerance(dtype):
    # the layer rounds each product and partial sum to a 16-bit dtype, the kernel once
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


def layer_ops(conv: ShortConv, x: torch.Tensor, window: torch.Tensor | None) -> torch.Tensor:
    """The layer's PyTorch ops (grad mode on and a weight that needs it, so it never takes the kernel)."""
    with torch.enable_grad():
        ref = ShortConv(conv.channels, conv.kernel_size).to(x.device)
        ref.weight = torch.nn.Parameter(conv.weight.detach().clone())
        return ref(x, window).detach()


def poison_empty(monkeypatch):
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: empty(*a, **kw).fill_(float("nan")))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, T, C, KS", [(1, 1, 16, 4), (2, 2, 48, 4), (1, 63, 130, 4), (2, 65, 48, 4),
                                         (1, 130, 40, 4), (2, 5, 24, 1), (1, 70, 24, 2)], ids=str)
@pytest.mark.parametrize("with_window", [False, True], ids=["no-window", "window"])
def test_kernel_equals_the_layer(B, T, C, KS, with_window, dtype, monkeypatch):
    """Outputs and the updated window, for T below, at and past the window and the row block,
    channels not a multiple of the block, no history and a window (NaN-poisoned outputs)."""
    poison_empty(monkeypatch)
    gen = torch.Generator().manual_seed(T * 31 + C)
    conv = ShortConv(C, KS).to(DEVICE)
    x = (torch.randn(B, T, C, generator=gen) * 2).to(DEVICE, dtype)
    window = (torch.randn(B, C, KS - 1, generator=gen)).to(DEVICE, torch.float32) if with_window else None
    want_window = None if window is None else window.clone()
    want = layer_ops(conv, x, want_window)
    got = causal_conv_rows(x, conv.weight, window)
    assert got.dtype == dtype and got.is_contiguous() and not got.isnan().any()
    torch.testing.assert_close(got, want, **tolerance(dtype))
    if window is not None:
        torch.testing.assert_close(window, want_window, rtol=0, atol=0)


@pytest.mark.parametrize("block_t", [64, 2])
def test_streaming_in_pieces_equals_one_call(block_t):
    """Prefill pieces then one-token steps through the window equal one pass over the whole input;
    x is a column slice of a wider tensor (a packed projection's output), read without a copy."""
    gen = torch.Generator().manual_seed(3)
    B, T, C = 2, 100, 24
    conv = ShortConv(C, 4).to(DEVICE)
    wide = torch.randn(B, T, C + 10, generator=gen).to(DEVICE)
    x = wide[:, :, 5:5 + C]
    whole = layer_ops(conv, x.contiguous(), None)
    window = torch.zeros(B, C, 3, device=DEVICE)
    pieces, start = [], 0
    for n in (70, 1, 2, 20, 1, 1, 5):
        pieces.append(causal_conv_rows(x[:, start:start + n], conv.weight, window, block_t=block_t))
        start += n
    assert start == T
    torch.testing.assert_close(torch.cat(pieces, 1), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(window, x[:, -3:].transpose(1, 2))


@pytest.mark.parametrize("T", [2, 40])
def test_window_slice_of_a_shared_window(T):
    """Kimi's layer hands each conv a channel slice of one [B, q + k + v channels, W] window: with
    B > 1 not contiguous, but every batch row is; it is read and updated in place, in the kernel
    (T within one block of rows) or after it (T past a block), and the channels around it stay."""
    gen = torch.Generator().manual_seed(5)
    B, C = 2, 24
    conv = ShortConv(C, 4).to(DEVICE)
    x = torch.randn(B, T, C, generator=gen).to(DEVICE)
    shared = torch.randn(B, C + 16, 3, generator=gen).to(DEVICE)
    window = shared[:, 8:8 + C]
    assert not window.is_contiguous()
    before = shared.clone()
    want_window = window.clone().contiguous()
    want = layer_ops(conv, x, want_window)
    got = causal_conv_rows(x, conv.weight, window, block_t=32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(window, want_window, rtol=0, atol=0)
    torch.testing.assert_close(shared[:, :8], before[:, :8], rtol=0, atol=0)
    torch.testing.assert_close(shared[:, 8 + C:], before[:, 8 + C:], rtol=0, atol=0)


def test_bad_arguments_are_named():
    x = torch.randn(1, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        causal_conv_rows(x, torch.randn(6, 1, 4, device=DEVICE))
    with pytest.raises(ValueError, match="window_BCW"):
        causal_conv_rows(x, torch.randn(8, 1, 4, device=DEVICE), torch.zeros(1, 8, 2, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        causal_conv_rows(x, torch.randn(8, 1, 4, device=DEVICE), torch.zeros(1, 3, 8, device=DEVICE).transpose(1, 2))
    with pytest.raises(ValueError, match="1 to 4 taps"):
        causal_conv_rows(x, torch.randn(8, 1, 5, device=DEVICE))
    with pytest.raises(TypeError, match="x_BTC"):
        causal_conv_rows(x.double(), torch.randn(8, 1, 4, device=DEVICE))


@pytest.mark.skipif(not CUDA, reason="the layer takes the kernel on CUDA only")
def test_layer_uses_the_kernel_without_gradients(monkeypatch):
    from hybridlm.ops import triton as kernels

    calls = []
    real = kernels.causal_conv_rows
    monkeypatch.setattr(kernels, "causal_conv_rows", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    conv = ShortConv(64, 4).cuda()
    x = torch.randn(2, 9, 64, device="cuda", dtype=torch.bfloat16)
    window = torch.zeros(2, 64, 3, device="cuda")
    with torch.no_grad():
        y = conv(x, window)
    assert calls and y.dtype == torch.bfloat16
    conv(x.float().requires_grad_())  # a gradient needed: the PyTorch ops, which autograd goes through
    assert len(calls) == 1


@pytest.mark.parametrize("T", [1, 40])
def test_traced_streaming_step_is_one_custom_op(T):
    """Under torch.compile (fullgraph) a call with a window traces as the mutating custom op and gives
    the eager kernel's output and window (on CPU the graph runs the op eagerly: what is checked is
    that dynamo traces it, with its fake implementation)."""
    gen = torch.Generator().manual_seed(T)
    x = torch.randn(2, T, 24, generator=gen).to(DEVICE)
    w = torch.randn(24, 1, 4, generator=gen).to(DEVICE)
    start = torch.randn(2, 24, 3, generator=gen).to(DEVICE)
    win_eager, win_compiled = start.clone(), start.clone()
    want = causal_conv_rows(x, w, win_eager, block_t=16)
    backend = "inductor" if CUDA else "aot_eager"
    compiled = torch.compile(lambda x, w, win: causal_conv_rows(x, w, win, block_t=16) * 1.0,
                             fullgraph=True, backend=backend)
    got = compiled(x, w, win_compiled)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(win_compiled, win_eager, rtol=0, atol=0)


def test_custom_op_passes_opcheck():
    x = torch.randn(1, 3, 16, device=DEVICE)
    torch.library.opcheck(torch.ops.hybridlm.causal_conv_rows_.default,
                          (x, torch.randn(16, 4, device=DEVICE), torch.randn(1, 16, 3, device=DEVICE), 32))


@pytest.mark.skipif(not CUDA, reason="the layer takes the kernel on CUDA only")
def test_compiled_layer_streams_through_the_kernel():
    conv = ShortConv(64, 4).cuda().to(torch.bfloat16)
    x = torch.randn(2, 1, 64, device="cuda", dtype=torch.bfloat16)
    win_eager = torch.randn(2, 64, 3, device="cuda", dtype=torch.bfloat16)
    win_compiled = win_eager.clone()
    with torch.no_grad():
        want = conv(x, win_eager)
        got = torch.compile(conv, fullgraph=True)(x, win_compiled)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(win_compiled, win_eager, rtol=0, atol=0)
