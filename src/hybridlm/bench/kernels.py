"""`hybridlm bench kernels`: check, then time, the gated delta rule kernels against their peers.

One GPU run: (1) every Triton path against the reference on fresh random inputs (abort on a wrong
number); (2) the device-to-device copy rate; (3) decode steps at batch 1..256, eager and captured in
a CUDA graph; (4) chunked forward and forward+backward at B x T = 64k for Qwen3-Next's heads (Hqk 16,
Hv 32, d 128) and for H 16, d 128 — ours, flash-linear-attention (when importable), torch SDPA causal
attention (flash backend, H = Hv heads) and the reference (T 2k only, it is slow); (5) B = 1 forward
at long T. Prints a table, writes JSON and a markdown section on request.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hybridlm.bench import add_kernel_arguments, check, report, timing

TOKENS = 65536


@dataclass(frozen=True)
class Heads:
    name: str
    H: int
    HV: int
    K: int
    V: int


QWEN3_NEXT = Heads("qwen3-next Hqk16 Hv32 d128", 16, 32, 128, 128)
H16 = Heads("H16 d128", 16, 16, 128, 128)


@dataclass(frozen=True)
class Plan:
    heads: tuple
    seq_lens: tuple
    long_seq_lens: tuple
    decode_batches: tuple


FULL = Plan((QWEN3_NEXT, H16), (2048, 8192, 16384, 32768, 65536), (32768, 131072, 1048576), (1, 8, 32, 128, 256))
QUICK = Plan((QWEN3_NEXT,), (2048, 32768), (32768,), (1, 32))


class Bench:
    """Holds the run's environment (device, copy rate, optional peer) and collects rows."""

    def __init__(self, device, copy_rate: float, fla_ops):
        self.device, self.copy_rate, self.fla = device, copy_rate, fla_ops
        self.rows: list[dict] = []

    def measure(self, section, impl, heads, B, T, fn, *, flops=None, nbytes=None, tokens=None,
                grad_to_none=None, graphed_calls=None):
        """Time ``fn`` (or the graph of ``graphed_calls``) and record a row; failures become notes."""
        ms, note = None, ""
        try:
            if graphed_calls is not None:
                ms = timing.graphed_ms_per_call(graphed_calls)
            else:
                ms = timing.median_ms(fn, grad_to_none=grad_to_none)
        except torch.OutOfMemoryError:
            note = "OOM"
        except Exception as exc:  # a peer that refuses this card is a result, not a crash
            note = f"raises {type(exc).__name__}: {str(exc).splitlines()[0][:70] if str(exc) else ''}"
        torch.cuda.synchronize()
        row = report.make_row(section, impl, heads.name, B, T, ms, flops=flops, nbytes=nbytes,
                              tokens=tokens, copy_rate=self.copy_rate, note=note)
        self.rows.append(row)
        print(report.format_row(row), flush=True)
        return row


def _gdn_inputs(heads: Heads, B: int, T: int, device, requires_grad: bool):
    # drawn on the device: host-side draws of 64k x 32 x 128 values would dominate the run
    torch.manual_seed(B * 7 + T)
    q = torch.randn(B, T, heads.H, heads.K, device=device, dtype=torch.bfloat16)
    k = torch.randn(B, T, heads.H, heads.K, device=device, dtype=torch.bfloat16)
    v = torch.randn(B, T, heads.HV, heads.V, device=device, dtype=torch.bfloat16)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, heads.HV, device=device) + 3.0)
    beta = torch.rand(B, T, heads.HV, device=device)
    return [x.requires_grad_(requires_grad) for x in (q, k, v, g, beta)]


def _ours(q, k, v, g, beta):
    from hybridlm.ops import gated_delta_rule

    return gated_delta_rule(q, k, v, g, beta, output_final_state=True, use_qk_l2norm=True, backend="triton")


def _reference(q, k, v, g, beta):
    from hybridlm.ops import gated_delta_rule

    return gated_delta_rule(q, k, v, g, beta, output_final_state=True, use_qk_l2norm=True, backend="reference")


def _fla_chunk(fla):
    def run(q, k, v, g, beta):
        return fla.chunk_gated_delta_rule(q, k, v, g=g, beta=beta, output_final_state=True,
                                          use_qk_l2norm_in_kernel=True)
    return run


def _fwd_bwd(op, inputs, do):
    def run():
        o, _ = op(*inputs)
        o.backward(do)
    return run


