"""Sparse-MoE decode: the Triton kernel against the reference, against nn.Linear experts, and against
MoE(x) with the layer's packed weights.

Legend: N tokens, K experts per token, E experts, D hidden size, I expert intermediate size.
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

from ops_testing import rel_err  # noqa: E402

from hybridlm.config import HybridConfig  # noqa: E402
from hybridlm.layers.mlp import SwiGLU  # noqa: E402
from hybridlm.layers.moe import MoE, route  # noqa: E402
from hybridlm.ops import moe_experts  # noqa: E402
from hybridlm.ops.triton.moe_decode import (  # noqa: E402
    moe_experts_decode,
    moe_experts_into,
    pick_blocks,
    pick_stages,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def make_inputs(N, K, E, D, I, seed, dtype=torch.float32):
    """x [N, D]; experts [N, K] (distinct per token; token 1 routed to token 0's experts in another order);
    weights [N, K] float32 with the last token's last slot 0; gate, up [E, I, D] and down [E, D, I]
    scaled like trained weights (unit-size activations)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=gen)
    stacks = [torch.randn(E, *rows, generator=gen) * fan_in ** -0.5 for rows, fan_in in (((I, D), D), ((I, D), D),
                                                                                        ((D, I), I))]
    experts = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(N)])
    if N > 1:
        experts[1] = experts[0].roll(1)
    weights = torch.rand(N, K, generator=gen)
    weights[-1, -1] = 0.0
    to = lambda t: t.to(DEVICE, dtype) if t.is_floating_point() else t.to(DEVICE)  # noqa: E731
    return to(x), experts.to(DEVICE), weights.to(DEVICE), *(to(w) for w in stacks)


