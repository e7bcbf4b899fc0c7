"""The study: equal-size models, gate init knob, previous-token rule, time guard, and an end-to-end
micro run of `hybridlm study`."""

import json
import time

import pytest
import torch

from hybridlm import HybridLM
from hybridlm.cli import main
from hybridlm.study import (ALL_PATTERNS, SCALES, GateInit, PrevTokenEmbedding, StudyConfig, apply_gate_init,
                            build_model, count_params, matched_configs, uses_token_shift)
from hybridlm.study_run import Run, run_study


def test_default_patterns_get_equal_depth_and_matched_parameters():
    configs = matched_configs(StudyConfig(patterns=ALL_PATTERNS))
    assert set(configs) == set(ALL_PATTERNS)
    assert {c.num_layers for c in configs.values()} == {8}
    counts = [count_params(c) + 28 * 64 * uses_token_shift(c, "layers") for c in configs.values()]
    assert (max(counts) - min(counts)) / max(counts) < 0.01
    assert configs["GGGGGGGA"].layer_types == "GGGGGGGA" and configs["GGGA"].layer_types == "GGGAGGGA"


def test_gate_init_sets_every_gated_layer():
    sc = StudyConfig(patterns=("GGGA",), num_layers=4)
    model = HybridLM(matched_configs(sc)["GGGA"])
    gi = GateInit.parse("slow=0.5:0.75:0.0001:0.001")
    assert apply_gate_init(model, gi, torch.Generator().manual_seed(0)) == 3
    for layer in model.layers:
        if layer.letter == "G":
            a = layer.mixer.A_log.exp()
            dt = torch.nn.functional.softplus(layer.mixer.dt_bias)
            assert ((a >= 0.5 - 1e-6) & (a <= 0.75 + 1e-6)).all()
            assert ((dt >= 1e-4 * 0.999) & (dt <= 1e-3 * 1.001)).all()


def test_a_subset_of_patterns_gets_the_sizes_of_the_whole_study():
    whole = matched_configs(StudyConfig(patterns=ALL_PATTERNS))
    part = matched_configs(StudyConfig(patterns=("D", "X"), num_layers=8))
    assert {p: c.intermediate_size for p, c in part.items()} == {p: whole[p].intermediate_size for p in ("D", "X")}


@pytest.mark.parametrize("text", ["slow", "x=1:2:3", "x=2:1:0.1:0.2", "x=a:b:c:d"])
def test_bad_gate_init_raises(text):
    with pytest.raises(ValueError, match="gate init"):
        GateInit.parse(text)


@pytest.mark.parametrize("kw, match", [({"patterns": ()}, "patterns"), ({"patterns": ("GQ",)}, "layer_pattern"),
                                       ({"patterns": ALL_PATTERNS, "num_layers": 4}, "num_layers"),
                                       ({"eval_pairs": (40,)}, "num_pairs"),
                                       ({"hidden_size": 66}, "hidden_size"), ({"token_shift": "yes"}, "token_shift"),
                                       ({"chunk_size": 24}, "chunk_size"), ({"max_minutes": 0}, "max_minutes")])
def test_bad_study_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        StudyConfig(**kw)


def test_micro_study_writes_report_plots_and_results(tmp_path, capsys):
    out = tmp_path / "micro"
    rc = main(["study", "--patterns", "A,G", "--ratios", "1", "--layers", "2", "--hidden", "32", "--steps", "3",
               "--batch-size", "4", "--train-len", "24", "--train-pairs", "2,4", "--eval-pairs", "2,5",
               "--eval-lens", "24,48", "--eval-len-pairs", "3", "--eval-batches", "1", "--cache-contexts", "64,256",
               "--decode-context", "16", "--gate-init", "slow=0.5:1:0.0001:0.001", "--max-minutes", "60",
               "--out", str(out)])
    assert rc == 0
    assert f"report: {out}/report.md" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    labels = [r["label"] for r in results["runs"]]
    assert labels == ["A", "G", "G@slow", "GA", "GA@slow"]
    assert results["complete"] and results["skipped"] == [] and results["study"]["max_minutes"] == 60
    for r in results["runs"]:
        assert set(r["recall"]["pairs"]) == {"2", "5"} and set(r["recall"]["length"]) == {"24", "48"}
        assert all(0.0 <= a <= 1.0 for a in r["recall"]["pairs"].values())
        assert r["decode_tokens_per_s"] > 0
    by = {r["label"]: r for r in results["runs"]}
    # A recurrent state does not grow with the context; a KV cache does.
    assert by["G"]["cache_bytes"]["64"] == by["G"]["cache_bytes"]["256"]
    assert by["A"]["cache_bytes"]["256"] > 3 * by["A"]["cache_bytes"]["64"] > 0
    report = (out / "report.md").read_text()
    for label in labels:
        assert f"| `{label}` |" in report
    for png in ("acc_vs_pairs.png", "acc_vs_length.png", "cache_vs_context.png", "acc_vs_cache.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"]({png})" in report


