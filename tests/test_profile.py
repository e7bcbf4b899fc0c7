"""The profiler on CPU at tiny size: chunked prefill == one forward, figures present and positive,
measured cache == memory.py, the hybrid's cache below its twin's, JSON keys, plot, CLI, bad input."""

import dataclasses
import json

import pytest
import torch

from hybridlm import memory
from hybridlm.cli import main
from hybridlm.config import HybridConfig
from hybridlm.model import HybridLM
from hybridlm.profile import (PREFILL_TOKENS, ROW_KEYS, ProfileSettings, analytic_max_batch, build_model, bytes_per_token,
                              copy_bandwidth, decode_greedy, measure, measure_transformers, prefill_chunked, profile_models, scaled_config,
                              search_max_batch, warmup_length)
from hybridlm.profile_report import format_table, plot_profile

PRESET = "tiny-qwen3-next"
SETTINGS = ProfileSettings(device="cpu", decode_steps=4, prefill_chunk=64)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: with several intra-op threads, OpenMP barriers cost more than the arithmetic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def rows():
    before = torch.get_num_threads()  # module fixtures run before the function-scoped one_thread
    torch.set_num_threads(1)
    cfg = HybridConfig.preset(PRESET)
    yield profile_models({"hybrid": cfg, "twin": memory.attention_twin(cfg)}, [1, 65, 300], [1, 2], SETTINGS)
    torch.set_num_threads(before)


@pytest.mark.parametrize("T", [1, 63, 65, 300])
def test_chunked_prefill_and_decode_equal_one_forward(T):
    torch.manual_seed(0)
    model = HybridLM(HybridConfig.preset(PRESET)).eval()
    ids = torch.randint(0, 256, (2, T + 3))
    chunked, whole = model.new_cache(2, T + 3), model.new_cache(2, T + 3)
    got = prefill_chunked(model, ids[:, :T], chunked, chunk=64)
    with torch.no_grad():
        want = model(ids[:, :T], cache=whole)[:, -1]
        full = model(ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, full[:, T - 1], rtol=1e-4, atol=1e-5)
    # greedy decode continues from the chunked cache as from a one-shot prefill
    assert torch.equal(decode_greedy(model, got.argmax(-1), chunked, 3), decode_greedy(model, want.argmax(-1), whole, 3))
    assert chunked.seq_len == T + 3


def test_rows_have_every_figure_positive(rows):
    assert len(rows) == 2 * 3 * 2
    for r in rows:
        assert set(ROW_KEYS) <= set(r)
        for key in ("ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s", "decode_step_s", "cache_bytes",
                    "weight_bytes", "bytes_per_token", "copy_bandwidth_bytes_per_s", "bandwidth_bound_tokens_per_s",
                    "bandwidth_share", "max_batch"):
            assert r[key] > 0, key
        assert r["peak_bytes"] is None  # CPU: not measured, not invented
        assert r["cache_bytes"] == r["cache_bytes_memory_py"]
        assert r["cache_max_len"] == r["context"] + SETTINGS.decode_steps + 1
        assert r["max_batch_found"] is None
    json.dumps(rows)  # JSON-ready


def test_hybrid_cache_below_twin_at_long_context(rows):
    def at(model, context):
        return next(r for r in rows if r["model"] == model and r["context"] == context and r["batch"] == 1)

    assert at("hybrid", 300)["cache_bytes"] < at("twin", 300)["cache_bytes"]
    assert at("hybrid", 300)["max_batch"] > at("twin", 300)["max_batch"]
    # the cache grows with the batch exactly
    two = next(r for r in rows if r["model"] == "hybrid" and r["context"] == 300 and r["batch"] == 2)
    assert two["cache_bytes"] == 2 * at("hybrid", 300)["cache_bytes"]


