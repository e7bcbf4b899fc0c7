"""Which part of the PDL decode path disagrees with the plain one? (GPU, compute capability >= 9)

The sixth 12-03 session's GPU test ``test_batch1_bf16_step_with_and_without_pdl_on_cuda`` failed with
PDL on, eager and compiled, while every kernel's own test passed with HYBRIDLM_PDL=1. This runs the
tiny Qwen3-Next preset in bf16 with the plain path (PDL off) as the reference, then with PDL switched
on piece by piece: the one-row matrix-vector kernel alone, the add + norm kernel alone, the PDL launch
attribute in one kernel module at a time, and everything. Each variant prints the relative error of
its logits over four decode steps (eager ``decode_one_token`` and ``decode_static``) or the exception.

    python benchmarks/experiments/pdl_bisect.py [--json out.json]
"""
import argparse
import contextlib
import importlib
import json
import traceback

import torch

from hybridlm.config import HybridConfig
from hybridlm.generation import decode_one_token, prefill
from hybridlm.layers import norms
from hybridlm.model import HybridLM
KERNEL_MODULES = {name: importlib.import_module(f"hybridlm.ops.triton.{name}") for name in (
    "conv", "decode", "decode_attention", "gemv", "moe_decode", "moe_route", "norm", "qk_rope")}
gemv = KERNEL_MODULES["gemv"]
_ON = dict(USE_PDL=True, launch_pdl=True)
_OFF = dict(USE_PDL=False)


@contextlib.contextmanager
def variant(launch=(), row=False, add_norm=False):
    """PDL launches only in the modules ``launch``; the one-row kernel when ``row``; the add + norm
    kernel when ``add_norm``."""
    saved = [(m, m.pdl_launch) for m in KERNEL_MODULES.values()]
    saved_pdl, saved_norm = gemv.pdl, norms._pdl
    try:
        for name, m in KERNEL_MODULES.items():
            on = name in launch
            m.pdl_launch = (lambda device, kernel=None, on=on: dict(_ON) if on and device.type == "cuda" else dict(_OFF))
        gemv.pdl = lambda device: row and device.type == "cuda"
        norms._pdl = lambda x: add_norm and x.is_cuda
        yield
    finally:
        for m, f in saved:
            m.pdl_launch = f
        gemv.pdl, norms._pdl = saved_pdl, saved_norm


def run(model, steps, prompt, static: bool):
    cache = model.new_cache(1, 32)
    out = []
    with torch.no_grad():
        prefill(model, prompt, None, cache)
        slot = torch.zeros(1, dtype=torch.long, device="cuda")
        for t in range(steps.shape[1]):
            if static:
                slot.fill_(cache.seq_len)
                out.append(model.decode_static(steps[:, t:t + 1], cache, slot).float())
                cache.seq_len += 1
            else:
                out.append(decode_one_token(model, steps[:, t], cache).float())
    torch.cuda.synchronize()
    return torch.stack(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny-qwen3-next")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = HybridLM(HybridConfig.preset(args.preset)).cuda().to(torch.bfloat16).eval()
    print(f"{args.preset}: layers {model.config.layer_types}, hidden {model.config.hidden_size}, "
          f"vocab {model.config.vocab_size}")
    vocab = model.config.vocab_size
    g = torch.Generator("cuda")
    prompt = torch.randint(0, vocab, (1, 9), device="cuda", generator=g.manual_seed(1))
    steps = torch.randint(0, vocab, (1, 4), device="cuda", generator=g.manual_seed(2))
    with variant():
        ref = run(model, steps, prompt, static=False)
        ref_static = run(model, steps, prompt, static=True)
    base = ((ref_static - ref).norm() / ref.norm()).item()
    print(f"plain static vs plain eager: {base:.2e}")
    variants = {"row kernel only": dict(row=True), "add + norm only": dict(add_norm=True)}
    variants.update({f"launch: {name}": dict(launch=(name,)) for name in KERNEL_MODULES})
    variants["launch: all"] = dict(launch=tuple(KERNEL_MODULES))
    variants["everything"] = dict(launch=tuple(KERNEL_MODULES), row=True, add_norm=True)
    results = {"plain static vs eager": base}
    for label, kw in variants.items():
        row = {}
        for static in (False, True):
            key = "static" if static else "eager"
            try:
                with variant(**kw):
                    got = run(model, steps, prompt, static)
                err = ((got - ref).norm() / ref.norm()).item()
                per_step = [f"{((got[i] - ref[i]).norm() / ref[i].norm()).item():.1e}" for i in range(len(got))]
                row[key] = err
                text = f"{err:.2e} (steps {' '.join(per_step)})"
            except Exception as e:  # noqa: BLE001 - a diagnostic: print it and go on
                row[key] = repr(e)
                text = "raised " + "".join(traceback.format_exception_only(e)).strip()[-600:]
                traceback.print_exc(limit=-4)
            print(f"{label:26s} {key:6s} {text}")
        results[label] = row
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
