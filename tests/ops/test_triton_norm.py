"""Triton RMSNorm (inference path of layers.norms.RMSNorm on CUDA) vs the layer's PyTorch ops.

Without CUDA the kernel runs under Triton's interpreter in float32; on a GPU the same tests add
bfloat16 and float16, and check that the layer dispatches to the kernel."""

import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first triton import of the session
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from hybridlm.layers.norms import GatedRMSNorm, RMSNorm  # noqa: E402
from hybridlm.ops.triton.norm import add_rms_norm_rows, rms_norm_rows  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16] if CUDA else [torch.float32]


def reference(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """The layer's PyTorch ops (grad mode on, so the layer never takes the kernel)."""
    with torch.enable_grad():
        w = norm.weight.detach().requires_grad_()
        ref = RMSNorm(x.shape[-1], norm.eps, norm.zero_centered).to(x.device)
        ref.weight = torch.nn.Parameter(w)
        return ref(x).detach()


def poison_new_tensors(monkeypatch) -> None:
    """torch.empty_like returns NaN-filled tensors, so an output element a kernel skips shows."""
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: empty_like(*a, **kw).fill_(float("nan")))


def random_norm(dim: int, zero_centered: bool, gen: torch.Generator) -> RMSNorm:
    norm = RMSNorm(dim, eps=1e-6, zero_centered=zero_centered).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim, generator=gen) * 0.5)
    return norm


TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
       torch.float16: dict(rtol=1e-2, atol=1e-2)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("zero_centered", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 16), (3, 7, 48), (2, 5, 130), (37, 2048)], ids=str)
def test_kernel_equals_the_layer(shape, zero_centered, dtype, monkeypatch):
    poison_new_tensors(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 3).to(DEVICE, dtype)
    norm = random_norm(shape[-1], zero_centered, gen)
    got = rms_norm_rows(x, norm.weight, norm.eps, zero_centered)
    want = reference(norm, x)
    assert got.dtype == x.dtype and not got.isnan().any()
    tol = TOL[dtype]
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gate", ["silu", "sigmoid"])
def test_gated_kernel_equals_the_gated_layer(gate, dtype, monkeypatch):
    poison_new_tensors(monkeypatch)
    gen = torch.Generator().manual_seed(1)
    o = (torch.randn(2, 9, 3, 48, generator=gen) * 2).to(DEVICE, dtype)
    z = (torch.randn(2, 9, 3, 48, generator=gen) * 3).to(DEVICE, dtype)
    norm = GatedRMSNorm(48, gate=gate).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48, generator=gen))
    with torch.enable_grad():  # the layer's PyTorch ops
        want = norm(o.requires_grad_(), z).detach()
    got = rms_norm_rows(o.detach(), norm.weight, norm.eps, z=z, gate=gate)
    assert got.dtype == o.dtype and not got.isnan().any()
    tol = TOL[dtype]
    torch.testing.assert_close(got, want, **tol)
    with pytest.raises(ValueError, match="z and gate go together"):
        rms_norm_rows(o.detach(), norm.weight, norm.eps, z=z)
    with pytest.raises(ValueError, match="z must have x's shape"):
        rms_norm_rows(o.detach(), norm.weight, norm.eps, z=z[:, :4], gate=gate)
    with pytest.raises(ValueError, match="gate must be"):
        rms_norm_rows(o.detach(), norm.weight, norm.eps, z=z, gate="relu")


