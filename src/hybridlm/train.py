"""The training loop: AdamW, warmup + cosine, clipping, accumulation, eval, checkpoints, exact resume.

Data comes from any object with ``batch(batch_size, split, seed, index) -> (input_ids, targets)``
(the tasks in ``hybridlm.tasks``, ``ByteText``). Batch ``index`` is a pure function of its
arguments, and optimizer step ``s`` of a run with ``A`` accumulation steps on ``W`` ranks reads
indices ``(s * A + a) * W + rank``. Together with the model, optimizer and RNG states in the
checkpoint, that makes a resumed run bit-identical to an uninterrupted one on CPU, and makes
``W`` ranks with ``A`` accumulation steps see exactly the batches one process with ``W * A``
accumulation steps sees.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel
(gloo on CPU, nccl on CUDA); rank 0 writes checkpoints and prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hybridlm.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from hybridlm.tasks.base import IGNORE


class BatchSource(Protocol):
    def batch(self, batch_size: int, split: str, seed: int, index: int) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class TrainConfig:
    """Every knob of a run. ``batch_size`` is per rank and per accumulation step."""

    steps: int = 200
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # 0 disables clipping
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batches: int = 4
    checkpoint_every: int = 0  # 0: checkpoint only at the end (when out_dir is set)
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_batches", "keep_checkpoints", "log_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr: expected a positive number, got {self.lr!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio: expected a number in [0, 1], got {self.min_lr_ratio!r}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError(f"grad_clip, weight_decay: expected >= 0, got {self.grad_clip}, {self.weight_decay}")
        self.betas = tuple(self.betas)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


@dataclass
class TrainResult:
    """``losses[s]``: mean training loss of step s + 1; ``evals``: {"step", "loss", "accuracy"} dicts."""

    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    tokens_per_s: float = 0.0
    seconds: float = 0.0
    checkpoint: str | None = None


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (norm weights, biases, gate parameters) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False: the per-parameter loop is the same code on every machine, keeping CPU runs bit-exact.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, foreach=False)


def masked_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over targets != -100. logits [B, T, V] any float; targets [B, T] int64."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: BatchSource, batch_size: int, batches: int, seed: int = 0,
             split: str = "test") -> dict[str, float]:
    """Loss and accuracy (argmax == target, over answer tokens) on ``batches`` batches of ``split``.

    Returns {"loss": float, "accuracy": float in [0, 1], "tokens": int answer tokens scored}.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum, correct, count = 0.0, 0, 0
    for i in range(batches):
        x, y = (t.to(device) for t in data.batch(batch_size, split, seed, i))
        with _autocast(device):
            logits = model(x)
        scored = y != IGNORE
        n = int(scored.sum())
        loss_sum += float(masked_loss(logits, y)) * n
        correct += int((logits.argmax(-1) == y)[scored].sum())
        count += n
    model.train(was_training)
    return {"loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1), "tokens": count}


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _progress(total: int, enabled: bool):
    """A tqdm bar when tqdm is installed and output is a terminal, else None (plain log lines)."""
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, dynamic_ncols=True)


