"""memory.py against the real cache (to the byte), the published tables, brute force, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridlm import memory
from hybridlm.cli import main
from hybridlm.config import HybridConfig
from hybridlm.memory import attention_twin, cache_bytes, crossover_context, layer_cost, reduction
from hybridlm.presets import TINY_PRESETS

SHAPES = [(1, 1), (2, 63), (3, 65), (2, 1000)]  # (batch, max_len)
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _cache_configs():
    """Every tiny preset plus the variants whose bytes differ: X with its normaliser, a bf16 state,
    a window wider than some max_len, no conv."""
    configs = [(n, HybridConfig.preset(n)) for n in TINY_PRESETS]
    configs += [
        ("linear-normalize", HybridConfig(layer_pattern="XXXA", linear_normalize=True)),
        ("bf16-state", HybridConfig(layer_pattern="GGDA", state_dtype="bfloat16")),
        ("wide-window", HybridConfig(layer_pattern="GWAW", sliding_window=100)),
        ("no-conv", HybridConfig(layer_pattern="GGGA", linear_conv_kernel_dim=0)),
    ]
    return configs


@pytest.mark.parametrize("name,cfg", _cache_configs(), ids=[n for n, _ in _cache_configs()])
@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
def test_matches_cache_nbytes_and_allocation(name, cfg, kv_dtype):
    for batch, max_len in SHAPES:
        reported, allocated = memory.measure_cache_allocation(cfg, batch, max_len, "cpu", TORCH_DTYPES[kv_dtype])
        ours = cache_bytes(cfg, batch, max_len, kv_dtype=kv_dtype)
        assert ours.total_bytes == reported == allocated, (name, batch, max_len)


# Every letter the cache knows, at tiny sizes, straight through HybridCache (no model needed).
LETTER_CONFIGS = {
    "kda+mla": HybridConfig(layer_pattern="KKKM", linear_num_key_heads=4, linear_num_value_heads=4),
    "lightning": HybridConfig(layer_pattern="LLLA", linear_conv_kernel_dim=0),
    "sparse-mla": HybridConfig(layer_pattern="SGSM", sparse_base="mla", index_head_dim=8),
    "sparse-gqa": HybridConfig(layer_pattern="AAS", num_layers=3, sparse_base="gqa", index_head_dim=12),
    "everything": HybridConfig(layer_pattern="GKLDXAMSW", num_layers=9, sliding_window=5, linear_normalize=True),
}


@pytest.mark.parametrize("name", sorted(LETTER_CONFIGS))
@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
def test_matches_cache_for_every_letter(name, kv_dtype):
    from hybridlm.cache import HybridCache

    cfg = LETTER_CONFIGS[name]
    for batch, max_len in SHAPES:
        cache = HybridCache(cfg, batch, max_len, dtype=TORCH_DTYPES[kv_dtype])
        parts = cache.breakdown()
        ours = cache_bytes(cfg, batch, max_len, kv_dtype=kv_dtype)
        assert ours.total_bytes == cache.nbytes(), (name, batch, max_len)
        assert ours.kv_bytes == sum(v for k, v in parts.items() if k.endswith(" kv"))
        assert ours.state_bytes == sum(v for k, v in parts.items() if k.endswith((" state", " conv")))


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_split_matches_cache_breakdown(name):
    from hybridlm.model import HybridLM

    cfg = HybridConfig.preset(name)
    with torch.device("meta"):
        cache = HybridLM(cfg).new_cache(2, 65, device="meta", dtype=torch.float32)
    parts = cache.breakdown()
    ours = cache_bytes(cfg, 2, 65, kv_dtype="float32")
    assert ours.kv_bytes == sum(v for k, v in parts.items() if k.endswith(" kv"))
    assert ours.state_bytes == sum(v for k, v in parts.items() if k.endswith((" state", " conv")))
    assert ours.bookkeeping_bytes == sum(v for k, v in parts.items() if "position" in k)


# -------------------------------------------------------------- published oracles (published-models.md)
@pytest.mark.parametrize("preset,kv_per_token,state_fp32,conv", [
    ("qwen3-next-80b-a3b", 24_576, 75_497_472, 1_769_472),
    ("kimi-linear-48b-a3b", 8_064, 41_943_040, 20 * (2 * 32 * 128 + 32 * 128) * 3 * 2),
    ("minimax-m1", 40_960, 293_601_280, 0),
    ("minimax-m2", 253_952, 0, 0),
    ("deepseek-v3.2", 78_324, 0, 0),
    ("qwen3-32b", 262_144, 0, 0),
    ("llama-3.1-70b", 327_680, 0, 0),
])
def test_published_tables(preset, kv_per_token, state_fp32, conv):
    cfg = HybridConfig.preset(preset)
    one, two = cache_bytes(cfg, 1, 1), cache_bytes(cfg, 1, 2)
    assert two.kv_bytes - one.kv_bytes == kv_per_token
    states = sum(layer_cost(cfg, c).state for c in cfg.layer_types)
    convs = sum(layer_cost(cfg, c).conv for c in cfg.layer_types)
    assert (states, convs) == (state_fp32, conv)
    assert sum(layer_cost(cfg, c, state_dtype="bfloat16").state for c in cfg.layer_types) == state_fp32 // 2


def test_qwen3_next_reduction_is_about_three_quarters():
    cfg = HybridConfig.preset("qwen3-next-80b-a3b")
    twin = attention_twin(cfg)
    assert twin.layer_types == "A" * 48
    assert 0.74 < reduction(cfg, twin, 1, 262_144) < 0.76  # the deck's and Kimi Linear's ~75%
    assert 1024 < crossover_context(cfg, twin) < 4096  # the deck's "between 1k and 4k"


def test_twin_uses_the_models_attention_type():
    assert attention_twin(HybridConfig.preset("kimi-linear-48b-a3b")).layer_types == "M" * 27
    m3 = HybridConfig.preset("minimax-m3")
    assert attention_twin(m3).layer_types == m3.layer_types  # no linear layers: its own twin
    assert attention_twin(HybridConfig.preset("tiny-gdn")).layer_types == "AAAA"
    assert crossover_context(m3, attention_twin(m3)) is None


@settings(max_examples=40, deadline=None)
@given(pattern=st.text(alphabet="GDXAW", min_size=1, max_size=5), window=st.integers(1, 40),
       base_pattern=st.text(alphabet="GAW", min_size=1, max_size=4), heads=st.sampled_from([1, 2, 4]))
def test_crossover_equals_brute_force(pattern, window, base_pattern, heads):
    """The smallest n from which the model stays below the baseline, checked by scanning n."""
    cfg = HybridConfig(layer_pattern=pattern, num_layers=len(pattern), sliding_window=window,
                       linear_key_head_dim=4, linear_value_head_dim=4)
    base = HybridConfig(layer_pattern=base_pattern, num_layers=4, sliding_window=window + 3,
                        num_attention_heads=heads, num_key_value_heads=heads)
    got = crossover_context(cfg, base, kv_dtype="float32")

    def below(n):
        return cache_bytes(cfg, 1, n, "float32").total_bytes < cache_bytes(base, 1, n, "float32").total_bytes

    # Past the windows (<= 43) both costs are affine, and these small dimensions put any root of
    # their difference well inside the scan; the sign at 10**9 is the final one.
    below = [below(n) for n in range(1, 400)] + [below(10**9)]
    if not below[-1]:
        assert got is None
    else:
        last_not_below = max((i for i, b in enumerate(below) if not b), default=-1)
        assert got == last_not_below + 2  # below[i] is n = i + 1


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 10**7), pattern=st.text(alphabet="GKLDX", min_size=1, max_size=6))
def test_linear_state_independent_of_context(n, pattern):
    cfg = HybridConfig(layer_pattern=pattern, num_layers=len(pattern))
    assert cache_bytes(cfg, 3, n).total_bytes == cache_bytes(cfg, 3, 1).total_bytes


# -------------------------------------------------------------- compute
def test_pairs_and_flops():
    assert memory._pairs(5) == 15 and memory._pairs(5, 2) == sum(min(t, 2) for t in range(1, 6))
    gdn = HybridConfig.preset("tiny-gdn")
    assert memory.prefill_flops(gdn, 1000)["quadratic"] == 0
    mha = HybridConfig.preset("tiny-mha")
    f1, f2 = memory.prefill_flops(mha, 1000), memory.prefill_flops(mha, 2000)
    assert f2["quadratic"] / f1["quadratic"] == pytest.approx(4, rel=1e-2)
    assert f2["projections"] == 2 * f1["projections"]
    assert f1["total"] == sum(f1[k] for k in ("quadratic", "mixing_linear", "projections", "mlp", "head"))


@pytest.mark.parametrize("preset,total_b,active_b", [
    ("qwen3-next-80b-a3b", 80, 3), ("kimi-linear-48b-a3b", 48, 3), ("minimax-m1", 456, 45.9),
    ("minimax-m2", 230, 10), ("deepseek-v3.2", 671, 37), ("qwen3-32b", 32.8, 32.8),
    ("llama-3.1-8b", 8, 8), ("llama-3.1-70b", 70, 70), ("qwen3.5-397b-a17b", 397, 17),
])
def test_param_counts_near_published(preset, total_b, active_b):
    total, active = memory.param_counts(HybridConfig.preset(preset))
    assert total / 1e9 == pytest.approx(total_b, rel=0.05)
    assert active / 1e9 == pytest.approx(active_b, rel=0.35)  # published actives round and differ on embeddings


def test_decode_bytes_and_n2_tax():
    cfg = HybridConfig.preset("qwen3-next-80b-a3b")
    d1, d8 = memory.decode_bytes_per_token(cfg, 32768, 1), memory.decode_bytes_per_token(cfg, 32768, 8)
    row = cfg.hidden_size * 2  # each decoded token reads its own embedding row; the rest is shared
    # a batch of 8 reaches more of the 512 experts: E (1 - (1 - k/E)^8) per MoE layer instead of k
    more = 48 * (memory.experts_touched(cfg, 8) - 10) * 3 * 2048 * 512 * 2
    assert memory.experts_touched(cfg, 1) == pytest.approx(10) and 74 < memory.experts_touched(cfg, 8) < 75
    assert d1["weights"] - row + more == pytest.approx(8 * (d8["weights"] - row))
    assert d1["kv"] == d8["kv"] == 12 * 2 * 2 * 256 * 2 * 32768
    assert d1["state"] == 2 * cache_bytes(cfg, 1, 32768).state_bytes  # read and written back
    ds = HybridConfig.preset("deepseek-v3.2")  # sparse: all index keys, only top-k latents
    assert memory.decode_bytes_per_token(ds, 10**5)["kv"] == 61 * (132 * 10**5 + 576 * 2 * 2048)
    t = memory.n2_tax(cfg, 262144)
    twin_t = memory.n2_tax(attention_twin(cfg), 262144)
    assert 0 < t["quadratic_share"] < twin_t["quadratic_share"] < 1
    assert t["cache_bytes_saved"] == cache_bytes(cfg, 1, 262144).total_bytes - cache_bytes(cfg, 1, 32768).total_bytes
    assert "32,768" in memory.n2_tax_line(cfg, 262144)


# -------------------------------------------------------------- bad input
@pytest.mark.parametrize("call,match", [
    (lambda c: cache_bytes(c, 0, 10), "batch"),
    (lambda c: cache_bytes(c, 1, -5), "context"),
    (lambda c: cache_bytes(c, 1, 2.5), "context"),
    (lambda c: cache_bytes(c, 1, 10, kv_dtype="int8"), "kv_dtype"),
    (lambda c: cache_bytes(c, 1, 10, state_dtype="fp32"), "state_dtype"),
    (lambda c: layer_cost(c, "Q"), "letter"),
    (lambda c: memory.n2_tax(c, 100, cap=0), "cap"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(HybridConfig())


@pytest.mark.parametrize("fn", [lambda c: cache_bytes(c, 1, 1), attention_twin, lambda c: memory.prefill_flops(c, 8),
                                lambda c: memory.decode_bytes_per_token(c, 8),
                                lambda c: crossover_context(HybridConfig(), c)])
def test_not_a_config(fn):
    with pytest.raises(TypeError, match="expected a HybridConfig"):
        fn({"num_layers": 4})


# -------------------------------------------------------------- CLI and export
def test_cli_table_shows_reduction(capsys):
    assert main(["memory", "--preset", "qwen3-next-80b-a3b", "--context", "262144"]) == 0
    out = capsys.readouterr().out
    assert "74.7%" in out and "crossover" in out and "n^2 tax" in out


def test_cli_json_rows(capsys):
    assert main(["memory", "--preset", "kimi-linear-48b-a3b", "--context", "4k,128k", "--batch", "1,8",
                 "--vs", "llama-3.1-70b", "--state-dtype", "bfloat16", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["context"], r["batch"]) for r in rows] == [(4096, 1), (4096, 8), (131072, 1), (131072, 8)]
    llama = HybridConfig.preset("llama-3.1-70b")
    kimi = HybridConfig.preset("kimi-linear-48b-a3b")
    for r in rows:
        assert r["total_bytes"] == cache_bytes(kimi, r["batch"], r["context"], state_dtype="bfloat16").total_bytes
        assert r["baseline_total_bytes"] == cache_bytes(llama, r["batch"], r["context"], state_dtype="bfloat16").total_bytes
        assert r["kv_bytes"] + r["state_bytes"] + r["bookkeeping_bytes"] == r["total_bytes"]


def test_cli_plot_and_errors(tmp_path, capsys):
    png = tmp_path / "m.png"
    assert main(["memory", "--preset", "minimax-m1", "--context", "64k", "--plot", str(png), "--log"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["memory", "--preset", "nope"]) == 2
    assert "preset" in capsys.readouterr().err


def test_presets_js_is_up_to_date():
    assert memory.PRESETS_JS.read_text() == memory.presets_js(), "run: python -m hybridlm.memory"


def test_cli_config_from_hf_json(tmp_path, capsys):
    hf = {"model_type": "qwen3_next", "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512,
          "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
          "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 32,
          "linear_value_head_dim": 32, "linear_conv_kernel_dim": 4}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert main(["memory", "--config", str(tmp_path), "--context", "1000", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    cfg = HybridConfig(vocab_size=1000, hidden_size=256, num_layers=8, layer_pattern="GGGA", num_attention_heads=4,
                       num_key_value_heads=2, head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4,
                       linear_key_head_dim=32, linear_value_head_dim=32)
    assert row["total_bytes"] == cache_bytes(cfg, 1, 1000).total_bytes


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_param_counts_equal_the_models_weight_matrices(name):
    """memory.param_counts (norms and other 1-D parameters left out) equals what HybridLM builds."""
    import torch

    from hybridlm.model import HybridLM

    cfg = HybridConfig.preset(name)
    with torch.device("meta"):
        model = HybridLM(cfg)
    matrices = sum(p.numel() for p in model.parameters() if p.dim() > 1)
    assert memory.param_counts(cfg)[0] == matrices
