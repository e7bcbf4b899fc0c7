"""Copying (Jelassi et al. 2024, "Repeat After Me"): reproduce a random string after a separator.

    BOS s1 s2 ... sL SEP [s1 s2 ... sL]          ([.] = answers)

A transformer copies strings of any length it can attend over; a fixed-state model can only copy
what fits its state, so accuracy falls with L.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from hybridlm.tasks.base import BOS, FIRST_CONTENT, SEP, Example, Task, check_positive_int


@dataclass(frozen=True)
class Copy(Task):
    """Copy strings of ``min_length .. length`` tokens (default: exactly ``length``).

    Example::

        x, y = Copy(length=16, vocab_size=32).batch(8, "test", seed=0, index=0)   # [8, 33]
    """

    length: int
    vocab_size: int = 256
    min_length: int | None = None

    name = "copy"

    def __post_init__(self) -> None:
        check_positive_int("length", self.length)
        check_positive_int("vocab_size", self.vocab_size, FIRST_CONTENT + 2)
        if self.min_length is not None:
            check_positive_int("min_length", self.min_length)
            if self.min_length > self.length:
                raise ValueError(f"min_length: expected <= length ({self.length}), got {self.min_length}")

    def draw(self, rng: random.Random) -> Example:
        n = self.length if self.min_length is None else rng.randint(self.min_length, self.length)
        s = [rng.randrange(FIRST_CONTENT, self.vocab_size) for _ in range(n)]
        return Example([BOS, *s, SEP, *s], [False] * (n + 2) + [True] * n)
