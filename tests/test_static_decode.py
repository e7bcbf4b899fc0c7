"""The fixed-shape decode step (HybridLM.decode_static) and StaticDecoder equal the eager decode."""

import pytest
import torch

from hybridlm.config import HybridConfig
from hybridlm.generation import StaticDecoder, decode_one_token, prefill
from hybridlm.model import HybridLM

STATIC_PRESETS = ["tiny-mha", "tiny-gdn", "tiny-hybrid-3to1", "tiny-linear", "tiny-deltanet", "tiny-moe",
                  "tiny-qwen3-next", "tiny-minimax-m1"]


def _model(name):
    torch.manual_seed(0)
    return HybridLM(HybridConfig.preset(name)).double().eval()


@pytest.mark.parametrize("name", STATIC_PRESETS)
def test_decode_static_equals_eager_decode(name):
    model = _model(name)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(1))
    steps = torch.randint(0, vocab, (2, 4), generator=torch.Generator().manual_seed(2))
    eager, static = model.new_cache(2, 20), model.new_cache(2, 20)
    prefill(model, ids, None, eager)
    prefill(model, ids, None, static)
    slot = torch.zeros(1, dtype=torch.long)
    for t in range(steps.shape[1]):
        want = decode_one_token(model, steps[:, t], eager)
        slot.fill_(static.seq_len)
        got = model.decode_static(steps[:, t:t + 1], static, slot)
        static.seq_len += 1
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    for a, b in zip(eager.named_tensors().values(), static.named_tensors().values()):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9)


def test_static_decode_with_left_padding_positions():
    model = _model("tiny-hybrid-3to1")
    ids = torch.randint(1, 50, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    eager, static = model.new_cache(2, 12), model.new_cache(2, 12)
    first = prefill(model, ids, mask, eager).argmax(-1)
    prefill(model, ids, mask, static)
    want = decode_one_token(model, first, eager)
    got = model.decode_static(first[:, None], static, torch.tensor([static.seq_len]))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_static_decoder_equals_greedy_eager_loop():
    model = _model("tiny-qwen3-next")
    ids = torch.randint(0, model.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(4))
    cache = model.new_cache(3, 7 + 6)
    dec = StaticDecoder(model, cache, graph=False)
    first = prefill(model, ids, None, cache).argmax(-1)
    got = dec.run(first, 5)
    ref_cache = model.new_cache(3, 13)
    token = prefill(model, ids, None, ref_cache).argmax(-1)
    want = []
    for _ in range(5):
        token = decode_one_token(model, token, ref_cache).argmax(-1)
        want.append(token)
    assert torch.equal(got, torch.stack(want, 1))
    assert cache.seq_len == ref_cache.seq_len == 12


def test_static_decoder_runs_continue_and_return_only_their_own_tokens():
    # two runs in a row (3 then 2 steps) return the tokens of one 5-step run, each its own columns of
    # the decoder's token history
    model = _model("tiny-qwen3-next")
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(5))
    whole = model.new_cache(2, 13)
    dec = StaticDecoder(model, whole, graph=False)
    want = dec.run(prefill(model, ids, None, whole).argmax(-1), 5)
    split = model.new_cache(2, 13)
    dec = StaticDecoder(model, split, graph=False)
    a = dec.run(prefill(model, ids, None, split).argmax(-1), 3)
    b = dec.run(a[:, -1], 2)
    assert a.shape == (2, 3) and b.shape == (2, 2) and a.dtype == b.dtype == torch.long
    assert torch.equal(torch.cat([a, b], 1), want)
    assert split.seq_len == 12


