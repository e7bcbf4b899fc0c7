"""The fused MoE decode kernel (routing, gate/up, a grid barrier, down in one launch) against the
routing kernel followed by the two expert kernels (bit for bit: the same float32 arithmetic in the same
order), against the float64 reference, and inside the MoE layer.

Without CUDA the kernel runs under Triton's interpreter in its split form (two launches, no barrier:
the interpreter runs programs one after another, so a barrier would wait forever); the barrier form
runs in the GPU tests.
"""

import doctest
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ops_testing import rel_err  # noqa: E402

from hybridlm.config import HybridConfig  # noqa: E402
from hybridlm.layers import moe as moe_layer  # noqa: E402
from hybridlm.layers.moe import MoE  # noqa: E402
from hybridlm.ops.moe_decode import moe_experts_reference  # noqa: E402
from hybridlm.ops.moe_route import route_reference  # noqa: E402
from hybridlm.ops.triton import moe_decode as fused_mod  # noqa: E402
from hybridlm.ops.triton.moe_decode import (  # noqa: E402
    fused_programs,
    moe_decode_fused,
    moe_experts_decode,
    moe_fused_into,
)
from hybridlm.ops.triton.moe_route import moe_route  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(DEVICE != "cuda", reason="the barrier form needs a CUDA device")


def make(N, E, D, I, S, seed, dtype=torch.float32, gated=True, bias=False):
    """x, logits, gate, up, down, the shared expert's keyword arguments (projections form; none for S 0)
    and a score bias (or None), weights scaled like trained ones."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype)  # noqa: E731
    x, logits = r(N, D), r(N, E, scale=2.0)
    gate, up, down = r(E, I, D, scale=D ** -0.5), r(E, I, D, scale=D ** -0.5), r(E, D, I, scale=I ** -0.5)
    shared = {}
    if S:
        shared = dict(shared_h_NS=r(N, S), shared_down_DS=r(D, S, scale=S ** -0.5), shared_up_NS=r(N, S))
        if gated:
            shared["shared_gate_N"] = r(N)
    score_bias = (torch.rand(E, generator=gen) * 0.1).to(DEVICE) if bias else None
    return x, logits, gate, up, down, shared, score_bias


def sync_zeros():
    return torch.zeros(2, dtype=torch.int32, device=DEVICE)


def assert_same_sums(out, other):
    """Equal bit for bit on the CPU interpreter. On a GPU only where both launches use the same down
    tile shape: another [BLOCK_D, BLOCK_I] tile spreads a row's columns over the threads differently,
    so its final row sum adds in another order (the grid sets the fused kernel's BLOCK_D; H100, 12-05)."""
    if out.device.type == "cpu":
        assert torch.equal(out, other)
    else:
        assert rel_err(out, other) < (1e-6 if out.dtype == torch.float32 else 1e-2)


def three_kernels(x, logits, gate, up, down, shared, score_bias, K, router, norm, scaling):
    w, e = moe_route(logits, K, router, norm, scaling, score_bias)
    return moe_experts_decode(x, e, w, gate, up, down, **shared)


def reference(x, logits, gate, up, down, shared, score_bias, K, router, norm, scaling):
    w, e = route_reference(logits.float(), K, router, norm, score_bias, 1, 1)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return moe_experts_reference(x.double(), e, (w * scaling).double(), d(gate), d(up), d(down),
                                 *(d(shared.get(k)) for k in ("shared_h_NS", "shared_down_DS", "shared_up_NS",
                                                             "shared_gate_N")))


@pytest.mark.parametrize("router, norm, bias", [("softmax", True, False), ("softmax", False, False),
                                                ("sigmoid", True, True)])
@pytest.mark.parametrize("N, E, K, S", [(1, 8, 3, 24), (3, 8, 2, 0), (2, 32, 10, 16), (1, 5, 5, 24)])
def test_fused_equals_three_kernels_and_matches_reference(N, E, K, S, router, norm, bias):
    x, logits, gate, up, down, shared, score_bias = make(N, E, 48, 40, S, seed=N * 100 + E + K, bias=bias)
    args = (x, logits, gate, up, down, shared, score_bias, K, router, norm, 1.5)
    sync = sync_zeros()
    out = moe_decode_fused(x, logits, gate, up, down, sync, top_k=K, router=router, norm_topk_prob=norm,
                           scaling=1.5, score_bias_E=score_bias, **shared)
    assert torch.equal(out, three_kernels(*args))
    assert rel_err(out, reference(*args)) < 1e-5
    assert torch.equal(sync, sync_zeros())


@pytest.mark.parametrize("programs", [1, 2, 7, 200])
def test_every_tile_written_for_any_grid(programs):
    # one program doing every tile (its token changing mid-loop), a few, and more programs than tiles;
    # the output starts as NaN, so a tile no program wrote shows
    x, logits, gate, up, down, shared, _ = make(3, 8, 64, 24, 16, seed=programs)
    out = torch.full_like(x, float("nan"))
    moe_fused_into(x, logits, 3, "softmax", True, 1.0, None, gate, up, down, out, sync_zeros(), split=True,
                   programs=programs, **shared)
    assert torch.isfinite(out).all()
    assert_same_sums(out, three_kernels(x, logits, gate, up, down, shared, None, 3, "softmax", True, 1.0))


def test_shared_expert_without_gate_and_strided_logits():
    x, logits, gate, up, down, shared, _ = make(2, 8, 48, 40, 24, seed=5, gated=False)
    wide = torch.randn(2, 8 + 24, device=DEVICE)
    wide[:, 3:11] = logits  # the router's columns of a packed projection output
    out = moe_decode_fused(x, wide[:, 3:11], gate, up, down, sync_zeros(), top_k=2, **shared)
    assert torch.equal(out, three_kernels(x, logits, gate, up, down, shared, None, 2, "softmax", False, 1.0))


@pytest.mark.parametrize("bad, error, words", [
    (dict(sync=torch.zeros(2)), ValueError, "sync must be a contiguous int32"),
    (dict(sync=torch.zeros(3, dtype=torch.int32)), ValueError, "sync must be a contiguous int32"),
    (dict(logits=torch.randn(1, 7)), ValueError, "logits_NE must be \\[N, E\\]"),
    (dict(top_k=9), ValueError, "top_k must be in"),
    (dict(router="tanh"), ValueError, "router"),
])
def test_bad_inputs_raise(bad, error, words):
    x, logits, gate, up, down, _, _ = make(1, 8, 48, 40, 0, seed=1)
    kw = dict(sync=sync_zeros(), logits=logits, top_k=2, router="softmax")
    kw.update({k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in bad.items()})
    with pytest.raises(error, match=words):
        moe_decode_fused(x, kw["logits"], gate, up, down, kw["sync"], top_k=kw["top_k"], router=kw["router"])


def test_grid_rule_keeps_every_program_resident():
    assert fused_programs(132, 2, 4) == 264
    with pytest.raises(ValueError, match="programs_per_sm x num_warps"):
        fused_programs(132, 4, 4)


def test_custom_op_passes_opcheck():
    x, logits, gate, up, down, shared, _ = make(2, 8, 48, 40, 24, seed=3)
    split = DEVICE != "cuda"
    torch.library.opcheck(torch.ops.hybridlm.moe_decode_fused.default,
                          (x, logits, gate, up, down, sync_zeros(), 2, "softmax", True, 1.0, None, None, None, None,
                           None, split))
    torch.library.opcheck(torch.ops.hybridlm.moe_decode_fused.default,
                          (x, logits, gate, up, down, sync_zeros(), 2, "sigmoid", False, 2.0, None,
                           shared["shared_h_NS"], shared["shared_down_DS"], shared["shared_up_NS"],
                           shared["shared_gate_N"], split))


def test_torch_compile_fullgraph_matches_eager():
    x, logits, gate, up, down, shared, _ = make(1, 8, 48, 40, 24, seed=4)
    sync = sync_zeros()

    def step(x, logits):
        return moe_decode_fused(x, logits, gate, up, down, sync, top_k=3, **shared) * 2.0

    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    torch.testing.assert_close(compiled(x, logits), step(x, logits), rtol=0, atol=0)
    assert torch.equal(sync, sync_zeros())


def test_docstring_example():
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(moe_decode_fused, globs={"torch": torch, "moe_decode_fused": moe_decode_fused}):
        runner.run(test)
    assert runner.failures == 0 and runner.tries > 0


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N", [1, 2, 3])
@pytest.mark.parametrize("pps, warps", [(2, 4), (1, 4), (4, 2)])
def test_barrier_equals_split_and_three_kernels(N, dtype, pps, warps):
    x, logits, gate, up, down, shared, _ = make(N, 32, 2048, 512, 512, seed=N, dtype=dtype)
    args = (x, logits, 10, "softmax", True, 1.0, None, gate, up, down)
    outs = []
    for split in (False, True):
        out = torch.full_like(x, float("nan"))
        sync = sync_zeros()
        moe_fused_into(*args, out, sync, split=split, programs_per_sm=pps, num_warps=warps, **shared)
        assert torch.equal(sync, sync_zeros())
        outs.append(out)
    assert torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1])
    assert_same_sums(outs[0], three_kernels(x, logits, gate, up, down, shared, None, 10, "softmax", True, 1.0))
    ref = reference(x, logits, gate, up, down, shared, None, 10, "softmax", True, 1.0)
    assert rel_err(outs[0], ref) < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.gpu
