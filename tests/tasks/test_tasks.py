"""Task generators: deterministic, disjoint splits, answers that are right, loud on bad input."""

import pytest
import torch

from hybridlm.tasks import IGNORE, MQAR, Copy, MultiHop, Needle, split_of
from hybridlm.tasks.base import EQ, FILL, NEEDLE, QUERY, SEMI

TASKS = [
    MQAR(num_pairs=6, seq_len=40, vocab_size=48),
    Copy(length=7, min_length=3, vocab_size=24),
    Needle(seq_len=33, vocab_size=40),
    MultiHop(hops=3, num_chains=2, vocab_size=40),
]


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_deterministic(task):
    x1, y1 = task.batch(8, "train", seed=3, index=5)
    x2, y2 = task.batch(8, "train", seed=3, index=5)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, _ = task.batch(8, "train", seed=4, index=5)
    x4, _ = task.batch(8, "train", seed=3, index=6)
    assert not torch.equal(x1, x3) and not torch.equal(x1, x4)


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_splits_disjoint(task):
    train = {tuple(task.example("train", s, i).tokens) for s in range(2) for i in range(200)}
    test = {tuple(task.example("test", s, i).tokens) for s in range(2) for i in range(200)}
    assert not train & test
    assert all(split_of(list(t)) == "train" for t in train)
    assert all(split_of(list(t)) == "test" for t in test)


def test_splits_disjoint_when_the_task_is_exhausted():
    # 4 content symbols, length 2: only 16 strings exist, so every one is drawn many times over.
    task = Copy(length=2, vocab_size=12)
    train = {tuple(task.example("train", 0, i).tokens) for i in range(300)}
    test = {tuple(task.example("test", 0, i).tokens) for i in range(300)}
    assert not train & test
    assert len(train) + len(test) == 16


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_targets_are_next_answer_tokens(task):
    ex = task.example("test", 0, 0)
    x, y = task.batch(1, "test", seed=0, index=0)
    assert x[0].tolist() == ex.tokens[:-1]
    for t in range(len(ex.tokens) - 1):
        assert y[0, t].item() == (ex.tokens[t + 1] if ex.answer[t + 1] else IGNORE)


def test_batch_pads_ragged_lengths():
    task = Copy(length=9, min_length=1, vocab_size=24)
    x, y = task.batch(16, "train", seed=0, index=0)
    lengths = {len(task.example("train", 0, i).tokens) for i in range(16)}
    assert len(lengths) > 1 and x.shape == y.shape == (16, 2 * 9 + 1)
    assert (y != IGNORE).sum(1).min() >= 1


def test_mqar_answers_are_the_paired_values():
    task = MQAR(num_pairs=8, seq_len=64, vocab_size=64)
    for i in range(20):
        ex = task.example("train", 1, i)
        toks = ex.tokens
        pairs = dict(zip(toks[1:17:2], toks[2:17:2]))
        keys, values = set(pairs), set(pairs.values())
        assert max(keys) < min(values)  # keys from the lower half, values from the upper
        answers = [(toks[t - 1], toks[t]) for t in range(len(toks)) if ex.answer[t]]
        assert len(answers) == 8 and {k for k, _ in answers} == keys
        assert all(pairs[k] == v for k, v in answers)
        assert len(toks) == 64 and toks.count(FILL) == 64 - 1 - 32


def test_needle_depth_and_answer():
    for depth in (0.0, 0.5, 1.0):
        toks = Needle(seq_len=50, depth=depth, vocab_size=40).example("test", 0, 0).tokens
        at = toks.index(NEEDLE)
        assert abs(at - 1 - depth * 43) <= 1
        assert toks[-3] == QUERY and toks[-2] == toks[at + 1] and toks[-1] == toks[at + 2]
        assert len(toks) == 50


def test_multihop_answers_resolve_the_chain():
    task = MultiHop(hops=4, num_chains=3, vocab_size=64)
    for i in range(20):
        ex = task.example("train", 0, i)
        toks = ex.tokens
        env = {}
        t = 1
        while toks[t] != QUERY:
            var, eq, rhs, semi = toks[t:t + 4]
            assert eq == EQ and semi == SEMI
            env[var] = env.get(rhs, rhs)
            t += 4
        answers = [(toks[t - 1], toks[t]) for t in range(len(toks)) if ex.answer[t]]
        assert len(answers) == 3
        assert all(env[var] == val for var, val in answers)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: MQAR(num_pairs=0), "num_pairs"),
        (lambda: MQAR(num_pairs=40, vocab_size=64), "num_pairs"),
        (lambda: MQAR(num_pairs=8, seq_len=20), "seq_len"),
        (lambda: MQAR(num_pairs=4, num_queries=5), "num_queries"),
        (lambda: Copy(length=4, min_length=5), "min_length"),
        (lambda: Needle(seq_len=64, depth=1.5), "depth"),
        (lambda: MultiHop(hops=10, num_chains=10, vocab_size=64), "vocab_size"),
        (lambda: Copy(length=4).batch(0, "train", 0, 0), "batch_size"),
        (lambda: Copy(length=4).batch(2, "valid", 0, 0), "split"),
    ],
)
def test_bad_input_raises(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_wrong_type_raises():
    with pytest.raises(TypeError, match="num_pairs"):
        MQAR(num_pairs=2.5)
