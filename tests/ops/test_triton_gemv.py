"""Decode matrix-vector kernel (``hybridlm.ops.triton.gemv``): against float64 F.linear, every output
element written, strided weight views, bad input, torch.compile, CUDA graphs, and the projections of
a packed layer routed through it on CUDA.

Without CUDA the kernel runs under Triton's interpreter (float32, small shapes).
"""

import doctest
import importlib
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported

from ops_testing import python_with_env, rel_err  # noqa: E402

from hybridlm.ops.triton.gemv import (MAX_ROWS, NORM_MAX_D, add_rms_norm_linear, decode_linear, gemv_into,  # noqa: E402
                                      pick_blocks, row_launch)
from hybridlm.ops.triton.norm import add_rms_norm_rows, rms_norm_rows  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16, torch.float16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def make(shape_x, O, D, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape_x, D, generator=gen)
    w = torch.randn(O, D, generator=gen) * max(D, 1) ** -0.5
    return x.to(DEVICE, dtype), w.to(DEVICE, dtype)


def reference(x, w):
    return F.linear(x.double(), w.double())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape_x, O, D", [
    ((1,), 40, 64), ((1,), 1, 1), ((2,), 37, 100), ((3,), 129, 1000), ((4,), 8, 513),
    ((1, 1), 1064, 96),  # a decode step's [B, T, D] at batch 1, MoE's stack width
    ((2, 1), 65, 63),
])
def test_matches_linear(shape_x, O, D, dtype):
    x, w = make(shape_x, O, D, dtype)
    y = decode_linear(x, w)
    assert y.shape == (*shape_x, O) and y.dtype == dtype
    assert rel_err(y, reference(x, w)) < TOL[dtype]


@pytest.mark.parametrize("blocks, stages", [(None, 1), ((1, 16), 1), ((4, 32), 3), ((8, 512), 2)])
def test_every_output_element_written(blocks, stages):
    x, w = make((3,), 70, 200, torch.float32, seed=1)
    y = torch.full((3, 70), float("nan"), device=DEVICE)
    gemv_into(x, w, y, blocks=blocks, stages=stages)
    assert not y.isnan().any()
    assert rel_err(y, reference(x, w)) < TOL[torch.float32]


@pytest.mark.parametrize("N, O, D, blocks", [(1, 70, 200, (4, 32)), (3, 65, 63, (8, 16)), (1, 33, 1000, (2, 512)),
                                              (2, 9, 20, (4, 32)), (1, 40, 64, (8, 32))])
@pytest.mark.parametrize("preload", [1, 2, 3, 4])
def test_preloaded_pieces_same_bits(N, O, D, blocks, preload):
    # the block kernel's row pieces loaded before the PDL wait (one, two, or more than D holds) are
    # summed in the loop's order: the same bits as none preloaded; NaN-poisoned output
    x, w = make((N,), O, D, torch.float32, seed=5)
    y0 = torch.full((N, O), float("nan"), device=DEVICE)
    y1 = torch.full((N, O), float("nan"), device=DEVICE)
    gemv_into(x, w, y0, blocks=blocks, stages=2, preload=0)
    gemv_into(x, w, y1, blocks=blocks, stages=2, preload=preload)
    assert not y1.isnan().any()
    assert torch.equal(y0, y1)
    assert rel_err(y1, reference(x, w)) < TOL[torch.float32]


@pytest.mark.parametrize("preload", [-1, 5, True, 1.0])
def test_bad_preload_raises(preload):
    x, w = make((1,), 8, 16, torch.float32)
    with pytest.raises(ValueError, match="preload must be an int from 0 to 4"):
        gemv_into(x, w, torch.empty(1, 8, device=DEVICE), blocks=(4, 16), preload=preload)


@pytest.mark.parametrize("O, D", [(1, 1), (63, 100), (65, 63), (1000, 40), (37, 2048)])
def test_one_row_kernel_every_round_written(O, D):
    # the one-row kernel (one row's default where kernels launch with PDL): without CUDA one
    # multiprocessor, 4 programs, so O
    # rows take up to 32 rounds of the register-double-buffered loop; NaN-poisoned output
    x, w = make((1,), O, D, torch.float32, seed=3)
    y = torch.full((1, O), float("nan"), device=DEVICE)
    gemv_into(x, w, y, row=True)
    assert not y.isnan().any()
    assert rel_err(y, reference(x, w)) < TOL[torch.float32]


