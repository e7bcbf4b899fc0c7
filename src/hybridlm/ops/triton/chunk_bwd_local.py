"""Chunk-local gradients of the chunked gated delta rule, batched over all chunks in PyTorch.

Legend: NC chunks, C = 64, HV value heads, K key size, V value size. Once the state entering each
chunk (S, from the forward pass) and the gradient of the state leaving it (dS', from
``chunk_bwd_state``) are known, every chunk's gradients are independent. Forward per chunk:

    KS = K S;  X = diag(beta) (V - diag(gamma) KS);  V_new = T X;   gamma = exp(gc)
    T = (I + A)^-1,  A = diag(beta) (K K^T * G_strict),  G_ij = exp(gc_i - gc_j)
    O  = scale [diag(gamma) Q S + (Q K^T * G_causal) V_new]
    S' = exp(gc_last) S + (diag(e) K)^T V_new,  e = exp(gc_last - gc)

and this module differentiates those lines in reverse, then turns d(gc) into dg by a reverse
cumulative sum inside each chunk (gc is the in-chunk cumulative sum of g).
"""

from __future__ import annotations

import torch

from hybridlm.ops.triton.utils import CHUNK


def _gather(x_N: torch.Tensor, idx_CL: torch.Tensor, valid_CL: torch.Tensor) -> torch.Tensor:
    """[NTOK, ...] -> [NC, C, ...] with zeros in padding rows."""
    out = x_N[idx_CL]
    return out * valid_CL.view(*valid_CL.shape, *([1] * (out.dim() - 2))).to(out.dtype)


def _heads_first(x_CLHD: torch.Tensor, HV: int) -> torch.Tensor:
    """[NC, C, H, D] -> [NC, HV, C, D] float32; q/k head h serves value heads h r .. h r + r - 1."""
    r = HV // x_CLHD.shape[2]
    return x_CLHD.float().repeat_interleave(r, dim=2).transpose(1, 2)


def _scatter(out_N: torch.Tensor, x_CL: torch.Tensor, idx_CL: torch.Tensor, valid_CL: torch.Tensor):
    out_N[idx_CL[valid_CL]] = x_CL[valid_CL].to(out_N.dtype)
    return out_N


def _rows_minus_cols(dG: torch.Tensor) -> torch.Tensor:
    """Gradient of gc from G_ij = exp(gc_i - gc_j), given dG * G: row sums minus column sums."""
    return dG.sum(-1) - dG.sum(-2)