@pytest.mark.parametrize("tied", [False, True])
def test_bandwidth_bound_counts_state_twice_and_one_embedding_row(tied):
    cfg = HybridConfig.preset(PRESET, tie_word_embeddings=tied)
    d = memory.decode_bytes_per_token(cfg, 1000, 4, kv_dtype="float32", weight_dtype="float32")
    row = cfg.hidden_size * 4
    table = 0 if tied else cfg.vocab_size * row
    extra = (memory.experts_touched(cfg, 4) - cfg.num_experts_per_tok) * 3 * cfg.hidden_size * \
        cfg.moe_intermediate_size * sum(cfg.layer_uses_moe(i) for i in range(cfg.num_layers))
    assert d["weights"] == pytest.approx(((memory.param_counts(cfg)[1] + extra) * 4 - table) / 4 + row)
    state = sum(c.state + c.conv for c in (memory.layer_cost(cfg, x, "float32") for x in cfg.layer_types))
    assert d["state"] == 2 * state
    assert bytes_per_token(cfg, 1000, 4, "float32") == d["total"]
    assert copy_bandwidth(torch.device("cpu"), nbytes=2**20, trials=3, copies=2) > 0


def test_analytic_max_batch_is_budget_over_bytes_per_row():
    cfg = HybridConfig.preset(PRESET)
    per_row = memory.cache_bytes(cfg, 1, 500, kv_dtype="bfloat16").total_bytes
    assert analytic_max_batch(cfg, 500, 7 * per_row, "bfloat16") == 7
    assert analytic_max_batch(cfg, 500, 7 * per_row - 1, "bfloat16") == 6
    assert analytic_max_batch(cfg, 500, 7 * (per_row + 100), "bfloat16", extra_per_row=100) == 7
    assert analytic_max_batch(cfg, 500, None, "bfloat16") is None


def test_warmup_runs_every_chunk_shape():
    assert warmup_length(50, 64) == 50
    assert warmup_length(128, 64) == 128
    assert warmup_length(300, 64) == 64 + 300 % 64


def test_scaled_config_cuts_layers_and_experts():
    cfg = scaled_config("qwen3-next-80b-a3b", layers=8, experts=4)
    assert cfg.layer_types == "GGGAGGGA" and cfg.hidden_size == 2048
    assert cfg.num_experts == 4 and cfg.num_experts_per_tok == 4  # 10 per token cannot exceed 4
    with pytest.raises(ValueError, match="experts.*no MoE"):
        scaled_config("tiny-hybrid-3to1", experts=4)
    with pytest.raises(ValueError, match="layers"):
        scaled_config(PRESET, layers=0)


def test_transformers_generate_row():
    model = HybridLM(HybridConfig.preset(PRESET)).eval()
    r = measure_transformers(model, "hybrid", 65, 1, SETTINGS)
    assert r["engine"] == "transformers" and r["model"] == "hybrid (transformers)"
    assert r["ttft_s"] > 0 and r["decode_tokens_per_s"] > 0
    assert r["cache_bytes"] is None and r["peak_bytes"] is None
    assert "n/a" in format_table([r])


def test_at_max_batch_row_uses_the_budget():
    cfg = HybridConfig.preset(PRESET)
    per_row = memory.cache_bytes(cfg, 1, 100 + SETTINGS.decode_steps + 1, kv_dtype="float32").total_bytes
    settings = ProfileSettings(device="cpu", decode_steps=4, prefill_chunk=64, memory_budget=3 * per_row + 5)
    rows = profile_models({"hybrid": cfg}, [100], [1], settings, at_max_batch=True)
    assert [r["batch"] for r in rows] == [1, 3] and rows[1]["at_max_batch"]
    assert rows[1]["max_batch"] == 3 and rows[1]["decode_tokens_per_s"] > 0
    with pytest.raises(ValueError, match="memory_budget"):
        profile_models({"hybrid": cfg}, [100], [1], SETTINGS, at_max_batch=True)


