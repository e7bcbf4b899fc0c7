"""A plain text file as byte-level training data (vocab 256), for a real-text sanity check.

The last ``test_fraction`` of the file is the test split, the rest is train, so the two never
share a window. Batch ``index`` holds random windows drawn from a generator seeded by
``(seed, split, index)``: like the synthetic tasks, a pure function of its arguments.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from hybridlm.tasks.base import check_positive_int, check_split


class ByteText:
    """Windows of ``seq_len + 1`` bytes of a file; every next byte is a target.

    Example::

        data = ByteText("input.txt", seq_len=128)
        x, y = data.batch(16, "train", seed=0, index=0)     # both [16, 128] int64
    """

    name = "text"
    vocab_size = 256

    def __init__(self, path: str | Path, seq_len: int, test_fraction: float = 0.1):
        check_positive_int("seq_len", seq_len)
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction: expected a number in (0, 1), got {test_fraction!r}")
        raw = Path(path).read_bytes()
        cut = int(len(raw) * (1 - test_fraction))
        self.path, self.seq_len = str(path), seq_len
        self._bytes = {"train": raw[:cut], "test": raw[cut:]}
        for split, b in self._bytes.items():
            if len(b) < seq_len + 1:
                raise ValueError(
                    f"path: {path} gives a {split} split of {len(b)} bytes, fewer than seq_len + 1 = {seq_len + 1}"
                )
        self._data = {s: torch.frombuffer(bytearray(b), dtype=torch.uint8) for s, b in self._bytes.items()}

    def __repr__(self) -> str:
        return f"ByteText({self.path!r}, seq_len={self.seq_len})"

    def batch(self, batch_size: int, split: str, seed: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids [B, seq_len] int64, targets [B, seq_len] int64)``: targets are the next bytes."""
        check_positive_int("batch_size", batch_size)
        check_split(split)
        data = self._data[split]
        key = hashlib.blake2b(f"{seed}|{split}|{index}".encode(), digest_size=8).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)
        starts = torch.randint(0, len(data) - self.seq_len, (batch_size,), generator=gen)
        windows = torch.stack([data[s:s + self.seq_len + 1] for s in starts.tolist()]).long()
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
