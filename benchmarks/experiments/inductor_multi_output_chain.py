"""Does inductor stall on a chain of two-output custom ops whose outputs meet again at the next one?

Sixth 12-03 session (RESULTS.md): with the residual add + norm as a two-output custom op, the compiled
48-layer batch-1 step spent minutes in nested ``torch/_inductor/ir.py`` ``__str__`` calls on the H200
(torch 2.11), GPU idle. This is that graph's shape without the model: per layer an add + norm op
(two outputs), an opaque "mixer" op on the normed row, a second add + norm, a second opaque op. It
compiles ``--layers`` of them and prints the compile time; a stall past ``--seconds`` prints Python's
traceback (faulthandler) and exits. On the CPU with torch 2.13, 16 layers compiled in 0.5-3.4 s.

    python benchmarks/experiments/inductor_multi_output_chain.py [--device cuda] [--layers 4,8,12,16]
"""

from __future__ import annotations

import argparse
import faulthandler
import time

import torch


@torch.library.custom_op("hybridlm_repro::add_norm", mutates_args=())
def add_norm(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = x + y
    return s, s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6)


@add_norm.register_fake
def _(x, y):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("hybridlm_repro::mixer", mutates_args=())
def mixer(h: torch.Tensor) -> torch.Tensor:
    return h * 2


@mixer.register_fake
def _(h):
    return torch.empty_like(h)


def chain(layers: int):
    def f(x):
        y, h = None, x
        for _ in range(layers):
            if y is not None:
                x, h = add_norm(x, y)
            x, h = add_norm(x, mixer(h))
            y = mixer(h)
        return add_norm(x, y)[1]
    return f


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", default="4,8,12,16")
    ap.add_argument("--seconds", type=float, default=120)
    args = ap.parse_args()
    faulthandler.dump_traceback_later(args.seconds, exit=True)
    for layers in (int(v) for v in args.layers.split(",")):
        torch.compiler.reset()
        t = time.perf_counter()
        torch.compile(chain(layers), fullgraph=True)(torch.randn(1, 64, device=args.device))
        print(f"{layers} layers: compiled in {time.perf_counter() - t:.1f} s", flush=True)


if __name__ == "__main__":
    main()
