"""Projections of one input stacked into one product at inference (hybridlm.layers.packing)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch import nn

from hybridlm import HybridConfig, HybridLM
from hybridlm.layers import GatedAttention, GatedDeltaNet
from hybridlm.layers.mlp import SwiGLU
from hybridlm.layers.moe import MoE
from hybridlm.layers.packing import pack_weights, packed_linears
from hybridlm.layers.step import Tokens


def _tokens(B, T):
    return Tokens(torch.arange(T).expand(B, T), None)


@pytest.mark.parametrize("make", [
    lambda cfg: GatedDeltaNet(cfg), lambda cfg: GatedDeltaNet(cfg, gated=False), lambda cfg: GatedAttention(cfg),
], ids=["G", "D", "A"])
def test_packed_layer_equals_the_layer_run_projection_by_projection(make):
    torch.manual_seed(0)
    layer = make(HybridConfig())
    x = torch.randn(2, 5, 64)
    want = layer(x, _tokens(2, 5))  # gradients on: each projection alone
    layer.pack_for_inference()
    with torch.no_grad():
        got = layer(x, _tokens(2, 5))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    packs = [v for k, v in layer.__dict__.items() if k.startswith("_packed_")]
    assert len(packs) == 1
    assert layer.q_proj.weight.data_ptr() == packs[0].data_ptr()


def test_packing_keeps_parameter_objects_values_and_training():
    torch.manual_seed(0)
    mlp = SwiGLU(8, 16)
    params = list(mlp.parameters())
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1)
    mlp.pack_for_inference()
    pack = mlp.__dict__["_packed_gate_proj_up_proj"]
    # same Parameter objects (the optimizer's), same values, now rows of one tensor
    assert [id(p) for p in mlp.parameters()] == [id(p) for p in params]
    for k, v in mlp.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert mlp.up_proj.weight.data_ptr() == pack[16].data_ptr()
    # training after packing updates the weights, and the stack with them
    mlp(torch.randn(3, 8)).square().sum().backward()
    opt.step()
    assert not torch.equal(mlp.gate_proj.weight, before["gate_proj.weight"])
    assert torch.equal(pack[:16], mlp.gate_proj.weight) and torch.equal(pack[16:], mlp.up_proj.weight)
    with torch.no_grad():
        got = mlp(x := torch.randn(2, 8))
    torch.testing.assert_close(got, mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)))


def test_nothing_is_packed_unless_asked():
    # a forward without gradients (an evaluation during training) leaves the weights where they are,
    # so training after it repeats bit for bit
    model = HybridLM(HybridConfig.preset("tiny-qwen3-next"))
    ptrs = [p.data_ptr() for p in model.parameters()]
    with torch.no_grad():
        model(torch.randint(0, model.config.vocab_size, (1, 5)))
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert model.pack_for_inference() is model
    assert [p.data_ptr() for p in model.parameters()] != ptrs


def test_stacks_again_after_the_weights_are_replaced():
    mlp = SwiGLU(8, 16)
    mlp.pack_for_inference()
    mlp.double()
    x = torch.randn(2, 8, dtype=torch.float64)
    with torch.no_grad():
        got = mlp(x)
    pack = mlp.__dict__["_packed_gate_proj_up_proj"]
    assert pack.dtype == torch.float64 and mlp.gate_proj.weight.data_ptr() == pack.data_ptr()
    with torch.enable_grad():
        want = mlp(x)
    torch.testing.assert_close(got, want)


def test_layers_with_a_bias_run_one_by_one():
    owner = nn.Module()
    owner.a, owner.b = nn.Linear(4, 3), nn.Linear(4, 2, bias=False)
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert pack_weights(owner, ("a", "b")) is None
        ab, = packed_linears(owner, (("a", "b"),), x)
    torch.testing.assert_close(ab, torch.cat([owner.a(x), owner.b(x)], -1))


@pytest.mark.parametrize("shared_gate", [True, False])
def test_moe_experts_are_stacked_by_moe_only(shared_gate):
    """The routed experts' stacks, and one stack of the router, the shared expert's sigmoid gate and
    its gate and up (all projections of the layer's input): MoE owns both, and the shared expert
    does not stack its own gate/up (that would undo MoE's stack)."""
    torch.manual_seed(0)
    cfg = HybridConfig(num_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=32,
                       shared_expert_gate=shared_gate)
    moe = MoE(cfg)
    x = torch.randn(2, 3, cfg.hidden_size)
    want = moe(x)
    moe.pack_for_inference()
    moe.shared_expert.pack_for_inference()
    with torch.no_grad():
        gate, _, _ = moe.packed_experts()
        got = moe(x)
        assert moe.experts[1].gate_proj.weight.data_ptr() == gate[1].data_ptr()
        assert moe.packed_experts()[0] is gate
        assert not any(k.startswith("_packed_") for k in moe.shared_expert.__dict__)
        packs = [v for k, v in moe.__dict__.items() if k.startswith("_packed_")]
        assert len(packs) == 1
        # torch 2.11's dynamo asserts on a dotted attribute name when it traces the packed step
        assert all(k.isidentifier() for k in moe.__dict__ if k.startswith("_packed_"))
        rows = [moe.gate, *([moe.shared_expert_gate] if shared_gate else []), moe.shared_expert.gate_proj,
                moe.shared_expert.up_proj]
        n = sum(m.out_features for m in rows)  # 69 or 68: zero rows up to 72 keep the product aligned
        assert packs[0].shape[0] == 72 and (packs[0][n:] == 0).all()
        assert moe.shared_expert.up_proj.weight.data_ptr() == packs[0][n - 32].data_ptr()
        assert moe.gate.weight.data_ptr() == packs[0].data_ptr()
        got_static = moe(x, static=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_static, want, rtol=1e-5, atol=1e-6)


def test_moe_with_a_replaced_shared_expert_runs_it_as_it_is():
    class Doubled(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return 2 * self.inner(x)

    torch.manual_seed(0)
    cfg = HybridConfig(num_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=32)
    moe = MoE(cfg)
    x = torch.randn(2, 3, cfg.hidden_size)
    inner = moe.shared_expert
    moe.shared_expert = Doubled(inner)
    moe.pack_for_inference()
    with torch.no_grad():
        got = moe(x)
        moe.shared_expert = inner
        half = moe(x)
        shared = torch.sigmoid(moe.shared_expert_gate(x)) * inner(x)
    torch.testing.assert_close(got, half + shared, rtol=1e-5, atol=1e-6)


def test_a_packed_model_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    model = HybridLM(HybridConfig.preset("tiny-qwen3-next")).eval().pack_for_inference()
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        want = model(ids)
    model.save_pretrained(tmp_path)
    loaded = HybridLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), want)


def test_a_layer_replaced_after_packing_runs_alone():
    # a layer swapped for another shape (or a wrapper) after packing: no stale stack, no index error
    mlp = SwiGLU(8, 16)
    mlp.pack_for_inference()
    mlp.up_proj = nn.Linear(8, 16, bias=True)
    x = torch.randn(2, 8)
    with torch.no_grad():
        got = mlp(x)
    torch.testing.assert_close(got, mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)))
    # wider layers: more rows than the old stack held
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = (nn.Linear(8, 40, bias=False), nn.Linear(8, 40, bias=False),
                                                 nn.Linear(40, 8, bias=False))
    with torch.no_grad():
        got = mlp(x)
    torch.testing.assert_close(got, mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)))


