"""Greedy token kernel (``hybridlm.ops.triton.greedy``): against torch.argmax on awkward vocabularies,
ties, NaN and -inf rows, several rows, repeated calls on one scratch (its counters back at zero), the
history column and the slot, bad input, and a CUDA graph.

Without CUDA the kernel runs under Triton's interpreter (float32).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported

from hybridlm.ops.triton.greedy import (  # noqa: E402
    GreedyScratch, greedy_programs, greedy_scratch, greedy_token_, greedy_token_reference)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16, torch.float16] if DEVICE == "cuda" else [])


def buffers(B, L=6):
    token = torch.full((B, 1), -7, dtype=torch.long, device=DEVICE)
    slot = torch.tensor([2], dtype=torch.long, device=DEVICE)
    history = torch.full((B, L), -1, dtype=torch.int32, device=DEVICE)
    return token, slot, history


def run_both(logits, scratch=None):
    B = logits.shape[0]
    got, want = buffers(B), buffers(B)
    greedy_token_(logits, *got, scratch=scratch)
    greedy_token_reference(logits, *want)
    return got, want


def assert_same(got, want):
    for g, w, what in zip(got, want, ("token", "slot", "history")):
        assert torch.equal(g, w), f"{what}: {g.tolist()} != {w.tolist()}"


@pytest.mark.parametrize("V", [1, 63, 65, 1000, 4097, 9000] + ([151936] if DEVICE == "cuda" else [20000]))
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_argmax(V, B, dtype):
    gen = torch.Generator().manual_seed(V + B)
    logits = torch.randn(B, V, generator=gen).to(dtype).to(DEVICE)
    got, want = run_both(logits)
    assert_same(got, want)
    assert got[1].item() == 3  # the slot advanced once, whatever the rows
    assert (got[2][:, 2] >= 0).all() and (got[2][:, [0, 1, 3, 4, 5]] == -1).all()  # only column slot written


@pytest.mark.parametrize("V", [65, 9000])
def test_ties_go_to_the_lowest_index(V):
    # equal maxima in different programs' slices and in one lane: the first wins, as torch.argmax
    logits = torch.zeros(2, V, device=DEVICE)
    logits[0, [V - 1, 3, V // 2]] = 5.0
    logits[1] = -1.0  # all equal: index 0
    got, want = run_both(logits)
    assert_same(got, want)
    assert got[0][:, 0].tolist() == [3, 0]


def test_nan_and_infinities():
    V = 9000
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    logits[0, 7000] = float("nan")
    logits[0, 8000] = float("inf")      # a NaN beats +inf, as in torch.argmax
    logits[1, 5000] = float("nan")
    logits[1, 6000] = float("nan")       # the first NaN
    logits[2] = float("-inf")            # a row of -inf still has an argmax: 0
    logits[3, 4500] = float("inf")
    got, want = run_both(logits)
    assert_same(got, want)
    assert got[0][:, 0].tolist() == [7000, 5000, 0, 4500]


def test_repeated_calls_reuse_the_scratch():
    # the counters go back to zero: many calls on one scratch stay right, and the slot walks the history
    B, V, L = 3, 5000, 5
    scratch = greedy_scratch(B, V, DEVICE)
    token = torch.zeros(B, 1, dtype=torch.long, device=DEVICE)
    slot = torch.zeros(1, dtype=torch.long, device=DEVICE)
    history = torch.full((B, L), -1, dtype=torch.long, device=DEVICE)
    gen = torch.Generator().manual_seed(3)
    for step in range(L):
        logits = torch.randn(B, V, generator=gen).to(DEVICE)
        greedy_token_(logits, token, slot, history, scratch)
        assert torch.equal(token[:, 0], logits.argmax(-1))
        assert torch.equal(history[:, step], logits.argmax(-1))
        assert slot.item() == step + 1
        assert scratch.counters.eq(0).all()


def test_without_history_and_strided_logits():
    base = torch.randn(2, 3000, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    logits = base[:, ::2]  # not contiguous along the vocabulary
    token = torch.zeros(2, 1, dtype=torch.long, device=DEVICE)
    slot = torch.zeros(1, dtype=torch.long, device=DEVICE)
    greedy_token_(logits, token, slot)
    assert torch.equal(token[:, 0], logits.argmax(-1))
    assert slot.item() == 1


def test_programs_split_the_vocabulary():
    assert greedy_programs(1) == 1 and greedy_programs(4096) == 1 and greedy_programs(4097) == 2
    assert greedy_programs(151936) == 38 and greedy_programs(10 ** 7) == 64


@pytest.mark.parametrize("case, match", [
    ("logits_dim", "logits_BV: expected a floating-point"),
    ("logits_int", "logits_BV: expected a floating-point"),
    ("empty", "logits_BV: expected at least one row"),
    ("token_shape", "token_B1: expected a \\[2, 1\\] long"),
    ("token_dtype", "token_B1: expected a \\[2, 1\\] long"),
    ("slot", "slot: expected a \\[1\\] long"),
    ("history_rows", "history_BL: expected a \\[2, L\\]"),
    ("history_dtype", "history_BL: expected a \\[2, L\\]"),
    ("scratch", "scratch: expected greedy_scratch\\(2, 50"),
])
def test_bad_input_names_the_argument(case, match):
    logits = torch.randn(2, 50, device=DEVICE)
    token = torch.zeros(2, 1, dtype=torch.long, device=DEVICE)
    slot = torch.zeros(1, dtype=torch.long, device=DEVICE)
    history = torch.zeros(2, 4, dtype=torch.int32, device=DEVICE)
    scratch = None
    if case == "logits_dim":
        logits = logits[0]
    elif case == "logits_int":
        logits = logits.long()
    elif case == "empty":
        logits = logits[:, :0]
    elif case == "token_shape":
        token = token[:, 0]
    elif case == "token_dtype":
        token = token.int()
    elif case == "slot":
        slot = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    elif case == "history_rows":
        history = history[:1]
    elif case == "history_dtype":
        history = history.float()
    elif case == "scratch":
        scratch = greedy_scratch(3, 50, DEVICE)
    with pytest.raises(ValueError, match=match):
        greedy_token_(logits, token, slot, history, scratch)
    assert isinstance(greedy_scratch(2, 50, DEVICE), GreedyScratch)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need CUDA")
def test_in_a_cuda_graph():
    B, V, L = 2, 151936, 8
    logits = torch.empty(B, V, device=DEVICE, dtype=torch.bfloat16)
    token = torch.zeros(B, 1, dtype=torch.long, device=DEVICE)
    slot = torch.zeros(1, dtype=torch.long, device=DEVICE)
    history = torch.full((B, L), -1, dtype=torch.int32, device=DEVICE)
    scratch = greedy_scratch(B, V, DEVICE)
    logits.normal_()
    greedy_token_(logits, token, slot, history, scratch)  # compile outside the capture
    slot.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        greedy_token_(logits, token, slot, history, scratch)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    for step in range(L):
        logits.copy_(torch.randn(B, V, device=DEVICE, generator=gen))
        graph.replay()
        want = logits.argmax(-1)
        assert torch.equal(token[:, 0], want) and torch.equal(history[:, step].long(), want)
    assert slot.item() == L


def test_docstring_example_runs():
    import doctest

    from hybridlm.ops.triton import greedy

    result = doctest.testmod(greedy, extraglobs={"torch": torch})
    assert result.attempted >= 3 and result.failed == 0
