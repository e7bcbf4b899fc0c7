"""Compile the forward state pass, the prep and the backward's chunk-local kernel for sm_90 without
a GPU and count what their machine code does: registers, spill stack, shared memory, tensor-core
products (HGMMA), asynchronous copies (LDGSTS: loads the compiler's pipelining staged) and plain
global loads (LDG: loads a program waits on).

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

from hybridlm.ops._checks import L2NORM_EPS
from hybridlm.ops.triton import chunk_fwd as CF
from hybridlm.ops.triton import chunk_prep as CP

PATTERNS = dict(HGMMA="HGMMA", LDGSTS="LDGSTS", LDG=r"LDG\.", LDGDEPBAR="LDGDEPBAR", BAR=r" BAR\.", LDS=r" LDS")


def compile_sm90(kernel, sig: dict, const: dict, num_warps: int, num_stages: int, name: str,
                 out_dir: str | None = None, divisible: tuple = (), maxnreg: int | None = None) -> dict:
    """Compile a Triton kernel for sm_90 (pointer arguments 16-byte aligned, as the GPU launcher
    specialises them; so are the integer arguments named in ``divisible``, as the launcher does for
    strides and sizes divisible by 16: without it a runtime row stride blocks vector loads and
    asynchronous copies); write NAME.cubin and NAME.sass to out_dir; return the counts."""
    sig = dict(sig)
    for n in const:
        sig[n] = "constexpr"
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items()
             if t.startswith("*") or n in divisible}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, attrs=attrs,
                                    constexprs={(kernel.arg_names.index(n),): v for n, v in const.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages,
                                           **({} if maxnreg is None else dict(maxnreg=maxnreg))))
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    out_dir = out_dir or "/tmp"
    cubin = os.path.join(out_dir, f"{name}.cubin")
    with open(cubin, "wb") as f:
        f.write(compiled.asm["cubin"])
    usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", cubin], capture_output=True, text=True).stdout
    sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
    with open(cubin.replace(".cubin", ".sass"), "w") as f:
        f.write(sass)
    row = dict(name=name, registers=int(re.search(r"REG:(\d+)", usage).group(1)), shared=compiled.metadata.shared,
               instructions=len(re.findall(r"/\*[0-9a-f]{4,}\*/", sass)),  # addresses past 0xfff0 have 5 digits
               stack=int(m.group(1)) if (m := re.search(r"STACK:(\d+)", usage)) else None)
    row.update({n: len(re.findall(p, sass)) for n, p in PATTERNS.items()})
    return row


def compile_state_pass(norm: bool, out_dir: str | None = None) -> dict:
    sig = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", vec_ptr="*fp32", t_ptr="*bf16", m_ptr="*bf16",
               h0_ptr="constexpr", o_ptr="*bf16", ht_ptr="*fp32", h_ptr="constexpr", cu="*i32",
               chunk_offsets="*i32", scale="fp32")
    const = dict(H=16, HV=32, K=128, V=128, BK=128, BV=32, HAS_H0=False, STORE_H=False, PREC="tf32", NORM=norm,
                 h0_ptr=None, h_ptr=None)
    return compile_sm90(CF.chunk_fwd_kernel, sig, const, 4, CF.state_pass_stages(torch.bfloat16),
                        f"state_pass_norm{int(norm)}", out_dir)


def compile_prep(norm: bool, num_warps: int = 4, out_dir: str | None = None, half_inverse: bool = True,
                 maxnreg: int | None = 168) -> dict:
    """The prep as bf16 inputs launch it on Hopper: float16 inverse, capped at 168 registers (4 warps)."""
    sig = dict(q_ptr="*bf16", k_ptr="*bf16", g_ptr="*fp32", beta_ptr="*fp32", gc_ptr="*fp32", t_ptr="*bf16",
               m_ptr="*bf16", vec_ptr="*fp32", chunk_bounds="*i32", redo_count="*i32", redo_list="*i32")
    const = dict(H=16, HV=32, K=128, BK=128, PREC="tf32", NORM=norm, EPS=L2NORM_EPS, HALF_INV=half_inverse)
    name = f"prep_norm{int(norm)}_w{num_warps}_half{int(half_inverse)}_r{maxnreg}"
    return compile_sm90(CP.chunk_prep_kernel, sig, const, num_warps, 3, name, out_dir, maxnreg=maxnreg)


def compile_local(block_v: int = 16, num_warps: int = 4, num_stages: int = 3,
                  out_dir: str | None = None) -> list[dict]:
    """The backward's two chunk-local gradient kernels (the [C, C] part, then dq/dk) at one launch
    configuration."""
    from hybridlm.ops.triton import chunk_bwd_local as L

    sig = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", gc_ptr="*fp32", beta_ptr="*fp32", t_ptr="*bf16",
               m_ptr="*bf16", do_ptr="*bf16", h_ptr="*fp32", dh_ptr="*fp32", dvn_ptr="*fp32", chunk_bounds="*i32",
               dq_ptr="*fp32", dk_ptr="*fp32", dv_ptr="*bf16", dg_ptr="*fp32", dbeta_ptr="*fp32",
               dkk_ptr="*bf16", dqk_ptr="*bf16", scale="fp32")
    const = dict(H=16, HV=32, K=128, V=128, BK=128, BV=block_v, PREC="tf32")
    tag = f"bv{block_v}_w{num_warps}_s{num_stages}"
    return [compile_sm90(kernel, {n: sig[n] for n in kernel.arg_names if n in sig}, const, num_warps, num_stages,
                         f"local_{part}_{tag}", out_dir)
            for part, kernel in (("cc", L.chunk_bwd_local_cc_kernel), ("kq", L.chunk_bwd_local_kq_kernel))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="folder for the cubin and SASS files (default /tmp)")
    args = ap.parse_args()
    print(f"Triton {triton.__version__}, sm_90, Qwen3-Next heads; state pass BV 32, 4 warps")
    for norm in (False, True):
        print(compile_state_pass(norm, out_dir=args.out))
    for half in (False, True):
        for cap in (None, 168):
            print(compile_prep(True, 4, out_dir=args.out, half_inverse=half, maxnreg=cap))
    for row in compile_local(out_dir=args.out):
        print(row)


if __name__ == "__main__":
    main()
