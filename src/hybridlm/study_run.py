"""Running the trade-off study (``hybridlm.study`` defines it): train and measure each model, in worker
processes on CPU, with a time guard, rewriting the report after every model.

``run_study(StudyConfig(...), out_dir)`` is the entry point (``hybridlm study`` calls it).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hybridlm.config import HybridConfig
from hybridlm.model import HybridLM
from hybridlm.study import (GateInit, StudyConfig, apply_gate_init, build_model, length_task, matched_configs,
                            size_task, train_task)
from hybridlm.tasks import Mixture
from hybridlm.tasks.base import Task
from hybridlm.train import TrainConfig, evaluate, train


# --------------------------------------------------------------------------- measurements
def cache_bytes(model: HybridLM, contexts: tuple[int, ...]) -> dict[int, int]:
    """Bytes of a batch-1 cache at each context (bf16 keys/values, recurrent state in config.state_dtype)."""
    return {n: model.new_cache(1, n, device="meta", dtype=torch.bfloat16).nbytes() for n in contexts}


@torch.no_grad()
def decode_tokens_per_s(model: HybridLM, context: int, tokens: int, seed: int = 0) -> float:
    """Greedy decode speed at batch 1 after a ``context``-token prefill (median of 3 timed runs)."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=gen).to(device)
    rates = []
    for _ in range(3):
        cache = model.new_cache(1, context + tokens)
        nxt = model(prompt, cache=cache)[:, -1].argmax(-1)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(tokens):
            nxt = model(nxt[:, None], cache=cache)[:, -1].argmax(-1)
        _sync(device)
        rates.append(tokens / (time.perf_counter() - t0))
    return sorted(rates)[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def recall_grid(model: HybridLM, sc: StudyConfig) -> dict[str, dict[int, float]]:
    """Test accuracy vs the task's size (``size_task``; "pairs" in the results whatever the task) and,
    for MQAR, vs length at eval_len_pairs ("length"; empty for the other tasks)."""
    def acc(task: Task) -> float:
        return evaluate(model, task, sc.eval_batch_size, sc.eval_batches, seed=sc.seed + 1)["accuracy"]

    return {
        "pairs": {n: acc(size_task(sc, n)) for n in sc.eval_pairs},
        "length": {t: acc(length_task(sc, t)) for t in sc.eval_lens} if sc.task == "mqar" else {},
    }


# --------------------------------------------------------------------------- running
@dataclass
class Run:
    """One trained model's numbers."""

    label: str
    pattern: str
    layer_types: str
    gate_init: str | None
    params: int
    intermediate_size: int
    train_seconds: float
    train_tokens_per_s: float
    final_loss: float
    recall: dict[str, dict[int, float]] = field(default_factory=dict)
    cache_bytes: dict[int, int] = field(default_factory=dict)
    decode_tokens_per_s: float = 0.0


def run_one(pattern: str, config: HybridConfig, gi: GateInit | None, sc: StudyConfig, device: torch.device,
            log=print) -> Run:
    """Train and measure one model."""
    label = pattern if gi is None else f"{pattern}@{gi.name}"
    torch.manual_seed(sc.seed)
    model = build_model(config, sc.token_shift)
    if gi is not None:
        apply_gate_init(model, gi, torch.Generator().manual_seed(sc.seed))
    model.to(device)
    train_data = Mixture([train_task(sc, n) for n in sc.train_pairs])
    cfg = TrainConfig(steps=sc.steps, batch_size=sc.batch_size, lr=sc.lr, warmup_steps=sc.warmup_steps,
                      eval_batches=1, log_every=max(1, sc.steps // 5), seed=sc.seed)
    log(f"[{label}] {config.layer_types}  {model.num_parameters():,} params  training {sc.steps} steps")
    result = train(model, train_data, cfg, log=lambda line: log(f"[{label}] {line}"))
    model.eval()
    run = Run(label=label, pattern=pattern, layer_types=config.layer_types, gate_init=None if gi is None else gi.name,
              params=model.num_parameters(), intermediate_size=config.intermediate_size,
              train_seconds=result.seconds, train_tokens_per_s=result.tokens_per_s,
              final_loss=sum(result.losses[-10:]) / len(result.losses[-10:]))
    run.recall = recall_grid(model, sc)
    run.cache_bytes = cache_bytes(model, sc.cache_contexts)
    run.decode_tokens_per_s = decode_tokens_per_s(model, sc.decode_context, sc.decode_tokens, sc.seed)
    pairs = "  ".join(f"{n}:{a:.2f}" for n, a in run.recall["pairs"].items())
    log(f"[{label}] {result.seconds:.0f}s  loss {run.final_loss:.3f}  recall by pairs {pairs}")
    return run


def run_study(sc: StudyConfig, out_dir: str | Path, device: torch.device | None = None, log=None) -> dict[str, Any]:
    """Run the whole study; write results.json, report.md and plots into ``out_dir``. Returns the results.

    On CPU, ``sc.jobs`` models train at once in worker processes of ``sc.threads`` threads each: these
    models are so small that one thread per model keeps a core busier than two threads on one model.
    The report is rewritten after every model, so a run stopped from outside still leaves one for
    the models done; with ``sc.max_minutes`` a model is started only while the time left exceeds 1.1 x
    the longest model so far, and the ones not started are listed as skipped.
    """
    t0 = time.perf_counter()
    log = log or _log
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cores = _usable_cores()
    jobs = 1 if device.type == "cuda" else (sc.jobs or min(2, cores))
    threads = sc.threads or max(1, cores // jobs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = [(p, c, gi) for p, c in matched_configs(sc).items()
            for gi in ([None, *sc.gate_inits] if "G" in p and sc.gate_inits else [None])]
    labels = [p if gi is None else f"{p}@{gi.name}" for p, _, gi in work]
    log(f"study {sc.name}: {len(work)} models, {jobs} at a time x {threads} threads, on {_device_name(device)}"
        + ("" if sc.max_minutes is None else f", at most {sc.max_minutes:g} minutes"))
    deadline = None if sc.max_minutes is None else t0 + 60 * sc.max_minutes
    runs: dict[int, Run] = {}
    skipped: list[int] = []
    longest = 0.0

    def fits(i: int) -> bool:
        if deadline is None or time.perf_counter() + 1.1 * longest <= deadline:
            return True
        skipped.append(i)
        log(f"[{labels[i]}] skipped: {(deadline - time.perf_counter()) / 60:.1f} min left, the longest model "
            f"so far took {longest / 60:.1f}")
        return False

    def save(complete: bool) -> dict[str, Any]:
        return _save(sc, out, device, jobs, threads, [runs[k] for k in sorted(runs)],
                     [labels[k] for k in sorted(skipped)], t0, complete)

    def finished(i: int, run: Run, seconds: float) -> None:
        nonlocal longest
        runs[i], longest = run, max(longest, seconds)
        save(complete=False)

    if jobs == 1:
        torch.set_num_threads(threads)
        for i in range(len(work)):
            if fits(i):
                started = time.perf_counter()
                finished(i, run_one(*work[i], sc, device, log), time.perf_counter() - started)
    else:
        # Longest first, so the last model to start is a short one; submitted as workers free up.
        queue = sorted(range(len(work)), key=lambda i: -_cost(work[i][1]))
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=torch.set_num_threads, initargs=(threads,)) as ex:
            pending: dict[Future, tuple[int, float]] = {}
            while queue or pending:
                while queue and len(pending) < jobs:
                    i = queue.pop(0)
                    if fits(i):
                        pending[ex.submit(run_one, *work[i], sc, device, _log)] = (i, time.perf_counter())
                for future in wait(pending, return_when=FIRST_COMPLETED).done:
                    i, started = pending.pop(future)
                    finished(i, future.result(), time.perf_counter() - started)
    return save(complete=True)


def _save(sc: StudyConfig, out: Path, device: torch.device, jobs: int, threads: int, runs: list[Run],
          skipped: list[str], t0: float, complete: bool) -> dict[str, Any]:
    """Write results.json, report.md and the plots for ``runs``; returns the results dict."""
    from hybridlm.study_report import write_report

    results = {
        "study": _jsonable(dataclasses.asdict(sc)),
        "device": _device_name(device),
        "torch": torch.__version__,
        "jobs": jobs,
        "threads": threads,
        "runs": [_jsonable(dataclasses.asdict(r)) for r in runs],
        "skipped": skipped,
        "complete": complete,
        "wall_seconds": time.perf_counter() - t0,
    }
    results["files"] = write_report(results, out)
    results["wall_seconds"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def _usable_cores() -> int:
    """Cores this process may run on (taskset / cgroup affinity), not all the machine has."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _cost(config: HybridConfig) -> int:
    """Rough relative training cost of a config on CPU: delta-rule layers are the slow ones."""
    return sum(3 if c in "GD" else 1 for c in config.layer_types)


def _log(line: str) -> None:
    print(line, flush=True)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({_usable_cores()} cores usable)"


def _jsonable(obj):
    """dict keys to str (JSON), tuples to lists, recursively."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
