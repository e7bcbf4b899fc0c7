"""Synthetic recall tasks: seeded, deterministic generators with disjoint train/test splits.

Every task gives ``task.batch(batch_size, split, seed, index) -> (input_ids, targets)``, both
[B, T] int64, with targets -100 wherever there is no loss (everything but the answer tokens).
"""

from hybridlm.tasks.base import IGNORE, Example, Task, collate, split_of
from hybridlm.tasks.copy import Copy
from hybridlm.tasks.mqar import MQAR
from hybridlm.tasks.multihop import MultiHop
from hybridlm.tasks.needle import Needle

__all__ = ["IGNORE", "Example", "Task", "collate", "split_of", "Copy", "MQAR", "MultiHop", "Needle"]
