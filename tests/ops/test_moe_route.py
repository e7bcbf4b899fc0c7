"""Top-k routing: the Triton kernel against the reference (a stable sort of all scores), and the MoE
layer's decode step with the kernel against the layer's own routing.

Legend: N tokens, E experts, K experts per token.
Without CUDA the kernel runs under Triton's interpreter (float32, small shapes).
"""

import doctest
import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first import of the kernel module: @triton.jit picks interpreter or compiler
    # when the kernel is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hybridlm.ops import moe_route  # noqa: E402
from hybridlm.ops.moe_route import route_reference  # noqa: E402
from hybridlm.ops.triton.moe_route import moe_route as moe_route_kernel  # noqa: E402
from hybridlm.ops.triton.moe_route import moe_route_into  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def logits(N, E, seed, dtype=torch.float32, spread=3.0):
    gen = torch.Generator().manual_seed(seed)
    return (spread * torch.randn(N, E, generator=gen)).to(DEVICE, dtype)


def reference(x, K, router, norm, scaling=1.0, bias=None):
    w, e = route_reference(x, K, router, norm, bias)
    return w * scaling, e


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("N, E, K", [(1, 1, 1), (3, 7, 2), (2, 32, 10), (65, 32, 8), (2, 512, 10), (1, 1000, 3)])
def test_kernel_matches_the_reference(N, E, K, router, norm, dtype):
    x = logits(N, E, seed=N * E + K, dtype=dtype)
    w, e = moe_route(x, K, router, norm, scaling=2.5, backend="triton")
    w_ref, e_ref = reference(x, K, router, norm, 2.5)
    assert e.dtype == torch.int64 and w.dtype == torch.float32 and e.shape == w.shape == (N, K)
    assert torch.equal(e, e_ref), "experts (and their order) must equal the stable sort's"
    torch.testing.assert_close(w, w_ref, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_bias_chooses_and_the_scores_weigh(router):
    N, E, K = 5, 24, 4
    x = logits(N, E, seed=4)
    bias = torch.linspace(-0.5, 0.5, E).to(DEVICE)
    w, e = moe_route(x, K, router, True, score_bias_E=bias, backend="triton")
    w_ref, e_ref = reference(x, K, router, True, bias=bias)
    assert torch.equal(e, e_ref)
    torch.testing.assert_close(w, w_ref, rtol=2e-6, atol=1e-7)
    _, e_plain = moe_route(x, K, router, True, backend="triton")
    assert not torch.equal(e, e_plain)  # the bias moved a choice (else this test checks nothing)


def test_ties_go_to_the_lower_index():
    # rows of equal logits and repeated values: the stable descending sort keeps index order
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                      [0.0, 2.0, 1.0, 2.0, 2.0, 1.0],
                      [-3.0, -1.0, -1.0, -2.0, -1.0, -3.0]], device=DEVICE)
    for router in ("softmax", "sigmoid"):
        for K in (1, 3, 6):
            w, e = moe_route(x, K, router, False, backend="triton")
            w_ref, e_ref = reference(x, K, router, False)
            assert torch.equal(e, e_ref), (router, K, e.tolist(), e_ref.tolist())
            torch.testing.assert_close(w, w_ref, rtol=2e-6, atol=1e-7)
    # negative selection scores (a bias below the scores) order as floats do, ties to the lower index
    bias = torch.tensor([-2.0, -1.0, -3.0, -1.0, -2.0, -4.0], device=DEVICE)
    w, e = moe_route(x, 6, "sigmoid", True, score_bias_E=bias, backend="triton")
    assert e[0].tolist() == [1, 3, 0, 4, 2, 5]
    assert torch.equal(e, reference(x, 6, "sigmoid", True, bias=bias)[1])


def test_strided_logits_are_read_in_place():
    """The router's columns of a packed projection output (a wider row): the same result as a copy."""
    wide = logits(4, 40, seed=7)
    x = wide[:, 5:37]
    assert not x.is_contiguous()
    w, e = moe_route(x, 6, "softmax", True, backend="triton")
    w_c, e_c = moe_route(x.contiguous(), 6, "softmax", True, backend="triton")
    assert torch.equal(e, e_c) and torch.equal(w, w_c)
    cols = logits(3, 16, seed=8).t()  # a column stride != 1: copied
    w, e = moe_route(cols, 2, "sigmoid", False, backend="triton")
    assert torch.equal(e, reference(cols, 2, "sigmoid", False)[1])


