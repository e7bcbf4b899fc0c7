"""Triton chunked gated delta rule vs the float64 token-by-token reference.

Legend: B batch, T tokens, H q/k heads, HV value heads, K key size, V value size.
On a machine without CUDA the kernels run under Triton's interpreter (float32, tiny shapes);
on a GPU the same tests run natively and add bfloat16 and longer sequences.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first triton import of the session
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from hybridlm.ops.delta_rule import gated_delta_rule_naive  # noqa: E402
from hybridlm.ops.triton import chunk_gated_delta_rule  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# relative RMS error allowed against the float64 reference
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.5e-2, torch.float16: 5e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16] if CUDA else [torch.float32]
NAMES = ("dq", "dk", "dv", "dg", "dbeta", "dh0")


def rel_rms(x, ref):
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every torch.empty the kernels allocate starts as NaN, so an unwritten element fails the test."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_fill(x):
        return x.fill_(float("nan")) if x.is_floating_point() else x

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: nan_fill(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: nan_fill(empty_like(*a, **kw)))


def make_inputs(B, T, H, HV, K, V, dtype, N=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q, k, v = r(B, T, H, K), torch.nn.functional.normalize(r(B, T, H, K), dim=-1), r(B, T, HV, V)
    g = torch.nn.functional.logsigmoid(r(B, T, HV) + 2)
    beta = torch.sigmoid(r(B, T, HV))
    h0 = r(N or B, HV, K, V)
    return [x.to(DEVICE, dtype) for x in (q, k, v)] + [x.to(DEVICE) for x in (g, beta, h0)]


def run_both(xs, *, cu_seqlens=None, use_qk_l2norm=False, gate=None, seed=1):
    """Outputs, final states and all gradients of the kernel and of the float64 reference."""
    gen = torch.Generator().manual_seed(seed)
    ours = [x.clone().requires_grad_() for x in xs]
    ref = [x.detach().double().requires_grad_() for x in xs]
    o, ht = chunk_gated_delta_rule(*ours[:5], initial_state=ours[5], output_final_state=True,
                                   cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm)
    do = torch.randn(o.shape, generator=gen).to(DEVICE)
    dht = torch.randn(ht.shape, generator=gen).to(DEVICE)
    grads = torch.autograd.grad((o.float() * do).sum() + (ht * dht).sum(), ours)
    ro, rht = gated_delta_rule_naive(*ref[:5], initial_state=ref[5], output_final_state=True,
                                     cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm)
    rgrads = torch.autograd.grad((ro * do.double()).sum() + (rht * dht.double()).sum(), ref)
    return (o, ht, *grads), (ro, rht, *rgrads)


def assert_close(got, want, tol):
    for name, x, y in zip(("o", "final_state") + NAMES, got, want):
        assert not torch.isnan(x).any(), f"{name} has NaN (an element was never written)"
        err = rel_rms(x, y)
        assert err < tol, f"{name}: relative RMS error {err:.2e} >= {tol:.0e}"


CASES = [  # (B, T, H, HV, K, V): one token, a chunk short, a chunk over, several chunks; HV = H and 2H; K != V
    (1, 1, 1, 2, 16, 16),
    (2, 63, 1, 2, 16, 32),
    (1, 65, 2, 2, 32, 16),
    (1, 130, 1, 2, 16, 16),
    (1, 1000, 1, 1, 16, 16),
    (1, 65, 2, 4, 4, 16),  # K < 16 (the GPU study's key dim 4): blocks padded and masked
]
GPU_CASES = [(2, 1000, 2, 4, 128, 128), (1, 300, 4, 4, 64, 128)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CASES + (GPU_CASES if CUDA else []), ids=str)
def test_outputs_states_and_gradients_match_reference(shape, dtype):
    got, want = run_both(make_inputs(*shape, dtype))
    assert_close(got, want, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_sequences_match_per_sequence_runs(dtype):
    bounds = [0, 1, 64, 130] + ([1130] if CUDA else [])
    cu = torch.tensor(bounds, device=DEVICE, dtype=torch.int32)
    xs = make_inputs(1, bounds[-1], 1, 2, 16, 32, dtype, N=len(bounds) - 1)
    got, want = run_both(xs, cu_seqlens=cu)
    assert_close(got, want, TOL[dtype])
    # each sequence alone gives the same output and final state as the packed call
    for i, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
        o_i, ht_i = chunk_gated_delta_rule(*(x[:, bos:eos] for x in xs[:5]), initial_state=xs[5][i:i + 1],
                                           output_final_state=True)
        assert rel_rms(o_i, got[0][:, bos:eos]) < TOL[dtype]
        assert rel_rms(ht_i, got[1][i:i + 1]) < TOL[dtype]


def test_l2norm_gradients_match_reference():
    xs = make_inputs(1, 70, 1, 2, 16, 16, DTYPES[-1])
    xs[0], xs[1] = 3 * xs[0], 3 * xs[1]  # unnormalised inputs, so the norm matters
    got, want = run_both(xs, use_qk_l2norm=True)
    assert_close(got, want, TOL[DTYPES[-1]])


@pytest.mark.parametrize("R, D, normalized", [(1, 16, True), (3, 20, True), (2, 20, False)])
def test_qk_grad_sums_value_heads_through_the_l2norm(R, D, normalized):
    # 37 rows of 2 heads: a partial last block of rows; D = 20: masked columns
    from hybridlm.ops.triton.chunk_prep import qk_grad
    gen = torch.Generator().manual_seed(R)
    x = (3 * torch.randn(37, 2, D, generator=gen)).to(DEVICE)
    dy = torch.randn(37, 2 * R, D, generator=gen).to(DEVICE)
    xr = x.double().requires_grad_()
    y = xr / torch.sqrt((xr * xr).sum(-1, keepdim=True) + 1e-6) if normalized else xr
    (want,) = torch.autograd.grad(y, xr, dy.double().view(37, 2, R, D).sum(2))
    got = qk_grad(x, dy, normalized)
    assert got.dtype == x.dtype and rel_rms(got, want) < 1e-5


def test_fused_gate_equals_gate_computed_outside():
    q, k, v, a, beta, h0 = make_inputs(1, 40, 1, 2, 16, 16, torch.float32)
    A_log = torch.tensor([0.3, -1.0], device=DEVICE, requires_grad=True)
    dt_bias = torch.tensor([0.5, 0.1], device=DEVICE, requires_grad=True)
    o1, _ = chunk_gated_delta_rule(q, k, v, a, beta, A_log=A_log, dt_bias=dt_bias)
    g = -A_log.exp() * torch.nn.functional.softplus(a + dt_bias)
    o2, _ = chunk_gated_delta_rule(q, k, v, g, beta)
    assert rel_rms(o1, o2) < 1e-6
    d1 = torch.autograd.grad(o1.sum(), (A_log, dt_bias))
    d2 = torch.autograd.grad(o2.sum(), (A_log, dt_bias))
    assert all(rel_rms(x, y) < 1e-5 for x, y in zip(d1, d2))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inference_forward_matches_reference(dtype):
    """The forward under no_grad (what inference runs), packed sequences and the l2-norm included."""
    bounds = [0, 20, 84, 200]
    cu = torch.tensor(bounds, device=DEVICE, dtype=torch.int32)
    xs = make_inputs(1, bounds[-1], 2, 4, 16, 32, dtype, N=len(bounds) - 1)
    with torch.no_grad():
        o, ht = chunk_gated_delta_rule(*xs[:5], initial_state=xs[5], output_final_state=True, cu_seqlens=cu,
                                       use_qk_l2norm=True)
    ro, rht = gated_delta_rule_naive(*(x.double() for x in xs[:5]), initial_state=xs[5].double(),
                                     output_final_state=True, cu_seqlens=cu, use_qk_l2norm=True)
    assert_close((o, ht), (ro, rht), TOL[dtype])


@pytest.mark.parametrize("l2norm", [False, True])
@pytest.mark.parametrize("T", [1, 40, 64, 65])
def test_prep_matches_its_definition(T, l2norm):
    """gc, T = (I + A)^-1 and M of every chunk (a partial chunk, a full one, one token over) against
    their formulas in float64; with ``l2norm`` they are formed from the l2-normalised rows. The
    chunk-major vectors for the state pass hold gc (padding rows at the chunk's last gc), beta and
    the inverse row norms (1 without ``l2norm``), padding rows 0."""
    from hybridlm.ops._checks import L2NORM_EPS
    from hybridlm.ops.triton.chunk import _tables
    from hybridlm.ops.triton.chunk_prep import chunk_prep

    H, HV, K, V = 2, 4, 16, 32
    q, k, _, g, beta, _ = make_inputs(1, T, H, HV, K, V, torch.float32)
    q, k = q * 3.0, k * 0.5  # rows whose norms are far from 1, so a skipped scale shows
    _, _, bounds = _tables(q, None)
    gc, t, m, vec = chunk_prep(q[0], k[0], g[0], beta[0], bounds, HV, l2norm=l2norm, vec_chunks=5)
    assert vec.shape == (5, HV, 64, 4)
    inv_norm = [(x[0].double().square().sum(-1) + L2NORM_EPS).rsqrt() for x in (q, k)]
    if l2norm:
        q, k = (x.double() * (x.double().square().sum(-1, keepdim=True) + L2NORM_EPS).rsqrt() for x in (q, k))
    for c, bos in enumerate(range(0, T, 64)):
        n = min(64, T - bos)
        for hv in range(HV):
            sl = slice(bos, bos + n)
            qc, kc = q[0, sl, hv * H // HV].double(), k[0, sl, hv * H // HV].double()
            gcc = g[0, sl, hv].double().cumsum(0)
            bc = beta[0, sl, hv].double()
            decay = (gcc[:, None] - gcc[None, :]).exp().tril()
            A = (bc[:, None] * (kc @ kc.T) * decay).tril(-1)
            Tc = torch.linalg.inv(torch.eye(n, dtype=torch.float64, device=A.device) + A)
            want = {"gc": gcc, "t": Tc, "m": (qc @ kc.T) * decay}
            got = {"gc": gc[sl, hv], "t": t[sl, hv, :n], "m": m[sl, hv, :n]}
            for name in want:
                assert rel_rms(got[name], want[name]) < 1e-5, name
            assert (t[sl, hv, n:] == 0).all() and (m[sl, hv, n:] == 0).all()
            h = hv * H // HV
            norms = [r[sl, h] if l2norm else torch.ones(n, dtype=torch.float64) for r in inv_norm]
            for col, want_col in enumerate([gcc, bc, *norms]):
                assert rel_rms(vec[c, hv, :n, col], want_col) < 1e-6, col
            assert (vec[c, hv, n:, 0] == gc[bos + n - 1, hv]).all()
            assert (vec[c, hv, n:, 1:] == 0).all()


# the interpreter's numpy warns where the test makes float16 overflow on purpose
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning",
                            "ignore:invalid value encountered in matmul:RuntimeWarning")
def test_prep_half_inverse_matches_and_falls_back():
    """The inverse's doubling products on float16 operands (the default for 16-bit inputs), forced
    here on float32 inputs: T matches (I + A)^-1 to float16's mantissa (as tf32's). The second,
    3-token chunk has keys 300 times larger (no l2-norm): its inverse's entries pass float16's range,
    its float16 inverse is not finite, and that chunk alone is redone at full precision: T matches, no inf or NaN."""
    from hybridlm.ops.triton.chunk import _tables
    from hybridlm.ops.triton.chunk_prep import chunk_prep

    H, HV, K, V, T = 2, 4, 16, 32, 67
    q, k, _, g, beta, _ = make_inputs(1, T, H, HV, K, V, torch.float32)
    k = torch.cat([k[:, :64], k[:, 64:] * 300.0], 1)
    _, _, bounds = _tables(q, None)
    _, t_full, _, _ = chunk_prep(q[0], k[0], g[0], beta[0], bounds, HV, half_inverse=False)
    _, t_half, _, _ = chunk_prep(q[0], k[0], g[0], beta[0], bounds, HV, half_inverse=True)
    assert t_half.isfinite().all()
    for bos, n in ((0, 64), (64, 3)):
        for hv in range(HV):
            kc = k[0, bos:bos + n, hv * H // HV].double()
            gcc = g[0, bos:bos + n, hv].double().cumsum(0)
            A = (beta[0, bos:bos + n, hv].double()[:, None] * (kc @ kc.T)
                 * (gcc[:, None] - gcc[None, :]).exp().tril()).tril(-1)
            want = torch.linalg.inv(torch.eye(n, dtype=torch.float64, device=A.device) + A)
            got = t_half[bos:bos + n, hv, :n]
            if bos == 0:
                assert rel_rms(got, want) < 2e-3
                assert rel_rms(got, want) > rel_rms(t_full[bos:bos + n, hv, :n], want)  # float16 did round
            else:
                assert want.abs().max() > 65504  # past float16's range
                assert rel_rms(got, want) < 1e-5  # the full-precision redo


@pytest.mark.skipif(not CUDA, reason="16-bit inputs run on the GPU (the interpreter mishandles bfloat16)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("packed", [False, True])
def test_half_inverse_outputs_and_gradients_match_reference(dtype, packed, monkeypatch):
    """The op with the prep's float16 inverse (``chunk_prep.HALF_INVERSE``) at the GPU shapes and
    packed sequences: outputs, final states and every gradient against the float64 reference, at the
    16-bit tolerances the tf32 inverse meets."""
    from hybridlm.ops.triton import chunk_prep as CP

    monkeypatch.setattr(CP, "HALF_INVERSE", True)
    if packed:
        cu = torch.tensor([0, 1, 64, 130, 1130], device=DEVICE, dtype=torch.int32)
        got, want = run_both(make_inputs(1, 1130, 2, 4, 128, 128, dtype, N=4), cu_seqlens=cu, use_qk_l2norm=True)
        assert_close(got, want, TOL[dtype])
    else:
        for shape in GPU_CASES:
            got, want = run_both(make_inputs(*shape, dtype), use_qk_l2norm=True)
            assert_close(got, want, TOL[dtype])


def test_no_initial_state_and_no_final_state():
    """The paths without a state to read or a state gradient to start from, forward and backward."""
    xs = make_inputs(2, 70, 1, 2, 16, 16, torch.float32)[:5]
    ours = [x.clone().requires_grad_() for x in xs]
    ref = [x.detach().double().requires_grad_() for x in xs]
    o, ht = chunk_gated_delta_rule(*ours)
    assert ht is None
    ro, _ = gated_delta_rule_naive(*ref)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    grads = torch.autograd.grad((o * do).sum(), ours)
    rgrads = torch.autograd.grad((ro * do.double()).sum(), ref)
    assert_close((o, o, *grads), (ro, ro, *rgrads), TOL[torch.float32])


@pytest.mark.parametrize("packed", [False, True])
def test_compiles_fullgraph(packed):
    """fullgraph traces the custom ops, also with packed sequences (whose boundaries the entry
    point cannot read while traced: the op checks them when it runs)."""
    cu = torch.tensor([0, 1, 66, 70], device=DEVICE) if packed else None
    q, k, v, g, beta, h0 = make_inputs(1, 70, 1, 2, 16, 16, torch.float32)
    if packed:
        h0 = torch.randn(3, *h0.shape[1:], device=DEVICE)

    def f(q, k, v, g, beta, h0):
        o, ht = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                       use_qk_l2norm=True, cu_seqlens=cu)
        return o.sum() + ht.sum()

    xs = [x.clone().requires_grad_() for x in (q, k, v, g, beta, h0)]
    # on CPU aot_eager still traces the custom ops' fake kernels and autograd formula, without a C compiler
    compiled = torch.compile(f, fullgraph=True, backend="inductor" if CUDA else "aot_eager")
    out = compiled(*xs)
    grads = torch.autograd.grad(out, xs)
    ys = [x.clone().requires_grad_() for x in (q, k, v, g, beta, h0)]
    ref = f(*ys)
    rgrads = torch.autograd.grad(ref, ys)
    assert rel_rms(out, ref) < 1e-5
    assert all(rel_rms(a, b) < 1e-5 for a, b in zip(grads, rgrads))
    if packed:  # bad boundaries still raise a clear error from the compiled call
        cu = torch.tensor([0, 66, 66, 70], device=DEVICE)
        with pytest.raises(ValueError, match="cu_seqlens must be strictly increasing"):
            compiled(*xs)


def test_bad_inputs_raise_naming_the_argument():
    q, k, v, g, beta, h0 = make_inputs(1, 8, 1, 2, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=32)
    with pytest.raises(TypeError, match="q"):
        chunk_gated_delta_rule(q.double(), k.double(), v.double(), g, beta)
    with pytest.raises(ValueError, match="beta"):
        chunk_gated_delta_rule(q, k, v, g, beta[..., :1])
    with pytest.raises(ValueError, match="initial_state"):
        chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0[:, :1])
    with pytest.raises(ValueError, match="K"):
        big = torch.zeros(1, 8, 1, 256, device=DEVICE)
        chunk_gated_delta_rule(big, big, v, g, beta)
    with pytest.raises(ValueError, match="dt_bias"):
        chunk_gated_delta_rule(q, k, v, g, beta, A_log=torch.zeros(2, device=DEVICE))
