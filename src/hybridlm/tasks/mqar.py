"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology").

A sequence lists ``num_pairs`` key-value pairs, then asks for the values of ``num_queries`` of the
keys, each query placed at a random spot in a tail of filler tokens::

    BOS k1 v1 k2 v2 ... kN vN  FILL FILL k2 [v2] FILL k1 [v1] FILL ...      ([.] = answer)

Keys come from the lower half of the content ids and values from the upper half, so a model cannot
confuse the two roles. A model with a fixed-size state has to hold every pair until its query;
once the pairs outnumber what the state can store, recall falls. ``seq_len`` sets the total length
(the tail grows with it), which separates "more pairs" from "longer distance".
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from hybridlm.tasks.base import BOS, FILL, FIRST_CONTENT, Example, Task, check_positive_int


@dataclass(frozen=True)
class MQAR(Task):
    """MQAR with ``num_pairs`` pairs in sequences of ``seq_len`` tokens (default: the shortest, 1 + 4N).

    Example::

        task = MQAR(num_pairs=8, seq_len=64, vocab_size=64)
        x, y = task.batch(32, "train", seed=0, index=0)   # x, y: [32, 63] int64
    """

    num_pairs: int
    seq_len: int | None = None
    vocab_size: int = 256
    num_queries: int | None = None  # default: every key is asked once

    name = "mqar"

    def __post_init__(self) -> None:
        check_positive_int("num_pairs", self.num_pairs)
        check_positive_int("vocab_size", self.vocab_size)
        if self.num_pairs > self.half:
            raise ValueError(
                f"num_pairs: at most {self.half} distinct keys fit in vocab_size={self.vocab_size}, got {self.num_pairs}"
            )
        if self.num_queries is not None:
            check_positive_int("num_queries", self.num_queries)
            if self.num_queries > self.num_pairs:
                raise ValueError(f"num_queries: expected <= num_pairs ({self.num_pairs}), got {self.num_queries}")
        if self.seq_len is not None:
            check_positive_int("seq_len", self.seq_len)
            if self.seq_len < self.min_len:
                raise ValueError(
                    f"seq_len: {self.num_pairs} pairs and {self.queries} queries need at least {self.min_len} tokens, "
                    f"got {self.seq_len}"
                )

    @property
    def half(self) -> int:
        return (self.vocab_size - FIRST_CONTENT) // 2

    @property
    def queries(self) -> int:
        return self.num_pairs if self.num_queries is None else self.num_queries

    @property
    def min_len(self) -> int:
        return 1 + 2 * self.num_pairs + 2 * self.queries

    def draw(self, rng: random.Random) -> Example:
        keys = rng.sample(range(FIRST_CONTENT, FIRST_CONTENT + self.half), self.num_pairs)
        values = [rng.randrange(FIRST_CONTENT + self.half, FIRST_CONTENT + 2 * self.half) for _ in keys]
        tokens = [BOS]
        for k, v in zip(keys, values):
            tokens += [k, v]
        tail = (self.seq_len or self.min_len) - len(tokens)
        # Queries sit in 2-token slots of the tail; an odd leftover token goes at the very end.
        slots = sorted(rng.sample(range(tail // 2), self.queries))
        asked = rng.sample(range(self.num_pairs), self.queries)
        answer = [False] * len(tokens)
        by_slot = dict(zip(slots, asked))
        for s in range(tail // 2):
            if s in by_slot:
                i = by_slot[s]
                tokens += [keys[i], values[i]]
                answer += [False, True]
            else:
                tokens += [FILL, FILL]
                answer += [False, False]
        if tail % 2:
            tokens.append(FILL)
            answer.append(False)
        return Example(tokens, answer)