@pytest.mark.parametrize("N, E, K", [(1, 1, 1), (65, 32, 10), (3, 1000, 7)])
def test_every_slot_is_written(N, E, K):
    """Outputs poisoned with NaN and -1 before the launch: every one of the N x K slots is overwritten."""
    x = logits(N, E, seed=9)
    w = torch.full((N, K), float("nan"), device=DEVICE)
    e = torch.full((N, K), -1, dtype=torch.int64, device=DEVICE)
    moe_route_into(x, K, "softmax", True, 1.0, None, w, e)
    w_ref, e_ref = reference(x, K, "softmax", True)
    assert torch.equal(e, e_ref)
    torch.testing.assert_close(w, w_ref, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(w.sum(1), torch.ones(N, device=DEVICE), rtol=1e-6, atol=1e-6)


def test_empty_batch():
    w, e = moe_route(logits(0, 8, seed=1), 2, backend="triton")
    assert w.shape == e.shape == (0, 2)


def test_dispatch_backends(monkeypatch):
    x = logits(3, 16, seed=10)
    w_ref, e_ref = moe_route(x, 4, "softmax", True, scaling=2.0, backend="reference")
    torch.testing.assert_close(w_ref, reference(x, 4, "softmax", True, 2.0)[0], rtol=0, atol=0)
    w, e = moe_route(x, 4, "softmax", True, scaling=2.0)  # auto
    assert torch.equal(e, e_ref)
    if DEVICE == "cpu":
        assert torch.equal(w, w_ref)  # auto takes the reference on CPU tensors
    w64, e64 = moe_route(x.double(), 4, "softmax", True)  # auto: the reference for float64, even on CUDA
    assert w64.dtype == torch.float64 and torch.equal(e64, e_ref)
    with pytest.raises(TypeError, match="float64"):
        moe_route(x.double(), 4, backend="triton")
    grouped = dict(n_group=4, topk_group=2)
    _, e_g = moe_route(x, 4, "sigmoid", True, **grouped)  # auto: grouped routing takes the reference
    assert torch.equal(e_g, route_reference(x, 4, "sigmoid", True, None, **grouped)[1])
    with pytest.raises(ValueError, match="n_group = 1"):
        moe_route(x, 4, "sigmoid", True, backend="triton", **grouped)
    if DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(RuntimeError, match="not on a CUDA device"):
            moe_route(x, 4, backend="triton")


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(top_k=0), ValueError, r"top_k must be in \[1, E\] = \[1, 8\]"),
    (dict(top_k=9), ValueError, r"top_k must be in \[1, E\]"),
    (dict(top_k=2.0), TypeError, "top_k must be an int"),
    (dict(router="relu"), ValueError, "router must be one of"),
    (dict(norm_topk_prob=1), TypeError, "norm_topk_prob must be a bool"),
    (dict(scaling=float("inf")), ValueError, "scaling must be a finite float"),
    (dict(score_bias_E=torch.zeros(7)), ValueError, r"score_bias_E must be \[E\] = \(8,\)"),
    (dict(score_bias_E=torch.zeros(8, dtype=torch.long)), TypeError, "score_bias_E must have a floating"),
    (dict(n_group=3), ValueError, "n_group must divide E = 8"),
    (dict(n_group=2, topk_group=3), ValueError, "topk_group must be at most n_group = 2"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
])
def test_bad_inputs_name_the_argument(kwargs, error, words):
    args = dict(logits_NE=torch.randn(2, 8), top_k=2)
    args.update(kwargs)
    with pytest.raises(error, match=words):
        moe_route(**args)


def test_bad_logits_name_the_argument():
    with pytest.raises(ValueError, match=r"logits_NE must be 2-D \[N, E\]"):
        moe_route(torch.randn(8), 2)
    with pytest.raises(TypeError, match="logits_NE must have a floating-point dtype"):
        moe_route(torch.ones(2, 8, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="up to 8192"):
        moe_route_kernel(torch.zeros(1, 8193, device=DEVICE), 2)


def test_custom_op_passes_opcheck():
    x = logits(3, 16, seed=11)
    for args in ((x, 4, "softmax", True, 2.5, None), (x, 2, "sigmoid", False, 1.0, torch.rand(16, device=DEVICE))):
        torch.library.opcheck(torch.ops.hybridlm.moe_route.default, args)


def test_torch_compile_fullgraph_matches_eager():
    def scaled(x):
        w, e = moe_route_kernel(x, 4, "softmax", True, 2.0)
        return w * 3.0, e

    # On CPU the compiled graph runs eagerly around the opaque op; what is checked is that dynamo
    # traces the op with its fake implementation.
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    x = logits(2, 32, seed=12)
    got, want = torch.compile(scaled, fullgraph=True, backend=backend)(x), scaled(x)
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1])


def test_moe_decode_step_routes_with_the_kernel_like_the_layer(monkeypatch):
    """A static (decode) MoE call on CUDA routes through the kernel; its output equals the layer's with
    its PyTorch routing. On CPU the layer keeps the reference (the kernel is for CUDA tensors)."""
    from hybridlm.config import HybridConfig
    from hybridlm.layers.moe import MoE
    from hybridlm.ops import _checks

    cfg = HybridConfig(num_experts=16, num_experts_per_tok=4, routed_scaling_factor=2.5, norm_topk_prob=True,
                       shared_expert_intermediate_size=32)
    torch.manual_seed(0)
    moe = MoE(cfg).to(DEVICE)
    moe.pack_for_inference()
    x = torch.randn(2, 1, cfg.hidden_size, device=DEVICE)
    calls = []
    real = _checks.inference_kernel

    def spy(name, *args, **kwargs):
        fn = real(name, *args, **kwargs)
        calls.append((name, fn is not None))
        return fn

    monkeypatch.setattr(_checks, "inference_kernel", spy)
    with torch.no_grad():
        got = moe(x, static=True)
        monkeypatch.setattr(_checks, "inference_kernel", lambda name, *a, **k: None if name == "moe_route"
                            else real(name, *a, **k))
        want = moe(x, static=True)
    assert ("moe_route", DEVICE == "cuda") in calls
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_capture():
    x = logits(2, 64, seed=13, dtype=torch.bfloat16)
    moe_route_kernel(x, 8, "softmax", True)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w, e = moe_route_kernel(x, 8, "softmax", True)
    for step in range(3):
        x.copy_(logits(2, 64, seed=20 + step, dtype=torch.bfloat16))
        graph.replay()
        w_ref, e_ref = reference(x, 8, "softmax", True)
        assert torch.equal(e, e_ref)
        torch.testing.assert_close(w, w_ref, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("module", ["hybridlm.ops.moe_route", "hybridlm.ops.triton.moe_route"])
def test_docstring_examples(module):
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, extraglobs={"torch": torch}, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
