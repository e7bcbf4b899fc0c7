"""Table and plots of ``hybridlm.profile`` rows (kept apart so the measuring code stays short)."""

from __future__ import annotations

from hybridlm.memory import format_bytes

GIB = 1024**3


def _num(value, fmt: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, fmt)


def format_table(rows: list[dict]) -> str:
    """The rows of ``hybridlm.profile.profile_models`` as a fixed-width text table.

    Peak memory shows "n/a" where it was not measured (on the CPU torch keeps no peak count);
    cache bytes show the measured cache and, after the slash, memory.py's figure for it; "(graph)"
    marks rows decoded through StaticDecoder's CUDA graph.
    """
    if not rows:
        raise ValueError("rows: expected at least one profile row")
    head = (f"{'model':<34} {'context':>9} {'batch':>5} {'TTFT s':>9} {'prefill tok/s':>13} {'decode tok/s':>12} "
            f"{'bound tok/s':>11} {'share':>6} {'peak':>10} {'cache (memory.py)':>23} {'max batch':>9}")
    lines = [head]
    for r in rows:
        cache = "n/a" if r["cache_bytes"] is None else (
            f"{format_bytes(r['cache_bytes'])} ({format_bytes(r['cache_bytes_memory_py'])})")
        batch = f"{r['batch']}*" if r.get("at_max_batch") else str(r["batch"])
        found = r.get("max_batch_found")
        max_batch = _num(r.get("max_batch"), "d") + ("" if found is None else f" /{found}")
        lines.append(
            f"{r['model'][:34]:<34} {r['context']:>9,} {batch:>5} {_num(r['ttft_s'], '.4f'):>9} "
            f"{_num(r.get('prefill_tokens_per_s'), ',.0f'):>13} {_num(r['decode_tokens_per_s'], ',.1f'):>12} "
            f"{_num(r.get('bandwidth_bound_tokens_per_s'), ',.0f'):>11} {_num(r.get('bandwidth_share'), '.1%'):>6} "
            f"{'n/a' if r['peak_bytes'] is None else format_bytes(r['peak_bytes']):>10} {cache:>23} "
            f"{max_batch:>9}" + ("  (graph)" if r.get("decode") == "cuda graph" else "")
            + (f"  {r['error']}" if r.get("error") else ""))
    if any(r.get("at_max_batch") for r in rows):
        lines.append("* the largest batch that fits (max batch: analytic, then found by allocation after '/')")
    first = rows[0]
    if first.get("copy_bandwidth_bytes_per_s"):
        lines.append(f"copy bandwidth {first['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s on {first['device']} "
                     f"({first['dtype']}); bound = bandwidth / bytes per token (weights / batch + KV + state read "
                     "and write)")
    return "\n".join(lines)


def plot_profile(rows: list[dict], path: str) -> None:
    """PNG with two panels against context (log scale): decode tokens/s, one line per model and
    batch, and cache bytes per model at its smallest batch (measured points, memory.py dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("rows: expected at least one profile row")
    fig, (ax_rate, ax_cache) = plt.subplots(1, 2, figsize=(12, 4.4), dpi=110)
    for (model, batch), pts in _series(rows, "decode_tokens_per_s").items():
        ax_rate.plot(*zip(*pts), marker="o", label=f"{model}, batch {batch}")
    ax_rate.set_ylabel("decode tokens/s (all rows)")
    ax_rate.set_yscale("log")
    smallest = min(r["batch"] for r in rows)
    measured = [r["cache_bytes"] for r in rows if r["cache_bytes"] is not None]
    unit, unit_name = (GIB, "GiB") if max(measured, default=0) >= GIB else (1024**2, "MiB")
    for (model, batch), pts in _series(rows, "cache_bytes").items():
        if batch != smallest:
            continue
        line, = ax_cache.plot([c for c, _ in pts], [b / unit for _, b in pts], marker="o", label=f"{model} (measured)")
        analytic = [(r["context"], r["cache_bytes_memory_py"] / unit) for r in rows
                    if r["model"] == model and r["batch"] == batch and r.get("cache_bytes_memory_py")]
        ax_cache.plot(*zip(*analytic), linestyle="--", color=line.get_color(), label=f"{model} (memory.py)")
    ax_cache.set_ylabel(f"cache {unit_name} (batch {smallest})")
    first = rows[0]
    for ax in (ax_rate, ax_cache):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"hybridlm profile on {first['device']} ({first['dtype']})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _series(rows: list[dict], key: str) -> dict[tuple[str, int], list[tuple[int, float]]]:
    """{(model, batch): [(context, value), ...]} of the rows where ``key`` was measured."""
    out: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for r in rows:
        if r.get(key) is not None:
            out.setdefault((r["model"], r["batch"]), []).append((r["context"], r[key]))
    return {k: sorted(v) for k, v in out.items()}