def bench_chunk(bench: Bench, heads: Heads, T: int, *, with_reference: bool) -> None:
    B = TOKENS // T
    flops = timing.gdn_chunk_fwd_flops(B, T, heads.HV, heads.K, heads.V)
    nbytes = timing.gdn_chunk_fwd_bytes(B, T, heads.H, heads.HV, heads.K, heads.V, 2)
    impls = [("hybridlm", _ours)]
    if bench.fla is not None:
        impls.append(("fla", _fla_chunk(bench.fla)))
    if with_reference:
        impls.append(("reference", _reference))
    inputs = _gdn_inputs(heads, B, T, bench.device, requires_grad=True)
    do = torch.randn(B, T, heads.HV, heads.V, device=bench.device, dtype=torch.bfloat16)
    for impl, op in impls:
        with torch.no_grad():
            bench.measure("fwd", impl, heads, B, T, lambda op=op: op(*inputs), flops=flops, nbytes=nbytes)
        bench.measure("fwd+bwd", impl, heads, B, T, _fwd_bwd(op, inputs, do), grad_to_none=inputs,
                      flops=flops * (1 + timing.BWD_OVER_FWD), nbytes=3 * nbytes)
    del inputs, do
    torch.cuda.empty_cache()
    bench_sdpa(bench, heads, B, T)


def bench_sdpa(bench: Bench, heads: Heads, B: int, T: int) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    H, d = heads.HV, heads.V
    q, k, v = (torch.randn(B, H, T, d, device=bench.device, dtype=torch.bfloat16).requires_grad_()
               for _ in range(3))
    do = torch.randn_like(q)
    flops = timing.sdpa_causal_fwd_flops(B, T, H, d)
    nbytes = timing.sdpa_fwd_bytes(B, T, H, d, 2)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        with torch.no_grad():
            bench.measure("fwd", "sdpa", heads, B, T, lambda: sdpa(q, k, v, is_causal=True),
                          flops=flops, nbytes=nbytes)
        bench.measure("fwd+bwd", "sdpa", heads, B, T,
                      lambda: sdpa(q, k, v, is_causal=True).backward(do), grad_to_none=[q, k, v],
                      flops=flops * (1 + timing.BWD_OVER_FWD), nbytes=3 * nbytes)
    del q, k, v, do
    torch.cuda.empty_cache()


def bench_long(bench: Bench, heads: Heads, T: int) -> None:
    """B = 1 forward at long T (one sequence must still fill the card)."""
    flops = timing.gdn_chunk_fwd_flops(1, T, heads.HV, heads.K, heads.V)
    nbytes = timing.gdn_chunk_fwd_bytes(1, T, heads.H, heads.HV, heads.K, heads.V, 2)
    impls = [("hybridlm", _ours)] + ([("fla", _fla_chunk(bench.fla))] if bench.fla is not None else [])
    try:
        inputs = _gdn_inputs(heads, 1, T, bench.device, requires_grad=False)
    except torch.OutOfMemoryError:
        print(f"long T={T}: inputs do not fit", flush=True)
        return
    for impl, op in impls:
        with torch.no_grad():
            bench.measure("fwd B=1", impl, heads, 1, T, lambda op=op: op(*inputs), flops=flops, nbytes=nbytes)
        torch.cuda.empty_cache()
    del inputs
    torch.cuda.empty_cache()


def _decode_calls(impl: str, fla, q, k, v, g, beta, states, settled: bool = False):
    """One zero-argument call per state buffer, each a full decode step of one layer. ``settled``:
    our step's ``state_settled`` promise, which holds in a graph that visits each buffer once (graph
    replays are stream-ordered), as a static decode step makes it for its layers."""
    from hybridlm.ops import gated_delta_rule_step
    from hybridlm.ops.triton.decode import fused_recurrent_gated_delta_rule_step

    if impl == "hybridlm":
        return [lambda s=s: fused_recurrent_gated_delta_rule_step(q, k, v, g, beta, s, use_qk_l2norm=True,
                                                                  inplace=True, state_settled=settled)
                for s in states]
    if impl == "fla":
        q1, k1, v1, g1, b1 = q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None]
        return [lambda s=s: fla.fused_recurrent_gated_delta_rule(
            q1, k1, v1, g=g1, beta=b1, initial_state=s, output_final_state=True,
            use_qk_l2norm_in_kernel=True) for s in states]
    return [lambda s=s: gated_delta_rule_step(q, k, v, g, beta, s, use_qk_l2norm=True, inplace=True,
                                              backend="reference") for s in states]


def bench_decode(bench: Bench, heads: Heads, B: int) -> None:
    """Per-layer decode step over distinct state buffers whose total exceeds 4 x L2, as the layers of
    a model do (one hot buffer would time the cache, not memory)."""
    torch.manual_seed(B)
    q = torch.randn(B, heads.H, heads.K, device=bench.device, dtype=torch.bfloat16)
    k = torch.randn_like(q)
    v = torch.randn(B, heads.HV, heads.V, device=bench.device, dtype=torch.bfloat16)
    g = torch.nn.functional.logsigmoid(torch.randn(B, heads.HV, device=bench.device) + 3.0)
    beta = torch.rand(B, heads.HV, device=bench.device)
    states = timing.distinct_states(B, heads.HV, heads.K, heads.V, bench.device)
    nbytes = timing.decode_state_bytes(B, heads.HV, heads.K, heads.V)
    impls = ["hybridlm"] + (["fla"] if bench.fla is not None else []) + (["reference"] if B in (1, 32) else [])
    for impl in impls:
        calls = _decode_calls(impl, bench.fla, q, k, v, g, beta, states)
        bench.measure("decode eager", impl, heads, B, 1, timing.round_robin(calls), nbytes=nbytes, tokens=B)
        if impl != "reference":
            calls = _decode_calls(impl, bench.fla, q, k, v, g, beta, states, settled=True)
            bench.measure("decode graphed", impl, heads, B, 1, None, graphed_calls=calls, nbytes=nbytes, tokens=B)
    del states
    torch.cuda.empty_cache()