def test_a_wrapped_layer_after_packing_trains_through_the_wrapper():
    class Scaled(nn.Module):  # a wrapper without .weight (as LoRA-style adapters are)
        def __init__(self, inner):
            super().__init__()
            self.inner, self.scale = inner, nn.Parameter(torch.tensor(2.0))

        def forward(self, x):
            return self.scale * self.inner(x)

    mlp = SwiGLU(8, 16)
    mlp.pack_for_inference()
    mlp.up_proj = Scaled(mlp.up_proj)
    mlp(torch.randn(2, 8)).sum().backward()  # gradients on: one by one, through the wrapper
    assert mlp.up_proj.scale.grad is not None
    with torch.no_grad():
        x = torch.randn(2, 8)
        torch.testing.assert_close(mlp(x), mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)))


def test_converting_a_packed_layer_releases_the_old_stack_and_stacks_the_new_weights():
    """``.double()`` / ``.to(dtype)``: the old stack is not held beside the converted weights (before,
    it lived until the next inference call restacked); the new weights are rows of a new stack at
    once. A conversion that changes nothing keeps the very same storage (a captured graph's)."""
    import weakref

    torch.manual_seed(0)
    layer = GatedDeltaNet(HybridConfig())
    layer.pack_for_inference()
    attr, = (k for k in layer.__dict__ if k.startswith("_packed_"))
    old = weakref.ref(layer.__dict__[attr])
    layer.double()
    assert old() is None
    pack = layer.__dict__[attr]
    row = 0
    for name in layer.__dict__["_pack_names"][attr]:  # every weight its rows of the new stack, in order
        w = getattr(layer, name).weight
        assert w.dtype == torch.float64 and w.data_ptr() == pack[row].data_ptr(), name
        row += w.shape[0]
    assert row == pack.shape[0]
    x = torch.randn(1, 4, 64, dtype=torch.float64)
    with torch.no_grad():
        got = layer(x, _tokens(1, 4))
    assert layer.__dict__[attr] is pack  # no restack at the call
    torch.testing.assert_close(got, layer(x, _tokens(1, 4)))  # gradients on: projection by projection
    ptr = pack.data_ptr()
    layer.to(torch.float64)
    layer.double()
    assert layer.__dict__[attr].data_ptr() == ptr == layer.q_proj.weight.data_ptr()


