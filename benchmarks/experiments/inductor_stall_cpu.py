"""Does the compiled static step stall in inductor with the residual add + norm as its custom op? (CPU)

Sixth 12-03 session (RESULTS.md): with ``RMSNorm.add`` as the two-output custom op
``hybridlm::add_rms_norm_rows`` under torch.compile, the 48-layer batch-1 step spent minutes in
nested ``torch/_inductor/ir.py`` ``__str__`` calls on the H200 (torch 2.11), and a model-free chain of
such ops did not stall (``inductor_multi_output_chain.py``). The fix left the add and norm to inductor
under compile, which breaks the chain of PDL kernels twice a layer (seventh session: the uncompiled
graph step, which keeps the kernel, was the faster one at batch 1).

This runs the real model's step on the CPU under Triton's interpreter with every decode kernel routed
as on CUDA (their custom ops in the traced graph), the tiny Qwen3-Next preset at ``--layers`` depths in
float32, once with ``RMSNorm.add`` as the custom op and once as inductor's add + norm, and prints the
time of each first (compiling) call. A stall past ``--seconds`` dumps the Python stack and exits.
``--device cuda`` runs the same on the GPU in bf16 (the kernels route there by themselves; no
interpreter), to tell torch 2.11's inductor from the CUDA path.

Since the 12-04 session it registers our custom ops as inductor fallbacks first, as
``StaticDecoder(compile=True)`` does (``--no-fallbacks``: leave them to inductor's implicit fallback,
whose eager log string was the stall on torch 2.11), and prints how far the compiled step's logits
are from the eager step's.

Seventh 12-03 session, CPU, torch 2.13: no stall. First calls 8.2 / 16.5 / 19.5 / 24.4 s at 4 / 8 / 12 /
16 layers with the custom op, 20.6 / 17.2 / 25.3 / 24.4 s with inductor's add + norm.

    TRITON_INTERPRET=1 python benchmarks/experiments/inductor_stall_cpu.py [--layers 4,8,16]
    python benchmarks/experiments/inductor_stall_cpu.py --device cuda --layers 12,24,48
"""

from __future__ import annotations

import argparse
import copy
import faulthandler
import os
import sys
import time

import torch

if "cuda" not in sys.argv and os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("run with TRITON_INTERPRET=1 (or --device cuda): the decode kernels run on the CPU only under "
             "Triton's interpreter")

from hybridlm.config import HybridConfig  # noqa: E402
from hybridlm.generation import prefill  # noqa: E402
from hybridlm.layers import attention, conv, norms, packing  # noqa: E402
from hybridlm.model import HybridLM  # noqa: E402
from hybridlm.ops import _checks, register_inductor_fallbacks  # noqa: E402
from hybridlm.ops.triton import norm as triton_norm  # noqa: E402


def route_kernels(custom_add_norm: bool, cpu: bool) -> None:
    """On the CPU route every inference kernel as on CUDA (the interpreter runs them); either way make
    ``RMSNorm.add`` the custom op under compile when ``custom_add_norm``."""
    def add(self, x, y):
        if torch.compiler.is_compiling() and not custom_add_norm:
            s = x + y
            return s, self(s)
        return triton_norm.add_rms_norm_rows(x, y, self.weight, self.eps, self.zero_centered)

    norms.RMSNorm.add = add
    if not cpu:
        return

    def inference_kernel(name, x, *others, traced=False):
        if torch.compiler.is_compiling() and not traced:
            return None
        return _checks.load_kernel(name, "triton", x)

    for module in (_checks, conv, attention, norms):
        module.inference_kernel = inference_kernel
    packing._gemv_for = lambda x, w: (_checks.load_kernel("decode_linear", "triton", x)
                                      if x.dim() >= 1 and x[..., 0].numel() == 1 else None)
    norms._pdl = lambda x: True


def first_call_seconds(layers: int, device: str) -> tuple[float, float]:
    """Seconds of the compiled step's first call, and its logits' largest distance from the eager step's."""
    torch.manual_seed(0)
    model = HybridLM(HybridConfig.preset("tiny-qwen3-next", num_layers=layers)).to(device)
    if device != "cpu":
        model = model.to(torch.bfloat16)
    model = model.eval().pack_for_inference()
    cache = model.new_cache(1, 16)
    ids = torch.randint(0, model.config.vocab_size, (1, 5), device=device)
    with torch.no_grad():
        prefill(model, ids, None, cache)
        eager_cache = copy.deepcopy(cache)
        torch.compiler.reset()
        step = torch.compile(model.decode_static, fullgraph=True, dynamic=False)
        slot = torch.tensor([cache.seq_len], device=device)
        t0 = time.perf_counter()
        got = step(ids[:, :1], cache, slot)
        if device != "cpu":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        want = model.decode_static(ids[:, :1], eager_cache, slot.clone())
        return seconds, float((got.float() - want.float()).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default="4,8,16")
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--no-fallbacks", action="store_true",
                    help="leave our custom ops to inductor's implicit fallback (register_inductor_fallbacks not called)")
    args = ap.parse_args()
    faulthandler.dump_traceback_later(args.seconds, exit=True)
    if not args.no_fallbacks:
        print("registered as inductor fallbacks:", ", ".join(register_inductor_fallbacks()), flush=True)
    for custom in (False, True):
        route_kernels(custom, args.device == "cpu")
        for layers in (int(n) for n in args.layers.split(",")):
            label = "custom op" if custom else "inductor's"
            seconds, diff = first_call_seconds(layers, args.device)
            print(f"add + norm {label:10s} {layers:3d} layers: first call {seconds:7.1f} s, "
                  f"max |compiled - eager| logits {diff:.2e}", flush=True)


if __name__ == "__main__":
    main()