def test_one_row_launch():
    # H200 (132 SMs): 64 weight elements a thread at 8 warps, 4 programs a multiprocessor
    assert row_launch(2048, 4096, 132) == (4, 4096, 512, 1)
    assert row_launch(12352, 2048, 132) == (8, 2048, 528, 3)
    assert row_launch(1064, 2048, 132) == (8, 2048, 133, 1)
    assert row_launch(3, 20, 132) == (4, 32, 1, 1)


def test_pdl_is_on_unless_turned_off_and_never_on_the_interpreter():
    from hybridlm.ops.triton import utils

    assert utils.pdl(torch.device("cpu")) is False
    assert utils.pdl_launch(torch.device("cpu"), "gemv") == {"USE_PDL": 0}
    with pytest.raises(ValueError, match="kernel must be one of"):
        utils.pdl_launch(torch.device("cpu"), "gemm")
    assert utils.PDL == (os.environ.get("HYBRIDLM_PDL", "1") == "1")


def test_a_bad_wait_first_kernel_name_is_refused_by_name():
    import subprocess
    import sys

    env = dict(os.environ, HYBRIDLM_PDL_WAIT_FIRST="route,gemm")
    run = subprocess.run([sys.executable, "-c", "import hybridlm.ops.triton.utils"], env=env, capture_output=True,
                         text=True)
    assert run.returncode != 0 and "HYBRIDLM_PDL_WAIT_FIRST" in run.stderr and "gemm" in run.stderr


def test_a_bad_hybridlm_pdl_value_is_refused_by_name():
    import subprocess
    import sys

    env = dict(os.environ, HYBRIDLM_PDL="yes")
    run = subprocess.run([sys.executable, "-c", "import hybridlm.ops.triton.utils"], env=env, capture_output=True,
                         text=True)
    assert run.returncode != 0 and "HYBRIDLM_PDL must be 0" in run.stderr and "'yes'" in run.stderr


@pytest.mark.parametrize("value", ["1", "2", "4", "5"])
def test_the_preload_is_read_from_the_environment_and_a_bad_one_refused(value):
    run = python_with_env("from hybridlm.ops.triton import gemv; print(gemv.PRELOAD)", "HYBRIDLM_GEMV_PRELOAD", value)
    if value == "5":
        assert run.returncode != 0 and "HYBRIDLM_GEMV_PRELOAD must be 0, 1, 2, 3 or 4" in run.stderr
        assert "'5'" in run.stderr
    else:
        assert run.returncode == 0, run.stderr
        assert run.stdout.split() == [value]


@pytest.mark.parametrize("order", ["trigger-first", "wait-first", "late"])
def test_the_pdl_order_is_read_from_the_environment_and_a_bad_one_refused(order):
    import subprocess
    import sys

    code = "from hybridlm.ops.triton import utils; print(utils.PDL_ORDER, bool(utils.PDL_WAIT_FIRST))"
    run = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, HYBRIDLM_PDL_ORDER=order),
                         capture_output=True, text=True)
    if order == "late":
        assert run.returncode != 0 and "HYBRIDLM_PDL_ORDER must be" in run.stderr and "'late'" in run.stderr
    else:
        assert run.returncode == 0, run.stderr
        assert run.stdout.split() == [order, str(order == "wait-first")]