def test_converting_packed_moe_experts_stacks_them_again():
    import weakref

    torch.manual_seed(0)
    cfg = HybridConfig(num_experts=4, num_experts_per_tok=2)
    moe = MoE(cfg)
    moe.pack_for_inference()
    olds = [weakref.ref(t) for t in moe.packed_experts()]
    moe.double()
    assert all(r() is None for r in olds)
    gate, up, down = moe.__dict__["_pack"]
    assert gate.dtype == up.dtype == down.dtype == torch.float64
    assert moe.experts[2].down_proj.weight.data_ptr() == down[2].data_ptr()
    ptrs = [t.data_ptr() for t in (gate, up, down)]
    moe.double()  # nothing to convert: the same stacks, down still the [E, D, I] view of a [D, E, I] stack
    assert [t.data_ptr() for t in moe.packed_experts()] == ptrs
    assert moe.packed_experts()[2].stride() == down.stride() == (down.shape[2], down.shape[0] * down.shape[2], 1)
    x = torch.randn(2, 3, cfg.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        got = moe(x)
    torch.testing.assert_close(got, moe(x))


def test_a_packed_model_moved_to_meta_and_back_runs():
    """``to_empty`` after the meta device: no stack over meta tensors; stacks come back with the
    materialised weights."""
    model = HybridLM(HybridConfig.preset("tiny-qwen3-next")).pack_for_inference()
    model.to("meta")
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    with torch.no_grad():
        got = model(ids)
    torch.testing.assert_close(got, model(ids))


class _SyncOps(TorchDispatchMode):
    """Records the ops that make the host wait for the GPU when their inputs live on CUDA: a value
    read back (.item(), int(), .tolist()), or an output size that depends on values (torch.bincount
    reads the ids' min and max: once a layer, it kept the H200 prefill from running ahead)."""

    NAMES = ("_local_scalar_dense", "bincount", "nonzero", "masked_select", "unique", "repeat_interleave")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(n in str(func) for n in self.NAMES):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


_GROUPED_CASES = [("cpu", torch.float32), ("cpu", torch.bfloat16)]
if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9:
    _GROUPED_CASES.append(("cuda", torch.bfloat16))  # where the grouped product runs on a GPU (Hopper, bf16)


@pytest.mark.parametrize("device, dtype", _GROUPED_CASES)
def test_packed_moe_prefill_runs_grouped_products_equal_to_the_expert_loop(device, dtype, monkeypatch):
    """Once packed, many tokens (prefill) go through three grouped products over the stacks, with
    no host sync; unpacked, or with gradients needed, the experts run one by one. Same result, also
    with experts no token was routed to, and with the down stack as packed ([D, E, I] storage)."""
    from hybridlm.layers import moe as moe_mod

    torch.manual_seed(0)
    cfg = HybridConfig(num_experts=8, num_experts_per_tok=2, shared_expert_intermediate_size=32)
    moe = MoE(cfg).to(device, dtype)
    with torch.no_grad():
        moe.gate.weight[5:] = -10.0  # experts 5-7 never chosen by tokens with positive router inputs
    x = torch.randn(3, 7, cfg.hidden_size).abs().to(device, dtype)
    with torch.no_grad():
        want = moe(x)
    calls = []
    real = moe_mod.grouped_experts
    monkeypatch.setattr(moe_mod, "grouped_experts", lambda *a, **kw: calls.append(a[1].tolist()) or real(*a, **kw))
    moe.pack_for_inference()
    with torch.no_grad():
        got = moe(x)
    assert len(calls) == 1 and calls[0][5:] == [0, 0, 0] and sum(calls[0]) == 21 * 2
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, want, **tol)
    monkeypatch.setattr(moe_mod, "grouped_experts", real)
    with torch.no_grad(), _SyncOps() as syncs:  # ops that read a CUDA tensor back to the host
        moe(x)
    assert syncs.seen == [], f"host syncs on the grouped path: {syncs.seen}"
    got_grad = moe(x)  # gradients needed: the expert loop, which autograd goes through
    assert len(calls) == 1 and got_grad.requires_grad
    torch.testing.assert_close(got_grad.detach(), want, **tol)


