"""Rows, tables and the dated markdown section of the kernel benchmark.

A row is a dict: section ("fwd", "fwd+bwd", "fwd B=1", "decode eager", "decode graphed"), impl
("hybridlm", "fla", "sdpa", "reference"), shape, B, T, ms, tokens_per_s, tflops, gbps, bw_share,
note ("OOM", "raises ..."). Rows of one (section, shape, B, T) compare side by side.
"""

from __future__ import annotations

import datetime
import json
import platform

import torch

from hybridlm.bench.timing import FLOP_CONVENTION
from hybridlm.ops._checks import pdl_on, pdl_order

OURS = "hybridlm"
HEADER = (f"{'section':<15}{'shape':<28}{'B':>4}{'T':>9} {'impl':<10}{'ms':>10}{'tokens/s':>10}"
          f"{'TFLOP/s':>9}{'GB/s':>7}{'%copy':>7}{'ours x':>8}  note")


def make_row(section, impl, shape, B, T, ms, *, flops, nbytes, tokens, copy_rate, note) -> dict:
    s = None if ms is None else ms * 1e-3
    return {
        "section": section, "impl": impl, "shape": shape, "B": B, "T": T, "ms": ms,
        "tokens_per_s": None if s is None else (tokens if tokens is not None else B * T) / s,
        "tflops": None if s is None or flops is None else flops / s / 1e12,
        "gbps": None if s is None or nbytes is None else nbytes / s / 1e9,
        "bw_share": None if s is None or nbytes is None else nbytes / s / copy_rate,
        "note": note,
    }


def _group(row) -> tuple:
    return row["section"], row["shape"], row["B"], row["T"]


def speedups(rows: list[dict]) -> dict[int, float]:
    """Per peer row (by index): its time over ours in the same group, i.e. how many times faster ours is."""
    ours = {_group(r): r["ms"] for r in rows if r["impl"] == OURS and r["ms"]}
    return {i: r["ms"] / ours[_group(r)] for i, r in enumerate(rows)
            if r["impl"] != OURS and r["ms"] and _group(r) in ours}


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _human(x) -> str:
    if x is None:
        return "-"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def format_row(row: dict, speedup: float | None = None) -> str:
    ms = "-" if row["ms"] is None else (f"{row['ms'] * 1e3:.1f}us" if row["ms"] < 0.1 else f"{row['ms']:.3f}")
    share = "-" if row["bw_share"] is None else f"{row['bw_share']:.0%}"
    return (f"{row['section']:<15}{row['shape']:<28}{row['B']:>4}{row['T']:>9} {row['impl']:<10}{ms:>10}"
            f"{_human(row['tokens_per_s']):>10}{_num(row['tflops'], '.1f'):>9}{_num(row['gbps'], '.0f'):>7}"
            f"{share:>7}{_num(speedup, '.2f'):>8}  {row['note']}")


def format_table(rows: list[dict]) -> str:
    ups = speedups(rows)
    lines = [HEADER] + [format_row(r, ups.get(i)) for i, r in enumerate(rows)]
    return "\n".join(lines) + "\n('ours x': the peer's time over ours, > 1 when ours is faster)"


def format_checks(rows: list[dict]) -> str:
    lines = [f"{'correctness check':<62}{'rel err':>10}{'tol':>9}  result"]
    for r in rows:
        verdict = {True: "ok", False: "WRONG", None: "raises"}[r["ok"]]
        if r["note"] == "peer" and r["ok"] is False:
            verdict = "peer differs (not gating)"
        lines.append(f"{r['path']:<62}{_num(r['rel_err'], '.2e'):>10}{_num(r['tol'], '.0e'):>9}  {verdict} "
                     f"{r['note'] if r['ok'] is None else ''}")
    return "\n".join(lines)