def test_weight_views_and_strided_rows():
    x, stack = make((2,), 96, 48, torch.float32, seed=2)
    view = stack[10:50]  # rows of a stack, as packed layers' weights are
    cols = torch.randn(40, 80, device=DEVICE)[:, 16:64]  # row stride 80, contiguous along D
    for w in (view, cols, cols.t().contiguous().t()):
        torch.testing.assert_close(decode_linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    xs = torch.randn(2, 2, 48, device=DEVICE)[:, 0]  # strided rows of x
    torch.testing.assert_close(decode_linear(xs, view), F.linear(xs, view), rtol=1e-5, atol=1e-5)


def test_empty_and_zero_width():
    x, w = make((2,), 5, 0, torch.float32)
    assert decode_linear(x, w).eq(0).all()
    x, w = make((2,), 0, 8, torch.float32)
    assert decode_linear(x, w).shape == (2, 0)
    x = torch.randn(0, 8, device=DEVICE)
    assert decode_linear(x, torch.randn(3, 8, device=DEVICE)).shape == (0, 3)


def test_blocks_fill_the_card():
    # 132 SMs, 4 programs each: MoE's stack (1064 rows) gets 2-row blocks, a wide projection 8
    assert pick_blocks(1, 1064, 2048, 132) == (2, 512)
    assert pick_blocks(1, 12352, 2048, 132) == (8, 512)
    assert pick_blocks(4, 2048, 512, 132) == (2, 512)
    assert pick_blocks(1, 3, 20, 132) == (1, 32)


@pytest.mark.parametrize("args, error, words", [
    (lambda x, w: (x.tolist(), w), TypeError, "x must be a floating-point"),
    (lambda x, w: (x, w[:, :4]), ValueError, "weight must be"),
    (lambda x, w: (x, w[0]), ValueError, "weight must be"),
    (lambda x, w: (x, w.half()), TypeError, "weight must have x's dtype"),
    (lambda x, w: (x.double(), w.double()), TypeError, "float64"),
    (lambda x, w: (x.expand(MAX_ROWS + 1, -1), w), ValueError, "at most"),
])
def test_bad_inputs_raise(args, error, words):
    x, w = make((1,), 6, 8, torch.float32)
    with pytest.raises(error, match=words):
        decode_linear(*args(x, w))


def test_custom_op_passes_opcheck():
    x, w = make((2,), 24, 40, torch.float32)
    torch.library.opcheck(torch.ops.hybridlm.decode_linear.default, (x, w))


def test_torch_compile_fullgraph_matches_eager():
    x, w = make((1, 1), 24, 40, torch.float32)
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(lambda x, w: decode_linear(x, w) * 2.0, fullgraph=True, backend=backend)
    torch.testing.assert_close(compiled(x, w), decode_linear(x, w) * 2.0)


def test_docstring_example():
    mod = importlib.import_module("hybridlm.ops.triton.gemv")
    result = doctest.testmod(mod, extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_capture():
    x, w = make((1,), 1064, 2048, torch.bfloat16, seed=3)
    decode_linear(x, w)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = decode_linear(x, w)
    for _ in range(2):
        x.normal_()
        graph.replay()
        assert rel_err(y, reference(x, w)) < TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the routing is for CUDA tensors")
def test_packed_projections_route_through_the_kernel(monkeypatch):
    """A packed MoE layer at batch 1 on CUDA calls the kernel for its stacked projections and the
    shared expert's down projection and matches the unpacked layer; at two rows it does not."""
    from hybridlm.config import HybridConfig
    from hybridlm.layers.moe import MoE
    from hybridlm.ops.triton import gemv

    cfg = HybridConfig(hidden_size=256, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                       shared_expert_intermediate_size=128)
    torch.manual_seed(0)
    layer = MoE(cfg).to(DEVICE, torch.bfloat16).eval()
    x = torch.randn(1, 1, 256, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        unpacked = layer(x)
        layer.pack_for_inference()
        calls = []
        real = gemv.gemv_into
        monkeypatch.setattr(gemv, "gemv_into", lambda *a, **k: (calls.append(a[1].shape), real(*a, **k))[1])
        packed = layer(x)
        assert len(calls) == 2, calls  # the stacked input projections, the shared expert's down
        assert rel_err(packed, unpacked) < 2e-2
        layer(x.expand(2, 1, 256))  # two rows: cuBLAS (the kernel lost there on the H200)
        assert len(calls) == 2, calls


# ---------------------------------------------------------------- the input norm inside the product

@pytest.mark.parametrize("value, want", [(None, "None"), ("row-only", "None"), ("4,3", "(4, 3)"), ("8,1", "(8, 1)"),
                                         ("3,3", None), ("8", None), ("8,5", None), ("a,b", None)])
def test_the_norm_launch_is_read_from_the_environment_and_a_bad_one_refused(value, want):
    run = python_with_env("from hybridlm.ops.triton import gemv; print(gemv.NORM_LAUNCH)", "HYBRIDLM_NORM_LAUNCH",
                          value)
    if want is None:
        assert run.returncode != 0 and "HYBRIDLM_NORM_LAUNCH must be 'row-only'" in run.stderr
        assert repr(value) in run.stderr
    else:
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == want


def make_norm(D, O, dtype, seed=0, zero_centered=False):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(1, 1, D, generator=gen) * 3, torch.randn(1, 1, D, generator=gen)
    nw = torch.randn(D, generator=gen) * 0.2 + (0.0 if zero_centered else 1.0)
    w = torch.randn(O, D, generator=gen) * D ** -0.5
    return x.to(DEVICE, dtype), y.to(DEVICE, dtype), nw.to(DEVICE), w.to(DEVICE, dtype)


def norm_reference(x, y, nw, zero_centered, w):
    """The two kernels the fused one replaces: the add + norm (or the norm), then the product in float64."""
    s, h = (x, rms_norm_rows(x, nw, 1e-6, zero_centered)) if y is None else add_rms_norm_rows(x, y, nw, 1e-6,
                                                                                                 zero_centered)
    return s, h, F.linear(h.double(), w.double())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D, O", [(1, 1), (63, 65), (65, 63), (1000, 1000), (64, 1064), (2048, 70)])
@pytest.mark.parametrize("zero_centered", [False, True])
@pytest.mark.parametrize("add", [True, False])
def test_add_norm_linear_matches_the_norm_then_the_product(D, O, zero_centered, add, dtype):
    x, y, nw, w = make_norm(D, O, dtype, seed=D + O, zero_centered=zero_centered)
    y = y if add else None
    s, h, out = add_rms_norm_linear(x, y, nw, 1e-6, zero_centered, w)
    s_ref, h_ref, out_ref = norm_reference(x, y, nw, zero_centered, w)
    assert out.shape == (1, 1, O) and s.shape == h.shape == x.shape and out.dtype == h.dtype == dtype
    assert (s is x) == (not add)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)  # the add rounds once, as x + y does
    # the mean of squares may sum in another order: h within one rounding of the norm kernel's
    torch.testing.assert_close(h, h_ref, rtol=TOL[dtype], atol=TOL[dtype])
    assert rel_err(out, out_ref) < TOL[dtype]


@pytest.mark.parametrize("row", [True, False])
@pytest.mark.parametrize("D, O, blocks", [(1, 3, (2, 16)), (63, 65, (4, 32)), (1000, 63, (2, 512)),
                                          (200, 1000, (8, 64))])
@pytest.mark.parametrize("preload", [0, 2])
def test_add_norm_linear_every_output_written_in_both_kernels(row, D, O, blocks, preload):
    # the one-row kernel (several rounds) and the block kernel (pieces preloaded or not) with the norm in
    # their prologue; s, h and the product NaN-poisoned, only program 0 writes s and h
    x, y, nw, w = make_norm(D, O, torch.float32, seed=7, zero_centered=True)
    x, y = x.view(1, D), y.view(1, D)
    s, h, out = (torch.full(shape, float("nan"), device=DEVICE) for shape in ((1, D), (1, D), (1, O)))
    kw = dict(row=True) if row else dict(blocks=blocks, preload=preload)
    gemv_into(x, w, out, norm=(y, nw, s, h, 1e-6, True), **kw)
    s_ref, h_ref, out_ref = norm_reference(x, y, nw, True, w)
    assert not (s.isnan().any() or h.isnan().any() or out.isnan().any())
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    torch.testing.assert_close(h, h_ref, rtol=1e-6, atol=1e-6)
    assert rel_err(out, out_ref) < TOL[torch.float32]


def test_add_norm_linear_takes_a_stack_view_and_a_row_of_any_leading_shape():
    x, y, nw, stack = make_norm(48, 96, torch.float32, seed=2)
    view = stack[8:50]  # rows of a stack, as packed layers' weights are
    s, h, out = add_rms_norm_linear(x.view(48), y.view(48), nw, 1e-6, False, view)
    assert s.shape == h.shape == (48,) and out.shape == (42,)
    assert rel_err(out, norm_reference(x, y, nw, False, view)[2].view(42)) < TOL[torch.float32]


@pytest.mark.parametrize("args, error, words", [
    (lambda x, y, nw, w: (x.double(), y.double(), nw, w.double()), TypeError, "x must be a float32"),
    (lambda x, y, nw, w: (x.expand(2, 1, -1), y.expand(2, 1, -1), nw, w), ValueError, "x must hold one row"),
    (lambda x, y, nw, w: (torch.zeros(1, NORM_MAX_D + 1, device=x.device), None,
                          torch.ones(NORM_MAX_D + 1, device=x.device), torch.zeros(2, NORM_MAX_D + 1, device=x.device)),
     ValueError, "x must hold one row of 1 to 8192"),
    (lambda x, y, nw, w: (x, y[..., :4], nw, w), ValueError, "y must be None or have x's shape"),
    (lambda x, y, nw, w: (x, y.half(), nw, w), ValueError, "y must be None or have x's shape"),
    (lambda x, y, nw, w: (x, y, nw[:4], w), ValueError, "norm_weight must be a float tensor of shape"),
    (lambda x, y, nw, w: (x, y, nw, w[:, :4]), ValueError, "weight must be"),
    (lambda x, y, nw, w: (x, y, nw, w.half()), TypeError, "weight and norm_weight must be on x's device"),
])
def test_add_norm_linear_bad_inputs_raise(args, error, words):
    x, y, nw, w = make_norm(8, 6, torch.float32)
    a = args(x, y, nw, w)
    with pytest.raises(error, match=words):
        add_rms_norm_linear(a[0], a[1], a[2], 1e-6, False, a[3])


@pytest.mark.parametrize("add", [True, False])
def test_add_norm_linear_with_an_empty_weight_still_returns_the_sum_and_the_norm(add):
    x, y, nw, w = make_norm(40, 0, torch.float32, seed=4)
    y = y if add else None
    s, h, out = add_rms_norm_linear(x, y, nw, 1e-6, True, w)
    s_ref, h_ref, _ = norm_reference(x, y, nw, True, w)
    assert out.shape == (1, 1, 0)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)


def test_gemv_into_refuses_a_norm_over_several_rows():
    x, w = make((2,), 6, 8, torch.float32)
    with pytest.raises(ValueError, match="norm takes one row of x"):
        gemv_into(x, w, torch.empty(2, 6, device=DEVICE), norm=(None, torch.ones(8, device=DEVICE), None,
                                                                 torch.empty(1, 8, device=DEVICE), 1e-6, False))


@pytest.mark.parametrize("add", [True, False])
def test_add_norm_linear_custom_op_passes_opcheck(add):
    x, y, nw, w = make_norm(40, 24, torch.float32)
    torch.library.opcheck(torch.ops.hybridlm.add_rms_norm_linear.default,
                          (x.view(1, 40), y.view(1, 40) if add else None, nw, 1e-6, True, w))


def test_add_norm_linear_under_torch_compile_fullgraph_matches_eager():
    x, y, nw, w = make_norm(40, 24, torch.float32)
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(lambda x, y: [t * 2.0 for t in add_rms_norm_linear(x, y, nw, 1e-6, False, w)],
                             fullgraph=True, backend=backend)
    for got, want in zip(compiled(x, y), add_rms_norm_linear(x, y, nw, 1e-6, False, w)):
        torch.testing.assert_close(got, want * 2.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_add_norm_linear_cuda_graph_at_qwen3_next_sizes():
    # the decode step's two shapes: Gated DeltaNet's input stack (block kernel) and MoE's (one-row kernel)
    for O in (12352, 1064):
        x, y, nw, w = make_norm(2048, O, torch.bfloat16, seed=O, zero_centered=True)
        add_rms_norm_linear(x, y, nw, 1e-6, True, w)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            s, h, out = add_rms_norm_linear(x, y, nw, 1e-6, True, w)
        for _ in range(2):
            x.normal_()
            graph.replay()
            s_ref, h_ref, out_ref = norm_reference(x, y, nw, True, w)
            torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
            torch.testing.assert_close(h, h_ref, rtol=1e-2, atol=1e-2)
            assert rel_err(out, out_ref) < TOL[torch.bfloat16]