@gpu
def test_cuda_graph_of_many_calls_sharing_one_sync():
    # 48 layers' worth of calls on one counter pair in one graph, replayed with new inputs: each call
    # must leave the counters at zero for the next, or the graph hangs or reads early
    layers = [make(1, 32, 2048, 512, 512, seed=s, dtype=torch.bfloat16) for s in range(4)]
    sync = sync_zeros()
    x = layers[0][0].clone()

    def run():
        h = x
        for _, logits, gate, up, down, shared, _ in layers * 12:
            h = moe_decode_fused(h, logits, gate, up, down, sync, top_k=10, **shared)
        return h

    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for step in range(3):
        x.normal_()
        graph.replay()
        torch.cuda.synchronize()
        expect = x
        for _, logits, gate, up, down, shared, _ in layers * 12:
            expect = three_kernels(expect, logits, gate, up, down, shared, None, 10, "softmax", False, 1.0)
        assert_same_sums(out, expect)
    assert torch.equal(sync, sync_zeros())


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fused", [True, False])
def test_moe_layer_static_step_with_and_without_the_fused_kernel(monkeypatch, fused):
    cfg = HybridConfig(hidden_size=256, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=128,
                       shared_expert_intermediate_size=128, shared_expert_gate=True, norm_topk_prob=True)
    torch.manual_seed(0)
    layer = MoE(cfg).to(DEVICE, torch.bfloat16).eval()
    layer.pack_for_inference()
    x = torch.randn(1, 1, 256, device=DEVICE, dtype=torch.bfloat16)
    monkeypatch.setattr(moe_layer, "MOE_FUSED", fused)
    calls = []
    monkeypatch.setattr(fused_mod, "moe_fused_into", lambda *a, **k: (calls.append(1), moe_fused_into(*a, **k)))
    with torch.no_grad():
        out = layer(x, static=True)
        ref = layer(x)  # the dynamic path: reference routing and experts
    assert bool(calls) == fused
    assert rel_err(out, ref) < 2e-2