def train(
    model: torch.nn.Module,
    data: BatchSource,
    cfg: TrainConfig,
    out_dir: str | Path | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    meta: dict[str, Any] | None = None,
    eval_data: BatchSource | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train ``model`` in place on ``data`` for ``cfg.steps`` optimizer steps.

    Args:
        model: takes input_ids [B, T] int64 and returns logits [B, T, vocab]; already on its device.
            It may be wrapped in DDP by the caller or not (``train`` wraps it when a process group
            is initialised and it is not wrapped yet).
        data: a BatchSource; eval_data: where evaluation draws its test batches (default: data).
        cfg: a TrainConfig.
        out_dir: where checkpoints go (None: no checkpoints).
        resume: continue from the newest checkpoint in out_dir if there is one.
        stop_after: end this call after this many steps of the run have been done (an interruption
            on purpose; the schedule still spans cfg.steps). A checkpoint is written there.
        meta: JSON values stored in checkpoints and required to match on resume (e.g. model config).
        progress: show a progress bar (tqdm, on a terminal) or log lines (rank 0 only).
        log: where log lines go (default print).
    Returns:
        TrainResult whose ``losses`` cover every step from 1 to where the run stopped, resumed
        steps included (they come from the checkpoint).
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg: expected a TrainConfig, got {type(cfg).__name__}")
    rank, world = _dist_info()
    core = model.module if hasattr(model, "module") else model
    device = next(core.parameters()).device
    if world > 1 and not hasattr(model, "module"):
        model = torch.nn.parallel.DistributedDataParallel(core, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = make_optimizer(core, cfg)
    run_meta = {"train": cfg.to_dict(), "world_size": world, **(meta or {})}
    result = TrainResult()
    start = 0
    if resume and out_dir is not None and latest_checkpoint(out_dir) is not None:
        sidecar = load_checkpoint(out_dir, core, optimizer, expect_meta=run_meta)
        start = sidecar["step"]
        result.losses = list(sidecar["meta"]["losses"])
        result.evals = list(sidecar["meta"]["evals"])
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    eval_source = data if eval_data is None else eval_data
    show = progress and rank == 0
    bar = _progress(end - start, show)
    model.train()
    tokens, t0 = 0, time.perf_counter()
    # Step losses stay on the device until a log line or a checkpoint needs them:
    # reading each with .item() would stop the host every step until the GPU is done, so the next
    # batch could not be drawn while the GPU still works on this one.
    pending: list[torch.Tensor] = []

    def read_losses() -> None:
        if pending:
            result.losses.extend(torch.stack(pending).tolist())
            pending.clear()

    for step in range(start, end):
        loss, n_tok = _step(model, optimizer, data, cfg, step, rank, world, device)
        pending.append(loss)
        tokens += n_tok
        done = step + 1
        if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
            result.evals.append({"step": done, **evaluate(core, eval_source, cfg.batch_size, cfg.eval_batches, cfg.seed)})
        due = done % cfg.log_every == 0 or done == end
        if bar is not None:
            bar.update(1)
        if show and due:
            read_losses()
            rate = tokens * world / max(time.perf_counter() - t0, 1e-9)
            if bar is not None:
                bar.set_postfix(loss=f"{result.losses[-1]:.4f}", tok_s=f"{rate:,.0f}")
            else:
                log(f"step {done}/{cfg.steps}  loss {result.losses[-1]:.4f}  lr {lr_at(step, cfg):.2e}  "
                    f"tok/s {rate:,.0f}")
        if out_dir is not None and rank == 0 and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 \
                and done != end:
            read_losses()
            _save(out_dir, done, core, optimizer, run_meta, result, cfg)
    read_losses()
    if bar is not None:
        bar.close()
    if end == cfg.steps and (not result.evals or result.evals[-1]["step"] != end):
        result.evals.append({"step": end, **evaluate(core, eval_source, cfg.batch_size, cfg.eval_batches, cfg.seed)})
    result.seconds = time.perf_counter() - t0
    result.tokens_per_s = tokens * world / max(result.seconds, 1e-9)
    if out_dir is not None and rank == 0 and end > start:
        result.checkpoint = str(_save(out_dir, end, core, optimizer, run_meta, result, cfg))
    return result


def _save(out_dir, step, model, optimizer, run_meta, result: TrainResult, cfg: TrainConfig) -> Path:
    meta = {**run_meta, "losses": result.losses, "evals": result.evals}
    return save_checkpoint(out_dir, step, model, optimizer, meta, keep=cfg.keep_checkpoints)


def _step(model, optimizer, data: BatchSource, cfg: TrainConfig, step: int, rank: int, world: int,
          device: torch.device) -> tuple[torch.Tensor, int]:
    """One optimizer step over cfg.grad_accum micro-batches. Returns (mean loss over all ranks as a float64
    0-d tensor on ``device``, not read yet; tokens here)."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    optimizer.zero_grad(set_to_none=True)
    loss_sum, n_tok = torch.zeros((), dtype=torch.float64, device=device), 0
    for a in range(cfg.grad_accum):
        index = (step * cfg.grad_accum + a) * world + rank
        x, y = (t.to(device) for t in data.batch(cfg.batch_size, "train", cfg.seed, index))
        last = a == cfg.grad_accum - 1
        # Only the last micro-batch all-reduces gradients under DDP.
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with _autocast(device):
                logits = model(x)
            loss = masked_loss(logits, y)
            (loss / cfg.grad_accum).backward()
        loss_sum += loss.detach().double()  # the float64 sum that loss.item() values would give
        n_tok += x.numel()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=False)
    optimizer.step()
    mean = loss_sum / cfg.grad_accum
    if world > 1:
        dist.all_reduce(mean)
        mean /= world
    return mean, n_tok


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1. Returns (rank, world_size, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def write_summary(path: str | Path, result: TrainResult, extra: dict[str, Any]) -> None:
    """results of a run as JSON (losses, evals, speed) next to its checkpoints."""
    Path(path).write_text(json.dumps({**extra, **dataclasses.asdict(result)}, indent=1) + "\n")
