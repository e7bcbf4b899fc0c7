"""The study's report: markdown tables, a headline in numbers, and four PNG plots.

Reads only the results dict that ``hybridlm.study_run.run_study`` builds (the same one it saves as
results.json), so a report can be rebuilt from a saved run:

    write_report(json.load(open("runs/study/results.json")), Path("runs/study"))

A study split over several invocations with the same settings (``--patterns A,G`` on one call,
``--patterns GGGA,D`` on the next, e.g. to stay inside a per-command time limit) is merged into one
report with ``merge`` or from the shell:

    python -m hybridlm.study_report runs/part1/results.json runs/part2/results.json --out runs/study
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MARKERS = ("o", "s", "D", "^", "v", "P", "X")
DASHES = ("-", "--", "-.", ":")
PLOTS = ("acc_vs_pairs.png", "acc_vs_length.png", "cache_vs_context.png", "acc_vs_cache.png")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return ""


def _fmt_ctx(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _find(runs: list[dict], pattern: str) -> dict | None:
    return next((r for r in runs if r["label"] == pattern), None)


TOKEN_SHIFT_TEXT = {
    "layers": "every model with a layer that has no short conv (all-attention, the hybrids, plain linear "
              "attention) gets it; all-G and all-D models do not (every layer has a conv).",
    "noconv": "only models with no short conv at all (all-attention, plain linear attention) get it.",
    "all": "every model gets it.",
    "none": "no model gets it.",
}


# Settings that may differ between the parts of a merged study.
_PER_PART = ("name", "patterns", "max_minutes", "jobs", "threads", "num_layers")


def _layers(study: dict[str, Any]) -> int:
    """Layers every model of a study had: num_layers, or by default the longest pattern (at least 4)."""
    return study.get("num_layers") or max(4, *(len(p) for p in study["patterns"]))


def merge(parts: list[dict[str, Any]], name: str | None = None) -> dict[str, Any]:
    """One results dict from the results of several invocations of the same study.

    Every part must have run on the same device and torch with the same settings (all but
    ``_PER_PART``); each pattern may come from one part only. Runs keep the parts' order; a
    pattern skipped in one part and run in another counts as run; wall time is the parts' sum.
    Raises ValueError naming the first setting that differs.
    """
    if not parts:
        raise ValueError("parts: expected at least one results dict")
    first = parts[0]
    for i, part in enumerate(parts[1:], 1):
        if _layers(part["study"]) != _layers(first["study"]):
            raise ValueError(f"parts[{i}]: its models have {_layers(part['study'])} layers, parts[0]'s "
                             f"{_layers(first['study'])} (set --layers to match)")
        for key in ("device", "torch"):
            if part.get(key) != first.get(key):
                raise ValueError(f"parts[{i}]: {key} {part.get(key)!r} differs from parts[0]'s {first.get(key)!r}")
        for key in sorted(set(first["study"]) | set(part["study"])):
            if key not in _PER_PART and part["study"].get(key) != first["study"].get(key):
                raise ValueError(f"parts[{i}]: study setting {key!r} is {part['study'].get(key)!r}, "
                                 f"parts[0] has {first['study'].get(key)!r}")
    runs, seen = [], set()
    for i, part in enumerate(parts):
        for run in part["runs"]:
            if run["label"] in seen:
                raise ValueError(f"parts[{i}]: model {run['label']!r} was already run in an earlier part")
            seen.add(run["label"])
            runs.append(run)
    skipped = [s for part in parts for s in part.get("skipped", []) if s not in seen]
    study = {**first["study"], "name": name or first["study"]["name"],
             "patterns": list(dict.fromkeys(p for part in parts for p in part["study"]["patterns"])),
             "max_minutes": first["study"].get("max_minutes"), "num_layers": _layers(first["study"])}
    return {**first, "study": study, "runs": runs, "skipped": list(dict.fromkeys(skipped)),
            "complete": all(part.get("complete", True) for part in parts),
            "parts": sum(part.get("parts", 1) for part in parts),
            "wall_seconds": sum(part["wall_seconds"] for part in parts)}


def status(results: dict[str, Any]) -> list[str]:
    """Lines saying the run is partial, merged, or that models were skipped (empty for a plain complete run)."""
    lines = []
    if results.get("parts", 1) > 1:
        lines.append(f"**Merged** from {results['parts']} invocations of `hybridlm study` with the same settings, "
                     "the patterns split between them; the wall time is their sum.")
    if not results.get("complete", True):
        lines.append(f"**Partial report**: written after {len(results['runs'])} model(s); the run had not ended.")
    if results.get("skipped"):
        lines.append(f"**Not run** (the {results['study'].get('max_minutes')}-minute limit, `max_minutes`, "
                     f"would have been passed): {', '.join(f'`{s}`' for s in results['skipped'])}.")
    return lines + [""] if lines else []


UNITS = {"mqar": "pairs", "multihop": "chains", "copy": "tokens to copy"}
TASK_TEXT = {
    "mqar": "multi-query associative recall (MQAR)",
    "multihop": "multi-hop variable tracking",
    "copy": "copying a random string after a separator",
}


def _unit(sc: dict[str, Any]) -> str:
    return UNITS[sc.get("task", "mqar")]


def _has_length(sc: dict[str, Any], runs: list[dict]) -> bool:
    return sc.get("task", "mqar") == "mqar" and bool(runs) and bool(runs[0]["recall"]["length"])


def _training_text(sc: dict[str, Any]) -> str:
    sizes = ", ".join(map(str, sc["train_pairs"]))
    task = sc.get("task", "mqar")
    if task == "mqar":
        return (f"MQAR at {sc['train_len']} tokens with {sizes} key-value pairs (keys and values from disjoint "
                "halves of the vocabulary)")
    if task == "multihop":
        return f"multi-hop variable tracking with {sizes} interleaved chains of {sc.get('hops', 2)} hops"
    return f"copying random strings of {sizes} tokens"


def headline(results: dict[str, Any]) -> list[str]:
    """Sentences with the numbers that answer the study's question (empty when the runs are missing)."""
    sc, runs = results["study"], results["runs"]
    unit = _unit(sc)
    hardest = str(max(sc["eval_pairs"]))
    longest = str(max(sc["eval_lens"]))
    ctx = str(max(sc["cache_contexts"]))
    with_length = _has_length(sc, runs)
    lines = [f"- Recall with **{hardest} {unit}** (training went up to {max(sc['train_pairs'])})"
             + (f" and at **{longest} tokens** (training length {sc['train_len']}, {sc['eval_len_pairs']} pairs):"
                if with_length else ":")]
    for r in runs:
        at_length = f" / {100 * r['recall']['length'][longest]:.0f}%" if with_length else ""
        lines.append(f"  - `{r['label']}`: {100 * r['recall']['pairs'][hardest]:.0f}%{at_length}  (cache at "
                     f"{_fmt_ctx(int(ctx))}: {_fmt_bytes(r['cache_bytes'][ctx])})")
    attn, hybrid = _find(runs, "A"), _find(runs, "GGGA")
    if attn and hybrid:
        ratio = attn["cache_bytes"][ctx] / hybrid["cache_bytes"][ctx]
        gap = 100 * (attn["recall"]["pairs"][hardest] - hybrid["recall"]["pairs"][hardest])
        lines.append(f"- The 3:1 hybrid needs **{ratio:.1f}x less cache** than all-attention at "
                     f"{_fmt_ctx(int(ctx))} tokens, for a recall gap of **{gap:+.0f} points** at {hardest} {unit}.")
    linear = [r for r in runs if set(r["pattern"]) <= set("GDXKL")]
    if attn and linear:
        best = max(linear, key=lambda r: r["recall"]["pairs"][hardest])
        lines.append(f"- The best pure-linear model (`{best['label']}`) recalls "
                     f"{100 * best['recall']['pairs'][hardest]:.0f}% at {hardest} {unit} against all-attention's "
                     f"{100 * attn['recall']['pairs'][hardest]:.0f}%; its state is "
                     f"{_fmt_bytes(best['cache_bytes'][ctx])} at any context.")
    return lines


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def tables(results: dict[str, Any]) -> list[str]:
    sc, runs = results["study"], results["runs"]
    trained = set(sc["train_pairs"])
    top = max(sc["train_pairs"])
    pair_cols = [str(n) + ("" if n in trained else (" (beyond)" if n > top else " (unseen)")) for n in sc["eval_pairs"]]
    len_cols = [str(t) + ("" if t == sc["train_len"] else " (beyond)" if t > sc["train_len"] else "")
                for t in sc["eval_lens"]]
    ctxs = [str(c) for c in sc["cache_contexts"]]
    task = sc.get("task", "mqar")
    where = {"mqar": f"at {sc['train_len']} tokens or the fewest that hold the pairs (4 per pair + 1)",
             "multihop": f"{sc.get('hops', 2)} hops per chain, chains interleaved",
             "copy": "the whole copy scored, token by token"}[task]
    out = [f"## Recall vs number of {_unit(sc)}", "",
           f"Test accuracy on the answer tokens of {TASK_TEXT[task]}, {where}.", ""]
    out += _table(["model", *pair_cols], [[f"`{r['label']}`", *(f"{100 * a:.1f}%" for a in r["recall"]["pairs"].values())]
                                          for r in runs])
    if _has_length(sc, runs):
        out += ["", "## Recall vs sequence length", "",
                f"Test accuracy with {sc['eval_len_pairs']} pairs; the filler between the pairs and the queries grows.",
                ""]
        out += _table(["model", *len_cols], [[f"`{r['label']}`",
                                              *(f"{100 * a:.1f}%" for a in r["recall"]["length"].values())]
                                             for r in runs])
    out += ["", "## Size, cost and speed", "",
            "Cache: batch 1, bf16 keys/values, fp32 recurrent state, measured with `model.new_cache(...).nbytes()`. "
            f"Decode: greedy, batch 1, after a {sc['decode_context']}-token prompt.", ""]
    header = ["model", "layers", "params", "MLP width", "train s", "final loss",
              *(f"cache @{_fmt_ctx(int(c))}" for c in ctxs), "decode tok/s"]
    rows = [[f"`{r['label']}`", f"`{r['layer_types']}`", f"{r['params']:,}", str(r["intermediate_size"]),
             f"{r['train_seconds']:.0f}", f"{r['final_loss']:.3f}", *(_fmt_bytes(r["cache_bytes"][c]) for c in ctxs),
             f"{r['decode_tokens_per_s']:.0f}"] for r in runs]
    return out + _table(header, rows)