def test_static_decoder_errors():
    model = _model("tiny-hybrid-3to1")
    cache = model.new_cache(1, 4)
    prefill(model, torch.zeros(1, 2, dtype=torch.long), None, cache)
    with pytest.raises(ValueError, match="cache: expected an empty cache"):
        StaticDecoder(model, cache, graph=False)
    cache.reset()
    dec = StaticDecoder(model, cache, graph=False)
    with pytest.raises(ValueError, match="steps: 5 more tokens would pass"):
        dec.run(torch.zeros(1, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="token_B: expected shape"):
        dec.run(torch.zeros(2, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="graph: CUDA graphs need"):
        StaticDecoder(model, model.new_cache(1, 4), graph=True)


def test_unsupported_letters_are_refused():
    model = _model("tiny-swa")
    cache = model.new_cache(1, 4)
    with pytest.raises(NotImplementedError, match="W"):
        model.decode_static(torch.zeros(1, 1, dtype=torch.long), cache, torch.zeros(1, dtype=torch.long))


def eager_greedy(model, ids, max_len, steps):
    """The reference: prefill, then ``steps`` greedy tokens through the eager cached decode, [B, steps]."""
    cache = model.new_cache(ids.shape[0], max_len)
    token, want = prefill(model, ids, None, cache).argmax(-1), []
    for _ in range(steps):
        token = decode_one_token(model, token, cache).argmax(-1)
        want.append(token)
    return torch.stack(want, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
@pytest.mark.parametrize("greedy_kernel", [False, True])
def test_static_decoder_graph_equals_eager_on_cuda(greedy_kernel, monkeypatch):
    # the token chosen by torch's argmax or by the greedy kernel (ops/triton/greedy.py) inside the graph
    import hybridlm.generation as generation

    monkeypatch.setattr(generation, "GREEDY_KERNEL", greedy_kernel)
    torch.manual_seed(0)
    model = HybridLM(HybridConfig.preset("tiny-qwen3-next")).cuda().eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 33), device="cuda")
    cache = model.new_cache(2, 33 + 9)
    dec = StaticDecoder(model, cache)
    assert (dec._greedy_scratch is not None) == greedy_kernel
    got = dec.run(prefill(model, ids, None, cache).argmax(-1), 8)
    assert got.dtype == torch.long and torch.equal(got, eager_greedy(model, ids, 42, 8))


def test_packed_experts_are_views_with_the_same_values_and_repack_after_to():
    from hybridlm.layers.moe import MoE

    torch.manual_seed(0)
    moe = MoE(HybridConfig(num_experts=4, num_experts_per_tok=2)).double()
    x = torch.randn(2, 3, moe.gate.in_features, dtype=torch.float64)
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    want = moe(x)
    gate, up, down = moe.packed_experts()
    I, D = moe.experts[0].gate_proj.out_features, moe.gate.in_features
    assert gate.shape == up.shape == (4, I, D) and down.shape == (4, D, I)
    assert gate.is_contiguous() and up.is_contiguous()
    # down is stored [D, E, I]: whole rows per expert, and one [D, E I] matrix for the batched path
    assert down.stride(2) == 1 and down.transpose(0, 1).is_contiguous()
    assert moe.experts[2].down_proj.weight.data_ptr() == down[2].data_ptr()
    assert all(torch.equal(before[k], v) for k, v in moe.state_dict().items())
    torch.testing.assert_close(moe(x), want, rtol=1e-12, atol=1e-12)  # the weights are views of the stacks now
    torch.testing.assert_close(moe(x, static=True), want, rtol=1e-12, atol=1e-12)
    moe = moe.float()  # new tensors: the next call stacks again
    assert moe.packed_experts()[0].dtype == torch.float32
    assert moe.experts[0].gate_proj.weight.data_ptr() == moe.packed_experts()[0][0].data_ptr()


@pytest.mark.parametrize("tokens", [1, 2, 3])  # tokens x 2 experts < 8 experts: the sparse op
def test_static_moe_paths_equal_the_routed_loop(tokens):
    from hybridlm.layers.moe import MoE

    torch.manual_seed(tokens)
    moe = MoE(HybridConfig(num_experts=8, num_experts_per_tok=2, shared_expert_intermediate_size=32)).double()
    x = torch.randn(tokens, 1, moe.gate.in_features, dtype=torch.float64)
    torch.testing.assert_close(moe(x, static=True), moe(x), rtol=1e-12, atol=1e-12)
    x = torch.randn(5, 1, moe.gate.in_features, dtype=torch.float64)  # 10 calls >= 8 experts: the dense path
    torch.testing.assert_close(moe(x, static=True), moe(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shared_gate", [True, False])  # Qwen's sigmoid-gated shared expert; DeepSeek's plain one
def test_static_moe_folds_the_shared_expert_only_where_nothing_is_bypassed(monkeypatch, shared_gate):
    """The sparse static path hands the shared expert's gate and up projections, gate logit and down
    weight to ``ops.moe_experts`` (one sum with the routed experts); with a forward hook on its down projection
    it runs that layer instead, so the hook still fires. Both equal the eager layer."""
    import hybridlm.layers.moe as moe_module
    from hybridlm.layers.moe import MoE

    torch.manual_seed(7)
    moe = MoE(HybridConfig(num_experts=8, num_experts_per_tok=2, shared_expert_intermediate_size=32,
                           shared_expert_gate=shared_gate)).double()
    assert (moe.shared_expert_gate is not None) == shared_gate
    x = torch.randn(2, 1, moe.gate.in_features, dtype=torch.float64)
    calls = []
    real = moe_module.moe_experts
    monkeypatch.setattr(moe_module, "moe_experts", lambda *a, **kw: calls.append(sorted(kw)) or real(*a, **kw))
    with torch.no_grad():  # as a decoder runs; with a gradient needed the layer runs as it is
        torch.testing.assert_close(moe(x, static=True), moe(x), rtol=1e-12, atol=1e-12)
        assert calls == [["shared_down_DS", "shared_gate_N", "shared_h_NS", "shared_up_NS"]]
        seen = []
        moe.shared_expert.down_proj.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
        calls.clear()
        torch.testing.assert_close(moe(x, static=True), moe(x), rtol=1e-12, atol=1e-12)
        assert calls == [[]] and len(seen) == 2  # the static call and the eager one both ran the layer
    calls.clear()
    torch.testing.assert_close(moe(x, static=True), moe(x), rtol=1e-12, atol=1e-12)
    assert calls == [[]]  # weights that need a gradient: no fold


def test_compiled_static_decoder_equals_eager_greedy():
    """torch.compile of the step (MoE routing, packed experts, GDN and attention decode) gives the same tokens."""
    torch.manual_seed(0)
    model = HybridLM(HybridConfig.preset("tiny-qwen3-next")).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    cache = model.new_cache(2, 16)
    dec = StaticDecoder(model, cache, graph=False, compile=True)
    got = dec.run(prefill(model, ids, None, cache).argmax(-1), 4)
    assert torch.equal(got, eager_greedy(model, ids, 16, 4))


def test_compiled_step_without_packing_first_leaves_the_weights_alone():
    """torch.compile(model.decode_static) with no pack_for_inference before it, between eager decode
    calls: the traced step stacks the experts inside the graph and leaves the parameters as they were
    (re-pointing them while traced broke the compiled step's input check on the real weights)."""
    torch.manual_seed(0)
    model = HybridLM(HybridConfig.preset("tiny-qwen3-next")).eval()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, 9), generator=torch.Generator().manual_seed(1))
    steps = torch.randint(0, vocab, (1, 3), generator=torch.Generator().manual_seed(2))
    layout = {n: (p.data_ptr(), p.stride()) for n, p in model.named_parameters()}
    eager, static = model.new_cache(1, 16), model.new_cache(1, 16)
    step = torch.compile(model.decode_static, fullgraph=True)
    slot = torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        prefill(model, ids, None, eager)
        prefill(model, ids, None, static)
        for t in range(steps.shape[1]):
            want = decode_one_token(model, steps[:, t], eager)
            slot.fill_(static.seq_len)
            got = step(steps[:, t:t + 1], static, slot)
            static.seq_len += 1
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert {n: (p.data_ptr(), p.stride()) for n, p in model.named_parameters()} == layout


def test_sample_race_draws_the_filtered_softmax():
    from hybridlm.generation import filter_logits, sample_race

    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(100_000, 1)
    for temperature, top_k, top_p in [(1.0, None, None), (0.7, 3, None), (1.3, None, 0.8), (1.0, 4, 0.9)]:
        want = filter_logits(logits[:1], temperature, top_k, top_p).softmax(-1)[0]
        got = torch.bincount(sample_race(logits, temperature, top_k, top_p, gen), minlength=6).double() / 1e5
        assert (got[want == 0] == 0).all()  # filtered tokens never drawn
        torch.testing.assert_close(got, want.double(), rtol=0, atol=0.006)  # ~4 standard errors at p = 0.5


def test_static_decoder_samples_inside_the_step():
    torch.manual_seed(0)
    model = HybridLM(HybridConfig.preset("tiny-qwen3-next")).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))

    def run(**kw):
        cache = model.new_cache(2, 20)
        dec = StaticDecoder(model, cache, graph=False, **kw)
        return dec.run(prefill(model, ids, None, cache).argmax(-1), 8)

    # top_k = 1 is greedy; a seeded generator repeats its draws; other seeds draw other tokens
    assert torch.equal(run(temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(1)),
                       eager_greedy(model, ids, 20, 8))
    a = run(temperature=1.5, top_k=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, run(temperature=1.5, top_k=5, generator=torch.Generator().manual_seed(1)))
    assert any(not torch.equal(a, run(temperature=1.5, top_k=5, generator=torch.Generator().manual_seed(s)))
               for s in (2, 3, 4))
    # every drawn token is among the top 5 of the eager model's logits after the same history
    cache = model.new_cache(2, 20)
    step_logits = decode_one_token(model, prefill(model, ids, None, cache).argmax(-1), cache)
    for i in range(8):
        assert (step_logits.topk(5, -1).indices == a[:, i:i + 1]).any(-1).all()
        step_logits = decode_one_token(model, a[:, i], cache)


