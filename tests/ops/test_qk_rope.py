"""The attention decode prologue kernel (q/k RMSNorm, partial rotary, cache write) against the layer's
own modules, and GatedAttention's static decode step with the kernel against the step without it.

Legend: B rows, H query heads, HKV key/value heads, D head dim, R rotated channels, S cache slots.
Without CUDA the kernel runs under Triton's interpreter (float32, small shapes).
"""

import doctest
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first import of the kernel module: @triton.jit picks interpreter or compiler
    # when the kernel is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hybridlm.cache import KVSlot  # noqa: E402
from hybridlm.config import HybridConfig  # noqa: E402
from hybridlm.layers import attention as attention_module  # noqa: E402
from hybridlm.layers.attention import GatedAttention  # noqa: E402
from hybridlm.layers.norms import RMSNorm  # noqa: E402
from hybridlm.layers.rotary import RotaryEmbedding  # noqa: E402
from hybridlm.layers.step import Tokens  # noqa: E402
from hybridlm.ops.triton import qk_rope  # noqa: E402
from hybridlm.ops.triton.qk_rope import qk_norm_rope_decode  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def reference(q, k, v, pos, slot, k_cache, v_cache, R, theta, q_w, k_w, eps, zc):
    """The layer's modules: RMSNorm per head, RotaryEmbedding at max(pos, 0), index_copy_ into the cache."""
    rope = RotaryEmbedding(R, theta)
    if q_w is not None:
        qn, kn = RMSNorm(q.shape[-1], eps, zc).to(q.device), RMSNorm(q.shape[-1], eps, zc).to(q.device)
        with torch.no_grad():
            qn.weight.copy_(q_w)
            kn.weight.copy_(k_w)
        q, k = qn(q), kn(k)
    p = pos.clamp(min=0)[:, None]
    q, k = rope(q[:, None], p)[:, 0], rope(k[:, None], p)[:, 0]
    k_cache.index_copy_(1, slot, k[:, None].to(k_cache.dtype))
    v_cache.index_copy_(1, slot, v[:, None].to(v_cache.dtype))
    return q


def inputs(B, H, HKV, D, S, dtype, seed, gated=True, cache_dtype=None):
    """q, k, v as views of one packed projection row per token ([q, gate] per head, then k, then v),
    norm weights, positions (one large, one -1 when B > 2), a NaN-filled cache."""
    gen = torch.Generator().manual_seed(seed)
    qw = 2 * D if gated else D
    wide = torch.randn(B, H * qw + 2 * HKV * D + 8, generator=gen).to(DEVICE, dtype)
    q = wide[:, :H * qw].view(B, H, qw)[..., :D]
    k = wide[:, H * qw:H * qw + HKV * D].view(B, HKV, D)
    v = wide[:, H * qw + HKV * D:H * qw + 2 * HKV * D].view(B, HKV, D)
    q_w, k_w = (0.3 * torch.randn(D, generator=gen)).to(DEVICE), (0.3 * torch.randn(D, generator=gen)).to(DEVICE)
    pos = torch.randint(0, 5000, (B,), generator=gen)
    if B > 1:
        pos[1] = 250_000
    if B > 2:
        pos[2] = -1
    cache = torch.full((B, S, HKV, D), float("nan"), dtype=cache_dtype or dtype, device=DEVICE)
    return q, k, v, q_w, k_w, pos.to(DEVICE), cache


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, H, HKV, D, R", [(1, 4, 2, 32, 8), (3, 2, 2, 16, 16), (2, 6, 3, 40, 10),
                                             (3, 4, 1, 64, 2)])
@pytest.mark.parametrize("norm, zc", [(True, True), (True, False), (False, False)])
def test_kernel_matches_the_layer_modules(B, H, HKV, D, R, norm, zc, dtype):
    S, theta, eps = 7, 10_000.0, 1e-6
    q, k, v, q_w, k_w, pos, cache = inputs(B, H, HKV, D, S, dtype, seed=B * D + R)
    if not norm:
        q_w = k_w = None
    slot = torch.tensor([S - 2], device=DEVICE)
    inv = RotaryEmbedding(R, theta).inv_freq(DEVICE)
    kc, vc, kc_ref, vc_ref = cache.clone(), cache.clone(), cache.clone(), cache.clone()
    got = torch.full((B, H, D), float("nan"), dtype=dtype, device=DEVICE)  # poisoned: every element written
    qk_rope.qk_norm_rope_into(q, k, v, pos, slot, kc, vc, got, inv, q_w, k_w, eps, zc)
    want = reference(q, k, v, pos, slot, kc_ref, vc_ref, R, theta, q_w, k_w, eps, zc)
    torch.testing.assert_close(qk_norm_rope_decode(q, k, v, pos, slot, kc.clone(), vc.clone(), inv, q_w, k_w, eps, zc),
                               got, rtol=0, atol=0)
    tol = dict(rtol=0, atol=2e-5) if dtype == torch.float32 else dict(rtol=0, atol=1.6e-2)  # bf16: 1 unit at |x| < 4
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(kc[:, S - 2], kc_ref[:, S - 2], **tol)
    assert torch.equal(vc[:, S - 2], vc_ref[:, S - 2])
    others = [s for s in range(S) if s != S - 2]
    assert kc[:, others].isnan().all() and vc[:, others].isnan().all(), "only the step's slot may be written"


