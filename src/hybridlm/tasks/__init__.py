"""Synthetic recall tasks: seeded, deterministic generators with disjoint train/test splits.

Every task gives ``task.batch(batch_size, split, seed, index) -> (input_ids, targets)``, both
[B, T] int64, with targets -100 wherever there is no loss (everything but the answer tokens).
"""

from hybridlm.tasks.base import IGNORE, Example, Mixture, Task, collate, split_of
from hybridlm.tasks.copy import Copy
from hybridlm.tasks.mqar import MQAR
from hybridlm.tasks.multihop import MultiHop
from hybridlm.tasks.needle import Needle
from hybridlm.tasks.text import ByteText

TASK_NAMES = ("mqar", "copy", "needle", "multihop")

__all__ = ["IGNORE", "TASK_NAMES", "ByteText", "Example", "Mixture", "Task", "collate", "split_of", "make_task",
           "Copy", "MQAR", "MultiHop", "Needle"]


def make_task(name: str, vocab_size: int, seq_len: int | None = None, num_pairs: int = 8, length: int = 16,
              hops: int = 2, num_chains: int = 2, depth: float | None = None) -> Task:
    """A task by name with the parameters that apply to it (the others are ignored).

    mqar: num_pairs, seq_len; copy: length; needle: seq_len (default 64), depth;
    multihop: hops, num_chains.
    """
    if name == "mqar":
        return MQAR(num_pairs=num_pairs, seq_len=seq_len, vocab_size=vocab_size)
    if name == "copy":
        return Copy(length=length, vocab_size=vocab_size)
    if name == "needle":
        return Needle(seq_len=seq_len or 64, depth=depth, vocab_size=vocab_size)
    if name == "multihop":
        return MultiHop(hops=hops, num_chains=num_chains, vocab_size=vocab_size)
    raise ValueError(f"task: expected one of {TASK_NAMES}, got {name!r}")