@pytest.mark.parametrize("kw, match", [({"temperature": -1.0}, "temperature"), ({"top_k": 0}, "top_k"),
                                       ({"top_p": 1.5}, "top_p"),
                                       ({"graph": True, "generator": torch.Generator()}, "generator")])
def test_static_decoder_refuses_bad_sampling_arguments(kw, match):
    model = HybridLM(HybridConfig.preset("tiny-qwen3-next")).eval()
    with pytest.raises(ValueError, match=match):
        StaticDecoder(model, model.new_cache(1, 8), **kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
def test_graph_sampling_repeats_under_the_same_cuda_seed():
    torch.manual_seed(0)
    model = HybridLM(HybridConfig.preset("tiny-qwen3-next")).cuda().eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9), device="cuda")

    def run(seed, **kw):
        cache = model.new_cache(2, 20)
        dec = StaticDecoder(model, cache, **kw)
        first = prefill(model, ids, None, cache).argmax(-1)
        torch.cuda.manual_seed(seed)
        return dec.run(first, 8)

    assert torch.equal(run(1, temperature=1.0, top_k=1), eager_greedy(model, ids, 20, 8))
    assert torch.equal(run(1, temperature=1.5, top_p=0.9), run(1, temperature=1.5, top_p=0.9))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="programmatic dependent launch needs a GPU")
