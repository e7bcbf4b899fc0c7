"""The static decode step's input norms inside the products after them (``RMSNorm.project``,
``model._norm_and_project``, the layers' ``projected`` argument).

On the GPU the fused kernel is taken at batch 1 where the decode kernels launch with PDL. Here, on the
CPU, Triton's interpreter runs the same kernel in float32 once the routing is told to take it, so the
plumbing (which product each layer receives, which h the MoE experts read, the residual stream) is
checked against the step without it.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported

from hybridlm import HybridConfig, HybridLM  # noqa: E402
from hybridlm.generation import prefill  # noqa: E402
from hybridlm.layers import norms  # noqa: E402
from hybridlm.layers.moe import MoE  # noqa: E402
from hybridlm.layers.packing import _group_slices, packed_linears  # noqa: E402
from hybridlm.ops.triton.gemv import add_rms_norm_linear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _route_to_kernel(monkeypatch, calls):
    """Take the fused kernel wherever the stack allows it (as a batch-1 PDL GPU step does), counting calls."""
    def route(x, weight):
        if x.numel() != x.shape[-1] or x.dtype != weight.dtype:
            return None
        return lambda *a: (calls.append((a[1] is None, tuple(a[5].shape))), add_rms_norm_linear(*a))[1]
    monkeypatch.setattr(norms, "norm_project_for", route)


@pytest.mark.parametrize("preset", ["tiny-qwen3-next", "tiny-hybrid-3to1"])
def test_static_step_with_the_norms_in_the_products_equals_the_step_without(preset, monkeypatch):
    torch.manual_seed(0)
    model = HybridLM(HybridConfig.preset(preset)).to(DEVICE).eval().pack_for_inference()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, 7), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    steps = torch.randint(0, vocab, (1, 3), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    plain, fused = model.new_cache(1, 12), model.new_cache(1, 12)
    calls = []
    with torch.no_grad():
        prefill(model, ids, None, plain)
        prefill(model, ids, None, fused)
        for t in range(steps.shape[1]):
            slot = torch.tensor([plain.seq_len], device=DEVICE)
            monkeypatch.setattr(norms, "norm_project_for", lambda x, w: None)
            want = model.decode_static(steps[:, t:t + 1], plain, slot)
            _route_to_kernel(monkeypatch, calls)
            got = model.decode_static(steps[:, t:t + 1], fused, slot.clone())
            plain.seq_len += 1
            fused.seq_len += 1
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(plain.named_tensors().values(), fused.named_tensors().values()):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    layers = model.config.num_layers
    moe = sum(isinstance(block.mlp, MoE) for block in model.layers)
    per_step = layers + moe  # every mixer's input norm (the first without an add) and every MoE's
    assert len(calls) == per_step * steps.shape[1]
    assert sum(no_add for no_add, _ in calls) == steps.shape[1]  # the first block's norm has no add
    stacks = {shape for _, shape in calls}
    with torch.no_grad():
        want_stacks = {tuple(b.mixer.input_stack().shape) for b in model.layers}
        want_stacks |= {tuple(b.mlp.input_stack().shape) for b in model.layers if isinstance(b.mlp, MoE)}
    assert stacks == want_stacks


def test_input_stacks_exist_only_once_packed_and_without_gradients():
    torch.manual_seed(0)
    model = HybridLM(HybridConfig.preset("tiny-qwen3-next"))
    block = model.layers[0]
    assert block.mixer.input_stack() is None and block.mlp.input_stack() is None
    model.pack_for_inference()
    assert block.mixer.input_stack() is None  # gradients on, parameters trainable: the layers run one by one
    with torch.no_grad():
        stack = block.mixer.input_stack()
        assert stack is not None and stack.shape[1] == model.config.hidden_size
        assert stack.shape[0] % 8 == 0 and stack.shape[0] >= sum(
            m.out_features for m in (block.mixer.q_proj, block.mixer.k_proj, block.mixer.v_proj))
        assert block.mlp.input_stack().shape[0] >= model.config.num_experts


def test_projected_is_sliced_like_the_product_and_too_few_columns_are_refused():
    torch.manual_seed(0)
    model = HybridLM(HybridConfig.preset("tiny-qwen3-next")).eval().pack_for_inference()
    layer = model.layers[0].mixer
    x = torch.randn(1, 1, model.config.hidden_size)
    with torch.no_grad():
        want = packed_linears(layer, layer._in_groups, x)
        got = packed_linears(layer, layer._in_groups, torch.full_like(x, float("nan")),
                             x @ layer.input_stack().t())
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
        with pytest.raises(ValueError, match="projected must have at least"):
            _group_slices(layer, layer._in_groups, torch.zeros(1, 1, 3))


def test_an_moe_without_a_stack_refuses_a_projected_input():
    cfg = HybridConfig(hidden_size=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                       shared_expert_intermediate_size=0)
    layer = MoE(cfg).eval()
    assert layer.input_stack() is None
    with torch.no_grad(), pytest.raises(ValueError, match="projected: this MoE layer has no stacked input"):
        layer(torch.randn(1, 1, 32), static=True, projected=torch.zeros(1, 1, 8))


def test_the_norm_declines_what_the_kernel_does_not_take(monkeypatch):
    norm = norms.RMSNorm(16)
    x = torch.randn(1, 1, 16)
    _route_to_kernel(monkeypatch, [])
    with torch.no_grad():
        assert norm.project(x, None, None) is None  # no stack
        assert norm.project(x, torch.randn(1, 1, 8), torch.randn(4, 16)) is None  # y of another shape
        s, h, out = norm.project(x, torch.randn(1, 1, 16), torch.randn(4, 16))
        assert out.shape == (1, 1, 4)
    x.requires_grad_(True)
    assert norm.project(x, None, torch.randn(4, 16)) is None  # a gradient is needed
