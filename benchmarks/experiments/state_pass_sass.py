"""Compile the forward state pass for sm_90 without a GPU and count what its machine code does:
registers, shared memory, tensor-core products (HGMMA), asynchronous copies (LDGSTS: loads the
compiler's pipelining staged) and plain global loads (LDG: loads a program waits on).

Triton's code generation differs between versions, so use the device's (3.6), installed beside the
CPU build (the wheel is ~180 MB; nothing else changes):

    python -m pip download --no-deps triton==3.6.0 -d /tmp/tw
    python -m pip install --no-deps --target /tmp/t36 /tmp/tw/triton-3.6.0-*.whl
    PYTHONPATH=/tmp/t36 python benchmarks/experiments/state_pass_sass.py [--out DIR]

Pointer arguments are declared 16-byte aligned, as the launcher specialises them on the GPU; so
specialised, the registers and shared memory match what the H200 reported for the same kernels
(145 / 146 / 138 / 139 / 167 registers, 164-165 KB, fourth 2026-12-02 session).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess

import torch
import triton
from triton.backends.compiler import GPUTarget

from hybridlm.ops.triton import chunk_fwd as CF

PATTERNS = dict(HGMMA="HGMMA", LDGSTS="LDGSTS", LDG=r"LDG\.", LDGDEPBAR="LDGDEPBAR", BAR=r" BAR\.", LDS=r" LDS")


def compile_state_pass(norm: bool, out_dir: str | None = None) -> dict:
    k = CF.chunk_fwd_kernel
    sig = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", vec_ptr="*fp32", t_ptr="*bf16", m_ptr="*bf16",
               h0_ptr="constexpr", o_ptr="*bf16", ht_ptr="*fp32", h_ptr="constexpr", cu="*i32",
               chunk_offsets="*i32", scale="fp32")
    const = dict(H=16, HV=32, K=128, V=128, BK=128, BV=32, HAS_H0=False, STORE_H=False, PREC="tf32", NORM=norm,
                 h0_ptr=None, h_ptr=None)
    for name in const:
        sig[name] = "constexpr"
    attrs = {(k.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items() if t.startswith("*")}
    src = triton.compiler.ASTSource(fn=k, signature=sig, attrs=attrs,
                                    constexprs={(k.arg_names.index(n),): v for n, v in const.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=4, num_stages=CF.state_pass_stages(torch.bfloat16)))
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    out_dir = out_dir or "/tmp"
    cubin = os.path.join(out_dir, f"state_pass_norm{int(norm)}.cubin")
    with open(cubin, "wb") as f:
        f.write(compiled.asm["cubin"])
    usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", cubin], capture_output=True, text=True).stdout
    sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
    with open(cubin.replace(".cubin", ".sass"), "w") as f:
        f.write(sass)
    row = dict(norm=norm, registers=int(re.search(r"REG:(\d+)", usage).group(1)), shared=compiled.metadata.shared,
               instructions=len(re.findall(r"/\*[0-9a-f]{4}\*/", sass)))
    row.update({name: len(re.findall(p, sass)) for name, p in PATTERNS.items()})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="folder for the cubin and SASS files (default /tmp)")
    args = ap.parse_args()
    print(f"Triton {triton.__version__}, sm_90, Qwen3-Next heads, BV 32, 4 warps")
    for norm in (False, True):
        print(compile_state_pass(norm, out_dir=args.out))


if __name__ == "__main__":
    main()