def _import_fla(skip: bool):
    if skip:
        return None
    try:
        import fla  # noqa: F401
        import fla.ops.gated_delta_rule as fla_ops
    except ImportError:
        return None
    return fla_ops


def run_checks(device, fla_ops) -> tuple[list[dict], bool]:
    """Print the correctness table; the flag is False when any of our paths computes a wrong number."""
    rows = check.check_all(device, torch.bfloat16, small=False, fla_ops=fla_ops)
    print(report.format_checks(rows), flush=True)
    return rows, not any(r["ok"] is False and r["note"] != "peer" for r in rows)


SECTIONS = ("decode", "chunk", "long")


def _sections(text: str) -> set[str]:
    chosen = {x.strip() for x in text.split(",") if x.strip()}
    if not chosen or not chosen <= set(SECTIONS):
        raise ValueError(f"--sections: expected a comma-separated subset of {', '.join(SECTIONS)}, got {text!r}")
    return chosen


def run(args) -> int:
    sections = _sections(args.sections)  # a bad list fails before any GPU work
    if not torch.cuda.is_available():
        raise ValueError("bench kernels needs a CUDA device (the Triton kernels are timed natively)")
    device = torch.device("cuda")
    plan = QUICK if args.quick else FULL
    fla_ops = _import_fla(args.no_peers)
    env = report.environment(fla_ops is not None)
    print(" | ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    checks, ok = run_checks(device, fla_ops)
    if not ok:
        print("correctness check failed: no timings taken", file=sys.stderr)
        _write(args, env, checks, [])
        return 1
    bench = Bench(device, timing.copy_bytes_per_s(device), fla_ops)
    env["copy GB/s"] = round(bench.copy_rate / 1e9)
    print(f"device-to-device copy: {bench.copy_rate / 1e9:,.0f} GB/s (read + write, 1 GiB)\n{timing.FLOP_CONVENTION}")
    print(report.HEADER, flush=True)
    # cheapest first, so a run cut short by --max-minutes still has every section it reached; the
    # B = 1 long-T rows come right after their B x T = 64k, T = 2k comparison row (the small-batch target)
    chunk = [(f"chunk {h.name} T={T}", lambda h=h, T=T: bench_chunk(bench, h, T, with_reference=T == plan.seq_lens[0]))
             for h in plan.heads for T in plan.seq_lens]
    jobs = [(f"decode B={B}", lambda B=B: bench_decode(bench, QWEN3_NEXT, B))
            for B in plan.decode_batches if "decode" in sections]
    # the long rows' comparison (B x T = 64k, T = 2k) is the first chunk row
    jobs += chunk[:1] if sections & {"chunk", "long"} else []
    jobs += [(f"fwd B=1 T={T}", lambda T=T: bench_long(bench, QWEN3_NEXT, T))
             for T in plan.long_seq_lens if "long" in sections]
    jobs += chunk[1:] if "chunk" in sections else []
    start = time.perf_counter()
    for name, job in jobs:
        elapsed = time.perf_counter() - start
        if elapsed > 60 * args.max_minutes:
            print(f"skipped {name}: past --max-minutes {args.max_minutes} ({elapsed:.0f} s)", flush=True)
            env.setdefault("skipped", []).append(name)
            continue
        job()
        print(f"  [{name}: done at {time.perf_counter() - start:.0f} s]", flush=True)
    print("\n" + report.format_table(bench.rows))
    print(report.format_targets(bench.rows))
    _write(args, env, checks, bench.rows)
    return 0


def _write(args, env, checks, rows) -> None:
    payload = {"environment": env, "convention": timing.FLOP_CONVENTION, "checks": checks, "rows": rows}
    markdown = report.markdown_section(env, checks, rows)
    targets = [Path(args.json)] if args.json else []
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        targets.append(Path(args.out) / "kernels.json")
        (Path(args.out) / "kernels.md").write_text(markdown)
    for path in targets:
        path.write_text(json.dumps(payload, indent=1))
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + markdown)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/kernels.py", description=__doc__.splitlines()[0])
    add_kernel_arguments(parser)
    with contextlib.suppress(BrokenPipeError):
        return run(parser.parse_args(argv))
    return 1