def plots(results: dict[str, Any], out: Path) -> list[str]:
    """Write the four PNGs; returns their file names (empty without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    sc, runs = results["study"], results["runs"]
    hardest, ctx = str(max(sc["eval_pairs"])), str(max(sc["cache_contexts"]))

    def sweep(key: str, fname: str, xlabel: str, train_hi: float) -> None:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, r in enumerate(runs):  # markers and dashes differ, so equal curves (100% and 100%) stay visible
            xs = [int(k) for k in r["recall"][key]]
            ax.plot(xs, [100 * v for v in r["recall"][key].values()], marker=MARKERS[i % len(MARKERS)],
                    linestyle=DASHES[i % len(DASHES)], markersize=7 - i % 3, label=r["label"])
        ax.axvspan(min(ax.get_xlim()[0], train_hi), train_hi, color="0.9", zorder=0, label="trained")
        ax.set(xlabel=xlabel, ylabel="recall accuracy (%)", ylim=(-3, 103))
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)

    written = [PLOTS[0], PLOTS[2], PLOTS[3]]
    sweep("pairs", PLOTS[0], "key-value pairs" if sc.get("task", "mqar") == "mqar" else _unit(sc),
          max(sc["train_pairs"]))
    if _has_length(sc, runs):
        sweep("length", PLOTS[1], f"sequence length ({sc['eval_len_pairs']} pairs)", sc["train_len"])
        written.insert(1, PLOTS[1])

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        xs = [int(c) for c in r["cache_bytes"]]
        ax.loglog(xs, list(r["cache_bytes"].values()), marker="o", label=r["label"])
    ax.set(xlabel="context (tokens)", ylabel="cache bytes (batch 1)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / PLOTS[2], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        x, y = r["cache_bytes"][ctx], 100 * r["recall"]["pairs"][hardest]
        ax.scatter([x], [y], s=40)
        ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set(xlabel=f"cache bytes at {_fmt_ctx(int(ctx))} tokens", ylabel=f"recall at {hardest} {_unit(sc)} (%)",
           ylim=(-3, 103))
    fig.tight_layout()
    fig.savefig(out / PLOTS[3], dpi=120)
    plt.close(fig)
    return written


def write_report(results: dict[str, Any], out: Path) -> list[str]:
    """Write report.md and the plots into ``out``; returns the file names written."""
    sc = results["study"]
    pngs = plots(results, out)
    params = [r["params"] for r in results["runs"]] or [1]
    spread = (max(params) - min(params)) / max(params)
    lines = [
        f"# hybridlm study: {sc['name']}", "",
        f"Device: {results['device']}, torch {results['torch']}, {results['threads']} threads; "
        f"wall time {results['wall_seconds']:.0f} s.", "",
        *status(results),
        "## Setup", "",
        f"- Every model has {_layers(sc)} layers "
        f"(so the longest pattern fits once), hidden size {sc['hidden_size']}, "
        f"{sc['heads']} heads; the MLP width of each is set so parameter counts match "
        f"(spread {100 * spread:.1f}%). Linear heads have key dim {sc['linear_key_dim'] or 'head_dim'} "
        "(this sets the recurrent state's size).",
        f"- Previous-token embedding (`token_shift={sc['token_shift']}`): {TOKEN_SHIFT_TEXT.get(sc['token_shift'], '')} "
        "It gives E[x_t] + P[x_(t-1)], so a layer without a short conv need not discover a previous-token head "
        "first; G/D layers have their own short conv. See `hybridlm.study.PrevTokenEmbedding`.",
        f"- Trained {sc['steps']} steps x {sc['batch_size']} sequences on {_training_text(sc)}; one size per "
        f"batch, in turn; vocabulary {sc['vocab_size']}; AdamW, lr {sc['lr']}, warmup + cosine; seed {sc['seed']}.",
        f"- Evaluated on the held-out split: {sc['eval_batches']} x {sc['eval_batch_size']} sequences per point.",
        "",
        "## Headline", "",
        *headline(results), "",
        *tables(results), "",
    ]
    if pngs:
        lines += ["## Plots", ""] + [f"![{p[:-4]}]({p})" for p in pngs] + [""]
    else:
        lines += ["(matplotlib is not installed: no plots; `pip install matplotlib`.)", ""]
    (out / "report.md").write_text("\n".join(lines))
    return ["report.md", *pngs]


def main(argv: list[str] | None = None) -> int:
    """``python -m hybridlm.study_report RESULTS.json [RESULTS.json ...] --out DIR``: (merge and) rebuild a report."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m hybridlm.study_report", description=main.__doc__)
    ap.add_argument("results", nargs="+", help="results.json files of `hybridlm study` runs with the same settings")
    ap.add_argument("--out", required=True, help="directory for report.md, the plots and the merged results.json")
    ap.add_argument("--name", help="study name in the report (default: the first part's)")
    args = ap.parse_args(argv)
    parts = []
    for path in args.results:
        try:
            parts.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as e:
            ap.error(f"results: cannot read {path}: {e}")
    try:
        results = merge(parts, args.name)
    except ValueError as e:
        ap.error(str(e))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results["files"] = write_report(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"report: {out / 'report.md'} ({len(results['runs'])} models from {len(parts)} part(s))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