def test_every_layer_without_a_conv_sees_the_previous_token():
    # The default: the hybrid's attention layer gets what the all-attention model gets; all-G and
    # all-D models, whose every layer has a conv, do not. "noconv" left the hybrid out.
    sc = StudyConfig(patterns=("GGGA", "A", "X", "G", "D"), num_layers=4)
    assert sc.token_shift == "layers" == SCALES["gpu"].token_shift
    configs = matched_configs(sc)
    assert [uses_token_shift(c, "layers") for c in configs.values()] == [True, True, True, False, False]
    assert [uses_token_shift(c, "noconv") for c in configs.values()] == [False, True, True, False, False]
    assert [uses_token_shift(c, "all") for c in configs.values()] == [True] * 5
    counts = [count_params(c) + 28 * 64 * uses_token_shift(c, "layers") for c in configs.values()]
    assert (max(counts) - min(counts)) / max(counts) < 0.01
    assert isinstance(build_model(configs["GGGA"]).embed_tokens, PrevTokenEmbedding)
    assert not isinstance(build_model(configs["G"]).embed_tokens, PrevTokenEmbedding)


def test_token_shift_adds_the_previous_token_and_keeps_cache_parity():
    sc = StudyConfig(patterns=("GGGA",), num_layers=4)
    configs = matched_configs(sc)
    torch.manual_seed(0)
    model = build_model(configs["GGGA"], token_shift="layers").eval()
    ids = torch.randint(8, 28, (2, 11))
    emb = model.embed_tokens
    expected = emb.embed(ids) + emb.prev(torch.nn.functional.pad(ids[:, :-1], (1, 0)))
    assert torch.equal(emb(ids), expected)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 11)
        steps = [model(ids[:, :5], cache=cache)]
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(5, 11)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)


def test_time_guard_skips_models_that_would_overrun_and_reports_the_rest(tmp_path, monkeypatch):
    # Each fake model takes 1.2 s against a 1 s limit: the first starts, the others would end past it.
    sc = StudyConfig(patterns=("A", "G", "GGGA"), eval_pairs=(2, 4), eval_lens=(32,), cache_contexts=(64,),
                     max_minutes=1 / 60, jobs=1, threads=1)

    def fake_run(pattern, config, gi, sc, device, log=print):
        time.sleep(1.2)
        return Run(label=pattern, pattern=pattern, layer_types=config.layer_types, gate_init=None, params=1,
                   intermediate_size=config.intermediate_size, train_seconds=1.2, train_tokens_per_s=1.0,
                   final_loss=0.0, recall={"pairs": {2: 1.0, 4: 0.5}, "length": {32: 0.5}}, cache_bytes={64: 10},
                   decode_tokens_per_s=1.0)

    monkeypatch.setattr("hybridlm.study_run.run_one", fake_run)
    results = run_study(sc, tmp_path, device=torch.device("cpu"), log=lambda line: None)
    assert [r["label"] for r in results["runs"]] == ["A"]
    assert results["skipped"] == ["G", "GGGA"] and results["complete"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["skipped"] == ["G", "GGGA"] and [r["label"] for r in saved["runs"]] == ["A"]
    report = (tmp_path / "report.md").read_text()
    assert "| `A` |" in report and "**Not run**" in report and "`G`, `GGGA`" in report


def test_gpu_preset_stays_under_the_issue_bound_and_trains_the_comparison_first():
    gpu = SCALES["gpu"]
    assert gpu.max_minutes is not None and gpu.max_minutes < 30
    assert gpu.patterns[:3] == ("A", "G", "GGGA") and "GGGGGGGA" in gpu.patterns
    assert max(gpu.eval_pairs) > max(gpu.train_pairs) > max(SCALES["cpu"].train_pairs)


@pytest.mark.parametrize("task, sizes, unit", [("copy", ("2,4", "2,6"), "tokens to copy"),
                                               ("multihop", ("1,2", "1,3"), "chains")])
def test_study_on_other_tasks_trains_and_reports_their_size_axis(tmp_path, task, sizes, unit):
    out = tmp_path / task
    assert main(["study", "--task", task, "--patterns", "A,G", "--layers", "2", "--hidden", "32", "--steps", "3",
                 "--batch-size", "4", "--vocab", "40", "--train-pairs", sizes[0], "--eval-pairs", sizes[1],
                 "--eval-batches", "1", "--cache-contexts", "64", "--decode-context", "16", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["study"]["task"] == task
    for r in results["runs"]:
        assert list(r["recall"]["pairs"]) == sizes[1].split(",") and r["recall"]["length"] == {}
        assert all(0.0 <= a <= 1.0 for a in r["recall"]["pairs"].values())
    report = (out / "report.md").read_text()
    assert f"## Recall vs number of {unit}" in report and "sequence length" not in report
    assert not (out / "acc_vs_length.png").exists() and (out / "acc_vs_pairs.png").exists()


@pytest.mark.parametrize("kw, match", [({"task": "sort"}, "task"), ({"task": "multihop", "train_pairs": (9,)}, "vocab_size"),
                                       ({"task": "copy", "eval_pairs": ()}, "eval_pairs")])
def test_bad_task_settings_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        StudyConfig(**kw)
