"""Inputs and comparisons shared by the ops tests (legend: B batch, T tokens, H q/k heads, HV value heads)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.nn.functional as F

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMS error of a against b (b the reference)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def python_with_env(code: str, name: str, value: str | None) -> subprocess.CompletedProcess:
    """Run ``python -c code`` in a fresh interpreter with environment variable ``name`` set to ``value``
    (removed when None): switches read once at import are tested this way."""
    env = {k: v for k, v in os.environ.items() if k != name}
    if value is not None:
        env[name] = value
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def assert_close(a, b, dtype=torch.float64, what="output"):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err = rel_err(a, b)
    assert err <= TOL.get(dtype, 1e-2), f"{what}: relative error {err:.3g} > {TOL.get(dtype, 1e-2):.0e}"


def delta_inputs(B=2, T=65, H=2, HV=2, K=8, V=12, dtype=torch.float64, seed=0, with_state=True, n_states=None,
                 unit_keys=True):
    """q, k [B, T, H, K]; v [B, T, HV, V]; g, beta [B, T, HV]; state [n_states or B, HV, K, V] (or None).

    Keys are unit vectors unless asked otherwise: the delta rule is only contractive (and float32
    comparisons meaningful) for ||k|| <= 1, which is how every model feeds it.
    """
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = rand(B, T, H, K), rand(B, T, H, K), rand(B, T, HV, V)
    if unit_keys:
        k = F.normalize(k, dim=-1)
    g = -torch.rand(B, T, HV, generator=gen, dtype=torch.float64) * 0.5
    beta = torch.rand(B, T, HV, generator=gen, dtype=torch.float64)
    state = rand(n_states or B, HV, K, V) if with_state else None
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), cast(g), cast(beta), None if state is None else state.to(
        torch.float64 if dtype == torch.float64 else torch.float32)


def run_steps(step, per_token, state, *shared):
    """Feed a sequence to a decode ``step`` one token at a time.

    per_token: [B, T, ...] tensors sliced at each t; shared: arguments passed whole every step
    (after the per-token ones, before the state). Returns (o [B, T, ...], final state).
    """
    outs = []
    for t in range(per_token[0].shape[1]):
        o_t, state = step(*(x[:, t] for x in per_token), *shared, state)
        outs.append(o_t)
    return torch.stack(outs, 1), state