def test_table_and_plot(rows, tmp_path):
    table = format_table(rows)
    assert table.count("\n") == len(rows) + 2 and "copy bandwidth" in table
    assert "prefill tokens of each prompt per call: 64 at batch 1, 64 at batch 2" in table
    assert all(r["pdl"] is False for r in rows) and "PDL" not in table  # the CPU: plain launches
    assert format_table([{**rows[0], "pdl": True}]).splitlines()[1].endswith("  PDL")
    path = tmp_path / "p.png"
    plot_profile(rows, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_json_and_plot(tmp_path, capsys):
    png = tmp_path / "profile.png"
    assert main(["profile", "--preset", "tiny-hybrid-3to1", "--contexts", "65,200", "--batch", "1",
                 "--device", "cpu", "--decode-steps", "2", "--prefill-chunk", "64", "--json", "--plot", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {r["model"] for r in out} == {"tiny-hybrid-3to1", "tiny-hybrid-3to1 twin"}
    assert all(set(ROW_KEYS) <= set(r) for r in out)
    assert png.stat().st_size > 0


@pytest.mark.parametrize("argv, words", [
    (["--batch", "0"], "--batch"),
    (["--layers", "0"], "--layers"),
    (["--decode-steps", "0"], "--decode-steps"),
    (["--preset", "tiny-hybrid-3to1", "--experts", "2"], "experts"),
    (["--preset", "no-such-model"], "preset"),
    (["--max-batch-search"], "CUDA"),
])
def test_cli_bad_arguments(argv, words, capsys):
    code = main(["profile", "--device", "cpu", "--contexts", "8"] + argv)
    assert code == 2
    assert words in capsys.readouterr().err


def test_prefill_chunk_spreads_a_token_budget_over_the_batch():
    cpu = ProfileSettings(device="cpu")
    assert cpu.chunk_for(1) == PREFILL_TOKENS["cpu"] == 2048
    assert [cpu.chunk_for(b) for b in (3, 32, 33, 100, 4096)] == [640, 64, 62, 20, 1]
    for b in (1, 2, 3, 7, 31, 32, 33, 100, 999, 2048):  # never more tokens a call than the budget
        assert 1 <= b * cpu.chunk_for(b) <= PREFILL_TOKENS["cpu"]
    assert ProfileSettings(device="cpu", prefill_chunk=100).chunk_for(8) == 100  # set: per prompt, as given
    with pytest.raises(ValueError, match="prefill_chunk: expected an int >= 1 or None"):
        ProfileSettings(prefill_chunk=0)


def test_rows_record_their_prefill_chunk():
    cfg = HybridConfig.preset(PRESET)
    settings = dataclasses.replace(SETTINGS, prefill_chunk=None)
    row, = profile_models({"hybrid": cfg}, [70], [4], settings)
    assert row["prefill_chunk"] == settings.chunk_for(4) == 512
    row, = profile_models({"hybrid": cfg}, [70], [4], SETTINGS)
    assert row["prefill_chunk"] == 64


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="memory_budget"):
        ProfileSettings(memory_budget=0)
    with pytest.raises(ValueError, match="decode_steps"):
        ProfileSettings(decode_steps=0)
    with pytest.raises(ValueError, match="prefill_chunk"):
        ProfileSettings(prefill_chunk=-1)
    with pytest.raises(ValueError, match="prefill_repeats"):
        ProfileSettings(prefill_repeats=0)
    with pytest.raises(TypeError, match="dtype"):
        ProfileSettings(dtype=torch.int32)
    with pytest.raises(ValueError, match="device"):
        ProfileSettings(device="mps")
    with pytest.raises(ValueError, match="contexts"):
        profile_models({"m": HybridConfig.preset(PRESET)}, [], [1], SETTINGS)
    with pytest.raises(ValueError, match="batches"):
        profile_models({"m": HybridConfig.preset(PRESET)}, [8], [0], SETTINGS)
    with pytest.raises(ValueError, match="CUDA"):
        search_max_batch(HybridLM(HybridConfig.preset(PRESET)), 8, SETTINGS, 4)


@pytest.mark.parametrize("preset", ["tiny-qwen3-next", "tiny-swa", "tiny-kimi-linear"])
def test_fill_cache_looks_prefilled(preset):
    from hybridlm.profile import fill_cache

    torch.manual_seed(0)
    model = HybridLM(HybridConfig.preset(preset)).eval()
    cache = model.new_cache(2, 40)
    fill_cache(cache, 33)
    assert cache.seq_len == 33 and cache.next_position.tolist() == [33, 33]
    if cache.positions is not None:
        assert cache.positions[:, :33].tolist() == [list(range(33))] * 2
        assert (cache.positions[:, 33:] == -1).all()
    for slot in cache.layers:
        for name, t in vars(slot).items():
            if isinstance(t, torch.Tensor) and t.is_floating_point() and name not in ("k_pos",):
                assert torch.isfinite(t.float()).all() and t.float().abs().sum() > 0, name
    with torch.no_grad():
        logits = model(torch.zeros(2, 1, dtype=torch.long), cache=cache)
    assert torch.isfinite(logits).all() and cache.seq_len == 34
    with pytest.raises(ValueError, match="context: expected < the cache's max_len"):
        fill_cache(cache, 40)


def test_filled_rows_time_decode_only():
    cfg = HybridConfig.preset(PRESET)
    rows = profile_models({"hybrid": cfg}, [300], [2], ProfileSettings(device="cpu", decode_steps=3, fill=True))
    (r,) = rows
    assert r["filled"] and r["ttft_s"] is None and r["decode_tokens_per_s"] > 0 and r["decode"] == "eager"
    assert r["cache_bytes"] == r["cache_bytes_memory_py"]
    assert "n/a" in format_table(rows)
    with pytest.raises(TypeError, match="fill: expected a bool"):
        ProfileSettings(fill=1)


def test_summary_compares_twin_at_largest_batch_transformers_and_bandwidth(tmp_path, capsys):
    from hybridlm.profile_report import main as report_main, summarize

    def row(model, batch, rate, engine="hybridlm", share=0.5):
        return {"model": model, "engine": engine, "context": 300, "batch": batch, "decode_tokens_per_s": rate,
                "bandwidth_share": share, "ttft_s": 0.1, "peak_bytes": None, "cache_bytes": 10,
                "cache_bytes_memory_py": 10, "device": "cpu", "dtype": "float32"}

    rows = [row("m", 1, 100.0), row("m", 8, 600.0, share=0.8), row("m twin", 1, 90.0), row("m twin", 2, 150.0),
            row("m (transformers)", 1, 4.0, engine="transformers", share=None)]
    lines = summarize(rows, context=300)
    assert lines[0] == "m vs its twin at 300: 600 tokens/s (batch 8) vs 150 (batch 2): 4.00x"
    assert lines[1] == "m vs transformers' generate at 300, batch 1: 100.0 vs 4.00 tokens/s: 25.0x"
    assert lines[2].startswith("bandwidth-bound share: best 80% (m, 300, batch 8), worst 50%")
    assert summarize(rows, context=4096)[0] == "m vs its twin at 4,096: not measured"
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    assert report_main([str(path), "--context", "300"]) == 0
    assert "4.00x" in capsys.readouterr().out
    png = tmp_path / "rows.png"  # the saved rows drawn again, as the profile's --plot draws them
    assert report_main([str(path), "--context", "300", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_prefill_repeats_report_the_median_time_to_first_token():
    model = build_model(HybridConfig.preset(PRESET), SETTINGS)
    settings = dataclasses.replace(SETTINGS, prefill_repeats=3)
    row = measure(model, 96, 1, settings)
    assert len(row["ttft_runs_s"]) == 3 and all(t > 0 for t in row["ttft_runs_s"])
    assert row["ttft_s"] == sorted(row["ttft_runs_s"])[1]
    assert row["cache_bytes"] == measure(model, 96, 1, SETTINGS)["cache_bytes"]