@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_batch1_bf16_step_with_and_without_pdl_on_cuda(pdl, compiled, monkeypatch):
    """The batch-1 bf16 step through the decode kernels (one-row matrix-vector kernel, add + norm and
    PDL launches when ``pdl``; compiled with inductor or not) against the eager cached decode."""
    from hybridlm.ops.triton import utils

    if pdl and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability >= 9")
    monkeypatch.setattr(utils, "PDL", pdl)
    _batch1_bf16_step_matches_eager(compiled)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused decode kernels run on CUDA")
@pytest.mark.parametrize("compiled", [False, True])
def test_batch1_bf16_step_with_the_fused_moe_and_conv_kernels_on_cuda(compiled, monkeypatch):
    """The batch-1 bf16 step with the fused MoE kernel (one launch, a grid barrier) and the conv inside
    the GDN decode kernel, eager and compiled, against the eager cached decode; both kernels ran."""
    from hybridlm.layers import gated_deltanet as gdn_module
    from hybridlm.layers import moe as moe_module
    from hybridlm.ops.triton import decode as decode_module
    from hybridlm.ops.triton import moe_decode as moe_decode_module

    def fused(on):
        monkeypatch.setattr(gdn_module, "CONV_FUSED", on)
        monkeypatch.setattr(moe_module, "MOE_FUSED", on)

    calls = []
    for mod, name in ((decode_module, "conv_decode_into"), (moe_decode_module, "moe_fused_into")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
    _batch1_bf16_step_matches_eager(compiled, fused)
    assert set(calls) == {"conv_decode_into", "moe_fused_into"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused norm kernel runs on CUDA")
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("norm_fused", [False, True])
def test_batch1_bf16_step_with_and_without_the_norms_in_the_products_on_cuda(norm_fused, compiled, monkeypatch):
    """The batch-1 bf16 step with each input norm inside the product after it (HYBRIDLM_NORM_FUSED, the
    default where PDL is on) and without, eager and compiled, against the eager cached decode."""
    from hybridlm.layers import packing
    from hybridlm.ops.triton import gemv

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the fused norm is taken where programmatic dependent launch is, compute capability >= 9")
    monkeypatch.setattr(packing, "NORM_FUSED", norm_fused)
    calls = []
    real = gemv._add_norm_linear_into
    monkeypatch.setattr(gemv, "_add_norm_linear_into", lambda *a: (calls.append(1), real(*a))[1])
    _batch1_bf16_step_matches_eager(compiled)
    assert bool(calls) == norm_fused


def _batch1_bf16_step_matches_eager(compiled, fused=None):
    """fused: a switch fused(on) for kernels the static step takes and the eager decode must not (it is
    the reference then)."""
    fused = fused or (lambda on: None)
    torch.manual_seed(0)
    # packed first, as StaticDecoder does: the path the profile times
    model = HybridLM(HybridConfig.preset("tiny-qwen3-next")).cuda().to(torch.bfloat16).eval().pack_for_inference()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, 9), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    steps = torch.randint(0, vocab, (1, 4), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    eager, static = model.new_cache(1, 20), model.new_cache(1, 20)
    with torch.no_grad():
        prefill(model, ids, None, eager)
        prefill(model, ids, None, static)
    step = torch.compile(model.decode_static, fullgraph=True) if compiled else model.decode_static
    torch.compiler.reset()
    slot = torch.zeros(1, dtype=torch.long, device="cuda")
    for t in range(steps.shape[1]):
        fused(False)
        with torch.no_grad():
            want = decode_one_token(model, steps[:, t], eager).float()
        fused(True)
        slot.fill_(static.seq_len)
        got = step(steps[:, t:t + 1], static, slot).float()
        static.seq_len += 1
        assert ((got - want).norm() / want.norm()).item() < 3e-2
