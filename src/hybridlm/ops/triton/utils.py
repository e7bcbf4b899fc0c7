"""Index tables shared by the chunked kernels: where each sequence and each chunk lives in the
flattened token axis.

Every chunked kernel sees the tokens as one flat axis of ``B * T`` rows (a contiguous [B, T, ...]
tensor already is one). A batch of B equal sequences is then the packed case with
``cu_seqlens = [0, T, 2T, ..., BT]``, so one code path serves both, and chunks never cross a
sequence boundary because they are cut per sequence.
"""

from __future__ import annotations

import torch

CHUNK = 64


def sequence_tables(B: int, T: int, bounds: list[int] | None, device: torch.device):
    """Sequence starts and per-sequence chunk offsets.

    Args:
        B, T: batch and token counts of the [B, T, ...] inputs.
        bounds: host list of packed-sequence boundaries (``cu_seqlens``, B == 1) or None.
    Returns:
        cu: int32 [N + 1] token offset of each sequence in the flat axis.
        chunk_offsets: int32 [N + 1] index of each sequence's first chunk (states are stored per chunk).
        chunk_bounds: int32 [NC, 2] first and one-past-last flat token of each chunk.
    """
    if bounds is None:
        nt = -(-T // CHUNK)
        seq = torch.arange(B + 1, device=device, dtype=torch.int32)
        cu = seq * T
        chunk_offsets = seq * nt
        b = torch.arange(B, device=device, dtype=torch.int32).repeat_interleave(nt)
        j = torch.arange(nt, device=device, dtype=torch.int32).repeat(B)
        start = b * T + j * CHUNK
        end = torch.minimum(start + CHUNK, (b + 1) * T)
        return cu, chunk_offsets, torch.stack([start, end], 1).contiguous()
    counts, chunk_rows = [0], []
    for bos, eos in zip(bounds[:-1], bounds[1:]):
        n = -(-(eos - bos) // CHUNK)
        counts.append(counts[-1] + n)
        chunk_rows += [(s, min(s + CHUNK, eos)) for s in range(bos, eos, CHUNK)]
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    chunk_offsets = torch.tensor(counts, dtype=torch.int32, device=device)
    chunk_bounds = torch.tensor(chunk_rows, dtype=torch.int32, device=device).reshape(-1, 2)
    return cu, chunk_offsets, chunk_bounds
