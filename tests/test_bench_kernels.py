"""The kernel benchmark's correctness gate and its report arithmetic, at tiny shapes.

The timings themselves need a GPU (``hybridlm bench kernels`` on the device); what runs here is the
part that decides whether timings may be taken, and the numbers the tables print.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first imported

from hybridlm.bench import check, report, timing  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_gate_passes_every_triton_path_at_tiny_shapes():
    rows = check.check_all(DEVICE, torch.float32, small=True)
    paths = " ".join(r["path"] for r in rows)
    for part in ("fwd o", "final state", "dq", "dk", "dv", "dg", "dbeta", "dh0", "decode"):
        assert part in paths
    assert all(r["ok"] is True for r in rows), report.format_checks(rows)


def test_gate_rejects_nan_and_large_errors_and_reports_raises():
    ref = torch.ones(4)
    assert check._row("x", check.rel_err(ref * 1.5, ref), 1e-2)["ok"] is False
    assert check._row("x", check.rel_err(torch.full((4,), float("nan")), ref), 1e-2)["ok"] is False
    assert check._row("x", check.rel_err(ref + 1e-4, ref), 1e-2)["ok"] is True
    raised = check._raised("path", RuntimeError("Triton < 3.7.1 on Hopper\nmore"))
    assert raised["ok"] is None and "RuntimeError: Triton < 3.7.1 on Hopper" in raised["note"]


def _row(section, impl, ms, B=1, T=1024, nbytes=None, flops=None, tokens=None):
    return report.make_row(section, impl, "qwen3-next Hqk16 Hv32 d128", B, T, ms, flops=flops,
                           nbytes=nbytes, tokens=tokens, copy_rate=3e12, note="")


def test_row_arithmetic():
    r = _row("fwd", "hybridlm", 2.0, B=32, T=2048, nbytes=3e9, flops=4e12)
    assert r["tokens_per_s"] == pytest.approx(32 * 2048 / 2e-3)
    assert r["tflops"] == pytest.approx(2000.0)
    assert r["gbps"] == pytest.approx(1500.0)
    assert r["bw_share"] == pytest.approx(0.5)
    d = _row("decode graphed", "hybridlm", 0.004, B=1, T=1, tokens=1,
             nbytes=timing.decode_state_bytes(1, 32, 128, 128))
    assert d["tokens_per_s"] == pytest.approx(250_000)
    assert d["bw_share"] == pytest.approx(2 * 32 * 128 * 128 * 4 / 4e-6 / 3e12)
    assert _row("fwd", "fla", None)["tokens_per_s"] is None


def test_flop_conventions():
    # 6TKV + 3TCK + TC^2 per value head, C = 64
    assert timing.gdn_chunk_fwd_flops(1, 64, 1, 2, 3) == 6 * 64 * 6 + 3 * 64 * 64 * 2 + 64 * 64 * 64
    assert timing.sdpa_causal_fwd_flops(2, 8, 3, 4) == 2 * 3 * 2 * 8 * 8 * 4


def test_speedups_and_targets():
    rows = [
        _row("fwd B=1", "hybridlm", 1.0, T=32768), _row("fwd B=1", "fla", 2.5, T=32768),
        _row("fwd", "hybridlm", 1.0, B=32, T=2048), _row("fwd", "fla", 0.8, B=32, T=2048),
        _row("fwd B=1", "hybridlm", 20.0, T=1048576),
        _row("decode graphed", "hybridlm", 0.004, B=1, T=1, tokens=1, nbytes=1e6),
        _row("decode graphed", "hybridlm", 0.05, B=32, T=1, tokens=32, nbytes=0.95 * 3e12 * 0.05e-3),
    ]
    ups = report.speedups(rows)
    assert ups == {1: pytest.approx(2.5), 3: pytest.approx(0.8)}
    text = "\n".join(report.targets(rows))
    assert "reached: fwd >= 2x fla at Qwen3-Next B=1 T=32k: 2.50x" in text
    assert "missed: fwd never slower than fla: worst 0.80x" in text
    assert "missed: B=1 T=1M within 10% of B=32 T=2k tokens/s: 80%" in text
    assert "reached: decode graphed >= 90% of copy bandwidth at batch >= 32: worst 95.0%" in text
    assert "reached: decode graphed < 10 us per layer at batch 1: 4.0 us" in text
    md = report.markdown_section({"date": "2026-01-01 00:00 UTC", "card": "card", "torch": "x"},
                                 [], rows)
    assert md.startswith("## GPU kernels, 2026-01-01 00:00 UTC: card")
    assert md.count("| fwd B=1 |") == 3 and "| 2.50 |" in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the suite would run in full")
def test_bench_kernels_refuses_without_cuda():
    from hybridlm.cli import main

    assert main(["bench", "kernels", "--quick"]) == 2


def test_bench_kernels_rejects_unknown_sections_before_any_gpu_work():
    from hybridlm.bench.kernels import main

    with pytest.raises(ValueError, match="--sections: expected a comma-separated subset of decode, chunk, long"):
        main(["--sections", "decode,prefill"])
