"""Multi-hop variable tracking (the RULER task; the multi-step recall MiniMax named when it reverted
from linear attention): chains of assignments, then a question about the last variable of each.

    BOS a = 7 ; x = 3 ; b = a ; y = x ; c = b ; QUERY c [7] QUERY y [3]     ([.] = answers)

Each chain has ``hops`` copies after its first assignment; statements of different chains are
interleaved at random (each chain keeps its order). Variables come from the lower half of the
content ids, values from the upper half.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from hybridlm.tasks.base import BOS, EQ, FIRST_CONTENT, QUERY, SEMI, Example, Task, check_positive_int


@dataclass(frozen=True)
class MultiHop(Task):
    """``num_chains`` chains of ``hops`` hops each.

    Example::

        x, y = MultiHop(hops=3, num_chains=2, vocab_size=64).batch(4, "train", seed=0, index=0)
    """

    hops: int
    num_chains: int = 1
    vocab_size: int = 256

    name = "multihop"

    def __post_init__(self) -> None:
        check_positive_int("hops", self.hops)
        check_positive_int("num_chains", self.num_chains)
        check_positive_int("vocab_size", self.vocab_size, FIRST_CONTENT + 2)
        need = self.num_chains * (self.hops + 1)
        if need > self.half:
            raise ValueError(
                f"vocab_size: {self.num_chains} chains of {self.hops} hops need {need} variable ids, "
                f"vocab_size={self.vocab_size} has {self.half}"
            )

    @property
    def half(self) -> int:
        return (self.vocab_size - FIRST_CONTENT) // 2

    def draw(self, rng: random.Random) -> Example:
        names = rng.sample(range(FIRST_CONTENT, FIRST_CONTENT + self.half), self.num_chains * (self.hops + 1))
        chains = [names[c * (self.hops + 1):(c + 1) * (self.hops + 1)] for c in range(self.num_chains)]
        values = [rng.randrange(FIRST_CONTENT + self.half, FIRST_CONTENT + 2 * self.half) for _ in chains]
        # Interleave: a random order of chain ids, each appearing hops + 1 times.
        order = [c for c in range(self.num_chains) for _ in range(self.hops + 1)]
        rng.shuffle(order)
        progress = [0] * self.num_chains
        tokens = [BOS]
        for c in order:
            i = progress[c]
            rhs = values[c] if i == 0 else chains[c][i - 1]
            tokens += [chains[c][i], EQ, rhs, SEMI]
            progress[c] += 1
        answer = [False] * len(tokens)
        for c in rng.sample(range(self.num_chains), self.num_chains):
            tokens += [QUERY, chains[c][-1], values[c]]
            answer += [False, False, True]
        return Example(tokens, answer)
