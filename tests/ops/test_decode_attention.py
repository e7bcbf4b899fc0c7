"""Decode softmax attention: the Triton split-KV kernel against the reference, and the reference
against softmax_attention with a length-1 query axis.

Legend: B batch, S cache slots, H query heads, HKV key/value heads, D head dim, Dv value head dim.
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

from hybridlm.ops import softmax_attention, softmax_attention_decode  # noqa: E402
from hybridlm.ops.triton.decode_attention import (  # noqa: E402
    MIN_COMBINE_COLS,
    MIN_WAVE_FILL,
    TILE_BYTES,
    WAVES,
    alloc_partials,
    combine_into,
    combine_plan,
    decode_attention_into,
    launch_config,
    pick_num_splits,
    resident_programs,
    split_kv_decode_attention,
    split_plan,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def make_cache(B, S, H, HKV, D, Dv, seed, dtype=torch.float32, spare=5):
    """q [B, H, D]; k, v views [B, S, HKV, D|Dv] of one larger fused cache [B, S + spare, HKV, D + Dv]
    (non-contiguous, last dim contiguous); q_pos [B]; k_pos [B, S] view of a longer position buffer.

    Row 0: positions 0.. with scattered empty slots and a tail of empty slots, query at the last
    filled position. Row 1: the same cache, query halfway (later keys are in the future). Row 2
    (when B > 2): sees no key at all (query before every key).
    """
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn(B, S + spare, HKV, D + Dv, generator=gen).to(DEVICE, dtype)
    k, v = kv[:, :S, :, :D], kv[:, :S, :, D:]
    q = torch.randn(B, H, D, generator=gen).to(DEVICE, dtype)
    pos = torch.arange(S + spare).repeat(B, 1)
    filled = max(1, S - S // 4)  # a tail of empty slots
    pos[:, filled:] = -1
    holes = torch.rand(B, S + spare, generator=gen) < 0.2
    holes[:, 0] = False
    pos[holes] = -1  # scattered empty slots
    q_pos = torch.full((B,), filled - 1)
    q_pos[1:2] = filled // 2
    if B > 2:
        pos[2] = torch.where(pos[2] >= 0, pos[2] + 3, -1)
        q_pos[2] = 2
    return q, k, v, q_pos.to(DEVICE), pos[:, :S].to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("H, HKV", [(2, 2), (8, 2)])
@pytest.mark.parametrize("S", [1, 63, 65, 1000])
def test_triton_matches_reference(S, H, HKV, window, dtype):
    q, k, v, q_pos, k_pos = make_cache(3, S, H, HKV, 32, 16, seed=S + H, dtype=dtype)
    ref = softmax_attention_decode(q, k, v, q_pos=q_pos, k_pos=k_pos, window=window, backend="reference")
    assert ref[2].abs().max() == 0  # the row that sees no key
    for n in (None, 4):  # the heuristic (one split on a CPU) and several splits
        o = split_kv_decode_attention(q, k, v, q_pos=q_pos, k_pos=k_pos, window=window, num_splits=n)
        assert o.shape == (3, H, 16) and o.dtype == dtype
        assert torch.isfinite(o).all()
        assert rel_err(o, ref) < TOL[dtype], f"num_splits={n}"
        assert torch.equal(o[2], torch.zeros_like(o[2]))


def test_dispatch_backends_and_head_size_not_power_of_two():
    q, k, v, q_pos, k_pos = make_cache(2, 40, 6, 3, 48, 40, seed=1)
    ref = softmax_attention_decode(q, k, v, q_pos=q_pos, k_pos=k_pos, scale=0.2, backend="reference")
    o = softmax_attention_decode(q, k, v, q_pos=q_pos, k_pos=k_pos, scale=0.2, backend="triton")
    assert rel_err(o, ref) < TOL[torch.float32]
    if DEVICE == "cpu":  # "auto" takes the reference off CUDA
        auto = softmax_attention_decode(q, k, v, q_pos=q_pos, k_pos=k_pos, scale=0.2)
        assert torch.equal(auto, ref)


def test_empty_slots_are_never_read():
    q, k, v, q_pos, k_pos = make_cache(2, 130, 4, 2, 32, 16, seed=2)
    k, v = k.contiguous(), v.contiguous()
    ref = softmax_attention_decode(q, k, v, q_pos=q_pos, k_pos=k_pos, window=50, backend="reference")
    unseen = ((k_pos < 0) | (k_pos > q_pos[:, None]) | (q_pos[:, None] - k_pos >= 50))[..., None, None]
    k_nan, v_nan = k.masked_fill(unseen, float("nan")), v.masked_fill(unseen, float("inf"))
    for n in (1, 3):
        o = split_kv_decode_attention(q, k_nan, v_nan, q_pos=q_pos, k_pos=k_pos, window=50, num_splits=n)
        assert torch.isfinite(o).all() and rel_err(o, ref) < TOL[torch.float32]


@pytest.mark.parametrize("block_s, skip_empty, num_stages", [(32, False, 3), (64, False, 2), (32, True, 1)])
@pytest.mark.parametrize("window", [None, 50])
def test_launch_choices_give_the_same_result(block_s, skip_empty, num_stages, window):
    """The tuning choices: masked blocks without the skip branch (software-pipelined loads), other
    block sizes. Empty slots hold NaN / inf: masked loads must not read them, and a block with no
    visible slot (row 1's tail, row 2 throughout, the window's start) must add nothing."""
    B, S, H, HKV, D, Dv = 3, 300, 4, 2, 32, 16
    q, k, v, q_pos, k_pos = make_cache(B, S, H, HKV, D, Dv, seed=4)
    k, v = k.contiguous(), v.contiguous()
    ref = softmax_attention_decode(q, k, v, q_pos=q_pos, k_pos=k_pos, window=window, backend="reference")
    unseen = (k_pos < 0) | (k_pos > q_pos[:, None])
    if window is not None:
        unseen |= q_pos[:, None] - k_pos >= window
    k_nan = k.masked_fill(unseen[..., None, None], float("nan"))
    v_nan = v.masked_fill(unseen[..., None, None], float("inf"))
    for n in (1, 3):
        o = torch.full((B, H, Dv), float("nan"), device=DEVICE)
        decode_attention_into(q, k_nan, v_nan, q_pos, k_pos, o, scale=D ** -0.5, window=window, n_splits=n,
                              block_s=block_s, skip_empty=skip_empty, num_stages=num_stages)
        assert torch.isfinite(o).all() and rel_err(o, ref) < TOL[torch.float32], f"num_splits={n}"
        assert torch.equal(o[2], torch.zeros_like(o[2]))


@pytest.mark.parametrize("n_splits", [1, 3, 8])
def test_every_output_and_partial_written(n_splits):
    """NaN-poisoned output and scratch: every element the combine reads is written by a split."""
    B, S, H, HKV, D, Dv = 3, 1000, 4, 2, 32, 16
    q, k, v, q_pos, k_pos = make_cache(B, S, H, HKV, D, Dv, seed=3)
    assert split_plan(q, k, v, n_splits)[0] == n_splits  # 16 blocks of 64 slots
    o = torch.full((B, H, Dv), float("nan"), device=DEVICE)
    partials = alloc_partials(B, H, n_splits, Dv, DEVICE)
    for p in partials:
        p.fill_(float("nan"))
    decode_attention_into(q, k, v, q_pos, k_pos, o, scale=D ** -0.5, window=None, n_splits=n_splits,
                          partials=partials)
    assert torch.isfinite(o).all()
    if n_splits > 1:  # several splits really ran: each wrote its own partial row
        acc, m, l = partials
        assert not acc.isnan().any() and not m.isnan().any() and not l.isnan().any()
        assert (l[0] > 0).sum(-1).min() > 1  # row 0 sees keys in several splits
        assert torch.equal(l[2], torch.zeros_like(l[2])) and (m[2] == float("-inf")).all()  # row 2 sees none
    ref = softmax_attention_decode(q, k, v, q_pos=q_pos, k_pos=k_pos, backend="reference")
    assert rel_err(o, ref) < TOL[torch.float32]


def test_combine_over_many_split_groups():
    """More splits than the combine takes in one group (64): its running maximum must rescale the
    sums of earlier groups when a later group holds a larger score, and a row whose first groups saw
    no key (empty slots at the start of its cache) must not pick up their zero weights as NaN."""
    B, S, H, HKV, D, Dv = 2, 2100, 2, 1, 16, 16
    q, k, v, q_pos, k_pos = make_cache(B, S, H, HKV, D, Dv, seed=7)
    k, v = k.contiguous(), v.contiguous()
    k_pos = k_pos.clone()
    k_pos[1, :1100] = -1  # row 1: splits 0-68 (slots 0-1103) hold no visible key
    k = k.clone()
    k[0, 1900:1910] *= 4.0  # row 0: the largest scores sit in the last group
    q = 3.0 * q
    ref = softmax_attention_decode(q, k, v, q_pos=q_pos, k_pos=k_pos, backend="reference")
    for n in (100, 132):
        assert split_plan(q, k, v, n, block_s=16)[0] > 64
        o = torch.full((B, H, Dv), float("nan"), device=DEVICE)
        decode_attention_into(q, k, v, q_pos, k_pos, o, scale=D ** -0.5, window=None, n_splits=n, block_s=16)
        assert torch.isfinite(o).all() and rel_err(o, ref) < TOL[torch.float32], f"n_splits={n}"


@pytest.mark.parametrize("block_dv", [16, 64])
def test_combine_split_over_value_columns(block_dv):
    """The combine's programs split a row's value columns (a batch-1 row on many multiprocessors):
    every column block, the masked tail of Dv 40 included, is written and equals the merged
    partials; rows whose splits all saw no key give 0."""
    rows, n, Dv = 3, 70, 40
    torch.manual_seed(11)
    acc = torch.randn(rows, n, Dv, device=DEVICE)
    m = 4 * torch.randn(rows, n, device=DEVICE)
    m[0, :30] = float("-inf")  # splits that saw no key
    m[2] = float("-inf")
    l = torch.rand(rows, n, device=DEVICE) + 0.5
    l[0, :30] = 0.0
    l[2] = 0.0
    acc[0, :30] = 0.0
    acc[2] = 0.0
    o = torch.full((rows, Dv), float("nan"), device=DEVICE)
    combine_into(acc, m, l, o, rows, n, Dv, num_sms=1, block_dv=block_dv)
    mm = m[:2].amax(1, keepdim=True)
    w = torch.exp2(m[:2] - mm)
    ref = (w[..., None] * acc[:2]).sum(1) / (w * l[:2]).sum(1, keepdim=True)
    assert torch.isfinite(o).all()
    assert rel_err(o[:2], ref) < TOL[torch.float32]
    assert torch.equal(o[2], torch.zeros_like(o[2]))


def test_combine_plan_fills_the_card_at_batch_one():
    """Few rows split their columns down to MIN_COMBINE_COLS until the grid has a program per two SMs;
    many rows keep whole rows."""
    assert combine_plan(16, 256, 256, 132) == (32, 64)  # Qwen3-Next, B 1: 16 x 8 programs
    assert combine_plan(8, 1024, 128, 132) == (MIN_COMBINE_COLS, 64)
    assert combine_plan(320, 8, 256, 132) == (256, 8)  # B 20: whole rows
    assert combine_plan(128, 32, 256, 132) == (256, 16)  # a row per SM already: whole rows
    assert combine_plan(3, 2, 16, 132) == (16, 2)  # a row narrower than the floor stays whole


def test_split_plan_caps_and_checks_scratch():
    q, k, v, q_pos, k_pos = make_cache(2, 100, 4, 2, 32, 16, seed=6)
    assert split_plan(q, k, v, 8)[:2] == (2, 1)  # 2 blocks of 64 slots: at most 2 splits
    assert split_plan(q[:, :, :8], k[..., :8], v, 3) == (2, 1, 64)
    o = torch.empty(2, 4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="partials must be scratch for 2 splits"):
        decode_attention_into(q, k, v, q_pos, k_pos, o, scale=1.0, window=None, n_splits=8,
                              partials=alloc_partials(2, 4, 8, 16, DEVICE))


def test_launch_config_keeps_pipelined_tiles_within_shared_memory():
    assert launch_config(256, 256, torch.bfloat16) == (64, 8, 3)  # the launch measured on the H200
    assert launch_config(128, 128, torch.bfloat16) == (64, 4, 3)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for D, Dv in ((16, 16), (64, 64), (100, 72), (128, 128), (192, 128), (256, 256), (512, 512), (576, 512)):
            block, warps, stages = launch_config(D, Dv, dtype)
            row = (max(16, 1 << (D - 1).bit_length()) + max(16, 1 << (Dv - 1).bit_length())) * dtype.itemsize
            assert block in (16, 32, 64) and warps in (4, 8) and stages in (1, 2, 3)
            assert block * row <= TILE_BYTES or (block, stages) == (16, 1), (D, Dv, dtype)


def test_split_count_fills_the_card():
    sms = 132
    n = pick_num_splits(1, 2, 32768, sms, 64)
    assert 1 < n <= 512 and WAVES * sms / 2 <= 2 * n <= 2 * WAVES * sms  # about WAVES waves at batch 1
    # Qwen3-Next's decode shapes (2 key/value heads, head dim 256, one program per SM): whole waves,
    # as the H200 sweep preferred (256 splits at B 1, S 128k: 69% of the copy rate; the 293 of a
    # rule rounding up: 4.44 waves, 61%)
    assert pick_num_splits(1, 2, 131072, sms, 64) == 256
    assert pick_num_splits(8, 2, 32768, sms, 64) == 32
    assert pick_num_splits(40, 2, 131072, sms, 64) == 8  # 4.85 waves: the nearest nearly full
    for B, HKV, S, res in ((1, 2, 131072, 1), (3, 2, 50000, 1), (36, 2, 131072, 1), (1, 8, 1 << 20, 2),
                           (5, 1, 70000, 2), (1, 1, 131072, 2)):
        n = pick_num_splits(B, HKV, S, sms, 64, res)
        waves = B * HKV * n / (res * sms)
        assert waves / -(-waves // 1) >= MIN_WAVE_FILL or waves < 1, (B, HKV, S, n)
    assert resident_programs(64, 256, 256, torch.bfloat16, 3) == 1  # 192 KB of tiles
    assert resident_programs(64, 128, 128, torch.bfloat16, 3) == 2
    assert pick_num_splits(1, 2, 100, sms, 64) == 2  # at most one split per block of slots
    assert pick_num_splits(1, 1, 1, sms, 64) == 1
    assert pick_num_splits(128, 8, 32768, sms, 64) == 1  # large batches already fill the card
    for S in (1, 63, 65, 1000, 4097, 1 << 20):  # no empty split: the last one starts before S
        for B in (1, 3, 16):
            n = pick_num_splits(B, 2, S, sms, 32)
            per = -(-max(1, -(-S // 32)) // n)
            assert (n - 1) * per * 32 < max(S, 1)


def test_docstring_example_runs():
    mod = importlib.import_module("hybridlm.ops.decode_attention")
    result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_reference_equals_softmax_attention_with_one_query():
    q, k, v, q_pos, k_pos = make_cache(3, 50, 8, 2, 32, 16, seed=4)
    for window in (None, 9):
        o = softmax_attention_decode(q, k, v, q_pos=q_pos, k_pos=k_pos, window=window, backend="reference")
        full = softmax_attention(q[:, None], k, v, q_pos=q_pos[:, None], k_pos=k_pos, window=window)
        torch.testing.assert_close(o, full[:, 0], rtol=1e-5, atol=1e-6)


Q, KC, VC, QP, KP = make_cache(2, 10, 4, 2, 8, 8, seed=0)


def _good(**over):
    """A thunk calling softmax_attention_decode on good inputs with ``over`` replacing some."""
    a = {**dict(q=Q, k=KC, v=VC, q_pos=QP, k_pos=KP), **over}
    return lambda: softmax_attention_decode(a["q"], a["k"], a["v"], **{n: x for n, x in a.items() if n not in "qkv"})


BAD = {
    "q rank": (_good(q=Q[:, None]), ValueError, "q must be 3-D"),
    "q list": (_good(q=Q.tolist()), TypeError, "q must be a torch.Tensor"),
    "integer q": (_good(q=Q.long()), TypeError, "q must have a floating-point dtype"),
    "k rank": (_good(k=KC[:, 0]), ValueError, "k must be 4-D"),
    "k dtype": (_good(k=KC.double()), TypeError, "k must have the same dtype as q"),
    "k head dim": (_good(k=KC[..., :4]), ValueError, "k must be"),
    "v slots": (_good(v=VC[:, :5]), ValueError, "v must match k"),
    "H % HKV": (_good(k=KC[:, :, :1].expand(2, 10, 3, 8), v=VC[:, :, :1].expand(2, 10, 3, 8)), ValueError,
                "HKV dividing"),
    "float q_pos": (_good(q_pos=QP.float()), TypeError, "q_pos must be an integer tensor"),
    "q_pos shape": (_good(q_pos=QP[:, None]), ValueError, r"q_pos must have shape \[B\]"),
    "k_pos shape": (_good(k_pos=KP[:, :9]), ValueError, r"k_pos must have shape \[B, S\]"),
    "k_pos device": (_good(k_pos=KP.to("meta")), ValueError, "k_pos must be on the same device"),
    "window zero": (_good(window=0), ValueError, "window must be a positive int"),
    "window float": (_good(window=2.0), ValueError, "window must be a positive int"),
    "scale string": (_good(scale="0.1"), TypeError, "scale must be a float"),
    "backend": (_good(backend="cuda"), ValueError, "backend must be one of"),
    "triton float64": (_good(q=Q.double(), k=KC.double(), v=VC.double(), backend="triton"), TypeError,
                       "float64"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_raise(case):
    call, error, words = BAD[case]
    with pytest.raises(error, match=words):
        call()


def test_bad_num_splits_and_triton_unavailable(monkeypatch):
    with pytest.raises(ValueError, match="num_splits must be a positive int"):
        split_kv_decode_attention(Q, KC, VC, q_pos=QP, k_pos=KP, num_splits=0)
    if DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(RuntimeError, match="not on a CUDA device"):
            softmax_attention_decode(Q, KC, VC, q_pos=QP, k_pos=KP, backend="triton")


def test_custom_op_passes_opcheck():
    for n in (None, 2):
        args = (Q, KC, VC, QP, KP, 0.3, 4, n)
        torch.library.opcheck(torch.ops.hybridlm.softmax_attention_decode.default, args)


def test_torch_compile_fullgraph_matches_eager():
    def attend(q, k, v, q_pos, k_pos):
        o = split_kv_decode_attention(q, k, v, q_pos=q_pos, k_pos=k_pos, window=6)
        return o * 2.0

    # On CPU the compiled graph runs eagerly around the opaque op; what is checked is that dynamo
    # traces the op with its fake implementation.
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(attend, fullgraph=True, backend=backend)
    torch.testing.assert_close(compiled(Q, KC, VC, QP, KP), attend(Q, KC, VC, QP, KP))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_capture():
    q, k, v, q_pos, k_pos = make_cache(2, 4000, 16, 2, 256, 256, seed=5, dtype=torch.bfloat16)
    split_kv_decode_attention(q, k, v, q_pos=q_pos, k_pos=k_pos)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o = split_kv_decode_attention(q, k, v, q_pos=q_pos, k_pos=k_pos)
    for step in range(3):
        q_pos.add_(step)  # positions advance in place, as a captured decode loop does
        graph.replay()
        ref = softmax_attention_decode(q, k, v, q_pos=q_pos, k_pos=k_pos, backend="reference")
        assert rel_err(o, ref) < TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device with ~10 GB free")
def test_offsets_past_int32():
    B, S, HKV, D = 2, (1 << 20) + 64, 8, 128  # B * S * HKV * D > 2**31
    k = torch.zeros(B, S, HKV, D, device=DEVICE, dtype=torch.bfloat16)
    v = torch.zeros_like(k)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    k[:, -100:].normal_(generator=gen)
    v[:, -100:].normal_(generator=gen)
    k_pos = torch.full((B, S), -1, device=DEVICE)
    k_pos[:, -100:] = torch.arange(100, device=DEVICE)
    q = torch.randn(B, 4 * HKV, D, device=DEVICE, dtype=torch.bfloat16)
    q_pos = torch.tensor([99, 60], device=DEVICE)
    o = split_kv_decode_attention(q, k, v, q_pos=q_pos, k_pos=k_pos)
    ref = softmax_attention_decode(q, k[:, -100:], v[:, -100:], q_pos=q_pos, k_pos=k_pos[:, -100:],
                                   backend="reference")
    assert rel_err(o, ref) < TOL[torch.bfloat16]