def test_odd_widths_stack_with_zero_rows_to_a_multiple_of_8():
    """Output rows of the product stay 16-byte aligned in 16-bit dtypes; the zero rows never reach
    an output, survive a .to() that changes nothing and are rebuilt by one that converts."""
    torch.manual_seed(0)
    owner = nn.Module()
    owner.a, owner.b = nn.Linear(16, 5, bias=False), nn.Linear(16, 6, bias=False)
    x = torch.randn(3, 16)
    pack = pack_weights(owner, ("a", "b"))
    assert pack.shape == (16, 16) and (pack[11:] == 0).all()
    with torch.no_grad():
        a, b = packed_linears(owner, (("a",), ("b",)), x)
    assert a.shape == (3, 5) and b.shape == (3, 6)
    torch.testing.assert_close(torch.cat([a, b], -1), torch.cat([owner.a(x), owner.b(x)], -1))
    mlp = SwiGLU(16, 13)  # gate + up: 26 rows -> 32
    want = mlp(x)
    mlp.pack_for_inference()
    stack = mlp.__dict__["_packed_gate_proj_up_proj"]
    assert stack.shape[0] == 32 and mlp.to(torch.float32).__dict__["_packed_gate_proj_up_proj"] is not None
    assert mlp.__dict__["_packed_gate_proj_up_proj"].data_ptr() == stack.data_ptr()
    mlp.double()
    with torch.no_grad():
        got = mlp(x.double())
    assert mlp.__dict__["_packed_gate_proj_up_proj"].shape == (32, 16)
    torch.testing.assert_close(got, want.double().detach(), rtol=1e-6, atol=1e-6)


def test_moe_pack_is_dropped_when_an_expert_or_its_weight_is_replaced():
    """The per-call check of the experts' stacks (read through the module dicts, for speed) sees a
    replaced weight, a replaced expert and an expert added since packing."""
    torch.manual_seed(0)
    cfg = HybridConfig(num_experts=4, num_experts_per_tok=2)
    moe = MoE(cfg)
    x = torch.randn(2, 9, cfg.hidden_size)
    moe.pack_for_inference()
    assert moe._live_pack() is not None
    with torch.no_grad():
        moe.experts[2].up_proj.weight = nn.Parameter(moe.experts[2].up_proj.weight * 2)
        assert moe._live_pack() is None
        want = moe(x)  # the expert loop, on the new weight
        moe.pack_for_inference()
        torch.testing.assert_close(moe(x), want, rtol=1e-5, atol=1e-6)  # stacked again, grouped
    moe.experts[1] = SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size, pack=False)
    assert moe._live_pack() is None
    moe.pack_for_inference()
    moe.experts.append(SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size, pack=False))
    assert moe._live_pack() is None


def test_project_keeps_hooks_gradients_and_values():
    """``project`` (output projections) is layer(x) wherever it does not take the decode kernel: on
    CPU, with a gradient needed, with a bias, and with hooks, which still fire."""
    from hybridlm.layers.packing import project, project_rows

    torch.manual_seed(0)
    lin = nn.Linear(16, 8, bias=False)
    x = torch.randn(1, 1, 16)
    seen = []
    lin.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        torch.testing.assert_close(project(lin, x)[0, 0], lin.weight @ x[0, 0])
    assert seen == [(1, 1, 8)]
    y = project(lin, x)
    y.sum().backward()
    assert lin.weight.grad is not None
    biased = nn.Linear(16, 8)
    torch.testing.assert_close(project(biased, x), biased(x))
    torch.testing.assert_close(project_rows(x, lin.weight), x @ lin.weight.t())