def _find(rows, section, impl, shape=None, B=None, T=None):
    for r in rows:
        if (r["section"], r["impl"]) == (section, impl) and r["ms"] and shape in (None, r["shape"]) \
                and B in (None, r["B"]) and T in (None, r["T"]):
            return r
    return None


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, each as 'reached/missed: what was measured' (a missing row says so)."""
    out = []
    qwen = next((r["shape"] for r in rows if r["shape"].startswith("qwen3-next")), None)
    ours, fla = _find(rows, "fwd B=1", OURS, qwen, 1, 32768), _find(rows, "fwd B=1", "fla", qwen, 1, 32768)
    if ours and fla:
        x = fla["ms"] / ours["ms"]
        out.append(f"{'reached' if x >= 2 else 'missed'}: fwd >= 2x fla at Qwen3-Next B=1 T=32k: {x:.2f}x")
    ups = speedups(rows)
    fwd = [(r, ups[i]) for i, r in enumerate(rows) if i in ups and r["impl"] == "fla" and r["section"].startswith("fwd")
           and r["section"] != "fwd+bwd"]
    if fwd:
        worst = min(fwd, key=lambda p: p[1])
        out.append(f"{'reached' if worst[1] >= 1 else 'missed'}: fwd never slower than fla: worst "
                   f"{worst[1]:.2f}x at {worst[0]['shape']} B={worst[0]['B']} T={worst[0]['T']}")
    sd = [(r, ups[i]) for i, r in enumerate(rows) if i in ups and r["impl"] == "sdpa"
          and r["section"] == "fwd+bwd" and r["T"] >= 16384]
    if sd:
        worst = min(sd, key=lambda p: p[1])
        out.append(f"{'reached' if worst[1] >= 5 else 'missed'}: fwd+bwd >= 5x SDPA at T >= 16k: worst "
                   f"{worst[1]:.2f}x at {worst[0]['shape']} T={worst[0]['T']}")
    long_, base = _find(rows, "fwd B=1", OURS, qwen, 1, 1048576), _find(rows, "fwd", OURS, qwen, 32, 2048)
    if long_ and base:
        ratio = long_["tokens_per_s"] / base["tokens_per_s"]
        out.append(f"{'reached' if ratio >= 0.9 else 'missed'}: B=1 T=1M within 10% of B=32 T=2k tokens/s: "
                   f"{ratio:.0%}")
    for section in ("decode graphed", "decode eager"):
        big = [r for r in rows if r["section"] == section and r["impl"] == OURS and r["ms"] and r["B"] >= 32]
        if big:
            worst = min(big, key=lambda r: r["bw_share"])
            out.append(f"{'reached' if worst['bw_share'] >= 0.9 else 'missed'}: {section} >= 90% of copy "
                       f"bandwidth at batch >= 32: worst {worst['bw_share']:.1%} at B={worst['B']}")
        one = _find(rows, section, OURS, B=1)
        if one:
            out.append(f"{'reached' if one['ms'] < 0.01 else 'missed'}: {section} < 10 us per layer at "
                       f"batch 1: {one['ms'] * 1e3:.1f} us")
    return out


def format_targets(rows: list[dict]) -> str:
    return "targets (issue #3):\n" + "\n".join("  " + t for t in targets(rows))


def environment(has_fla: bool) -> dict:
    import triton

    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "card": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
           "torch": torch.__version__, "triton": triton.__version__}
    if torch.cuda.is_available():  # which launches the decode kernels timed (HYBRIDLM_PDL=0: off)
        env["pdl"] = f"on ({pdl_order()})" if pdl_on(torch.device("cuda", torch.cuda.current_device())) else "off"
    if has_fla:
        from importlib.metadata import PackageNotFoundError, version
        try:
            env["fla"] = version("flash-linear-attention")
        except PackageNotFoundError:
            import fla
            env["fla"] = getattr(fla, "__version__", "unknown")
    return env


def write_rows_json(path: str | None, rows: list[dict], **extra) -> None:
    """An experiment's rows as JSON at ``path`` (nothing when None), beside the date, card and
    versions (:func:`environment`) and any ``extra`` fields (the measured copy rate, say)."""
    if path:
        with open(path, "w") as f:
            json.dump(dict(environment(False), **extra, rows=rows), f, indent=1)


def markdown_section(env: dict, checks: list[dict], rows: list[dict]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in env.items() if k not in ("date", "card", "skipped"))
    lines = [f"## GPU kernels, {env['date']}: {env['card']}", "",
             f"{versions}. bf16 inputs, float32 state; medians of `triton.testing.do_bench`. "
             f"Produced by `hybridlm bench kernels`.", "", FLOP_CONVENTION + ".", "",
             "### Correctness (relative error against the float32 reference)", "",
             "| path | rel err | tol | result |", "|---|---|---|---|"]
    for r in checks:
        verdict = {True: "ok", False: "WRONG", None: r["note"]}[r["ok"]]
        lines.append(f"| {r['path']} | {_num(r['rel_err'], '.2e')} | {_num(r['tol'], '.0e')} | {verdict} |")
    lines += ["", "### Timings", "",
              "| section | shape | B | T | impl | ms | tokens/s | TFLOP/s | GB/s | share of copy BW | ours x | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ups = speedups(rows)
    for i, r in enumerate(rows):
        share = "-" if r["bw_share"] is None else f"{r['bw_share']:.0%}"
        ms = "-" if r["ms"] is None else f"{r['ms']:.4g}"
        lines.append(f"| {r['section']} | {r['shape']} | {r['B']} | {r['T']:,} | {r['impl']} | {ms} | "
                     f"{_human(r['tokens_per_s'])} | {_num(r['tflops'], '.1f')} | {_num(r['gbps'], '.0f')} | "
                     f"{share} | {_num(ups.get(i), '.2f')} | {r['note']} |")
    lines += ["", "'ours x': the peer's time over ours (> 1: ours is faster)."]
    if env.get("skipped"):
        lines += ["", "Not run (time limit of the run): " + ", ".join(env["skipped"]) + "."]
    lines += ["", "### Targets (issue #3)", ""]
    lines += [f"- {t}" for t in targets(rows)] + [""]
    return "\n".join(lines)