def chunk_bwd_local(q, k, v, gc, beta, t, do, h, dh, dvn, chunk_bounds, scale: float):
    """Gradients of q, k, v, g and beta from the chunk states and the state-gradient pass.

    Args:
        q, k: [NTOK, H, K]; v, do: [NTOK, HV, V]; gc, beta: [NTOK, HV]; t: [NTOK, HV, 64] (``chunk_prep``).
        h: float32 [NC, HV, K, V] state entering each chunk; dh: float32 [NC, HV, K, V] gradient of the
        state leaving it; dvn: float32 [NTOK, HV, V] gradient of V_new (``chunk_bwd_state``).
        chunk_bounds: int32 [NC, 2].
    Returns:
        dq, dk [NTOK, H, K], dv [NTOK, HV, V] in the inputs' dtype; dg, dbeta float32 [NTOK, HV].
    """
    NTOK, H, K = q.shape
    HV = v.shape[1]
    start, end = chunk_bounds[:, 0].long(), chunk_bounds[:, 1].long()
    idx = start[:, None] + torch.arange(CHUNK, device=q.device)
    valid = idx < end[:, None]
    idx = torch.where(valid, idx, start[:, None])

    Q = _heads_first(_gather(q, idx, valid), HV)                     # [NC, HV, C, K]
    Kc = _heads_first(_gather(k, idx, valid), HV)
    Vc = _gather(v, idx, valid).float().transpose(1, 2)              # [NC, HV, C, V]
    dO = _gather(do, idx, valid).float().transpose(1, 2)
    dVn = _gather(dvn, idx, valid).transpose(1, 2)
    b = _gather(beta, idx, valid).float().transpose(1, 2)            # [NC, HV, C]
    gl = gc[end - 1][..., None]                                       # [NC, HV, 1]
    G = torch.where(valid[:, None, :], gc[idx].transpose(1, 2), gl)  # padding rows carry gc_last
    Tm = _gather(t, idx, valid).float().transpose(1, 2)              # [NC, HV, C, C]
    S, dS1 = h, dh

    gamma = G.exp()
    e = (gl - G).exp()
    i = torch.arange(CHUNK, device=q.device)
    causal = i[:, None] >= i[None, :]
    strict = i[:, None] > i[None, :]
    D = G[..., :, None] - G[..., None, :]
    Gc = torch.where(causal, torch.where(causal, D, 0.0).exp(), 0.0)
    Gs = torch.where(strict, Gc, 0.0)

    KS = Kc @ S
    X = b[..., None] * (Vc - gamma[..., None] * KS)
    Vn = Tm @ X
    QS = Q @ S
    QK = Q @ Kc.transpose(-1, -2)
    KK = Kc @ Kc.transpose(-1, -2)

    # V_new = T X, T = (I + A)^-1: dA = -T^T dT T^T on the strictly lower part
    dX = Tm.transpose(-1, -2) @ dVn
    dT = dVn @ X.transpose(-1, -2)
    dA = -(Tm.transpose(-1, -2) @ dT @ Tm.transpose(-1, -2)) * strict
    dP = b[..., None] * dA
    dKK = dP * Gs
    dbeta = (dA * KK * Gs).sum(-1) + (dX * (Vc - gamma[..., None] * KS)).sum(-1)
    dV = b[..., None] * dX
    dKS = -(b * gamma)[..., None] * dX
    dgamma = -(b * (dX * KS).sum(-1))

    dM = scale * dO @ Vn.transpose(-1, -2)
    dQK = dM * Gc
    dQ = scale * gamma[..., None] * (dO @ S.transpose(-1, -2)) + dQK @ Kc
    dgamma = dgamma + scale * (dO * QS).sum(-1)

    dKt = Vn @ dS1.transpose(-1, -2)                                  # d(diag(e) K)
    de = (dKt * Kc).sum(-1)
    dK = dKS @ S.transpose(-1, -2) + (dKK + dKK.transpose(-1, -2)) @ Kc
    dK = dK + dQK.transpose(-1, -2) @ Q + e[..., None] * dKt

    dgc = dgamma * gamma + _rows_minus_cols(dM * QK * Gc) + _rows_minus_cols(dP * KK * Gs) - de * e
    d_last = (de * e).sum(-1) + (S * dS1).sum((-1, -2)) * gl[..., 0].exp()
    dgc[..., -1] += d_last
    dg = dgc.flip(-1).cumsum(-1).flip(-1)

    r = HV // H
    NC = Q.shape[0]
    dQ = dQ.reshape(NC, H, r, CHUNK, K).sum(2).transpose(1, 2)       # [NC, C, H, K]
    dK = dK.reshape(NC, H, r, CHUNK, K).sum(2).transpose(1, 2)
    dq = _scatter(torch.empty_like(q), dQ, idx, valid)
    dk = _scatter(torch.empty_like(k), dK, idx, valid)
    dv = _scatter(torch.empty_like(v), dV.transpose(1, 2), idx, valid)
    dg_N = _scatter(torch.empty(NTOK, HV, device=q.device), dg.transpose(1, 2), idx, valid)
    dbeta_N = _scatter(torch.empty(NTOK, HV, device=q.device), dbeta.transpose(1, 2), idx, valid)
    return dq, dk, dv, dg_N, dbeta_N
