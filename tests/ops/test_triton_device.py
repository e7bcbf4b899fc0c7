"""The Triton entry points refuse CPU tensors outside Triton's interpreter with an error that names
the argument, before any launch (which would fail deep inside Triton)."""

import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first triton import of the session
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from hybridlm.ops.triton import (  # noqa: E402
    chunk_gated_delta_rule,
    fused_recurrent_gated_delta_rule_step,
    moe_experts_decode,
    split_kv_decode_attention,
)

B, T, H, HV, K, V = 1, 8, 1, 2, 16, 16
r = torch.randn
CALLS = {
    "chunk": (lambda: chunk_gated_delta_rule(r(B, T, H, K), r(B, T, H, K), r(B, T, HV, V), -torch.rand(B, T, HV),
                                             torch.rand(B, T, HV)), "q"),
    "step": (lambda: fused_recurrent_gated_delta_rule_step(r(B, H, K), r(B, H, K), r(B, HV, V), -torch.rand(B, HV),
                                                           torch.rand(B, HV), torch.zeros(B, HV, K, V)), "q"),
    "moe": (lambda: moe_experts_decode(r(2, 48), torch.tensor([[0, 2], [2, 1]]), torch.rand(2, 2),
                                       r(3, 4, 48), r(3, 4, 48), r(3, 48, 4)), "x_ND"),
    "attention": (lambda: split_kv_decode_attention(r(1, 4, 16), r(1, 10, 2, 16), r(1, 10, 2, 16),
                                                    q_pos=torch.tensor([9]), k_pos=torch.arange(10)[None]), "q"),
}


@pytest.mark.parametrize("entry", sorted(CALLS))
def test_cpu_tensors_without_the_interpreter_raise_naming_the_argument(entry, monkeypatch):
    fn, name = CALLS[entry]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=rf"^{name} must be a CUDA tensor.*TRITON_INTERPRET=1"):
        fn()


def test_an_interpreter_that_cannot_run_the_kernels_is_named_with_the_fix():
    from hybridlm.ops.triton.utils import interpreter_problem

    msg = interpreter_problem("3.6.0", "2.4.6")
    assert msg is not None and "3.6.0" in msg and "2.4.6" in msg and "triton>=3.7" in msg and "numpy<2.4" in msg
    assert interpreter_problem("3.5.1", "2.5.0rc1") is not None
    assert interpreter_problem("3.6.0", "2.3.5") is None
    assert interpreter_problem("3.7.0", "2.4.6") is None
    assert interpreter_problem("3.9.0", "2.4.6") is None
    assert interpreter_problem("4.0.0", "3.0.0") is None


def test_host_launch_arithmetic_equals_tritons():
    import triton

    from hybridlm.ops.triton.utils import cdiv, next_power_of_2

    assert [next_power_of_2(n) for n in range(0, 5000)] == [triton.next_power_of_2(n) for n in range(0, 5000)]
    assert next_power_of_2(2**40 + 1) == triton.next_power_of_2(2**40 + 1) == 2**41
    pairs = [(a, b) for a in range(0, 300) for b in (1, 2, 3, 16, 64, 127)]
    assert [cdiv(a, b) for a, b in pairs] == [triton.cdiv(a, b) for a, b in pairs]