def test_non_contiguous_rows_and_bad_weight():
    x = torch.randn(6, 40, device=DEVICE)[:, :32]  # rows 40 apart
    w = torch.randn(32, device=DEVICE)
    norm = RMSNorm(32).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(w)
    torch.testing.assert_close(rms_norm_rows(x, w, 1e-6), reference(norm, x.contiguous()), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm_rows(x, torch.ones(31, device=DEVICE), 1e-6)
    with pytest.raises(TypeError, match="x must be"):
        rms_norm_rows(x.double(), w, 1e-6)


@pytest.mark.skipif(not CUDA, reason="the layer dispatches to the kernel on CUDA tensors only")
def test_layer_uses_the_kernel_without_gradients(monkeypatch):
    from hybridlm.ops import triton as kernels

    calls = []
    real = kernels.rms_norm_rows
    monkeypatch.setattr(kernels, "rms_norm_rows", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    norm = RMSNorm(64, zero_centered=True).cuda()
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y = norm(x)
    assert calls and y.dtype == torch.bfloat16
    norm(x.float().requires_grad_())  # a gradient needed: the PyTorch ops, which autograd goes through
    assert len(calls) == 1
    gated = GatedRMSNorm(64).cuda()
    with torch.no_grad():
        gated(x, x)
    assert len(calls) == 2


@pytest.mark.parametrize("shape", [(2, 1, 3, 48), (1, 1, 4, 16), (3, 2, 1, 40)], ids=str)
def test_gated_z_as_a_column_slice_is_read_in_place(shape):
    """z sliced from a wider [..., tokens, columns] projection output (Gated DeltaNet's z beside q, k, v)
    is read where it lies, with what a contiguous copy gives; a z whose leading dims do not collapse
    is copied."""
    from hybridlm.ops.triton.norm import _z_rows

    B, T, H, D = shape
    gen = torch.Generator().manual_seed(sum(shape))
    o = torch.randn(B, T, H, D, generator=gen).to(DEVICE)
    wide = torch.randn(B, T, H * D + 24, generator=gen).to(DEVICE)
    z = wide[..., 8:8 + H * D].reshape(B, T, H, D)
    w = torch.randn(D, generator=gen).to(DEVICE)
    assert _z_rows(z)[0] is z and _z_rows(z)[1:] == (H, wide.shape[-1] if B * T > 1 else H * D)
    got = rms_norm_rows(o, w, 1e-6, z=z, gate="silu")
    want = rms_norm_rows(o, w, 1e-6, z=z.contiguous(), gate="silu")
    # within an ulp, not bit for bit: compiled for a GPU, the kernel specialises on whether z's row
    # stride divides by 16 (64 here against the copy's 40), and the two builds differ by one float32
    # ulp in a few elements (H200, Triton 3.6); the interpreter matches exactly
    exact = dict(rtol=0, atol=0) if DEVICE == "cpu" else dict(rtol=4e-7, atol=4e-7)
    torch.testing.assert_close(got, want, **exact)
    z_t = z.transpose(0, 1)  # [T, B, H, D]: B and T no longer collapse to one stride when both > 1
    got_t = rms_norm_rows(o.transpose(0, 1), w, 1e-6, z=z_t, gate="silu")
    torch.testing.assert_close(got_t, want.transpose(0, 1), **exact)


def test_gated_norm_custom_op_under_compile():
    """Traced, the gated norm is one custom op (``hybridlm::gated_rms_norm_rows``); the compiled
    function equals eager, z sliced inside it."""
    torch.library.opcheck(torch.ops.hybridlm.gated_rms_norm_rows.default,
                          (torch.randn(2, 3, 16, device=DEVICE), torch.randn(16, device=DEVICE), 1e-6, False,
                           torch.randn(2, 3, 16, device=DEVICE), 1))
    gen = torch.Generator().manual_seed(5)
    o = torch.randn(2, 1, 3, 32, generator=gen).to(DEVICE)
    wide = torch.randn(2, 1, 3 * 32 + 16, generator=gen).to(DEVICE)
    w = torch.randn(32, generator=gen).to(DEVICE)

    for zero_centered in (False, True):
        def norm(o, wide):
            z = wide[..., 16:].reshape(2, 1, 3, 32)
            return rms_norm_rows(o, w, 1e-6, zero_centered, z=z, gate="silu") * 2.0

        backend = "inductor" if CUDA else "aot_eager"
        torch.compiler.reset()
        torch.testing.assert_close(torch.compile(norm, fullgraph=True, backend=backend)(o, wide), norm(o, wide))
    torch.testing.assert_close(rms_norm_rows(o, w, 1e-6, True, z=o, gate="silu"),
                               rms_norm_rows(o, 1.0 + w, 1e-6, z=o, gate="silu"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("zero_centered", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 16), (3, 7, 48), (2, 1, 130), (37, 2048)], ids=str)
def test_add_norm_equals_the_add_and_the_layer(shape, zero_centered, dtype, monkeypatch):
    """s = x + y exactly as PyTorch rounds it, and the layer's norm of s; NaN-poisoned outputs."""
    poison_new_tensors(monkeypatch)
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(shape, generator=gen) * 3).to(DEVICE, dtype)
    y = (torch.randn(shape, generator=gen) * 2).to(DEVICE, dtype)
    norm = random_norm(shape[-1], zero_centered, gen)
    s, h = add_rms_norm_rows(x, y, norm.weight, norm.eps, zero_centered)
    assert s.dtype == h.dtype == dtype and not s.isnan().any() and not h.isnan().any()
    torch.testing.assert_close(s, x + y, rtol=0, atol=0)
    tol = TOL[dtype]
    torch.testing.assert_close(h, reference(norm, x + y), **tol)
    with torch.no_grad():  # the layer's method: the kernel on CUDA, the add and forward elsewhere
        s2, h2 = norm.add(x, y)
    torch.testing.assert_close(s2, s, rtol=0, atol=0)
    torch.testing.assert_close(h2, h, **tol)


def test_add_norm_bad_input_and_compile():
    x = torch.randn(2, 16, device=DEVICE)
    w = torch.randn(16, device=DEVICE)
    with pytest.raises(ValueError, match="y must have x's shape"):
        add_rms_norm_rows(x, x[:, :8], w, 1e-6)
    with pytest.raises(ValueError, match="y must have x's shape .* and dtype"):
        add_rms_norm_rows(x, x.half(), w, 1e-6)
    with pytest.raises(ValueError, match="weight must have shape"):
        add_rms_norm_rows(x, x, w[:8], 1e-6)
    torch.library.opcheck(torch.ops.hybridlm.add_rms_norm_rows.default, (x, torch.randn(2, 16, device=DEVICE), w,
                                                                          1e-6, True))

    def step(x, y):
        s, h = add_rms_norm_rows(x, y, w, 1e-6, True)
        return s * 2.0, h + 1.0

    backend = "inductor" if CUDA else "aot_eager"
    torch.compiler.reset()
    y = torch.randn(2, 16, device=DEVICE)
    got, want = torch.compile(step, fullgraph=True, backend=backend)(x, y), step(x, y)
    torch.testing.assert_close(got, want)
