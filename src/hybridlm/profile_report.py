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
            f"{max_batch:>9}" + ({"cuda graph": "  (graph)", "compiled cuda graph": "  (compiled graph)"}.get(r.get("decode"), ""))
            + ("  PDL" if r.get("pdl") else "") + (" wait-first" if r.get("pdl_order") == "wait-first" else "")
            + (f"  {r['error']}" if r.get("error") else ""))
    if any(r.get("at_max_batch") for r in rows):
        lines.append("* the largest batch that fits (max batch: analytic, then found by allocation after '/')")
    chunks = sorted({(r["batch"], r["prefill_chunk"]) for r in rows if r.get("prefill_chunk")})
    if chunks:
        lines.append("prefill tokens of each prompt per call: "
                     + ", ".join(f"{chunk:,} at batch {batch}" for batch, chunk in chunks))
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
        ax_rate.plot(*zip(*pts), marker="o", label=f"{model}, " + (
            "largest batch" if batch == "max" else f"batch {batch}"))
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
    fig.suptitle(f"hybridlm profile on {first.get('card') or first['device']} ({first['dtype']})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _series(rows: list[dict], key: str) -> dict[tuple[str, int], list[tuple[int, float]]]:
    """{(model, batch): [(context, value), ...]} of the rows where ``key`` was measured."""
    out: dict[tuple[str, int | str], list[tuple[int, float]]] = {}
    for r in rows:
        if r.get(key) is not None:
            out.setdefault((r["model"], "max" if r.get("at_max_batch") else r["batch"]), []).append(
                (r["context"], r[key]))
    return {k: sorted(v) for k, v in out.items()}


def _best(rows: list[dict], model: str, context: int, **match) -> dict | None:
    """The row of ``model`` at ``context`` (and the given keys) with the highest decode rate."""
    found = [r for r in rows if r["model"] == model and r["context"] == context and r.get("decode_tokens_per_s")
             and all(r.get(k) == v for k, v in match.items())]
    return max(found, key=lambda r: r["decode_tokens_per_s"], default=None)


def summarize(rows: list[dict], context: int = 131072) -> list[str]:
    """The profile issue's three comparisons, as lines (each says what it could not find):
    hybrid vs its all-attention twin at ``context``, each at the largest batch measured there; hybrid
    vs transformers' generate at batch 1 (same context); best share of the bandwidth-bound rate."""
    lines = []
    engines = [r for r in rows if r.get("engine") == "hybridlm" and r.get("decode_tokens_per_s")]
    twins = sorted({r["model"] for r in engines if r["model"].endswith(" twin")})
    for twin in twins:
        model = twin[: -len(" twin")]
        a = max((r for r in engines if r["model"] == model and r["context"] == context),
                key=lambda r: r["batch"], default=None)
        b = max((r for r in engines if r["model"] == twin and r["context"] == context),
                key=lambda r: r["batch"], default=None)
        if a and b:
            lines.append(f"{model} vs its twin at {context:,}: {a['decode_tokens_per_s']:,.0f} tokens/s (batch "
                         f"{a['batch']}) vs {b['decode_tokens_per_s']:,.0f} (batch {b['batch']}): "
                         f"{a['decode_tokens_per_s'] / b['decode_tokens_per_s']:.2f}x")
        else:
            lines.append(f"{model} vs its twin at {context:,}: not measured")
    for t in (r for r in rows if r.get("engine") == "transformers" and r.get("decode_tokens_per_s")):
        model = t["model"][: -len(" (transformers)")]
        ours = _best(engines, model, t["context"], batch=t["batch"])
        if ours:
            lines.append(f"{model} vs transformers' generate at {t['context']:,}, batch {t['batch']}: "
                         f"{ours['decode_tokens_per_s']:,.1f} vs {t['decode_tokens_per_s']:,.2f} tokens/s: "
                         f"{ours['decode_tokens_per_s'] / t['decode_tokens_per_s']:.1f}x")
    shares = [r for r in engines if r.get("bandwidth_share")]
    if shares:
        top = max(shares, key=lambda r: r["bandwidth_share"])
        low = min(shares, key=lambda r: r["bandwidth_share"])
        lines.append(f"bandwidth-bound share: best {top['bandwidth_share']:.0%} ({top['model']}, {top['context']:,}, "
                     f"batch {top['batch']}), worst {low['bandwidth_share']:.0%} ({low['model']}, "
                     f"{low['context']:,}, batch {low['batch']})")
    return lines


def main(argv: list[str] | None = None) -> int:
    """``python -m hybridlm.profile_report ROWS.json ...``: one table and the summary over JSON files
    written by ``hybridlm profile --json``."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m hybridlm.profile_report", description=main.__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="JSON row lists from hybridlm profile --json")
    ap.add_argument("--context", type=int, default=131072, help="context of the twin comparison")
    ap.add_argument("--plot", metavar="PNG", help="also draw the rows as hybridlm profile --plot does")
    args = ap.parse_args(argv)
    rows = [r for f in args.files for r in json.loads(open(f).read())]
    print(format_table(rows))
    print("\n".join(summarize(rows, args.context)))
    if args.plot:
        plot_profile(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