def test_returns_a_new_contiguous_query_tensor():
    q, k, v, q_w, k_w, pos, cache = inputs(2, 4, 2, 16, 3, torch.float32, seed=21)
    out = qk_norm_rope_decode(q, k, v, pos, torch.tensor([1], device=DEVICE), cache.clone(), cache.clone(),
                              RotaryEmbedding(8, 1e4).inv_freq(DEVICE), q_w, k_w)
    assert out.is_contiguous() and out.shape == (2, 4, 16) and out.data_ptr() != q.data_ptr()


def test_cache_of_another_dtype_and_the_unrotated_tail():
    B, H, HKV, D, R, S = 2, 2, 1, 32, 8, 4
    q, k, v, q_w, k_w, pos, cache = inputs(B, H, HKV, D, S, torch.float32, seed=3, cache_dtype=torch.float64)
    slot = torch.tensor([0], device=DEVICE)
    inv = RotaryEmbedding(R, 1e6).inv_freq(DEVICE)
    kc, vc = cache.clone(), cache.clone()
    got = qk_norm_rope_decode(q, k, v, pos, slot, kc, vc, inv, q_w, k_w, 1e-5, True)
    kc_ref, vc_ref = cache.clone(), cache.clone()
    want = reference(q, k, v, pos, slot, kc_ref, vc_ref, R, 1e6, q_w, k_w, 1e-5, True)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    torch.testing.assert_close(kc[:, 0], kc_ref[:, 0], rtol=0, atol=2e-5)
    assert kc.dtype == torch.float64 and torch.equal(vc[:, 0], v.double())
    # channels past R are normalised only
    normed = RMSNorm(D, 1e-5, True).to(DEVICE)
    with torch.no_grad():
        normed.weight.copy_(q_w)
        torch.testing.assert_close(got[..., R:], normed(q)[..., R:], rtol=0, atol=2e-6)


@pytest.mark.parametrize("change, error, words", [
    (dict(q=torch.zeros(1, 4)), ValueError, r"q_BHD must be a 3-D float tensor \[B, heads, D\]"),
    (dict(k=torch.zeros(1, 2, 8)), ValueError, r"k_BHD and v_BHD must be \[B, HKV, D\] with B = 1, D = 16"),
    (dict(v=torch.zeros(1, 2, 16, dtype=torch.float64)), TypeError, "must share one dtype"),
    (dict(k_cache=torch.zeros(1, 4, 3, 16)), ValueError, r"k_cache must be \[B, S, HKV, D\] = \[1, S, 2, 16\]"),
    (dict(pos=torch.zeros(2, dtype=torch.long)), ValueError, r"pos_B must be an integer tensor \[B\] = \[1\]"),
    (dict(slot=torch.zeros(2, dtype=torch.long)), ValueError, "slot must be an integer tensor of one element"),
    (dict(inv=torch.ones(9)), ValueError, r"inv_freq must be a float32 tensor \[R / 2\] with 0 < R <= D = 16"),
    (dict(q_w=None), ValueError, "q_weight and k_weight go together"),
    (dict(k_w=torch.ones(8)), ValueError, r"k_weight must be a float tensor \[D\] = \[16\]"),
])
def test_bad_inputs_name_the_argument(change, error, words):
    args = dict(q=torch.zeros(1, 4, 16), k=torch.zeros(1, 2, 16), v=torch.zeros(1, 2, 16),
                pos=torch.zeros(1, dtype=torch.long), slot=torch.zeros(1, dtype=torch.long),
                k_cache=torch.zeros(1, 4, 2, 16), v_cache=torch.zeros(1, 4, 2, 16), inv=torch.ones(4),
                q_w=torch.ones(16), k_w=torch.ones(16))
    args.update(change)
    args = {n: (t.to(DEVICE) if isinstance(t, torch.Tensor) else t) for n, t in args.items()}
    with pytest.raises(error, match=words):
        qk_norm_rope_decode(args["q"], args["k"], args["v"], args["pos"], args["slot"], args["k_cache"],
                            args["v_cache"], args["inv"], args["q_w"], args["k_w"])