def linear_experts(x, experts, weights, gate, up, down):
    """An independent computation: one nn.Linear SwiGLU per expert, float64, token by token."""
    E, I, D = gate.shape
    mlps = []
    for e in range(E):
        mlp = SwiGLU(D, I).double()
        with torch.no_grad():
            mlp.gate_proj.weight.copy_(gate[e])
            mlp.up_proj.weight.copy_(up[e])
            mlp.down_proj.weight.copy_(down[e])
        mlps.append(mlp.to(x.device))
    with torch.no_grad():
        return torch.stack([sum(float(w) * mlps[int(e)](xn.double()) for e, w in zip(e_K, w_K))
                            for xn, e_K, w_K in zip(x, experts, weights)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E, D, I", [(4, 48, 40), (8, 64, 32)])
@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("N", [1, 3])
def test_triton_matches_reference_and_linear_experts(N, K, E, D, I, dtype):
    args = make_inputs(N, K, E, D, I, seed=N * 100 + K * 10 + E, dtype=dtype)
    out = moe_experts(*args, backend="triton")
    ref = moe_experts(*args, backend="reference")
    assert out.dtype == dtype and out.shape == (N, D)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(out, linear_experts(*args)) < TOL[dtype]


@pytest.mark.parametrize("blocks, stages", [((8, 16, 16, 2), (1, 1)), ((16, 32, 32, 16), (1, 1)),
                                            ((64, 256, 256, 128), (1, 1)),
                                            # software-pipelined loops, prefetching past their masked tails
                                            ((8, 16, 16, 4), (3, 3)), ((16, 32, 32, 16), (2, 4))])
@pytest.mark.parametrize("down_warps", [None, 8])
def test_every_output_element_written(blocks, stages, down_warps):
    """Blocks smaller than D and I (loops with masked tails, the down loop over pieces of the rows
    and over the slots) and larger than both; the down kernel at its own warp count too."""
    x, experts, weights, gate, up, down = make_inputs(3, 2, 4, 48, 40, seed=3)
    out = torch.full_like(x, float("nan"))
    moe_experts_into(x, experts, weights, gate, up, down, out, blocks=blocks, stages=stages, down_warps=down_warps)
    assert not out.isnan().any()
    assert rel_err(out, moe_experts(x, experts, weights, gate, up, down, backend="reference")) < TOL[torch.float32]


def test_default_stages_pipeline_from_four_tokens():
    """The default launch pipelines both loops from PIPELINE_FROM_TOKENS tokens (a 512-expert model
    runs this kernel up to 51 tokens), the down loop alone below, and still writes every element."""
    assert pick_stages(1) == pick_stages(3) == (1, 4)  # below: the gate/up loop plain, the down loop deep
    assert pick_stages(4) == pick_stages(48) == (3, 3)
    x, experts, weights, gate, up, down = make_inputs(5, 2, 4, 48, 40, seed=6)
    out = torch.full_like(x, float("nan"))
    moe_experts_into(x, experts, weights, gate, up, down, out, blocks=(8, 16, 8, 16))
    assert not out.isnan().any()
    assert rel_err(out, moe_experts(x, experts, weights, gate, up, down, backend="reference")) < TOL[torch.float32]


def test_many_slots_and_row_pieces():
    """Nine slots, each down row read in four pieces: the down loop's 36 steps (expert changes at
    every fourth) add every product once."""
    x, experts, weights, gate, up, down = make_inputs(2, 9, 10, 48, 64, seed=7)
    out = torch.full_like(x, float("nan"))
    moe_experts_into(x, experts, weights, gate, up, down, out, blocks=(8, 16, 16, 16))
    assert rel_err(out, moe_experts(x, experts, weights, gate, up, down, backend="reference")) < TOL[torch.float32]


def test_weight_views_and_strided_tokens():
    """Weight stacks that are views (a slice of a larger stack, rows strided), a strided x and int32
    expert indices are read as they are."""
    x, experts, weights, gate, up, down = make_inputs(2, 2, 4, 48, 40, seed=4)
    wide = torch.cat([gate, up], dim=1)  # [E, 2I, D]: each stack a view with row stride D
    wide_down = torch.cat([down, down], dim=2)  # [E, D, 2I]: a view with row stride 2I
    views = wide[:, :40], wide[:, 40:80], wide_down[:, :, 40:]
    x_strided = torch.stack([x, x], dim=-1).flatten(1)[:, ::2]
    out = moe_experts_decode(x_strided, experts.int(), weights, *views)
    assert rel_err(out, moe_experts(x, experts, weights, gate, up, down, backend="reference")) < TOL[torch.float32]
    # a down stack whose rows are strided along I (stored [E, I, D]) is copied, with the same result
    down_strided = down.transpose(1, 2).contiguous().transpose(1, 2)
    assert down_strided.stride(2) != 1
    again = moe_experts_decode(x, experts, weights, gate, up, down_strided)
    torch.testing.assert_close(again, moe_experts_decode(x, experts, weights, gate, up, down))
    # the layout MoE.packed_experts gives: stored [D, E, I], passed as its [E, D, I] view, read in place
    down_interleaved = down.transpose(0, 1).contiguous().transpose(0, 1)
    assert down_interleaved.stride() == (40, 4 * 40, 1)
    torch.testing.assert_close(moe_experts_decode(x, experts, weights, gate, up, down_interleaved),
                               moe_experts_decode(x, experts, weights, gate, up, down))


def make_shared(N, D, S, seed, dtype=torch.float32):
    """A shared expert's gated inner activations h [N, S] and down weight [D, S]."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(N, S, generator=gen).to(DEVICE, dtype),
            (torch.randn(D, S, generator=gen) * S ** -0.5).to(DEVICE, dtype))


def make_raw_shared(N, S, seed, dtype=torch.float32):
    """A shared expert's gate and up projections [N, S] and sigmoid-gate logits [N], as column slices
    of one packed projection row per token (row stride 2 S + 5)."""
    gen = torch.Generator().manual_seed(seed)
    packed = torch.randn(N, 2 * S + 5, generator=gen).to(DEVICE, dtype)
    return packed[:, 3:3 + S], packed[:, 3 + S:3 + 2 * S], packed[:, 1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("S, blocks", [(40, None), (100, (8, 16, 32, 4)), (7, (8, 16, 16, 2))])
def test_shared_expert_from_its_projections(S, blocks, gated, dtype):
    """Given as gate and up projections (and a gate logit), the shared expert's inner activations are
    formed in the kernel: equal to the reference and to silu(g) * u * sigmoid(logit) @ W^T in float64."""
    x, experts, weights, gate, up, down = make_inputs(3, 2, 4, 48, 40, seed=15, dtype=dtype)
    g, u, logit = make_raw_shared(3, S, seed=16, dtype=dtype)
    _, w = make_shared(3, 48, S, seed=17, dtype=dtype)
    logit = logit if gated else None
    kw = dict(shared_h_NS=g, shared_up_NS=u, shared_gate_N=logit, shared_down_DS=w)
    out = moe_experts_decode(x, experts, weights, gate, up, down, blocks=blocks, **kw)
    ref = moe_experts(x, experts, weights, gate, up, down, backend="reference", **kw)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype]
    h = torch.nn.functional.silu(g.double()) * u.double()
    if gated:
        h = torch.sigmoid(logit.double())[:, None] * h
    plain = linear_experts(x, experts, weights, gate, up, down) + h @ w.double().t()
    assert rel_err(out, plain) < TOL[dtype]
    only_shared = moe_experts_decode(x, experts[:, :0], weights[:, :0], gate, up, down, **kw)
    assert rel_err(only_shared, h @ w.double().t()) < TOL[dtype]


@pytest.mark.parametrize("raw", [True, False])
@pytest.mark.parametrize("N, S, blocks", [(1, 40, (8, 16, 64, 4)), (3, 7, (8, 16, 16, 2)), (2, 16, (8, 16, 16, 8)),
                                          (1, 100, (8, 16, 32, 4))])
def test_shared_rows_preloaded_same_bits(N, S, blocks, raw):
    """The down kernel's shared-expert rows loaded before the PDL wait (one row piece; S wider than
    a piece falls back to the loop) give the same bits as loaded after it; NaN-poisoned output."""
    x, experts, weights, gate, up, down = make_inputs(N, 2, 4, 48, 40, seed=21)
    if raw:
        g, u, logit = make_raw_shared(N, S, seed=22)
        _, w = make_shared(N, 48, S, seed=23)
        kw = dict(shared_h_NS=g, shared_up_NS=u, shared_gate_N=logit, shared_down_DS=w)
    else:
        h, w = make_shared(N, 48, S, seed=23)
        kw = dict(shared_h_NS=h, shared_down_DS=w)
    outs = []
    for pre in (False, True):
        out = torch.full_like(x, float("nan"))
        moe_experts_into(x, experts, weights, gate, up, down, out, blocks=blocks, shared_preload=pre, **kw)
        outs.append(out)
    assert torch.isfinite(outs[1]).all()
    assert torch.equal(outs[0], outs[1])
    ref = moe_experts(x, experts, weights, gate, up, down, backend="reference", **kw)
    assert rel_err(outs[1], ref) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S, blocks", [(40, None), (24, None), (100, (8, 16, 32, 4)), (7, (8, 16, 16, 2))])
def test_shared_expert_joins_the_sum(S, blocks, dtype):
    """A shared expert's down product (S equal to I, narrower, wider than a row piece, odd) adds to
    the routed sum: equal to the reference, and to the routed output plus h @ W^T in float64."""
    x, experts, weights, gate, up, down = make_inputs(3, 2, 4, 48, 40, seed=11, dtype=dtype)
    h, w = make_shared(3, 48, S, seed=12, dtype=dtype)
    out = moe_experts_decode(x, experts, weights, gate, up, down, shared_h_NS=h, shared_down_DS=w, blocks=blocks)
    ref = moe_experts(x, experts, weights, gate, up, down, shared_h_NS=h, shared_down_DS=w, backend="reference")
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype]
    plain = linear_experts(x, experts, weights, gate, up, down) + h.double() @ w.double().t()
    assert rel_err(out, plain) < TOL[dtype]
    # strided operands (a column slice of a wider h, rows of a wider weight) are read as they are
    h_wide, w_wide = torch.cat([h, h], 1), torch.cat([w, w], 1)
    again = moe_experts_decode(x, experts, weights, gate, up, down, shared_h_NS=h_wide[:, S:],
                               shared_down_DS=w_wide[:, S:], blocks=blocks)
    torch.testing.assert_close(again, out)


def test_shared_expert_alone_without_routed_slots():
    x, experts, weights, gate, up, down = make_inputs(2, 2, 4, 48, 40, seed=13)
    h, w = make_shared(2, 48, 40, seed=14)
    out = moe_experts_decode(x, experts[:, :0], weights[:, :0], gate, up, down, shared_h_NS=h, shared_down_DS=w)
    torch.testing.assert_close(out, h @ w.t())


def test_pure_zero_weights_and_empty_batch():
    x, experts, weights, gate, up, down = make_inputs(2, 2, 4, 48, 40, seed=5)
    assert moe_experts_decode(x, experts, torch.zeros_like(weights), gate, up, down).abs().max() == 0
    empty = moe_experts_decode(x[:0], experts[:0], weights[:0], gate, up, down)
    assert empty.shape == (0, 48)
    none = moe_experts_decode(x, experts[:, :0], weights[:, :0], gate, up, down)
    assert none.shape == x.shape and none.abs().max() == 0


def test_packed_experts_reproduce_moe_layer():
    cfg = HybridConfig(num_experts=4, num_experts_per_tok=2, routed_scaling_factor=2.5)
    torch.manual_seed(0)
    moe = MoE(cfg).to(DEVICE)
    x_BTD = torch.randn(2, 3, cfg.hidden_size, device=DEVICE)
    with torch.no_grad():
        expected = moe(x_BTD).reshape(-1, cfg.hidden_size)
        x_ND = x_BTD.reshape(-1, cfg.hidden_size)
        weights, experts = route(moe.gate(x_ND), moe.top_k, moe.router, moe.norm_topk_prob, moe.score_bias,
                                 moe.n_group, moe.topk_group)
        out = moe_experts(x_ND, experts, weights * moe.routed_scaling_factor, *moe.packed_experts(),
                          backend="triton")
    assert rel_err(out, expected) < TOL[torch.float32]


def test_dispatch_backends():
    args = make_inputs(2, 2, 4, 48, 40, seed=6)
    ref = moe_experts(*args, backend="reference")
    if DEVICE == "cpu":
        torch.testing.assert_close(moe_experts(*args), ref, rtol=0, atol=0)  # auto: the reference
    as64 = [a.double() if a.is_floating_point() else a for a in args]
    out64 = moe_experts(*as64)  # auto: the reference for float64, even on CUDA
    assert out64.dtype == torch.float64
    assert rel_err(out64, linear_experts(*as64)) < 1e-12
    with pytest.raises(TypeError, match="float64"):
        moe_experts(*as64, backend="triton")


def test_block_choice_fills_the_card():
    """Qwen3-Next scale at batch 1 on 132 SMs: the gate/up grid holds at least one program per SM,
    the down grid one, reading whole 1 KB rows of the down matrices."""
    N, K, I, D = 1, 10, 512, 2048
    bi1, bd1, bi2, bd2 = pick_blocks(N, K, I, D, num_sms=132)
    assert bd1 >= 128 and N * K * -(-I // bi1) >= 132
    assert (bi2, bd2) == (512, 8) and N * -(-D // bd2) >= 132
    assert pick_blocks(1, 1, 16, 32, num_sms=132)[2:] == (16, 2)  # tiny: pieces of 16, rows down to 2
    assert pick_blocks(4, 10, 512, 2048, num_sms=132)[2:] == (512, 16)  # from 4 tokens: two tiles' rows
    # a large batch keeps the widest gate/up tile whose two float32 accumulators fit in registers
    # (4096 elements: 16 rows of 256; 64 rows spilled and ran 20x slower on the H200)
    assert pick_blocks(64, 8, 512, 2048, num_sms=132)[:2] == (16, 256)
    assert pick_blocks(64, 8, 512, 64, num_sms=132)[:2] == (64, 64)


_GOOD = make_inputs(2, 2, 4, 48, 40, seed=7)


@pytest.mark.parametrize("index, bad, error, words", [
    (0, lambda a: a[0][0], ValueError, "x_ND must be 2-D"),
    (0, lambda a: a[0].long(), TypeError, "x_ND must have a floating-point"),
    (1, lambda a: a[1].float(), TypeError, "experts_NK must have dtype int64"),
    (1, lambda a: a[1][:1], ValueError, "experts_NK must be \\[N, K\\]"),
    (1, lambda a: a[1].tolist(), TypeError, "experts_NK must be a torch.Tensor"),
    (2, lambda a: a[2][:, :1], ValueError, "weights_NK must have experts_NK's shape"),
    (2, lambda a: a[2].long(), TypeError, "weights_NK must have a floating-point"),
    (3, lambda a: a[3][..., :40], ValueError, "gate_EID must be \\[E, I, D\\] with D = 48"),
    (4, lambda a: a[4][:, :20], ValueError, "up_EID must have gate_EID's shape"),
    (5, lambda a: a[5][0], ValueError, "down_EDI must be 3-D"),
    (5, lambda a: a[5].double(), TypeError, "down_EDI must have the same dtype as x_ND"),
    (5, lambda a: a[5].transpose(1, 2), ValueError, "down_EDI must be \\[E, D, I\\] = \\(4, 48, 40\\)"),
    (3, lambda a: a[3][:0], ValueError, "at least one expert"),
])
def test_bad_inputs_raise(index, bad, error, words):
    args = list(_GOOD)
    args[index] = bad(args)
    for call in (lambda: moe_experts(*args, backend="reference"), lambda: moe_experts_decode(*args)):
        with pytest.raises(error, match=words):
            call()


_H, _W = make_shared(2, 48, 24, seed=15)


@pytest.mark.parametrize("shared, error, words", [
    (dict(shared_h_NS=_H), ValueError, "shared_h_NS and shared_down_DS go together"),
    (dict(shared_down_DS=_W), ValueError, "go together"),
    (dict(shared_h_NS=_H[0], shared_down_DS=_W), ValueError, "shared_h_NS must be 2-D"),
    (dict(shared_h_NS=_H[:1], shared_down_DS=_W), ValueError, "shared_h_NS must be \\[N, S\\] with N = 2"),
    (dict(shared_h_NS=_H, shared_down_DS=_W[:, :20]), ValueError, "shared_down_DS must be \\[D, S\\] = \\(48, 24\\)"),
    (dict(shared_h_NS=_H, shared_down_DS=_W.t()), ValueError, "shared_down_DS must be \\[D, S\\]"),
    (dict(shared_h_NS=_H.double(), shared_down_DS=_W), TypeError, "shared_h_NS must have the same dtype as x_ND"),
    (dict(shared_up_NS=_H), ValueError, "shared_up_NS and shared_gate_N come with shared_h_NS"),
    (dict(shared_h_NS=_H, shared_down_DS=_W, shared_up_NS=_H[:, :20]), ValueError,
     r"shared_up_NS must have shared_h_NS's shape \[N, S\] = \(2, 24\)"),
    (dict(shared_h_NS=_H, shared_down_DS=_W, shared_gate_N=_H[:, 0]), ValueError, "shared_gate_N .* needs shared_up_NS"),
    (dict(shared_h_NS=_H, shared_down_DS=_W, shared_up_NS=_H, shared_gate_N=_H[:1, 0]), ValueError,
     r"shared_gate_N must be \[N\] with N = 2"),
])
def test_bad_shared_expert_raises(shared, error, words):
    for call in (lambda: moe_experts(*_GOOD, backend="reference", **shared), lambda: moe_experts_decode(*_GOOD, **shared)):
        with pytest.raises(error, match=words):
            call()


def test_bad_backend_blocks_and_triton_unavailable(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        moe_experts(*_GOOD, backend="cuda")
    with pytest.raises(ValueError, match="blocks must be four powers of two"):
        moe_experts_decode(*_GOOD, blocks=(16, 16, 24, 16))
    with pytest.raises(ValueError, match="blocks must be four powers of two"):
        moe_experts_decode(*_GOOD, blocks=(16, 16, 16))
    if DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(RuntimeError, match="not on a CUDA device"):
            moe_experts(*_GOOD, backend="triton")


def test_custom_op_passes_opcheck():
    h, w = make_shared(2, 48, 24, seed=9)
    for shared in ((None, None), (h, w)):
        for blocks in (None, [8, 16, 16, 2]):
            torch.library.opcheck(torch.ops.hybridlm.moe_experts_decode.default, (*_GOOD, *shared, None, None, blocks))
    g, u, logit = make_raw_shared(2, 24, seed=10)
    torch.library.opcheck(torch.ops.hybridlm.moe_experts_decode.default, (*_GOOD, g, w, u, logit, None))


def test_torch_compile_fullgraph_matches_eager():
    def combine(x, experts, weights, gate, up, down):
        return moe_experts_decode(x, experts, weights, gate, up, down) * 2.0

    # On CPU the compiled graph runs eagerly around the opaque op; what is checked is that dynamo
    # traces the op with its fake implementation.
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(combine, fullgraph=True, backend=backend)
    torch.testing.assert_close(compiled(*_GOOD), combine(*_GOOD))


@pytest.mark.parametrize("module", ["hybridlm.ops.moe_decode", "hybridlm.ops.triton.moe_decode"])
def test_docstring_examples(module):
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, extraglobs={"torch": torch}, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_capture():
    x, experts, weights, gate, up, down = make_inputs(2, 4, 8, 256, 128, seed=8, dtype=torch.bfloat16)
    moe_experts_decode(x, experts, weights, gate, up, down)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_experts_decode(x, experts, weights, gate, up, down)
    for step in range(3):
        experts.copy_((experts + step) % 8)  # new routing in place, as a captured decode loop sees it
        weights.mul_(0.5)
        graph.replay()
        ref = moe_experts(x, experts, weights, gate, up, down, backend="reference")
        assert rel_err(out, ref) < TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device with ~5 GB free")
def test_offsets_past_int32():
    E, I, D = 16400, 64, 2048  # E * I * D > 2**31
    stack = torch.zeros(E, I, D, device=DEVICE, dtype=torch.bfloat16)
    stack[-3:].normal_(std=D ** -0.5)
    down = torch.zeros(E, D, I, device=DEVICE, dtype=torch.bfloat16)
    down[-3:].normal_(std=I ** -0.5)
    x = torch.randn(2, D, device=DEVICE, dtype=torch.bfloat16)
    experts = torch.tensor([[E - 1, E - 3], [E - 2, E - 1]], device=DEVICE)
    weights = torch.rand(2, 2, device=DEVICE)
    out = moe_experts_decode(x, experts, weights, stack, stack, down)
    ref = moe_experts(x, experts - (E - 3), weights, stack[-3:], stack[-3:], down[-3:], backend="reference")
    assert rel_err(out, ref) < TOL[torch.bfloat16]
