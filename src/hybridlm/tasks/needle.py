"""Needle retrieval: one key-value pair hidden at a chosen depth in filler, asked for at the end.

    BOS f f f ... NEEDLE k v f f ... f QUERY k [v]          ([.] = answer)

Filler tokens are random content ids (keys and values included), so only the NEEDLE marker tells
the pair apart. ``depth`` is the needle's position as a fraction of the filler (0 = start,
1 = just before the query); None draws it uniformly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from hybridlm.tasks.base import BOS, FIRST_CONTENT, NEEDLE, QUERY, Example, Task, check_positive_int

_OVERHEAD = 6  # BOS, NEEDLE k v, QUERY k (the answer v is the last token)


@dataclass(frozen=True)
class Needle(Task):
    """Needle in ``seq_len`` tokens (answer included) at ``depth`` in [0, 1] (None: random).

    Example::

        x, y = Needle(seq_len=256, depth=0.25, vocab_size=64).batch(4, "test", seed=0, index=0)
    """

    seq_len: int
    depth: float | None = None
    vocab_size: int = 256

    name = "needle"

    def __post_init__(self) -> None:
        check_positive_int("seq_len", self.seq_len, _OVERHEAD + 1)
        check_positive_int("vocab_size", self.vocab_size, FIRST_CONTENT + 2)
        if self.depth is not None and not (isinstance(self.depth, (int, float)) and 0.0 <= self.depth <= 1.0):
            raise ValueError(f"depth: expected a number in [0, 1] or None, got {self.depth!r}")

    def draw(self, rng: random.Random) -> Example:
        half = (self.vocab_size - FIRST_CONTENT) // 2
        key = rng.randrange(FIRST_CONTENT, FIRST_CONTENT + half)
        value = rng.randrange(FIRST_CONTENT + half, FIRST_CONTENT + 2 * half)
        n_fill = self.seq_len - _OVERHEAD - 1
        filler = [rng.randrange(FIRST_CONTENT, self.vocab_size) for _ in range(n_fill)]
        depth = rng.random() if self.depth is None else self.depth
        at = round(depth * n_fill)
        tokens = [BOS, *filler[:at], NEEDLE, key, value, *filler[at:], QUERY, key, value]
        return Example(tokens, [False] * (len(tokens) - 1) + [True])