def _op_args(seed=5):
    q, k, v, q_w, k_w, pos, cache = inputs(2, 4, 2, 16, 5, torch.float32, seed=seed)
    return (q, k, v, pos, torch.tensor([3], device=DEVICE), cache.clone(), cache.clone(),
            RotaryEmbedding(8, 1e4).inv_freq(DEVICE), q_w, k_w, 1e-6, True)


def test_custom_op_passes_opcheck():
    args = list(_op_args())
    args[5], args[6] = torch.zeros_like(args[5]), torch.zeros_like(args[6])  # opcheck compares caches: no NaN
    torch.library.opcheck(torch.ops.hybridlm.qk_norm_rope_decode.default, tuple(args))


def test_torch_compile_fullgraph_matches_eager():
    def step(*args):
        return qk_norm_rope_decode(*args) * 2.0

    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    args = _op_args()
    eager_args = list(args)
    eager_args[5], eager_args[6] = args[5].clone(), args[6].clone()
    got = torch.compile(step, fullgraph=True, backend=backend)(*args)
    want = step(*eager_args)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(args[5][:, 3], eager_args[5][:, 3])  # the compiled graph wrote the cache
    torch.testing.assert_close(args[6][:, 3], eager_args[6][:, 3])


def _layer_and_step(gated, zero_centered, seed=0):
    cfg = HybridConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                       partial_rotary_factor=0.25, attn_output_gate=gated, norm_zero_centered=zero_centered)
    torch.manual_seed(seed)
    layer = GatedAttention(cfg).to(DEVICE)
    with torch.no_grad():
        layer.q_norm.weight.normal_(0, 0.3)
        layer.k_norm.weight.normal_(0, 0.3)
    layer.pack_for_inference()
    B, S = 2, 6
    filled = torch.randn(B, S, 2, 32, device=DEVICE)
    k_pos = torch.full((B, S), -1, device=DEVICE, dtype=torch.long)
    k_pos[:, :4] = torch.arange(4, device=DEVICE)
    k_pos[:, 4] = 4  # the new token's slot, as decode_static writes the positions before the layers
    x = torch.randn(B, 1, 64, device=DEVICE)
    tokens = Tokens(torch.full((B, 1), 4, device=DEVICE, dtype=torch.long), None, 0,
                    slot=torch.tensor([4], device=DEVICE))
    return layer, x, tokens, filled, k_pos


@pytest.mark.parametrize("gated, zero_centered", [(True, True), (False, False)])
def test_layer_decode_step_with_the_kernel_equals_the_step_without(monkeypatch, gated, zero_centered):
    """On CUDA the layer takes the kernel by itself; on CPU it is handed the interpreted kernel here."""
    layer, x, tokens, filled, k_pos = _layer_and_step(gated, zero_centered)
    used = []

    def kernel_for(name, *args, **kwargs):
        used.append(name)
        return qk_norm_rope_decode if name == "qk_norm_rope_decode" else None

    outs = {}
    for fused in (True, False):
        slot = KVSlot(filled.clone(), filled.clone(), k_pos, ring=False)
        if fused:
            monkeypatch.setattr(attention_module, "inference_kernel", kernel_for)
        else:
            monkeypatch.setattr(attention_module, "inference_kernel", lambda *a, **k: None)
        with torch.no_grad():
            outs[fused] = (layer(x, tokens, slot), slot.k, slot.v)
    assert used == ["qk_norm_rope_decode"]
    for got, want in zip(outs[True], outs[False]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_layer_without_kept_frequencies_runs_its_own_ops(monkeypatch):
    layer, x, tokens, filled, k_pos = _layer_and_step(True, True)
    del layer._rope_inv_freq  # e.g. packed before the rotary frequencies were kept
    monkeypatch.setattr(attention_module, "inference_kernel", lambda *a, **k: pytest.fail("kernel asked for"))
    with torch.no_grad():
        out = layer(x, tokens, KVSlot(filled.clone(), filled.clone(), k_pos, ring=False))
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_layer_takes_the_kernel_by_itself_on_cuda(monkeypatch):
    layer, x, tokens, filled, k_pos = _layer_and_step(True, True)
    calls = []
    monkeypatch.setattr(qk_rope, "qk_norm_rope_into", lambda *a, real=qk_rope.qk_norm_rope_into: (calls.append(1),
                                                                                                  real(*a))[1])
    with torch.no_grad():
        layer(x, tokens, KVSlot(filled.clone(), filled.clone(), k_pos, ring=False))
    assert calls


def test_docstring_example():
    result = doctest.testmod(qk_rope, extraglobs={"torch": torch}, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
