"""Safetensors folders as Hugging Face writes them: ``model.safetensors``, or shards listed by
``model.safetensors.index.json`` (``weight_map``: tensor name -> shard file).

Reading looks at headers first (names, shapes, dtypes: no tensor data), so a folder can be checked
whole before anything is allocated; tensors are then read one at a time, shard by shard. Writing
goes shard by shard through a temporary name + ``os.replace`` and writes the index last, so a
reader never sees a half-written file. Only safetensors and JSON are read: nothing is unpickled
and no code from the folder runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


@dataclass(frozen=True)
class TensorInfo:
    """What a safetensors header says about one tensor."""

    shard: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors code: F32, BF16, ...


def read_headers(folder: str | Path) -> dict[str, TensorInfo]:
    """Name -> TensorInfo for every tensor of the folder's safetensors file(s).

    Raises FileNotFoundError when there is no model.safetensors(.index.json), ValueError for a
    malformed index, a shard outside the folder, a truncated or corrupt file, or a tensor that
    the index places in a shard that does not hold it.
    """
    folder = Path(folder)
    shards, weight_map = _shard_list(folder)
    infos: dict[str, TensorInfo] = {}
    for shard in shards:
        try:
            # safe_open checks that the header covers the whole file: a truncated shard fails here.
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():
                    if name in infos:
                        raise ValueError(f"checkpoint: tensor {name} is in both {infos[name].shard.name} "
                                         f"and {shard.name}")
                    sl = f.get_slice(name)
                    infos[name] = TensorInfo(shard, tuple(sl.get_shape()), sl.get_dtype())
        except SafetensorError as e:
            raise ValueError(f"checkpoint: {shard} is not a readable safetensors file "
                             f"(truncated or corrupt: {e})") from None
    if weight_map is not None:
        wrong = sorted(n for n, file in weight_map.items() if n not in infos or infos[n].shard.name != file)
        if wrong:
            raise ValueError(f"checkpoint: {INDEX_FILE} lists tensors that their shard does not hold: "
                             f"{_names(wrong)}")
    return infos


def _shard_list(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"checkpoint: {index} is not a valid index (need a 'weight_map' object): {e}") from None
        if not isinstance(weight_map, dict):
            raise ValueError(f"checkpoint: {index}: 'weight_map' must map tensor names to shard files")
        files = sorted(set(weight_map.values()))
        for file in files:
            # A shard name is a plain file name: never a path out of the folder.
            if not isinstance(file, str) or Path(file).name != file or not file.endswith(".safetensors"):
                raise ValueError(f"checkpoint: {index} names shard {file!r}; expected a .safetensors file "
                                 f"name inside the folder")
            if not (folder / file).is_file():
                raise FileNotFoundError(f"checkpoint: shard {folder / file} listed in {INDEX_FILE} is missing")
        return [folder / f for f in files], weight_map
    single = folder / SINGLE_FILE
    if single.is_file():
        return [single], None
    raise FileNotFoundError(f"checkpoint: no {SINGLE_FILE} or {INDEX_FILE} in {folder}")


def iter_tensors(infos: dict[str, TensorInfo], names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for ``names``, opening each shard once and reading one tensor at a time."""
    by_shard: dict[Path, list[str]] = {}
    for name in names:
        by_shard.setdefault(infos[name].shard, []).append(name)
    for shard, shard_names in by_shard.items():
        with safe_open(str(shard), framework="pt") as f:
            for name in shard_names:
                yield name, f.get_tensor(name)


def torch_dtype(code: str) -> torch.dtype:
    """torch dtype of a safetensors dtype code (floating types only)."""
    if code not in _DTYPES:
        raise ValueError(f"checkpoint: tensor dtype {code}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[code]


def write_shards(folder: str | Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int) -> list[Path]:
    """Write (name, tensor) pairs into ``folder`` as safetensors shards of at most ``max_shard_bytes``
    (a larger single tensor gets a shard of its own), plus an index when there is more than one.

    Tensors are pulled from the iterable as needed, so at most one shard is held in memory.
    Files from an earlier save into the same folder that this save does not rewrite are removed.
    Returns the written shard paths.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes: expected a positive int, got {max_shard_bytes!r}")
    written: list[Path] = []
    names: list[list[str]] = []
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes:
            written.append(_write_shard(folder, len(written), shard))
            names.append(list(shard))
            shard, size = {}, 0
        # clone: safetensors refuses tensors that share storage (views of a fused weight, tied embeddings).
        shard[name] = t.detach().to("cpu").contiguous().clone()
        size += nbytes
    if shard or not written:
        written.append(_write_shard(folder, len(written), shard))
        names.append(list(shard))
    final = _final_names(written)
    for tmp, path in zip(written, final):
        os.replace(tmp, path)
    weight_map = {name: path.name for path, shard_names in zip(final, names) for name in shard_names}
    _finish_index(folder, final, weight_map)
    return final


def _write_shard(folder: Path, i: int, tensors: dict[str, torch.Tensor]) -> Path:
    tmp = folder / f".shard-{i:05d}.safetensors.tmp{os.getpid()}"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    return tmp


def _final_names(tmp_paths: list[Path]) -> list[Path]:
    n = len(tmp_paths)
    if n == 1:
        return [tmp_paths[0].parent / SINGLE_FILE]
    return [p.parent / f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, p in enumerate(tmp_paths)]


def _finish_index(folder: Path, shards: list[Path], weight_map: dict[str, str]) -> None:
    index = folder / INDEX_FILE
    if len(shards) > 1:
        total = sum(p.stat().st_size for p in shards)
        write_json_atomic(index, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    else:
        index.unlink(missing_ok=True)
    keep = {p.name for p in shards}
    for old in folder.glob("model*.safetensors"):
        if old.name not in keep:
            old.unlink()


def write_json_atomic(path: str | Path, obj: dict) -> None:
    """Write ``obj`` as indented JSON to ``path`` through a temporary file + os.replace."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _names(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")
