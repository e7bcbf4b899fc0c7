"""What every synthetic task shares: token ids for markers, the train/test split, batching.

An example is a list of token ids plus a mask marking the answer tokens (the only ones that carry
loss and count for accuracy). A task draws example ``index`` of a ``split`` from its own
``random.Random`` seeded by ``(task, seed, split, index)``, so batch ``i`` of a run is a pure function
of the seed and ``i``: training resumes exactly without saving any data-loader state, and every
rank of a data-parallel run draws its own indices.

Train and test are disjoint by construction: the split an example belongs to is decided by a hash
of its content (``split_of``), and a generator redraws until the hash lands in the requested split.
So the same sequence can never appear in both, whatever the seeds.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import torch

# Marker tokens, shared by all tasks. Content tokens start at FIRST_CONTENT.
PAD, BOS, SEP, QUERY, EQ, SEMI, NEEDLE, FILL = 0, 1, 2, 3, 4, 5, 6, 7
FIRST_CONTENT = 8
IGNORE = -100  # target value that carries no loss (torch cross_entropy's ignore_index)
SPLITS = ("train", "test")
TEST_FRACTION = 0.25
_MAX_REDRAWS = 1000


@dataclass(frozen=True)
class Example:
    """One sequence: ``tokens`` (ints) and ``answer`` (bools, True where the token is an answer)."""

    tokens: list[int]
    answer: list[bool]


def split_of(tokens: list[int]) -> str:
    """'test' for a fixed TEST_FRACTION of all possible sequences (by content hash), else 'train'."""
    digest = hashlib.blake2b(",".join(map(str, tokens)).encode(), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "little") / 2**64 < TEST_FRACTION else "train"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")


def check_positive_int(name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")


def collate(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad examples into next-token training tensors.

    Returns ``input_ids`` [B, T] int64 (tokens[:-1]) and ``targets`` [B, T] int64, where
    ``targets[b, t]`` is the token at t + 1 if it is an answer token, else IGNORE (-100).
    """
    length = max(len(e.tokens) for e in examples) - 1
    # Plain lists first and one tensor each at the end: two small tensors per example and their
    # slicing cost more than drawing the examples.
    rows, target_rows = [], []
    for e in examples:
        n = len(e.tokens) - 1
        rows.append(e.tokens[:-1] + [PAD] * (length - n))
        target_rows.append([t if a else IGNORE for t, a in zip(e.tokens[1:], e.answer[1:])] + [IGNORE] * (length - n))
    input_ids = torch.tensor(rows, dtype=torch.long).reshape(len(examples), length)
    targets = torch.tensor(target_rows, dtype=torch.long).reshape(len(examples), length)
    return input_ids, targets


class Task:
    """Base class: subclasses set ``name`` and implement ``draw(rng)`` and ``vocab_size``.

    ``vocab_size`` is the number of token ids the task uses (a model needs at least that many).
    """

    name = "task"

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def draw(self, rng: random.Random) -> Example:
        """One example from ``rng``, regardless of split."""
        raise NotImplementedError

    def example(self, split: str, seed: int, index: int) -> Example:
        """Example ``index`` of ``split``: deterministic in (task parameters, seed, split, index)."""
        check_split(split)
        rng = random.Random(f"{self!r}|{seed}|{split}|{index}")
        for _ in range(_MAX_REDRAWS):
            ex = self.draw(rng)
            if split_of(ex.tokens) == split:
                return ex
        raise ValueError(
            f"{self!r}: could not draw a {split} example in {_MAX_REDRAWS} tries; "
            "the task has too few distinct sequences, make it larger"
        )

    def batch(self, batch_size: int, split: str, seed: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``index`` of ``split``: ``(input_ids [B, T] int64, targets [B, T] int64, -100 = no loss)``."""
        check_positive_int("batch_size", batch_size)
        first = index * batch_size
        return collate([self.example(split, seed, first + i) for i in range(batch_size)])


def content_range(start: int, count: int, vocab_size: int, what: str) -> range:
    """Token ids ``start .. start + count`` checked against ``vocab_size``."""
    if start + count > vocab_size:
        raise ValueError(f"vocab_size: {what} needs ids up to {start + count - 1}, got vocab_size={vocab_size}")
    return range(start, start + count)


class Mixture:
    """Batches drawn in turn from several tasks: batch ``index`` comes from ``tasks[index % n]``.

    Each batch holds one task, so its sequences share a length. Used to train on a range of
    difficulties (e.g. MQAR with 2..16 pairs). Example::

        mix = Mixture([MQAR(4, seq_len=64), MQAR(16, seq_len=64)])
        x, y = mix.batch(32, "train", seed=0, index=7)   # from MQAR(16, ...)
    """

    name = "mixture"

    def __init__(self, tasks: list[Task]) -> None:
        if not tasks or not all(isinstance(t, Task) for t in tasks):
            raise TypeError("tasks: expected a non-empty list of Task objects")
        self.tasks = list(tasks)
        self.vocab_size = max(t.vocab_size for t in tasks)

    def __repr__(self) -> str:
        return f"Mixture({self.tasks!r})"

    def batch(self, batch_size: int, split: str, seed: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``index // n`` of task ``index % n``: (input_ids [B, T] int64, targets [B, T] int64)."""
        n = len(self.tasks)
        return self.tasks[index % n].batch(batch_size, split, seed, index // n)
