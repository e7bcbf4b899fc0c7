"""Invariants of the linear-attention family, on random shapes (hypothesis)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ops_testing import assert_close, delta_inputs

from hybridlm.ops import (
    gated_delta_rule_chunked,
    gated_delta_rule_naive,
    gated_delta_rule_step,
    linear_attention_chunked,
    linear_attention_naive,
)

F64 = torch.float64
FEW = settings(max_examples=12, deadline=None, derandomize=True)


@FEW
@given(T=st.integers(1, 130), log2_chunk=st.integers(0, 6), seed=st.integers(0, 2**16), grouped=st.booleans())
def test_gated_delta_chunked_equals_recurrent_for_any_chunk(T, log2_chunk, seed, grouped):
    q, k, v, g, beta, s0 = delta_inputs(B=1, T=T, HV=4 if grouped else 2, seed=seed)
    o_ref, s_ref = gated_delta_rule_naive(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    o, s = gated_delta_rule_chunked(q, k, v, g, beta, initial_state=s0, output_final_state=True,
                                    chunk_size=2**log2_chunk)
    assert_close(o, o_ref, F64, "o")
    assert_close(s, s_ref, F64, "final state")


@FEW
@given(T=st.integers(1, 130), log2_chunk=st.integers(0, 6), seed=st.integers(0, 2**16),
       feature_map=st.sampled_from(["identity", "elu", "relu"]))
def test_linear_attention_chunked_equals_recurrent_for_any_chunk(T, log2_chunk, seed, feature_map):
    q, k, v, g, _, s0 = delta_inputs(B=1, T=T, HV=2, seed=seed)
    o_ref, s_ref = linear_attention_naive(q, k, v, g, feature_map=feature_map, initial_state=s0,
                                          output_final_state=True)
    o, s = linear_attention_chunked(q, k, v, g, feature_map=feature_map, initial_state=s0, output_final_state=True,
                                    chunk_size=2**log2_chunk)
    assert_close(o, o_ref, F64, "o")
    assert_close(s, s_ref, F64, "final state")


@FEW
@given(seed=st.integers(0, 2**16), big_v=st.booleans())
def test_delta_rule_state_grows_at_most_by_the_written_value(seed, big_v):
    """With unit keys, beta in [0, 1] and g <= 0, exp(g)(I - beta k k^T) has spectral norm <= 1, so
    ||S_t||_F <= ||S_{t-1}||_F + beta_t ||v_t||: the state stays bounded whatever T is."""
    q, k, v, g, beta, s0 = delta_inputs(B=1, T=40, HV=2, seed=seed, unit_keys=False)
    v = v * (100.0 if big_v else 1.0)
    state = s0
    for t in range(40):
        _, new = gated_delta_rule_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state, use_qk_l2norm=True)
        bound = state.norm(dim=(-2, -1)) + beta[:, t] * v[:, t].norm(dim=-1)
        assert (new.norm(dim=(-2, -1)) <= bound * (1 + 1e-12)).all()
        state = new


def test_state_size_does_not_grow_with_tokens():
    sizes = set()
    for T in (16, 1024):
        q, k, v, g, beta, _ = delta_inputs(B=1, T=T, HV=2, dtype=torch.float32, with_state=False)
        _, s = gated_delta_rule_chunked(q, k, v, g, beta, output_final_state=True)
        _, z = linear_attention_chunked(q, k, v, g, output_final_state=True, normalize=True)
        sizes.add((s.numel() * s.element_size(), z.numel() * z.element_size()))
    assert sizes == {(2 * 8 * 12 * 4, 2 * 8 * 13 * 4)}
