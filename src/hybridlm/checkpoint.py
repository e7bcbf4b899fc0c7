"""Training checkpoints: every tensor in one safetensors file, everything else in a JSON sidecar.

A checkpoint ``step-000120`` in a run directory is two files:

    step-000120.safetensors   model parameters (``model.*``), optimizer moments (``optim.<i>.*``),
                              RNG states (``rng.*``: torch CPU, each CUDA device, numpy)
    step-000120.json          format tag, step, SHA-256 of the tensor file, optimizer hyper-
                              parameters, Python RNG state, and the caller's ``meta`` (run config,
                              loss history)

Loading never runs code: safetensors and JSON only, no pickle. The JSON is written last and both
files go through a temporary name + ``os.replace``, so a checkpoint either exists whole or not at
all; a file that does not hash to what its sidecar recorded, or that was written for another model
or run, is refused with a ValueError that says why.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT = "hybridlm-train-checkpoint"
VERSION = 1
_NAME = re.compile(r"^step-(\d+)\.json$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _rng_tensors() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    py_version, py_state, py_gauss = random.getstate()
    info = {
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss},
    }
    return tensors, info


def _restore_rng(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch_cpu"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    n = info["numpy"]
    keys = tensors["rng.numpy"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = info["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = optimizer.state_dict()
    tensors = {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous().clone()
    return tensors, sd["param_groups"]


def _optimizer_state(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def checkpoint_paths(directory: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with a JSON sidecar) in ``directory``, oldest first, as (step, json path)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), d / m.group(0)) for m in map(_NAME.match, os.listdir(d)) if m]
    return sorted(found)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The JSON sidecar of the newest checkpoint in ``directory``, or None."""
    found = checkpoint_paths(directory)
    return found[-1][1] if found else None


def save_checkpoint(
    directory: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` into ``directory`` atomically and delete all but the newest ``keep``.

    ``meta`` must be JSON-serialisable; it comes back from ``load_checkpoint`` and is where the
    caller records what must match on resume (model config, run config) and its loss history.
    Returns the path of the JSON sidecar.
    """
    if not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep: expected an int >= 1, got {keep!r}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share memory (tied embeddings).
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    optim_tensors, groups = _optimizer_tensors(optimizer)
    rng_tensors, rng_info = _rng_tensors()
    tensors.update(optim_tensors)
    tensors.update(rng_tensors)

    stem = f"step-{step:06d}"
    st_path = d / f"{stem}.safetensors"
    tmp = d / f".{stem}.safetensors.tmp{os.getpid()}"
    save_file(tensors, str(tmp), metadata={"format": FORMAT})
    digest = _sha256(tmp)
    os.replace(tmp, st_path)
    sidecar = {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        "tensors": st_path.name,
        "sha256": digest,
        "optimizer_param_groups": groups,
        "rng": rng_info,
        "meta": meta,
    }
    json_path = d / f"{stem}.json"
    _write_json_atomic(json_path, sidecar)
    for _, old in checkpoint_paths(d)[:-keep]:
        old.unlink(missing_ok=True)
        old.with_suffix(".safetensors").unlink(missing_ok=True)
    return json_path


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """The checked JSON sidecar of a checkpoint (path to its .json, its .safetensors or its directory)."""
    p = Path(path)
    if p.is_dir():
        latest = latest_checkpoint(p)
        if latest is None:
            raise FileNotFoundError(f"checkpoint: no step-*.json checkpoint in {p}")
        p = latest
    if p.suffix == ".safetensors":
        p = p.with_suffix(".json")
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint: {p} does not exist")
    try:
        sidecar = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"checkpoint: {p} is not valid JSON ({e}); the file is corrupted") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != FORMAT:
        raise ValueError(f"checkpoint: {p} is not a hybridlm training checkpoint (format tag missing)")
    if sidecar.get("version") != VERSION:
        raise ValueError(f"checkpoint: {p} has format version {sidecar.get('version')}, this hybridlm reads {VERSION}")
    sidecar["_path"] = str(p)
    return sidecar


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    expect_meta: dict[str, Any] | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore model (and optimizer, RNG states) from a checkpoint; return its sidecar dict.

    ``path``: the checkpoint's .json, its .safetensors, or a run directory (newest checkpoint).
    ``expect_meta``: keys whose values must equal the checkpoint's ``meta`` (e.g. the model
    config); a difference means the checkpoint belongs to another run and raises ValueError.
    """
    sidecar = read_sidecar(path)
    jpath = Path(sidecar["_path"])
    for key, want in (expect_meta or {}).items():
        got = sidecar["meta"].get(key)
        if got != want:
            raise ValueError(
                f"checkpoint: {jpath} was written for a different {key}; refusing to load it "
                f"(checkpoint has {json.dumps(got)[:200]}, this run has {json.dumps(want)[:200]})"
            )
    st_path = jpath.with_name(sidecar["tensors"])
    if not st_path.is_file():
        raise FileNotFoundError(f"checkpoint: tensor file {st_path} is missing")
    digest = _sha256(st_path)
    if digest != sidecar["sha256"]:
        raise ValueError(
            f"checkpoint: {st_path} is corrupted (sha256 {digest[:16]}..., sidecar recorded {sidecar['sha256'][:16]}...)"
        )
    tensors = load_file(str(st_path))
    model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(model_sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"checkpoint: {st_path} does not fit this model: {e}") from None
    if optimizer is not None:
        optimizer.load_state_dict(_optimizer_state(tensors, sidecar["optimizer_param_groups"]))
    if restore_rng:
        _restore_rng(tensors, sidecar["rng"])
    return sidecar
