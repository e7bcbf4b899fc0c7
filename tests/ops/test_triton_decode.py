"""Triton decode step against the reference step and the token-loop recurrence.

Legend: B batch, H q/k heads, HV value heads, K key size, V value size. On a machine without CUDA
the kernel runs under Triton's interpreter (float32 only, tiny shapes); on a GPU natively, in
float32 and bf16.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first import of the kernel module: @triton.jit picks interpreter or compiler
    # when the kernel is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from hybridlm.ops import gated_delta_rule_naive, gated_delta_rule_step  # noqa: E402
from hybridlm.ops.triton.decode import decode_into  # noqa: E402
from hybridlm.ops.triton.decode import fused_recurrent_gated_delta_rule_step as step  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
# (B, H, HV, K, V): single head; HV = 2H with K, V not powers of two; V spread over two blocks
# with a masked tail; K != V; K = 4 (the GPU study's key dim).
SHAPES = [(1, 1, 1, 16, 16), (2, 2, 4, 12, 20), (3, 2, 2, 32, 72), (2, 2, 4, 4, 16)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_token(B, H, HV, K, V, dtype, gen, T=None):
    """Random q, k [B, (T,) H, K], v [B, (T,) HV, V], g, beta [B, (T,) HV] on DEVICE."""
    t = () if T is None else (T,)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE)

    q, k = rnd(B, *t, H, K).to(dtype), rnd(B, *t, H, K).to(dtype)
    v = rnd(B, *t, HV, V).to(dtype)
    g = F.logsigmoid(rnd(B, *t, HV) + 2.0)  # decays in (0, 1), mostly near 1, as trained models have
    beta = torch.rand(B, *t, HV, generator=gen).to(DEVICE)
    return q, k, v, g, beta


def make_state(B, HV, K, V, gen):
    return (0.3 * torch.randn(B, HV, K, V, generator=gen)).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_qk_l2norm", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_consecutive_steps_match_token_loop(shape, use_qk_l2norm, dtype):
    B, H, HV, K, V = shape
    gen = torch.Generator().manual_seed(sum(shape))
    T = 4
    q, k, v, g, beta = make_token(B, H, HV, K, V, dtype, gen, T=T)
    if not use_qk_l2norm:  # unit keys keep the state bounded, as the l2-norm would
        q, k = F.normalize(q.float(), dim=-1).to(dtype), F.normalize(k.float(), dim=-1).to(dtype)
    h0 = make_state(B, HV, K, V, gen)
    o_ref, state_ref = gated_delta_rule_naive(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                              use_qk_l2norm=use_qk_l2norm)
    state = h0
    for t in range(T):
        o, state = step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state, use_qk_l2norm=use_qk_l2norm)
        assert o.dtype == dtype and o.shape == (B, HV, V)
        assert rel_err(o, o_ref[:, t]) < TOL[dtype], f"o at step {t}"
    assert state.dtype == torch.float32
    assert rel_err(state, state_ref) < TOL[torch.float32]


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_step_with_scale(shape):
    B, H, HV, K, V = shape
    gen = torch.Generator().manual_seed(7)
    q, k, v, g, beta = make_token(B, H, HV, K, V, torch.float32, gen)
    h0 = make_state(B, HV, K, V, gen)
    o_ref, s_ref = gated_delta_rule_step(q, k, v, g, beta, h0, scale=0.3, use_qk_l2norm=True,
                                         backend="reference")
    o, s = step(q, k, v, g, beta, h0, scale=0.3, use_qk_l2norm=True)
    assert rel_err(o, o_ref) < TOL[torch.float32]
    assert rel_err(s, s_ref) < TOL[torch.float32]


def test_inplace_updates_state_and_out_of_place_leaves_it():
    B, H, HV, K, V = SHAPES[1]
    gen = torch.Generator().manual_seed(3)
    q, k, v, g, beta = make_token(B, H, HV, K, V, torch.float32, gen)
    h0 = make_state(B, HV, K, V, gen)
    before = h0.clone()
    o, s = step(q, k, v, g, beta, h0, use_qk_l2norm=True)
    assert torch.equal(h0, before) and s.data_ptr() != h0.data_ptr()
    o2, s2 = step(q, k, v, g, beta, h0, use_qk_l2norm=True, inplace=True)
    assert s2 is h0
    torch.testing.assert_close(o2, o, rtol=0, atol=0)
    torch.testing.assert_close(h0, s, rtol=0, atol=0)


def test_strided_inputs_give_contiguous_results():
    B, H, HV, K, V = SHAPES[1]
    gen = torch.Generator().manual_seed(13)
    q, k, v, g, beta = make_token(B, H, HV, K, V, torch.float32, gen)
    h0 = make_state(B, HV, K, V, gen)
    # the same values laid out head-major (a transpose's view): every stride differs from contiguous
    v_t = v.transpose(0, 1).contiguous().transpose(0, 1)
    q_t, h_t = q.transpose(0, 1).contiguous().transpose(0, 1), h0.transpose(0, 1).contiguous().transpose(0, 1)
    assert not v_t.is_contiguous() and not h_t.is_contiguous()
    o_ref, s_ref = gated_delta_rule_step(q, k, v, g, beta, h0, use_qk_l2norm=True, backend="reference")
    o, s = step(q_t, k, v_t, g, beta, h_t, use_qk_l2norm=True)
    assert rel_err(o, o_ref) < TOL[torch.float32]
    assert rel_err(s, s_ref) < TOL[torch.float32]


def _row_views(q, k, v, g, beta):
    """q, k, v, g, beta as column slices of one [B, C] tensor (a layer's projection output): each
    row's heads packed, rows C apart. Returns (views, the wide tensor)."""
    B = q.shape[0]
    parts = [t.reshape(B, -1) for t in (q, k, v, g.to(q.dtype), beta.to(q.dtype))]
    wide = torch.cat(parts + [torch.zeros(B, 3, device=q.device, dtype=q.dtype)], dim=1)
    views, at = [], 0
    for t, p in zip((q, k, v, g, beta), parts):
        views.append(wide[:, at:at + p.shape[1]].view(t.shape))
        at += p.shape[1]
    return views, wide


@pytest.mark.parametrize("shape", SHAPES)
def test_row_views_of_one_projection_read_in_place(shape, monkeypatch):
    """q, k, v, g, beta sliced from one wide row tensor reach the kernel as they are (no copy), in
    eager calls and through the custom ops, and give what contiguous copies give."""
    from hybridlm.ops.triton import decode as decode_mod

    B, H, HV, K, V = shape
    gen = torch.Generator().manual_seed(sum(shape) + 7)
    q, k, v, g, beta = make_token(B, H, HV, K, V, torch.float32, gen)
    h0 = make_state(B, HV, K, V, gen)
    views, wide = _row_views(q, k, v, g, beta)
    if B > 1:
        assert not views[0].is_contiguous() and views[0].stride(0) == wide.shape[1]
    seen = []
    real = decode_mod.decode_into
    monkeypatch.setattr(decode_mod, "decode_into", lambda *a, **kw: seen.append(a[:5]) or real(*a, **kw))
    want_o, want_s = step(*(t.contiguous() for t in views), h0, use_qk_l2norm=True)
    o, s = step(*views, h0, use_qk_l2norm=True)
    assert all(got.data_ptr() == t.data_ptr() for got, t in zip(seen[-1], views))
    torch.testing.assert_close(o, want_o, rtol=0, atol=0)
    torch.testing.assert_close(s, want_s, rtol=0, atol=0)
    for op in (torch.ops.hybridlm.gdn_decode_step, torch.ops.hybridlm.gdn_decode_step_):
        state = h0.clone()
        out = op(*views, state, K ** -0.5, True, None, None, False, False)
        assert all(got.data_ptr() == t.data_ptr() for got, t in zip(seen[-1], views))
        torch.testing.assert_close(out[0] if isinstance(out, tuple) else out, want_o, rtol=0, atol=0)
    o_ref, s_ref = gated_delta_rule_step(q, k, v, g, beta, h0, use_qk_l2norm=True, backend="reference")
    assert rel_err(o, o_ref) < TOL[torch.float32] and rel_err(s, s_ref) < TOL[torch.float32]


def test_rows_with_unpacked_heads_are_copied():
    """A view whose heads are not packed within a row (every other head of a wider tensor) is copied
    first, with the same result."""
    B, H, HV, K, V = SHAPES[1]
    gen = torch.Generator().manual_seed(17)
    q, k, v, g, beta = make_token(B, H, HV, K, V, torch.float32, gen)
    h0 = make_state(B, HV, K, V, gen)
    v_sparse = torch.stack([v, torch.full_like(v, float("nan"))], dim=2).flatten(1, 2)[:, ::2]
    assert v_sparse.stride(1) == 2 * V and torch.equal(v_sparse, v)
    o, s = step(q, k, v_sparse, g, beta, h0, use_qk_l2norm=True)
    want_o, want_s = step(q, k, v, g, beta, h0, use_qk_l2norm=True)
    torch.testing.assert_close(o, want_o, rtol=0, atol=0)
    torch.testing.assert_close(s, want_s, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_public_step_takes_beta_logits(backend):
    """gated_delta_rule_step(beta_is_logit=True) applies the sigmoid, on either backend."""
    B, H, HV, K, V = SHAPES[1]
    gen = torch.Generator().manual_seed(19)
    q, k, v, g, _ = make_token(B, H, HV, K, V, torch.float32, gen)
    logit = (4 * torch.randn(B, HV, generator=gen)).to(DEVICE)
    h0 = make_state(B, HV, K, V, gen)
    want = gated_delta_rule_step(q, k, v, g, logit.sigmoid(), h0, use_qk_l2norm=True, backend="reference")
    got = gated_delta_rule_step(q, k, v, g, logit, h0, use_qk_l2norm=True, backend=backend, beta_is_logit=True)
    for a, b in zip(got, want):
        assert rel_err(a, b) < TOL[torch.float32]
    with pytest.raises(TypeError, match="beta_is_logit must be a bool"):
        gated_delta_rule_step(q, k, v, g, logit, h0, beta_is_logit=1)


@pytest.mark.parametrize("with_dt_bias", [True, False])
def test_fused_gate_and_beta_logit(with_dt_bias):
    B, H, HV, K, V = SHAPES[1]
    gen = torch.Generator().manual_seed(11)
    q, k, v, _, _ = make_token(B, H, HV, K, V, torch.float32, gen)
    # raw gate inputs across softplus's regimes: far below -15, around 0, above the threshold 20
    a = (torch.linspace(-40.0, 30.0, B * HV).reshape(B, HV)).to(DEVICE)
    beta_logit = (4 * torch.randn(B, HV, generator=gen)).to(DEVICE)
    A_log = torch.randn(HV, generator=gen).to(DEVICE)
    dt_bias = torch.randn(HV, generator=gen).to(DEVICE) if with_dt_bias else None
    h0 = make_state(B, HV, K, V, gen)
    g = -A_log.exp() * F.softplus(a + (dt_bias if with_dt_bias else 0.0))
    o_ref, s_ref = gated_delta_rule_step(q, k, v, g, beta_logit.sigmoid(), h0, use_qk_l2norm=True,
                                         backend="reference")
    o, s = step(q, k, v, a, beta_logit, h0, use_qk_l2norm=True, A_log=A_log, dt_bias=dt_bias,
                beta_is_logit=True)
    assert rel_err(o, o_ref) < TOL[torch.float32]
    assert rel_err(s, s_ref) < TOL[torch.float32]


@pytest.mark.parametrize("block_v, programs_per_sm, stream, stages", [
    (8, None, False, 1), (16, None, False, 1), (64, None, False, 1),
    # a persistent grid striding over the tiles (on CPU one "SM": 3 programs for 12 or 24 tiles),
    # and the streaming cache hints
    (8, 3, False, 1), (16, 3, True, 1), (64, None, True, 1),
    # the software-pipelined persistent loop (its prefetch runs past the last tile of a program)
    (8, 3, False, 3), (16, 5, False, 2)])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("one_reduce", [False, True])
def test_every_output_element_written(block_v, programs_per_sm, stream, stages, inplace, one_reduce):
    B, H, HV, K, V = SHAPES[1]
    gen = torch.Generator().manual_seed(5)
    q, k, v, g, beta = make_token(B, H, HV, K, V, torch.float32, gen)
    h0 = make_state(B, HV, K, V, gen)
    o = torch.full((B, HV, V), float("nan"), device=DEVICE)
    o_ref, s_ref = gated_delta_rule_step(q, k, v, g, beta, h0, use_qk_l2norm=True, backend="reference")
    new_state = h0 if inplace else torch.full_like(h0, float("nan"))
    decode_into(q, k, v, g, beta, h0, new_state, o, scale=K ** -0.5, use_qk_l2norm=True, A_log=None,
                dt_bias=None, beta_is_logit=False, block_v=block_v, programs_per_sm=programs_per_sm,
                stream=stream, stages=stages, one_reduce=one_reduce)
    assert not o.isnan().any() and not new_state.isnan().any()
    assert rel_err(o, o_ref) < TOL[torch.float32]
    assert rel_err(new_state, s_ref) < TOL[torch.float32]


@pytest.mark.parametrize("block_v, programs_per_sm", [(8, None), (64, None), (8, 3)])
@pytest.mark.parametrize("inplace", [False, True])
def test_state_read_first_gives_the_same_step(block_v, programs_per_sm, inplace):
    """``state_early`` reads each state tile first (on a GPU under PDL: before the wait for the
    preceding kernel). The step must match the default order and the reference, every output written
    (bit-identical under the interpreter; compiled, the changed order may round the last bit)."""
    B, H, HV, K, V = SHAPES[1]
    gen = torch.Generator().manual_seed(6)
    q, k, v, g, beta = make_token(B, H, HV, K, V, torch.float32, gen)
    h0 = make_state(B, HV, K, V, gen)
    got = []
    for early in (False, True):
        o = torch.full((B, HV, V), float("nan"), device=DEVICE)
        state_in = h0.clone()
        new_state = state_in if inplace else torch.full_like(h0, float("nan"))
        decode_into(q, k, v, g, beta, state_in, new_state, o, scale=K ** -0.5, use_qk_l2norm=True, A_log=None,
                    dt_bias=None, beta_is_logit=False, block_v=block_v, programs_per_sm=programs_per_sm,
                    state_early=early)
        assert not o.isnan().any() and not new_state.isnan().any()
        got.append((o, new_state))
    o_ref, s_ref = gated_delta_rule_step(q, k, v, g, beta, h0, use_qk_l2norm=True, backend="reference")
    tol = 0 if DEVICE == "cpu" else 1e-6
    assert rel_err(got[1][0], got[0][0]) <= tol and rel_err(got[1][1], got[0][1]) <= tol
    assert rel_err(got[1][0], o_ref) < TOL[torch.float32] and rel_err(got[1][1], s_ref) < TOL[torch.float32]


def test_settled_state_steps_match_reference():
    """Public ``state_settled=True``: a loop of steps on one state, each after a plain (non-PDL) torch
    kernel that writes the state, as a static decode step's embedding runs before its layers."""
    B, H, HV, K, V = SHAPES[2]
    gen = torch.Generator().manual_seed(7)
    state = make_state(B, HV, K, V, gen)
    ref = state.clone()
    for _ in range(4):
        q, k, v, g, beta = make_token(B, H, HV, K, V, torch.float32, gen)
        state.mul_(1.0)  # a plain launch between the steps
        o, state = step(q, k, v, g, beta, state, use_qk_l2norm=True, inplace=True, state_settled=True)
        o_ref, ref = gated_delta_rule_step(q, k, v, g, beta, ref, use_qk_l2norm=True, backend="reference")
        assert rel_err(o, o_ref) < TOL[torch.float32]
    assert rel_err(state, ref) < TOL[torch.float32]
    with pytest.raises(TypeError, match="state_settled must be a bool"):
        step(q, k, v, g, beta, state, state_settled=1)
    with pytest.raises(TypeError, match="state_settled must be a bool"):
        gated_delta_rule_step(q, k, v, g, beta, state, state_settled="yes")


def _good_args(B=2, H=2, HV=4, K=8, V=8):
    gen = torch.Generator().manual_seed(0)
    q, k, v, g, beta = make_token(B, H, HV, K, V, torch.float32, gen)
    return dict(q=q, k=k, v=v, g=g, beta=beta, state=make_state(B, HV, K, V, gen))


@pytest.mark.parametrize("name, bad, error, words", [
    ("q", lambda a: a["q"][0], ValueError, "q must be a 3-D"),
    ("k", lambda a: a["k"][:, :1], ValueError, "k must have shape"),
    ("v", lambda a: a["v"][:, :3], ValueError, "multiple of"),
    ("v", lambda a: a["v"][:1], ValueError, "batch"),
    ("g", lambda a: a["g"][:, :1], ValueError, "g must have shape"),
    ("beta", lambda a: a["beta"].tolist(), TypeError, "beta must be a torch.Tensor"),
    ("state", lambda a: a["state"].double(), TypeError, "state must be float32"),
    ("state", lambda a: a["state"][..., :4], ValueError, "state must have shape"),
    ("q", lambda a: a["q"].long(), TypeError, "q must be a floating-point"),
    ("k", lambda a: a["k"].half(), TypeError, "k must have q's dtype"),
])
def test_bad_inputs_raise(name, bad, error, words):
    args = _good_args()
    args[name] = bad(args)
    with pytest.raises(error, match=words):
        step(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("g"), args.pop("beta"), args.pop("state"))


def test_bad_gate_and_inplace_arguments_raise():
    a = _good_args()
    with pytest.raises(ValueError, match="dt_bias"):
        step(a["q"], a["k"], a["v"], a["g"], a["beta"], a["state"], dt_bias=torch.zeros(4, device=DEVICE))
    with pytest.raises(ValueError, match="A_log must have shape"):
        step(a["q"], a["k"], a["v"], a["g"], a["beta"], a["state"], A_log=torch.zeros(3, device=DEVICE))
    strided = a["state"].transpose(-1, -2)
    with pytest.raises(ValueError, match="contiguous"):
        step(a["q"], a["k"], a["v"], a["g"], a["beta"], strided, inplace=True)


def test_custom_ops_pass_opcheck():
    a = _good_args()
    for settled in (False, True):
        args = (a["q"], a["k"], a["v"], a["g"], a["beta"], a["state"], 0.25, True, None, None, False, settled)
        torch.library.opcheck(torch.ops.hybridlm.gdn_decode_step.default, args)
        torch.library.opcheck(torch.ops.hybridlm.gdn_decode_step_.default, args)


def test_torch_compile_fullgraph_matches_eager():
    a = _good_args()

    def decode_twice(q, k, v, g, beta, state):
        o1, state = step(q, k, v, g, beta, state, use_qk_l2norm=True, inplace=True)
        o2, state = step(q, k, o1, g, beta, state, use_qk_l2norm=True, inplace=True)
        return o2 * 2.0

    # On CPU the compiled graph runs eagerly around the opaque op (no C++ toolchain needed); what is
    # checked there is that dynamo traces the op with its fake implementation and mutation.
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(decode_twice, fullgraph=True, backend=backend)
    s_eager, s_comp = a["state"].clone(), a["state"].clone()
    out_eager = decode_twice(a["q"], a["k"], a["v"], a["g"], a["beta"], s_eager)
    out_comp = compiled(a["q"], a["k"], a["v"], a["g"], a["beta"], s_comp)
    torch.testing.assert_close(out_comp, out_eager)
    torch.testing.assert_close(s_comp, s_eager)
    # the inputs as row views of one projection output, sliced inside the compiled function
    views, wide = _row_views(a["q"], a["k"], a["v"], a["g"], a["beta"])
    shapes = [t.shape for t in views]

    def decode_from_rows(wide, state):
        cuts = [t.shape[1:].numel() for t in views]
        parts = torch.split(wide, cuts + [wide.shape[1] - sum(cuts)], dim=1)[:5]
        q, k, v, g, beta = (p.view(shape) for p, shape in zip(parts, shapes))
        o, state = step(q, k, v, g, beta, state, use_qk_l2norm=True, inplace=True)
        return o * 2.0

    s_eager, s_comp = a["state"].clone(), a["state"].clone()
    out_eager = decode_from_rows(wide, s_eager)
    out_comp = torch.compile(decode_from_rows, fullgraph=True, backend=backend)(wide, s_comp)
    torch.testing.assert_close(out_comp, out_eager)
    torch.testing.assert_close(s_comp, s_eager)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_capture_of_decode_steps():
    B, H, HV, K, V = 4, 2, 4, 64, 64
    gen = torch.Generator().manual_seed(9)
    q, k, v, g, beta = make_token(B, H, HV, K, V, torch.bfloat16, gen)
    h0 = make_state(B, HV, K, V, gen)
    state = h0.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up compiles the kernel outside the capture
        step(q, k, v, g, beta, state.clone(), use_qk_l2norm=True, inplace=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o, _ = step(q, k, v, g, beta, state, use_qk_l2norm=True, inplace=True)
    s_ref = h0
    for _ in range(3):
        graph.replay()
        o_ref, s_ref = gated_delta_rule_step(q, k, v, g, beta, s_ref, use_qk_l2norm=True, backend="reference")
        assert rel_err(o, o_ref) < TOL[torch.bfloat16]
    assert rel_err(state, s_ref) < TOL[torch.float32]


def test_state_read_early_only_where_it_paid(monkeypatch):
    from hybridlm.ops.triton import decode as decode_mod

    monkeypatch.setattr(decode_mod, "_num_sms", lambda device: 132)
    monkeypatch.setattr(decode_mod, "pdl", lambda device: True)
    dev = torch.device(DEVICE)
    assert decode_mod._read_state_early(True, 1, 32, 128, dev)  # 64 tiles
    assert not decode_mod._read_state_early(False, 1, 32, 128, dev)  # no promise, no early read
    assert not decode_mod._read_state_early(True, 8, 32, 128, dev)  # 512 tiles: slower there
    monkeypatch.setattr(decode_mod, "pdl", lambda device: False)
    assert not decode_mod._read_state_early(True, 1, 32, 128, dev)  # without PDL nothing to overlap


def test_block_choice_by_batch(monkeypatch):
    """The launch the H200 sweep measured fastest at Qwen3-Next's heads (HV 32, V 128, 132 SMs):
    16 columns, 1 warp, one-pass reduction at batch 1; 32 columns, 2 warps, one pass at 8; 64
    columns, 4 warps, separate reductions from 32. Narrow value heads cap the width; warps keep
    the state at 64 registers a thread (twice the warps at K = 256)."""
    import hybridlm.ops.triton.decode as D

    monkeypatch.setattr(D, "_num_sms", lambda device: 132)
    cpu = torch.device("cpu")
    assert [D._pick_blocks(B, 32, 128, cpu) for B in (1, 8, 32, 64, 256)] == [
        (16, 1, True), (32, 2, True), (64, 4, False), (64, 4, False), (64, 4, False)]
    assert D._pick_blocks(1, 1, 8, cpu) == (8, 1, True)
    assert D._pick_blocks(512, 32, 20, cpu) == (32, 2, False)
    assert D._pick_blocks(32, 32, 128, cpu, K=256) == (64, 8, False)
